-- Signal dispatch throughput: events delivered per second to N waiting
-- actors, corowatch.supervisor next to the seed's own supervisor (seed 003,
-- kept verbatim in bench/seed003_supervisor.lua), in one process, measured
-- alternately so that both see the same machine. Usage: see bench/run.
--
-- Columns (deliveries per second: one actor resumed with one event):
--   seed      the seed's supervisor, driven through its coroutine protocol
--   ours      supervisor.coroutine (the same protocol), every actor watched
--             (limit 1 s)
--   object    sup:signal() on the object, every actor watched
--   unwatched sup:signal(), actors with limit = false
-- and ours / seed as a time ratio (the issue's target: <= 1.5).
if jit then jit.off() end -- the same interpreter for both: watched actors must run interpreted
local supervisor = require("corowatch.supervisor")
local seed_supervisor = dofile("bench/seed003_supervisor.lua")
local create, resume, yield = coroutine.create, coroutine.resume, coroutine.yield
local clock = os.clock

local DELIVERIES = tonumber(arg and arg[1]) or 2e5 -- per measurement
local ROUNDS = 7 -- best of

-- The seed's sample processor, made endless: checks what it is given.
local function process()
  local i = 0
  while true do
    local e, howmany = yield("waitfor", "TICK")
    i = i + 1
    if e ~= "TICK" or howmany ~= i then error("bad event") end
  end
end

-- Seconds per delivery, through the seed's protocol (`body` is the seed's
-- supervisor function or ours).
local function through_protocol(body, n, log)
  local super = create(body)
  local saved = io.stderr
  -- Silence the seed's "Starting up".
  if not log then io.stderr = { write = function() end } end -- luacheck: ignore 122
  assert(resume(super, "status"))
  io.stderr = saved -- luacheck: ignore 122
  for i = 1, n do assert(resume(super, "introduce", ("p%04i"):format(i), process)) end
  local signals = math.max(1, math.floor(DELIVERIES / n))
  local t = clock()
  for j = 1, signals do
    local ok, more = resume(super, "signal", "TICK", j)
    if not (ok and more) then error("signal failed") end
  end
  local elapsed = clock() - t
  return elapsed / (signals * n)
end

local function through_object(n, limit)
  local sup = supervisor.new({ limit = limit, log = false })
  for i = 1, n do sup:introduce(("p%04i"):format(i), process) end
  local signals = math.max(1, math.floor(DELIVERIES / n))
  local t = clock()
  for j = 1, signals do
    if not sup:signal("TICK", j) then error("signal failed") end
  end
  local elapsed = clock() - t
  sup:done()
  return elapsed / (signals * n)
end

local function ours_protocol(...)
  return supervisor.new({ log = false }):serve(...)
end

local version = jit and (jit.version .. " (jit.off)") or _VERSION
print(("%s: signal dispatch, deliveries per second (best of %d, %d deliveries each)")
  :format(version, ROUNDS, DELIVERIES))
print(("%6s | %10s | %10s | %10s | %10s | %s"):format("actors", "seed", "ours", "object", "unwatched",
  "ours/seed time"))
for _, n in ipairs({ 1, 10, 100, 1000 }) do
  local best = { math.huge, math.huge, math.huge, math.huge }
  for _ = 1, ROUNDS do
    collectgarbage()
    best[1] = math.min(best[1], through_protocol(seed_supervisor, n))
    collectgarbage()
    best[2] = math.min(best[2], through_protocol(ours_protocol, n))
    collectgarbage()
    best[3] = math.min(best[3], through_object(n, 1))
    collectgarbage()
    best[4] = math.min(best[4], through_object(n, false))
  end
  print(("%6d | %10.0f | %10.0f | %10.0f | %10.0f | %.2f (object %.2f, unwatched %.2f)")
    :format(n, 1 / best[1], 1 / best[2], 1 / best[3], 1 / best[4],
      best[2] / best[1], best[3] / best[1], best[4] / best[1]))
end
