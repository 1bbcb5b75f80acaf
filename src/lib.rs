//! Native core of the `mtint` and `corowatch` Lua modules.
//!
//! One library per Lua version, installed once as `corowatch.core` and shared
//! by the thin Lua modules, so that ids and the watchdog are process-wide.

mod arming;
mod corowatch;
mod errors;
mod hook;
mod image;
mod interrupt;
mod registry;
mod resume;
mod state;
mod task;
#[cfg(feature = "lua51")]
mod thread_free;
mod vm;
mod watch;
mod watchdog;

use mlua::{Lua, Table};

/// `require("corowatch.core")`
#[mlua::lua_module(skip_memory_check)]
fn corowatch_core(lua: &Lua) -> mlua::Result<Table> {
    image::pin();
    let core = lua.create_table()?;
    core.set("mtint", interrupt::module(lua)?)?;
    core.set("corowatch", corowatch::module(lua)?)?;
    core.set("task", task::module(lua)?)?;
    let names = lua.create_table()?;
    names.set("interrupted", errors::INTERRUPTED)?;
    names.set("not_supported", errors::NOT_SUPPORTED)?;
    names.set("unknown_object", errors::UNKNOWN_OBJECT)?;
    core.set("errors", names)?;
    core.set("_VERSION", env!("CARGO_PKG_VERSION"))?;
    Ok(core)
}
