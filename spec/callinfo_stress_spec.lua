-- Another thread's `lua_sethook` (an interrupt) walks the target's frames:
-- on Lua 5.4 it sets the trap flag of every `CallInfo` down the chain, on
-- 5.2/5.3 it reads the running one. The target may return below those
-- frames meanwhile, and a GC step frees unused ones. Here the target
-- recurses deep (a long chain: a wide window for the walk), returns and
-- collects, again and again, while this thread interrupts it as fast as it
-- can. Run under valgrind (./run-valgrind), a write into a freed frame is
-- an error.
local mtint = require("mtint")
local threads = require("spec.helpers.threads")

-- On 5.4 every interrupt walks the whole chain of 20000 frames under the
-- VM lock, and the target's frees wait for it: 150 rounds took 82-105 s
-- on a 2-core machine (a 120 s limit failed once in CI). 60 rounds keep
-- the churn, and the limit only catches a hang.
local ROUNDS = tonumber(os.getenv("STRESS_ROUNDS")) or 60
local DEPTH = tonumber(os.getenv("STRESS_DEPTH")) or 20000
local TIMEOUT = 300

local function target(channel, rounds, depth)
  local mtint = require("mtint")
  rounds, depth = tonumber(rounds), tonumber(depth)
  local delivered = 0
  mtint.sethook(function() delivered = delivered + 1 end) -- and go on
  local function deep(n)
    if n == 0 then return 0 end
    return 1 + deep(n - 1)
  end
  channel:send("id", mtint.id())
  for _ = 1, rounds do
    deep(depth)
    collectgarbage() -- frees unused frames (luaE_shrinkCI, luaE_freeCI)
  end
  channel:send("done", delivered)
end

-- Lua 5.1 and LuaJIT set a hook without touching frames (and 5.1 runs this
-- loop hundreds of times slower, its hook firing at every instruction).
local frames_spec = (jit or _VERSION == "Lua 5.1") and pending or it

describe("interrupting a thread whose frames come and go", function()
  frames_spec("never writes into a freed frame, and delivers", function()
    local worker = threads.start(target, ROUNDS, DEPTH)
    local line = assert(worker:receive(TIMEOUT))
    local id = tonumber(line:match("^id (%d+)$"))
    assert.is_number(id, line)
    local sent, answer = 0, nil
    local started = os.time()
    local gone = false
    while not answer do
      for _ = 1, 50 do
        -- Once the target's state is closed its id is unknown.
        local ok, alive = pcall(mtint.interrupt, id)
        if ok and alive then sent = sent + 1 end
        gone = gone or not ok
      end
      answer = worker:receive(gone and TIMEOUT or 0)
      assert.is_true(os.time() - started < TIMEOUT, "the target did not finish")
    end
    local delivered = tonumber(answer:match("^done (%d+)$"))
    assert.is_number(delivered, answer)
    assert.is_true(worker:join())
    assert.is_true(sent > 0 and delivered > 0, ("sent %d, delivered %d"):format(sent, delivered))
  end)
end)
