-- Builds offline: the native core is built by cargo (no build-backend rock),
-- for the Lua version that luarocks targets.
rockspec_format = "3.0"
package = "corowatch"
version = "scm-1"
source = {
  url = "git+file:///dev/null", -- `luarocks make` builds the checked-out tree
}
description = {
  summary = "Keep Lua code from locking up its host: mtint and corowatch on one native core",
  detailed = [[
    mtint: interrupt any Lua main state or coroutine from another OS thread,
    by id. corowatch: watch coroutines and kill those that run too long
    without yielding. One native library (Rust, mlua) per Lua version,
    shared by both modules, so ids and the watchdog are process-wide.
  ]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.1, < 5.5",
}
build = {
  type = "command",
  build_command = [[sh rockspec/build.sh "$(LUA)"]],
  install = {
    lua = {
      mtint = "lua/mtint.lua",
      corowatch = "lua/corowatch.lua",
      ["corowatch.task"] = "lua/corowatch/task.lua",
      ["corowatch.task.luv"] = "lua/corowatch/task/luv.lua",
    },
    lib = {
      ["corowatch.core"] = "build/rock/core.so",
    },
  },
}
