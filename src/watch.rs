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

use crate::clock::{self, Nanos, NEVER};
use crate::state_ptr::StatePtr;

/// What the hook asks the Lua side (the dispatcher) to do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Event {
    /// Call the callback with "warn"; a truthy answer resets the deadlines.
    Warn = 1,
    /// The kill deadline passed: the first time, the dispatcher marks the
    /// coroutine killed (Lua's `killed` table, the one record of it) and
    /// calls the callback with "kill"; every time, it raises the kill
    /// error (a killed coroutine cannot survive).
    Kill = 2,
}

/// The limits of a watched coroutine ([`NEVER`]: none) and, while it runs,
/// its deadlines ([`NEVER`]: none), on [`crate::clock`].
///
/// Whether it was killed is not kept here: that is Lua's `killed` table.
/// The chain only knows that the hook saw the kill deadline pass (see
/// [`Chain::kill_seen`]), which is when the kill is raised.
#[derive(Clone, Copy)]
pub struct Watch {
    kill: Nanos,
    warn: Nanos,
    kill_at: Nanos,
    warn_at: Nanos,
}

impl Watch {
    /// A watch whose run starts `now`.
    #[inline]
    pub fn start(kill: Nanos, warn: Nanos, now: Nanos) -> Watch {
        let mut watch = Watch {
            kill,
            warn,
            kill_at: NEVER,
            warn_at: NEVER,
        };
        watch.reset(now);
        watch
    }

    #[inline]
    fn reset(&mut self, now: Nanos) {
        self.kill_at = clock::after(now, self.kill);
        self.warn_at = clock::after(now, self.warn);
    }

    /// The next deadline, unless the hook saw the kill deadline pass by
    /// `seen` (then the kill is raised at every event, with no deadline).
    #[inline]
    fn next_deadline(&self, seen: Nanos) -> Nanos {
        if self.kill_at <= seen {
            return NEVER;
        }
        self.warn_at.min(self.kill_at)
    }
}

/// Where the hook finds the Lua value of an entry's thread, to hand it to
/// the dispatcher; also what keeps the thread alive while the chain names
/// it (see the lifetime argument in [`crate::vm`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Found {
    /// In the anchors table at the entry's depth, which keeps it alive: a
    /// thread that may stop running unseen (a root the coroutine watched
    /// itself into, a resumer the chain did not see being resumed, or a
    /// coroutine resumed through the original resume).
    Anchored,
    /// On top of the stack of the entry below, which resumed it with the
    /// patched resume and waits in that call until the entry is popped.
    OnResumerStack,
    /// Nowhere: a resumer pushed under the first entry of an empty chain.
    /// It waits in the patched resume that pushed it, and the chain ends
    /// when that resume returns, unless it is watched meanwhile; being
    /// watched anchors it first.
    Unanchored,
}

/// Where the hook finds the coroutine an event is about.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Locate {
    /// It is the running thread.
    Running,
    /// In the anchors table at its depth.
    Anchored,
    /// The one value on top of this thread's stack: the thread waits in
    /// the patched resume that resumed the coroutine.
    OnStackOf(StatePtr),
}

struct Entry {
    state: StatePtr,
    watch: Option<Watch>,
    found: Found,
}

/// What leaving the chain (`leave`, `leave_root`) left for the caller:
/// whether the hook saw the kill deadline of the coroutine that left pass
/// (then Lua's `killed` table says whether it was killed, and with what
/// message), the depths whose anchors are now stale
/// (`unanchor_from..=unanchor_to`, often empty), and where to anchor the
/// resumer, if it took the place of the coroutine that left (see
/// [`Chain::leave_root`]).
#[derive(Clone, Copy, Default)]
pub struct LeftChain {
    pub kill_seen: bool,
    pub unanchor_from: usize,
    pub unanchor_to: usize,
    pub anchor_resumer_at: Option<usize>,
}

/// Where `enter` will put the resumed coroutine (its depth), and where the
/// caller anchors the resumer first, if it goes on a chain that has
/// entries (one it did not see being resumed). The resumed coroutine is
/// anchored at `depth` unless it is resumed directly (see [`Found`]).
#[derive(Clone, Copy, Default)]
pub struct Plan {
    pub depth: usize,
    pub anchor_resumer_at: Option<usize>,
}

/// Which depths to anchor before `watch_running` watches a thread that is
/// already running: the thread's, and the running thread's if it goes on
/// the chain too.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct WatchAnchors {
    pub state_at: Option<usize>,
    pub running_at: Option<usize>,
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
pub struct Chain {
    entries: Vec<Entry>,
    /// The earliest deadline of a watched entry whose kill the hook has not
    /// seen due, how many entries it has seen due and where the first
    /// watched one is (the length or more if none): kept with every change,
    /// so that the checks made at every resume do not walk the entries.
    earliest: Nanos,
    kills_seen: usize,
    first_watched: usize,
    /// The clock when the hook last looked for an event ([`Chain::event`]):
    /// a watch whose kill deadline is at or before it has its kill raised
    /// at every event. It only grows, and a watch starts after it.
    seen: Nanos,
    /// No anchor above this depth holds a thread (anchors of popped entries
    /// are cleared by the next `leave`).
    anchored_max: usize,
    /// The shortest the chain was since it was last published: entries
    /// from here up may have changed (see [`crate::mirror`]).
    low_water: usize,
}

impl Default for Chain {
    fn default() -> Chain {
        Chain {
            entries: Vec::new(),
            earliest: NEVER,
            kills_seen: 0,
            first_watched: 0,
            seen: 0,
            anchored_max: 0,
            low_water: 0,
        }
    }
}

impl Chain {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the hook saw the kill deadline of a coroutine on the chain
    /// pass (it runs, or is about to die): only then can the running
    /// thread be a killed one.
    pub fn kill_seen(&self) -> bool {
        self.kills_seen > 0
    }

    /// Recomputes the summary (`earliest`, `kills_seen`, `first_watched`)
    /// after a change of the entries or of `seen`.
    fn refresh(&mut self) {
        self.earliest = NEVER;
        self.kills_seen = 0;
        self.first_watched = self.entries.len();
        for (index, entry) in self.entries.iter().enumerate() {
            let Some(watch) = &entry.watch else {
                continue;
            };
            if self.first_watched == self.entries.len() {
                self.first_watched = index;
            }
            self.kills_seen += usize::from(watch.kill_at <= self.seen);
            self.earliest = self.earliest.min(watch.next_deadline(self.seen));
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
    /// from C). They go, each told to `gone`, and `state` is the top again.
    /// Their anchors stay until the next `leave`.
    pub fn drop_above(&mut self, state: *mut mlua::ffi::lua_State, mut gone: impl FnMut(StatePtr)) {
        while let Some(top) = self.top() {
            if top.0 == state {
                break;
            }
            self.pop(&mut gone);
        }
        self.refresh();
    }

    /// Pops the top entry, told to `gone`.
    fn pop(&mut self, gone: &mut impl FnMut(StatePtr)) {
        self.truncate(self.entries.len().saturating_sub(1), gone);
    }

    /// Pops the entries above `len`, each told to `gone`, the top first.
    #[inline(always)]
    fn truncate(&mut self, len: usize, gone: &mut impl FnMut(StatePtr)) {
        let Some(popped) = self.entries.get(len..) else {
            return;
        };
        for entry in popped.iter().rev() {
            gone(entry.state);
        }
        self.entries.truncate(len);
        self.low_water = self.low_water.min(len);
    }

    /// The index from which entries may have changed since the last call;
    /// the next call starts from here.
    pub fn take_changed_from(&mut self) -> usize {
        std::mem::replace(&mut self.low_water, self.entries.len())
    }

    /// The thread of the entry at `index` (0-based).
    pub fn thread_at(&self, index: usize) -> StatePtr {
        self.entries[index].state
    }

    /// The index of the first watched entry (the length if none).
    pub fn first_watched(&self) -> usize {
        self.first_watched.min(self.entries.len())
    }

    /// Pops every entry above `len`, and all of them if nothing watched
    /// is left, each told to `gone`; then refreshes the summary.
    #[inline(always)]
    fn shrink_to(&mut self, len: usize, gone: &mut impl FnMut(StatePtr)) {
        // The first watched entry is the lowest: with it gone, nothing
        // watched is left.
        let len = if self.first_watched >= len { 0 } else { len };
        self.truncate(len, gone);
        if len == 0 {
            self.earliest = NEVER;
            self.kills_seen = 0;
            self.first_watched = 0;
        } else {
            self.refresh();
        }
    }

    /// The threads from the first watched one up to the top: the one that
    /// runs is among them, if the top went stale unseen.
    pub fn watched_and_above(&self) -> impl Iterator<Item = StatePtr> + '_ {
        self.entries[self.first_watched()..]
            .iter()
            .map(|entry| entry.state)
    }

    /// Every thread on the chain, outermost first.
    pub fn threads(&self) -> impl Iterator<Item = StatePtr> + '_ {
        self.entries.iter().map(|entry| entry.state)
    }

    /// The running thread, as far as the chain knows.
    pub fn top(&self) -> Option<StatePtr> {
        self.entries.last().map(|entry| entry.state)
    }

    /// The running thread `resumer` is about to resume a coroutine: drops
    /// the entries on top that no longer run (`is_stale`: they yielded or
    /// died unseen; each popped entry is told to `gone`) and says where the
    /// resumed coroutine will go.
    pub fn plan(
        &mut self,
        resumer: StatePtr,
        is_stale: impl Fn(StatePtr) -> bool,
        mut gone: impl FnMut(StatePtr),
    ) -> Plan {
        while let Some(top) = self.top() {
            if top == resumer || !is_stale(top) {
                break;
            }
            self.pop(&mut gone);
        }
        self.shrink_to(self.entries.len(), &mut gone);
        let len = self.entries.len();
        match self.top() {
            Some(top) if top == resumer => Plan {
                depth: len + 1,
                anchor_resumer_at: None,
            },
            Some(_) => Plan {
                depth: len + 2,
                anchor_resumer_at: Some(len + 1),
            },
            None => Plan {
                depth: 2,
                anchor_resumer_at: None,
            },
        }
    }

    /// `resumer` resumes `resumed` (watched if `watch` is given), as `plan`
    /// said just before, and the caller anchored what it said; `direct`:
    /// through the patched resume's own `lua_resume`, which keeps `resumed`
    /// on top of the resumer's stack. Returns the depth of `resumed`
    /// (1-based).
    ///
    /// Nothing runs Lua code between `plan` and `enter` (anchoring only
    /// allocates, and an emergency collection runs no finalizer), so the
    /// chain is still as `plan` left it.
    #[inline(always)]
    pub fn enter(
        &mut self,
        resumer: StatePtr,
        resumed: StatePtr,
        watch: Option<Watch>,
        plan: Plan,
        direct: bool,
    ) -> usize {
        if self.top() != Some(resumer) {
            let found = if plan.anchor_resumer_at.is_some() {
                Found::Anchored
            } else {
                Found::Unanchored
            };
            self.push(resumer, None, found);
        }
        debug_assert_eq!(self.entries.len() + 1, plan.depth);
        let found = if direct {
            Found::OnResumerStack
        } else {
            Found::Anchored
        };
        self.push(resumed, watch, found);
        self.entries.len()
    }

    /// Pushes an entry, keeping the summary (see [`Chain::refresh`]).
    #[inline(always)]
    fn push(&mut self, state: StatePtr, watch: Option<Watch>, found: Found) {
        if let Some(watch) = &watch {
            if self.first_watched >= self.entries.len() {
                self.first_watched = self.entries.len();
            }
            self.kills_seen += usize::from(watch.kill_at <= self.seen);
            self.earliest = self.earliest.min(watch.next_deadline(self.seen));
        } else if self.first_watched >= self.entries.len() {
            self.first_watched = self.entries.len() + 1;
        }
        self.entries.push(Entry {
            state,
            watch,
            found,
        });
        if found == Found::Anchored {
            self.anchored_max = self.anchored_max.max(self.entries.len());
        }
    }

    /// The resume that entered at `depth` returned: that entry and any
    /// left above it go, each told to `gone`.
    #[inline(always)]
    pub fn leave(&mut self, depth: usize, mut gone: impl FnMut(StatePtr)) -> LeftChain {
        let kill_seen = self
            .entries
            .get(depth.wrapping_sub(1))
            .and_then(|entry| entry.watch.as_ref())
            .is_some_and(|watch| watch.kill_at <= self.seen);
        self.shrink_to(depth.saturating_sub(1), &mut gone);
        let len = self.entries.len();
        let left = LeftChain {
            kill_seen,
            unanchor_from: len + 1,
            unanchor_to: self.anchored_max,
            anchor_resumer_at: None,
        };
        self.anchored_max = self.anchored_max.min(len);
        left
    }

    /// Like `leave`, at the depth of `state`, if it is on the chain: a
    /// coroutine that went on the chain while it ran (it watched itself or
    /// one that resumed it, or it was the running thread then) stopped
    /// running and is back in `resumer`, which resumed it while nothing
    /// watched ran. Nothing at or above it runs (what it resumed stopped
    /// first, seen or not): those entries go.
    ///
    /// If something watched is left below, `resumer` now runs for it (it
    /// was resumed by it, maybe through coroutines unseen here): it takes
    /// the place of `state`, so that a kill lands in it. It may stop
    /// running unseen, so it is anchored, at the depth `state` was
    /// anchored at (that slot exists: writing it allocates nothing). A
    /// `resumer` already on the chain stays where it is.
    pub fn leave_root(
        &mut self,
        state: StatePtr,
        resumer: StatePtr,
        gone: impl FnMut(StatePtr),
    ) -> LeftChain {
        let Some(index) = self.entries.iter().rposition(|entry| entry.state == state) else {
            return LeftChain::default();
        };
        let depth = index + 1;
        let was_anchored = self.entries[index].found == Found::Anchored;
        let mut left = self.leave(depth, gone);
        let runs_for_watched = self.first_watched < self.entries.len();
        if was_anchored && runs_for_watched && self.threads().all(|thread| thread != resumer) {
            self.push(resumer, None, Found::Anchored);
            left.anchor_resumer_at = Some(self.entries.len());
            left.unanchor_from = left.unanchor_from.max(self.entries.len() + 1);
        }
        left
    }

    /// The depths to anchor before [`Chain::watch_running`] watches
    /// `state`, which is `running` or (if anything, `is_normal`) a thread
    /// that resumed it: with an empty chain, `state` goes at depth 1 and
    /// `running`, if another thread, at depth 2; on the chain, an entry
    /// that nothing anchors is anchored at its depth.
    pub fn watch_anchors(
        &self,
        state: StatePtr,
        running: StatePtr,
        is_normal: impl Fn(StatePtr) -> bool,
    ) -> WatchAnchors {
        if self.entries.is_empty() {
            if state != running && !is_normal(state) {
                return WatchAnchors::default();
            }
            return WatchAnchors {
                state_at: Some(1),
                running_at: (state != running).then_some(2),
            };
        }
        let unanchored = self
            .entries
            .iter()
            .rposition(|entry| entry.state == state)
            .filter(|&index| self.entries[index].found == Found::Unanchored);
        WatchAnchors {
            state_at: unanchored.map(|index| index + 1),
            running_at: None,
        }
    }

    /// Watches `state` from `now` on, if it is running: on the chain, or,
    /// with an empty chain, `running` itself or a thread that resumed it
    /// (`is_normal`). The caller anchored what `watch_anchors` said, as
    /// `anchored`; if the chain asks for other anchors now, nothing is
    /// watched and the answer is `Err` with them. Otherwise returns whether
    /// it watches `state`.
    pub fn watch_running(
        &mut self,
        state: StatePtr,
        running: StatePtr,
        is_normal: impl Fn(StatePtr) -> bool,
        watch: Watch,
        anchored: WatchAnchors,
    ) -> Result<bool, WatchAnchors> {
        // What the caller anchored is cleared by the next `leave`, used or not.
        let written = anchored.state_at.max(anchored.running_at).unwrap_or(0);
        self.anchored_max = self.anchored_max.max(written);
        let needed = self.watch_anchors(state, running, &is_normal);
        if needed != anchored && needed != WatchAnchors::default() {
            return Err(needed);
        }
        if self.entries.is_empty() {
            if state != running && !is_normal(state) {
                return Ok(false);
            }
            self.push(state, Some(watch), Found::Anchored);
            if state != running {
                // It resumed `running`, maybe through coroutines unseen
                // here: a kill lands in whichever runs, as for any
                // coroutine it resumed.
                self.push(running, None, Found::Anchored);
            }
            self.refresh();
            return Ok(true);
        }
        match self.entries.iter().rposition(|entry| entry.state == state) {
            Some(index) => {
                let entry = &mut self.entries[index];
                entry.watch = Some(watch);
                if entry.found == Found::Unanchored {
                    entry.found = Found::Anchored;
                    self.anchored_max = self.anchored_max.max(index + 1);
                }
                self.refresh();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// A warn callback asked for more time.
    pub fn reset(&mut self, depth: usize, now: Nanos) {
        if let Some(watch) = self
            .entries
            .get_mut(depth.wrapping_sub(1))
            .and_then(|entry| entry.watch.as_mut())
        {
            watch.reset(now);
        }
        self.refresh();
    }

    /// The earliest deadline of a watched, running coroutine ([`NEVER`]:
    /// none).
    pub fn next_deadline(&self) -> Nanos {
        self.earliest
    }

    /// Whether the running thread needs the hook now: a deadline passed, or
    /// a killed coroutine is still running (its kill must not be swallowed).
    pub fn needs_hook(&self, now: Nanos) -> bool {
        self.kills_seen > 0 || self.earliest <= now
    }

    /// The hook fired on `state`: the event to dispatch, innermost first,
    /// with the depth of the coroutine it concerns and where to find it.
    pub fn event(
        &mut self,
        state: *mut mlua::ffi::lua_State,
        now: Nanos,
    ) -> Option<(Event, usize, Locate)> {
        if self.top()?.0 != state {
            return None;
        }
        // From here on a watch whose kill deadline has passed counts as
        // seen (`kill_seen`, `LeftChain::kill_seen`), whether its kill is
        // the event raised now or one raised at the next event.
        self.seen = self.seen.max(now);
        let found = self
            .entries
            .iter_mut()
            .enumerate()
            .rev()
            .find_map(|(index, entry)| {
                let watch = entry.watch.as_mut()?;
                let event = if watch.kill_at <= now {
                    Event::Kill
                } else if watch.warn_at <= now {
                    watch.warn_at = NEVER;
                    Event::Warn
                } else {
                    return None;
                };
                Some((event, index + 1))
            });
        let (event, depth) = found?;
        self.refresh();
        let locate = if depth == self.entries.len() {
            Locate::Running
        } else {
            match self.entries[depth - 1].found {
                // An entry resumed directly sits right above its resumer.
                Found::OnResumerStack => Locate::OnStackOf(self.entries[depth - 2].state),
                // A watched entry is never unanchored (`watch_running`).
                Found::Anchored | Found::Unanchored => Locate::Anchored,
            }
        };
        Some((event, depth, locate))
    }

    /// Forgets every entry (the VM is closing).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.low_water = 0;
        self.refresh();
    }
}
