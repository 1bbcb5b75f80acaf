//! corowatch's native half: the chain of running coroutines, with the
//! deadlines of the watched ones.
//!
//! The patched `coroutine.resume` pushes the resumed coroutine onto its VM's
//! chain and pops it when `resume` returns, but only while something watched
//! is involved: resuming plain coroutines with nothing watched running costs
//! no native call at all. Entering a watched coroutine reads the clock and
//! may move the watchdog's alarm earlier; nothing else. No hook is installed:
//! when a deadline passes, the watchdog arms the hook on the chain's top (the
//! running thread), and the hook turns the deadline into a warning or a kill.

use std::time::{Duration, Instant};

use crate::vm::StatePtr;

/// What the hook asks the Lua side (the dispatcher) to do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Event {
    /// Call the callback with "warn"; a truthy answer resets the deadlines.
    Warn = 1,
    /// Call the callback with "kill", then raise the kill error.
    Kill = 2,
    /// Raise the kill error again: a killed coroutine cannot survive.
    Killed = 3,
}

/// The limits of a watched coroutine and, while it runs, its deadlines.
pub struct Watch {
    kill: Option<Duration>,
    warn: Option<Duration>,
    kill_at: Option<Instant>,
    warn_at: Option<Instant>,
    killed: bool,
}

impl Watch {
    /// A watch whose run starts `now`.
    pub fn start(kill: Option<Duration>, warn: Option<Duration>, now: Instant) -> Watch {
        let mut watch = Watch {
            kill,
            warn,
            kill_at: None,
            warn_at: None,
            killed: false,
        };
        watch.reset(now);
        watch
    }

    fn reset(&mut self, now: Instant) {
        self.kill_at = self.kill.and_then(|kill| now.checked_add(kill));
        self.warn_at = self.warn.and_then(|warn| now.checked_add(warn));
    }

    fn next_deadline(&self) -> Option<Instant> {
        if self.killed {
            return None;
        }
        match (self.warn_at, self.kill_at) {
            (Some(warn), Some(kill)) => Some(warn.min(kill)),
            (warn, kill) => warn.or(kill),
        }
    }
}

struct Entry {
    state: StatePtr,
    watch: Option<Watch>,
}

/// What `leave` popped: its depth, and whether it was killed.
#[derive(Clone, Copy, Default)]
pub struct Left {
    pub depth: usize,
    pub killed: bool,
}

/// The coroutines running in one VM, outermost first; empty while nothing
/// watched runs.
#[derive(Default)]
pub struct Chain {
    entries: Vec<Entry>,
}

impl Chain {
    pub fn is_active(&self) -> bool {
        !self.entries.is_empty()
    }

    /// Whether `state` is on the chain below its top: it is the resumer in
    /// the middle of the patched resume, between telling the chain and the
    /// real resume (or back). The hook must not raise there.
    pub fn is_below_top(&self, state: *mut mlua::ffi::lua_State) -> bool {
        match self.entries.split_last() {
            Some((top, below)) => top.state.0 != state && below.iter().any(|e| e.state.0 == state),
            None => false,
        }
    }

    /// The running thread, as far as the chain knows.
    pub fn top(&self) -> Option<StatePtr> {
        self.entries.last().map(|entry| entry.state)
    }

    /// `resumer` resumes `resumed` (watched if `watch` is given). Returns
    /// the depth of `resumed` (1-based).
    pub fn enter(&mut self, resumer: StatePtr, resumed: StatePtr, watch: Option<Watch>) -> usize {
        if self.entries.is_empty() {
            self.entries.push(Entry {
                state: resumer,
                watch: None,
            });
        }
        self.entries.push(Entry {
            state: resumed,
            watch,
        });
        self.entries.len()
    }

    /// The top coroutine yielded, returned or died.
    pub fn leave(&mut self) -> Left {
        let depth = self.entries.len();
        let killed = self
            .entries
            .pop()
            .and_then(|entry| entry.watch)
            .is_some_and(|watch| watch.killed);
        if !self.entries.iter().any(|entry| entry.watch.is_some()) {
            self.entries.clear();
        }
        Left { depth, killed }
    }

    /// Like `leave`, if `state` is the top: a coroutine that watched itself
    /// (and so became the chain's root) returned to an unwatched resumer.
    pub fn leave_root(&mut self, state: StatePtr) -> Left {
        if self.top() == Some(state) {
            self.leave()
        } else {
            Left::default()
        }
    }

    /// Watches `state` from `now` on, if it is running (on the chain, or
    /// `running` with an empty chain). Returns its depth.
    pub fn watch_running(
        &mut self,
        state: StatePtr,
        running: StatePtr,
        watch: Watch,
    ) -> Option<usize> {
        if self.entries.is_empty() {
            if state != running {
                return None;
            }
            self.entries.push(Entry {
                state,
                watch: Some(watch),
            });
            return Some(1);
        }
        let depth = self
            .entries
            .iter()
            .rposition(|entry| entry.state == state)?;
        self.entries[depth].watch = Some(watch);
        Some(depth + 1)
    }

    /// A warn callback asked for more time.
    pub fn reset(&mut self, depth: usize, now: Instant) {
        if let Some(watch) = self
            .entries
            .get_mut(depth.wrapping_sub(1))
            .and_then(|entry| entry.watch.as_mut())
        {
            watch.reset(now);
        }
    }

    /// The earliest deadline of a watched, running coroutine.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries
            .iter()
            .filter_map(|entry| entry.watch.as_ref()?.next_deadline())
            .min()
    }

    /// Whether the running thread needs the hook now: a deadline passed, or
    /// a killed coroutine is still running (its kill must not be swallowed).
    pub fn needs_hook(&self, now: Instant) -> bool {
        self.entries.iter().any(|entry| {
            entry.watch.as_ref().is_some_and(|watch| {
                watch.killed || watch.next_deadline().is_some_and(|d| d <= now)
            })
        })
    }

    /// The hook fired on `state`: the event to dispatch, innermost first,
    /// with the depth of the coroutine it concerns.
    pub fn event(
        &mut self,
        state: *mut mlua::ffi::lua_State,
        now: Instant,
    ) -> Option<(Event, usize)> {
        if self.top()?.0 != state {
            return None;
        }
        for (index, entry) in self.entries.iter_mut().enumerate().rev() {
            let Some(watch) = entry.watch.as_mut() else {
                continue;
            };
            let found = if watch.killed {
                Event::Killed
            } else if watch.kill_at.is_some_and(|kill| kill <= now) {
                watch.killed = true;
                Event::Kill
            } else if watch.warn_at.is_some_and(|warn| warn <= now) {
                watch.warn_at = None;
                Event::Warn
            } else {
                continue;
            };
            return Some((found, index + 1));
        }
        None
    }

    /// Forgets every entry (the VM is closing).
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}
