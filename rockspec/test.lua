-- `luarocks test` in a checkout: luarocks runs this with the interpreter it
-- targets (`luarocks --lua-version 5.3 test`, or LuaJIT with
-- LUAROCKS_CONFIG=rockspec/luajit-config.lua). It builds the native core for
-- that interpreter with rockspec/build.sh, puts it in build/test-<version>/
-- as the rock installs it, and runs the busted specs against lua/ and that
-- core, with Debian's busted modules, offline. Arguments go to busted
-- (`luarocks test -- --filter=interrupt`).
local lua = arg[-1] or "lua"
if arg[1] == "--run-busted" then
  -- Second stage, run with LUA_PATH and LUA_CPATH set: busted in this process.
  table.remove(arg, 1)
  require("busted.runner")({ standalone = false })
  return
end

local function quote(s)
  return "'" .. s:gsub("'", [['\'']]) .. "'"
end

local function run(command)
  local ok, how, code = os.execute(command)
  if ok == true or ok == 0 then return true end -- 5.2+ / 5.1
  return false, (type(ok) == "number" and ok) or code or how
end

local version = jit and "luajit" or _VERSION:sub(5)
local tree = "build/test-" .. version

local ok = run("sh rockspec/build.sh " .. quote(lua))
  and run("mkdir -p " .. tree .. "/corowatch")
  and run("cp build/rock/core.so " .. tree .. "/corowatch/core.so")
if not ok then
  io.stderr:write("rockspec/test.lua: building the core for ", lua, " failed\n")
  os.exit(1)
end

local busted_args = {}
for i = 1, #arg do busted_args[#busted_args + 1] = quote(arg[i]) end
if #busted_args == 0 then busted_args = { "--output=plainTerminal", "spec" } end

local command = table.concat({
  "LUA_PATH=" .. quote("./?.lua;./lua/?.lua;;"),
  "LUA_CPATH=" .. quote(tree .. "/?.so;;"),
  "CW_LUA=" .. quote(lua),
  quote(lua), "rockspec/test.lua", "--run-busted", table.concat(busted_args, " "),
}, " ")
io.write("rockspec/test.lua: Lua ", version, " (", lua, "): modules from lua/ and ",
  tree, "/\n")
io.flush()
os.exit(run(command) and 0 or 1)
