-- The chain of running coroutines changes without a lock (src/mirror.rs):
-- here the watchdog arms it again and again from its thread while the
-- owner pushes and pops watched coroutines that are collected right after.
-- A hook written into a popped, freed coroutine is an invalid write under
-- valgrind (`./run-valgrind`); a hook left on one that the arming record
-- was not told of fires where nothing is due, and a warn or kill landing
-- in the wrong coroutine breaks the values checked here.
local threads = require("spec.helpers.threads")

local WORKERS = 3
local ROUNDS = tonumber(os.getenv("STRESS_ROUNDS")) or 150
local INNER = 40 -- watched coroutines per round, each resumed twice

local function worker(channel, rounds, inner_count)
  local corowatch = require("corowatch")
  local cw = corowatch.export()
  local warned = 0
  local function on_warn(kind)
    if kind == "warn" then
      warned = warned + 1
      return true -- more time: the root is never killed
    end
  end
  local root = cw.create(function()
    for _ = 1, tonumber(rounds) do
      for _ = 1, tonumber(inner_count) do
        local inner = corowatch.watch(cw.create(function(a)
          local b = cw.yield(a + 1)
          return b * 2
        end), 30)
        local ok, value = cw.resume(inner, 1)
        assert(ok and value == 2, "first resume: " .. tostring(value))
        ok, value = cw.resume(inner, 5)
        assert(ok and value == 10, "second resume: " .. tostring(value))
      end
      collectgarbage()
    end
  end)
  -- The root runs without yielding: its warn deadline passes every 0.2 ms
  -- of its run, whichever coroutine of the chain runs then.
  corowatch.watch(root, 60, 0.0002, on_warn)
  local ok, err = cw.resume(root)
  assert(ok, err)
  channel:send("done", warned)
end

describe("the lock-free chain", function()
  it("survives the watchdog arming it while the owner pushes, pops and collects", function()
    local workers = {}
    for i = 1, WORKERS do workers[i] = threads.start(worker, ROUNDS, INNER) end
    local warned = 0
    for _, w in ipairs(workers) do
      local line, failure = w:receive(600)
      if not line then
        local _, err = w:join()
        error(("worker: %s (%s)"):format(tostring(err), failure))
      end
      local count = assert(line:match("^done (%d+)$"), line)
      warned = warned + tonumber(count)
    end
    for _, w in ipairs(workers) do assert.is_true(w:join()) end
    -- The watchdog did arm the chain while it changed.
    assert.is_true(warned >= WORKERS, "warnings: " .. warned)
  end)
end)
