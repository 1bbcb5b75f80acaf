//! The scheduler's cell: the id of the thread that runs a task right now.
//!
//! The Lua scheduler sets it before each resume (on Lua 5.1, `task.pcall`
//! moves it to the coroutine it runs its function on). Deadlines and
//! cross-thread cancels read it when they fire and interrupt that thread:
//! the interrupt handler there decides what is due, for that task or for
//! the ancestor whose timeout or cancel covers it. A suspended task needs
//! no interrupt: the scheduler checks it when it wakes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use mlua::UserData;

use crate::arming::Side;
use crate::registry::{self, Id};
use crate::vm::Request;
use crate::watchdog;

/// Shared between the Lua side (which moves it), deadlines and the mailbox.
pub struct Cell(AtomicU64);

impl Cell {
    pub fn new(id: Id) -> Arc<Cell> {
        Arc::new(Cell(AtomicU64::new(id)))
    }

    pub fn get(&self) -> Id {
        self.0.load(Ordering::SeqCst)
    }

    /// Interrupts the thread the task runs on now, as `mtint.interrupt`
    /// does (`side` says whether the caller runs on that thread's VM).
    /// Returns false if that thread is gone.
    pub fn interrupt(&self, request: Request, side: Side) -> bool {
        interrupt_id(self.get(), request, side)
    }
}

/// Interrupts the thread with this id; false if it is unknown or dead.
pub fn interrupt_id(id: Id, request: Request, side: Side) -> bool {
    let Some(target) = registry::lookup(id) else {
        return false;
    };
    let (alive, queue_rearm) = target.vm.interrupt(target.id, request, side);
    if queue_rearm {
        watchdog::schedule_rearm(&target);
    }
    // `target` is dropped here, outside every lock.
    alive
}

/// The Lua handle on a cell.
pub struct CellHandle(pub Arc<Cell>);

impl CellHandle {
    /// Moves the cell to the thread with this id (the Lua scheduler).
    pub fn set(&self, id: Id) {
        self.0 .0.store(id, Ordering::SeqCst);
    }
}

/// No methods: the Lua side calls `task.cell_set`, a gated function (see
/// `super::module`).
impl UserData for CellHandle {}
