//! The watchdog: one process-wide thread that re-arms pending interrupts.
//!
//! An interrupt arms its target at once, from the interrupting thread. The
//! running thread can still undo that arming in a few instructions' window
//! (Lua 5.4 clears its "trap" flag after reading a stale hook mask; Lua 5.2
//! overwrites the hook count). So until the hook has delivered, the watchdog
//! arms the target again, after 1 ms, then at doubling intervals up to 50 ms.
//! An interrupt can be late by that much in the rare case, never lost.

use std::sync::{Arc, Condvar, LazyLock, Mutex, Once, Weak};
use std::time::{Duration, Instant};

use crate::registry::Target;

const FIRST_DELAY: Duration = Duration::from_millis(1);
const MAX_DELAY: Duration = Duration::from_millis(50);

struct Rearm {
    /// Weak, so that a queued re-arm does not keep an id known.
    target: Weak<Target>,
    due: Instant,
    delay: Duration,
}

struct Queue {
    entries: Mutex<Vec<Rearm>>,
    wake: Condvar,
}

static QUEUE: LazyLock<Queue> = LazyLock::new(|| Queue {
    entries: Mutex::new(Vec::new()),
    wake: Condvar::new(),
});
static START: Once = Once::new();

/// Asks the watchdog to re-arm `target` until its interrupt is delivered.
pub fn schedule_rearm(target: &Arc<Target>) {
    START.call_once(|| {
        // Without the thread, interrupts are still armed once, as the
        // original mtint does; there is nothing better to do than go on.
        let _ = std::thread::Builder::new()
            .name("corowatch-watchdog".into())
            .spawn(run);
    });
    let mut entries = lock(&QUEUE.entries);
    entries.push(Rearm {
        target: Arc::downgrade(target),
        due: Instant::now() + FIRST_DELAY,
        delay: FIRST_DELAY,
    });
    QUEUE.wake.notify_one();
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn run() {
    loop {
        let due = take_due();
        let mut again = Vec::new();
        for mut entry in due {
            let Some(target) = entry.target.upgrade() else {
                continue;
            };
            if target.vm.rearm(target.id) {
                entry.delay = (entry.delay * 2).min(MAX_DELAY);
                entry.due = Instant::now() + entry.delay;
                again.push(entry);
            }
            // `target` is dropped here, outside every lock: dropping the
            // last reference to a target takes its VM's lock.
        }
        if !again.is_empty() {
            lock(&QUEUE.entries).extend(again);
        }
    }
}

/// Waits until at least one entry is due and takes the due ones out.
fn take_due() -> Vec<Rearm> {
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
