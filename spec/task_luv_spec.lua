-- corowatch.task on luv (Debian's lua-luv): the scheduler waits in the uv
-- loop, uv callbacks wake tasks, wrap_callback turns uv's callback-last
-- functions into waits that a cancel cleans up after.
local has_luv, uv = pcall(require, "luv")
local task = require("corowatch.task")
local threads = require("spec.helpers.threads")
local gettime = require("corowatch").gettime

local describe_luv = has_luv and describe or function(name)
  describe(name, function()
    pending("luv is not installed for " .. _VERSION .. " (Debian: lua-luv)")
  end)
end

describe_luv("corowatch.task with the luv backend", function()
  before_each(function() task.use(require("corowatch.task.luv")(uv)) end)
  after_each(function() task.use(nil) end)

  it("wakes a task from a real uv timer, the scheduler waiting in the uv loop", function()
    local fired_at
    local value, elapsed = task.run(function()
      local f = task.future()
      local timer = uv.new_timer()
      local started = gettime()
      uv.update_time()
      timer:start(30, 0, function()
        fired_at = gettime()
        timer:close()
        f:complete("from uv")
      end)
      return f:await(), gettime() - started
    end)
    assert.are.equal("from uv", value)
    assert.is_truthy(fired_at)
    assert.is_true(elapsed >= 0.025 and elapsed < 1, "elapsed " .. elapsed)
  end)

  it("sleeps with the uv loop running other callbacks meanwhile", function()
    local ticks = 0
    task.run(function()
      local timer = uv.new_timer()
      uv.update_time()
      timer:start(5, 5, function() ticks = ticks + 1 end)
      task.sleep(0.06)
      timer:stop()
      timer:close()
    end)
    assert.is_true(ticks >= 2, "ticks " .. ticks)
  end)

  it("wrap_callback(uv.fs_open) waits for the fd, and a cancel hands a late fd to cleanup", function()
    local path = os.tmpname()
    local closed = {}
    local fs_open = task.wrap_callback(uv.fs_open, {
      cleanup = function(err, fd)
        if not err then closed[#closed + 1] = assert(uv.fs_close(fd)) end
      end,
    })
    task.run(function()
      -- completes normally
      local err, fd = fs_open(path, "r", 438)
      assert.is_nil(err)
      assert.is_true(uv.fs_close(fd))
      -- cancelled while the open is in flight
      local t = task.spawn(fs_open, path, "r", 438)
      task.yield() -- t now waits on its callback
      assert.are.equal("waiting", t:status())
      t:cancel("no longer needed")
      local ok, cerr = t:pawait()
      assert.is_false(ok)
      assert.are.equal("no longer needed", cerr.reason)
      local deadline = gettime() + 5
      while #closed == 0 and gettime() < deadline do task.sleep(0.005) end
    end)
    os.remove(path)
    assert.are.same({ true }, closed)
  end)

  it("raises instead of hanging when neither tasks nor the uv loop can wake the root", function()
    local ok, err = pcall(task.run, function() task.future():await() end)
    assert.is_false(ok)
    assert.is_truthy(err:find("can never happen", 1, true))
  end)

  it("a cancel from another OS thread wakes the uv loop at once", function()
    local thread = threads.start(function(channel)
      local task = require("corowatch.task")
      local uv = require("luv")
      local gettime = require("corowatch").gettime
      task.use(require("corowatch.task.luv")(uv))
      task.run(function()
        -- keeps the uv loop alive for 10 s: only the cancel can end this early
        local timer = uv.new_timer()
        timer:start(10000, 0, function() end)
        local child = task.spawn(function()
          channel:send(task.current():id())
          task.future():await()
        end)
        local ok = child:pawait()
        channel:send(tostring(ok), child:status(), ("%.6f"):format(gettime()))
        timer:close()
      end)
    end)
    local id = tonumber(assert(thread:receive(10)))
    local settle = gettime() + 0.05
    while gettime() < settle do end
    local sent = gettime()
    assert.is_true(task.cancel_id(id))
    local line = assert(thread:receive(10))
    assert.is_true(thread:join())
    local ok, status, ended = line:match("^(%S+) (%S+) (%S+)$")
    assert.are.equal("false", ok)
    assert.are.equal("cancelled", status)
    assert.is_true(tonumber(ended) - sent < 1, "took " .. (tonumber(ended) - sent))
  end)
end)
