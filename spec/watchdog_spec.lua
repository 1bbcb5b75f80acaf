-- The watchdog's own work: bounded by the VMs with a deadline, not by the
-- number of watches ever made.
if jit then jit.off() end
local core = require("corowatch.core")
local corowatch = require("corowatch")
local cw = corowatch.export()

local function wait(seconds)
  local started = corowatch.gettime()
  while corowatch.gettime() - started < seconds do end
end

describe("the watchdog's queue", function()
  it("holds one alarm for a VM under a long watch, however many inner watches came and went", function()
    -- Other specs' jobs may wait there too (timers, re-arms, other VMs'
    -- alarms): count what this one adds.
    local before = core.watchdog_jobs()
    local outer = corowatch.watch(cw.create(function()
      for _ = 1, 100 do
        -- Each inner watch brings the VM's next deadline nearer, and its
        -- alarm fires (the inner coroutine has yielded by then).
        local inner = corowatch.watch(cw.create(function() cw.yield() end), 0.001)
        cw.resume(inner)
        wait(0.003)
      end
      return core.watchdog_jobs()
    end), 60)
    local ok, jobs = cw.resume(outer)
    assert.is_true(ok, jobs)
    -- This VM's alarm at most, and one more of someone else's at most.
    assert.is_true(jobs - before <= 2, ("watchdog jobs queued: %d, before: %d"):format(jobs, before))
  end)

  -- The hook, once on for a deadline, delivers it itself: the watchdog
  -- comes back for it on its retry (1 ms, doubling to 50 ms), not once per
  -- hook event. (LuaJIT turned the hook on 150 us early and pushed an
  -- alarm at every instruction of that stretch, each answered by a signal.)
  it("goes off a few times for a kill, not once per hook event", function()
    local before = core.watchdog_alarms()
    local co = corowatch.watch(cw.create(function() while true do end end), 0.05)
    local ok, err = cw.resume(co)
    local alarms = core.watchdog_alarms() - before
    assert.is_false(ok)
    assert.matches("allowed running time", tostring(err))
    assert.is_true(alarms <= 10, ("the watchdog went off %d times for one kill"):format(alarms))
  end)

  -- A diagnostic for benchmarks: a kill cannot land before its hook was
  -- armed, so a late kill whose arming was as late shows the watchdog's
  -- thread did not run in time. On PUC Lua a limit of a microsecond is
  -- shorter than any thread's wake-up: the watchdog, asleep when the
  -- deadline was set, arms it late. LuaJIT's hook goes on 150 us ahead of
  -- a deadline (the owner arms one that near itself), so there the limit
  -- is longer and the arming may be on time.
  it("reports how late it armed a deadline at worst, and starts over once read", function()
    local limit = jit and 0.02 or 1e-6
    core.watchdog_lateness()
    local co = corowatch.watch(cw.create(function() while true do end end), limit)
    local started = corowatch.gettime()
    local ok = cw.resume(co)
    local overshoot = corowatch.gettime() - started - limit
    local late = core.watchdog_lateness()
    assert.is_false(ok)
    assert.is_number(late)
    if jit then
      assert.is_true(late >= 0, "negative lateness " .. late)
    else
      assert.is_true(late > 0, "the watchdog armed a 1 us deadline on time: " .. late)
    end
    -- Both on the watches' clock, read in this order; 0.1 ms for rounding,
    -- and LuaJIT's lead (its lateness counts from the hook's time).
    local slack = jit and 2.5e-4 or 1e-4
    assert.is_true(late <= overshoot + slack,
      ("armed %.6f s late, but the kill landed %.6f s after the limit"):format(late, overshoot))
    assert.are.equal(0, core.watchdog_lateness())
  end)

  -- A coroutine resumed with the original resume is not on the chain: the
  -- kill of the watched one that resumed it waits until it runs again. The
  -- hook (LuaJIT's is the VM's) fires in the unseen coroutine meanwhile and
  -- must not send the watchdog back at every event.
  it("goes off on its retry while a coroutine it cannot see runs past a deadline", function()
    local original_resume = coroutine.resume
    if original_resume == cw.resume then pending("coroutine.resume is patched here") return end
    local before
    local outer = corowatch.watch(cw.create(function()
      local unseen = coroutine.create(function()
        wait(0.3)
        return "done"
      end)
      before = core.watchdog_alarms()
      return original_resume(unseen)
    end), 0.05)
    local ok = cw.resume(outer)
    local alarms = core.watchdog_alarms() - before
    -- Killed when it ran again (it resumed nothing else), or done if the
    -- hook never got a chance: either way the count is what matters.
    assert.is_boolean(ok)
    assert.is_true(alarms <= 30, ("the watchdog went off %d times in 0.3 s"):format(alarms))
  end)
end)
