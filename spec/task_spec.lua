-- corowatch.task: Coop-style tasks whose cancel and timeout reach code
-- that never yields.
local unpack = unpack or table.unpack
if jit then jit.off() end -- JIT-compiled loops never call hooks

local task = require("corowatch.task")
local corowatch = require("corowatch")
local mtint = require("mtint")
local gettime = corowatch.gettime

-- CPU-bound for at most `seconds` (so that a failure fails, not hangs):
-- never yields, calls nothing but the clock.
local function spin(seconds)
  local stop = gettime() + (seconds or 5)
  while gettime() < stop do end
  return "spun out"
end

local function busy()
  local x = 0
  for i = 1, 1e5 do x = x + i end
  return x
end

-- Runs `spec` as a task that is cancelled while it runs CPU-bound: it is
-- spawned inside a 0.05 s timeout scope, whose expiry cancels it through
-- the hook. Returns the task (ended) and the time of the cancel.
local function cancel_while_running(spec)
  local t, expiry
  task.run(function()
    expiry = gettime() + 0.05
    task.pcall(task.timeout, 0.05, function()
      t = task.spawn(spec)
      t:await()
    end)
  end)
  return t, expiry
end

local function kind_of(err)
  return type(err) == "table" and err.kind or nil
end

describe("corowatch.task running tasks", function()
  it("run returns the root task's results", function()
    assert.are.same({ 1, nil, 3 }, { task.run(function(a) return a, nil, 3 end, 1) })
  end)

  it("run raises the root task's original error value", function()
    local value = { "mine" }
    local ok, err = pcall(task.run, function() error(value) end)
    assert.is_false(ok)
    assert.are.equal(value, err)
  end)

  it("spawn does not run the task inline; await returns its results", function()
    task.run(function()
      local ran = false
      local t = task.spawn(function(a, b) ran = true; return a + b, "x" end, 1, 2)
      assert.is_false(ran)
      assert.are.equal("ready", t:status())
      assert.are.same({ 3, "x" }, { t:await() })
      assert.is_true(ran)
      assert.are.equal("done", t:status())
      assert.are.same({ true, 3, "x" }, { t:pawait() })
      assert.are.same({ 3, "x" }, { t:result() })
    end)
  end)

  it("reports running, waiting, failed and cancelled", function()
    task.run(function()
      local me = task.current()
      assert.are.equal("running", me:status())
      local sleeper = task.spawn(function() task.sleep(10) end)
      task.yield()
      assert.are.equal("waiting", sleeper:status())
      local failing = task.spawn(function() error("boom", 0) end)
      assert.are.same({ false, "boom" }, { failing:pawait() })
      assert.are.equal("failed", failing:status())
      assert.is_true(sleeper:cancel())
      assert.is_false(sleeper:pawait())
      assert.are.equal("cancelled", sleeper:status())
    end)
  end)

  it("result raises for a task that has not ended, and an ended task's error", function()
    task.run(function()
      local t = task.spawn(function() error("bad", 0) end)
      assert.has_error(function() t:result() end, "corowatch.task.result: task " .. t:id() .. " has not ended")
      t:pawait()
      assert.has_error(function() t:result() end, "bad")
    end)
  end)

  it("id is the mtint id of the task's coroutine", function()
    task.run(function()
      local t = task.spawn(function() return mtint.id() end)
      assert.are.equal(t:id(), t:await())
      assert.are.equal(mtint.id(), task.current():id())
    end)
  end)

  it("sleep lets others run, and yield lets ready tasks run first", function()
    local order = {}
    task.run(function()
      local a = task.spawn(function() task.sleep(0.02); order[#order + 1] = "a" end)
      local b = task.spawn(function() order[#order + 1] = "b1"; task.yield(); order[#order + 1] = "b2" end)
      local c = task.spawn(function() order[#order + 1] = "c" end)
      a:await(); b:await(); c:await()
    end)
    assert.are.same({ "b1", "c", "b2", "a" }, order)
  end)

  it("step runs ready tasks once for a host without a scheduler", function()
    local log = {}
    local t = task.spawn(function()
      log[#log + 1] = 1
      task.yield()
      log[#log + 1] = 2
      task.sleep(0.01)
      return "end"
    end)
    assert.are.same({}, log)
    assert.are.equal(0, task.step())
    assert.are.same({ 1 }, log)
    local delay = task.step()
    assert.are.same({ 1, 2 }, log)
    assert.is_true(delay ~= nil and delay <= 0.01)
    local deadline = gettime() + 2
    while t:status() ~= "done" and gettime() < deadline do task.step(0.05) end
    assert.are.equal("end", t:result())
    assert.is_nil(task.step())
  end)

  it("await outside any task drives the scheduler until the task ends", function()
    local t = task.spawn(function() task.sleep(0.01); return 7 end)
    assert.are.equal(7, t:await())
  end)

  it("ending the root cancels the tasks left and waits for their cleanup", function()
    local cleaned = 0
    local left
    task.run(function()
      left = task.spawn(function()
        local _, err = task.pcall(task.sleep, 10)
        cleaned = cleaned + 1
        error(err, 0)
      end)
      task.yield()
    end)
    assert.are.equal(1, cleaned)
    assert.are.equal("cancelled", left:status())
  end)

  it("raises, naming the waiting tasks, when the root waits on what can never happen", function()
    local ok, err = pcall(task.run, function()
      local f = task.future()
      task.spawn({ function() f:await() end, name = "stuck child" })
      f:await()
    end)
    assert.is_false(ok)
    assert.is_truthy(err:find("can never happen", 1, true))
    assert.is_truthy(err:find("task 'stuck child' (awaiting a future)", 1, true))
  end)
end)

describe("corowatch.task futures", function()
  it("completes, fails and awaits", function()
    task.run(function()
      local f = task.future()
      assert.is_false(f:done())
      task.spawn(function() task.sleep(0.01); f:complete(1, 2) end)
      assert.are.same({ 1, 2 }, { f:await() })
      assert.is_true(f:done())
      local g = task.future()
      task.spawn(function() g:fail("nope") end)
      assert.are.same({ false, "nope" }, { g:pawait() })
      assert.has_error(function() g:await() end, "nope")
    end)
  end)

  it("raises a clear error when completed twice", function()
    local f = task.future()
    f:complete(1)
    assert.has_error(function() f:complete(2) end,
      "corowatch.task.future: complete on a future that is already done")
    assert.has_error(function() f:fail("x") end,
      "corowatch.task.future: fail on a future that is already done")
  end)
end)

describe("corowatch.task cancel", function()
  it("of a task that has ended returns false", function()
    task.run(function()
      local t = task.spawn(function() return 1 end)
      t:await()
      assert.is_false(t:cancel())
    end)
  end)

  it("before the task first runs: its body never runs", function()
    task.run(function()
      local ran = false
      local t = task.spawn({ function() ran = true end, name = "never" })
      assert.is_true(t:cancel("early"))
      local ok, err = t:pawait()
      assert.is_false(ok)
      assert.is_false(ran)
      assert.are.equal("cancelled", t:status())
      assert.are.equal(task.error.cancelled, err.kind)
      assert.are.equal(t, err.task)
      assert.are.equal("early", err.reason)
      assert.is_true(task.is_cancellation(err))
      assert.is_truthy(tostring(err):find("task 'never' was cancelled (early)", 1, true))
    end)
  end)

  it("does not run the task inline, and the awaiting task is not cancelled", function()
    task.run(function()
      local log = {}
      local t = task.spawn(function() log[#log + 1] = "body" end)
      t:cancel()
      log[#log + 1] = "after cancel"
      assert.has_error(function() t:await() end)
      assert.are.same({ "after cancel" }, log)
      assert.are.equal("running", task.current():status())
      task.sleep(0) -- the awaiting task goes on waiting normally
    end)
  end)

  it("wakes a sleeping task, whose sleep raises; its cleanup runs once", function()
    task.run(function()
      local cleanups = 0
      local t = task.spawn(function()
        local ok, err = task.pcall(task.sleep, 10)
        cleanups = cleanups + 1
        assert(not ok and task.is_cancellation(err))
        error(err, 0)
      end)
      task.sleep(0.01)
      local started = gettime()
      t:cancel()
      assert.is_false(t:pawait())
      assert.is_true(gettime() - started < 1)
      assert.are.equal(1, cleanups)
    end)
  end)

  it("is raised again at every later wait point", function()
    task.run(function()
      local caught = 0
      local t = task.spawn(function()
        for _ = 1, 3 do
          local ok = task.pcall(task.sleep, 10)
          if not ok then caught = caught + 1 end
        end
        return "finished"
      end)
      task.yield()
      t:cancel()
      local ok, err = t:pawait()
      assert.is_false(ok) -- a cancelled task never ends with a normal result
      assert.are.equal(task.error.cancelled, err.kind)
      assert.are.equal(3, caught)
    end)
  end)

  it("of itself lands at the next instruction", function()
    task.run(function()
      local after = false
      local t = task.spawn(function()
        task.current():cancel("self")
        after = true
      end)
      local ok, err = t:pawait()
      assert.is_false(ok)
      assert.are.equal("self", err.reason)
      assert.is_false(after)
    end)
  end)

  it("reaches a CPU-bound task from a debug hook at its next instruction", function()
    task.run(function()
      local t
      t = task.spawn(function()
        local n = 0
        -- corowatch.sethook: a user hook beside the native one (LuaJIT's
        -- hooks are global to the VM)
        corowatch.sethook(function()
          n = n + 1
          if n == 3 then t:cancel("hook") end
        end, "", 1000)
        return spin(5)
      end)
      local started = gettime()
      local ok, err = t:pawait()
      corowatch.sethook()
      assert.is_false(ok)
      assert.are.equal("hook", err.reason)
      assert.is_true(gettime() - started < 1)
    end)
  end)

  for name, protect in pairs({ pcall = pcall, ["task.pcall"] = task.pcall }) do
    it("ends `while true do " .. name .. "(busy) end` within the grace period", function()
      local t, cancelled_at = cancel_while_running({ function()
        while true do protect(busy) end
      end, grace = 0.05 })
      local ok, err = t:pawait()
      assert.is_false(ok)
      assert.are.equal(task.error.cancelled, kind_of(err))
      local late = gettime() - cancelled_at
      assert.is_true(late < 0.05 * 2 + 0.05, "ended " .. late .. " s after the cancel")
    end)
  end

  it("leaves no interrupt behind on the task's thread once it has ended", function()
    -- Pending on a dead thread, it kept LuaJIT's global hook installed
    -- until the thread was collected.
    local function swallow(f) return xpcall(f, function() return "swallowed" end) end
    for _, protect in ipairs({ pcall, task.pcall, swallow }) do
      local t = cancel_while_running({ function()
        while true do protect(busy) end
      end, grace = 0.05 })
      assert.is_false((t:pawait()))
    end
    spin(0.1) -- past every grace period
    local co = corowatch.watch(corowatch.create(function()
      busy()
      return debug.gethook()
    end), 5)
    -- The mask and count, not the function: Lua 5.1's debug.gethook can
    -- name the function of a dead thread that had this one's address (its
    -- table of hooks is keyed by address; seen once in CI). 5.4 gives
    -- neither without a hook.
    local ok, _, mask, count = corowatch.resume(co)
    assert.are.same({ true, "", 0 }, { ok, mask or "", count or 0 })
  end)

  it("ends a task whose xpcall handler swallows the cancel", function()
    local handled = 0
    local t = cancel_while_running({ function()
      -- the first cancel lands inside the endless xpcall'd loop
      local function forever() while true do busy() end end
      while true do
        xpcall(forever, function() handled = handled + 1; return "swallowed" end)
      end
    end, grace = 0.05 })
    local ok, err = t:pawait()
    assert.is_false(ok)
    assert.are.equal(task.error.cancelled, kind_of(err))
    assert.is_true(handled >= 1)
  end)

  it("raised in a table.sort comparator is the cancellation error", function()
    local list = {}
    for i = 1, 2000 do list[i] = (i * 7919) % 2003 end
    local t = cancel_while_running(function()
      while true do
        table.sort(list, function(a, b) return a < b end)
        for i = 1, #list do list[i] = (list[i] * 31) % 2003 end
      end
    end)
    local ok, err = t:pawait()
    assert.is_false(ok)
    assert.are.equal(task.error.cancelled, kind_of(err))
    assert.is_truthy(tostring(err):find("was cancelled (timeout)", 1, true))
  end)

  it("cancels all descendants (sleeping, waiting, CPU-bound); each cleanup runs once", function()
    local cleanups = { sleeping = 0, waiting = 0, cpu = 0, grandchild = 0 }
    local function cleanup(name, f, ...)
      local ok, err = task.pcall(f, ...)
      cleanups[name] = cleanups[name] + 1
      if not ok then error(err, 0) end
    end
    local parent, ended_children
    task.run(function()
      local children = {}
      -- The timeout's expiry cancels the parent (spawned inside it) while
      -- its CPU-bound child runs: the cancel reaches the whole tree.
      local ok, err = task.pcall(task.timeout, 0.1, function()
        parent = task.spawn(function()
          children[1] = task.spawn(cleanup, "sleeping", task.sleep, 10)
          children[2] = task.spawn(cleanup, "waiting", function() task.future():await() end)
          children[3] = task.spawn(function()
            children[4] = task.spawn(cleanup, "grandchild", task.sleep, 10)
            task.sleep(10)
          end)
          task.yield()
          task.yield()
          -- all of the above wait now; this one is CPU-bound when the cancel comes
          children[5] = task.spawn(cleanup, "cpu", spin, 5)
          task.sleep(10)
        end)
        parent:await()
      end)
      assert(not ok and err.kind == task.error.timeout)
      local pok, perr = parent:pawait()
      assert(not pok and perr.reason == "timeout")
      ended_children = 0
      for i = 1, #children do
        if children[i]:status() == "cancelled" then ended_children = ended_children + 1 end
      end
    end)
    assert.are.equal(5, ended_children)
    assert.are.same({ sleeping = 1, waiting = 1, cpu = 1, grandchild = 1 }, cleanups)
  end)

  it("is deferred by shield until its function returns", function()
    task.run(function()
      local log = {}
      local t = task.spawn(function()
        task.shield(function()
          task.sleep(0.05)
          log[#log + 1] = "shielded work done"
        end)
        log[#log + 1] = "after shield"
      end)
      task.yield()
      t:cancel()
      assert.is_false(t:pawait())
      assert.are.same({ "shielded work done" }, log)
    end)
  end)
end)

describe("corowatch.task.timeout", function()
  it("stops `while true do end` at its deadline", function()
    task.run(function()
      local started = gettime()
      local ok, err = pcall(task.timeout, 0.05, function() while true do end end)
      local elapsed = gettime() - started
      assert.is_false(ok)
      assert.are.equal(task.error.timeout, kind_of(err))
      assert.are.equal(task.current(), err.task)
      assert.is_true(task.is_cancellation(err))
      assert.is_true(elapsed >= 0.05 and elapsed < 0.05 * 3, "elapsed " .. elapsed)
    end)
  end)

  it("gives a traceback that starts where the deadline landed, in the user's code", function()
    task.run(function()
      local function loop_here()
        local x = 0
        while true do x = x + 1 end
      end
      local ok, err = pcall(task.timeout, 0.02, loop_here)
      assert.is_false(ok)
      local first = err.traceback:match("^stack traceback:\n\t([^\n]*)")
      assert.truthy(first and first:find("task_spec.lua", 1, true), err.traceback)
    end)
  end)

  -- The deadline's interrupt comes a little early and sticky (the handler
  -- then raises warm at the deadline); once raised it must be off, or
  -- every instruction after the caught timeout runs through the hook (a
  -- first version left it on: code after the timeout ran 1000 times
  -- slower).
  it("leaves no hook on the task's thread once its timeout was raised and caught", function()
    task.run(function()
      for _ = 1, 5 do
        local ok, err = pcall(task.timeout, 0.005, function() while true do end end)
        assert.is_false(ok)
        assert.are.equal(task.error.timeout, kind_of(err))
        -- debug.gethook: the mask and count (5.4 gives neither without a
        -- hook; 5.1 may name a dead thread's function).
        local _, mask, count = debug.gethook()
        assert.are.same({ "", 0 }, { mask or "", count or 0 })
      end
    end)
  end)

  -- The lead's sticky interrupt goes to whichever task runs then: here a
  -- CPU-bound sibling, while the timeout's own task sleeps. It must not
  -- stay on that sibling (its handler finds nothing due for it).
  it("leaves no hook on a sibling that ran when the timeout's deadline came", function()
    task.run(function()
      local sibling = task.spawn(function()
        local started = gettime()
        while gettime() - started < 0.1 do end
        local _, mask, count = debug.gethook()
        return mask or "", count or 0
      end)
      local ok, err = task.pcall(task.timeout, 0.02, task.sleep, 1)
      assert.is_false(ok)
      assert.are.equal(task.error.timeout, kind_of(err))
      assert.are.same({ "", 0 }, { sibling:await() })
    end)
  end)

  it("returns fn's results when it finishes in time, and leaves no timer behind", function()
    task.run(function()
      assert.are.same({ 1, 2 }, { task.timeout(0.05, function(a) return a, 2 end, 1) })
      spin(0.1) -- past the deadline: nothing may land
      task.sleep(0.01)
    end)
    assert.is_nil(task.step())
  end)

  it("leaves no deadline queued on the watchdog once its scope has ended", function()
    local queued = require("corowatch.core").task.queued_timers
    local before = queued()
    task.run(function()
      for i = 1, 200 do
        assert(task.timeout(60, function(x) return x end, i) == i)
        assert(not task.pcall(task.timeout, 60, error, "inner failure"))
      end
      assert.are.equal(before, queued())
      task.timeout(60, function() assert.are.equal(before + 1, queued()) end)
    end)
    assert.are.equal(before, queued())
  end)

  it("catches its own deadline even when it fires while the scope is set up or taken down", function()
    local queued = require("corowatch.core").task.queued_timers
    local before = queued()
    local function sum()
      local x = 0
      for j = 1, 50 do x = x + j end
      return x
    end
    local rounds = 20000
    task.run(function()
      local timed_out = 0
      for _ = 1, rounds do
        -- A 10 µs deadline often fires inside task.timeout's own code.
        local ok, err = task.pcall(task.timeout, 1e-5, sum)
        if not ok then
          assert.are.equal(task.error.timeout, kind_of(err))
          assert.truthy(err.message:find("1e%-05 seconds"), err.message)
          timed_out = timed_out + 1
        end
      end
      assert.is_true(timed_out > 0)
      -- The outer deadline fires while the inner scope closes: it is the
      -- outer scope's error, never the inner one left on the task.
      for _ = 1, rounds / 10 do
        local ok, err = task.pcall(task.timeout, 1e-5, function()
          while true do task.timeout(60, sum) end
        end)
        assert.is_false(ok)
        assert.truthy(err.message:find("1e%-05 seconds"), err.message)
      end
      -- No scope was left behind: an untimed spin is not interrupted.
      assert.are.equal("spun out", spin(0.05))
      assert.are.equal(before, queued())
    end)
  end)

  it("inside a shield still times out; the shield defers only what came from outside", function()
    task.run(function()
      local ok, err = task.pcall(task.shield, task.timeout, 0.05, spin, 5)
      assert.is_false(ok)
      assert.are.equal(task.error.timeout, kind_of(err))
      local log = {}
      local inner_ok
      local outer_ok, outer_err = task.pcall(task.timeout, 0.03, function()
        task.shield(function()
          spin(0.1) -- the outer timeout expires in here: deferred
          log[#log + 1] = "shield finished"
        end)
        log[#log + 1] = "after shield"
      end)
      inner_ok = outer_ok
      assert.is_false(inner_ok)
      assert.are.equal(task.error.timeout, kind_of(outer_err))
      assert.are.same({ "shield finished" }, log)
    end)
  end)

  it("swallowed by pcall in a loop inside its scope, ends within the grace period", function()
    task.run(function()
      local started = gettime()
      local ok, err = task.pcall(task.timeout, 0.05, function()
        while true do pcall(busy) end
      end)
      local elapsed = gettime() - started
      assert.is_false(ok)
      assert.are.equal(task.error.timeout, kind_of(err))
      assert.is_true(elapsed < 0.05 + 2 * 0.1, "elapsed " .. elapsed)
      -- once out of the scope, nothing more is raised here
      assert.are.equal("spun out", spin(0.05))
      task.sleep(0)
    end)
  end)

  it("times out a wait", function()
    task.run(function()
      local started = gettime()
      local ok, err = task.pcall(task.timeout, 0.05, task.sleep, 10)
      assert.is_false(ok)
      assert.are.equal(task.error.timeout, err.kind)
      assert.is_true(gettime() - started < 1)
    end)
  end)

  it("nested: the shorter fires and each catches only its own error", function()
    task.run(function()
      -- inner shorter
      local inner_err
      local outer_result = task.timeout(1, function()
        local ok, err = pcall(task.timeout, 0.05, spin, 5)
        inner_err = err
        return ok
      end)
      assert.is_false(outer_result)
      assert.are.equal(task.error.timeout, inner_err.kind)
      -- outer shorter: the inner scope does not take the outer's error
      local inner_caught
      local ok, err = task.pcall(task.timeout, 0.05, function()
        local iok, ierr = pcall(task.timeout, 1, spin, 5)
        inner_caught = { iok, ierr }
        error(ierr, 0)
      end)
      assert.is_false(ok)
      assert.are.equal(task.error.timeout, err.kind)
      assert.are.equal(inner_caught[2], err)
      -- no scope left behind: an untimed spin finishes
      assert.are.equal("spun out", spin(0.1))
    end)
  end)

  it("stops a group whose CPU-bound child never yields", function()
    task.run(function()
      local cleanups = 0
      local started = gettime()
      local ok, err = task.pcall(task.timeout, 0.05, task.group, function(g)
        g:spawn(function() task.sleep(10) end)
        g:spawn(function()
          local _, terr = pcall(spin, 5)
          cleanups = cleanups + 1
          error(terr, 0)
        end)
      end)
      assert.is_false(ok)
      assert.are.equal(task.error.timeout, err.kind)
      assert.are.equal(1, cleanups)
      assert.is_true(gettime() - started < 1)
    end)
  end)
end)

describe("corowatch.task.group", function()
  it("returns the children's results in spawn order", function()
    task.run(function()
      local results = task.group(function(g)
        g:spawn(function() task.sleep(0.02); return "a" end)
        g:spawn(function() return "b", 2 end)
      end)
      assert.are.equal("a", results[1][1])
      assert.are.same({ "b", 2 }, { unpack(results[2], 1, results[2].n) })
    end)
  end)

  it("a child's error cancels the siblings, CPU-bound ones included, and is raised", function()
    task.run(function()
      local sibling_cleanups, started_cpu = 0, false
      local ok, err = task.pcall(task.group, function(g)
        g:spawn(function()
          local _, e = task.pcall(task.sleep, 10)
          sibling_cleanups = sibling_cleanups + 1
          error(e, 0)
        end)
        -- killed by its limit while CPU-bound: the group's first error
        g:spawn({ function() started_cpu = true; spin(5) end, limit = 0.05 })
        g:spawn(function() spin(5) end) -- cancelled before it runs
      end)
      assert.is_false(ok)
      assert.is_true(started_cpu)
      assert.is_truthy(tostring(err):find("Coroutine exceeded its allowed running time of 0.05 seconds", 1, true))
      assert.are.equal(1, sibling_cleanups)
    end)
  end)
end)

describe("corowatch.task errors and options", function()
  it("limit kills a task that runs too long without yielding, with corowatch's message", function()
    task.run(function()
      local t = task.spawn({ spin, limit = 0.05, name = "hog" })
      local ok, err = t:pawait()
      assert.is_false(ok)
      assert.is_truthy(err:find("^Coroutine exceeded its allowed running time of 0.05 seconds"))
      assert.are.equal("failed", t:status())
      assert.are.equal("hog", t.name)
    end)
  end)

  it("reports an error nobody awaited through on_error", function()
    local reported = {}
    local saved = task.on_error
    task.on_error = function(err, t) reported[#reported + 1] = { err, t } end
    local ok = pcall(task.run, function()
      task.spawn({ function() error("lost?", 0) end, name = "orphan" })
      task.sleep(0.01)
    end)
    task.on_error = saved
    assert.is_true(ok)
    assert.are.equal(1, #reported)
    assert.are.equal("lost?", reported[1][1])
    assert.are.equal("orphan", reported[1][2].name)
  end)

  it("does not report an error that the parent awaits later", function()
    local reported = 0
    local saved = task.on_error
    task.on_error = function() reported = reported + 1 end
    task.run(function()
      local t = task.spawn(function() error("seen", 0) end)
      task.sleep(0.01)
      assert.is_false(t:pawait())
    end)
    task.on_error = saved
    assert.are.equal(0, reported)
  end)

  it("the default on_error writes one line and the traceback to stderr", function()
    local written = {}
    local real = io.stderr
    local fake = { write = function(_, text) written[#written + 1] = text end }
    io.stderr = fake -- luacheck: ignore 122
    local ok = pcall(task.run, function()
      task.spawn({ function() error("to stderr", 0) end, name = "loud" })
      task.sleep(0.01)
    end)
    io.stderr = real -- luacheck: ignore 122
    assert.is_true(ok)
    local text = table.concat(written)
    assert.is_truthy(text:find("unhandled error in task 'loud': to stderr", 1, true))
    assert.is_truthy(text:find("stack traceback:", 1, true))
  end)

  it("task.pcall catches errors and may yield inside on every version", function()
    task.run(function()
      local ok, a, b = task.pcall(function(x) task.sleep(0.01); return x, "y" end, "x")
      assert.are.same({ true, "x", "y" }, { ok, a, b })
      assert.are.same({ false, "e" }, { task.pcall(function() task.yield(); error("e", 0) end) })
      assert.are.same({ false, "E" },
        { task.xpcall(function() task.yield(); error("e", 0) end, function(e) return e:upper() end) })
    end)
  end)

  it("task.xpcall answers a message handler that fails as xpcall does", function()
    -- No collection meanwhile: Lua 5.2 can run a finalizer deep in the
    -- handler's recursion, where it overflows the C stack and its error
    -- ("error in __gc metamethod") replaces either answer.
    collectgarbage("stop")
    finally(function() collectgarbage("restart") end)
    local answer
    task.run(function()
      answer = { task.xpcall(function() task.yield(); error("a") end, function() error("b") end) }
    end)
    local plain = { xpcall(function() error("a") end, function() error("b") end) }
    assert.are.same(plain, answer) -- false, "error in error handling"
  end)

  it("calls outside a task fail clearly", function()
    assert.has_error(function() task.sleep(1) end, "corowatch.task.sleep: called outside a task")
    assert.has_error(function() task.timeout(1, print) end, "corowatch.task.timeout: called outside a task")
    assert.is_nil(task.current())
  end)

  it("bad arguments name the argument", function()
    assert.has_error(function() task.spawn(42) end,
      "bad argument #1 to 'spawn' (function or { fn, limit =, name =, grace = } expected, got number)")
    assert.has_error(function() task.spawn({ print, limit = -1 }) end,
      "bad argument #1 to 'spawn' (positive number of seconds expected, got number)")
    assert.has_error(function() task.run("x") end,
      "bad argument #1 to 'run' (function or { fn, ... } expected, got string)")
    assert.has_error(function() task.timeout("1", print) end,
      "bad argument #1 to 'timeout' (positive number of seconds expected, got string)")
    assert.has_error(function() task.step(-1) end,
      "bad argument #1 to 'step' (non-negative number of seconds expected, got number)")
    assert.has_error(function() task.cancel_id("x") end,
      "bad argument #1 to 'cancel_id' (integer id expected, got string)")
    assert.has_error(function() task.future().complete({}) end,
      "bad argument #1 to 'complete' (future expected, got table)")
    assert.has_error(function() task.spawn(print).cancel({}) end,
      "bad argument #1 to 'cancel' (task expected, got table)")
    assert.has_error(function() task.wrap_callback(nil) end,
      "bad argument #1 to 'wrap_callback' (function expected, got nil)")
    task.run(function() end) -- runs and ends the task spawned above
  end)

  it("cancel_id from the task's own thread lands at its next instruction", function()
    task.run(function()
      local after = false
      local t = task.spawn(function()
        assert(task.cancel_id(task.current():id(), "by id"))
        after = true
      end)
      local ok, err = t:pawait()
      assert.is_false(ok)
      assert.are.equal("by id", err.reason)
      assert.is_false(after)
      assert.is_false(task.cancel_id(t:id()))
    end)
  end)

  it("cancel_id of an unknown id is false", function()
    assert.is_false(task.cancel_id(12345))
    assert.is_false(task.cancel_id(mtint.id()))
  end)
end)

describe("corowatch.task.wrap_callback", function()
  it("waits on a callback-last function, and cleans up results that come after a cancel", function()
    task.run(function()
      local pending = {}
      local function op(x, cb) pending[#pending + 1] = cb; return "handle" .. x end
      local cancelled_handles, cleaned = {}, {}
      local wrapped = task.wrap_callback(op, {
        on_cancel = function(handle) cancelled_handles[#cancelled_handles + 1] = handle end,
        cleanup = function(err, fd) cleaned[#cleaned + 1] = { err, fd } end,
      })
      local t = task.spawn(function() return wrapped(1) end)
      task.yield()
      pending[1](nil, "fd1")
      assert.are.same({ nil, "fd1" }, { t:await() })
      local c = task.spawn(function() return wrapped(2) end)
      task.yield()
      c:cancel()
      assert.is_false(c:pawait())
      assert.are.same({ "handle2" }, cancelled_handles)
      pending[2](nil, "fd2")
      assert.are.same({ { nil, "fd2" } }, cleaned)
    end)
  end)
end)

describe("corowatch.task and Lua 5.4's <close>", function()
  local load54 = _VERSION == "Lua 5.4" and load or nil
  local it54 = load54 and it or pending

  it54("runs <close> handlers of a task cancelled while CPU-bound, once each", function()
    local closed = {}
    local body = load54([[
      local closed, spin = ...
      local function closer(name)
        return setmetatable({}, { __close = function() closed[#closed + 1] = name end })
      end
      local outer <close> = closer("outer")
      do
        local inner <close> = closer("inner")
        spin(5)
      end
    ]])
    local t = (function()
      local result
      task.run(function()
        task.pcall(task.timeout, 0.05, function()
          result = task.spawn(body, closed, spin)
          result:await()
        end)
      end)
      return result
    end)()
    assert.are.equal("cancelled", t:status())
    assert.are.same({ "inner", "outer" }, closed)
  end)

  it54("keeps a cancelled task's limit on its <close> handlers", function()
    -- The cancel, raised from a hook, left the coroutine's hooks off:
    -- Lua's own close ran the handler to its end, out of the limit's reach.
    local handler = { started = false, finished = false }
    local body = load54([[
      local spin, handler = ...
      local guard <close> = setmetatable({}, { __close = function()
        handler.started = true
        spin(3)
        handler.finished = true
      end })
      spin(5)
    ]])
    local reports = {}
    local saved = task.on_error
    task.on_error = function(err) reports[#reports + 1] = tostring(err) end
    local ok, err = pcall(task.run, function()
      task.pcall(task.timeout, 0.05, function()
        task.spawn({ body, limit = 0.2 }, spin, handler):await()
      end)
    end)
    task.on_error = saved
    assert(ok, err)
    assert.is_true(handler.started)
    assert.is_false(handler.finished)
    -- The kill of the cleanup is not lost: it is reported.
    assert.is_truthy(table.concat(reports):find("exceeded its allowed running time", 1, true))
  end)
end)

describe("corowatch.task against a hostile user", function()
  it("does not resume a task whose body ended when a waiter it left behind fires", function()
    -- The task gives up an await (its timeout), its body returns while a
    -- child still runs, then the future completes: the waiter it left has
    -- the same wait number as its wait for its children.
    local outcome
    task.run(function()
      local f = task.future()
      local t = task.spawn(function()
        task.pcall(task.timeout, 0.01, f.await, f)
        -- A child that outlives the body (shielded from the cancel the
        -- body's end sends it).
        task.spawn(function()
          task.shield(function()
            local stop = gettime() + 0.1
            while gettime() < stop do task.yield() end
          end)
        end)
        task.yield()
        return "body result"
      end)
      task.sleep(0.05)
      f:complete("late")
      outcome = { t:pawait() }
    end)
    assert.are.same({ true, "body result" }, outcome)
  end)

  it("cancels a task that only ever yields with coroutine.yield", function()
    local t, status, took
    task.run(function()
      t = task.spawn(function()
        local stop = gettime() + 2
        while gettime() < stop do coroutine.yield() end
        return "not cancelled"
      end)
      task.sleep(0.01)
      local started = gettime()
      t:cancel("stop")
      status = { t:pawait() }
      took = gettime() - started
    end)
    -- At its next resume, not when its loop ends by itself.
    assert.is_true(took < 1, "took " .. took .. " s")
    assert.is_false(status[1])
    assert.are.equal("cancelled", t:status())
    assert.are.equal("stop", status[2].reason)
  end)

  it("accepts durations beyond the clock's range, and stays interruptible", function()
    local huge, bounded
    task.run(function()
      huge = { pcall(task.timeout, 1e300, function() return "ok" end) }
      local started = gettime()
      local ok, err = task.pcall(task.timeout, 0.1, spin, 3)
      bounded = { ok, kind_of(err), gettime() - started }
    end)
    assert.are.same({ true, "ok" }, huge)
    assert.is_false(bounded[1])
    assert.are.equal(task.error.timeout, bounded[2])
    assert.is_true(bounded[3] < 1, "took " .. bounded[3] .. " s")
  end)

  it("cancels with a reason tostring cannot print, and stays interruptible", function()
    local bad = setmetatable({}, { __tostring = function() error("bad tostring") end })
    local cancelled, bounded
    task.run(function()
      local victim = task.spawn(function() task.sleep(5) end)
      task.sleep(0.01)
      cancelled = { pcall(victim.cancel, victim, bad) }
      local started = gettime()
      local ok, err = task.pcall(task.timeout, 0.1, spin, 3)
      bounded = { ok, kind_of(err), gettime() - started }
    end)
    assert.are.same({ true, true }, cancelled)
    assert.is_false(bounded[1])
    assert.is_true(bounded[3] < 1, "took " .. bounded[3] .. " s")
  end)

  it("hands an error object tostring cannot print to its awaiter unchanged", function()
    local object = setmetatable({ code = 7 }, { __tostring = function() error("no tostring for you") end })
    local got
    task.run(function()
      local t = task.spawn(function() error(object) end)
      got = { t:pawait() }
    end)
    assert.is_false(got[1])
    assert.are.equal(object, got[2])
  end)
end)

describe("corowatch.task.wrap_callback against a hostile user", function()
  it("returns at once when the function calls back before it returns", function()
    local read = task.wrap_callback(function(key, cb) cb(nil, "value of " .. key) end)
    local got
    task.run(function() got = { read("k") } end)
    assert.are.same({ nil, "value of k" }, got)
  end)

  it("hands cleanup a result that arrived after the cancel, before the task ran again", function()
    local pending, cleaned, cancelled = nil, {}, {}
    local open = task.wrap_callback(function(_, cb) pending = cb; return "request" end, {
      on_cancel = function(handle) cancelled[#cancelled + 1] = handle end,
      cleanup = function(err, fd) cleaned[#cleaned + 1] = { err, fd } end,
    })
    local outcome
    task.run(function()
      local t = task.spawn(function() return open("/etc/passwd") end)
      task.sleep(0.01)
      t:cancel("stop")
      pending(nil, 42) -- the task is woken by the cancel, not run yet
      outcome = { t:pawait() }
    end)
    assert.is_false(outcome[1])
    assert.are.same({ { nil, 42 } }, cleaned)
    assert.are.same({}, cancelled)
  end)
end)

describe("corowatch.task.shield against a hostile user", function()
  it("lets a shielded wait run its full length through a cancel and an outer timeout", function()
    local slept, outcome, timed
    task.run(function()
      local t = task.spawn(function()
        local started = gettime()
        task.shield(function()
          task.sleep(0.2)
          slept = gettime() - started
        end) -- the cancel is raised as the shield returns
        task.sleep(1)
      end)
      task.sleep(0.02)
      t:cancel("stop")
      outcome = { t:pawait() }
      local started = gettime()
      task.pcall(task.timeout, 0.02, task.shield, task.sleep, 0.2)
      timed = gettime() - started
    end)
    assert.is_true(slept >= 0.19, "the shielded sleep lasted " .. slept .. " s")
    assert.is_false(outcome[1])
    assert.are.equal("stop", outcome[2].reason)
    assert.is_true(timed >= 0.19, "the shielded sleep under a timeout lasted " .. timed .. " s")
  end)
end)

describe("corowatch.task timeouts and cancels after a raise elsewhere", function()
  it("lands an outer timeout on time after an inner one with nearly its deadline was caught", function()
    -- The inner raise clears the thread's interrupt: the outer deadline's
    -- early interrupt with it, or (both past) the outer scope was marked
    -- fired while the inner error was raised.
    local worst = 0
    for try = 1, 10 do
      local inner = try % 2 == 0 and 0.0499 or 0.04998
      task.run({ function()
        local deadline = gettime() + 0.05
        task.pcall(task.timeout, 0.05, function()
          local ok, err = task.pcall(task.timeout, inner, spin, 10)
          -- Catches the inner timeout only.
          if not ok and not tostring(err.message):find("after " .. inner .. " seconds", 1, true) then
            error(err, 0)
          end
          spin(5)
        end)
        worst = math.max(worst, gettime() - deadline)
      end, grace = 0.6 })
    end
    assert.is_true(worst < 0.3, "the outer timeout landed " .. worst .. " s late")
  end)

  it("let no inner timeout take the place of an outer one on its way out", function()
    -- The outer timeout is caught inside the inner scope, which re-raises
    -- it after a cleanup that outlasts the inner deadline.
    local outcome, took
    task.run({ function()
      local started = gettime()
      outcome = { task.pcall(task.timeout, 0.05, function()
        local ok, err = task.pcall(task.timeout, 0.052, function()
          local _, caught = task.pcall(spin, 0.5)
          spin(0.005)
          error(caught, 0)
        end)
        -- Catches the inner timeout only.
        if not ok and not tostring(err.message):find("after 0.052 seconds", 1, true) then
          error(err, 0)
        end
        spin(0.5)
        return "the outer timeout was lost"
      end) }
      took = gettime() - started
    end, grace = 0.3 })
    assert.is_false(outcome[1])
    assert.matches("after 0.05 seconds", outcome[2].message, 1, true)
    assert.is_true(took < 0.2, "the outer timeout took " .. took .. " s")
  end)

  it("land on time after a task.pcall whose timeout became a hard error", function()
    -- A timeout swallowed by plain pcall until its grace period ends (5.1
    -- runs task.pcall on a coroutine of its own, where the hard error's
    -- sticky interrupt is armed).
    local function hard_error_in_pcall()
      task.pcall(task.timeout, 0.01, function()
        while true do pcall(spin, 0.001) end
      end)
    end
    local took, cancelled, outcome
    task.run(function()
      local timed = task.spawn({ function()
        hard_error_in_pcall()
        local started = gettime()
        task.pcall(task.timeout, 0.05, spin, 5)
        took = gettime() - started
      end, grace = 0.3 })
      local cancelled_self = task.spawn({ function()
        hard_error_in_pcall()
        local started = gettime()
        outcome = { task.pcall(function()
          task.current():cancel("self")
          spin(2)
          return "cancel not raised"
        end) }
        cancelled = gettime() - started
      end, grace = 0.3 })
      timed:pawait()
      cancelled_self:pawait()
    end)
    assert.is_true(took < 0.2, "a 0.05 s timeout took " .. took .. " s")
    assert.is_false(outcome[1])
    assert.are.equal("self", outcome[2].reason)
    assert.is_true(cancelled < 0.2, "the cancel took " .. cancelled .. " s")
  end)

  it("keep reaching a task whose task.pcall could not wait across a C call", function()
    local outcome, took, failed
    task.run(function()
      local t = task.spawn({ function()
        local started = gettime()
        outcome = { task.pcall(task.timeout, 0.05, function()
          -- The wait fails: on 5.1 past task.pcall (it runs its function
          -- on a coroutine of its own), elsewhere inside it.
          failed = { pcall(string.gsub, "a", "a", function()
            local ok, err = task.pcall(task.sleep, 0.001)
            if not ok then error(err, 0) end
          end) }
          spin(3)
          return "not timed out"
        end) }
        took = gettime() - started
      end, grace = 0.3 })
      t:pawait()
    end)
    assert.is_false(failed[1])
    assert.matches("yield across", failed[2])
    assert.is_false(outcome[1])
    assert.are.equal(task.error.timeout, kind_of(outcome[2]))
    assert.is_true(took < 0.2, "a 0.05 s timeout took " .. took .. " s")
  end)

  it("leave no task on a future's waiters when its wait failed across a C call", function()
    local tasks = setmetatable({}, { __mode = "k" })
    local f
    task.run(function()
      f = task.future()
      for _ = 1, 3 do
        local t = task.spawn(function()
          pcall(table.sort, { 1, 2 }, function(a, b) f:await(); return a < b end)
        end)
        tasks[t] = true
        t:await()
      end
    end)
    collectgarbage(); collectgarbage()
    assert.is_nil(next(tasks), "an ended task is kept")
    assert.is_false(f:done())
  end)
end)

describe("corowatch.task awaits given up", function()
  -- KB of Lua heap that `tries` calls of `give_up` leave behind. A GC
  -- every 50 calls: weak tables keyed by dead coroutines (ids, handlers;
  -- one per task, and per task.pcall on 5.1) keep the size they reached
  -- until a collection clears them, which in a large heap (the whole
  -- suite) comes late. A table's rehash may give memory back in one round,
  -- as much as a leak takes: a leak grows both rounds.
  local function retained(tries, give_up)
    local function round()
      collectgarbage(); collectgarbage()
      local before = collectgarbage("count")
      for i = 1, tries do
        give_up()
        if i % 50 == 0 then collectgarbage() end
      end
      collectgarbage(); collectgarbage()
      return collectgarbage("count") - before
    end
    round() -- the tables reach their size
    return math.max(round(), round())
  end

  it("by a task that tries again leave nothing behind", function()
    local grown, waited = nil, 0
    task.run(function()
      local f = task.future()
      local long = task.spawn(function() task.sleep(100) end)
      local me = task.current()
      local function await_briefly(object)
        local watcher = task.spawn(function()
          task.yield()
          if me:status() == "waiting" then waited = waited + 1 end
        end)
        task.pcall(task.timeout, 0.0005, object.await, object)
        watcher:await()
      end
      grown = retained(300, function()
        await_briefly(f)
        await_briefly(long)
      end)
      long:cancel()
      f:complete()
    end)
    -- Nearly every await reached its wait (under load a few time out
    -- while they set up).
    assert.is_true(waited > 1600, waited .. " of 1800 awaits waited")
    -- A closure was left per await given up: 60-100 KB here.
    assert.is_true(grown < 20, ("%.1f KB retained"):format(grown))
  end)

  it("by tasks that ended leave nothing behind on a long-lived future or task", function()
    local grown, waited = nil, 0
    task.run(function()
      local f = task.future()
      local long = task.spawn(function() task.sleep(100) end)
      grown = retained(300, function()
        local a = task.spawn(function() f:await() end)
        local b = task.spawn(function() long:await() end)
        task.yield()
        if a:status() == "waiting" and b:status() == "waiting" then waited = waited + 1 end
        a:cancel()
        b:cancel()
        a:pawait()
        b:pawait()
      end)
      long:cancel()
      f:complete()
    end)
    assert.are.equal(900, waited)
    assert.is_true(grown < 20, ("%.1f KB retained"):format(grown))
  end)
end)

describe("corowatch.task waiters", function()
  it("that remain are woken in the order they began, after others gave up", function()
    local woken = {}
    task.run(function()
      local f = task.future()
      local waiters = {}
      for i = 1, 16 do
        -- Three in four give up (the list is compacted on the way); the
        -- first waits again once the others gave up.
        waiters[i] = task.spawn(function()
          if i % 4 ~= 0 then
            task.pcall(task.timeout, 0.01, f.await, f)
            if i ~= 1 then return end
            task.sleep(0.02)
          end
          local value = f:await()
          woken[#woken + 1] = { i, value }
        end)
      end
      task.sleep(0.05)
      f:complete("done")
      for i = 1, #waiters do waiters[i]:await() end
    end)
    assert.are.same({ { 4, "done" }, { 8, "done" }, { 12, "done" }, { 16, "done" },
      { 1, "done" } }, woken)
  end)
end)

describe("corowatch.task.group against a hostile user", function()
  it("raises the error of a child cancelled from outside it, as for a failed one", function()
    local outcome
    task.run(function()
      outcome = { task.pcall(task.group, function(g)
        g:spawn(function() task.sleep(0.02); return "a" end)
        local b = g:spawn(function() task.sleep(10); return "b" end)
        g:spawn(function() task.sleep(0.01); b:cancel("outside"); return "c" end)
      end) }
    end)
    assert.is_false(outcome[1])
    assert.are.equal(task.error.cancelled, kind_of(outcome[2]))
    assert.are.equal("outside", outcome[2].reason)
  end)
end)

describe("corowatch.task deadlines and cancels that come while no task runs", function()
  it("times out a scope whose task sits ready after a plain coroutine.yield", function()
    local outcome, took
    task.run(function()
      local started = gettime()
      local a = task.spawn(function()
        return task.pcall(task.timeout, 0.05, function()
          coroutine.yield() -- ready again: the sibling runs past the deadline
          spin(3)
          return "timeout never landed"
        end)
      end)
      task.spawn(spin, 0.2)
      outcome = { a:await() }
      took = gettime() - started
    end)
    assert.is_false(outcome[1])
    assert.are.equal(task.error.timeout, kind_of(outcome[2]))
    assert.is_true(took < 1, "took " .. took .. " s")
  end)

  it("lands a timeout on time when its lead fired while the scheduler slept", function()
    -- The task wakes just before its deadline; the deadline's early,
    -- sticky interrupt came while no task ran. It used to land a grace
    -- period late (100 ms, or never with a long grace).
    local worst = 0
    for _ = 1, 5 do
      task.run(function()
        local t = task.spawn({ function()
          local ok = task.pcall(task.timeout, 0.05, function()
            task.sleep(0.05 - 0.0002)
            spin(2)
          end)
          return ok
        end, grace = 2 })
        local started = gettime()
        t:await()
        worst = math.max(worst, gettime() - started)
      end)
    end
    assert.is_true(worst < 0.5, "a 0.05 s timeout took " .. worst .. " s")
  end)

  it("delivers a cancel that came between two tasks to the CPU-bound one run next", function()
    -- The cancel is sent from the scheduler's own report of another
    -- task's failure, between two tasks of one batch, with no task running.
    local victim
    local saved = task.on_error
    task.on_error = function() task.cancel_id(victim:id(), "between") end
    local outcome, took
    local ok, err = pcall(task.run, function()
      local e = task.spawn(function()
        task.pcall(task.sleep, 10)
        error("cleanup failed")
      end)
      task.yield()
      e:cancel()
      victim = task.spawn(spin, 3)
      local started = gettime()
      outcome = { victim:pawait() }
      took = gettime() - started
    end)
    task.on_error = saved
    assert(ok, err)
    assert.is_false(outcome[1])
    assert.are.equal("between", outcome[2].reason)
    assert.is_true(took < 1, "took " .. took .. " s")
  end)

  it("raises a timeout opened inside a shield when an inner shield ends", function()
    local outcome, took
    task.run(function()
      local started = gettime()
      outcome = { task.shield(function()
        return task.pcall(task.timeout, 0.05, function()
          task.shield(spin, 0.2)
          spin(1)
          return "timeout lost"
        end)
      end) }
      took = gettime() - started
    end)
    assert.is_false(outcome[1])
    assert.are.equal(task.error.timeout, kind_of(outcome[2]))
    assert.is_true(took < 0.6, "took " .. took .. " s")
  end)
end)

describe("corowatch.task deadlines whose early interrupt came while no task ran", function()
  it("lands an ancestor's timeout on time when its child wakes just before it", function()
    -- The child sleeps until just before the deadline: the deadline's
    -- early interrupt comes while the scheduler sleeps, and the child,
    -- not the task whose scope it is, runs next.
    local worst = 0
    for _ = 1, 5 do
      local late = task.run({ function()
        local deadline = gettime() + 0.05
        task.pcall(task.timeout, 0.05, function()
          task.spawn(function()
            task.sleep(math.max(deadline - 0.0003 - gettime(), 0))
            spin(3)
          end):await()
        end)
        return gettime() - deadline
      end, grace = 2 })
      worst = math.max(worst, late)
    end
    assert.is_true(worst < 0.4, "a timeout landed " .. worst .. " s late")
  end)

  it("lands a timeout on time after a task.pcall that ended just before it", function()
    -- The deadline's early interrupt, sticky, may come to the pcall's
    -- thread (5.1 runs it on a coroutine of its own) just before it ends:
    -- the caller's thread must carry it on.
    local worst = 0
    for _ = 1, 10 do
      task.run(function()
        local t = task.spawn({ function()
          local deadline = gettime() + 0.05
          local started = gettime()
          local inner_ok
          task.pcall(task.timeout, 0.05, function()
            inner_ok = task.pcall(function()
              while gettime() < deadline - 0.0001 do end
            end)
            spin(3)
          end)
          -- An inner pcall that caught the timeout takes the grace period.
          if inner_ok then worst = math.max(worst, gettime() - started) end
        end, grace = 0.6 })
        t:await()
      end)
    end
    assert.is_true(worst < 0.5, "a 0.05 s timeout took " .. worst .. " s")
  end)
end)
