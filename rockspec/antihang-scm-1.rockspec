-- Builds offline: the native core is built by cargo (no build-backend rock),
-- for the Lua version that luarocks targets.
-- rockspec/release.lua writes the release rockspec from this file.
rockspec_format = "3.0"
package = "antihang"
version = "scm-1"
source = {
  url = "git+https://github.com/OWNER/REPO.git", -- placeholder until the repository is known
}
description = {
  summary = "Keep Lua code from locking up its host: mtint and corowatch on one native core",
  detailed = [[
    mtint: interrupt any Lua main state or coroutine from another OS thread,
    by id. corowatch: watch coroutines and kill those that run too long
    without yielding. One native library (Rust, mlua) per Lua version,
    shared by both modules, so ids and the watchdog are process-wide.
    Provides the modules `mtint` and `corowatch`: in a tree that also has
    the rocks `mtint` or `corowatch`, `require` finds this rock's modules.
  ]],
  license = "MIT",
  labels = { "coroutine", "thread", "interrupt", "timeout", "watchdog" },
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
      ["corowatch.supervisor"] = "lua/corowatch/supervisor.lua",
      ["corowatch.task"] = "lua/corowatch/task.lua",
      ["corowatch.task.luv"] = "lua/corowatch/task/luv.lua",
    },
    lib = {
      ["corowatch.core"] = "build/rock/core.so",
    },
  },
}
test = {
  -- Run with the interpreter luarocks targets: builds the core for it and
  -- runs the busted specs (Debian's busted; no rock is fetched).
  type = "command",
  script = "rockspec/test.lua",
}
