//! Native core of the `mtint` and `corowatch` Lua modules.
//!
//! One library per Lua version, installed once as `corowatch.core` and shared
//! by the thin Lua modules, so that ids and the watchdog are process-wide.

mod allocator;
mod allowhook;
mod arming;
mod barrier;
mod clock;
#[cfg(any(feature = "lua51", feature = "luajit"))]
mod collector;
mod contained;
mod corowatch;
mod entry;
mod errors;
mod gate;
mod hook;
mod image;
mod interrupt;
mod key_hash;
mod mirror;
mod owner_only;
#[cfg(feature = "luajit")]
mod probe;
mod registry;
mod resume;
#[cfg(feature = "luajit")]
mod signal;
mod stack_room;
mod state;
mod state_ptr;
mod task;
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod tsc;
mod vm;
mod watch;
mod watchdog;
#[cfg(all(feature = "widen-frame-window", feature = "lua54"))]
mod widen;

use mlua::{Lua, Table};

/// `require("corowatch.core")`
#[mlua::lua_module]
fn corowatch_core(lua: &Lua) -> mlua::Result<Table> {
    image::pin();
    entry::set_handler(hook::handle);
    let core = lua.create_table()?;
    let vm = state::vm(lua)?;
    let closing = gate::WhenClosed::Raise("corowatch: the Lua state is closing");
    core.set("mtint", interrupt::module(lua)?)?;
    core.set("corowatch", corowatch::module(lua)?)?;
    let task = task::module(lua)?;
    gate::gate_table(lua, &vm, &task, closing)?;
    core.set("task", task)?;
    let names = lua.create_table()?;
    names.set("interrupted", errors::INTERRUPTED)?;
    names.set("not_supported", errors::NOT_SUPPORTED)?;
    names.set("unknown_object", errors::UNKNOWN_OBJECT)?;
    core.set("errors", names)?;
    let shared = lua.create_function(state::shared_table)?;
    core.set("shared", gate::gate(lua, &vm, shared, closing)?)?;
    // The watches' clock: its name and reading (specs).
    let clock = lua.create_function(|_, ()| Ok(clock::describe()))?;
    core.set("clock", gate::gate(lua, &vm, clock, closing)?)?;
    let jobs = lua.create_function(|_, ()| Ok(watchdog::queued_jobs()))?;
    core.set("watchdog_jobs", gate::gate(lua, &vm, jobs, closing)?)?;
    let alarms = lua.create_function(|_, ()| Ok(watchdog::alarms_run()))?;
    core.set("watchdog_alarms", gate::gate(lua, &vm, alarms, closing)?)?;
    // Seconds: how late the watchdog armed the hook for a deadline at
    // worst, after the hook's time, since the last call (benchmarks: a late
    // kill whose arming was as late is the watchdog's thread not running,
    // not the hook).
    let lateness = lua.create_function(|_, ()| Ok(watchdog::take_worst_lateness() as f64 / 1e9))?;
    core.set(
        "watchdog_lateness",
        gate::gate(lua, &vm, lateness, closing)?,
    )?;
    // LuaJIT: how many signals asked a VM's thread for the hook (specs).
    #[cfg(feature = "luajit")]
    {
        let sent = lua.create_function(|_, ()| Ok(signal::sent()))?;
        core.set("hook_signals", gate::gate(lua, &vm, sent, closing)?)?;
        // How many times the watchdog sampled dispatch probes (specs).
        let samples = lua.create_function(|_, ()| Ok(watchdog::samples_run()))?;
        core.set("watchdog_samples", gate::gate(lua, &vm, samples, closing)?)?;
    }
    core.set("_VERSION", env!("CARGO_PKG_VERSION"))?;
    Ok(core)
}
