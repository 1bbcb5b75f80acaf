-- corowatch in several OS threads at once, with mtint interrupting the same
-- coroutines from another thread: one watchdog and one hook serve them all.
local mtint = require("mtint")
local threads = require("spec.helpers.threads")

local WORKERS = 3
local ROUNDS = tonumber(os.getenv("STRESS_ROUNDS")) or 40

-- Every third round is interrupted through mtint (sticky, so that the
-- pcall in the loop cannot swallow it) long before its 10 s limit; the
-- others are killed by their 10 ms limit. The worker checks each round's
-- outcome against what it was meant to be.
local function worker(channel, rounds)
  local corowatch = require("corowatch")
  local mtint = require("mtint")
  local cw = corowatch.export()
  local killed, interrupted = 0, 0
  for round = 1, tonumber(rounds) do
    local to_interrupt = round % 3 == 0
    local co = corowatch.watch(cw.create(function()
      local x = 0
      while true do pcall(function() for i = 1, 1e3 do x = x + i end end) end
    end), to_interrupt and 10 or 0.01)
    local id = mtint.id(co)
    channel:send(id, round)
    local ok, err = cw.resume(co)
    assert(not ok, "the coroutine survived")
    if to_interrupt then
      assert(err:match(mtint.error.interrupted), "round " .. round .. " not interrupted: " .. err)
      interrupted = interrupted + 1
      mtint.interrupt(id, false)
    else
      assert(err:find("^Coroutine exceeded its allowed running time of 0.01 seconds"),
        "round " .. round .. " not killed: " .. err)
      killed = killed + 1
    end
    assert(cw.status(co) == "dead")
  end
  channel:send("done", killed, interrupted)
end

describe("corowatch in several threads", function()
  it("kills every runaway coroutine while another thread interrupts some", function()
    local workers = {}
    for i = 1, WORKERS do workers[i] = threads.start(worker, ROUNDS) end
    local killed, interrupted, done, sent = 0, 0, 0, 0
    while done < WORKERS do
      for _, w in ipairs(workers) do
        if not w.done then
          local line, failure = w:receive(60)
          if not line then
            local _, err = w:join()
            error(("worker: %s (%s)"):format(tostring(err), failure))
          end
          local k, i = line:match("^done (%d+) (%d+)$")
          if k then
            killed, interrupted = killed + tonumber(k), interrupted + tonumber(i)
            w.done, done = true, done + 1
          else
            local id, round = line:match("^(%d+) (%d+)$")
            if tonumber(round) % 3 == 0 then
              local ok, signalled = pcall(mtint.interrupt, tonumber(id), true)
              assert.is_true(ok, signalled)
              assert.is_true(signalled)
              sent = sent + 1
            end
          end
        end
      end
    end
    for _, w in ipairs(workers) do assert.is_true(w:join()) end
    local per_worker = math.floor(ROUNDS / 3)
    assert.are.equal(WORKERS * per_worker, sent)
    assert.are.equal(sent, interrupted)
    assert.are.equal(WORKERS * (ROUNDS - per_worker), killed)
  end)
end)

-- A victim whose user hook fires every 200 instructions (set through
-- corowatch's debug.sethook), interrupted again and again from here. On
-- LuaJIT, arming from another thread while that hook ran could disable all
-- hooks for good.
local function hooked_victim(channel)
  local mtint = require("mtint")
  require("corowatch").export(_G)
  local calls = 0
  debug.sethook(function() calls = calls + 1 end, "", 200)
  require("spec.helpers.victim").serve(channel, function(err)
    assert(tostring(err):match(mtint.error.interrupted), err)
    -- Work the hook must see after each interrupt, whenever it landed (it
    -- can land at the spin's first instruction on a loaded machine).
    local before, x = calls, 0
    for i = 1, 10000 do x = x + i end
    assert(calls > before, "the user's hook stopped after an interrupt")
    return "caught " .. calls
  end)
end

describe("mtint beside a user's debug hook", function()
  it("lands every interrupt, and the user's hook keeps firing", function()
    local victim = threads.start(hooked_victim)
    local id = tonumber(assert(victim:receive(10)))
    local rounds = ROUNDS * 5
    local calls
    for round = 1, rounds do
      assert.are.equal("ready", victim:receive(10))
      assert.is_true(mtint.interrupt(id))
      local line = assert(victim:receive(10), "interrupt lost in round " .. round)
      calls = tonumber(line:match("^caught (%d+)$"))
      victim:send(round < rounds and "again" or "stop")
    end
    assert.is_true(victim:join())
    assert.is_true(calls > rounds * 10, "user hook calls: " .. tostring(calls))
  end)
end)
