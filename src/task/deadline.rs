//! Deadlines: interrupt a task's running thread at a wall-clock time, on
//! the watchdog thread (timeouts, and the grace period after a cancel).
//!
//! A deadline is a userdata: `cancel()` (or its collection) takes it out of
//! the watchdog's queue, so a scope that ends leaves no timer behind. A
//! deadline that fires interrupts the thread in its task's cell, once or
//! sticky; the Lua handler on that thread decides what, if anything, is due.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlua::UserData;

use super::cell::Cell;
use crate::arming::Side;
use crate::vm::Request;
use crate::watchdog::{self, Timer};

struct Job {
    cell: Arc<Cell>,
    request: Request,
    cancelled: AtomicBool,
}

impl Timer for Job {
    fn fire(&self) {
        if !self.cancelled.load(Ordering::SeqCst) {
            self.cell.interrupt(self.request, Side::Afar);
        }
    }
}

/// The Lua handle on a scheduled deadline.
pub struct Deadline {
    job: Arc<Job>,
    token: u64,
}

impl Deadline {
    /// Schedules an interrupt of `cell`'s thread in `seconds` (finite, >= 0).
    pub fn new(cell: Arc<Cell>, seconds: f64, sticky: bool) -> Deadline {
        let job = Arc::new(Job {
            cell,
            request: if sticky {
                Request::Sticky
            } else {
                Request::Once
            },
            cancelled: AtomicBool::new(false),
        });
        let due = Instant::now() + Duration::from_secs_f64(seconds);
        let token = watchdog::schedule_timer(job.clone(), due);
        Deadline { job, token }
    }

    /// A deadline that was never scheduled: only to make mlua create the
    /// type's metatable at load.
    pub fn inert(cell: Arc<Cell>) -> Deadline {
        let job = Arc::new(Job {
            cell,
            request: Request::Once,
            cancelled: AtomicBool::new(true),
        });
        Deadline { job, token: 0 }
    }

    pub fn cancel(&self) {
        if !self.job.cancelled.swap(true, Ordering::SeqCst) {
            watchdog::cancel_timer(self.token);
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// No methods: the Lua side calls `task.deadline_cancel`, a gated function
/// (see `super::module`).
impl UserData for Deadline {}
