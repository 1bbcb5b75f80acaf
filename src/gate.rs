//! The gate every native function of the Lua modules is called through.
//!
//! mlua's callbacks read mlua's per-state data, which `lua_close` frees
//! when it finalizes mlua's own guard. Finalizers run in the reverse order
//! their objects were marked, so every object given a finalizer before our
//! module was loaded is finalized after that: a `__gc` there calling an mlua
//! function would read freed memory. Our [`VmGuard`](crate::vm::VmGuard) is
//! marked after mlua's data and so is finalized before it; it closes the
//! VM. A gate is a plain C closure that looks at the VM first: once it is
//! closed, the gate answers by itself (raises a clean Lua error, or does
//! nothing where nothing is the right answer) and never enters mlua.
//!
//! LuaJIT also rethrows an error raised by a `__gc` metamethod from
//! wherever the GC step ran, as a foreign exception; inside an mlua callback
//! (any allocation can run a step) that aborts the process, since Rust
//! cannot catch foreign exceptions. There the gate holds the collector for
//! the duration of the call, so no finalizer runs inside Rust frames; the
//! collector runs again, and the finalizer raises, back in Lua code.

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
    // SAFETY: the closure consumes the function mlua pushed for it and leaves
    // the gate on the stack for mlua to take; it pushes at most two values,
    // within the stack space mlua reserves for `exec_raw`.
    unsafe {
        lua.exec_raw::<Function>(callback, move |state| {
            ffi::lua_pushlightuserdata(state, vm as *mut c_void);
            match when_closed {
                WhenClosed::Raise(message) => push_str(state, message),
                WhenClosed::Nothing => ffi::lua_pushnil(state),
            }
            ffi::lua_pushcclosure(state, call_through_gate, 3);
        })
    }
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

unsafe fn push_str(state: *mut lua_State, text: &str) {
    ffi::lua_pushlstring(state, text.as_ptr().cast(), text.len());
}

/// The gate. Nothing with a destructor lives in this frame: it ends in
/// `lua_error` when closed, and errors of the callback pass through it.
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

/// Calls the function below `nargs` arguments, leaving its results.
#[cfg(not(feature = "luajit"))]
unsafe fn call(state: *mut lua_State, nargs: c_int) {
    ffi::lua_call(state, nargs, ffi::LUA_MULTRET);
}

/// LuaJIT: the same, with the collector held meanwhile (see the module
/// comment); an error is raised again once the collector runs again.
#[cfg(feature = "luajit")]
unsafe fn call(state: *mut lua_State, nargs: c_int) {
    const LUA_GCISRUNNING: c_int = 9;
    let was_running = ffi::lua_gc(state, LUA_GCISRUNNING, 0) != 0;
    if was_running {
        ffi::lua_gc(state, ffi::LUA_GCSTOP, 0);
    }
    let status = ffi::lua_pcall(state, nargs, ffi::LUA_MULTRET, 0);
    if was_running {
        // 0: a step at the next allocation, as if the collector had never
        // stopped (-1 would push its next cycle out at every call: a loop
        // of calls would never collect).
        ffi::lua_gc(state, ffi::LUA_GCRESTART, 0);
    }
    if status != 0 {
        ffi::lua_error(state);
    }
}
