-- corowatch.task: a few tasks, one of them stuck in a CPU loop that never
-- yields, stopped by task.timeout at its deadline (other task libraries
-- would hang here: their cancel only lands when the task yields).
if jit then jit.off() end -- JIT-compiled loops never call hooks
local task = require("corowatch.task")
local gettime = require("corowatch").gettime

local started = gettime()
local function say(fmt, ...)
  print(("[%5.3f s] " .. fmt):format(gettime() - started, ...))
end

task.run(function()
  -- Two well-behaved tasks: they sleep, so they share the scheduler.
  local ticker = task.spawn({ function()
    for i = 1, 3 do task.sleep(0.05); say("ticker: tick %d", i) end
    return "ticked 3 times"
  end, name = "ticker" })
  local fetcher = task.spawn({ function(url)
    task.sleep(0.08)
    return "fetched " .. url
  end, name = "fetcher" }, "example.org")
  say("ticker: %s", ticker:await())
  say("fetcher: %s", fetcher:await())

  -- A task stuck in a loop that calls nothing and never yields.
  local stuck = task.spawn({ function()
    local ok, err = task.pcall(task.timeout, 0.2, function()
      local x = 0
      while true do x = x + 1 end
    end)
    say("stuck: task.timeout raised: %s", err.message)
    return ok
  end, name = "stuck" })
  say("stuck: returned %s", tostring(stuck:await()))

  -- A task that swallows errors in a loop, spawned inside a timeout: the
  -- timeout cancels it while it runs. pcall may catch the cancel once;
  -- after the grace period it is raised at every instruction.
  local stubborn
  local _, err = task.pcall(task.timeout, 0.1, function()
    stubborn = task.spawn({ function()
      while true do pcall(function() while true do end end) end
    end, name = "stubborn", grace = 0.05 })
    stubborn:await()
  end)
  say("stubborn: %s; the timeout raised %s", stubborn:status(), tostring(err.kind))
end)
say("done")
