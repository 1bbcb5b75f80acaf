//! LuaJIT: one hook serves the whole VM, and LuaJIT sets and clears a "hook
//! running" bit in the byte that holds the hook mask, around every hook call,
//! without synchronisation. A `lua_sethook` from another OS thread while any
//! hook runs can write the bit back after it was cleared, and then no hook
//! ever runs again: the kill never lands. So on LuaJIT:
//!
//! - The user's hook is chained: ours is installed in its place, with the
//!   user's events and count, and calls it. The VM's own thread does that
//!   when the user calls `debug.sethook` (corowatch patches it), or the
//!   first time it sees a hook it did not install.
//! - While our hook is installed, another OS thread writes nothing: the hook
//!   fires at least every [`LAZY_COUNT`] instructions and arms itself when
//!   something is due.
//! - Another OS thread never writes the hook itself: it asks the VM's own
//!   OS thread to, with a signal (see [`crate::signal`]), where no hook of
//!   ours is installed. Only when it cannot (no thread known, the host
//!   replaced our signal handler, a request unanswered for 50 ms) does it
//!   write it itself, as before (README, Limitations).

use super::*;
use crate::signal::Cell;

/// How often an installed but idle hook of ours fires on LuaJIT: often
/// enough to see what became due, rarely enough to cost nothing measurable.
/// At most: while it polls for something due, its count is drawn anew
/// each time it is put back (see [`LuajitArming::poll_count`]).
pub const LAZY_COUNT: c_int = 1000;

/// The VM-wide hook, and the user's hook it chains.
#[derive(Default)]
pub struct LuajitArming {
    /// What the VM needs, as last decided on its own thread.
    need: Option<Need>,
    /// The hook ours calls for the user's events.
    user: Option<SavedHook>,
    /// Instructions until the user's next count event.
    countdown: c_int,
    /// The count our hook is installed with.
    count: c_int,
    /// What the signal handler reads to install our hook on the VM's
    /// own thread for another thread (see [`crate::signal`]); `None`
    /// if there was no cell left for this VM.
    cell: Option<&'static Cell>,
    /// Another thread found something due while our hook rests beside
    /// the user's: the hook must look at everything again.
    due: bool,
    /// The user is changing the hook through corowatch's
    /// `debug.sethook` or reading it with `debug.gethook`: the hook in
    /// place may be the user's own, unchained, and must not be touched
    /// from another thread. A count: a finalizer can change the hook
    /// inside a change.
    user_changing: u32,
    /// The state of the generator that draws the polling count.
    draw: u32,
}

impl LuajitArming {
    /// Installs our hook for `need` (on the VM's own thread).
    ///
    /// # Safety
    /// `state` must be alive and run by the calling OS thread (or be
    /// a VM where no hook at all is installed); the caller holds the
    /// VM lock.
    unsafe fn apply(&mut self, state: *mut lua_State, need: Need) {
        self.adopt(state);
        self.need = Some(need);
        let (mask, count) = match (need, self.user) {
            (Need::Armed, _) => (DELIVERY_MASK, 1),
            (Need::Nothing, None) => {
                if ffi::lua_gethook(state).is_some() {
                    self.write(state, None, 0, 0);
                }
                self.count = 0;
                return;
            }
            // Poll, or rest beside the user's hook: the user's events,
            // and a count to notice what becomes due in a loop that
            // sends none of them.
            (need, user) => {
                let mask = user.map_or(0, |u| u.mask) | ffi::LUA_MASKCOUNT;
                let user_count = user
                    .filter(|u| u.mask & ffi::LUA_MASKCOUNT != 0)
                    .map(|u| u.count);
                let count = if need == Need::Poll {
                    // Never past the user's next count event, which then
                    // comes on time. The user's events come at fixed
                    // places (every so many instructions, a line, a
                    // call): after one, any place must be reachable by
                    // the next poll.
                    let cap = user_count.map_or(LAZY_COUNT, |_| self.countdown);
                    let low = if user.is_some() { 1 } else { LAZY_COUNT / 2 };
                    self.poll_count(low, cap.clamp(1, LAZY_COUNT))
                } else {
                    // Resting: the user's own count (what `debug.gethook`
                    // shows), `forward` carrying what is left over.
                    user_count.map_or(LAZY_COUNT, |count| count.clamp(1, LAZY_COUNT))
                };
                (mask, count)
            }
        };
        self.write(state, Some(hook), mask, count);
        self.count = count;
    }

    /// `install`, with the signal handler kept off meanwhile: on the
    /// VM's thread it could interrupt our `lua_sethook` half-way (its
    /// update of the dispatch table), and it leaves the hook alone
    /// then (the arming is lost, and repaired by the watchdog).
    ///
    /// # Safety
    /// As for [`install`]: `state` is alive and of this VM; from another OS
    /// thread only under the VM lock, as every arming is.
    unsafe fn write(
        &self,
        state: *mut lua_State,
        func: Option<lua_Hook>,
        mask: c_int,
        count: c_int,
    ) {
        match self.cell {
            // SAFETY: as for `install`, whose contract the caller keeps.
            Some(cell) => cell.owner_writes(|| unsafe { install(state, func, mask, count) }),
            None => install(state, func, mask, count),
        }
    }

    /// The count of a polling hook, drawn anew each time it is put back,
    /// between `low` and `cap`.
    ///
    /// With one count, the events could fall at the same places of every
    /// round of a loop: in a coroutine the chain cannot see (resumed with
    /// the original `resume`), never in the few instructions of the
    /// watched one between two of them, whose kill then never landed.
    /// Drawn, they wander over the whole round.
    fn poll_count(&mut self, low: c_int, cap: c_int) -> c_int {
        // A linear congruential generator (Numerical Recipes' constants);
        // its high bits are the random ones.
        self.draw = self
            .draw
            .wrapping_mul(1_664_525)
            .wrapping_add(1_013_904_223);
        let low = low.clamp(1, cap);
        low + (self.draw >> 16) as c_int % (cap - low + 1)
    }

    fn take_handover(&mut self) -> bool {
        let Some((func, mask, count)) = self.cell.and_then(|cell| cell.take_handover()) else {
            return false;
        };
        self.user = Some(SavedHook { func, mask, count });
        self.countdown = count;
        true
    }

    /// Takes a hook that is not ours as the user's, to chain; if none
    /// is installed at all, the user has none.
    ///
    /// # Safety
    /// `state` is alive and of this VM; the caller holds the VM lock.
    unsafe fn adopt(&mut self, state: *mut lua_State) {
        if self.take_handover() || is_ours(ffi::lua_gethook(state)) {
            return;
        }
        self.user = foreign_hook(state);
        self.countdown = self.user.map_or(0, |u| u.count);
    }

    fn set_user_changing(&mut self, changes: u32) {
        self.user_changing = changes;
        if let Some(cell) = self.cell {
            cell.set_user_changing(changes > 0);
        }
    }

    /// The signal cell of this VM (set once, at its creation).
    pub fn set_cell(&mut self, cell: Option<&'static Cell>) {
        self.cell = cell;
    }
}

impl HookArming for LuajitArming {
    /// The VM lock's holder: takes the user's hook that the signal
    /// handler replaced with ours, if it did, and the count our hook
    /// runs with (the handler may have installed it).
    ///
    /// # Safety
    /// `state` is the running thread of the VM, on its OS thread.
    unsafe fn sync(&mut self, state: *mut lua_State) {
        self.take_handover();
        if self.cell.is_some_and(|cell| cell.take_installed()) {
            // Installed by the handler, armed: look at everything once
            // (settling puts back what is needed now).
            self.due = true;
        }
        if is_ours(ffi::lua_gethook(state)) {
            self.count = ffi::lua_gethookcount(state);
        }
    }

    /// Installs the delivery hook on the VM of `state`.
    ///
    /// # Safety
    /// `state` must be alive (any thread of the VM: the anchor); the
    /// caller holds the VM lock.
    unsafe fn arm(&mut self, state: *mut lua_State, side: Side) {
        if side == Side::Owner {
            return self.apply(state, Need::Armed);
        }
        if self.user_changing > 0 || ours_fires(state) {
            // Ours fires by itself (at least every LAZY_COUNT
            // instructions) and arms itself when it sees the need; the
            // watchdog comes back if it does not.
            self.due = true;
            return;
        }
        // The hook, once installed, must look at everything.
        self.due = true;
        if self.cell.is_some_and(|cell| cell.request()) {
            // The VM's thread installs it, in its signal handler.
            return;
        }
        // No signal can be sent: write it from here, as before the
        // signal (README, Limitations). A hook in place that was not
        // set through corowatch's `debug.sethook` is chained from now
        // on; this one write races with it (see the module comment).
        self.apply(state, Need::Armed);
    }

    /// Nothing is due on the target any more.
    ///
    /// # Safety
    /// As for [`HookArming::arm`].
    unsafe fn disarm(&mut self, state: *mut lua_State, side: Side) {
        // From another thread: the hook, which fires at least every
        // LAZY_COUNT instructions, removes itself when it sees nothing due.
        if side == Side::Owner {
            self.apply(state, Need::Nothing);
        }
    }

    /// The hook ran on the running thread `state` and found `need`.
    ///
    /// # Safety
    /// `state` is the running thread, inside its hook; the caller holds
    /// the VM lock.
    unsafe fn settle(&mut self, state: *mut lua_State, need: Need) {
        self.due = false;
        self.apply(state, need);
    }

    /// Whether our hook only rests beside the user's: nothing is due,
    /// and it need do nothing but forward the user's events.
    fn is_resting(&self) -> bool {
        self.need == Some(Need::Nothing) && !self.due
    }

    /// Whether our hook is on the VM for something due.
    fn is_armed(&self, _: *mut lua_State) -> bool {
        matches!(self.need, Some(Need::Armed | Need::Poll))
    }

    /// Nothing waits for the user's change on LuaJIT: another thread's
    /// arming meanwhile is left to the hook and the watchdog's re-arm.
    fn take_deferred(&mut self) -> bool {
        false
    }

    /// The user is about to change the VM's hook with `debug.sethook`.
    fn begin_user_change(&mut self) {
        self.set_user_changing(self.user_changing + 1);
    }

    /// The running thread `state` called `debug.sethook` (hooks are
    /// global on LuaJIT, whatever thread it named): chain the new hook.
    ///
    /// # Safety
    /// `state` is the running thread; the caller holds the VM lock.
    unsafe fn user_hook_changed(&mut self, state: *mut lua_State) {
        self.set_user_changing(self.user_changing.saturating_sub(1));
        self.apply(state, self.need.unwrap_or(Need::Nothing));
    }

    /// Puts the user's hook in place of ours for a moment (to read it);
    /// returns whether it did, and then `user_hook_changed` must follow.
    ///
    /// # Safety
    /// As for [`HookArming::user_hook_changed`].
    unsafe fn lend(&mut self, state: *mut lua_State) -> bool {
        if !is_ours(ffi::lua_gethook(state)) {
            return false;
        }
        self.set_user_changing(self.user_changing + 1);
        match self.user {
            Some(user) => self.write(state, Some(user.func), user.mask, user.count),
            None => self.write(state, None, 0, 0),
        }
        true
    }

    /// The user's hook to call for this event of ours, if the user asked
    /// for it (count events: once per the user's count).
    fn forward(&mut self, event: c_int) -> Option<lua_Hook> {
        let user = self.user?;
        let mask = match event {
            ffi::LUA_HOOKCALL => ffi::LUA_MASKCALL,
            ffi::LUA_HOOKLINE => ffi::LUA_MASKLINE,
            ffi::LUA_HOOKCOUNT => ffi::LUA_MASKCOUNT,
            // Return and tail return.
            _ => ffi::LUA_MASKRET,
        };
        if user.mask & mask == 0 {
            return None;
        }
        if event == ffi::LUA_HOOKCOUNT {
            // Polling, our count never passes the countdown (see
            // `apply`); resting, or in a count the signal handler set, it
            // may: the remainder is carried, so the user's events keep
            // their rate.
            self.countdown -= self.count;
            if self.countdown > 0 {
                return None;
            }
            let period = user.count.max(1);
            self.countdown = period + self.countdown % period;
        }
        Some(user.func)
    }

    /// Nothing is kept per coroutine on LuaJIT.
    fn forget(&mut self, _: *mut lua_State) {}

    /// The VM's hook settles itself when it fires.
    ///
    /// # Safety
    /// As for [`HookArming::release`].
    unsafe fn release(&mut self, _: *mut lua_State, _: impl FnOnce() -> bool) {}
}
