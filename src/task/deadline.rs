//! Deadlines: interrupt a task's running thread at a wall-clock time, on
//! the watchdog thread (timeouts, and the grace period after a cancel).
//!
//! A deadline is a userdata: `cancel()` (or its collection) takes it out of
//! the watchdog's queue, so a scope that ends leaves no timer behind. A
//! deadline that fires interrupts the thread in its task's cell, once or
//! sticky; the Lua handler on that thread decides what, if anything, is due.
//!
//! A timeout's deadline can have a grace period: fired once, it comes back
//! that much later, sticky. The raise of a timeout then schedules nothing
//! (scheduling a grace deadline there was a tenth of its overshoot).
//!
//! And a lead: it fires [`LEAD`] before its time, sticky, so that the
//! handler runs at every instruction for the last stretch and raises at
//! the deadline itself. It fires again at its time: the sticky interrupt
//! the lead armed may be spent before then (another scope's raise clears
//! the thread's interrupt), and the deadline must not wait for its grace
//! period. The handler's first run after a CPU-bound stretch
//! is all cache misses (tens of µs here); fired at the deadline, that was
//! most of a timeout's overshoot. The same idea as the hook's lead for
//! kills on LuaJIT (`crate::vm`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use mlua::UserData;

use super::cell::Cell;
use crate::arming::Side;
use crate::vm::Request;
use crate::watchdog::{self, Timer};

/// How long before its time a deadline with a lead fires: the handler's
/// cold first run, and on LuaJIT the signal's delivery (How it works).
const LEAD: Duration = if cfg!(feature = "luajit") {
    Duration::from_micros(300)
} else {
    Duration::from_micros(150)
};

struct Job {
    cell: Arc<Cell>,
    request: Request,
    /// The deadline itself (the first firing may come [`LEAD`] earlier).
    due: Instant,
    cancelled: AtomicBool,
    /// Set until the lead's firing happened, if the deadline has a lead.
    lead_pending: AtomicBool,
    /// After the firing at `due`, fire again this much later, sticky.
    grace: Option<Duration>,
    /// This job, to queue it again (at `due` after its lead, and for the
    /// grace period).
    me: Weak<Job>,
    /// Set once the firing at `due` happened (the next one is the grace's).
    fired: AtomicBool,
    /// The token of the timer queued by the last firing (0 before one).
    follow_up_token: AtomicU64,
}

impl Timer for Job {
    fn fire(&self) {
        if self.cancelled.load(Ordering::SeqCst) {
            return;
        }
        if self.lead_pending.swap(false, Ordering::SeqCst) {
            self.cell.interrupt(Request::Sticky, Side::Afar);
            self.follow_up(self.due);
            return;
        }
        let first = !self.fired.swap(true, Ordering::SeqCst);
        if !first {
            self.cell.interrupt(Request::Sticky, Side::Afar);
            return;
        }
        self.cell.interrupt(self.request, Side::Afar);
        // A grace beyond the clock's range never ends: no timer.
        if let Some(at) = self
            .grace
            .and_then(|grace| self.due.max(Instant::now()).checked_add(grace))
        {
            self.follow_up(at);
        }
    }
}

impl Job {
    /// Queues this job's next firing.
    fn follow_up(&self, at: Instant) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let token = watchdog::schedule_timer(me, at);
        self.follow_up_token.store(token, Ordering::SeqCst);
        // `cancel` may have run between our check and the store, and then
        // did not see the token: take the timer out ourselves.
        if self.cancelled.load(Ordering::SeqCst) {
            watchdog::cancel_timer(token);
        }
    }
}

/// The Lua handle on a scheduled deadline.
pub struct Deadline {
    job: Arc<Job>,
    token: u64,
}

impl Deadline {
    /// Schedules an interrupt of `cell`'s thread in `seconds` (finite, >= 0),
    /// and a sticky one `grace` after it, if given; with a `lead`, the
    /// first comes [`LEAD`] early, sticky.
    pub fn new(
        cell: Arc<Cell>,
        seconds: f64,
        sticky: bool,
        grace: Option<Duration>,
        lead: bool,
    ) -> Deadline {
        // Beyond the clock's range: a deadline that never comes.
        let Some(due) = Duration::try_from_secs_f64(seconds)
            .ok()
            .and_then(|ahead| Instant::now().checked_add(ahead))
        else {
            return Deadline::inert(cell);
        };
        let job = Arc::new_cyclic(|me| Job {
            cell,
            request: if sticky || lead {
                Request::Sticky
            } else {
                Request::Once
            },
            due,
            cancelled: AtomicBool::new(false),
            lead_pending: AtomicBool::new(lead),
            grace,
            me: me.clone(),
            fired: AtomicBool::new(false),
            follow_up_token: AtomicU64::new(0),
        });
        let first = if lead {
            due.checked_sub(LEAD).unwrap_or(due)
        } else {
            due
        };
        let token = watchdog::schedule_timer(job.clone(), first);
        Deadline { job, token }
    }

    /// A deadline that was never scheduled: to make mlua create the type's
    /// metatable at load, and for one beyond the clock's range.
    pub fn inert(cell: Arc<Cell>) -> Deadline {
        let job = Arc::new_cyclic(|me| Job {
            cell,
            request: Request::Once,
            due: Instant::now(),
            cancelled: AtomicBool::new(true),
            lead_pending: AtomicBool::new(false),
            grace: None,
            me: me.clone(),
            fired: AtomicBool::new(false),
            follow_up_token: AtomicU64::new(0),
        });
        Deadline { job, token: 0 }
    }

    pub fn cancel(&self) {
        if !self.job.cancelled.swap(true, Ordering::SeqCst) {
            watchdog::cancel_timer(self.token);
            // Queued by the last firing, if one happened (else `fire`
            // sees the flag).
            match self.job.follow_up_token.load(Ordering::SeqCst) {
                0 => {}
                token => watchdog::cancel_timer(token),
            }
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
