-- corowatch.task across OS threads: cancel_id from another thread reaches
-- a CPU-bound task at its next instruction, and wakes a scheduler that
-- sleeps idle in its native wait.
local task = require("corowatch.task")
local threads = require("spec.helpers.threads")

local TIMEOUT = 10 -- seconds; generous: only a lost cancel comes near it

-- The body run on the other thread: a root task whose child either spins
-- (CPU-bound, never yields, at most 5 s) or sleeps 10 s. The child sends
-- its id; the root sends how the child ended and how long after "go".
local function scheduler_thread(channel, mode)
  local task = require("corowatch.task")
  local gettime = require("corowatch").gettime
  task.run(function()
    local child = task.spawn(function()
      channel:send(task.current():id())
      if mode == "spin" then
        local stop = gettime() + 5
        while gettime() < stop do end
      else
        task.sleep(10)
      end
      return "not cancelled"
    end)
    local ok, err = child:pawait()
    local ended = gettime()
    channel:send(tostring(ok), child:status(), type(err) == "table" and err.reason or tostring(err))
    channel:send(("%.6f"):format(ended))
  end)
end

local function cancel_from_here(mode)
  local gettime = require("corowatch").gettime
  local thread = threads.start(scheduler_thread, mode)
  local id = tonumber(assert(thread:receive(TIMEOUT)))
  -- let it settle into its spin or its idle wait
  local settle = gettime() + 0.05
  while gettime() < settle do end
  local sent = gettime()
  assert.is_true(task.cancel_id(id, "from_afar"))
  local outcome = assert(thread:receive(TIMEOUT))
  local ended = tonumber(assert(thread:receive(TIMEOUT)))
  assert.is_true(thread:join())
  assert.is_false(task.cancel_id(id, "again")) -- the task has ended
  return outcome, ended - sent
end

describe("corowatch.task.cancel_id from another OS thread", function()
  it("does not interrupt the thread that drives the scheduler while no task runs", function()
    -- Spawned outside `run`, not yet run: no task runs on this thread.
    local gettime = require("corowatch").gettime
    local t = task.spawn(function() return "ran" end)
    local thread = threads.start(function(channel, id)
      channel:send(tostring(require("corowatch.task").cancel_id(tonumber(id), "from afar")))
    end, t:id())
    local ok, err = pcall(function()
      local stop = gettime() + 0.3
      while gettime() < stop do end
    end)
    assert.are.equal("true", thread:receive(TIMEOUT))
    assert.is_true(thread:join())
    assert(ok, err)
    local done, cancel_err = t:pawait()
    assert.is_false(done)
    assert.are.equal("from afar", cancel_err.reason)
  end)

  it("cancels a running CPU-bound task at its next instruction", function()
    local outcome, latency = cancel_from_here("spin")
    assert.are.equal("false cancelled from_afar", outcome)
    assert.is_true(latency < 1, "took " .. latency .. " s")
  end)

  it("wakes a scheduler sleeping idle and cancels the sleeping task", function()
    local outcome, latency = cancel_from_here("sleep")
    assert.are.equal("false cancelled from_afar", outcome)
    assert.is_true(latency < 1, "took " .. latency .. " s")
  end)
end)
