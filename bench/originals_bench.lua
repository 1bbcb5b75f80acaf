-- corowatch side by side with the original corowatch 1.1, in one process:
-- the kill's overshoot past its limit and the resume+yield round trip of a
-- watched coroutine (against the same with plain coroutines). The original
-- is not part of this repository: put its `corowatch.lua` in
-- bench/originals/ (an ignored folder), or this bench says so and ends.
-- Usage: see bench/run.
if jit then jit.off() end -- hooks only reach interpreted code
local ORIGINAL = "bench/originals/corowatch.lua"

local version = jit and jit.version or _VERSION
local found = io.open(ORIGINAL)
if not found then
  print(("%-12s originals bench: %s not found, skipped"):format(version, ORIGINAL))
  return
end
found:close()

local corowatch = require("corowatch")
local core = require("corowatch.core")
local ours = corowatch.export()
local original = dofile(ORIGINAL)
-- One clock for both (the original uses LuaSocket's by default).
original.gettime = corowatch.gettime
local gettime, clock = corowatch.gettime, os.clock
local raw_create, raw_resume, raw_yield = coroutine.create, coroutine.resume, coroutine.yield

local function median(samples)
  table.sort(samples)
  return samples[math.ceil(#samples / 2)], samples[#samples]
end

local function spin() local x = 0 while true do x = x + 1 end end

-- 1. resume+yield round trips of a watched coroutine, over plain ones
-- (first: on LuaJIT a kill can leave the VM-wide hook polling for a while).
local ROUNDS = 2e5
local function round_trip(create, resume, yield, watch)
  local best = math.huge
  for _ = 1, 5 do
    local co = create(function() while true do yield() end end)
    if watch then watch(co) end
    local t = clock()
    for _ = 1, ROUNDS do resume(co) end
    best = math.min(best, (clock() - t) / ROUNDS)
  end
  return best
end
local raw = round_trip(raw_create, raw_resume, raw_yield)
local watched_ours = round_trip(ours.create, ours.resume, ours.yield,
  function(co) ours.watch(co, 60) end)
local watched_original = round_trip(original.create, original.resume, original.yield,
  function(co) original.watch(co, 60) end)

-- 2. Kill overshoot past a 50 ms limit, alternating the two libraries so
-- that both see the same machine. Ours is also told with how late the
-- watchdog armed the hook at worst (its thread woke, or ran, late: a kill
-- cannot land before that).
local LIMIT, KILLS = 0.05, 40
local over = { ours = {}, original = {} }
local armed_late = 0
for i = 1, KILLS do
  local co = ours.watch(ours.create(spin), LIMIT)
  core.watchdog_lateness()
  local t = gettime()
  assert(not ours.resume(co))
  over.ours[i] = (gettime() - t - LIMIT) * 1e3
  armed_late = math.max(armed_late, core.watchdog_lateness() * 1e3)
  co = original.create(spin)
  original.watch(co, LIMIT)
  t = gettime()
  assert(not original.resume(co))
  over.original[i] = (gettime() - t - LIMIT) * 1e3
end

local om, ox = median(over.ours)
local gm, gx = median(over.original)
print(("%-12s kill overshoot (%g s): median %.3f ms, max %.2f ms (watchdog's arming at worst %.2f ms late)"
  .. "   (original: median %.3f ms, max %.2f ms)")
  :format(version, LIMIT, om, ox, armed_late, gm, gx))
print(("%-12s watched resume+yield: %.2fx raw   (original: %.2fx raw; raw %.0f ns)")
  :format(version, watched_ours / raw, watched_original / raw, raw * 1e9))
