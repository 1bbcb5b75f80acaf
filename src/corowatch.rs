//! corowatch's native half, called by `lua/corowatch.lua`: the patched
//! resume and yield, watching the running coroutine, the clock, and the
//! dispatcher the hook calls.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use mlua::{ffi, Function, Lua, MultiValue, Table, Thread};

use crate::gate::{self, WhenClosed};
use crate::hook::{self, ANCHORS_KEY, DISPATCH_KEY};
use crate::resume;
use crate::state;
use crate::watch::Watch;

/// The VM is closing: corowatch's functions that cannot do without it
/// raise this; those about the user's hook do nothing.
const CLOSING: &str = "corowatch: the Lua state is closing";

pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let corowatch = lua.create_table()?;
    let vm = state::vm(lua)?;
    let raise = WhenClosed::Raise(CLOSING);
    let nothing = WhenClosed::Nothing;
    gate::set_all(
        lua,
        &corowatch,
        &vm,
        vec![
            (
                "make_functions",
                lua.create_function(make_functions)?,
                raise,
            ),
            ("watch_running", lua.create_function(watch_running)?, raise),
            ("reset", lua.create_function(reset)?, nothing),
            (
                "set_dispatcher",
                lua.create_function(set_dispatcher)?,
                raise,
            ),
            (
                "begin_user_hook_change",
                lua.create_function(begin_user_hook_change)?,
                nothing,
            ),
            (
                "user_hook_changed",
                lua.create_function(user_hook_changed)?,
                nothing,
            ),
            (
                "lend_user_hook",
                lua.create_function(lend_user_hook)?,
                nothing,
            ),
        ],
    )?;
    // Plain C functions, which work at any point of `lua_close`.
    for (name, function) in [
        ("gettime", lua_gettime as ffi::lua_CFunction),
        ("running_thread", lua_running_thread),
    ] {
        // SAFETY: pushes one C function for mlua to take.
        let function = unsafe {
            lua.exec_raw::<Function>((), |state| ffi::lua_pushcfunction(state, function))?
        };
        corowatch.set(name, function)?;
    }
    Ok(corowatch)
}

fn state_of(thread: &Thread) -> *mut ffi::lua_State {
    thread.to_pointer() as *mut ffi::lua_State
}

fn seconds(value: f64, what: &str) -> mlua::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|limit| !limit.is_zero())
        .ok_or_else(|| mlua::Error::runtime(format!("{what} must be a positive number of seconds")))
}

/// `make_functions(resume, watched, killed)` -> resume, yield
///
/// The patched `coroutine.resume` and `coroutine.yield` (see
/// [`crate::resume`]), over the original resume, the `co -> settings` table
/// and the `co -> kill message` table.
fn make_functions(
    lua: &Lua,
    (original, watched, killed): (Function, Table, Table),
) -> mlua::Result<MultiValue> {
    // The closure holds the VM as a raw pointer: this reference is leaked on
    // purpose, so the Vm outlives every closure (they may run during
    // `lua_close`, after the VM's guard is gone; a closed Vm is inert).
    let vm = Arc::into_raw(state::vm(lua)?) as usize;
    let anchors = anchors(lua)?;
    // SAFETY: the closures consume exactly the values mlua pushed for them
    // and leave the function they make on the stack for mlua to take.
    unsafe {
        let resume = lua
            .exec_raw::<Function>((original, watched, killed.clone(), anchors), move |state| {
                resume::push_resume(state, vm as *const _)
            })?;
        let yield_ = lua.exec_raw::<Function>(killed, move |state| {
            resume::push_yield(state, vm as *const _)
        })?;
        lua.pack_multi((resume, yield_))
    }
}

/// The VM's `depth -> coroutine` table for the running chain, created once
/// and kept in the registry, where the hook finds it.
fn anchors(lua: &Lua) -> mlua::Result<Table> {
    const NAME: &str = "corowatch.anchors";
    if let Some(table) = lua.named_registry_value::<Option<Table>>(NAME)? {
        return Ok(table);
    }
    let table = lua.create_table()?;
    lua.set_named_registry_value(NAME, &table)?;
    // SAFETY: pops the table mlua pushed into the registry under a static key.
    unsafe {
        lua.exec_raw::<()>(&table, |state| {
            ffi::lua_rawsetp(state, ffi::LUA_REGISTRYINDEX, hook::key(&ANCHORS_KEY));
        })?;
    }
    Ok(table)
}

/// `watch_running([co], [kill], [warn])` -> whether `co` (default: the
/// running thread) is running: its watch starts now; otherwise it starts
/// when `co` is next resumed.
fn watch_running(
    lua: &Lua,
    (co, kill, warn): (Option<Thread>, Option<f64>, Option<f64>),
) -> mlua::Result<bool> {
    let kill = kill.map(|kill| seconds(kill, "kill limit")).transpose()?;
    let warn = warn.map(|warn| seconds(warn, "warn limit")).transpose()?;
    let watch = Watch::start(kill, warn, Instant::now());
    let co = co.unwrap_or_else(|| lua.current_thread());
    let running = lua.current_thread();
    let vm = state::vm(lua)?;
    if !vm.is_active() {
        // The chain will start here: `co` at depth 1, `running` above it if
        // it is another thread. Anchored first (that may raise), then
        // watched, so the chain names only anchored threads. Threads
        // already on a chain are anchored there.
        let anchors = anchors(lua)?;
        anchors.raw_set(1, &co)?;
        if co != running {
            anchors.raw_set(2, &running)?;
        }
    }
    // SAFETY: `co` is held by this call, so alive, and `running` is the
    // running thread; both belong to this VM, which this OS thread runs.
    Ok(unsafe { vm.watch_running(state_of(&co), state_of(&running), watch) })
}

/// `reset(depth)`: the warn callback of the coroutine at `depth` asked for
/// more time.
fn reset(lua: &Lua, depth: usize) -> mlua::Result<()> {
    state::vm(lua)?.reset(depth);
    Ok(())
}

/// `running_thread()`: the running thread, main thread included (Lua 5.1's
/// `coroutine.running()` gives nil there).
unsafe extern "C-unwind" fn lua_running_thread(state: *mut ffi::lua_State) -> std::ffi::c_int {
    // SAFETY: Lua guarantees a C function room for one result.
    ffi::lua_pushthread(state);
    1
}

/// `gettime()`: seconds on a monotonic clock.
unsafe extern "C-unwind" fn lua_gettime(state: *mut ffi::lua_State) -> std::ffi::c_int {
    // SAFETY: Lua guarantees a C function room for one result.
    ffi::lua_pushnumber(state, gettime());
    1
}

/// Seconds on a monotonic clock, from an arbitrary origin.
fn gettime() -> f64 {
    static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);
    // Start well above zero so that differences never look like a reset clock.
    1.0e3 + ORIGIN.elapsed().as_secs_f64()
}

/// `set_dispatcher(f)`: the function the hook calls with (event, co, depth).
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

/// `begin_user_hook_change()`: the running thread is about to call
/// `debug.sethook`; `user_hook_changed` must follow, whatever happens.
fn begin_user_hook_change(lua: &Lua, (): ()) -> mlua::Result<()> {
    state::vm(lua)?.begin_user_hook_change();
    Ok(())
}

/// `user_hook_changed([co])`: the running thread just called
/// `debug.sethook` about `co` (default: itself).
fn user_hook_changed(lua: &Lua, co: Option<Thread>) -> mlua::Result<()> {
    let co = co.unwrap_or_else(|| lua.current_thread());
    // SAFETY: `co` is held by this call and belongs to this VM, which this
    // OS thread runs.
    unsafe { state::vm(lua)?.user_hook_changed(state_of(&co)) };
    Ok(())
}

/// `lend_user_hook([co])` -> whether the user's hook was put back on `co`
/// (default: the running thread) for a moment (then `user_hook_changed`
/// must follow).
fn lend_user_hook(lua: &Lua, co: Option<Thread>) -> mlua::Result<bool> {
    let co = co.unwrap_or_else(|| lua.current_thread());
    // SAFETY: as in `user_hook_changed`.
    Ok(unsafe { state::vm(lua)?.lend_user_hook(state_of(&co)) })
}
