//! corowatch's native half, called by `lua/corowatch.lua`: entering and
//! leaving coroutines, watching, the clock, and the dispatcher the hook calls.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use mlua::{ffi, Function, Lua, Table, Thread};

use crate::hook::{self, DISPATCH_KEY};
use crate::state;
use crate::watch::Watch;

pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let corowatch = lua.create_table()?;
    corowatch.set("enter", lua.create_function(enter)?)?;
    corowatch.set("leave", lua.create_function(leave)?)?;
    corowatch.set("watch_running", lua.create_function(watch_running)?)?;
    corowatch.set("reset", lua.create_function(reset)?)?;
    corowatch.set("gettime", lua.create_function(|_, ()| Ok(gettime()))?)?;
    corowatch.set("set_dispatcher", lua.create_function(set_dispatcher)?)?;
    corowatch.set("user_hook_changed", lua.create_function(user_hook_changed)?)?;
    corowatch.set("lend_user_hook", lua.create_function(lend_user_hook)?)?;
    Ok(corowatch)
}

fn state_of(thread: &Thread) -> *mut ffi::lua_State {
    thread.to_pointer() as *mut ffi::lua_State
}

fn running(lua: &Lua) -> *mut ffi::lua_State {
    state_of(&lua.current_thread())
}

fn seconds(value: f64, what: &str) -> mlua::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| mlua::Error::runtime(format!("{what} must be a positive number of seconds")))
}

fn watch_from(kill: Option<f64>, warn: Option<f64>) -> mlua::Result<Watch> {
    let kill = kill.map(|kill| seconds(kill, "kill limit")).transpose()?;
    let warn = warn.map(|warn| seconds(warn, "warn limit")).transpose()?;
    Ok(Watch::start(kill, warn, Instant::now()))
}

/// `enter(co, watched, [kill], [warn])`: the running thread resumes `co`.
fn enter(
    lua: &Lua,
    (co, watched, kill, warn): (Thread, bool, Option<f64>, Option<f64>),
) -> mlua::Result<()> {
    let vm = state::vm(lua)?;
    let watch = watched.then(|| watch_from(kill, warn)).transpose()?;
    vm.enter(running(lua), state_of(&co), watch);
    Ok(())
}

/// `leave()` -> whether anything watched still runs.
fn leave(lua: &Lua, (): ()) -> mlua::Result<bool> {
    Ok(state::vm(lua)?.leave(running(lua)))
}

/// `watch_running([co], [kill], [warn])` -> depth of `co` (default: the
/// running thread) in the chain, or nil if it is not running (its watch
/// starts when it is next resumed).
fn watch_running(
    lua: &Lua,
    (co, kill, warn): (Option<Thread>, Option<f64>, Option<f64>),
) -> mlua::Result<Option<usize>> {
    let watch = watch_from(kill, warn)?;
    let running = running(lua);
    let state = co.map_or(running, |co| state_of(&co));
    Ok(state::vm(lua)?.watch_running(state, running, watch))
}

/// `reset(depth)`: the warn callback of the coroutine at `depth` asked for
/// more time.
fn reset(lua: &Lua, depth: usize) -> mlua::Result<()> {
    state::vm(lua)?.reset(depth);
    Ok(())
}

/// Seconds on a monotonic clock, from an arbitrary origin.
fn gettime() -> f64 {
    static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);
    // Start well above zero so that differences never look like a reset clock.
    1.0e3 + ORIGIN.elapsed().as_secs_f64()
}

/// `set_dispatcher(f)`: the function the hook calls with (event, depth).
fn set_dispatcher(lua: &Lua, dispatcher: Function) -> mlua::Result<()> {
    state::vm(lua)?;
    // SAFETY: the closure pops the one function mlua pushed for it into the
    // registry under a static key.
    unsafe {
        lua.exec_raw::<()>(dispatcher, |state| {
            ffi::lua_rawsetp(state, ffi::LUA_REGISTRYINDEX, hook::key(&DISPATCH_KEY));
        })
    }
}

/// `user_hook_changed()`: the running thread just called `debug.sethook`.
fn user_hook_changed(lua: &Lua, (): ()) -> mlua::Result<()> {
    state::vm(lua)?.user_hook_changed(running(lua));
    Ok(())
}

/// `lend_user_hook()` -> whether the user's hook was put back for a moment.
fn lend_user_hook(lua: &Lua, (): ()) -> mlua::Result<bool> {
    Ok(state::vm(lua)?.lend_user_hook(running(lua)))
}
