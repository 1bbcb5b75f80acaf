//! LuaJIT: a dispatch loop's probe, sampled by the watchdog.
//!
//! On LuaJIT a C `resume` costs more than the whole delivery of an event
//! through LuaJIT's own `coroutine.resume`, which is written in assembly
//! (a supervisor's dispatch, issue 10). So `corowatch.supervisor`'s signal
//! loop resumes its actors with LuaJIT's own resume and tells what it runs
//! through three upvalues of one of its functions, written by plain Lua
//! stores: a count it moves at the start of each delivery, the limit of
//! the actor it delivers to (0 between deliveries) and that actor's
//! coroutine. A fourth upvalue goes the other way: the VM's thread
//! writes the length of corowatch's chain there whenever it publishes it
//! ([`crate::mirror`]), and the loop takes this path only while it is 0
//! (nothing watched runs: a watched coroutine's deadline must still reach
//! the actors it runs, through corowatch's resume). The watchdog reads the
//! first two from its own thread, every so often (the sampling period); a
//! count that stayed the same, in a delivery, for the actor's limit is a
//! runaway actor: the watchdog arms the hook, and the hook, on the VM's
//! thread, reads the count again and has corowatch's dispatcher kill the
//! coroutine (the third upvalue) if it still runs. A kill lands within
//! the limit plus a sampling period (an eighth of the limit, at least
//! 1 ms) after the delivery began; after a stretch with no delivery, the
//! watchdog samples less often (up to half the limit, at most 100 ms:
//! [`idle_cap`]), and the first kill may take that much more.
//!
//! # Why reading the upvalues from another OS thread is sound
//!
//! - The address: a closed upvalue holds its value inside its own object
//!   (`GCupval.tv`), which LuaJIT never moves (its collector does not
//!   move objects). [`locate`] finds that slot by writing two sentinel
//!   numbers through `lua_setupvalue` and checking that the slot holds
//!   each: an open upvalue (its value on a stack, which can move) never
//!   passes. The function is anchored in the registry until `lua_close`,
//!   so its upvalue objects live until then; `lua_close` runs every
//!   finalizer before it frees anything, and the VM's guard's finalizer
//!   marks the VM closed, under the VM lock, before that: the watchdog
//!   samples only under that lock and only while the VM is not closed.
//!   (`debug.upvaluejoin` can take an upvalue object from the function;
//!   the debug library is outside what this guards: the README's
//!   corowatch.supervisor, "Limits and choices".)
//! - The value: a TValue is 8 aligned bytes, stored by LuaJIT's
//!   interpreter (assembly) or its compiled code with one 8-byte store,
//!   which is single-copy atomic on x86-64 and aarch64; the watchdog reads
//!   it with an atomic load, and so sees the value before or after a store,
//!   never a mix. It only compares counts for equality and reads a limit:
//!   a value seen late costs a sample, and the kill is decided on the VM's
//!   own thread, from values read there.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};

use mlua::ffi::{self, lua_State};

use crate::clock::{self, Nanos};
use crate::watchdog::Backoff;

extern "C-unwind" {
    /// LuaJIT's (and Lua 5.2's) `lua_upvalueid`: the upvalue object of a
    /// Lua function (mlua declares it for 5.2 and later only).
    fn lua_upvalueid(state: *mut lua_State, funcindex: c_int, n: c_int) -> *mut c_void;
}

/// Where a closed upvalue's value may be in its object: after the header
/// and two flag bytes, aligned (32-bit references: 8; GC64: 16). Both
/// offsets are inside the smallest upvalue object (24 bytes without
/// GC64, 48 with it).
const VALUE_OFFSETS: [usize; 2] = [8, 16];

/// Two numbers no pair of references and flags can look like twice.
const SENTINELS: [f64; 2] = [1_234_567.890_625, -7_654_321.109_375];

/// At most this many probes per VM (one per load of the supervisor
/// module: reloading it registers its new loop).
pub const MAX_PROBES: usize = 8;

/// Sampling periods: an eighth of the smallest limit, within these bounds.
const MIN_PERIOD: Nanos = 1_000_000;
const MAX_PERIOD: Nanos = 100_000_000;

/// What a sample found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Sample {
    /// No delivery, or one within its limit.
    Quiet,
    /// A delivery ran its whole limit: arm the hook.
    Stalled,
}

/// One registered dispatch loop.
pub struct Probe {
    /// Address of the value of upvalue 1 (the count).
    count: usize,
    /// Address of the value of upvalue 2 (the limit in seconds; 0 or
    /// anything but a positive number: no delivery).
    limit: usize,
    /// The smallest limit the loop announced.
    smallest: Nanos,
    /// How long the watchdog waits between samples while no delivery is
    /// seen: doubled at each sample that finds the count unmoved, from an
    /// eighth of the smallest limit up to half of it (see [`idle_cap`]).
    idle: Nanos,
    /// The count at the last sample.
    last_count: u64,
    /// The count as the first sample of a delivery saw it, and when.
    seen: Option<(u64, Nanos)>,
    /// The count of a delivery that ran its limit: its kill is due while
    /// the count stays the same.
    due: Option<u64>,
    /// While a kill is due: when to arm the hook again (the running thread
    /// can undo an arming).
    retry: Backoff,
    /// A count whose stall the hook found with nothing to kill (its
    /// coroutine no longer runs: a loop cut short left the probe behind):
    /// not timed again until the count moves.
    quiet: Option<u64>,
}

/// The sampling period for a limit of `limit` nanoseconds.
fn period_for(limit: Nanos) -> Nanos {
    (limit / 8).clamp(MIN_PERIOD, MAX_PERIOD)
}

/// The longest wait between samples while nothing is delivered, for a
/// smallest limit of `limit`: a delivery that starts then is first seen
/// at most that late, so a runaway one is killed within 1.625 times its
/// limit (half of it, and a period), at most 100 ms late.
fn idle_cap(limit: Nanos) -> Nanos {
    (limit / 2).clamp(MIN_PERIOD, MAX_PERIOD)
}

/// A limit in seconds, as Lua stored it, in nanoseconds: `None` unless a
/// positive finite number (LuaJIT stores every other value as a NaN).
fn limit_nanos(bits: u64) -> Option<Nanos> {
    let seconds = f64::from_bits(bits);
    (seconds.is_finite() && seconds > 0.0).then(|| (seconds * 1e9).min(u64::MAX as f64) as Nanos)
}

/// Reads the TValue at `address`.
///
/// # Safety
/// `address` is a registered probe's (see the module comment): aligned,
/// and alive while the VM is not closed, which the caller checked under
/// the VM lock.
unsafe fn load(address: usize) -> u64 {
    // SAFETY: the caller's contract; see the module comment for why an
    // atomic load of a TValue the VM stores plainly is sound.
    unsafe { AtomicU64::from_ptr(address as *mut u64).load(Ordering::Relaxed) }
}

/// Stores the number `value` in the TValue at `address`, as
/// `lua_setupvalue` would (a number needs no write barrier).
///
/// # Safety
/// `address` is a registered probe's (alive), and this runs on the VM's
/// own thread, which alone writes it.
pub unsafe fn store(address: usize, value: f64) {
    // SAFETY: the caller's contract.
    unsafe { AtomicU64::from_ptr(address as *mut u64).store(value.to_bits(), Ordering::Relaxed) }
}

/// The address of the value of upvalue `n` of the Lua function at stack
/// index `function` (absolute), if that upvalue is closed and holds a
/// number; its value is left as it was.
///
/// # Safety
/// `state` runs on this OS thread, with 1 free stack slot; the function
/// at `function` is a Lua function with at least `n` upvalues.
pub unsafe fn locate(state: *mut lua_State, function: c_int, n: c_int) -> Option<usize> {
    // SAFETY (the calls below): the caller's contract; each push is popped
    // by the `lua_setupvalue` that follows it, so one slot suffices.
    unsafe {
        if ffi::lua_getupvalue(state, function, n).is_null() {
            return None;
        }
        let original = ffi::lua_tonumber(state, -1);
        let is_number = ffi::lua_type(state, -1) == ffi::LUA_TNUMBER;
        ffi::lua_pop(state, 1);
        if !is_number {
            return None;
        }
        let object = lua_upvalueid(state, function, n) as usize;
        let found = VALUE_OFFSETS.into_iter().find(|&offset| {
            SENTINELS.into_iter().all(|sentinel| {
                ffi::lua_pushnumber(state, sentinel);
                ffi::lua_setupvalue(state, function, n);
                // The object is alive (its function is on the stack), and
                // the offset is inside it; this thread wrote it last.
                std::ptr::read_volatile((object + offset) as *const u64) == sentinel.to_bits()
            })
        });
        ffi::lua_pushnumber(state, original);
        ffi::lua_setupvalue(state, function, n);
        found.map(|offset| object + offset)
    }
}

impl Probe {
    /// A probe over the values at `count` and `limit` (from [`locate`]).
    pub fn new(count: usize, limit: usize, smallest_limit: Nanos) -> Probe {
        Probe {
            count,
            limit,
            smallest: smallest_limit,
            idle: period_for(smallest_limit),
            last_count: 0,
            seen: None,
            due: None,
            retry: Backoff::first(),
            quiet: None,
        }
    }

    /// Whether this probe reads the count at `count`.
    pub fn reads(&self, count: usize) -> bool {
        self.count == count
    }

    /// The loop announced actors with a limit of `limit`; returns whether
    /// that is smaller than any before (the samples must come sooner).
    pub fn announce(&mut self, limit: Nanos) -> bool {
        if limit >= self.smallest {
            return false;
        }
        self.smallest = limit;
        self.idle = self.idle.min(period_for(limit));
        true
    }

    /// Samples the probe at `now`; returns what it found and when to
    /// sample again.
    ///
    /// # Safety
    /// As for [`load`].
    pub unsafe fn sample(&mut self, now: Nanos) -> (Sample, Nanos) {
        // SAFETY: the caller's contract.
        let (limit, count) = unsafe { (limit_nanos(load(self.limit)), load(self.count)) };
        let moved = count != self.last_count;
        self.last_count = count;
        let period = period_for(self.smallest);
        let Some(limit) = limit.filter(|_| self.quiet != Some(count)) else {
            // Nothing delivered now: while nothing was since the last
            // sample either, wait longer each time.
            self.seen = None;
            self.due = None;
            self.idle = if moved {
                period
            } else {
                (self.idle * 2).clamp(period, idle_cap(self.smallest))
            };
            return (Sample::Quiet, clock::after(now, self.idle));
        };
        self.quiet = None;
        self.idle = period;
        if self.due.is_some_and(|due| due == count) {
            // Armed already: again, in case the arming was undone.
            let retry = clock::nanos(self.retry.step());
            return (Sample::Stalled, clock::after(now, retry));
        }
        self.due = None;
        let next = clock::after(now, period.min(period_for(limit)));
        match self.seen {
            Some((seen, since)) if seen == count => {
                if now.saturating_sub(since) < limit {
                    return (Sample::Quiet, next);
                }
                self.due = Some(count);
                self.retry = Backoff::first();
                let retry = clock::nanos(self.retry.step());
                (Sample::Stalled, clock::after(now, retry))
            }
            _ => {
                self.seen = Some((count, now));
                (Sample::Quiet, next)
            }
        }
    }

    /// On the VM's thread, in the hook: whether the kill of a stalled
    /// delivery is due (its count has not moved). If not, the probe
    /// starts over from `now`.
    ///
    /// # Safety
    /// As for [`load`]; called on the VM's own thread.
    pub unsafe fn kill_due(&mut self, now: Nanos) -> bool {
        let Some(due) = self.due else {
            return false;
        };
        // SAFETY: the caller's contract.
        let (limit, count) = unsafe { (limit_nanos(load(self.limit)), load(self.count)) };
        if limit.is_some() && count == due {
            return true;
        }
        self.due = None;
        self.seen = Some((count, now));
        false
    }

    /// The stalled delivery is over (its count moved: it is timed afresh),
    /// or its coroutine no longer runs (a loop cut short left the probe
    /// behind, or it is just over): no kill, and that count is not timed
    /// again.
    ///
    /// # Safety
    /// As for [`load`]; called on the VM's own thread.
    pub unsafe fn settled(&mut self) {
        self.due = None;
        self.seen = None;
        // SAFETY: the caller's contract.
        self.quiet = Some(unsafe { load(self.count) });
    }

    /// The stalled delivery's coroutine may still run (see
    /// `crate::vm::ProbeTarget::Unsure`): no kill now, and the count is
    /// timed again from `now`.
    pub fn retime(&mut self, now: Nanos) {
        self.due = None;
        if let Some((_, since)) = &mut self.seen {
            *since = now;
        }
    }

    /// Whether a kill is due (the hook must stay on).
    pub fn is_due(&self) -> bool {
        self.due.is_some()
    }
}
