-- Cross-thread latency of mtint.interrupt: how long the call itself takes,
-- from the call to the victim's error (both stamped with cqueues.monotime,
-- one clock for all threads), and the round trip back to the interrupter. With MTINT_ORIGINAL set to
-- the path of the original mtint's library, measures that one instead (in
-- both threads). Usage: see bench/run.
local original = os.getenv("MTINT_ORIGINAL")
if original then package.preload.mtint = assert(package.loadlib(original, "luaopen_mtint")) end
local mtint = require("mtint")
local cqueues = require("cqueues")
local threads = require("spec.helpers.threads")

local ROUNDS = tonumber(arg and arg[1]) or 500

local victim = threads.start(function(channel)
  local original = os.getenv("MTINT_ORIGINAL")
  if original then package.preload.mtint = assert(package.loadlib(original, "luaopen_mtint")) end
  local mtint = require("mtint")
  local monotime = require("cqueues").monotime
  require("spec.helpers.victim").serve(channel, function(err)
    local caught = monotime()
    assert(tostring(err):match(mtint.error.interrupted), err)
    return ("%.9f"):format(caught)
  end)
end)

local id = tonumber(assert(victim:receive(10)))
local call, to_error, round_trip = {}, {}, {}
-- An interrupt with no error after a second is lost (the original loses
-- some on Lua 5.2: its hook write races with the victim's count): it is
-- counted, sent again until it lands, and left out of the figures.
local lost = 0
for round = 1, ROUNDS do
  assert(victim:receive(10) == "ready")
  local sent = cqueues.monotime()
  mtint.interrupt(id)
  call[#call + 1] = cqueues.monotime() - sent
  local caught = victim:receive(1)
  if caught then
    round_trip[#round_trip + 1] = cqueues.monotime() - sent
    to_error[#to_error + 1] = tonumber(caught) - sent
  else
    lost = lost + 1
    repeat
      mtint.interrupt(id)
      caught = victim:receive(1)
    until caught
  end
  victim:send(round < ROUNDS and "again" or "stop")
end
assert(victim:join())

local function quantile(samples, q)
  table.sort(samples)
  return samples[math.max(1, math.ceil(q * #samples))] * 1e6
end
local version = (jit and jit.version or _VERSION) .. (original and " (original)" or "")
print(("%-23s rounds %d  call: median %4.1f us  to error: median %4.1f us  p99 %6.1f us"
  .. "  round trip: median %5.1f us  p99 %6.1f us%s")
  :format(version, ROUNDS, quantile(call, 0.5), quantile(to_error, 0.5), quantile(to_error, 0.99),
    quantile(round_trip, 0.5), quantile(round_trip, 0.99), lost > 0 and ("  LOST %d"):format(lost) or ""))
