-- mtint on one OS thread: ids, error names, interrupts, handlers,
-- interruptible objects, ids after collection, bad arguments.
local mtint = require("mtint")

if jit then jit.off() end

local function busy(n)
  local x = 0
  for i = 1, n or 1e4 do x = x + i end
  return x
end

describe("mtint.id", function()
  it("gives the running thread a stable id", function()
    assert.are.equal(mtint.id(), mtint.id())
  end)

  it("gives each coroutine its own id, stable for its life", function()
    local a, b = coroutine.create(busy), coroutine.create(busy)
    assert.are_not.equal(mtint.id(a), mtint.id(b))
    assert.are.equal(mtint.id(a), mtint.id(a))
    assert.are_not.equal(mtint.id(a), mtint.id())
  end)

  it("returns the same id inside and outside a coroutine", function()
    local co = coroutine.create(function() coroutine.yield(mtint.id()) end)
    local _, inner = coroutine.resume(co)
    assert.are.equal(mtint.id(co), inner)
  end)

  it("never reuses an id, even after collection", function()
    local seen = {}
    for _ = 1, 200 do
      local id = mtint.id(coroutine.create(busy))
      assert.is_nil(seen[id])
      seen[id] = true
      collectgarbage()
    end
  end)

  it("is a large integer that prints exactly", function()
    local id = mtint.id(coroutine.create(busy))
    assert.is_true(id > 2^40)
    assert.are.equal(id, math.floor(id))
    assert.are.equal(id, tonumber(tostring(id)))
  end)
end)

describe("mtint.error", function()
  it("holds the names of the errors as their own values", function()
    assert.are.equal("mtint.error.interrupted", mtint.error.interrupted)
    assert.are.equal("mtint.error.not_supported", mtint.error.not_supported)
    assert.are.equal("mtint.error.unknown_object", mtint.error.unknown_object)
  end)

  it("has interrupt as an alias of interrupted", function()
    assert.are.equal(mtint.error.interrupted, mtint.error.interrupt)
  end)

  it("comes with version information", function()
    assert.is_string(mtint._VERSION)
    assert.is_string(mtint._INFO)
  end)
end)

describe("mtint.interrupt", function()
  it("raises mtint.error.interrupted in the interrupted coroutine", function()
    local co = coroutine.create(function()
      mtint.interrupt(mtint.id())
      return "not reached"
    end)
    local ok, err = coroutine.resume(co)
    assert.is_false(ok)
    assert.is_string(err)
    assert.is_truthy(err:find("^mtint%.error%.interrupted"))
    assert.are.equal("dead", coroutine.status(co))
  end)

  it("interrupts once when no flag is given", function()
    local co = coroutine.create(function()
      local first, err = pcall(function() mtint.interrupt(mtint.id()); busy() end)
      local second = pcall(busy, 1e5)
      return first, err, second
    end)
    local ok, first, err, second = coroutine.resume(co)
    assert.is_true(ok)
    assert.is_false(first)
    assert.is_truthy(err:match(mtint.error.interrupted))
    assert.is_true(second)
  end)

  it("keeps interrupting with flag true, so pcall cannot swallow it", function()
    local rounds = 0
    local co = coroutine.create(function()
      while true do
        rounds = rounds + 1
        pcall(function() mtint.interrupt(mtint.id(), true) end)
      end
    end)
    local ok, err = coroutine.resume(co)
    assert.is_false(ok)
    assert.is_truthy(err:match(mtint.error.interrupted))
    assert.are.equal(1, rounds)
  end)

  it("clears a sticky interrupt with flag false", function()
    local co = coroutine.create(function()
      local id = mtint.id()
      mtint.interrupt(id, true)
      -- only reached if the interrupt did not fire: impossible, see below
      return "escaped"
    end)
    local id = mtint.id(co)
    mtint.interrupt(id, true)
    mtint.interrupt(id, false)
    -- the sticky interrupt set from outside was cleared before the resume;
    -- the one the coroutine sets itself still fires
    local ok, err = coroutine.resume(co)
    assert.is_false(ok)
    assert.is_truthy(err:match(mtint.error.interrupted))

    local plain = coroutine.create(function() return busy(1e5) end)
    mtint.interrupt(mtint.id(plain), true)
    mtint.interrupt(mtint.id(plain), false)
    assert.are.same({ true, busy(1e5) }, { coroutine.resume(plain) })
  end)

  it("delivers to a suspended coroutine when it is resumed", function()
    local co = coroutine.create(function()
      coroutine.yield("first")
      busy()
      return "finished"
    end)
    assert.are.same({ true, "first" }, { coroutine.resume(co) })
    assert.is_true(mtint.interrupt(mtint.id(co)))
    local ok, err = coroutine.resume(co)
    assert.is_false(ok)
    assert.is_truthy(err:match(mtint.error.interrupted))
  end)

  it("does not touch other coroutines", function()
    local victim = coroutine.create(function() coroutine.yield() busy() end)
    coroutine.resume(victim)
    mtint.interrupt(mtint.id(victim))
    for _ = 1, 3 do
      local other = coroutine.create(function() return busy(1e4) end)
      assert.are.same({ true, busy(1e4) }, { coroutine.resume(other) })
    end
    assert.is_false((coroutine.resume(victim)))
  end)

  it("raises mtint.error.unknown_object for an id never given out", function()
    local ok, err = pcall(mtint.interrupt, 1)
    assert.is_false(ok)
    assert.is_truthy(err:find("^mtint%.error%.unknown_object"))
    assert.is_truthy(err:find("1", 1, true))
  end)

  it("leaves a user debug hook in place after delivering", function()
    -- On LuaJIT hooks are global: collect earlier tests' coroutines, whose
    -- pending interrupts would keep the VM's hook polling for them.
    collectgarbage(); collectgarbage()
    local co = coroutine.create(function()
      local calls = 0
      debug.sethook(function() calls = calls + 1 end, "", 100)
      pcall(function() mtint.interrupt(mtint.id()); busy() end)
      local hook, mask, count = debug.gethook()
      busy(1e4)
      debug.sethook()
      return hook ~= nil, mask, count, calls > 0
    end)
    local ok, has_hook, mask, count, called = coroutine.resume(co)
    assert.is_true(ok)
    assert.is_true(has_hook)
    assert.are.equal("", mask)
    assert.are.equal(100, count)
    assert.is_true(called)
  end)
end)

describe("mtint.sethook", function()
  it("calls the handler on the interrupted thread instead of raising", function()
    local where
    local co = coroutine.create(function()
      mtint.sethook(function() where = coroutine.running() end)
      mtint.interrupt(mtint.id())
      return "went on"
    end)
    assert.are.same({ true, "went on" }, { coroutine.resume(co) })
    assert.are.equal(co, where)
  end)

  it("sets the handler of another coroutine", function()
    local calls = 0
    local co = coroutine.create(function() coroutine.yield() return busy() end)
    coroutine.resume(co)
    mtint.sethook(co, function() calls = calls + 1 end)
    mtint.interrupt(mtint.id(co))
    assert.are.same({ true, busy() }, { coroutine.resume(co) })
    assert.are.equal(1, calls)
  end)

  it("calls the handler at every operation while sticky, until cleared", function()
    local calls = 0
    local co = coroutine.create(function()
      mtint.sethook(function()
        calls = calls + 1
        if calls == 5 then mtint.interrupt(mtint.id(), false) end
      end)
      mtint.interrupt(mtint.id(), true)
      return busy(1e4)
    end)
    assert.are.same({ true, busy(1e4) }, { coroutine.resume(co) })
    assert.are.equal(5, calls)
  end)

  it("propagates an error raised by the handler", function()
    local co = coroutine.create(function()
      mtint.sethook(function() error("stop here", 0) end)
      mtint.interrupt(mtint.id())
      return "not reached"
    end)
    assert.are.same({ false, "stop here" }, { coroutine.resume(co) })
  end)

  it("calls a handler set after the interrupt, in a state that had none", function()
    -- The hook looks for handlers only once one was set in the state:
    -- a fresh process, whose first handler comes after the interrupt.
    local output, ok = require("spec.helpers.child").run([[
      local mtint = require("mtint")
      if jit then jit.off() end
      local called = false
      local co = coroutine.create(function()
        coroutine.yield()
        local x = 0
        for i = 1, 1e4 do x = x + i end
        return x
      end)
      coroutine.resume(co)
      assert(mtint.interrupt(mtint.id(co)))
      mtint.sethook(co, function() called = true end)
      print(coroutine.resume(co))
      print("called", called)
    ]])
    assert.is_true(ok, output)
    assert.are.equal("true\t50005000\ncalled\ttrue\n", output)
  end)

  it("restores the error when the handler is set to nil", function()
    local co = coroutine.create(function()
      mtint.sethook(function() end)
      mtint.sethook(nil)
      mtint.interrupt(mtint.id())
    end)
    local ok, err = coroutine.resume(co)
    assert.is_false(ok)
    assert.is_truthy(err:match(mtint.error.interrupted))
  end)
end)

describe("mtint.interruptible", function()
  it("wraps an id with id, interrupt and tostring", function()
    local co = coroutine.create(function() coroutine.yield() busy() end)
    coroutine.resume(co)
    local object = mtint.interruptible(mtint.id(co))
    assert.are.equal(mtint.id(co), object:id())
    assert.are.equal("mtint.interruptible: " .. tostring(mtint.id(co)), tostring(object))
    assert.is_true(object:interrupt())
    assert.is_false((coroutine.resume(co)))
  end)

  it("is accepted by mtint.interrupt", function()
    local co = coroutine.create(function() coroutine.yield() busy() end)
    coroutine.resume(co)
    assert.is_true(mtint.interrupt(mtint.interruptible(mtint.id(co))))
    assert.is_false((coroutine.resume(co)))
  end)

  it("keeps the id known after its target is collected", function()
    local co = coroutine.create(busy)
    local id = mtint.id(co)
    local object = mtint.interruptible(id)
    co = nil
    collectgarbage(); collectgarbage()
    assert.is_false(object:interrupt())
    assert.is_false(mtint.interrupt(object))
    assert.is_false(mtint.interrupt(id))
    object = nil
    collectgarbage(); collectgarbage()
    local ok, err = pcall(mtint.interrupt, id)
    assert.is_false(ok)
    assert.is_truthy(err:match(mtint.error.unknown_object))
  end)

  it("raises mtint.error.unknown_object for an unknown id", function()
    local ok, err = pcall(mtint.interruptible, 12345)
    assert.is_false(ok)
    assert.is_truthy(err:find("^mtint%.error%.unknown_object"))
  end)
end)

describe("an id after its coroutine is collected", function()
  it("is unknown, as in the seed's example", function()
    local c = coroutine.create(function() end)
    local id = mtint.id(c)
    mtint.interrupt(id)
    c = nil
    collectgarbage(); collectgarbage()
    local _, err = pcall(function() mtint.interrupt(id) end)
    assert.is_truthy(err:match(mtint.error.unknown_object))
  end)

  it("interrupts only the coroutine it belongs to, though others take its memory", function()
    -- Collected coroutines' memory is soon given to new ones: the hook
    -- finds the running thread's id by its address, which must then be
    -- the new coroutine's and never the old one's.
    local delivered, wrong = 0, 0
    for _ = 1, 200 do
      local old = coroutine.create(function() coroutine.yield() end)
      coroutine.resume(old)
      local old_id = mtint.id(old)
      old = nil
      collectgarbage(); collectgarbage()
      assert.is_false(pcall(mtint.interrupt, old_id))
      -- busy(): LuaJIT's poll (README, Limitations) sees only a coroutine
      -- that runs a while.
      local new = coroutine.create(function() coroutine.yield() busy() end)
      coroutine.resume(new)
      local fresh = coroutine.create(function() coroutine.yield() return busy() end)
      coroutine.resume(fresh)
      mtint.id(fresh)
      assert.is_true(mtint.interrupt(mtint.id(new)))
      if not coroutine.resume(fresh) then wrong = wrong + 1 end
      if not coroutine.resume(new) then delivered = delivered + 1 end
    end
    assert.are.equal(0, wrong)
    assert.are.equal(200, delivered)
  end)

  it("answers false through an interruptible after one collection", function()
    -- The core hears of the death when the thread is freed (5.1, LuaJIT:
    -- the wrapped allocator) or its guard finalized (5.2-5.4), both
    -- within the collection that takes the coroutine.
    for _ = 1, 20 do
      local co = coroutine.create(function() end)
      local handle = mtint.interruptible(mtint.id(co))
      local weak = setmetatable({ co }, { __mode = "v" })
      co = nil
      collectgarbage()
      assert.is_nil(weak[1])
      assert.is_false(handle:interrupt())
    end
  end)

  it("is not delivered to a coroutine without an id that took its memory", function()
    -- A coroutine's death can be heard of a collection after its memory is
    -- freed (LuaJIT with a host's own allocator): meanwhile the hook must
    -- not take a new coroutine at that address for the dead one. Whether
    -- and when memory is taken again is the allocator's business: rounds
    -- go on until it was, ten times.
    local took, wrong = 0, 0
    for _ = 1, 400 do
      local co = coroutine.create(function() coroutine.yield() end)
      local id = mtint.id(co)
      coroutine.resume(co)
      assert.is_true(mtint.interrupt(id))
      local address = tostring(co)
      co = nil
      -- One collection frees it on LuaJIT; PUC Lua frees it a collection
      -- or two later.
      for _ = 1, 3 do
        collectgarbage()
        local made = {}
        for i = 1, 50 do made[i] = coroutine.create(function() return busy() end) end
        local same
        for _, new in ipairs(made) do
          if tostring(new) == address then same = new break end
        end
        if same then
          took = took + 1
          if not coroutine.resume(same) then wrong = wrong + 1 end
          break
        end
      end
      collectgarbage()
      if took >= 10 then break end
    end
    assert.are.equal(0, wrong)
    -- Not a test that cannot fail: memory was taken again in some rounds.
    assert.is_true(took > 0, "no coroutine took a collected one's memory")
  end)

  it("does not keep the coroutine alive", function()
    local weak = setmetatable({}, { __mode = "v" })
    for i = 1, 50 do
      local co = coroutine.create(busy)
      mtint.id(co)
      mtint.sethook(co, function() end)
      weak[i] = co
    end
    collectgarbage(); collectgarbage(); collectgarbage()
    assert.is_nil(next(weak))
  end)

  -- A finalizer can bring a coroutine back (5.2-5.4: one of a table that
  -- holds it; 5.1 and LuaJIT: of a userdata). Its id was ended with it, as
  -- every other id of a collected coroutine; `id` must not hand out that
  -- dead id again (interrupts to it answered unknown_object while the
  -- coroutine ran on), but a new one that works.
  it("gives a coroutine a finalizer brought back a new id that works", function()
    local back
    local function hold(co)
      local holder = { co }
      if newproxy then
        local proxy = newproxy(true)
        getmetatable(proxy).__gc = function() back = holder[1] end
        holder.proxy = proxy
      else
        setmetatable(holder, { __gc = function(t) back = t[1] end })
      end
    end
    local co = coroutine.create(function() while true do coroutine.yield(busy()) end end)
    local old = mtint.id(co)
    hold(co)
    co = nil -- luacheck: ignore 311
    collectgarbage(); collectgarbage()
    assert.is_not_nil(back, "the finalizer did not bring the coroutine back")
    local ok, err = pcall(mtint.interruptible, old)
    if ok then
      -- The old id is still known (5.1, LuaJIT: the coroutine's memory was
      -- never freed, so it did not die): it must be the one `id` gives.
      assert.are.equal(old, mtint.id(back))
    else
      assert.matches("^mtint%.error%.unknown_object", err)
      assert.are_not.equal(old, mtint.id(back))
    end
    local id = mtint.id(back)
    assert.is_true(mtint.interrupt(id))
    local resumed, message = coroutine.resume(back)
    assert.is_false(resumed)
    assert.matches("^mtint%.error%.interrupted", message)
  end)
end)

describe("bad arguments", function()
  -- A list, not a table keyed by kind: `["nil"] = nil` would create nothing.
  local values = {
    { "nil", nil }, { "boolean", true }, { "number", 1.5 }, { "string", "x" },
    { "table", {} }, { "function", print }, { "thread", coroutine.create(function() end) },
    { "userdata", io.stdout },
  }

  local function rejects(f, ...)
    local ok, err = pcall(f, ...)
    assert.is_false(ok)
    assert.is_string(err)
    assert.is_truthy(err:find("bad argument #%d") or err:find("^mtint%.error%."), err)
    return err
  end

  local function check(name, f, accepts)
    for _, case in ipairs(values) do
      local kind, value = case[1], case[2]
      if not accepts[kind] then
        it(("%s rejects a %s with a clear error"):format(name, kind), function()
          rejects(f, value)
          -- the state is still usable
          assert.are.equal(mtint.id(), mtint.id())
        end)
      end
    end
  end

  check("id", mtint.id, { ["nil"] = true, thread = true })
  check("interrupt", mtint.interrupt, {})
  check("interruptible", mtint.interruptible, {})

  it("interrupt and interruptible answer unknown_object for integers no id has", function()
    for _, id in ipairs({ -1, 0, 2^53, 2^63, 1/0, -1/0, "12" }) do
      for _, f in ipairs({ mtint.interrupt, mtint.interruptible }) do
        local ok, err = pcall(f, id)
        assert.is_false(ok)
        assert.is_truthy(err:find("^mtint%.error%.unknown_object"), err)
      end
    end
  end)

  it("interrupt rejects numbers that are not integers", function()
    for _, id in ipairs({ 1.5, 0/0, "1.5", "abc" }) do
      local ok, err = pcall(mtint.interrupt, id)
      assert.is_false(ok)
      assert.is_truthy(err:find("bad argument #1 to 'interrupt'", 1, true), err)
    end
  end)

  it("interrupt rejects a flag that is not a boolean", function()
    local id = mtint.id(coroutine.create(function() end))
    for _, flag in ipairs({ 1, "yes", {}, print }) do
      local err = rejects(mtint.interrupt, id, flag)
      assert.is_truthy(err:find("#2", 1, true))
    end
  end)

  it("sethook rejects a handler that is not a function", function()
    local co = coroutine.create(function() end)
    for _, handler in ipairs({ 1, "yes", {}, true }) do
      rejects(mtint.sethook, co, handler)
      rejects(mtint.sethook, handler)
    end
  end)

  -- `here()` is "file:line:" of the line that calls it: an argument error
  -- must point at the caller's line, not inside mtint.lua.
  local function here()
    local info = debug.getinfo(2, "Sl")
    return info.short_src .. ":" .. info.currentline .. ":"
  end

  local function starts_with(prefix, err)
    assert.is_string(err)
    assert.are.equal(prefix, err:sub(1, #prefix), err)
  end

  it("points argument errors at the caller's line", function()
    local co = coroutine.create(function() end)
    local object = mtint.interruptible(mtint.id(co))
    local at, _, err = here(), pcall(function() mtint.id(1) end)
    starts_with(at .. " bad argument #1 to 'id'", err)
    at, _, err = here(), pcall(function() mtint.interrupt(1.5) end)
    starts_with(at .. " bad argument #1 to 'interrupt'", err)
    at, _, err = here(), pcall(function() mtint.interrupt({}) end)
    starts_with(at .. " bad argument #1 to 'interrupt'", err)
    at, _, err = here(), pcall(function() mtint.interrupt(mtint.id(co), 1) end)
    starts_with(at .. " bad argument #2 to 'interrupt'", err)
    at, _, err = here(), pcall(function() mtint.interruptible("x") end)
    starts_with(at .. " bad argument #1 to 'interruptible'", err)
    at, _, err = here(), pcall(function() mtint.sethook(co, 1) end)
    starts_with(at .. " bad argument #2 to 'sethook'", err)
    at, _, err = here(), pcall(function() object:interrupt(1) end)
    starts_with(at .. " bad argument #1 to 'interrupt'", err)
    at, _, err = here(), pcall(function() object.id({}) end)
    starts_with(at .. " bad argument #1 to 'id'", err)
  end)

  it("does not echo a huge argument in the unknown id error", function()
    for _, huge in ipairs({ ("9"):rep(1e5), "-" .. ("1"):rep(1e5) }) do
      for _, f in ipairs({ mtint.interrupt, mtint.interruptible }) do
        local ok, err = pcall(f, huge)
        assert.is_false(ok)
        assert.is_truthy(err:find("^mtint%.error%.unknown_object"), err:sub(1, 80))
        assert.is_truthy(err:find(": interruptible id " .. huge:sub(1, 10), 1, true), err:sub(1, 80))
        assert.is_true(#err < 200, #err .. " characters")
      end
    end
  end)

  it("interruptible methods reject a foreign self", function()
    local object = mtint.interruptible(mtint.id(coroutine.create(function() end)))
    rejects(object.id, {})
    rejects(object.interrupt, "x")
  end)
end)
