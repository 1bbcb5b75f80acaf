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

  it("gives corowatch and mtint the version of the crate that was built", function()
    -- Read from Cargo.toml (the specs run from the repository's root), not
    -- from the core: a stale or foreign core.so would not match.
    local handle = assert(io.open("Cargo.toml"))
    local manifest = handle:read("*a")
    handle:close()
    local version = manifest:match('^%[package%][^%[]-\nversion%s*=%s*"([^"]+)"')
    assert.is_string(version)
    local corowatch = require("corowatch")
    assert.are.equal(version, core._VERSION)
    assert.are.equal("corowatch " .. version, corowatch._VERSION)
    assert.are.equal("mtint " .. version, mtint._VERSION)
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
