//! corowatch's native half, called by `lua/corowatch.lua`: entering and
//! leaving coroutines, watching, the clock, and the dispatcher the hook calls.

use std::ffi::{c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use mlua::{ffi, Function, Lua, Table, Thread};

use crate::hook::{self, DISPATCH_KEY};
use crate::state;
use crate::vm::Vm;
use crate::watch::Watch;

pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let corowatch = lua.create_table()?;
    corowatch.set("make_resume", lua.create_function(make_resume)?)?;
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
    // Checked here too: a Watch with no limit at all would never fire.
    let kill = kill.map(|kill| seconds(kill, "kill limit")).transpose()?;
    let warn = warn.map(|warn| seconds(warn, "warn limit")).transpose()?;
    Ok(Watch::start(kill, warn, Instant::now()))
}

/// `make_resume(resume)` -> the resume of watched code (see
/// [`resume_watched`]), calling `resume`, the original `coroutine.resume`.
fn make_resume(lua: &Lua, resume: Function) -> mlua::Result<Function> {
    // The closure gets the VM as a raw pointer: this reference is leaked on
    // purpose, so the Vm outlives every closure (they may run during
    // `lua_close`, after the VM's guard is gone; a closed Vm is inert).
    let vm = Arc::into_raw(state::vm(lua)?) as *mut c_void;
    // SAFETY: pushes the light userdata and closes over it and the function
    // mlua pushed; returns the closure, which mlua takes from the stack.
    unsafe {
        lua.exec_raw::<Function>(resume, move |state| {
            ffi::lua_pushlightuserdata(state, vm);
            ffi::lua_pushcclosure(state, resume_watched, 2);
        })
    }
}

fn limit(state: *mut ffi::lua_State, index: c_int) -> Option<Duration> {
    // SAFETY: reads a stack slot of the running thread.
    let value = unsafe { ffi::lua_tonumber(state, index) };
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|limit| !limit.is_zero())
}

/// `resume(co, watched, kill, warn, ...)` -> active, resume's results
///
/// Tells the VM's chain that the running thread resumes `co` (watched with
/// these limits, if `watched`), calls the original `coroutine.resume` and
/// tells the chain it returned. The call is protected, so that nothing can
/// leave the chain pointing at a coroutine that does not run; an error is
/// raised again once the chain is right. `active` says whether anything
/// watched still runs.
unsafe extern "C-unwind" fn resume_watched(state: *mut ffi::lua_State) -> c_int {
    // Nothing with a destructor lives in this frame: it ends in lua_error.
    let co = ffi::lua_tothread(state, 1);
    if co.is_null() || ffi::lua_checkstack(state, 2) == 0 {
        return ffi::luaL_error(state, c"corowatch: resume of a non-coroutine".as_ptr());
    }
    let watch = (ffi::lua_toboolean(state, 2) != 0)
        .then(|| Watch::start(limit(state, 3), limit(state, 4), Instant::now()));
    // SAFETY: the upvalue is the leaked `Arc<Vm>` of `make_resume`.
    let vm = &*(ffi::lua_touserdata(state, ffi::lua_upvalueindex(2)) as *const Vm);
    if ffi::lua_gettop(state) < 4 {
        ffi::lua_settop(state, 4);
    }
    for _ in 0..3 {
        ffi::lua_remove(state, 2);
    }
    ffi::lua_pushvalue(state, ffi::lua_upvalueindex(1));
    ffi::lua_insert(state, 1);
    enter_guarded(vm, state, co, watch);
    let status = ffi::lua_pcall(state, ffi::lua_gettop(state) - 1, ffi::LUA_MULTRET, 0);
    let active = leave_guarded(vm, state);
    if status != 0 {
        ffi::lua_error(state);
    }
    ffi::lua_pushboolean(state, active as c_int);
    ffi::lua_insert(state, 1);
    ffi::lua_gettop(state)
}

/// `vm.enter`, with panics kept out of C.
fn enter_guarded(
    vm: &Vm,
    resumer: *mut ffi::lua_State,
    co: *mut ffi::lua_State,
    watch: Option<Watch>,
) {
    let _ = catch_unwind(AssertUnwindSafe(|| vm.enter(resumer, co, watch)));
}

/// `vm.leave`, with panics kept out of C.
fn leave_guarded(vm: &Vm, resumer: *mut ffi::lua_State) -> bool {
    catch_unwind(AssertUnwindSafe(|| vm.leave(resumer))).unwrap_or(false)
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
