//! corowatch's `coroutine.resume` and `coroutine.yield`, as C functions.
//!
//! They are the hot path: a Lua wrapper alone costs more than the resume it
//! wraps. Resuming a coroutine that is not watched, while nothing watched
//! runs, costs two table lookups and a protected call of the original
//! `coroutine.resume`. Resuming watched code also tells the VM's chain
//! (one lock, one clock read) before and after, and anchors the coroutine
//! at its depth in a table, where the hook finds it for the dispatcher.
//!
//! The original resume is always called under `lua_pcall`: nothing can leave
//! the chain pointing at a coroutine that does not run (the watchdog arms the
//! chain's top from another thread), and an error is raised again once the
//! chain is right. The resumed coroutine stays on our stack throughout, so
//! it cannot be collected while the chain names it.

use std::ffi::{c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use mlua::ffi::{self, lua_State};

use crate::vm::Vm;
use crate::watch::{Left, Watch};

// Upvalues of `resume`.
const ORIGINAL_RESUME: c_int = ffi::lua_upvalueindex(1);
const VM: c_int = ffi::lua_upvalueindex(2);
const WATCHED: c_int = ffi::lua_upvalueindex(3);
const KILLED: c_int = ffi::lua_upvalueindex(4);
const ANCHORS: c_int = ffi::lua_upvalueindex(5);
// Upvalues of `yield`.
const YIELD_KILLED: c_int = ffi::lua_upvalueindex(1);
const YIELD_VM: c_int = ffi::lua_upvalueindex(2);

/// Pushes `resume` closed over: the original resume, the VM (a pointer the
/// caller keeps alive for the life of the process), the `co -> settings`
/// table, the `co -> kill message` table and the `depth -> co` anchors
/// table, all on the stack in this order except the VM.
///
/// # Safety
/// The stack of `state` holds the four Lua values on top.
pub unsafe fn push_resume(state: *mut lua_State, vm: *const Vm) {
    ffi::lua_pushlightuserdata(state, vm as *mut c_void);
    ffi::lua_insert(state, -4);
    ffi::lua_pushcclosure(state, resume, 5);
}

/// Pushes `yield` closed over the `co -> kill message` table on the stack
/// and the VM (kept alive by the caller for the life of the process).
///
/// # Safety
/// The stack of `state` holds that table on top.
pub unsafe fn push_yield(state: *mut lua_State, vm: *const Vm) {
    ffi::lua_pushlightuserdata(state, vm as *mut c_void);
    ffi::lua_pushcclosure(state, yield_, 2);
}

/// A settings record `{kill, warn, ...}`: limit `index`, if it is one.
unsafe fn limit(state: *mut lua_State, record: c_int, index: c_int) -> Option<Duration> {
    ffi::lua_rawgeti(state, record, index as _);
    let value = ffi::lua_tonumber(state, -1);
    ffi::lua_pop(state, 1);
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|limit| !limit.is_zero())
}

/// Calls the original resume on the stack `[co, co, args...]` (the first
/// `co` stays, keeping the coroutine alive). Returns the pcall status.
unsafe fn call_original(state: *mut lua_State) -> c_int {
    ffi::lua_pushvalue(state, ORIGINAL_RESUME);
    ffi::lua_insert(state, 2);
    ffi::lua_pcall(state, ffi::lua_gettop(state) - 2, ffi::LUA_MULTRET, 0)
}

/// If the coroutine at index 1 was killed, replaces the results of its
/// resume (above index 1) by `false, message`. Returns the result count.
unsafe fn answer(state: *mut lua_State, killed: bool) -> c_int {
    let failed = ffi::lua_type(state, 2) == ffi::LUA_TBOOLEAN && ffi::lua_toboolean(state, 2) == 0;
    if killed || failed {
        ffi::lua_pushvalue(state, 1);
        ffi::lua_rawget(state, KILLED);
        if ffi::lua_isnil(state, -1) == 0 {
            ffi::lua_replace(state, 1);
            ffi::lua_settop(state, 1);
            ffi::lua_pushboolean(state, 0);
            ffi::lua_insert(state, 1);
            return 2;
        }
        ffi::lua_pop(state, 1);
    }
    ffi::lua_remove(state, 1);
    ffi::lua_gettop(state)
}

/// `resume(co, ...)`, same results as `coroutine.resume`; a killed
/// coroutine answers `false, message`.
///
/// Nothing with a destructor lives in this frame: it may end in
/// `lua_error`, and the Rust calls that lock run in their own frames.
unsafe extern "C-unwind" fn resume(state: *mut lua_State) -> c_int {
    let co = ffi::lua_tothread(state, 1);
    if co.is_null() || ffi::lua_checkstack(state, 4) == 0 {
        // Not a coroutine: let the original raise its usual error.
        ffi::lua_pushvalue(state, ORIGINAL_RESUME);
        ffi::lua_insert(state, 1);
        ffi::lua_call(state, ffi::lua_gettop(state) - 1, ffi::LUA_MULTRET);
        return ffi::lua_gettop(state);
    }
    // SAFETY: the upvalue is a `Vm` kept alive for the process's life.
    let vm = &*(ffi::lua_touserdata(state, VM) as *const Vm);
    ffi::lua_pushvalue(state, 1);
    ffi::lua_rawget(state, WATCHED);
    let watched = ffi::lua_type(state, -1) == ffi::LUA_TTABLE;
    let limits = if watched {
        let record = ffi::lua_gettop(state);
        Some((limit(state, record, 1), limit(state, record, 2)))
    } else {
        None
    };
    ffi::lua_pop(state, 1);
    // Keep `co` below everything: it stays alive while the chain names it.
    ffi::lua_pushvalue(state, 1);
    ffi::lua_insert(state, 1);

    if !watched && !vm.is_active() {
        let status = call_original(state);
        let mut killed = false;
        if vm.is_active() {
            // The coroutine watched itself (watch(nil)): it is the chain's
            // root, and is not running any more.
            let left = leave_root(vm, co);
            unanchor(state, left.depth);
            killed = left.killed;
        }
        if status != ffi::LUA_OK {
            ffi::lua_error(state);
        }
        return answer(state, killed);
    }

    let depth = enter(vm, state, co, limits);
    ffi::lua_pushvalue(state, 1);
    ffi::lua_rawseti(state, ANCHORS, depth as _);
    let status = call_original(state);
    let left = leave(vm, state);
    unanchor(state, left.depth);
    if status != ffi::LUA_OK {
        ffi::lua_error(state);
    }
    answer(state, left.killed)
}

/// Clears the anchor at `depth` (false, not nil: a slot set to nil and back
/// costs Lua a rehash).
unsafe fn unanchor(state: *mut lua_State, depth: usize) {
    if depth > 0 {
        ffi::lua_pushboolean(state, 0);
        ffi::lua_rawseti(state, ANCHORS, depth as _);
    }
}

/// `yield(...)`: `coroutine.yield`, but a killed coroutine cannot yield.
///
/// (While a killed coroutine runs, the hook raises at its every
/// instruction, so this check is a second line; it costs a table lookup
/// only while something watched runs.)
unsafe extern "C-unwind" fn yield_(state: *mut lua_State) -> c_int {
    // SAFETY: the upvalue is a `Vm` kept alive for the process's life.
    let vm = &*(ffi::lua_touserdata(state, YIELD_VM) as *const Vm);
    if vm.is_active() && ffi::lua_checkstack(state, 1) != 0 {
        ffi::lua_pushthread(state);
        ffi::lua_rawget(state, YIELD_KILLED);
        if ffi::lua_isnil(state, -1) == 0 {
            ffi::lua_error(state);
        }
        ffi::lua_pop(state, 1);
    }
    ffi::lua_yield(state, ffi::lua_gettop(state))
}

// The calls into the VM, in frames of their own (they lock), with panics
// kept out of C.

fn enter(
    vm: &Vm,
    resumer: *mut lua_State,
    co: *mut lua_State,
    limits: Option<(Option<Duration>, Option<Duration>)>,
) -> usize {
    catch_unwind(AssertUnwindSafe(|| {
        let watch = limits.map(|(kill, warn)| Watch::start(kill, warn, Instant::now()));
        vm.enter(resumer, co, watch)
    }))
    .unwrap_or(0)
}

fn leave(vm: &Vm, resumer: *mut lua_State) -> Left {
    catch_unwind(AssertUnwindSafe(|| vm.leave(resumer))).unwrap_or_default()
}

fn leave_root(vm: &Vm, co: *mut lua_State) -> Left {
    catch_unwind(AssertUnwindSafe(|| vm.leave_root(co))).unwrap_or_default()
}
