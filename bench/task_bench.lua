-- corowatch.task against plain coroutines, in one process: spawn+await
-- round trip, 10^5 tasks sleeping on timers (memory per task, time per
-- step), and a timeout's overshoot past its deadline on a CPU-bound task
-- next to corowatch's kill. Usage: see bench/run.
if jit then jit.off() end -- hooks only reach interpreted code
local task = require("corowatch.task")
local corowatch = require("corowatch")
local gettime = corowatch.gettime

local function best_of(runs, f)
  local best = math.huge
  for _ = 1, runs do best = math.min(best, f()) end
  return best
end

local function us(seconds) return ("%.2f us"):format(seconds * 1e6) end

print(("=== corowatch.task bench, %s"):format(_VERSION .. (jit and (" / " .. jit.version) or "")))

-- 1. Overshoot past the deadline on a CPU-bound body: task.timeout against
-- corowatch's kill, same limit.
-- First, before the other parts leave garbage for the collector to do.
local LIMIT, ROUNDS = 0.02, 30
local function spin() local x = 0; while true do x = x + 1 end end
local function stats(list)
  table.sort(list)
  return list[math.ceil(#list / 2)], list[#list]
end
local overshoot_timeout = {}
task.run(function()
  for i = 1, ROUNDS do
    local s = gettime()
    local ok = pcall(task.timeout, LIMIT, spin)
    assert(not ok)
    overshoot_timeout[i] = gettime() - s - LIMIT
  end
end)
local overshoot_kill = {}
local cw = corowatch.export()
for i = 1, ROUNDS do
  local co = corowatch.watch(cw.create(spin), LIMIT)
  local s = gettime()
  assert(not cw.resume(co))
  overshoot_kill[i] = gettime() - s - LIMIT
end
local tm, tx = stats(overshoot_timeout)
local km, kx = stats(overshoot_kill)
print(("timeout overshoot (%g s, CPU-bound): median %s, max %s   (corowatch kill: median %s, max %s)")
  :format(LIMIT, us(tm), us(tx), us(km), us(kx)))

-- 2. spawn + await round trip, against create + resume of a coroutine.
local N = 2e4
local function noop(x) return x end
local plain = best_of(3, function()
  local t0 = gettime()
  for i = 1, N do
    local co = coroutine.create(noop)
    coroutine.resume(co, i)
  end
  return (gettime() - t0) / N
end)
local tasks = best_of(3, function()
  local elapsed
  task.run(function()
    local t0 = gettime()
    for i = 1, N do task.spawn(noop, i):await() end
    elapsed = (gettime() - t0) / N
  end)
  return elapsed
end)
print(("spawn+await round trip:  %s per task   (coroutine create+resume: %s, x%.1f)")
  :format(us(tasks), us(plain), tasks / plain))

-- 3. 10^5 tasks sleeping on timers.
local M = 1e5
collectgarbage(); collectgarbage()
local base = collectgarbage("count")
local cos = {} -- luacheck: ignore 241
for i = 1, M do
  local co = coroutine.create(function() coroutine.yield() end)
  coroutine.resume(co)
  cos[i] = co
end
collectgarbage(); collectgarbage()
local per_coroutine = (collectgarbage("count") - base) * 1024 / M
cos = nil -- luacheck: ignore 311 (let the collector take them)
collectgarbage(); collectgarbage()

base = collectgarbage("count")
local sleepers = {}
for i = 1, M do sleepers[i] = task.spawn(task.sleep, 3600) end
local t0 = gettime()
task.step() -- every task starts and goes to sleep
local first_step = gettime() - t0
collectgarbage(); collectgarbage()
local per_task = (collectgarbage("count") - base) * 1024 / M
local idle_step = best_of(20, function()
  local s = gettime()
  task.step()
  return gettime() - s
end)
t0 = gettime()
for i = 1, M do sleepers[i]:cancel() end
task.step() -- every task wakes, its sleep raises, it ends
local cancel_step = gettime() - t0
print(("%d sleeping tasks:     %.0f bytes per task (suspended coroutine: %.0f bytes)")
  :format(M, per_task, per_coroutine))
print(("  step that starts them all: %.3f s (%s per task); idle step: %s; cancel all + step: %.3f s")
  :format(first_step, us(first_step / M), us(idle_step), cancel_step))
sleepers = nil -- luacheck: ignore 311
collectgarbage(); collectgarbage()

