-- corowatch: the seed's API on the native core.
local unpack = unpack or table.unpack
if jit then jit.off() end

local corowatch = require("corowatch")
local cw = corowatch.export() -- the coroutine functions, in a fresh table

-- The specs patch copies of the debug table, never the real one: busted
-- runs later spec files in this state, and they must get Lua's own hooks.
local real_sethook, real_gethook = debug.sethook, debug.gethook
teardown(function()
  local patched = debug.sethook ~= real_sethook or debug.gethook ~= real_gethook
  debug.sethook, debug.gethook = real_sethook, real_gethook -- luacheck: ignore 122
  assert.is_false(patched, "a spec left the real debug table patched")
end)

local KILL = "^Coroutine exceeded its allowed running time of "

local function spin()
  local x = 0
  while true do x = x + 1 end
end

local function busy(n)
  local x = 0
  for i = 1, n or 1e4 do x = x + i end
  return x
end

-- Runs Lua code with this interpreter, in a child process.
local run_file = require("spec.helpers.child").run

-- A child's script: a watched coroutine (0.05 s) resuming helpers with the
-- original resume, forever, after `setup` (a line of Lua); it prints what
-- resuming it gave.
local function unseen_helpers_script(setup)
  return ([[
    if jit then jit.off() end
    local corowatch = require("corowatch")
    local cw = corowatch.export()
    %s
    local function busy(n)
      local x = 0
      for i = 1, n or 1e4 do x = x + i end
      return x
    end
    local outer = corowatch.watch(cw.create(function()
      while true do
        local helper = coroutine.create(function() busy(1e4) end)
        coroutine.resume(helper)
      end
    end), 0.05)
    print(cw.resume(outer))
  ]]):format(setup)
end

describe("corowatch.watch", function()
  it("kills a coroutine that loops past its limit, with the documented message", function()
    local co = corowatch.watch(cw.create(spin), 0.05)
    local started = corowatch.gettime()
    local ok, err = cw.resume(co)
    local elapsed = corowatch.gettime() - started
    assert.is_false(ok)
    assert.is_truthy(err:find(KILL .. "0.05 seconds, without yielding\nstack traceback:\n"), err)
    -- Generous: this machine may be loaded; bench/ measures the overshoot.
    assert.is_true(elapsed >= 0.05 and elapsed < 1, "killed after " .. elapsed)
    assert.are.equal("dead", cw.status(co))
    assert.are.same({ false, err }, { cw.resume(co) })
  end)

  it("names in each kill message its own limit and where its watch was set", function()
    -- Watches set alike share one message, built once (a traceback per
    -- watch was a few hundred bytes of garbage each): alternating places
    -- and limits must still give each watch its own.
    -- (Not tail calls: the traceback starts in these functions.)
    local function watch_here(limit)
      local co = corowatch.watch(cw.create(spin), limit)
      return co
    end
    local function watch_there(limit)
      local co = corowatch.watch(cw.create(spin), limit)
      return co
    end
    local cos = {}
    for _ = 1, 2 do
      cos[#cos + 1] = watch_here(0.02)
      cos[#cos + 1] = watch_there(0.02)
      cos[#cos + 1] = watch_there(0.03)
    end
    local heads, places = {}, {}
    for i, co in ipairs(cos) do
      local _, err = cw.resume(co)
      heads[i] = err:match("^[^\n]*")
      places[i] = err:match("stack traceback:\n\t[^\n]-:(%d+):")
    end
    assert.are.same({ heads[1], heads[2], heads[3] }, { heads[4], heads[5], heads[6] })
    assert.are.same({ places[1], places[2], places[3] }, { places[4], places[5], places[6] })
    assert.is_truthy(heads[2]:find("0.02 seconds", 1, true))
    assert.is_truthy(heads[3]:find("0.03 seconds", 1, true))
    assert.are_not.equal(places[1], places[2])
    assert.are.equal(places[2], places[3])
  end)

  it("restarts the clock at every resume: only running without yielding counts", function()
    -- Six slices of 50 ms add up to more than the limit; each stays far
    -- below it, even on a loaded machine.
    local co = corowatch.watch(cw.create(function()
      for _ = 1, 6 do
        local t = corowatch.gettime()
        while corowatch.gettime() - t < 0.05 do end
        cw.yield()
      end
      return "done"
    end), 0.25)
    local results
    for _ = 1, 7 do results = { cw.resume(co) } end
    assert.are.same({ true, "done" }, results)
  end)

  it("warns, resets on a truthy answer, then kills: the seed's semantics", function()
    local events = {}
    -- The kill limit is ten times the warn limit: a late watchdog still
    -- warns before it kills.
    local co = corowatch.watch(cw.create(spin), 0.5, 0.05, function(kind)
      events[#events + 1] = kind
      if kind == "warn" then return #events < 4 end
    end)
    local ok, err = cw.resume(co)
    assert.is_false(ok)
    assert.is_truthy(err:find(KILL))
    assert.are.same({ "warn", "warn", "warn", "warn", "kill" }, events)
  end)

  it("runs the callback on the watched coroutine", function()
    local where
    local co = corowatch.watch(cw.create(function()
      while not where do busy() end
      return "warned"
    end), 10, 0.02, function(kind)
      if kind == "warn" then where = coroutine.running() end
    end)
    assert.are.same({ true, "warned" }, { cw.resume(co) })
    assert.are.equal(co, where)
  end)

  it("has no debug hook installed while the coroutine runs within its limits", function()
    local co = corowatch.watch(cw.create(function()
      busy(1e5)
      return (debug.gethook())
    end), 5)
    assert.are.same({ true }, { cw.resume(co) })
  end)

  it("watches the running coroutine when co is nil", function()
    local co = cw.create(function()
      corowatch.watch(nil, 0.05)
      spin()
    end)
    local ok, err = cw.resume(co)
    assert.is_false(ok)
    assert.is_truthy(err:find(KILL))
  end)

  it("does not keep watched or killed coroutines alive", function()
    local alive = setmetatable({}, { __mode = "k" })
    for _ = 1, 20 do
      alive[corowatch.watch(cw.create(busy), 1)] = true
      local parent = corowatch.watch(cw.create(function() cw.yield(cw.create(busy)) end), 1)
      alive[parent] = true
      alive[select(2, cw.resume(parent))] = true
    end
    alive[corowatch.watch(cw.create(spin), 0.02)] = true
    for co in pairs(alive) do cw.resume(co) end
    collectgarbage(); collectgarbage(); collectgarbage()
    assert.is_nil(next(alive))
  end)

  it("returns the coroutine", function()
    local co = cw.create(busy)
    assert.are.equal(co, corowatch.watch(co, 1))
  end)
end)

describe("a killed coroutine", function()
  local function killed_by(body, limit)
    local co = corowatch.watch(cw.create(body), limit or 0.05)
    local ok, err = cw.resume(co)
    return ok, err, co
  end

  it("cannot survive a pcall loop", function()
    local ok, err = killed_by(function() while true do pcall(spin) end end)
    assert.is_false(ok)
    assert.is_truthy(err:find(KILL))
  end)

  it("cannot survive an xpcall loop with an error handler", function()
    local ok, err = killed_by(function()
      while true do xpcall(spin, function(e) return e end) end
    end)
    assert.is_false(ok)
    assert.is_truthy(err:find(KILL))
  end)

  it("is killed in a busy table.sort comparator", function()
    local ok, err = killed_by(function()
      local t = {}
      for i = 1, 100 do t[i] = i end
      while true do
        pcall(table.sort, t, function(a, b) busy(1e3) return a > b end)
      end
    end)
    assert.is_false(ok)
    assert.is_truthy(err:find(KILL))
  end)

  it("is killed in a string.gsub callback", function()
    local ok, err = killed_by(function()
      while true do pcall(string.gsub, ("x"):rep(100), "x", function() busy(1e3) end) end
    end)
    assert.is_false(ok)
    assert.is_truthy(err:find(KILL))
  end)

  it("is dead, and resuming it answers false and the kill message", function()
    local _, err, co = killed_by(spin)
    assert.are.equal("dead", cw.status(co))
    assert.are.same({ false, err }, { cw.resume(co) })
  end)

  it("leaves the main state and other coroutines running normally", function()
    killed_by(spin)
    local other = cw.create(function(a) local b = cw.yield(a + 1) return b * 2 end)
    assert.are.same({ true, 2 }, { cw.resume(other, 1) })
    assert.are.same({ true, 10 }, { cw.resume(other, 5) })
    assert.are.equal(busy(1e5), busy(1e5))
  end)

  it("raises the kill in whichever coroutine it resumed, and dies too", function()
    local inner
    local outer = corowatch.watch(cw.create(function()
      inner = coroutine.create(spin) -- not watched: plain create
      local ok, err = cw.resume(inner)
      return "survived", ok, err
    end), 0.05)
    local ok, err = cw.resume(outer)
    assert.is_false(ok)
    assert.is_truthy(err:find(KILL))
    assert.are.equal("dead", cw.status(inner))
  end)
end)

describe("inheritance and nesting", function()
  it("gives a coroutine created in a watched one the same limits", function()
    local parent = corowatch.watch(cw.create(function()
      cw.yield(cw.create(spin), coroutine.create(spin))
    end), 0.05)
    local _, child, plain_child = cw.resume(parent)
    -- resumed from here, outside the parent: only the child's own watch counts
    local ok, err = cw.resume(child)
    assert.is_false(ok)
    assert.is_truthy(err:find(KILL .. "0.05 seconds"))
    -- created with the original coroutine.create: not watched
    local unwatched = coroutine.create(function() busy(1e5) return "done" end)
    assert.are.same({ true, "done" }, { cw.resume(unwatched) })
    assert.are.equal("suspended", cw.status(plain_child))
  end)

  it("lets an explicit watch replace an inherited one", function()
    local child_result
    local parent = corowatch.watch(cw.create(function()
      local child = corowatch.watch(cw.create(spin), 0.02)
      child_result = { cw.resume(child) }
      return "parent went on"
    end), 0.5)
    assert.are.same({ true, "parent went on" }, { cw.resume(parent) })
    assert.is_truthy(child_result[2]:find(KILL .. "0.02 seconds"))
  end)

  it("keeps each nested watch to its own limit", function()
    local log = {}
    local outer = corowatch.watch(cw.create(function()
      local inner = corowatch.watch(cw.create(spin), 0.03)
      local _, err = cw.resume(inner)
      log[#log + 1] = err:match("time of (%S+) seconds")
      spin()
    end), 0.2)
    local started = corowatch.gettime()
    local _, err = cw.resume(outer)
    local elapsed = corowatch.gettime() - started
    log[#log + 1] = err:match("time of (%S+) seconds")
    assert.are.same({ "0.03", "0.2" }, log)
    assert.is_true(elapsed >= 0.2 and elapsed < 1.2, "outer killed after " .. elapsed)
  end)

  -- The hook runs in the innermost coroutine and must hand the dispatcher
  -- the watched one, wherever it waits: resumed by this resume, resumed by
  -- one the chain did not see, or watching itself.
  describe("finds the watched coroutine below the running one", function()
    -- Spins for at most 3 s: a kill that goes astray fails, not hangs.
    local function spin_a_while()
      local deadline = corowatch.gettime() + 3
      while corowatch.gettime() < deadline do end
      return "escaped"
    end

    local function killed_outer(body, resume_outer)
      local calls = {}
      local outer = corowatch.watch(cw.create(body), 0.05, nil, function(event)
        calls[#calls + 1] = event
      end)
      local first = { (resume_outer or cw.resume)(outer) }
      local again = { cw.resume(outer) }
      return first, again, calls
    end

    local function assert_killed(first, again, calls)
      assert.is_false(first[1])
      assert.is_truthy(tostring(first[2]):find(KILL), tostring(first[2]))
      assert.are.same({ false, first[2] }, again)
      assert.are.same({ "kill" }, calls)
    end

    it("when this resume resumed it", function()
      assert_killed(killed_outer(function()
        return "survived", cw.resume(coroutine.create(spin_a_while))
      end))
    end)

    it("when it resumed the running one through the original resume", function()
      assert_killed(killed_outer(function()
        local helper = coroutine.create(function()
          return cw.resume(coroutine.create(spin_a_while))
        end)
        return "survived", coroutine.resume(helper)
      end))
    end)

    it("when it watched itself, resumed through the original resume", function()
      local calls = {}
      local outer = coroutine.create(function()
        corowatch.watch(nil, 0.05, nil, function(event) calls[#calls + 1] = event end)
        return "survived", cw.resume(coroutine.create(spin_a_while))
      end)
      local ok, err = coroutine.resume(outer)
      assert.is_false(ok)
      assert.is_truthy(tostring(err):find(KILL), tostring(err))
      assert.are.same({ "kill" }, calls)
      assert.are.same({ false, err }, { cw.resume(outer) })
    end)
  end)

  -- LuaJIT's hook is the VM's: past the deadline it polls every so many
  -- instructions in whatever runs. With a fixed count, the polls could
  -- fall into the same places of every round of the loop, all in the
  -- unseen helpers, and never in the few instructions of the watched one
  -- between two helpers (half the runs hung, in one process or another).
  it("keeps the watched coroutine's clock running while it resumes others, in every run", function()
    -- In fresh processes: where the polls fall depends on when the hook
    -- first went on.
    for run = 1, 10 do
      local output, ok = run_file(unseen_helpers_script(""), "timeout 5 ")
      assert.is_true(ok, ("run %d: %s"):format(run, output))
      assert.is_truthy(output:find("^false\t" .. KILL:sub(2)), output)
    end
  end)

  -- Resumed while nothing was watched, `mid` is not on the chain when a
  -- coroutine it resumed watches `outer`, which resumed it: once that one
  -- returns, `mid` runs for `outer`, and the kill lands in it.
  it("lands in the coroutine between a watched one and the one that watched it", function()
    local started
    local outer
    outer = cw.create(function()
      local mid = cw.create(function()
        assert(cw.resume(cw.create(function() corowatch.watch(outer, 0.05) end)))
        started = corowatch.gettime()
        while corowatch.gettime() - started < 2 do end
        return "mid survived"
      end)
      return "outer survived", cw.resume(mid)
    end)
    local ok, err = cw.resume(outer)
    local elapsed = corowatch.gettime() - started
    assert.is_false(ok, tostring(err))
    assert.is_truthy(tostring(err):find(KILL), tostring(err))
    assert.is_true(elapsed < 1, ("killed after %.3f s"):format(elapsed))
  end)

  -- The coroutine between went back to the watched one unseen (the
  -- original yield), and the watched one yielded in time: nothing runs
  -- for it any more, and the chain must not keep either of them.
  it("lets go of the coroutine between once the watched one stopped", function()
    local function run_for(seconds)
      local started = corowatch.gettime()
      while corowatch.gettime() - started < seconds do end
    end
    local outer, mid
    local calls = 0
    outer = cw.create(function()
      mid = coroutine.create(function()
        assert(cw.resume(cw.create(function()
          corowatch.watch(outer, 0.1, nil, function() calls = calls + 1 end)
        end)))
        coroutine.yield("mid yields unseen")
        run_for(0.05)
        return "mid done"
      end)
      assert(coroutine.resume(mid))
      cw.yield("outer yields in time")
      return "outer done"
    end)
    assert.are.same({ true, "outer yields in time" }, { cw.resume(outer) })
    run_for(0.2) -- past outer's limit, while it does not run
    assert.are.same({ true, "mid done" }, { coroutine.resume(mid) })
    -- A watch of a running thread the chain does not know starts its clock.
    local late = coroutine.create(function()
      corowatch.watch(nil, 0.05)
      run_for(1)
      return "survived"
    end)
    local ok, err = coroutine.resume(late)
    assert.is_false(ok, tostring(err))
    assert.is_truthy(tostring(err):find(KILL), tostring(err))
    assert.are.same({ true, "outer done" }, { cw.resume(outer) })
    assert.are.equal(0, calls)
  end)

  it("cannot be undone by watching the killed coroutine again", function()
    local refusals = {}
    local co
    -- Created by a watched coroutine, `co` inherits its watch: an explicit
    -- one may be set over it.
    assert(cw.resume(corowatch.watch(cw.create(function()
      co = cw.create(function()
        xpcall(function() while true do end end, function(e)
          local ok, err = pcall(corowatch.watch, nil, 100)
          refusals[#refusals + 1] = ok and "accepted" or err
          return e
        end)
        cw.yield("survived its kill")
        return "finished"
      end)
    end), 0.05)))
    local ok, err = cw.resume(co)
    assert.is_false(ok, tostring(err))
    assert.is_truthy(tostring(err):find(KILL), tostring(err))
    -- Where the message handler ran at all (it runs with the hook off on
    -- PUC Lua), the watch was refused.
    for _, refusal in ipairs(refusals) do
      assert.is_truthy(tostring(refusal):find("this coroutine was killed", 1, true), tostring(refusal))
    end
    assert.are.same({ false, err }, { cw.resume(co) })
    assert.are.equal("dead", cw.status(co))
  end)

end)

-- The patched resume keeps the watch it found for the coroutine it resumed
-- last, until a watch is set or a thread is freed (src/resume.rs). Each
-- spec here fails if one of the two does not make it look again.
describe("the watch a resume remembers", function()
  it("is looked up again once the coroutine is watched", function()
    local output, ok = run_file([[
      if jit then jit.off() end
      local corowatch = require("corowatch")
      local cw = corowatch.export()
      local co = cw.create(function()
        cw.yield()
        while true do end
      end)
      assert(cw.resume(co)) -- remembered: not watched
      corowatch.watch(co, 0.05)
      print(cw.resume(co))
    ]], "timeout 20 ")
    assert.is_true(ok, output)
    assert.is_truthy(output:find("^false\t" .. KILL:sub(2) .. "0.05 seconds"), output)
  end)

  it("is looked up again when a hook resumes the coroutine inside watch", function()
    -- A count hook resumes the coroutine at every instruction of
    -- corowatch's own code, so also between the epoch's move and the
    -- write of the watch, if Lua code could run there.
    local output, ok = run_file([[
      if jit then jit.off() end
      local corowatch = require("corowatch")
      corowatch.export(_G)
      local go = false
      local co = coroutine.create(function()
        while not go do coroutine.yield() end
        while true do end
      end)
      assert(coroutine.resume(co))
      debug.sethook(function()
        local info = debug.getinfo(2, "S")
        if info and info.source:find("corowatch.lua", 1, true) then
          assert(coroutine.resume(co))
        end
      end, "", 1)
      coroutine.watch(co, 0.05)
      debug.sethook()
      go = true
      print(coroutine.resume(co))
    ]], "timeout 20 ")
    assert.is_true(ok, output)
    assert.is_truthy(output:find("^false\t" .. KILL:sub(2) .. "0.05 seconds"), output)
  end)

  it("is not another coroutine's that had the same address", function()
    -- A watched coroutine is remembered, dies and is freed; one of the
    -- coroutines created after it often gets its address (the allocator
    -- reuses the block). That one is not watched, and runs past the first
    -- one's limit.
    local function runs_long()
      local started = corowatch.gettime()
      while corowatch.gettime() - started < 0.04 do end
      return "ran"
    end
    local reused = 0
    for _ = 1, 10 do
      local watched = corowatch.watch(cw.create(function() cw.yield() end), 0.02)
      assert.is_true(cw.resume(watched))
      assert.is_true(cw.resume(watched)) -- returns: dead, and remembered
      local address = tostring(watched)
      watched = nil -- luacheck: ignore 311
      collectgarbage()
      collectgarbage()
      local plain = {}
      for i = 1, 8 do plain[i] = cw.create(runs_long) end
      for i = 1, 8 do
        if tostring(plain[i]) == address then
          reused = reused + 1
          assert.are.same({ true, "ran" }, { cw.resume(plain[i]) })
        end
      end
    end
    -- LuaJIT's own allocator hands the block out later; nothing is
    -- remembered there anyway (its allocator cannot be wrapped).
    if not jit then
      assert.is_true(reused > 0, "no address was reused: the spec proved nothing")
    end
  end)
end)

-- Our hook put on a coroutine of the chain comes off (the user's hook
-- back) when the coroutine leaves the chain, whoever put it there.
describe("a coroutine that leaves the chain with our hook on", function()
  it("leaves no trace for the next coroutine at its address", function()
    -- A's warn deadline (1 ns) has passed when it resumes B, whose body is
    -- a C function (5.2+): B runs no Lua instruction, so our hook, put on
    -- B at that resume, never fires there to take itself off. A user's
    -- hook on the next coroutine at B's address must work.
    local output, ok = run_file([[
      if jit then jit.off() end
      local corowatch = require("corowatch")
      corowatch.export(_G)
      local calls = 0
      local function count() calls = calls + 1 end
      local body = coroutine.resume
      if _VERSION == "Lua 5.1" and not jit then
        body = function(co) return coroutine.resume(co) end -- 5.1: Lua bodies only
      end
      local lost, reused = 0, 0
      for _ = 1, 200 do
        local c = coroutine.create(function() return 1 end)
        local b = coroutine.create(body)
        local a = coroutine.create(function() assert(coroutine.resume(b, c)) end)
        coroutine.watch(a, 10, 1e-9, function() end)
        assert(coroutine.resume(a))
        local address = tostring(b)
        a, b, c = nil, nil, nil
        collectgarbage()
        collectgarbage()
        local keep = {}
        for i = 1, 50 do
          local x = coroutine.create(function() local y = 1 return y end)
          keep[i] = x
          if tostring(x) == address then
            reused = reused + 1
            debug.sethook(x, count, "c")
            calls = 0
            coroutine.resume(x)
            if calls == 0 then lost = lost + 1 end
            break
          end
        end
      end
      print("reused", reused, "lost", lost)
    ]], "timeout 60 ")
    assert.is_true(ok, output)
    local reused, lost = output:match("reused%s+(%d+)%s+lost%s+(%d+)")
    assert.are.equal("0", lost, output)
    if not jit then assert.is_true(tonumber(reused) > 0, output) end
  end)
end)

describe("watch arguments", function()
  local function fails(pattern, ...)
    local ok, err = pcall(corowatch.watch, ...)
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find(pattern), err)
  end

  it("refuses a second explicit watch", function()
    local co = corowatch.watch(cw.create(busy), 1)
    fails("already watched", co, 2)
  end)

  it("needs a limit", function() fails("limit", cw.create(busy)) end)

  it("needs a callback with a warn limit", function()
    fails("callback", cw.create(busy), 1, 0.5)
  end)

  it("needs the warn limit below the kill limit", function()
    fails("below", cw.create(busy), 1, 1, print)
    fails("below", cw.create(busy), 1, 2, print)
  end)

  it("rejects limits that are not positive numbers", function()
    for _, bad in ipairs({ "1", {}, true, -1, 0, 0/0, 1/0 }) do
      fails("bad argument #2", cw.create(busy), bad)
      fails("bad argument #3", cw.create(busy), 2, bad, print)
    end
  end)

  it("takes a tiny limit as a tiny limit, running or not", function()
    for _, tiny in ipairs({ 1e-10, 1e-300, 5e-324 }) do
      local wanted = "running time of " .. tostring(tiny) .. " seconds"
      local co = corowatch.watch(cw.create(spin), tiny)
      local ok, err = cw.resume(co)
      assert.is_false(ok)
      assert.is_truthy(err:find(wanted, 1, true), err)
      co = cw.create(function() corowatch.watch(nil, tiny) spin() end)
      ok, err = cw.resume(co)
      assert.is_false(ok)
      assert.is_truthy(err:find(wanted, 1, true), err)
    end
  end)

  it("takes a huge limit as never, running or not", function()
    for _, huge in ipairs({ 2^32, 2^53, 1e300 }) do
      local co = corowatch.watch(cw.create(function()
        busy(1e5)
        cw.yield("yielded")
        return "done"
      end), huge)
      assert.are.same({ true, "yielded" }, { cw.resume(co) })
      assert.are.same({ true, "done" }, { cw.resume(co) })
      co = cw.create(function() corowatch.watch(nil, huge) busy(1e5) return "done" end)
      assert.are.same({ true, "done" }, { cw.resume(co) })
      -- a huge kill limit with a warn limit: warned, never killed
      local warned = false
      co = corowatch.watch(cw.create(function()
        while not warned do end
        local started = corowatch.gettime()
        while corowatch.gettime() - started < 0.1 do end
        return "survived"
      end), huge, 0.02, function(kind) if kind == "warn" then warned = true end end)
      assert.are.same({ true, "survived" }, { cw.resume(co) })
    end
  end)

  it("leaves the coroutine watchable after a rejected watch", function()
    local co = cw.create(spin)
    local rejected = {
      { -1 }, { "x" }, { 0/0 }, { 1/0 }, { 1, 2, print }, { 1, 0.5 }, { 1, nil, 1 },
      { 1, nil, nil, 0/0 }, {},
    }
    for _, args in ipairs(rejected) do
      assert.is_false((pcall(corowatch.watch, co, unpack(args, 1, 4))))
    end
    assert.are.equal(co, corowatch.watch(co, 0.05))
    local ok, err = cw.resume(co)
    assert.is_false(ok)
    assert.is_truthy(err:find(KILL .. "0.05 seconds"), err)
  end)

  it("rejects a callback that is not a function", function()
    fails("bad argument #4", cw.create(busy), 1, nil, "print")
  end)

  it("rejects a hookcount below 1, or NaN", function()
    fails("bad argument #5", cw.create(busy), 1, nil, nil, 0)
    fails("bad argument #5", cw.create(busy), 1, nil, nil, "x")
    fails("bad argument #5", cw.create(busy), 1, nil, nil, 0/0)
  end)

  it("points its errors at the caller's line, for watch and wrapf", function()
    local function here()
      local info = debug.getinfo(2, "Sl")
      return info.short_src .. ":" .. info.currentline .. ": "
    end
    local cases = {
      { "bad argument #1 to 'watch'", print, 1 },
      { "bad argument #2 to 'watch'", nil, -1 },
      { "bad argument #3 to 'watch'", nil, 1, "x" },
      { "bad argument #4 to 'watch'", nil, 1, nil, 1 },
      { "bad argument #5 to 'watch'", nil, 1, nil, nil, 0 },
      { "corowatch.watch: a kill limit or a warn limit is required" },
      { "corowatch.watch: a warn limit needs a callback", nil, 2, 1 },
      { "corowatch.watch: the warn limit must be below the kill limit", nil, 1, 2, print },
    }
    for _, case in ipairs(cases) do
      local co = case[2] or cw.create(busy)
      local at, _, err = here(), pcall(function() corowatch.watch(co, unpack(case, 3, 6)) end)
      assert.are.equal(at .. case[1], err:sub(1, #at + #case[1]))
      if case[2] == nil then
        local expected = case[1]:gsub("'watch'", "'wrapf'"):gsub("^corowatch%.watch", "corowatch.wrapf")
        at, _, err = here(), pcall(function() cw.wrapf(busy, unpack(case, 3, 6)) end)
        assert.are.equal(at .. expected, err:sub(1, #at + #expected))
      end
    end
    local co = corowatch.watch(cw.create(busy), 1)
    local at, _, err = here(), pcall(function() corowatch.watch(co, 1) end)
    assert.are.equal(at .. "corowatch.watch: this coroutine is already watched", err)
  end)

  it("rejects a co that is not a coroutine", function()
    fails("bad argument #1", print, 1)
    fails("bad argument #1", {}, 1)
  end)
end)

describe("the patched create, wrap and status", function()
  -- Each original and its patched twin called from the same line, by the
  -- same field name: the errors must be the same, position included.
  local function call_create(lib, x) local r = lib.create(x) return r end
  local function call_wrap(lib, x) local r = lib.wrap(x) return r end
  local function call_status(lib, x) local r = lib.status(x) return r end

  it("raise the original's argument errors, under the original's name", function()
    for _, call in ipairs({ call_create, call_wrap, call_status }) do
      for _, bad in ipairs({ 42, "x", {}, print, cw.create(busy) }) do
        local expected = { pcall(call, coroutine, bad) }
        local got = { pcall(call, cw, bad) }
        if expected[1] then
          assert.is_true(got[1])
        else
          assert.are.same(expected, got)
        end
      end
    end
  end)

  it("wrapf names itself in its argument errors", function()
    local function here()
      local info = debug.getinfo(2, "Sl")
      return info.short_src .. ":" .. info.currentline .. ": "
    end
    local at, _, err = here(), pcall(function() cw.wrapf(42, 1) end)
    local prefix = at .. "bad argument #1 to 'wrapf' ("
    assert.are.equal(prefix, err:sub(1, #prefix))
  end)
end)

describe("wrap and wrapf", function()
  it("wrap returns values without the status flag", function()
    local f = cw.wrap(function(a) local b = cw.yield(a + 1) return b, "end" end)
    assert.are.equal(2, f(1))
    assert.are.same({ 7, "end" }, { f(7) })
  end)

  it("wrap raises errors in the caller", function()
    local f = cw.wrap(function() error("boom", 0) end)
    assert.are.same({ false, "boom" }, { pcall(f) })
  end)

  it("wrapf watches the wrapped function and raises the kill in the caller", function()
    local f = cw.wrapf(spin, 0.05)
    local ok, err = pcall(f)
    assert.is_false(ok)
    assert.is_truthy(err:find(KILL))
  end)

  it("wrapf passes values through like wrap", function()
    local f = cw.wrapf(function(a) return a * 2 end, 1)
    assert.are.equal(6, f(3))
  end)

  -- Calls a wrapped function from Lua (not as a tail call), so that a
  -- position can be added: the original's and the patched one's errors
  -- come from this same line.
  local function from_lua(f, ...) local results = { f(...) } return unpack(results) end
  local function call(f, ...) return { pcall(from_lua, f, ...) } end
  local function call_twice(wrap, body, ...)
    local f = wrap(body)
    return { call(f, ...), call(f, ...) }
  end

  it("raises errors as coroutine.wrap does, position prefix included", function()
    local bodies = {
      function() error("boom") end,
      function() error("boom", 0) end,
      function() error("boom", 2) end,
      function() error(42) end,
      function() error() end,
      function() local x = nil; return x.field end,
      function() cw.yield(1); error("after a yield") end,
    }
    for i, body in ipairs(bodies) do
      local original = call_twice(coroutine.wrap, body)
      local patched = call_twice(cw.wrap, body)
      assert.are.same(original, patched, "body " .. i)
    end
    local table_error = {}
    local function raises_table() error(table_error) end
    assert.are.same({ false, table_error }, call(cw.wrap(raises_table)))
    assert.are.equal(table_error, call(cw.wrap(raises_table))[2])
  end)

  it("positions the error of a tail-called wrapped function at the caller's caller", function()
    local f = cw.wrap(function() error("boom", 0) end)
    local function tail() return f() end
    local line
    local function outer()
      line = debug.getinfo(1, "l").currentline + 1
      local r = tail()
      return r
    end
    local _, err = pcall(outer)
    assert.are.equal(debug.getinfo(1, "S").short_src .. ":" .. line .. ": boom", err)
  end)

  it("raises a kill as the kill message itself, however it is called", function()
    local f = cw.wrapf(spin, 0.05)
    local first, again = call(f), call(f)
    assert.is_false(first[1])
    assert.is_truthy(first[2]:find(KILL), first[2])
    assert.are.same(first, again)
  end)

  -- Lua 5.4's coroutine.wrap closes a coroutine that raised an error: its
  -- to-be-closed variables run, and an error of theirs replaces the first.
  -- `load` keeps the 5.4 syntax out of this file for the other versions.
  local load_string = loadstring or load
  local closing = load_string([[
    local log, yield, fail_in_close = ...
    local closer = setmetatable({}, { __close = function(_, err)
      log[#log + 1] = "closed after " .. tostring(err)
      if fail_in_close then error("close failed", 0) end
    end })
    local x <close> = closer
    yield("yielded")
    error("boom", 0)
  ]])
  local describe_54, title = describe, "on Lua 5.4"
  if not closing then
    describe_54, title = pending, "on Lua 5.4 (not here: no to-be-closed variables)"
  end

  describe_54(title, function()
    it("closes a coroutine that raised an error, as coroutine.wrap does", function()
      for _, fail_in_close in ipairs({ false, true }) do
        local results = {}
        for _, wrap in ipairs({ coroutine.wrap, cw.wrap }) do
          local log = {}
          local f = wrap(closing)
          local first = call(f, log, cw.yield, fail_in_close)
          local second = call(f)
          results[#results + 1] = { log, first, second, call(f) }
        end
        assert.are.same({ "closed after boom" }, results[2][1])
        assert.are.same(results[1], results[2])
      end
    end)

    it("closes a killed coroutine, and still raises the kill", function()
      local log = {}
      local f = cw.wrapf(function()
        local closer = load_string([[
          local log = ...
          return setmetatable({}, { __close = function() log[#log + 1] = "closed" end })
        ]])(log)
        return load_string([[
          local closer, spin = ...
          local x <close> = closer
          spin()
        ]])(closer, spin)
      end, 0.05)
      local result = call(f)
      assert.is_false(result[1])
      assert.is_truthy(result[2]:find(KILL), result[2])
      assert.are.same({ "closed" }, log)
    end)
  end)
end)

describe("gettime", function()
  it("is a monotonic clock in seconds with sub-millisecond resolution", function()
    -- The smallest step seen in ten tries: one try may be preempted.
    local step = math.huge
    for _ = 1, 10 do
      local t0 = corowatch.gettime()
      local t1 = t0
      while t1 == t0 do t1 = corowatch.gettime() end
      assert.is_true(t1 > t0)
      step = math.min(step, t1 - t0)
    end
    assert.is_true(step < 1e-3, step)
  end)
end)

describe("debug hooks beside a watch", function()
  it("runs the user's hook with its own mask and count, and the watch still kills", function()
    local calls = 0
    local env = corowatch.export({ coroutine = {}, debug = {} }) -- the patched sethook/gethook
    local co = corowatch.watch(cw.create(function()
      env.debug.sethook(function() calls = calls + 1 end, "", 1000)
      spin()
    end), 0.05)
    local ok, err = cw.resume(co)
    assert.is_false(ok)
    assert.is_truthy(err:find(KILL))
    assert.is_true(calls > 10)
  end)

  it("keeps the watch whatever the coroutine does with debug.sethook", function()
    local env = corowatch.export({ coroutine = {}, debug = {} })
    local co = corowatch.watch(cw.create(function()
      env.debug.sethook()
      while true do
        pcall(spin)
        env.debug.sethook(function() end, "l")
        env.debug.sethook()
      end
    end), 0.05)
    local ok, err = cw.resume(co)
    assert.is_false(ok)
    assert.is_truthy(err:find(KILL))
  end)

  it("shows the user's hook through debug.gethook, even while the watch's hook is on", function()
    local env = corowatch.export({ coroutine = {}, debug = {} })
    local seen = {}
    local function hook() end
    local co = corowatch.watch(cw.create(function()
      env.debug.sethook(hook, "", 500)
      seen.before = { env.debug.gethook() }
      while not seen.during do pcall(busy) end
      env.debug.sethook()
    end), 10, 0.02, function(kind)
      if kind == "warn" then seen.during = { env.debug.gethook() } end
    end)
    assert.is_true((cw.resume(co)))
    assert.are.same({ hook, "", 500 }, seen.before)
    assert.are.same({ hook, "", 500 }, seen.during)
  end)
end)

describe("the patched resume", function()
  -- Runs `scenario(create, resume, yield, status)` with the original
  -- functions and with the patched ones, which must give the same answers.
  local function same_as_original(scenario)
    local original = { scenario(coroutine.create, coroutine.resume, coroutine.yield,
      coroutine.status) }
    local patched = { scenario(cw.create, cw.resume, cw.yield, cw.status) }
    assert.are.same(original, patched)
    return patched[1]
  end

  it("passes arguments and results both ways, many of them", function()
    local got = same_as_original(function(create, resume, yield)
      local co = create(function(...)
        local sum = select("#", ...)
        while true do sum = sum + select("#", yield(sum, ...)) end
      end)
      local answers = {}
      local args = {}
      for i = 1, 200 do args[i] = i end
      for round = 1, 3 do
        answers[round] = { resume(co, unpack(args, 1, round * 60)) }
      end
      return answers
    end)
    -- 60 + 120 + 180 arguments counted; 60 values passed back each time.
    assert.are.equal(360, got[3][2])
    assert.are.equal(62, #got[3])
  end)

  it("gives the original's answers for dead, running and normal coroutines", function()
    local got = same_as_original(function(create, resume, yield, status)
      local answers = {}
      local finished = create(function() return "done" end)
      answers.first = { resume(finished) }
      answers.dead = { resume(finished) }
      answers.dead_status = status(finished)
      local outer
      outer = create(function()
        answers.running = { resume(outer) }
        local inner = create(function() return resume(outer) end)
        answers.normal = { resume(inner) }
        yield()
      end)
      answers.outer = { resume(outer) }
      local failing = create(function() error("boom", 0) end)
      answers.error = { resume(failing) }
      answers.after_error = { resume(failing) }
      answers.error_status = status(failing)
      local table_error = create(function() error({ code = 7 }) end)
      local ok, err = resume(table_error)
      answers.table_error = { ok, err.code }
      return answers
    end)
    assert.are.same({ false, "cannot resume dead coroutine" }, got.dead)
    assert.are.same({ false, "boom" }, got.error)
  end)

  it("raises the original's error for what is not a coroutine", function()
    local function message(resume, ...)
      local ok, err = pcall(resume, ...)
      assert.is_false(ok)
      return (err:gsub("'[%w_.]*resume'", "'resume'"))
    end
    assert.are.equal(message(coroutine.resume, 42), message(cw.resume, 42))
    assert.are.equal(message(coroutine.resume), message(cw.resume))
  end)

  it("resumes coroutines nested in watched ones, yielding across levels", function()
    local trace = {}
    local outer = corowatch.watch(cw.create(function()
      local inner = cw.create(function(a)
        local b = cw.yield(a + 1)
        return b * 2
      end)
      trace[#trace + 1] = select(2, cw.resume(inner, 1))
      local x = cw.yield("outer paused")
      trace[#trace + 1] = select(2, cw.resume(inner, x))
      trace[#trace + 1] = cw.status(inner)
      return "outer done"
    end), 10)
    assert.are.same({ true, "outer paused" }, { cw.resume(outer) })
    assert.are.same({ true, "outer done" }, { cw.resume(outer, 21) })
    assert.are.same({ 2, 42, "dead" }, trace)
  end)
end)

describe("the user's hook beside a watch", function()
  -- The same loop with the user's count hook, with and without a watch.
  local function count_calls(resume, create, sethook)
    local calls = 0
    local co = create(function()
      sethook(function() calls = calls + 1 end, "", 100)
      busy(1e5)
      sethook()
    end)
    assert(resume(co))
    return calls
  end

  it("fires at the user's count, as it does without a watch", function()
    local plain = count_calls(coroutine.resume, coroutine.create, debug.sethook)
    local env = corowatch.export({ coroutine = {}, debug = {} })
    local watched = count_calls(cw.resume, function(f)
      return corowatch.watch(cw.create(f), 10)
    end, env.debug.sethook)
    assert.is_true(plain > 1000, plain)
    assert.is_true(math.abs(watched - plain) <= plain * 0.05, watched .. " vs " .. plain)
  end)

  -- LuaJIT chains the user's hook through ours, whose count is at most
  -- 1000: a user's count above it must not lose its remainder.
  it("fires at the user's count above the hook's own, as it does without a watch", function()
    local env = corowatch.export({ coroutine = {}, debug = {} })
    for _, count in ipairs({ 1001, 1500, 2500 }) do
      local function calls_with(sethook)
        local calls = 0
        sethook(function() calls = calls + 1 end, "", count)
        busy(3e5)
        sethook()
        return calls
      end
      local plain = calls_with(debug.sethook)
      local chained = calls_with(env.debug.sethook)
      assert.is_true(math.abs(chained - plain) <= plain * 0.05 + 1,
        ("count %d: %d calls, %d without corowatch"):format(count, chained, plain))
    end
  end)

  -- The body of "keeps the watched coroutine's clock running while it
  -- resumes others, in every run", with a user's count hook chained:
  -- LuaJIT's hook then polled at the user's count, the same places of
  -- every round again.
  it("lets the kill reach a watched coroutine between unseen ones at any count", function()
    for _, count in ipairs({ 100, 500, 1000, 1001, 2000 }) do
      local setup = ('corowatch.sethook(function() end, "", %d)'):format(count)
      local output, ok = run_file(unseen_helpers_script(setup), "timeout 5 ")
      assert.is_true(ok, ("count %d: %s"):format(count, output))
      assert.is_truthy(output:find("^false\t" .. KILL:sub(2)), output)
    end
  end)

  it("gets only the events it asked for, and a call-free loop is still killed", function()
    local env = corowatch.export({ coroutine = {}, debug = {} })
    local events = {}
    local co = corowatch.watch(cw.create(function()
      env.debug.sethook(function(event) events[event] = true end, "c")
      spin()
    end), 0.05)
    local ok, err = cw.resume(co)
    env.debug.sethook()
    assert.is_false(ok)
    assert.is_truthy(err:find(KILL))
    assert.is_true(events.call)
    assert.are.same({ "call" }, (function()
      local names = {}
      for name in pairs(events) do names[#names + 1] = name end
      return names
    end)())
  end)
end)

describe("debug hooks beside a watch, again and again", function()
  -- On LuaJIT, arming the hook from the watchdog thread while the user's
  -- hook runs could leave every hook disabled for good, and the kill never
  -- landed (a few rounds in a hundred). Run in a child process: a lost
  -- kill shows as a timeout instead of hanging the suite.
  it("kills in every round while the user's count hook fires", function()
    local output, ok = run_file([[
      if jit then jit.off() end
      local corowatch = require("corowatch")
      corowatch.export(_G)
      local function spin() local x = 0 while true do x = x + 1 end end
      local fired = 0
      for _ = 1, 150 do
        local calls = 0
        local co = coroutine.watch(coroutine.create(function()
          debug.sethook(function() calls = calls + 1 end, "", 500)
          while true do pcall(spin) end
        end), 0.004)
        local ok, err = coroutine.resume(co)
        assert(not ok and err:find("^Coroutine exceeded"), err)
        debug.sethook()
        if calls > 0 then fired = fired + 1 end
      end
      print("kills landed, the hook fired in " .. fired .. " rounds")
    ]], "timeout 60 ")
    assert.is_true(ok, output)
    -- A round can end before the first 500 instructions if the machine
    -- stops this process for 4 ms: allow a few such rounds.
    local fired = tonumber(output:match("kills landed, the hook fired in (%d+) rounds"))
    assert.is_true(fired and fired >= 135, output)
  end)
end)

describe("corowatch.export", function()
  it("puts the coroutine functions in a plain table and returns it", function()
    local t = {}
    assert.are.equal(t, corowatch.export(t))
    for _, name in ipairs({ "create", "resume", "yield", "status", "wrap", "running",
        "watch", "wrapf", "gettime" }) do
      assert.is_function(t[name], name)
    end
    assert.is_nil(t.corowatch)
  end)

  it("patches a global environment and publishes the module", function()
    local env = { coroutine = {}, debug = {} }
    corowatch.export(env)
    assert.are.equal(corowatch.resume, env.coroutine.resume)
    assert.are.equal(corowatch.watch, env.coroutine.watch)
    assert.are.equal(corowatch.sethook, env.debug.sethook)
    assert.are.equal(corowatch, env.corowatch)
  end)

  it("returns a new table when given nothing", function()
    assert.is_table(corowatch.export())
  end)

  it("rejects what is not a table", function()
    assert.is_false((pcall(corowatch.export, "x")))
  end)
end)

describe("the seed's example", function()
  it("prints four warnings, the kill line, false and the message", function()
    local handle = assert(io.open("examples/corowatch_seed.lua"))
    local output = run_file(handle:read("*a"))
    handle:close()
    local lines = {}
    for line in output:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.are.same({
      "Warning, coroutine might get killed....1",
      "Warning, coroutine might get killed....2",
      "Warning, coroutine might get killed....3",
      "Warning, coroutine might get killed....4",
      "now killing coroutine...",
      "false\tCoroutine exceeded its allowed running time of 1 seconds, without yielding",
      "stack traceback:",
    }, { unpack(lines, 1, 7) })
  end)
end)

describe("watching the main thread", function()
  it("kills a runaway main chunk, and the error reaches the host", function()
    local output, ok = run_file([[
      if jit then jit.off() end
      require("corowatch").export(_G)
      corowatch.watch(nil, 0.1)
      while true do pcall(function() local x = 0 while true do x = x + 1 end end) end
    ]])
    assert.is_false(ok)
    assert.is_truthy(output:find("Coroutine exceeded its allowed running time of 0.1 seconds"), output)
  end)
end)
