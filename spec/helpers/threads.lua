--- OS threads for specs, on cqueues.thread (Debian's lua-cqueues).
--
-- `threads.start(body, ...)` runs `body(channel, ...)` in a new Lua state on
-- a new OS thread. The body is string-dumped, so it has no upvalues and gets
-- its arguments as strings or numbers. Both ends talk in lines through a
-- channel with `send(...)` and `receive([timeout])`; `join()` returns true,
-- or false and the body's error.
local cqueues_thread = require("cqueues.thread")

local threads = {}

local Channel = {}
Channel.__index = Channel

--- Sends its arguments, joined by spaces, as one line.
function Channel:send(...)
  local parts = { ... }
  for i = 1, select("#", ...) do parts[i] = tostring(parts[i]) end
  assert(self.socket:write(table.concat(parts, " "), "\n"))
  assert(self.socket:flush())
end

--- The next line, or nil and "timeout" after `timeout` seconds.
function Channel:receive(timeout)
  self.socket:settimeout(timeout)
  local line, err = self.socket:read("*l")
  if line == nil and err == nil then err = "closed" end
  if line == nil and type(err) == "number" then
    -- cqueues counts errors nobody cleared and raises past a limit.
    self.socket:clearerr()
    err = "timeout"
  end
  return line, err
end

function threads.channel(socket)
  return setmetatable({ socket = socket }, Channel)
end

local Thread = {}
Thread.__index = Thread
setmetatable(Thread, { __index = Channel })

-- Runs in the new state: wraps the socket, turns the JIT off (JIT-compiled
-- loops ignore hooks) and calls the body, loaded from its dumped source.
local function trampoline(socket, body, ...)
  if jit then jit.off() end
  local channel = require("spec.helpers.threads").channel(socket)
  local load = loadstring or load
  return assert(load(body))(channel, ...)
end

function threads.start(body, ...)
  local thread, socket = cqueues_thread.start(trampoline, string.dump(body), ...)
  return setmetatable({ thread = thread, socket = socket }, Thread)
end

--- Waits for the thread; returns true, or false and the body's error.
function Thread:join()
  local ok, err = self.thread:join()
  if not ok then return false, err end
  if err ~= nil then return false, err end
  return true
end

return threads
