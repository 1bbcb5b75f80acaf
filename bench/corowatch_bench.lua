-- corowatch against plain coroutines, in one process: CPU-loop time,
-- resume+yield round trip, kill overshoot, memory, a user's hook beside a
-- watch. Usage: see bench/run.
if jit then jit.off() end -- hooks only reach interpreted code
local corowatch = require("corowatch")
local core = require("corowatch.core")
local cw = corowatch.export()
local raw_create, raw_resume, raw_yield = coroutine.create, coroutine.resume, coroutine.yield
local clock, gettime = os.clock, corowatch.gettime

local function best_of(runs, f)
  local best = math.huge
  for _ = 1, runs do best = math.min(best, f()) end
  return best
end

local function cpu_loop()
  local x = 0
  for i = 1, 2e7 do x = x + i % 7 end
  return x
end

-- 1. A CPU loop inside a coroutine, plain and watched (well within its
-- limit), alternating so that both see the same machine.
local function time_loop(create, resume, watch)
  local co = create(cpu_loop)
  if watch then corowatch.watch(co, 60) end
  local t = clock()
  assert(resume(co))
  return clock() - t
end
local loop_plain, loop_watched = math.huge, math.huge
for _ = 1, 7 do
  loop_plain = math.min(loop_plain, time_loop(raw_create, raw_resume, false))
  loop_watched = math.min(loop_watched, time_loop(cw.create, cw.resume, true))
end

-- 2. resume+yield round trips.
local ROUNDS = 1e6
local function time_round_trips(create, resume, yield, watch)
  return best_of(5, function()
    local co = create(function() while true do yield() end end)
    if watch then corowatch.watch(co, 60) end
    local t = clock()
    for _ = 1, ROUNDS do resume(co) end
    return (clock() - t) / ROUNDS
  end)
end
local rt_raw = time_round_trips(raw_create, raw_resume, raw_yield, false)
local rt_plain = time_round_trips(cw.create, cw.resume, cw.yield, false)
local rt_watched = time_round_trips(cw.create, cw.resume, cw.yield, true)

-- 3. Kill overshoot past a 50 ms limit.
-- With how late the watchdog armed the hook at worst (its thread woke, or
-- ran, late: a kill cannot land before that).
local overshoot, armed_late = {}, 0
for i = 1, 40 do
  local co = corowatch.watch(cw.create(function() local x = 0 while true do x = x + 1 end end), 0.05)
  core.watchdog_lateness()
  local t = gettime()
  cw.resume(co)
  overshoot[i] = (gettime() - t - 0.05) * 1e3
  armed_late = math.max(armed_late, core.watchdog_lateness() * 1e3)
end
table.sort(overshoot)

-- 4. Memory: watched coroutines alive at once, beyond plain ones.
local N = 1e5
local function memory(make)
  collectgarbage(); collectgarbage()
  local before = collectgarbage("count")
  local keep = {}
  for i = 1, N do keep[i] = make() end
  collectgarbage(); collectgarbage()
  local bytes = (collectgarbage("count") - before) * 1024 / #keep
  return bytes
end
local function body() end
local mem_plain = memory(function() return raw_create(body) end)
-- Inherited first: the weak table then grows for them, not for the others.
local parent = corowatch.watch(cw.create(function()
  local mem = memory(function() return cw.create(body) end)
  cw.yield(mem)
end), 600)
local _, mem_inherited = cw.resume(parent)
local mem_watched = memory(function() return corowatch.watch(cw.create(body), 60) end)

-- 5. A user's line hook in a watched coroutine, set with the original
-- debug.sethook and with corowatch's (which chains it on LuaJIT).
local patched_sethook = corowatch.export({ coroutine = {}, debug = {} }).debug.sethook
local function time_user_hook(sethook)
  return best_of(5, function()
    local co = corowatch.watch(cw.create(function()
      local lines = 0
      sethook(function() lines = lines + 1 end, "l")
      local t = clock()
      for i = 1, 2e5 do lines = lines + i % 2 end
      local elapsed = clock() - t
      sethook()
      return elapsed
    end), 60)
    return select(2, assert(cw.resume(co)))
  end)
end
local hook_raw = time_user_hook(debug.sethook)
local hook_patched = time_user_hook(patched_sethook)

-- 6. RSS after creating and collecting 1e6 watched coroutines.
local function rss_kib()
  local statm = io.open("/proc/self/statm")
  if not statm then return 0 end
  local pages = tonumber(statm:read("*a"):match("^%d+%s+(%d+)"))
  statm:close()
  return pages * 4
end
local function churn(count)
  for _ = 1, count do
    local co = corowatch.watch(cw.create(body), 60)
    cw.resume(co)
  end
  collectgarbage(); collectgarbage()
end
churn(1e5)
local rss_before = rss_kib()
churn(1e6)
local rss_after = rss_kib()

local version = jit and jit.version or _VERSION
print(("%-18s cpu loop %.3f | round trip raw %4.0f ns, patched %4.0f ns (%.2fx), watched %4.0f ns (%.2fx)"
  .. " | kill overshoot median %.3f ms max %.3f ms (armed at worst %.3f ms late)"
  .. " | bytes per watched: explicit %.0f, inherited %.0f"
  .. " | RSS after 1e6 watched: %+d KiB | user line hook through corowatch %.2fx")
  :format(version, loop_watched / loop_plain, rt_raw * 1e9, rt_plain * 1e9, rt_plain / rt_raw,
    rt_watched * 1e9, rt_watched / rt_raw, overshoot[math.floor(#overshoot / 2) + 1] or 0, overshoot[#overshoot],
    armed_late,
    mem_watched - mem_plain, mem_inherited - mem_plain, rss_after - rss_before,
    hook_patched / hook_raw))
