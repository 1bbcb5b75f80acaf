//! mtint's native half: ids, handlers, interrupts and interruptible handles.
//!
//! These functions are called by `lua/mtint.lua`, which checks argument types
//! and raises the errors: a function here returns `nil, message` where the
//! Lua side is to raise `message` (a plain string, as mtint's errors are).

use std::ffi::c_int;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use mlua::ffi::{self, lua_State};
use mlua::{Function, Lua, MultiValue, Table, Thread, UserData, UserDataRef, Value};

use crate::arming::Side;
use crate::contained::contained;
use crate::errors;
use crate::gate::{self, WhenClosed};
use crate::registry::{self, Id, Target};
use crate::stack_room::Room;
use crate::state;
use crate::vm::{Request, Vm};
use crate::watchdog;

/// A native interruptible handle: keeps its target's id known.
struct Handle(Arc<Target>);

impl Handle {
    fn new(target: Arc<Target>) -> Handle {
        target.handles.fetch_add(1, Ordering::SeqCst);
        Handle(target)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.handles.fetch_sub(1, Ordering::SeqCst);
    }
}

impl UserData for Handle {}

/// The VM is closing: mtint's functions raise this.
const CLOSING: &str = "mtint.error.not_supported: the Lua state is closing";

pub fn module(lua: &Lua) -> mlua::Result<Table> {
    let mtint = lua.create_table()?;
    let vm = state::vm(lua)?;
    state::warm_up_metatable(lua, &vm, Handle::new)?;
    let raise = WhenClosed::Raise(CLOSING);
    gate::set_all(
        lua,
        &mtint,
        &vm,
        vec![
            ("id", lua.create_function(id)?, raise),
            ("sethook", lua.create_function(sethook)?, raise),
            ("interrupt", lua.create_function(interrupt_id)?, raise),
            ("handle", lua.create_function(handle)?, raise),
            (
                "interrupt_handle",
                lua.create_function(interrupt_handle)?,
                raise,
            ),
        ],
    )?;
    mtint.set("interrupt_known", gate::raw(lua, &vm, interrupt_known)?)?;
    Ok(mtint)
}

/// `id([thread])`: the id of `thread`, or of the running thread.
fn id(lua: &Lua, thread: Option<Thread>) -> mlua::Result<MultiValue> {
    let thread = thread.unwrap_or_else(|| lua.current_thread());
    match state::id_of(lua, &thread)? {
        Ok(id) => lua.pack_multi(id),
        Err(message) => lua.pack_multi((Value::Nil, message)),
    }
}

/// `sethook([thread], handler)`
fn sethook(lua: &Lua, (thread, handler): (Option<Thread>, Option<Function>)) -> mlua::Result<()> {
    let thread = thread.unwrap_or_else(|| lua.current_thread());
    state::set_handler(lua, &thread, handler)
}

fn request(name: &str) -> mlua::Result<Request> {
    match name {
        "once" => Ok(Request::Once),
        "sticky" => Ok(Request::Sticky),
        "clear" => Ok(Request::Clear),
        _ => Err(mlua::Error::runtime(format!(
            "unknown interrupt request '{name}'"
        ))),
    }
}

fn unknown(id: Id) -> String {
    format!("{}: interruptible id {id}", errors::UNKNOWN_OBJECT)
}

/// Applies `request` to `target`, asked from the VM `caller`: true if it
/// is alive and was signalled.
fn apply(caller: &Vm, target: Arc<Target>, request: Request) -> bool {
    // The caller runs on its VM's own thread: if that is the target's VM,
    // the hook can be installed at once, whatever hook runs.
    let side = if std::ptr::eq(caller, &*target.vm) {
        Side::Owner
    } else {
        Side::Afar
    };
    let (alive, queue_rearm) = target.vm.interrupt(target.id, request, side);
    if queue_rearm {
        watchdog::schedule_rearm(&target);
    }
    alive
}

/// Applies `request` to the target `id`: its answer, or `None` if the id
/// is unknown. A dead target's id stays known (answer false) only while an
/// interruptible object holds it; otherwise it is unknown at once, even if
/// the thread's guard has not been finalized yet.
fn interrupt(caller: &Vm, id: Id, request: Request) -> Option<bool> {
    let target = registry::lookup(id)?;
    let held = target.handles.load(Ordering::SeqCst) > 0;
    let alive = apply(caller, target, request);
    (alive || held).then_some(alive)
}

/// `interrupt(id, request)` -> true | false | nil, message
fn interrupt_id(lua: &Lua, (id, name): (Id, String)) -> mlua::Result<MultiValue> {
    let request = request(&name)?;
    match interrupt(&*state::vm(lua)?, id, request) {
        Some(alive) => lua.pack_multi(alive),
        None => lua.pack_multi((Value::Nil, unknown(id))),
    }
}

/// `interrupt_known(id, flag)` -> true | false, or nothing: `interrupt`
/// for the case that needs no message, a known id (a number) and a flag
/// that is a boolean or nil. For anything else it returns nothing, and
/// the Lua side takes the long way, which says what is wrong.
///
/// A raw C function (see [`gate::raw`]): a thread is interrupted because
/// it runs away, and the time from this call to its error is what its
/// host waits for. mlua's callback machinery was two thirds of the call.
/// Nothing here allocates Lua memory (so no collector step, and no
/// finalizer, runs inside) or raises.
unsafe extern "C-unwind" fn interrupt_known(state: *mut lua_State) -> c_int {
    // SAFETY: made by `gate::raw`, called with its own state, as every
    // call below is: a C function may read its arguments and push its
    // result (the room made here).
    let vm = unsafe { gate::closure_vm(state) };
    // SAFETY: called by Lua, nothing pushed yet.
    let _result = unsafe { Room::<1>::on_entry() };
    if vm.is_closed() || unsafe { ffi::lua_type(state, 1) } != ffi::LUA_TNUMBER {
        return 0;
    }
    let request = match unsafe { ffi::lua_type(state, 2) } {
        ffi::LUA_TNIL | ffi::LUA_TNONE => Request::Once,
        ffi::LUA_TBOOLEAN if unsafe { ffi::lua_toboolean(state, 2) } != 0 => Request::Sticky,
        ffi::LUA_TBOOLEAN => Request::Clear,
        _ => return 0,
    };
    let number = unsafe { ffi::lua_tonumber(state, 1) };
    // Ids are integers below 2^53: exact as a double.
    if !(0.0..9_007_199_254_740_992.0).contains(&number) || number.fract() != 0.0 {
        return 0;
    }
    vm.note_owner();
    // A panic must not cross into Lua: it answers nothing, and the long
    // way says what went wrong.
    match contained(None, || interrupt(vm, number as Id, request)) {
        Some(alive) => {
            unsafe { ffi::lua_pushboolean(state, c_int::from(alive)) };
            1
        }
        None => 0,
    }
}

/// `handle(id)` -> handle | nil, message
fn handle(lua: &Lua, id: Id) -> mlua::Result<MultiValue> {
    match registry::lookup(id) {
        Some(target) => lua.pack_multi(Handle::new(target)),
        None => lua.pack_multi((Value::Nil, unknown(id))),
    }
}

/// `interrupt_handle(handle, request)` -> true | false
fn interrupt_handle(
    lua: &Lua,
    (handle, name): (UserDataRef<Handle>, String),
) -> mlua::Result<bool> {
    Ok(apply(&*state::vm(lua)?, handle.0.clone(), request(&name)?))
}
