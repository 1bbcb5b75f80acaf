-- The install layout: one native library, required under one name, shared
-- by the Lua modules. A second copy of the library under another name would
-- be a second image with its own id registry.
local mtint = require("mtint")
local core = require("corowatch.core")

local function find_all(name, path)
  local found = {}
  for template in path:gmatch("[^;]+") do
    local file = template:gsub("%?", (name:gsub("%.", "/")))
    local handle = io.open(file, "rb")
    if handle then
      handle:close()
      found[#found + 1] = file
    end
  end
  return found
end

describe("the installed layout", function()
  it("has mtint and corowatch as Lua modules, not native ones", function()
    for _, name in ipairs({ "mtint", "corowatch" }) do
      assert.are.equal(1, #find_all(name, package.path))
      assert.are.same({}, find_all(name, package.cpath))
    end
  end)

  it("has exactly one native library, corowatch.core", function()
    assert.are.equal(1, #find_all("corowatch.core", package.cpath))
    assert.are.same({}, find_all("corowatch", package.cpath))
  end)

  it("gives corowatch and mtint the same native core", function()
    local corowatch = require("corowatch")
    assert.are.equal(core._VERSION, corowatch._VERSION:match("%S+$"))
    assert.are.equal(core._VERSION, mtint._VERSION:match("%S+$"))
  end)

  it("shares one registry between the Lua module and the native core", function()
    local co = coroutine.create(function() end)
    assert.are.equal(core.mtint.id(co), mtint.id(co))
    assert.is_true(mtint.interrupt(core.mtint.id(co)))
  end)

  it("shares one registry between Lua states in the process", function()
    local threads = require("spec.helpers.threads")
    local thread = threads.start(function(channel)
      local mtint = require("mtint")
      local co = coroutine.create(function() end)
      channel:send(mtint.id(co))
      assert(channel:receive() == "done")
    end)
    local id = tonumber(assert(thread:receive(10)))
    assert.is_true(mtint.interrupt(id, false))
    thread:send("done")
    assert.is_true(thread:join())
  end)
end)
