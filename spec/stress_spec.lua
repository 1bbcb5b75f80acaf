-- Several threads create, run and collect coroutines while this thread
-- interrupts their ids, live and stale, at random. Run it under valgrind
-- with `STRESS_ROUNDS=20 ./run-valgrind` (see the README).
local mtint = require("mtint")
local threads = require("spec.helpers.threads")

local WORKERS = 3
local ROUNDS = tonumber(os.getenv("STRESS_ROUNDS")) or 150
local CHURN = 20 -- short-lived coroutines per round, collected at once
local TIMEOUT = 60

local function worker(channel, rounds, churn)
  local mtint = require("mtint")
  rounds, churn = tonumber(rounds), tonumber(churn)
  for _ = 1, rounds do
    -- coroutines whose ids are interrupted while they are being collected
    local ids = {}
    for i = 1, churn do
      local co = coroutine.create(function() coroutine.yield() end)
      coroutine.resume(co)
      ids[i] = mtint.id(co)
    end
    channel:send("stale", table.concat(ids, " "))
    collectgarbage()
    -- one that runs until an interrupt reaches it
    local busy = coroutine.create(function()
      channel:send("busy", mtint.id())
      local x = 0
      while true do x = x + 1 end
    end)
    local ok, err = coroutine.resume(busy)
    if ok or not tostring(err):match(mtint.error.interrupted) then
      channel:send("wrong", tostring(err))
      return
    end
    channel:send("delivered")
  end
  channel:send("finished")
end

describe("interrupting coroutines that other threads create and collect", function()
  it("never crashes, and answers every interrupt by delivery or unknown_object", function()
    local workers = {}
    for i = 1, WORKERS do workers[i] = threads.start(worker, ROUNDS, CHURN) end
    local stale, outcomes = {}, { [true] = 0, [false] = 0, unknown = 0 }
    local delivered, finished, wrong = 0, 0, {}

    local function interrupt_stale(count)
      for _ = 1, count do
        if #stale == 0 then return end
        local ok, res = pcall(mtint.interrupt, stale[math.random(#stale)])
        if ok then
          outcomes[res] = outcomes[res] + 1
        elseif tostring(res):match(mtint.error.unknown_object) then
          outcomes.unknown = outcomes.unknown + 1
        else
          wrong[#wrong + 1] = tostring(res)
        end
      end
    end

    while finished < WORKERS and #wrong == 0 do
      for _, w in ipairs(workers) do
        if not w.done then
          local line = assert(w:receive(TIMEOUT))
          local kind, rest = line:match("^(%a+) ?(.*)$")
          if kind == "stale" then
            for id in rest:gmatch("%d+") do stale[#stale + 1] = tonumber(id) end
            interrupt_stale(CHURN)
          elseif kind == "busy" then
            interrupt_stale(5)
            assert.is_true(mtint.interrupt(tonumber(rest)))
          elseif kind == "delivered" then
            delivered = delivered + 1
          elseif kind == "finished" then
            w.done, finished = true, finished + 1
          else
            wrong[#wrong + 1] = line
            w.done, finished = true, finished + 1
          end
        end
      end
    end
    for _, w in ipairs(workers) do assert.is_true(w:join()) end

    assert.are.same({}, wrong)
    assert.are.equal(WORKERS * ROUNDS, delivered)
    assert.are.equal(0, outcomes[false]) -- plain ids never answer false
    assert.is_true(outcomes.unknown > 0)
  end)
end)
