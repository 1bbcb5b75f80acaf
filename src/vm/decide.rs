//! The hook's decision: when our hook fires on the VM's thread, what is
//! due there (a watch's warning or kill first, then an mtint interrupt),
//! and whether the hook stays armed; and the user's hooks set or read
//! meanwhile through corowatch's `debug.sethook`/`debug.gethook`.

use std::ffi::c_int;
use std::sync::atomic::Ordering;

use mlua::ffi::{lua_Hook, lua_State};

use super::chain::hook_horizon;
use super::{Id, Pending, Verdict, Vm, VmInner};
use crate::arming::{HookArming, Need};
use crate::clock::{self, Nanos};
use crate::watch::Chain;

impl Vm {
    /// The hook fired on `state` for `event`; `id_of_state` reads the id of
    /// `state` from the weak `thread -> id` table, on LuaJIT only (see
    /// `VmInner::slot_of_state`). Decides what to deliver, and leaves the hook armed
    /// only while something needs it. Also returns the user's chained hook,
    /// if this event is one the user asked for.
    ///
    /// # Safety
    /// `state` is the running thread, inside its hook, on its OS thread.
    pub unsafe fn on_hook(
        &self,
        state: *mut lua_State,
        id_of_state: impl FnOnce() -> Option<Id>,
        at_c_function: impl FnOnce() -> bool,
        probe_target: impl FnMut(usize) -> super::ProbeTarget,
        event: c_int,
    ) -> (Verdict, Option<lua_Hook>) {
        #[cfg(not(feature = "luajit"))]
        let _ = probe_target;
        self.note_owner();
        let mut inner = self.lock();
        // SAFETY: `state` is the running thread, in its hook, on its thread.
        unsafe { inner.arming.sync(state) };
        let forward = inner.arming.forward(event);
        if inner.arming.is_resting() || at_c_function() {
            // Resting: nothing is pending. At a C function: what is pending
            // stays, and the hook stays armed for the next Lua event.
            return (Verdict::Continue, forward);
        }
        let now = clock::now();
        // SAFETY: this is the VM's thread, in its hook: no other use of the
        // chain is under way (they run no Lua code).
        let verdict = unsafe {
            self.owner.with(|own| {
                let chain = &mut own.chain;
                if chain.is_below_top(state) {
                    // A Lua event in `state` (those at C functions, the
                    // patched resume's among them, were let pass above): it
                    // runs, so what the chain holds above it has returned
                    // or yielded unseen.
                    inner.change_chain(chain, |chain, gone| chain.drop_above(state, gone));
                }
                // A watch's event first: an interrupt handler that returns
                // (a sticky one runs at every instruction) must not starve a
                // kill. An interrupt left pending keeps the hook armed, for
                // the next event.
                // Then a dispatch probe's kill (LuaJIT), which stays due
                // while its delivery lasts.
                let (verdict, interrupt_stays) = match chain.event(state, now) {
                    Some((event, depth, locate)) => (
                        Verdict::Watch(event, depth, locate),
                        inner.has_interrupt(state, id_of_state),
                    ),
                    #[cfg(feature = "luajit")]
                    None => match inner.probe_kill(now, probe_target) {
                        Some(index) => (
                            Verdict::Probe(index),
                            inner.has_interrupt(state, id_of_state),
                        ),
                        None => inner.take_interrupt(state, id_of_state),
                    },
                    #[cfg(not(feature = "luajit"))]
                    None => inner.take_interrupt(state, id_of_state),
                };
                #[cfg(feature = "luajit")]
                let probe_stays = inner.probe_due();
                #[cfg(not(feature = "luajit"))]
                let probe_stays = false;
                self.mirror.publish(chain);
                let due = chain.needs_hook(hook_horizon(now));
                let watch_needs_hook = due && chain.top().is_some_and(|top| top.0 == state);
                inner.settle_hook(
                    state,
                    interrupt_stays || watch_needs_hook || probe_stays,
                    chain,
                    now,
                );
                self.mark_armed(&inner, chain);
                // A deadline the hook stays on for is the hook's: the
                // watchdog comes back on its retry alarm anyway. An alarm
                // for it now would send the watchdog to arm the hook again
                // at every event (LuaJIT's hook is the VM's and stays on,
                // polling, while a coroutine the chain cannot see runs).
                let hook_stays = watch_needs_hook || (cfg!(feature = "luajit") && due);
                if !hook_stays {
                    self.set_alarm(&mut inner, chain.next_deadline());
                }
                verdict
            })
        };
        (verdict, forward)
    }

    /// The running thread is about to call `debug.sethook`.
    pub fn begin_user_hook_change(&self) {
        self.lock().arming.begin_user_change();
    }

    /// The running thread called `debug.sethook` about `state` (itself or
    /// a coroutine): the user's new hook is what to put back later (PUC
    /// Lua) or what to chain (LuaJIT).
    ///
    /// # Safety
    /// `state` is alive and of the VM the calling OS thread runs.
    pub unsafe fn user_hook_changed(&self, state: *mut lua_State) {
        let mut inner = self.lock();
        // SAFETY: as the caller promised; we hold the lock.
        unsafe { inner.arming.user_hook_changed(state) };
        if inner.arming.take_deferred() {
            // SAFETY: the VM's thread, outside every other use of the chain.
            unsafe {
                self.owner.with(|own| {
                    inner.arm_everything_due(&own.chain);
                    self.mark_armed(&inner, &own.chain);
                })
            };
        }
    }

    /// While our hook is in place of the user's on `state`, puts the
    /// user's back for a moment (to read it with `debug.gethook`); returns
    /// whether it did, and then `user_hook_changed` must follow.
    ///
    /// # Safety
    /// As for [`Vm::user_hook_changed`].
    pub unsafe fn lend_user_hook(&self, state: *mut lua_State) -> bool {
        let mut inner = self.lock();
        // SAFETY: as the caller promised; we hold the lock.
        unsafe { inner.arming.lend(state) }
    }
}

impl VmInner {
    /// Whether an interrupt is pending for the running thread `state`.
    fn has_interrupt(
        &mut self,
        state: *mut lua_State,
        id_of_state: impl FnOnce() -> Option<Id>,
    ) -> bool {
        self.slot_of_state(state, id_of_state)
            .is_some_and(|(_, slot)| slot.pending != Pending::None)
    }

    /// Takes the interrupt pending for the running thread `state`, if any;
    /// also says whether one stays pending there (sticky).
    fn take_interrupt(
        &mut self,
        state: *mut lua_State,
        id_of_state: impl FnOnce() -> Option<Id>,
    ) -> (Verdict, bool) {
        let Some((id, slot)) = self.slot_of_state(state, id_of_state) else {
            return (Verdict::Continue, false);
        };
        let before = slot.pending;
        if before == Pending::Once {
            slot.pending = Pending::None;
        }
        let after = slot.pending;
        self.count_transition(before, after);
        if before == Pending::None {
            (Verdict::Continue, false)
        } else {
            let handlers = self.handlers_used;
            (Verdict::Deliver { id, handlers }, after == Pending::Sticky)
        }
    }

    /// After the hook ran on `state` (the running thread): keep it armed if
    /// `needed` there, else relax or remove it.
    ///
    /// # Safety
    /// `state` is the running thread, inside its hook, on its OS thread.
    unsafe fn settle_hook(
        &mut self,
        state: *mut lua_State,
        needed: bool,
        chain: &Chain,
        now: Nanos,
    ) {
        let need = if needed {
            Need::Armed
        } else if cfg!(feature = "luajit")
            && (self.pending.load(Ordering::Relaxed) > 0 || chain.needs_hook(hook_horizon(now)))
        {
            // The hook is global: someone else (a suspended target, or the
            // chain's top when it runs again) still needs it.
            Need::Poll
        } else {
            Need::Nothing
        };
        // SAFETY: `state` is the running thread, we are in its hook, and we
        // hold the VM lock.
        unsafe { self.arming.settle(state, need) };
    }
}
