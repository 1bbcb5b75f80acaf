//! The chain's mirror: what a VM's own thread publishes of its chain of
//! running coroutines ([`crate::watch::Chain`], which only that thread
//! reads or writes), for the watchdog and for its own lock-free checks.
//!
//! The owner changes its chain without the VM lock at every resume of
//! something watched, and publishes the result here in atomics. Two
//! handshakes, both Dekker's over [`crate::barrier`], make that safe:
//!
//! - **Arming.** The watchdog arms the threads the mirror names from
//!   another OS thread (PUC Lua writes their hooks), so none of them may
//!   be freed meanwhile, and each one our hook is on must be told to the
//!   VM's arming record when it leaves the chain (which puts the user's
//!   hook back). The watchdog sets `armed` (under the VM lock), fences
//!   ([`barrier::heavy`]), then reads the mirror. The owner publishes a
//!   change, fences ([`barrier::light`]), then reads `armed`. If the owner
//!   saw it clear, the watchdog's read comes after the change and never
//!   names a thread the change popped. If the owner saw it set, it takes
//!   the VM lock, which the watchdog holds until it has armed, before the
//!   threads it popped can die (the owner holds them on its stack or in
//!   anchors until its change returns), and tells the arming record about
//!   them. The owner's own armings of the chain's threads (under the lock:
//!   a deadline found passed at a resume, the hook staying on a killed
//!   coroutine) set `armed` too. It is cleared under the lock once no
//!   thread of the chain carries our hook; while it is set, every change
//!   takes the lock.
//! - **The alarm.** The owner publishes a new earliest deadline, fences,
//!   then reads `alarm`, and moves the alarm earlier (under the lock) if it
//!   is later than the deadline. The watchdog, going off, clears `alarm`,
//!   fences, then reads the earliest deadline: either it sees the new one,
//!   or the owner sees no alarm and sets one. No deadline is left without
//!   an alarm.
//!
//! Entries are written before the length (Release); the watchdog reads the
//! length first (Acquire), so every entry below it is one that length
//! covered, or a newer one.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use mlua::ffi::lua_State;

use crate::clock::{Nanos, NEVER};
use crate::state_ptr::StatePtr;
use crate::watch::Chain;

/// How many of the chain's entries are mirrored one by one. Lua refuses
/// to nest C calls (each nested resume is one) past 200 (`LUAI_MAXCCALLS`);
/// past this depth only the top is mirrored, and a kill there relies on
/// the top running (a deeper stale top is repaired when the hook fires).
const MIRRORED: usize = 256;

pub struct ChainMirror {
    /// The chain's length: it is active (something watched runs) while
    /// this is not 0.
    len: AtomicUsize,
    top: AtomicPtr<lua_State>,
    /// Index of the first watched entry (`len` if none).
    watched_from: AtomicUsize,
    entries: Box<[AtomicPtr<lua_State>]>,
    /// The chain's earliest deadline whose kill the hook has not seen due
    /// ([`NEVER`]: none).
    earliest: AtomicU64,
    /// Whether the hook saw the kill deadline of a coroutine on the chain
    /// pass (a killed coroutine is on it, or is about to be).
    kill_seen: AtomicBool,
    /// Our hook may be on threads named here (the watchdog armed, or is
    /// arming, them; or the owner did): a pop tells the arming record.
    armed: AtomicBool,
    /// When the watchdog will next look at this VM ([`NEVER`]: no alarm).
    /// Written under the VM lock.
    alarm: AtomicU64,
    /// LuaJIT: where each dispatch probe keeps the chain's length (the
    /// fourth upvalue of its function: see [`crate::probe`]), the first
    /// `probes` of them. A signal resumes actors through its probe only
    /// while nothing watched runs, so that a watched coroutine's deadline
    /// still reaches the actors it runs.
    #[cfg(feature = "luajit")]
    probe_chain_lengths: [AtomicUsize; crate::probe::MAX_PROBES],
    #[cfg(feature = "luajit")]
    probes: AtomicUsize,
}

impl Default for ChainMirror {
    fn default() -> Self {
        ChainMirror {
            len: AtomicUsize::new(0),
            top: AtomicPtr::new(std::ptr::null_mut()),
            watched_from: AtomicUsize::new(0),
            entries: (0..MIRRORED)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
            earliest: AtomicU64::new(NEVER),
            kill_seen: AtomicBool::new(false),
            armed: AtomicBool::new(false),
            alarm: AtomicU64::new(NEVER),
            #[cfg(feature = "luajit")]
            probe_chain_lengths: Default::default(),
            #[cfg(feature = "luajit")]
            probes: AtomicUsize::new(0),
        }
    }
}

impl ChainMirror {
    /// Publishes `chain` after a change (the owner thread, which alone
    /// changes it). Rewrites only the entries the change may have touched.
    /// Returns the earliest deadline published.
    #[inline(always)]
    pub fn publish(&self, chain: &mut Chain) -> u64 {
        let len = chain.len();
        let from = chain.take_changed_from();
        for index in from..len.min(MIRRORED) {
            self.entries[index].store(chain.thread_at(index).0, Ordering::Relaxed);
        }
        self.len.store(len, Ordering::Release);
        #[cfg(feature = "luajit")]
        self.tell_probes(len);
        let top = chain.top().map_or(std::ptr::null_mut(), |top| top.0);
        self.top.store(top, Ordering::Relaxed);
        self.watched_from
            .store(chain.first_watched(), Ordering::Relaxed);
        let earliest = chain.next_deadline();
        self.earliest.store(earliest, Ordering::Relaxed);
        self.kill_seen.store(chain.kill_seen(), Ordering::Relaxed);
        earliest
    }

    /// LuaJIT: writes the chain's length into each probe's upvalue.
    #[cfg(feature = "luajit")]
    #[inline(always)]
    fn tell_probes(&self, len: usize) {
        let count = self.probes.load(Ordering::Relaxed);
        for slot in &self.probe_chain_lengths[..count] {
            // SAFETY: a registered probe's upvalue, alive until the VM's
            // `close` (which forgets it before `lua_close` frees
            // anything); only the VM's own thread publishes, and Lua reads
            // the upvalue on that thread.
            unsafe { crate::probe::store(slot.load(Ordering::Relaxed), len as f64) };
        }
    }

    /// LuaJIT: a new probe keeps the chain's length at `address` (from
    /// [`crate::probe::locate`]); it gets the length now. On the VM's
    /// thread, under the VM lock, for a probe [`crate::vm`] registered.
    #[cfg(feature = "luajit")]
    pub fn add_probe(&self, address: usize) {
        let count = self.probes.load(Ordering::Relaxed);
        if let Some(slot) = self.probe_chain_lengths.get(count) {
            slot.store(address, Ordering::Relaxed);
            self.probes.store(count + 1, Ordering::Relaxed);
            // SAFETY: as in `tell_probes`.
            unsafe { crate::probe::store(address, self.len() as f64) };
        }
    }

    /// LuaJIT: the VM is closing: no probe is written any more.
    #[cfg(feature = "luajit")]
    pub fn forget_probes(&self) {
        self.probes.store(0, Ordering::Relaxed);
    }

    /// Whether anything watched runs (the chain has entries).
    pub fn is_active(&self) -> bool {
        self.len() != 0
    }

    pub fn kill_seen(&self) -> bool {
        self.kill_seen.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn top(&self) -> *mut lua_State {
        self.top.load(Ordering::Relaxed)
    }

    /// The earliest deadline ([`NEVER`]: none).
    pub fn next_deadline(&self) -> Nanos {
        self.earliest.load(Ordering::Relaxed)
    }

    /// As [`Chain::needs_hook`], from what was published.
    pub fn needs_hook(&self, now: Nanos) -> bool {
        self.kill_seen() || self.next_deadline() <= now
    }

    /// The threads from the first watched one up to the top, as the
    /// watchdog reads them (after [`ChainMirror::begin_arming`] and the
    /// heavy fence).
    pub fn watched_and_above(&self) -> impl Iterator<Item = StatePtr> + '_ {
        let len = self.len.load(Ordering::Acquire);
        let from = self.watched_from.load(Ordering::Relaxed).min(len);
        let mirrored = len.min(MIRRORED);
        let top = (len > MIRRORED).then(|| StatePtr(self.top()));
        self.entries[from.min(mirrored)..mirrored]
            .iter()
            .map(|entry| StatePtr(entry.load(Ordering::Relaxed)))
            .chain(top)
            .filter(|state| !state.0.is_null())
    }

    /// Someone is about to arm threads named here (the watchdog, before
    /// it reads the mirror; the owner); under the VM lock. Returns whether
    /// it was set already.
    pub fn begin_arming(&self) -> bool {
        self.armed.swap(true, Ordering::Relaxed)
    }

    /// No thread of the chain carries our hook (under the VM lock).
    pub fn end_arming(&self) {
        self.armed.store(false, Ordering::Relaxed);
    }

    /// Whether our hook may be on threads named here; read by the owner
    /// after its light fence.
    pub fn is_armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }

    /// Whether the alarm goes off by `at` (read by the owner after its
    /// light fence, or under the lock).
    #[inline]
    pub fn alarm_by(&self, at: Nanos) -> bool {
        self.alarm.load(Ordering::Relaxed) <= at
    }

    /// Records the alarm ([`NEVER`]: none; under the VM lock).
    pub fn set_alarm(&self, at: Nanos) {
        self.alarm.store(at, Ordering::Relaxed);
    }
}
