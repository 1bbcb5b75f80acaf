//! corowatch's native half: the chain of running coroutines, with the
//! deadlines of the watched ones.
//!
//! The patched `coroutine.resume` pushes the resumed coroutine onto its VM's
//! chain and pops it when `resume` returns, but only while something watched
//! is involved: resuming plain coroutines with nothing watched running costs
//! one atomic load on top of the resume. Entering a watched coroutine reads the clock and
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

/// What `leave` popped: whether it was killed, and the depths whose
/// anchors are now stale (`unanchor_from..=unanchor_to`).
#[derive(Clone, Copy, Default)]
pub struct Left {
    pub killed: bool,
    pub unanchor_from: usize,
    pub unanchor_to: usize,
}

/// Where `enter` will put the resumed coroutine: its depth, and the depth
/// of an entry for the resumer, if one is pushed under it (the chain's new
/// root, or a resumer the chain did not see being resumed). Both are to be
/// anchored before the chain changes.
#[derive(Clone, Copy, Default)]
pub struct Plan {
    pub depth: usize,
    pub resumer_depth: Option<usize>,
}

/// The coroutines running in one VM, outermost first; empty while nothing
/// watched runs.
///
/// Coroutines resumed or yielding through the original functions (the
/// unpatched `coroutine.resume`, C's `lua_resume`) are invisible here, so
/// the chain can go stale: its top may have yielded, or a coroutine it did
/// not see may resume another. [`Chain::plan`] repairs it on the owner
/// thread before every push, and [`Chain::leave`] pops by depth, so a kill
/// only ever lands in the watched coroutine or one it resumed.
#[derive(Default)]
pub struct Chain {
    entries: Vec<Entry>,
    /// The earliest deadline of a watched entry that is not killed, and
    /// how many entries are killed: kept with every change, so that the
    /// checks made at every resume do not walk the entries.
    earliest: Option<Instant>,
    killed: usize,
}

impl Chain {
    pub fn is_active(&self) -> bool {
        !self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether a killed coroutine is on the chain (it runs, or is about to
    /// die): only then can the running thread be a killed one.
    pub fn has_killed(&self) -> bool {
        self.killed > 0
    }

    /// Recomputes `earliest` and `killed` after a change of the entries.
    fn refresh(&mut self) {
        self.earliest = None;
        self.killed = 0;
        for watch in self.entries.iter().filter_map(|entry| entry.watch.as_ref()) {
            self.killed += usize::from(watch.killed);
            self.earliest = earliest(self.earliest, watch.next_deadline());
        }
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

    /// `state` runs Lua code while the chain has entries above it: they
    /// returned or yielded unseen (resumed with the original `resume`, or
    /// from C). They go, and `state` is the top again. Their anchors stay
    /// until their depths are used again.
    pub fn drop_above(&mut self, state: *mut mlua::ffi::lua_State) {
        while let Some(top) = self.top() {
            if top.0 == state {
                break;
            }
            self.entries.pop();
        }
        self.refresh();
    }

    /// The threads from the first watched one up to the top: the one that
    /// runs is among them, if the top went stale unseen.
    pub fn watched_and_above(&self) -> impl Iterator<Item = StatePtr> + '_ {
        let first = self
            .entries
            .iter()
            .position(|entry| entry.watch.is_some())
            .unwrap_or(self.entries.len());
        self.entries[first..].iter().map(|entry| entry.state)
    }

    /// The running thread, as far as the chain knows.
    pub fn top(&self) -> Option<StatePtr> {
        self.entries.last().map(|entry| entry.state)
    }

    /// The running thread `resumer` is about to resume a coroutine: drops
    /// the entries on top that no longer run (`is_stale`: they yielded or
    /// died unseen) and says where the resumed coroutine will go.
    pub fn plan(&mut self, resumer: StatePtr, is_stale: impl Fn(StatePtr) -> bool) -> Plan {
        while let Some(top) = self.top() {
            if top == resumer || !is_stale(top) {
                break;
            }
            self.entries.pop();
        }
        if !self.entries.iter().any(|entry| entry.watch.is_some()) {
            self.entries.clear();
        }
        self.refresh();
        let resumer_depth = (self.top() != Some(resumer)).then_some(self.entries.len() + 1);
        Plan {
            depth: self.entries.len() + 1 + usize::from(resumer_depth.is_some()),
            resumer_depth,
        }
    }

    /// `resumer` resumes `resumed` (watched if `watch` is given), as
    /// `plan` said just before. Returns the depth of `resumed` (1-based).
    pub fn enter(&mut self, resumer: StatePtr, resumed: StatePtr, watch: Option<Watch>) -> usize {
        if self.top() != Some(resumer) {
            self.entries.push(Entry {
                state: resumer,
                watch: None,
            });
        }
        if let Some(watch) = &watch {
            self.earliest = earliest(self.earliest, watch.next_deadline());
        }
        self.entries.push(Entry {
            state: resumed,
            watch,
        });
        self.entries.len()
    }

    /// The resume that entered at `depth` returned: that entry and any
    /// left above it go.
    pub fn leave(&mut self, depth: usize) -> Left {
        let before = self.entries.len();
        let killed = self
            .entries
            .get(depth.wrapping_sub(1))
            .and_then(|entry| entry.watch.as_ref())
            .is_some_and(|watch| watch.killed);
        self.entries.truncate(depth.saturating_sub(1));
        if !self.entries.iter().any(|entry| entry.watch.is_some()) {
            self.entries.clear();
        }
        self.refresh();
        Left {
            killed,
            unanchor_from: self.entries.len() + 1,
            unanchor_to: before,
        }
    }

    /// Like `leave`, if `state` is the top: a coroutine that watched itself
    /// (and so became the chain's root) returned to an unwatched resumer.
    pub fn leave_root(&mut self, state: StatePtr) -> Left {
        if self.top() == Some(state) {
            self.leave(self.entries.len())
        } else {
            Left::default()
        }
    }

    /// Watches `state` from `now` on, if it is running: on the chain, or,
    /// with an empty chain, `running` itself or a thread that resumed it
    /// (`is_normal`). With an empty chain, `state` goes at depth 1 and
    /// `running`, if another thread, at depth 2: the caller anchored them
    /// there. Returns whether it watches `state`.
    pub fn watch_running(
        &mut self,
        state: StatePtr,
        running: StatePtr,
        is_normal: impl Fn(StatePtr) -> bool,
        watch: Watch,
    ) -> bool {
        if self.entries.is_empty() {
            if state != running && !is_normal(state) {
                return false;
            }
            self.entries.push(Entry {
                state,
                watch: Some(watch),
            });
            if state != running {
                // It resumed `running`, maybe through coroutines unseen
                // here: a kill lands in whichever runs, as for any
                // coroutine it resumed.
                self.entries.push(Entry {
                    state: running,
                    watch: None,
                });
            }
            self.refresh();
            return true;
        }
        match self.entries.iter().rposition(|entry| entry.state == state) {
            Some(depth) => {
                self.entries[depth].watch = Some(watch);
                self.refresh();
                true
            }
            None => false,
        }
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
        self.refresh();
    }

    /// The earliest deadline of a watched, running coroutine.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.earliest
    }

    /// Whether the running thread needs the hook now: a deadline passed, or
    /// a killed coroutine is still running (its kill must not be swallowed).
    pub fn needs_hook(&self, now: Instant) -> bool {
        self.killed > 0 || self.earliest.is_some_and(|deadline| deadline <= now)
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
        let found = self
            .entries
            .iter_mut()
            .enumerate()
            .rev()
            .find_map(|(index, entry)| {
                let watch = entry.watch.as_mut()?;
                let event = if watch.killed {
                    Event::Killed
                } else if watch.kill_at.is_some_and(|kill| kill <= now) {
                    watch.killed = true;
                    Event::Kill
                } else if watch.warn_at.is_some_and(|warn| warn <= now) {
                    watch.warn_at = None;
                    Event::Warn
                } else {
                    return None;
                };
                Some((event, index + 1))
            });
        if found.is_some() {
            self.refresh();
        }
        found
    }

    /// Forgets every entry (the VM is closing).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.refresh();
    }
}

/// The earlier of two optional instants, `None` meaning "never".
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
