//! The scheduler's cell: the id of the thread that runs a task right now.
//!
//! The Lua scheduler sets it before each resume (on Lua 5.1, `task.pcall`
//! moves it to the coroutine it runs its function on). Deadlines and
//! cross-thread cancels read it when they fire and interrupt that thread:
//! the interrupt handler there decides what is due, for that task or for
//! the ancestor whose timeout or cancel covers it. A suspended task needs
//! no interrupt: the scheduler checks it when it wakes.
//!
//! While no task runs the cell names no thread (id 0), and an interrupt
//! asked for then reaches nobody. It is not lost: every interrupt asked
//! for raises `asked` first, and moving the cell answers whether it was
//! raised since the last move, so the scheduler looks (its mailbox, its
//! timers) before the task it moves the cell to runs. The interrupter
//! raises `asked`, then reads the thread; the scheduler writes the thread,
//! then takes `asked` (both sequentially consistent): either the
//! interrupter sees the new thread and interrupts it, or the scheduler
//! sees `asked` and looks, or both.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use mlua::UserData;

use crate::arming::Side;
use crate::registry::{self, Id};
use crate::vm::Request;
use crate::watchdog;

/// Shared between the Lua side (which moves it), deadlines and the mailbox.
pub struct Cell {
    thread: AtomicU64,
    /// An interrupt was asked for since the cell last moved.
    asked: AtomicBool,
}

impl Cell {
    pub fn new(id: Id) -> Arc<Cell> {
        Arc::new(Cell {
            thread: AtomicU64::new(id),
            asked: AtomicBool::new(false),
        })
    }

    /// Interrupts the thread the task runs on now, as `mtint.interrupt`
    /// does (`side` says whether the caller runs on that thread's VM).
    /// Returns false if no thread, or that thread is gone.
    pub fn interrupt(&self, request: Request, side: Side) -> bool {
        self.asked.store(true, Ordering::SeqCst);
        interrupt_id(self.thread.load(Ordering::SeqCst), request, side)
    }

    /// Moves the cell to the thread with this id (0: none); returns
    /// whether an interrupt was asked for since the last move.
    fn move_to(&self, id: Id) -> bool {
        self.thread.store(id, Ordering::SeqCst);
        self.asked.swap(false, Ordering::SeqCst)
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
    /// Moves the cell to the thread with this id (the Lua scheduler);
    /// returns whether an interrupt was asked for since its last move.
    pub fn set(&self, id: Id) -> bool {
        self.0.move_to(id)
    }
}

/// No methods: the Lua side calls `task.cell_set`, a gated function (see
/// `super::module`).
impl UserData for CellHandle {}
