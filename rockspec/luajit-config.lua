-- luarocks configuration for LuaJIT 2.1 from Debian's packages:
-- LUAROCKS_CONFIG=rockspec/luajit-config.lua luarocks make ...
lua_version = "5.1"
lua_interpreter = "luajit"
variables = {
  LUA_DIR = "/usr",
  LUA_BINDIR = "/usr/bin",
  LUA_INCDIR = "/usr/include/luajit-2.1",
}
