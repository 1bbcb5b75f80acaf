-- LuaJIT: a dispatch loop's probe (src/probe.rs, issue 10). The
-- supervisor's `signal` resumes its actors with LuaJIT's own resume and
-- tells the core what it runs through three upvalues; the watchdog samples
-- them and the hook kills a delivery that runs past its limit. These specs
-- drive the probe directly, as the supervisor does.
local child = require("spec.helpers.child")
local cw = require("corowatch")
local core = require("corowatch.core")

local watch_dispatch = core.corowatch.watch_dispatch
local gettime = cw.gettime
local is_luajit = jit ~= nil
if is_luajit then jit.off() end

local LIMIT = 0.05

-- Runs for `seconds` of Lua instructions (or until killed).
local function spin(seconds)
  local started = gettime()
  while gettime() - started < seconds do end
  return "spun"
end

-- A probe: `deliver(co, ...)` resumes `co` with LuaJIT's own resume, as
-- the supervisor's loop does, under `limit` (a VM has room for 8 probes:
-- the specs share one, `set_limit` changing its limit).
local function new_probe(limit)
  local count, current_limit, current, watched_running = 0, 0, false, 0
  local function probe() return count, current_limit, current, watched_running end
  local function deliver(co, ...)
    current = co
    current_limit = limit
    count = count + 1
    local results = { coroutine.resume(co, ...) }
    current_limit = 0
    current = false
    return unpack(results)
  end
  -- Leaves the probe saying `co` is being delivered to, as a loop cut
  -- short would.
  local function leave_behind(co)
    current, current_limit, count = co, limit, count + 1
  end
  local function chain_length() return watched_running end
  local function set_limit(new_limit) limit = new_limit end
  return probe, deliver, leave_behind, chain_length, set_limit
end

describe("the dispatch probe", function()
  if not is_luajit then
    it("is LuaJIT's only: PUC Lua's resume is corowatch's C resume", function()
      assert.is_nil(watch_dispatch)
    end)
    return
  end

  local probe, deliver, leave_behind, chain_length, set_limit = new_probe(LIMIT)
  assert(watch_dispatch(probe, LIMIT))

  -- Delivers to a new coroutine running `body`, watched at LIMIT, and
  -- asserts that it is killed, within `bound` seconds.
  local function assert_killed_within(bound, body)
    set_limit(LIMIT)
    local co = coroutine.create(body)
    cw.watch(co, LIMIT)
    local started = gettime()
    local ok, err = deliver(co)
    local took = gettime() - started
    assert.is_false(ok)
    assert.matches("^Coroutine exceeded", err)
    assert.is_true(took < bound, ("killed after %.3f s"):format(took))
  end

  it("is a function whose first, second and fourth upvalues are closed numbers", function()
    assert.is_true(watch_dispatch(probe, LIMIT))
    -- Again: it is known, and takes the limit.
    assert.is_true(watch_dispatch(probe, LIMIT / 2))
    -- Open upvalues: their function has not returned.
    local a, b, c, d = 0, 0, false, 0
    assert.is_false(watch_dispatch(function() return a, b, c, d end, LIMIT))
    local function closed(e, f, g, h)
      return function() return e, f, g, h end
    end
    assert.is_false(watch_dispatch(closed("count", 0, false, 0), LIMIT))
    assert.is_false(watch_dispatch(closed(0, 0, false, "length"), LIMIT))
    assert.is_true(watch_dispatch(closed(0, 0, "anything", 0), LIMIT))
    local function too_few()
      local x, y, z = 0, 0, false
      return function() return x, y, z end
    end
    assert.is_false(watch_dispatch(too_few(), LIMIT))
    assert.is_false(watch_dispatch(print, LIMIT))
    for _, limit in ipairs({ 0, -1, 0 / 0 }) do
      local ok, err = pcall(watch_dispatch, probe, limit)
      assert.is_false(ok)
      assert.matches("corowatch.watch_dispatch: limit must be a positive number of seconds",
        tostring(err), 1, true)
    end
    assert.is_false((pcall(watch_dispatch, "probe", 1)))
  end)

  it("is told the length of corowatch's chain: whether something watched runs", function()
    assert.equal(0, chain_length())
    local seen
    local watched = cw.create(function() seen = chain_length() end)
    cw.watch(watched, 10)
    assert.is_true(cw.resume(watched))
    assert.is_true(seen > 0)
    assert.equal(0, chain_length())
  end)

  it("kills the coroutine it names once its count stays for the limit", function()
    set_limit(LIMIT)
    local co = coroutine.create(spin)
    cw.watch(co, LIMIT)
    local started = gettime()
    local ok, err = deliver(co, 1)
    local took = gettime() - started
    assert.is_false(ok)
    assert.matches("^Coroutine exceeded its allowed running time of 0.05 seconds", err)
    assert.equal("dead", cw.status(co))
    assert.is_true(took >= LIMIT and took < 2 * LIMIT, ("killed after %.3f s"):format(took))
  end)

  it("leaves a delivery within its limit alone", function()
    set_limit(LIMIT)
    local co = coroutine.create(function()
      while true do
        spin(LIMIT / 5)
        coroutine.yield()
      end
    end)
    cw.watch(co, LIMIT)
    for _ = 1, 25 do assert.is_true((deliver(co))) end
  end)

  it("kills inside an xpcall message handler", function()
    -- LuaJIT marks a thread whose handler runs LUA_ERRERR: it still runs.
    assert_killed_within(0.5, function()
      xpcall(function() error("boom") end, function() return spin(1) end)
      return "handled"
    end)
  end)

  it("kills a coroutine in an xpcall message handler once it runs again", function()
    -- In its handler it resumes another coroutine, which runs past the
    -- limit: the handler's thread is not killed in there (it is marked
    -- failed: LUA_ERRERR), and must still be when it runs away itself.
    assert_killed_within(1, function()
      xpcall(function() error("boom") end, function()
        coroutine.resume(coroutine.create(spin), 0.3)
        return spin(2)
      end)
      return "handled"
    end)
  end)

  it("samples sooner as soon as a smaller limit is announced", function()
    for _ = 1, 2 do
      -- A probe of its own, announced with 1 s, idle: sampled every
      -- 100 ms, its next sample queued up to that far.
      local probe2, deliver2 = new_probe(0.02)
      assert.is_true(watch_dispatch(probe2, 1))
      spin(0.25)
      -- Announced 20 ms: the next sample must not wait for the old period.
      assert.is_true(watch_dispatch(probe2, 0.02))
      local co = coroutine.create(spin)
      cw.watch(co, 0.02)
      local started = gettime()
      assert.is_false((deliver2(co, 1)))
      local took = gettime() - started
      assert.is_true(took < 0.04, ("killed after %.3f s"):format(took))
    end
  end)

  it("is sampled less and less often while nothing is delivered", function()
    -- Limit 16 ms: sampled every 2 ms in a delivery; idle, the wait
    -- doubles up to 8 ms.
    set_limit(0.016)
    assert.is_true(watch_dispatch(probe, 0.016))
    local co = coroutine.create(function() while true do coroutine.yield() end end)
    cw.watch(co, 1)
    assert.is_true((deliver(co)))
    local samples = core.watchdog_samples()
    local started = gettime()
    while gettime() - started < 0.4 do end
    -- Every 2 ms: 200 samples; backing off to 8 ms: about 55 (other
    -- probes of this process, idle longer, add a few).
    local taken = core.watchdog_samples() - samples
    assert.is_true(taken < 120, taken .. " samples")
  end)

  it("kills through pcall in a loop", function()
    -- The first kill comes inside `spin` (1 s), under the pcall.
    assert_killed_within(0.5, function()
      for _ = 1, 1e6 do pcall(spin, 1) end
      return "survived"
    end)
  end)

  it("reaches what the coroutine resumed, then the coroutine", function()
    local inner = coroutine.create(spin)
    assert_killed_within(0.5, function()
      coroutine.resume(inner, 1)
      return "went on"
    end)
    -- `inner` died of the kill, well before its second of spinning.
    assert.equal("dead", coroutine.status(inner))
  end)

  it("kills nothing when the coroutine it names no longer runs", function()
    set_limit(LIMIT)
    local co = coroutine.create(function()
      while true do coroutine.yield() end
    end)
    cw.watch(co, LIMIT)
    assert.is_true((deliver(co)))
    -- The probe still says `co` runs; it is suspended, and this thread
    -- (unwatched) runs several limits. The watchdog asks for the hook once
    -- (maybe again, if its first request was undone), then leaves that
    -- count alone.
    local signals = core.hook_signals()
    leave_behind(co)
    assert.equal("spun", spin(8 * LIMIT))
    assert.equal("suspended", cw.status(co))
    assert.is_true(core.hook_signals() - signals <= 2, core.hook_signals() - signals .. " signals")
    local dead = coroutine.create(function() end)
    coroutine.resume(dead)
    leave_behind(dead)
    assert.equal("spun", spin(4 * LIMIT))
    -- Back in order, it still kills.
    local runaway = coroutine.create(spin)
    cw.watch(runaway, LIMIT)
    assert.is_false((deliver(runaway, 1)))
  end)

  it("survives lua_close while it says a delivery runs", function()
    for _ = 1, 5 do
      local output, ok = child.run([[
jit.off()
local cw = require("corowatch")
local watch_dispatch = require("corowatch.core").corowatch.watch_dispatch
-- The probe's upvalues are closed once `make` returns.
local function make()
  local count, limit, current, watched_running = 0, 0, false, 0
  local function probe() return count, limit, current, watched_running end
  local function enter(co) current, limit, count = co, 0.002, count + 1 end
  return probe, enter
end
local probe, enter = make()
assert(watch_dispatch(probe, 0.002))
local co = coroutine.create(function()
  enter(coroutine.running())
  local started = cw.gettime()
  while cw.gettime() - started < 0.001 do end
  print("closing")
  os.exit(0, true)
end)
cw.watch(co, 1)
coroutine.resume(co)
]], "timeout 60 ")
      assert.is_true(ok, output)
      assert.equal("closing\n", output)
    end
  end)
end)
