//! The native part of `corowatch.task`: what the Lua scheduler cannot do
//! itself. Deadlines on the watchdog ([`deadline`]), the scheduler's cell
//! that says which thread runs a task now ([`cell`]), and the per-VM
//! mailbox with the cross-thread cancel and the idle sleep it cuts short
//! ([`mailbox`]), and the traceback of an error raised in a task
//! ([`traceback`]).
//! Cancels themselves are delivered by the one hook, as mtint interrupts of
//! the task's thread; `lua/corowatch/task.lua` sets their handler.

mod cell;
mod deadline;
mod mailbox;
mod traceback;

use std::sync::Arc;
use std::time::Duration;

use mlua::{Lua, Table, UserData, UserDataRef, Value};

use crate::registry::Id;
use crate::state;
use cell::{Cell, CellHandle};
use deadline::Deadline;
use mailbox::Mailbox;

/// The Lua handle on this VM's mailbox.
struct MailboxHandle(Arc<Mailbox>);

/// No methods: every operation is a function of the module's table, which
/// goes behind the gate like all our functions (`crate::gate`). A userdata
/// method would not: it would enter mlua after `lua_close` freed mlua's
/// data, and on Lua 5.1 run with the collector free to call a finalizer
/// that re-enters mlua half-way through the method.
impl UserData for MailboxHandle {}

/// `drain(mailbox)` -> `{ id1, reason1 or false, id2, ... }`, or nil if
/// no cancel came.
fn drain(lua: &Lua, mailbox: UserDataRef<MailboxHandle>) -> mlua::Result<Option<Table>> {
    let cancels = mailbox.0.drain();
    if cancels.is_empty() {
        return Ok(None);
    }
    let list = lua.create_table_with_capacity(cancels.len() * 2, 0)?;
    for (id, reason) in cancels {
        list.raw_push(id)?;
        match reason {
            Some(reason) => list.raw_push(reason)?,
            None => list.raw_push(false)?,
        }
    }
    Ok(Some(list))
}

pub fn module(lua: &Lua) -> mlua::Result<Table> {
    // mlua creates a userdata type's metatable on its first object, without
    // protection (see `state::warm_up_metatable`): create them now, at load,
    // where a memory error is only a failed `require`. Created later, inside
    // a call that a finalizer or a handler re-enters, it also crashed 5.1.
    let cell = Cell::new(0);
    drop(lua.create_userdata(CellHandle(cell.clone()))?);
    drop(lua.create_userdata(Deadline::inert(cell))?);
    drop(lua.create_userdata(MailboxHandle(mailbox::of_vm(&state::vm(lua)?)))?);
    let task = lua.create_table()?;
    task.set(
        "cell",
        lua.create_function(|_, id: Id| Ok(CellHandle(Cell::new(id))))?,
    )?;
    task.set(
        "cell_set",
        lua.create_function(|_, (cell, id): (UserDataRef<CellHandle>, Id)| Ok(cell.set(id)))?,
    )?;
    task.set(
        "deadline_cancel",
        lua.create_function(|_, deadline: UserDataRef<Deadline>| {
            deadline.cancel();
            Ok(())
        })?,
    )?;
    task.set(
        "mailbox_set_cell",
        lua.create_function(
            |_, (mailbox, cell): (UserDataRef<MailboxHandle>, UserDataRef<CellHandle>)| {
                mailbox.0.set_cell(cell.0.clone());
                Ok(())
            },
        )?,
    )?;
    task.set(
        "mailbox_register",
        lua.create_function(|_, (mailbox, id): (UserDataRef<MailboxHandle>, Id)| {
            mailbox.0.register(id);
            Ok(())
        })?,
    )?;
    task.set(
        "mailbox_unregister",
        lua.create_function(|_, (mailbox, id): (UserDataRef<MailboxHandle>, Id)| {
            mailbox.0.unregister(id);
            Ok(())
        })?,
    )?;
    task.set("mailbox_drain", lua.create_function(drain)?)?;
    task.set(
        "mailbox_fd",
        lua.create_function(|_, mailbox: UserDataRef<MailboxHandle>| Ok(mailbox.0.fd()))?,
    )?;
    // mailbox_sleep(mailbox, seconds or nil) -> whether a cancel arrived
    task.set(
        "mailbox_sleep",
        lua.create_function(
            |_, (mailbox, seconds): (UserDataRef<MailboxHandle>, Option<f64>)| {
                // Beyond what a `Duration` holds (about 5.8e11 years):
                // as long as it takes, like no timeout.
                let timeout = seconds
                    .filter(|s| s.is_finite())
                    .and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok());
                Ok(mailbox.0.sleep(timeout))
            },
        )?,
    )?;
    // deadline(cell, seconds, sticky, [grace], [lead])
    task.set(
        "deadline",
        lua.create_function(
            |_,
             (cell, seconds, sticky, grace, lead): (
                UserDataRef<CellHandle>,
                f64,
                bool,
                Option<f64>,
                Option<bool>,
            )| {
                let seconds = if seconds.is_finite() {
                    seconds.max(0.0)
                } else {
                    0.0
                };
                let grace = grace.and_then(|grace| Duration::try_from_secs_f64(grace).ok());
                Ok(Deadline::new(
                    cell.0.clone(),
                    seconds,
                    sticky,
                    grace,
                    lead.unwrap_or(false),
                ))
            },
        )?,
    )?;
    task.set("traceback", lua.create_function(traceback::traceback)?)?;
    task.set(
        "queued_timers",
        lua.create_function(|_, ()| Ok(crate::watchdog::queued_timers()))?,
    )?;
    task.set(
        "mailbox",
        lua.create_function(|lua, ()| Ok(MailboxHandle(mailbox::of_vm(&state::vm(lua)?))))?,
    )?;
    task.set(
        "cancel_id",
        lua.create_function(|lua, (id, reason): (Id, Value)| {
            let reason = match reason {
                Value::Nil => None,
                other => Some(other.to_string()?),
            };
            let caller = state::vm(lua).ok();
            Ok(mailbox::cancel_id(id, reason, caller.as_ref()))
        })?,
    )?;
    Ok(task)
}
