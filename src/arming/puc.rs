//! PUC Lua: hooks belong to each thread. Ours goes on a target's thread while
//! something is due there and comes off again, putting back the hook it
//! replaced (the user's). Another OS thread may install it, and the delivery
//! mask makes a lost count harmless. That write is not as small as it looks:
//! 5.1's `lua_sethook` writes plain fields of the `lua_State`, but 5.2 and
//! 5.3 also read the running frame (`L->ci`) to set `L->oldpc`, and 5.4
//! writes the trap flag of every frame down the `CallInfo` chain
//! (`settraps`). The `lua_State` is alive (see [`crate::vm`]); its frames
//! can be returned from, and freed by a GC step (`luaE_shrinkCI`), while the
//! other thread walks them: such frees wait for the write (the handshake of
//! [`crate::vm::Vm::frame_freed`]).

use super::*;
use crate::key_hash::KeyMap;

/// The mask our hook is armed with, replacing `user`'s hook: the line mask
/// only if the user's hook had it.
///
/// - Every version reads the mask once per instruction (`traceexec`), then
///   calls the count hook, then the line hook, each time through the hook
///   installed *then*. When our count hook finds nothing due and puts the
///   user's hook back, a line mask of ours sent the same instruction's line
///   event to the user's hook, which had not asked for it.
/// - Lua 5.1–5.3 compare the running function's position with the one they
///   saw last (`oldpc`) when the line mask is on, and when another thread
///   turns it on, that position can belong to another function: 5.1 then
///   reads `lineinfo[-1]` (harmless, but out of bounds), 5.2 and 5.3 read
///   `lineinfo` at an index as far off as two heap blocks are apart, and can
///   crash.
///
/// What the line mask guarded against, the running thread's count decrement
/// overwriting the count another thread set, is repaired by the watchdog's
/// re-arm, which rewrites the hook (see `PucArming::arm`).
fn delivery_mask(user: Option<SavedHook>) -> c_int {
    let line = user.map_or(0, |u| u.mask & ffi::LUA_MASKLINE);
    (DELIVERY_MASK & !ffi::LUA_MASKLINE) | line
}

/// Per state (by address), while our hook is on it: the user's hook it
/// replaced, if any.
#[derive(Default)]
pub struct PucArming {
    states: KeyMap<usize, Option<SavedHook>>,
    /// The VM's thread is changing or reading a hook through
    /// corowatch's `debug.sethook`/`debug.gethook`. Another OS thread
    /// writes no hook meanwhile: `lua_sethook` writes the function and
    /// the mask one after the other, and two of them at once can leave
    /// the user's function with our mask (then saved as the user's
    /// hook). Its arming waits for the change to end.
    /// How many changes are under way (a finalizer or a user's hook can
    /// change a hook inside a change).
    user_changing: u32,
    /// Another thread's arming waited for the user's change to end.
    deferred: bool,
}

impl HookArming for PucArming {
    /// Installs the delivery hook on `state`. It is written even if it
    /// looks installed: the running thread may have overwritten the
    /// count (`lua_gethookcount` shows the count set, not the one left),
    /// and this is how the watchdog's re-arm repairs that.
    ///
    /// # Safety
    /// `state` must be alive; the caller holds the VM lock.
    unsafe fn arm(&mut self, state: *mut lua_State, side: Side) {
        if side == Side::Afar && self.user_changing > 0 {
            self.deferred = true;
            return;
        }
        #[cfg(all(feature = "widen-frame-window", feature = "lua54"))]
        if side == Side::Afar {
            // SAFETY: test only (see the module); we hold the VM lock
            // with `writing_afar` set, as for the write below.
            unsafe { crate::widen::slow_settraps(state) };
        }
        let func = ffi::lua_gethook(state);
        let user = if !is_ours(func) {
            // A hook of the user's is what to put back; an entry left
            // from a dead state that had the same address is stale.
            let user = foreign_hook(state);
            self.states.insert(state as usize, user);
            user
        } else {
            // Ours, set here or inherited from the thread that created
            // this one (then there is nothing to put back).
            *self.states.entry(state as usize).or_insert(None)
        };
        set_hook(state, Some(hook), delivery_mask(user), 1);
    }

    /// Puts back what our hook replaced on `state` (nothing, if it
    /// inherited our hook from the thread that created it).
    ///
    /// # Safety
    /// As for [`HookArming::arm`].
    unsafe fn disarm(&mut self, state: *mut lua_State, side: Side) {
        if side == Side::Afar && self.user_changing > 0 {
            // Ours stays until it fires, finds nothing due and removes
            // itself.
            return;
        }
        let saved = self.states.remove(&(state as usize)).flatten();
        match saved {
            Some(user) => install(state, Some(user.func), user.mask, user.count),
            None => install(state, None, 0, 0),
        }
    }

    /// The hook ran on the running thread `state` and found `need`.
    ///
    /// # Safety
    /// `state` is the running thread, inside its hook; the caller holds
    /// the VM lock.
    unsafe fn settle(&mut self, state: *mut lua_State, need: Need) {
        if need != Need::Armed {
            self.disarm(state, Side::Owner);
        }
    }

    /// Whether our hook is on `state`.
    fn is_armed(&self, state: *mut lua_State) -> bool {
        !self.states.is_empty() && self.states.contains_key(&(state as usize))
    }

    /// The user is about to change a hook with `debug.sethook`.
    fn begin_user_change(&mut self) {
        self.user_changing += 1;
    }

    /// Whether another thread's arming waited for the user's change,
    /// which has ended: the caller arms what is due now.
    fn take_deferred(&mut self) -> bool {
        self.user_changing == 0 && std::mem::take(&mut self.deferred)
    }

    /// The running thread called `debug.sethook` about `state` (itself
    /// or a coroutine): if our hook was on it, the user's new hook is
    /// what to put back later, and ours goes back on at once.
    ///
    /// # Safety
    /// `state` is alive and of the VM the calling OS thread runs; the
    /// caller holds the VM lock.
    unsafe fn user_hook_changed(&mut self, state: *mut lua_State) {
        self.user_changing = self.user_changing.saturating_sub(1);
        if self.is_armed(state) {
            self.arm(state, Side::Owner);
        }
    }

    /// Puts the user's hook back on `state` for a moment (to read it);
    /// returns whether it did, and then `user_hook_changed`
    /// must follow.
    ///
    /// # Safety
    /// As for [`HookArming::user_hook_changed`].
    unsafe fn lend(&mut self, state: *mut lua_State) -> bool {
        if !self.is_armed(state) {
            return false;
        }
        self.disarm(state, Side::Owner);
        // Armed again by `user_hook_changed`, which saves what it finds;
        // until then the user's hook is in place, as during a change.
        self.states.insert(state as usize, None);
        self.user_changing += 1;
        true
    }

    /// Our hook is installed only while something is due.
    fn is_resting(&self) -> bool {
        false
    }

    /// Nothing to catch up with on PUC Lua (no signal handler writes
    /// hooks there).
    ///
    /// # Safety
    /// As for [`HookArming::sync`].
    unsafe fn sync(&mut self, _: *mut lua_State) {}

    /// The user's hook to call for this event: none on PUC Lua, where
    /// ours replaces it only while something is due.
    fn forward(&mut self, _event: c_int) -> Option<lua_Hook> {
        None
    }

    /// `state` is gone: forget what was saved for its address.
    ///
    /// # Safety
    /// As for [`HookArming::release`]: `state` is alive, of the VM the
    /// calling OS thread runs, which holds the VM lock.
    unsafe fn release(&mut self, state: *mut lua_State, still_needed: impl FnOnce() -> bool) {
        if self.is_armed(state) && !still_needed() {
            self.disarm(state, Side::Owner);
        }
    }

    fn forget(&mut self, state: *mut lua_State) {
        self.states.remove(&(state as usize));
    }
}
