--- A luv backend for corowatch.task: the scheduler waits in the uv loop,
-- so uv's callbacks (timers, file system, sockets) run while tasks wait.
--
--     local task = require("corowatch.task")
--     task.use(require("corowatch.task.luv")(require("luv")))
--
-- The scheduler arms one uv timer for its next deadline and runs the uv
-- loop once per idle wait; a cancel from another OS thread makes a
-- descriptor readable that the loop polls, so it wakes at once.
-- @module corowatch.task.luv

local type, error, assert, setmetatable, math_ceil = type, error, assert, setmetatable, math.ceil

local function noop() end

-- One poll handle per descriptor (libuv refuses a second one on an fd),
-- shared by every backend made for the same luv module.
local pollers = setmetatable({}, { __mode = "k" }) -- uv -> { fd -> handle }

--- Makes the backend for the given luv module.
-- @tparam table uv `require("luv")`
-- @treturn function `backend(timeout, fd)`: waits in the uv loop until
-- something happens or `timeout` seconds pass (nil: no timeout), polling
-- `fd` (nil: none) for readability; returns whether the loop still has
-- work (active handles or requests) that could wake a task
return function(uv)
  if type(uv) ~= "table" or type(uv.run) ~= "function" or type(uv.new_timer) ~= "function" then
    error(("bad argument #1 to 'corowatch.task.luv' (luv module expected, got %s)"):format(type(uv)), 2)
  end
  local timer
  local polled = pollers[uv] or {}
  pollers[uv] = polled
  return function(timeout, fd)
    if not timer then timer = uv.new_timer() end
    if fd and not polled[fd] then
      local poller = assert(uv.new_poll(fd))
      poller:start("r", noop)
      poller:unref() -- polled while the loop runs; keeps nothing alive
      polled[fd] = poller
    end
    if timeout == nil and not uv.loop_alive() then return false end
    if timeout then
      uv.update_time() -- the loop's clock is stale after a while away
      timer:start(math_ceil(timeout * 1000), 0, noop)
    end
    uv.run("once")
    timer:stop()
    return uv.loop_alive()
  end
end
