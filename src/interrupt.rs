//! mtint's native half: ids, handlers, interrupts and interruptible handles.
//!
//! These functions are called by `lua/mtint.lua`, which checks argument types
//! and raises the errors: a function here returns `nil, message` where the
//! Lua side is to raise `message` (a plain string, as mtint's errors are).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use mlua::{Function, Lua, MultiValue, Table, Thread, UserData, UserDataRef, Value};

use crate::arming::Side;
use crate::errors;
use crate::gate::{self, WhenClosed};
use crate::registry::{self, Id, Target};
use crate::state;
use crate::vm::Request;
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

/// Applies `request` to `target`: true if it is alive and was signalled.
fn apply(lua: &Lua, target: Arc<Target>, request: Request) -> mlua::Result<bool> {
    // The caller runs on its VM's own thread: if that is the target's VM,
    // the hook can be installed at once, whatever hook runs.
    let side = if Arc::ptr_eq(&state::vm(lua)?, &target.vm) {
        Side::Owner
    } else {
        Side::Afar
    };
    let (alive, queue_rearm) = target.vm.interrupt(target.id, request, side);
    if queue_rearm {
        watchdog::schedule_rearm(&target);
    }
    Ok(alive)
}

/// `interrupt(id, request)` -> true | false | nil, message
///
/// A dead target's id stays known (answer false) only while an
/// interruptible object holds it; otherwise it is unknown at once, even if
/// the thread's guard has not been finalized yet.
fn interrupt_id(lua: &Lua, (id, name): (Id, String)) -> mlua::Result<MultiValue> {
    let request = request(&name)?;
    let Some(target) = registry::lookup(id) else {
        return lua.pack_multi((Value::Nil, unknown(id)));
    };
    let held = target.handles.load(Ordering::SeqCst) > 0;
    let alive = apply(lua, target, request)?;
    if alive || held {
        lua.pack_multi(alive)
    } else {
        lua.pack_multi((Value::Nil, unknown(id)))
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
    apply(lua, handle.0.clone(), request(&name)?)
}
