//! The watchdog: one process-wide thread that wakes up when a watched
//! coroutine's deadline passes, and re-arms pending interrupts.
//!
//! corowatch: each VM keeps one alarm here, at the earliest deadline of its
//! running watched coroutines (one queued alarm per VM, however many
//! watches moved it); at that time the VM arms the hook on its running
//! thread. The thread asks the kernel for 1 ns of timer slack, wakes
//! [`EARLY`] before the deadline (its wake-up costs more than a kill should
//! be late) and spins on the clock for the rest, so that a kill lands
//! within microseconds of its limit while nothing runs far from it.
//!
//! mtint:
//! An interrupt arms its target at once, from the interrupting thread. The
//! running thread can still undo that arming in a few instructions' window
//! (Lua 5.4 clears its "trap" flag after reading a stale hook mask; Lua 5.2
//! overwrites the hook count). So until the hook has delivered, the watchdog
//! arms the target again, after 1 ms, then at doubling intervals up to 50 ms.
//! An interrupt can be late by that much in the rare case, never lost.
//!
//! Timers: other modules hand it a [`Timer`] to fire once at a time (the
//! task module's deadlines); a timer can be cancelled, which takes it out
//! of the queue at once.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, Once, Weak};
use std::time::{Duration, Instant};

/// The watchdog's retry policy, for whatever it must do again until the
/// VM's thread has answered (a pending interrupt's re-arm, an alarm whose
/// arming the running thread can undo): 1 ms, doubling up to 50 ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff(Duration);

impl Backoff {
    const FIRST: Duration = Duration::from_millis(1);
    const MAX: Duration = Duration::from_millis(50);

    pub const fn first() -> Self {
        Backoff(Self::FIRST)
    }

    /// The delay to wait now; the next one doubles it.
    pub fn step(&mut self) -> Duration {
        let delay = self.0;
        self.0 = (delay * 2).min(Self::MAX);
        delay
    }
}

enum Job {
    /// Re-arm a pending interrupt, at doubling intervals.
    Rearm {
        /// Weak, so that a queued re-arm does not keep an id known.
        target: Weak<dyn Rearm>,
        backoff: Backoff,
    },
    /// A VM's corowatch alarm.
    Alarm(Weak<dyn Alarm>),
    /// A one-shot timer, with the token that cancels it and the time it is
    /// due (it is queued [`EARLY`], like an alarm).
    Timer(Arc<dyn Timer>, u64, Instant),
    /// A VM's probes to sample (LuaJIT: see `crate::probe`): on time, not
    /// early, and never spun for.
    #[cfg(feature = "luajit")]
    Sample(Weak<dyn Sampler>),
}

/// A target whose pending interrupt the watchdog arms again until it is
/// delivered (an mtint target: see `crate::registry`).
pub trait Rearm: Send + Sync {
    /// Arms again if still pending; returns whether to come back later.
    fn rearm(&self) -> bool;
}

/// A VM whose corowatch deadlines the watchdog wakes for (see `crate::vm`).
pub trait Alarm: Send + Sync {
    /// The alarm went off: arm what is due; returns when to come back, if
    /// the watchdog should.
    fn on_alarm(&self) -> Option<Instant>;
}

/// A VM whose dispatch probes the watchdog samples (see `crate::probe`).
#[cfg(feature = "luajit")]
pub trait Sampler: Send + Sync {
    /// Samples; returns when to come back, if the watchdog should.
    fn sample(&self) -> Option<Instant>;
}

/// Something to do once, on the watchdog thread, at a given time. `fire`
/// runs outside every lock of the watchdog and must not block.
pub trait Timer: Send + Sync {
    fn fire(&self);
}

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// A job in the queue, and when it is due.
struct Scheduled {
    job: Job,
    due: Instant,
}

struct Queue {
    entries: Mutex<Vec<Scheduled>>,
    wake: Condvar,
}

static QUEUE: LazyLock<Queue> = LazyLock::new(|| Queue {
    entries: Mutex::new(Vec::new()),
    wake: Condvar::new(),
});
static START: Once = Once::new();

/// Asks the watchdog to re-arm `target` until its interrupt is delivered.
pub fn schedule_rearm<T: Rearm + 'static>(target: &Arc<T>) {
    let weak: Weak<T> = Arc::downgrade(target);
    let target: Weak<dyn Rearm> = weak;
    let mut backoff = Backoff::first();
    let due = Instant::now() + backoff.step();
    push(Scheduled {
        job: Job::Rearm { target, backoff },
        due,
    });
}

/// How much earlier than a deadline the watchdog wakes for it: a thread's
/// wake-up costs 70–140 µs here, more than a kill should be late. The last
/// stretch is spun on the clock instead (see `run`).
const EARLY: Duration = Duration::from_micros(200);

/// Asks the watchdog to call `vm.on_alarm()` at `due` (or earlier, if it
/// already has an alarm of that VM due earlier: one per VM, at most).
pub fn schedule_alarm(vm: Weak<dyn Alarm>, due: Instant) {
    push(Scheduled {
        job: Job::Alarm(vm),
        due: early(due),
    });
}

/// Asks the watchdog to call `vm.sample()` at `due` (one queued sample per
/// VM, at the earlier time).
#[cfg(feature = "luajit")]
pub fn schedule_sample(vm: Weak<dyn Sampler>, due: Instant) {
    push(Scheduled {
        job: Job::Sample(vm),
        due,
    });
}

/// When to wake for a deadline at `due`.
fn early(due: Instant) -> Instant {
    due.checked_sub(EARLY).unwrap_or(due)
}

/// How many times the watchdog called a VM's `on_alarm`, in this process
/// (diagnostics: specs check that a deadline costs it a few calls, not one
/// per hook event).
static ALARMS_RUN: AtomicUsize = AtomicUsize::new(0);

pub fn alarms_run() -> usize {
    ALARMS_RUN.load(Ordering::Relaxed)
}

fn on_alarm(vm: &dyn Alarm) -> Option<Instant> {
    ALARMS_RUN.fetch_add(1, Ordering::Relaxed);
    vm.on_alarm()
}

/// How many times the watchdog sampled a VM's dispatch probes (LuaJIT), in
/// this process (diagnostics: specs check that an idle probe is sampled
/// less and less often).
#[cfg(feature = "luajit")]
static SAMPLES_RUN: AtomicUsize = AtomicUsize::new(0);

#[cfg(feature = "luajit")]
pub fn samples_run() -> usize {
    SAMPLES_RUN.load(Ordering::Relaxed)
}

/// How late the watchdog armed the hook for a deadline at worst, after the
/// hook's time (the deadline, less LuaJIT's lead), in nanoseconds, since it
/// was last read (diagnostics: a kill is late by at least that much, less
/// the lead, and the watchdog is late only when its thread did not run).
static WORST_LATENESS: AtomicU64 = AtomicU64::new(0);

/// The watchdog armed the hook for a deadline `nanos` after the hook's time.
pub fn note_lateness(nanos: u64) {
    WORST_LATENESS.fetch_max(nanos, Ordering::Relaxed);
}

/// The worst lateness noted since the last call, which starts over.
pub fn take_worst_lateness() -> u64 {
    WORST_LATENESS.swap(0, Ordering::Relaxed)
}

/// How many jobs wait in the queue (diagnostics: specs check that the
/// watchdog's work is bounded).
pub fn queued_jobs() -> usize {
    lock(&QUEUE.entries).len()
}

/// Asks the watchdog to call `timer.fire()` at `due`; returns the token
/// that [`cancel_timer`] takes.
pub fn schedule_timer(timer: Arc<dyn Timer>, due: Instant) -> u64 {
    let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
    push(Scheduled {
        job: Job::Timer(timer, token, due),
        due: early(due),
    });
    token
}

/// Takes the timer with this token out of the queue, if it is still there
/// (it may be firing right now: a timer's `fire` must tolerate that).
pub fn cancel_timer(token: u64) {
    let removed: Vec<Scheduled> = {
        let mut entries = lock(&QUEUE.entries);
        let (removed, kept) = entries
            .drain(..)
            .partition(|entry| matches!(entry.job, Job::Timer(_, t, _) if t == token));
        *entries = kept;
        removed
    };
    // The timer is dropped here, outside the queue's lock.
    drop(removed);
}

/// How many timers are queued (for specs: a finished scope leaves none).
pub fn queued_timers() -> usize {
    lock(&QUEUE.entries)
        .iter()
        .filter(|entry| matches!(entry.job, Job::Timer(..)))
        .count()
}

fn push(entry: Scheduled) {
    START.call_once(|| {
        // Without the thread, interrupts are still armed once, as the
        // original mtint does; there is nothing better to do than go on.
        let _ = std::thread::Builder::new()
            .name("corowatch-watchdog".into())
            .spawn(run);
    });
    let mut entries = lock(&QUEUE.entries);
    let earliest = entries.iter().all(|queued| queued.due > entry.due);
    enqueue(&mut entries, entry);
    if earliest {
        QUEUE.wake.notify_one();
    }
}

/// Adds `entry`; an alarm merges with the queued alarm of the same VM, if
/// any, at the earlier of the two times. So the queue holds one alarm per
/// VM whatever the number of watches that moved it, and `on_alarm` (which
/// works out the next time from the VM's chain) is called once per time.
/// A sample merges the same way.
fn enqueue(entries: &mut Vec<Scheduled>, entry: Scheduled) {
    let queued = entries
        .iter_mut()
        .find(|queued| match (&queued.job, &entry.job) {
            (Job::Alarm(other), Job::Alarm(vm)) => Weak::ptr_eq(vm, other),
            #[cfg(feature = "luajit")]
            (Job::Sample(other), Job::Sample(vm)) => Weak::ptr_eq(vm, other),
            _ => false,
        });
    if let Some(queued) = queued {
        queued.due = queued.due.min(entry.due);
        return;
    }
    entries.push(entry);
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn run() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer
    // slack; it reads no memory of ours.
    #[cfg(target_os = "linux")]
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
    loop {
        let due = take_due();
        let mut again = Vec::new();
        for entry in due {
            match entry.job {
                Job::Rearm {
                    target,
                    mut backoff,
                } => {
                    let Some(strong) = target.upgrade() else {
                        continue;
                    };
                    if strong.rearm() {
                        let due = Instant::now() + backoff.step();
                        again.push(Scheduled {
                            job: Job::Rearm { target, backoff },
                            due,
                        });
                    }
                    // `strong` is dropped here, outside every lock: dropping
                    // the last reference to a target takes its VM's lock.
                }
                Job::Timer(timer, _, due) => {
                    spin_until(due);
                    timer.fire();
                }
                #[cfg(feature = "luajit")]
                Job::Sample(vm) => {
                    let Some(strong) = vm.upgrade() else {
                        continue;
                    };
                    SAMPLES_RUN.fetch_add(1, Ordering::Relaxed);
                    if let Some(next) = strong.sample() {
                        again.push(Scheduled {
                            job: Job::Sample(vm),
                            due: next,
                        });
                    }
                }
                Job::Alarm(vm) => {
                    let Some(strong) = vm.upgrade() else {
                        continue;
                    };
                    let mut next = on_alarm(&*strong);
                    // Woken early: spin through the last stretch, so that
                    // the hook is armed at the deadline. `on_alarm` arms
                    // and then asks to come back a retry later (1 ms or
                    // more), which ends the spinning.
                    while let Some(due) = next.filter(|due| *due <= Instant::now() + EARLY) {
                        spin_until(due);
                        next = on_alarm(&*strong);
                    }
                    if let Some(next) = next {
                        again.push(Scheduled {
                            job: Job::Alarm(vm),
                            due: early(next),
                        });
                    }
                }
            }
        }
        if !again.is_empty() {
            let mut entries = lock(&QUEUE.entries);
            for entry in again {
                enqueue(&mut entries, entry);
            }
        }
    }
}

/// Spins on the clock until `due`: the last stretch before a deadline, which
/// the watchdog woke [`EARLY`] for.
fn spin_until(due: Instant) {
    while Instant::now() < due {
        std::hint::spin_loop();
    }
}

/// Waits until at least one entry is due and takes the due ones out.
fn take_due() -> Vec<Scheduled> {
    let mut entries = lock(&QUEUE.entries);
    loop {
        let now = Instant::now();
        match entries.iter().map(|entry| entry.due).min() {
            Some(due) if due <= now => {
                let (due, waiting) = entries.drain(..).partition(|entry| entry.due <= now);
                *entries = waiting;
                return due;
            }
            Some(due) => {
                entries = QUEUE
                    .wake
                    .wait_timeout(entries, due - now)
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0;
            }
            None => {
                entries = QUEUE
                    .wake
                    .wait(entries)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        }
    }
}
