//! corowatch's side of a VM: its chain of running coroutines, changed by
//! the VM's own thread without the lock and published for the watchdog
//! (the handshakes are [`crate::mirror`]'s), the alarm that wakes the
//! watchdog at the chain's next deadline, and the watch epoch that lets the
//! patched resume remember a coroutine's watch.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mlua::ffi::lua_State;

#[cfg(not(feature = "luajit"))]
use super::writing_from;
use super::{has_stopped, release, Id, Pending, Vm, VmInner};
use crate::arming::{HookArming, Side};
use crate::barrier;
use crate::clock::{self, Nanos, NEVER};
use crate::state_ptr::StatePtr;
use crate::watch::{Chain, LeftChain, Plan, Watch, WatchAnchors};
use crate::watchdog::{self, Alarm, Backoff};

/// What only the VM's own thread touches: corowatch's chain of running
/// coroutines, and the threads a change of it popped.
#[derive(Default)]
pub(super) struct OwnerSide {
    pub(super) chain: Chain,
    pub(super) popped: Vec<StatePtr>,
}

/// Whether a thread the chain pops must be told to the arming record
/// (PUC Lua, whose hooks are per thread: see [`HookArming::release`]).
/// LuaJIT's hook is the VM's and its release does nothing, and the
/// mirror's `armed` mark is never set there ([`Vm::mark_armed`]), so a
/// watched resume collects nothing.
const RELEASES_POPPED: bool = !cfg!(feature = "luajit");

/// How long before a watch's deadline the hook goes on (LuaJIT). There
/// another OS thread asks for it with a signal (see [`crate::signal`]),
/// whose delivery took 30–80 µs on this kind of machine: armed that early,
/// the hook looks at the clock at every instruction for the last stretch,
/// and delivers at the deadline itself. PUC Lua writes the hook from the
/// watchdog at the deadline.
const HOOK_LEAD: Duration = if cfg!(feature = "luajit") {
    Duration::from_micros(150)
} else {
    Duration::ZERO
};

/// [`HOOK_LEAD`] on the chain's clock.
const HOOK_LEAD_NANOS: Nanos = HOOK_LEAD.as_nanos() as Nanos;

/// When the hook must be on for a deadline.
fn hook_time(deadline: Nanos) -> Nanos {
    if deadline == NEVER {
        return NEVER;
    }
    deadline.saturating_sub(HOOK_LEAD_NANOS)
}

/// The deadlines that need the hook on at `now`: those up to `now` plus
/// the hook's lead.
pub(super) fn hook_horizon(now: Nanos) -> Nanos {
    now.saturating_add(HOOK_LEAD_NANOS)
}

/// The `check` of a change that leaves a resume: with the resumer back on
/// top (it is on the chain, so something watched runs), its own deadlines
/// may have passed meanwhile.
fn back_on_top(resumer: *mut lua_State) -> impl FnOnce(&Chain) -> Option<Nanos> {
    move |chain| {
        chain
            .top()
            .is_some_and(|top| top.0 == resumer)
            .then(clock::now)
    }
}

impl Alarm for Vm {
    fn on_alarm(&self) -> Option<Instant> {
        clock::to_instant(self.alarm_went_off())
    }
}

impl Vm {
    /// The watch epoch (see the field); 0 if the VM cannot tell.
    #[inline]
    pub fn watch_epoch(&self) -> u64 {
        self.watch_epoch.load(Ordering::Relaxed)
    }

    /// Every thread free is seen from now on (the allocator is wrapped and
    /// knows a thread's size).
    pub fn track_watch_epoch(&self) {
        self.watch_epoch.store(1, Ordering::Relaxed);
    }

    /// Moves the watch epoch, on the VM's own thread: a coroutine's watch
    /// is being set (`set_watch`), or a thread's memory freed (the
    /// allocator; a coroutine at that address from now on is another).
    #[inline]
    pub fn move_watch_epoch(&self) {
        // Only the VM's own thread writes: no read-modify-write needed.
        let epoch = self.watch_epoch.load(Ordering::Relaxed);
        if epoch != 0 {
            self.watch_epoch
                .store(epoch.wrapping_add(1).max(1), Ordering::Relaxed);
        }
    }

    /// Whether anything watched runs in this VM (the chain is active).
    pub fn is_active(&self) -> bool {
        self.mirror.is_active()
    }

    /// Whether a killed coroutine may be running in this VM.
    pub fn kill_seen(&self) -> bool {
        self.mirror.kill_seen()
    }

    /// Runs `change` on the chain, from the VM's own thread, and publishes
    /// the result; each thread it pops goes to the arming record (PUC Lua:
    /// see [`RELEASES_POPPED`]). `check`,
    /// once the chain changed, says whether to look at its deadlines, as of
    /// when: the top is armed at once if one passed, and the watchdog's
    /// alarm moves earlier if needed.
    ///
    /// Without the lock unless our hook may be on a thread of the chain
    /// (the mirror's `armed` mark: the threads leaving then go to the
    /// arming record), a deadline passed, or the alarm must move: the
    /// handshakes are [`crate::mirror`]'s.
    ///
    /// # Safety
    /// Called on the VM's own thread, outside every other use of the chain;
    /// the threads the chain names, and those `change` pops, are held alive
    /// until it returns (on stacks or in anchors: see the module comment).
    #[inline(always)]
    unsafe fn change_chain<R>(
        &self,
        change: impl FnOnce(&mut Chain, &mut dyn FnMut(StatePtr)) -> R,
        check: impl FnOnce(&Chain) -> Option<Nanos>,
    ) -> R {
        // `change` and `check` are called at one place each, where the
        // compiler inlines them: each resume of something watched comes
        // through here twice.
        let mut locked = self.mirror.is_armed().then(|| self.lock());
        // SAFETY: the caller's contract.
        let (result, now, popped, due, hook_time) = unsafe {
            self.owner.with(|own| {
                let OwnerSide { chain, popped } = own;
                popped.clear();
                let result = change(chain, &mut |state| {
                    if RELEASES_POPPED {
                        popped.push(state);
                    }
                });
                let now = check(chain);
                if locked.is_some() {
                    // Published under the lock, below.
                    return (result, now, false, false, NEVER);
                }
                let due = now.is_some_and(|now| chain.needs_hook(hook_horizon(now)));
                let earliest = self.mirror.publish(chain);
                // When the hook must be on, if the alarm is to be checked.
                let hook_time = now.map_or(NEVER, |_| hook_time(earliest));
                (result, now, !popped.is_empty(), due, hook_time)
            })
        };
        if let Some(inner) = &mut locked {
            // SAFETY: the caller's contract; the popped threads are alive.
            unsafe { self.settle_locked(inner, now) };
            return result;
        }
        barrier::light();
        let armed = popped && self.mirror.is_armed();
        let late_alarm = hook_time != NEVER && !self.mirror.alarm_by(hook_time);
        if armed || due || late_alarm {
            let mut inner = self.lock();
            // SAFETY: the caller's contract; the popped threads are alive
            // and the watchdog, which held the lock, is done with them.
            unsafe { self.settle_locked(&mut inner, (due || late_alarm).then(clock::now)) };
        }
        result
    }

    /// Under the lock, after a change of the chain: the threads it popped
    /// go to the arming record, then [`Vm::after_change_locked`] looks at
    /// the deadlines as of `now`, if given.
    ///
    /// # Safety
    /// As for [`Vm::change_chain`], which calls it before it returns.
    unsafe fn settle_locked(&self, inner: &mut VmInner, now: Option<Nanos>) {
        // SAFETY: the caller's contract.
        unsafe {
            self.owner.with(|own| {
                let VmInner {
                    arming,
                    slots,
                    ids_by_state,
                    ..
                } = &mut *inner;
                for &state in &own.popped {
                    release(arming, slots, ids_by_state, state);
                }
                self.after_change_locked(inner, &mut own.chain, |_| now);
            })
        }
    }

    /// The end of a change made under the lock: the deadlines as `check`
    /// says, the chain published, and the `armed` mark brought in line
    /// with the arming record.
    fn after_change_locked(
        &self,
        inner: &mut VmInner,
        chain: &mut Chain,
        check: impl FnOnce(&Chain) -> Option<Nanos>,
    ) {
        if let Some(now) = check(chain) {
            if let Some(top) = chain.top() {
                if chain.needs_hook(hook_horizon(now)) {
                    // SAFETY: the top is the running thread, or the
                    // coroutine it is resuming (held on its stack); this is
                    // its OS thread.
                    unsafe { inner.arming.arm(top.0, Side::Owner) };
                }
            }
            self.set_alarm(inner, chain.next_deadline());
        }
        self.mirror.publish(chain);
        self.mark_armed(inner, chain);
    }

    /// Under the lock, on the VM's thread, after it may have armed threads
    /// of the chain or released them: `armed` says whether our hook is on
    /// one of them, so that the lock-free pops that follow tell the arming
    /// record (PUC Lua, whose hooks are per thread; LuaJIT's hook is the
    /// VM's and settles itself).
    pub(super) fn mark_armed(&self, inner: &VmInner, chain: &Chain) {
        if cfg!(feature = "luajit") {
            return;
        }
        if chain.threads().any(|state| inner.arming.is_armed(state.0)) {
            self.mirror.begin_arming();
        } else if self.mirror.is_armed() {
            self.mirror.end_arming();
        }
    }

    /// The running thread `resumer` is about to resume a coroutine (with
    /// something watched involved): where the coroutine will go, in the
    /// common cases, which need no change of the chain (it is empty, or
    /// `resumer` is its top). Reads only the mirror, and cannot panic:
    /// callers take it outside their panic guard.
    #[inline(always)]
    pub fn plan_unchanged(&self, resumer: *mut lua_State) -> Option<Plan> {
        let len = self.mirror.len();
        if len == 0 {
            return Some(Plan {
                depth: 2,
                anchor_resumer_at: None,
            });
        }
        (self.mirror.top() == resumer).then_some(Plan {
            depth: len + 1,
            anchor_resumer_at: None,
        })
    }

    /// The running thread `resumer` is about to resume a coroutine (with
    /// something watched involved): repairs the chain and says where the
    /// coroutine will go, for the caller to anchor it before `enter`.
    ///
    /// # Safety
    /// `resumer` is the running thread, run by the calling OS thread; every
    /// thread on the chain is anchored (so alive).
    pub unsafe fn plan_enter(&self, resumer: *mut lua_State) -> Plan {
        if let Some(plan) = self.plan_unchanged(resumer) {
            return plan;
        }
        // SAFETY: the chain's threads are alive and belong to this VM, which
        // the calling OS thread runs (caller's contract).
        unsafe {
            self.change_chain(
                |chain, gone| chain.plan(StatePtr(resumer), |state| has_stopped(state), gone),
                |_| None,
            )
        }
    }

    /// The running thread `resumer` is about to resume `resumed`, watched
    /// if `watch` is given, as `plan_enter` said just before (see
    /// [`Chain::enter`] for `direct`). Returns the depth of `resumed` in
    /// the chain. `now` is when the watch started (the caller read the
    /// clock once).
    ///
    /// # Safety
    /// `resumer` is the running thread, on its OS thread; `resumed` is a
    /// coroutine of this VM that the caller keeps alive (on its stack or
    /// anchored, as `plan` says) until the matching `leave`.
    #[inline(always)]
    pub unsafe fn enter(
        &self,
        resumer: *mut lua_State,
        resumed: *mut lua_State,
        watch: Option<Watch>,
        now: Nanos,
        (plan, direct): (Plan, bool),
    ) -> usize {
        // SAFETY: the caller's contract.
        unsafe {
            self.change_chain(
                |chain, _| chain.enter(StatePtr(resumer), StatePtr(resumed), watch, plan, direct),
                |_| Some(now),
            )
        }
    }

    /// The resume that `enter` announced at `depth` returned, on `resumer`
    /// (now running again).
    ///
    /// # Safety
    /// `resumer` is the running thread, on its OS thread, and every thread
    /// on the chain is still held alive (the one leaving included).
    #[inline(always)]
    pub unsafe fn leave(&self, resumer: *mut lua_State, depth: usize) -> LeftChain {
        // SAFETY: the caller's contract.
        unsafe { self.change_chain(|chain, gone| chain.leave(depth, gone), back_on_top(resumer)) }
    }

    /// A coroutine that went on the chain while it ran returned to
    /// `resumer`, which resumed it while nothing watched ran; `resumer`
    /// may take its place (see [`Chain::leave_root`]), and must then be
    /// anchored where [`LeftChain::anchor_resumer_at`] says.
    ///
    /// # Safety
    /// As for [`Vm::leave`].
    pub unsafe fn leave_root(&self, resumer: *mut lua_State, co: *mut lua_State) -> LeftChain {
        // A resume refused because `co` is normal (it resumed, maybe
        // unseen, the thread that tried) leaves the chain as it is: `co`
        // and what runs above it are still running.
        // SAFETY: `co` is alive (the caller holds it) and of this VM.
        if !unsafe { has_stopped(StatePtr(co)) } {
            return LeftChain::default();
        }
        // SAFETY: the caller's contract.
        unsafe {
            self.change_chain(
                |chain, gone| chain.leave_root(StatePtr(co), StatePtr(resumer), gone),
                back_on_top(resumer),
            )
        }
    }

    /// What to anchor before [`Vm::watch_running`] watches `state`, which
    /// is `running` or a thread that may have resumed it.
    ///
    /// # Safety
    /// As for [`Vm::watch_running`].
    pub unsafe fn watch_anchors(
        &self,
        state: *mut lua_State,
        running: *mut lua_State,
    ) -> WatchAnchors {
        // SAFETY: the VM's thread (caller), which runs no other use of the
        // chain now; `state` is alive, of this VM (caller).
        unsafe {
            self.owner.with(|own| {
                own.chain
                    .watch_anchors(StatePtr(state), StatePtr(running), |state| {
                        !has_stopped(state)
                    })
            })
        }
    }

    /// Watches `state` from now on if it runs: it is the running thread
    /// `running`, or on the chain, or (with nothing watched yet) a thread
    /// that resumed `running`. `anchored`: what the caller anchored, as
    /// `watch_anchors` said. Returns `Ok(false)` if it does not run (its
    /// watch starts when it is next resumed), `Err` with what to anchor if
    /// the chain changed since.
    ///
    /// # Safety
    /// `state` is alive and `running` is the running thread, both of the
    /// VM the calling OS thread runs.
    pub unsafe fn watch_running(
        &self,
        state: *mut lua_State,
        running: *mut lua_State,
        watch: Watch,
        anchored: WatchAnchors,
    ) -> Result<bool, WatchAnchors> {
        let started = std::cell::Cell::new(false);
        // SAFETY: the caller's contract; nothing is popped here.
        unsafe {
            self.change_chain(
                |chain, _| {
                    let watched = chain.watch_running(
                        StatePtr(state),
                        StatePtr(running),
                        |state| !has_stopped(state),
                        watch,
                        anchored,
                    );
                    started.set(watched == Ok(true));
                    watched
                },
                |_| started.get().then(clock::now),
            )
        }
    }

    /// A warn callback at `depth` asked for more time.
    ///
    /// # Safety
    /// Called on the VM's own thread, which runs the callback.
    pub unsafe fn reset(&self, depth: usize) {
        let now = clock::now();
        // SAFETY: the caller's contract; nothing is popped here.
        unsafe { self.change_chain(|chain, _| chain.reset(depth, now), |_| Some(now)) }
    }

    /// Called by the watchdog when the alarm set by `set_alarm` goes off.
    /// Returns the next alarm, if the watchdog should wait for it.
    fn alarm_went_off(&self) -> Nanos {
        let mut inner = self.lock();
        self.mirror.set_alarm(NEVER);
        if inner.closed {
            return NEVER;
        }
        // PUC Lua writes the hooks of the threads the mirror names: mark
        // the chain before reading it (see `crate::mirror`). LuaJIT arms
        // the VM through its anchor, and no thread of the chain is touched.
        let armed_before = cfg!(feature = "luajit") || self.mirror.begin_arming();
        barrier::heavy();
        let now = clock::now();
        if self.mirror.needs_hook(hook_horizon(now)) {
            let deadline = self.mirror.next_deadline();
            if deadline != NEVER && deadline != inner.lateness_timed_for {
                // The first arming for this deadline (its re-arms are late
                // on purpose; a kill already seen has none): how long after
                // the hook's time it came (LuaJIT's is ahead of the
                // deadline by the hook's lead, which a late watchdog eats
                // into before the kill is late).
                inner.lateness_timed_for = deadline;
                watchdog::note_lateness(now.saturating_sub(hook_time(deadline)));
            }
            inner.arm_chain(Side::Afar, self.mirror.watched_and_above());
            // Come back in case the arming is undone before the hook fires.
            let next = clock::after(now, clock::nanos(inner.retry.step()));
            self.mirror.set_alarm(next);
            return next;
        }
        if !armed_before {
            self.mirror.end_arming();
        }
        inner.retry = Backoff::first();
        let next = hook_time(self.mirror.next_deadline());
        self.mirror.set_alarm(next);
        next
    }

    /// Makes sure the watchdog wakes up by `deadline` (the chain's next,
    /// less the hook's lead). Under the lock.
    pub(super) fn set_alarm(&self, _: &mut VmInner, deadline: Nanos) {
        let at = hook_time(deadline);
        if self.mirror.alarm_by(at) {
            return; // and so if there is no deadline
        }
        self.mirror.set_alarm(at);
        if let Some(at) = clock::to_instant(at) {
            watchdog::schedule_alarm(self.me.clone(), at);
        }
    }
}

impl VmInner {
    /// Runs `change` on the VM's `chain`; each thread it pops is handed to
    /// `gone`, which takes our hook off it (see [`release`]). Called on the
    /// VM's own OS thread (the patched resume, the hook).
    pub(super) fn change_chain<R>(
        &mut self,
        chain: &mut Chain,
        change: impl FnOnce(&mut Chain, &mut dyn FnMut(StatePtr)) -> R,
    ) -> R {
        let VmInner {
            arming,
            slots,
            ids_by_state,
            ..
        } = self;
        // SAFETY: the threads the chain pops are alive (module comment)
        // and of this VM, whose OS thread runs this; we hold the VM lock.
        let mut gone = |state: StatePtr| unsafe { release(arming, slots, ids_by_state, state) };
        change(chain, &mut gone)
    }

    /// Arms, from the VM's own thread, what another thread would have
    /// armed while the user changed a hook: every target with an interrupt
    /// pending, and the chain if a deadline passed.
    pub(super) fn arm_everything_due(&mut self, chain: &Chain) {
        let pending: Vec<Id> = self
            .slots
            .iter()
            .filter(|(_, slot)| slot.pending != Pending::None)
            .map(|(id, _)| *id)
            .collect();
        for id in pending {
            self.arm(id, Side::Owner);
        }
        if chain.needs_hook(hook_horizon(clock::now())) {
            self.arm_chain(Side::Owner, chain.watched_and_above());
        }
    }

    /// Arms the chain's threads for a passed deadline. The top may have
    /// returned or yielded unseen (resumed with the original `resume`):
    /// then a thread below it runs. Every thread from the watched one up is
    /// armed, and the hook, where it fires, drops the stale entries above.
    /// `threads`: those, from the chain (the owner) or its mirror (the
    /// watchdog, after the handshake of [`crate::mirror`]).
    fn arm_chain(&mut self, side: Side, threads: impl Iterator<Item = StatePtr>) {
        // LuaJIT's hook is the VM's: armed once, through the anchor; no
        // thread of the chain is touched.
        #[cfg(feature = "luajit")]
        {
            let mut threads = threads;
            if threads.next().is_some() {
                self.arm_vm(side);
            }
        }
        #[cfg(not(feature = "luajit"))]
        {
            let VmInner {
                arming,
                writing_afar,
                ..
            } = self;
            for state in threads {
                // SAFETY: the chain's threads are alive while it names
                // them, and the mirror's until the owner has seen `armed`
                // (module comments here and in `crate::mirror`); one that
                // does not run is armed for when it runs again. We hold the
                // lock.
                writing_from(side, writing_afar, || unsafe { arming.arm(state.0, side) });
            }
        }
    }
}
