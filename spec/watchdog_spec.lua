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
end)
