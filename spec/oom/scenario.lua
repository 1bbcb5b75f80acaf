-- Runs in spec/oom/host.c: the same work again and again, each time with
-- one more allocation allowed before one fails, until the work succeeds:
-- each allocation along the way fails once ("not enough memory", caught by
-- pcall). After each round the
-- library must still work: a watched loop is killed, a plain coroutine is
-- not, and nothing the failed round half did lands anywhere.
if jit then jit.off() end
local set_budget = _G.set_budget -- given by the host
local corowatch = require("corowatch")
local mtint = require("mtint")
local cw = corowatch.export()

local function spin()
  local x = 0
  while true do x = x + 1 end
end

-- Resumes watched coroutines nested `depth` deep: each resume grows the
-- chain, and with it the table that anchors its coroutines.
local function nest(depth)
  if depth == 0 then
    mtint.interruptible(mtint.id())
    return mtint.interrupt(mtint.id(), false)
  end
  local co = corowatch.watch(cw.create(function() return nest(depth - 1) end), 60)
  local ok, err = cw.resume(co)
  if not ok then error(err, 0) end
  return err
end

local failed, budget = 0, 0
while true do
  collectgarbage()
  set_budget(budget)
  local ok, err = pcall(nest, 10)
  set_budget(nil)
  if ok then break end
  failed = failed + 1
  assert(tostring(err):find("memory"), "round " .. budget .. ": " .. tostring(err))
  assert(budget < 1e5, "the work never succeeded")
  budget = budget + 1
  if budget % 10 == 0 then
    local plain = cw.create(function() local x = 0 for i = 1, 1e4 do x = x + i end return x end)
    assert(cw.resume(plain), "a plain coroutine failed after round " .. budget)
    local killed, message = cw.resume(corowatch.watch(cw.create(spin), 0.01))
    assert(not killed and message:find("^Coroutine exceeded"), "round " .. budget .. ": " .. tostring(message))
  end
end
assert(failed > 0, "no allocation failed: the budget did not reach the library")
print("rounds that ran out of memory: " .. failed)
