-- corowatch.supervisor: the scenario of seed 003 ("Coroutines As Event
-- Handlers"): ten actors each wait for twelve TICKs, driven through the
-- seed's protocol exactly as its test driver does, and it ends with
-- "Endcount 12". One more actor joins them: on its third TICK it loops
-- forever without waiting. The seed's supervisor would hang there for
-- good; this one kills it after its limit (1 second by default), logs its
-- traceback, restarts it (it is transient: restarted after a failure) and
-- goes on dispatching to the others.
if jit then jit.off() end -- LuaJIT: compiled loops never call hooks
local supervisor = require("corowatch.supervisor")

local cocreate, resume, yield = coroutine.create, coroutine.resume, coroutine.yield

local LOG = function(...)
  io.stderr:write(os.date"!%F %T ")
  io.stderr:write(...)
  io.stderr:write"\n"
end

local function block(event) return yield("waitfor", event) end

-- The seed's sample processor.
local function process(n)
  for i = 1, n do
    local e, howmany = block"TICK"
    assert(e == "TICK" and howmany == i)
  end
end

-- The runaway: its first life loops on its third TICK; the one after the
-- restart behaves, and ends with the others.
local lives = 0
local function runaway(n)
  lives = lives + 1
  LOG("runaway: life ", lives, " starts")
  while true do
    local _, j = block"TICK"
    if lives == 1 and j == 3 then
      LOG("runaway: TICK 3, now looping without waiting")
      while true do end
    end
    if j == n then return end
  end
end

local super = cocreate(supervisor.coroutine)

local function check(ok, rv)
  if not ok then
    LOG("supervisor crashed")
    local tb = debug.traceback(super, rv)
    for line in tb:gmatch"[^\n]+" do LOG("  ", line) end
    os.exit(1)
  end
  return rv
end

local function send(msg, ...) return check(resume(super, msg, ...)) end

local nprocess, nreps = 10, 12
for i = 1, nprocess do
  send("introduce", ("p%04i"):format(i), process, nreps)
end
send("introduce", "runaway", runaway, nreps)
local j = 1
while send("signal", "TICK", j) do
  j = j + 1
end
-- This should be empty
send"status"
send"done"
LOG("Endcount ", j)
