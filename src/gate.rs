//! The gate every native function of the Lua modules is called through.
//!
//! mlua's callbacks read mlua's per-state data, which `lua_close` frees
//! when it finalizes mlua's own guard. Finalizers run in the reverse order
//! their objects were marked, so every object given a finalizer before our
//! module was loaded is finalized after that: a `__gc` there calling an mlua
//! function would read freed memory. Our [`VmGuard`](crate::state::VmGuard) is
//! marked after mlua's data and so is finalized before it; it closes the
//! VM. A gate is a plain C closure that looks at the VM first: once it is
//! closed, the gate answers by itself (raises a clean Lua error, or does
//! nothing where nothing is the right answer) and never enters mlua.
//!
//! On Lua 5.1 and LuaJIT the gate also holds the collector for the
//! duration of the call, so that no finalizer runs inside Rust frames; the
//! collector runs again, and any finalizer due runs, back in Lua code:
//!
//! - mlua is not reentrant there. Each of its protected calls pushes its C
//!   function under `lua_cpcall` (pushing a C function allocates there)
//!   and passes it back through a registry slot with a process-wide key; a
//!   GC step between storing and fetching it (5.1's `lua_cpcall` ends with
//!   a GC check) may run a finalizer that calls into mlua and overwrites
//!   the slot, and the interrupted operation then calls the other one's
//!   function on its own stack (under valgrind: an invalid read in
//!   `lua_rawset`, from `Table::raw_set`'s function called by the protected
//!   call of a `push_string`). On 5.2–5.4 mlua pushes those functions
//!   directly (light C functions, no allocation, no GC step) and the
//!   collector is not held.
//! - LuaJIT rethrows an error raised by a `__gc` metamethod from wherever
//!   the GC step ran, as a foreign exception; inside an mlua callback (any
//!   allocation can run a step) that aborts the process, since Rust cannot
//!   catch foreign exceptions.
//!
//! Holding keeps the user's collector state and pace: the gate saves the
//! collector's threshold, sets it out of reach, and puts it back
//! ([`crate::collector`]), on a VM whose layout was checked at load; a
//! collector the user stopped stays stopped, and no GC step comes due
//! because of the call. Where the layout is not recognised, 5.1 does not
//! hold the collector, and LuaJIT stops and restarts it (a step is then due
//! at the caller's next allocation check: with the JIT on, often a trace
//! exit, where a finalizer's error crashes LuaJIT 2.1 before its fix; see
//! the README's Limitations).

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use mlua::ffi::{self, lua_State};
use mlua::{Function, Lua};

use crate::vm::Vm;

/// What a gate answers once its VM is closed.
#[derive(Clone, Copy)]
pub enum WhenClosed {
    /// Raise this message.
    Raise(&'static str),
    /// Return no values: the call has nothing left to do.
    Nothing,
}

const CALLBACK: c_int = ffi::lua_upvalueindex(1);
const VM: c_int = ffi::lua_upvalueindex(2);
const MESSAGE: c_int = ffi::lua_upvalueindex(3);
/// How the gate holds the collector during the call, a [`Hold`] (none on
/// 5.2–5.4, where nothing reads it).
#[cfg(any(feature = "lua51", feature = "luajit"))]
const HOLD: c_int = ffi::lua_upvalueindex(4);

/// How a gate holds the collector.
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(any(feature = "lua51", feature = "luajit")), allow(dead_code))]
enum Hold {
    /// Not at all.
    None = 0,
    /// Through its threshold, saved and put back ([`crate::collector`]).
    Threshold = 1,
    /// LuaJIT, where the threshold's layout was not recognised: STOP, and
    /// RESTART if it was running.
    StopRestart = 2,
}

/// `callback` behind a gate of the VM `vm`.
pub fn gate(
    lua: &Lua,
    vm: &Arc<Vm>,
    callback: Function,
    when_closed: WhenClosed,
) -> mlua::Result<Function> {
    // One reference per gate, leaked on purpose: the gate may be called
    // after the VM's guard is gone (that is its point), and a closed Vm is
    // inert. A few hundred bytes per VM and module load.
    let vm = Arc::into_raw(vm.clone()) as usize;
    let hold = hold_of(lua);
    // SAFETY: the closure consumes the function mlua pushed for it and leaves
    // the gate on the stack for mlua to take; it pushes at most three values,
    // within the stack space mlua reserves for `exec_raw`.
    unsafe {
        lua.exec_raw::<Function>(callback, move |state| {
            ffi::lua_pushlightuserdata(state, vm as *mut c_void);
            match when_closed {
                WhenClosed::Raise(message) => push_str(state, message),
                WhenClosed::Nothing => ffi::lua_pushnil(state),
            }
            ffi::lua_pushinteger(state, hold as ffi::lua_Integer);
            ffi::lua_pushcclosure(state, call_through_gate, 4);
        })
    }
}

/// A raw C function with the VM `vm` as its first upvalue, not behind a
/// gate: for the few functions whose every instruction counts, which never
/// enter mlua and never allocate Lua memory (so no finalizer runs inside
/// them), and which check [`Vm::is_closed`] themselves through
/// [`closure_vm`].
pub fn raw(lua: &Lua, vm: &Arc<Vm>, func: ffi::lua_CFunction) -> mlua::Result<Function> {
    // Leaked on purpose, as for a gate.
    let vm = Arc::into_raw(vm.clone()) as usize;
    // SAFETY: pushes one light userdata and replaces it with the closure,
    // within the stack space mlua reserves for `exec_raw`.
    unsafe {
        lua.exec_raw::<Function>((), move |state| {
            ffi::lua_pushlightuserdata(state, vm as *mut c_void);
            ffi::lua_pushcclosure(state, func, 1);
        })
    }
}

/// The VM of a function made by [`raw`].
///
/// # Safety
/// Called by a function made by [`raw`], with its `state`.
pub unsafe fn closure_vm<'a>(state: *mut lua_State) -> &'a Vm {
    // SAFETY: the upvalue is a `Vm` leaked by `raw`, alive for the process.
    unsafe { &*(ffi::lua_touserdata(state, ffi::lua_upvalueindex(1)) as *const Vm) }
}

/// Lua 5.1 and LuaJIT: the gates hold the collector through its threshold
/// if the VM's layout is the one [`crate::collector`] knows (checked once
/// per VM); otherwise not at all on 5.1, by STOP and RESTART on LuaJIT.
#[cfg(any(feature = "lua51", feature = "luajit"))]
fn hold_of(lua: &Lua) -> Hold {
    struct Checked(bool);
    let verified = match lua.app_data_ref::<Checked>() {
        Some(checked) => checked.0,
        None => {
            let state = lua.current_thread().to_pointer() as *mut lua_State;
            // SAFETY: `state` is the running thread, kept alive by the
            // running call, and this OS thread runs its VM.
            let verified = unsafe { crate::collector::verify(state) };
            lua.set_app_data(Checked(verified));
            verified
        }
    };
    match verified {
        true => Hold::Threshold,
        false if cfg!(feature = "luajit") => Hold::StopRestart,
        false => Hold::None,
    }
}

/// Lua 5.2–5.4: the gates leave the collector alone (see the module
/// comment).
#[cfg(not(any(feature = "lua51", feature = "luajit")))]
fn hold_of(_: &Lua) -> Hold {
    Hold::None
}

/// Builds a module table's functions from `(name, callback, when_closed)`.
pub fn set_all(
    lua: &Lua,
    table: &mlua::Table,
    vm: &Arc<Vm>,
    functions: Vec<(&str, Function, WhenClosed)>,
) -> mlua::Result<()> {
    for (name, callback, when_closed) in functions {
        table.set(name, gate(lua, vm, callback, when_closed)?)?;
    }
    Ok(())
}

/// Puts every function of `table` behind a gate of `vm`.
pub fn gate_table(
    lua: &Lua,
    vm: &Arc<Vm>,
    table: &mlua::Table,
    when_closed: WhenClosed,
) -> mlua::Result<()> {
    let functions: Vec<(mlua::Value, Function)> = table
        .pairs::<mlua::Value, mlua::Value>()
        .filter_map(|pair| match pair {
            Ok((key, mlua::Value::Function(function))) => Some(Ok((key, function))),
            Ok(_) => None,
            Err(err) => Some(Err(err)),
        })
        .collect::<mlua::Result<_>>()?;
    for (key, function) in functions {
        table.raw_set(key, gate(lua, vm, function, when_closed)?)?;
    }
    Ok(())
}

/// # Safety
/// `state` is the running thread, with a free stack slot; the push may
/// raise (out of memory), so nothing with a destructor may be alive in
/// the caller's frame.
unsafe fn push_str(state: *mut lua_State, text: &str) {
    ffi::lua_pushlstring(state, text.as_ptr().cast(), text.len());
}

/// The gate. Nothing with a destructor lives in this frame: it ends in
/// `lua_error` when closed, errors of the callback pass through it, and
/// so may a finalizer's, from the GC step the call made due.
unsafe extern "C-unwind" fn call_through_gate(state: *mut lua_State) -> c_int {
    // SAFETY: the upvalue is a `Vm` leaked by `gate`, alive for the process.
    let vm = &*(ffi::lua_touserdata(state, VM) as *const Vm);
    if vm.is_closed() {
        if ffi::lua_isnil(state, MESSAGE) != 0 {
            return 0;
        }
        ffi::lua_pushvalue(state, MESSAGE);
        ffi::lua_error(state);
    }
    vm.note_owner();
    let nargs = ffi::lua_gettop(state);
    if ffi::lua_checkstack(state, 2) == 0 {
        push_str(state, "stack overflow (calling a corowatch function)");
        ffi::lua_error(state);
    }
    ffi::lua_pushvalue(state, CALLBACK);
    ffi::lua_insert(state, 1);
    call(state, nargs);
    ffi::lua_gettop(state)
}

/// Calls the function below `nargs` arguments, leaving its results. Lua
/// 5.2–5.4: the collector is never held.
///
/// # Safety
/// `state` runs a gate, with the function and its `nargs` arguments on
/// top; errors pass through, so nothing with a destructor may be alive
/// in the caller's frame.
#[cfg(not(any(feature = "lua51", feature = "luajit")))]
unsafe fn call(state: *mut lua_State, nargs: c_int) {
    ffi::lua_call(state, nargs, ffi::LUA_MULTRET);
}

/// Calls the function below `nargs` arguments, leaving its results; with
/// the collector held meanwhile if the gate says so (see the module
/// comment), an error being raised again once the collector is released.
///
/// # Safety
/// As for the other `call`.
#[cfg(any(feature = "lua51", feature = "luajit"))]
unsafe fn call(state: *mut lua_State, nargs: c_int) {
    let hold = match ffi::lua_tointeger(state, HOLD) {
        1 => Hold::Threshold,
        2 => Hold::StopRestart,
        _ => Hold::None,
    };
    if hold == Hold::None {
        ffi::lua_call(state, nargs, ffi::LUA_MULTRET);
        return;
    }
    let held = match hold {
        // SAFETY: the gate holds this way only on a VM `collector::verify`
        // accepted, and `state` is its running thread, on this OS thread.
        Hold::Threshold => unsafe { crate::collector::hold(state) },
        _ => stop(state),
    };
    let status = ffi::lua_pcall(state, nargs, ffi::LUA_MULTRET, 0);
    match hold {
        // A step the call made due runs now if it succeeded (it may raise
        // a finalizer's error), else at the next collection check.
        // SAFETY: as above.
        Hold::Threshold => unsafe { crate::collector::release(state, held, status == 0) },
        _ => restart(state, held),
    }
    if status != 0 {
        ffi::lua_error(state);
    }
}

/// LuaJIT, layout not recognised: stops the collector if it runs; returns
/// 1 if it did.
///
/// # Safety
/// `state` is the running thread of its VM, on this OS thread.
#[cfg(any(feature = "lua51", feature = "luajit"))]
unsafe fn stop(state: *mut lua_State) -> usize {
    const LUA_GCISRUNNING: c_int = 9;
    let was_running = cfg!(feature = "luajit") && ffi::lua_gc(state, LUA_GCISRUNNING, 0) != 0;
    if was_running {
        ffi::lua_gc(state, ffi::LUA_GCSTOP, 0);
    }
    usize::from(was_running)
}

/// Restarts the collector if [`stop`] stopped it.
///
/// # Safety
/// As for [`stop`], whose answer `was_running` is.
#[cfg(any(feature = "lua51", feature = "luajit"))]
unsafe fn restart(state: *mut lua_State, was_running: usize) {
    if was_running == 1 {
        // 0: a step at the next allocation, as if the collector had never
        // stopped (-1 would push its next cycle out at every call: a loop
        // of calls would never collect).
        ffi::lua_gc(state, ffi::LUA_GCRESTART, 0);
    }
}
