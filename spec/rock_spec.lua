-- The rock: one version (Cargo.toml's) everywhere, a release rockspec that
-- is the scm one with that version and its tag, every Lua module under lua/
-- installed, both rockspecs lint-clean, and the one-command release.
-- Runs from the checkout's root (as run-tests and `luarocks test` do).
local release = require("rockspec.release")
local core = require("corowatch.core")

local function read(path)
  local file = assert(io.open(path, "rb"))
  local text = file:read("*a")
  file:close()
  return text
end

-- Runs a shell command; returns its output (stdout and stderr) and success.
local function sh(command)
  local pipe = assert(io.popen("(" .. command .. ") 2>&1; echo \"exit=$?\""))
  local output = pipe:read("*a")
  pipe:close()
  local status = tonumber(output:match("exit=(%d+)%s*$"))
  return (output:gsub("exit=%d+%s*$", "")), status == 0
end

local function lines(command)
  local output, ok = sh(command)
  assert(ok, output)
  local result = {}
  for line in output:gmatch("[^\n]+") do result[#result + 1] = line end
  return result
end

local function load_rockspec(path)
  return release.load_rockspec(read(path), path)
end

local lua = os.getenv("CW_LUA") or "lua"

-- Module name -> file, for every file under lua/.
local function lua_modules()
  local modules = {}
  for _, file in ipairs(lines("cd lua && find . -name '*.lua' | sort")) do
    file = file:gsub("^%./", "")
    modules[(file:gsub("%.lua$", ""):gsub("/", "."))] = "lua/" .. file
  end
  return modules
end
local version = release.cargo_version(read("Cargo.toml"))
local scm_path = release.scm_path()
local release_path = release.expected()

describe("the rock", function()
  it("takes its version from Cargo.toml, the release rockspec's and the core's", function()
    local rockspec = load_rockspec(release_path)
    assert.are.equal(version .. "-1", rockspec.version)
    assert.are.equal(("rockspec/%s-%s-1.rockspec"):format(rockspec.package, version), release_path)
    assert.are.equal(version, core._VERSION)
  end)

  it("has one release rockspec, written from the scm one with the release's tag", function()
    assert.are.same({ release_path }, release.release_paths())
    local _, expected = release.expected()
    assert.are.equal(expected, read(release_path), "run `lua rockspec/release.lua`")
    local rockspec, scm = load_rockspec(release_path), load_rockspec(scm_path)
    assert.are.equal(scm.source.url, rockspec.source.url)
    assert.matches("^git%+https://", rockspec.source.url)
    assert.are.equal("v" .. version, rockspec.source.tag)
    assert.are.same(scm.build, rockspec.build)
    assert.are.same(scm.test, rockspec.test)
    assert.are.same(scm.dependencies, rockspec.dependencies)
  end)

  it("is not named corowatch or mtint, the originals' rocks", function()
    local name = load_rockspec(scm_path).package
    assert.are_not.equal("corowatch", name)
    assert.are_not.equal("mtint", name)
  end)

  -- LuaRocks deploys a module that two rocks provide under its plain file
  -- name for the rock whose name sorts first, and under a versioned name
  -- for the other, whatever the order of installation or the versions
  -- (check_spot_if_available in luarocks/repos.lua). Tried with stand-ins:
  -- pure-Lua rocks named corowatch and mtint (version 99) and one with this
  -- rock's name, each module saying which rock it came from.
  it("takes the modules corowatch and mtint from the originals' rocks in a tree", function()
    local name = load_rockspec(scm_path).package
    local dir = os.tmpname()
    os.remove(dir)
    assert(sh("mkdir -p " .. dir .. "/tree"))
    local function rock(package, version, modules)
      local entries = {}
      for _, module in ipairs(modules) do
        local file = assert(io.open(("%s/%s-%s.lua"):format(dir, package, module), "w"))
        file:write(("return { rock = %q }\n"):format(package))
        file:close()
        entries[#entries + 1] = ("%s = %q"):format(module, package .. "-" .. module .. ".lua")
      end
      local rockspec = ("%s-%s-1.rockspec"):format(package, version)
      local file = assert(io.open(dir .. "/" .. rockspec, "w"))
      file:write(([[
package = %q
version = "%s-1"
source = { url = "." }
build = { type = "builtin", modules = { %s } }
]]):format(package, version, table.concat(entries, ", ")))
      file:close()
      return rockspec
    end
    local root = (sh("pwd"):gsub("\n$", ""))
    local luarocks = jit and ("LUAROCKS_CONFIG=%s/rockspec/luajit-config.lua luarocks"):format(root)
      or "luarocks --lua-version " .. _VERSION:sub(5)
    local installs = { -- an original before this rock, the other after it
      rock("corowatch", "99.0", { "corowatch" }),
      rock(name, "0.0.1", { "corowatch", "mtint" }),
      rock("mtint", "99.0", { "mtint" }),
    }
    for _, rockspec in ipairs(installs) do
      local output, ok = sh(("cd %s && %s make --deps-mode=none --tree tree %s")
        :format(dir, luarocks, rockspec))
      assert(ok, output)
    end
    local lv = _VERSION:sub(5)
    local output = sh(("LUA_PATH='%s/tree/share/lua/%s/?.lua' %s -e %q"):format(dir, lv, lua,
      'io.write(require("corowatch").rock, " ", require("mtint").rock)'))
    sh("rm -rf " .. dir)
    assert.are.equal(name .. " " .. name, output)
  end)

  it("installs every Lua module under lua/, under its module name", function()
    local on_disk = lua_modules()
    assert.is_not_nil(on_disk.mtint)
    assert.is_not_nil(on_disk.corowatch)
    for _, path in ipairs({ scm_path, release_path }) do
      assert.are.same(on_disk, load_rockspec(path).build.install.lua, path)
    end
  end)

  it("installs one native library, as corowatch.core", function()
    for _, path in ipairs({ scm_path, release_path }) do
      assert.are.same({ ["corowatch.core"] = "build/rock/core.so" },
        load_rockspec(path).build.install.lib, path)
    end
  end)

  it("runs its specs under `luarocks test` with a script, not the busted rock", function()
    local test = load_rockspec(scm_path).test
    assert.are.equal("command", test.type)
    local file = io.open(test.script, "r")
    assert.is_truthy(file, test.script)
    file:close()
  end)

  it("has rockspecs that `luarocks lint` accepts", function()
    for _, path in ipairs({ scm_path, release_path }) do
      local output, ok = sh("luarocks lint " .. path)
      assert(ok, path .. ": " .. output)
    end
  end)
end)

describe("the generated reference", function()
  it("documents every public function of every module under lua/", function()
    local dir = os.tmpname()
    os.remove(dir)
    local output, ok = sh("ldoc --fatalwarnings -q -d " .. dir .. " .")
    assert(ok, "ldoc (Debian: lua-ldoc, lua-discount) failed or warned: " .. output)
    local missing = {}
    for module in pairs(lua_modules()) do
      local file = io.open(("%s/modules/%s.html"):format(dir, module), "r")
      local page = file and file:read("*a") or ""
      if file then file:close() end
      -- A module that is a function (corowatch.task.luv) is its own page.
      if not file then missing[#missing + 1] = module end
      local exports = require(module)
      for key, value in pairs(type(exports) == "table" and exports or {}) do
        if type(value) == "function" and not key:find("^_")
            and not page:find(('<a name = "%s">'):format(key), 1, true) then
          missing[#missing + 1] = module .. "." .. key
        end
      end
    end
    sh("rm -rf " .. dir)
    table.sort(missing)
    assert.are.same({}, missing)
  end)
end)

describe("rockspec/bump.sh", function()
  local dir

  before_each(function()
    dir = os.tmpname()
    os.remove(dir)
    local output, ok = sh("rockspec/snapshot.sh " .. dir
      .. " && cd " .. dir .. " && git config user.name spec && git config user.email spec@localhost"
      .. " && git config commit.gpgSign false && git config tag.gpgSign false")
    assert(ok, output)
  end)

  after_each(function()
    sh("rm -rf " .. dir)
  end)

  local function next_version()
    local major, minor, patch = version:match("^(%d+)%.(%d+)%.(%d+)$")
    return ("%s.%s.%d"):format(major, minor, tonumber(patch) + 1)
  end

  it("bumps Cargo.toml, writes the release rockspec, commits and tags, in one command", function()
    local new = next_version()
    local output, ok = sh("cd " .. dir
      .. [[ && sed -i 's/^## Unreleased$/## Unreleased\n\n- a change/' CHANGELOG.md]]
      .. " && git commit -qam change && rockspec/bump.sh " .. new)
    assert(ok, output)
    local function there(command) return sh("cd " .. dir .. " && " .. command) end
    assert.are.equal(new .. "\n", (there("sed -n 's/^version = \"\\(.*\\)\"$/\\1/p' Cargo.toml")))
    assert.matches('name = "corowatch"\nversion = "' .. new:gsub("%.", "%%.") .. '"',
      (there("cat Cargo.lock")))
    local rockspecs = there("ls rockspec/*.rockspec")
    assert.is_truthy(rockspecs:find("-" .. new .. "-1.rockspec", 1, true))
    assert.is_nil(rockspecs:find("-" .. version .. "-1.rockspec", 1, true))
    assert.is_true(select(2, there(lua .. " rockspec/release.lua --check")))
    assert.matches("## Unreleased\n\n## " .. new:gsub("%.", "%%.") .. " %- %d+%-%d+%-%d+\n\n%- a change",
      (there("cat CHANGELOG.md")))
    assert.are.equal("Release " .. new .. "\n", (there("git log -1 --format=%s")))
    assert.are.equal((there("git rev-parse HEAD")), (there("git rev-parse v" .. new .. "^{commit}")))
    assert.are.equal("", (there("git status --porcelain")))
  end)

  it("refuses a tree with uncommitted changes, an empty changelog or a lower version", function()
    local output, ok = sh("cd " .. dir .. " && echo >> README.md && rockspec/bump.sh " .. next_version())
    assert.is_false(ok)
    assert.matches("uncommitted changes", output)
    output, ok = sh("cd " .. dir .. " && git checkout -q README.md"
      .. [[ && sed -i '/^## Unreleased$/,$d' CHANGELOG.md && echo '## Unreleased' >> CHANGELOG.md]]
      .. " && git commit -qam empty && rockspec/bump.sh " .. next_version())
    assert.is_false(ok)
    assert.matches("Unreleased section is empty", output)
    output, ok = sh("cd " .. dir .. " && rockspec/bump.sh 0.0.0")
    assert.is_false(ok)
    assert.matches("is below", output)
    assert.are.equal("", (sh("cd " .. dir .. " && git tag")))
  end)
end)
