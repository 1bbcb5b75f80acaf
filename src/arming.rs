//! Where our hook is installed, and what becomes of the hook that was there.
//!
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
//!
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

use std::ffi::c_int;

use mlua::ffi::{self, lua_Hook, lua_State};

use crate::hook::{hook, DELIVERY_MASK};

/// How often an installed but idle hook of ours fires on LuaJIT: often
/// enough to see what became due, rarely enough to cost nothing measurable.
#[cfg(feature = "luajit")]
pub const LAZY_COUNT: c_int = 1000;

/// Who asks for the hook: the thread running the VM, or another OS thread.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Owner,
    Afar,
}

/// What the running VM needs from our hook, as the hook itself decides.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing is due.
    Nothing,
    /// Something waits for a thread that is not running (LuaJIT only: the
    /// hook is global, and polls until that thread runs).
    Poll,
    /// Something is due on the running thread: fire at every event.
    Armed,
}

/// A hook that is not ours: the user's.
#[derive(Clone, Copy)]
pub struct SavedHook {
    func: lua_Hook,
    mask: c_int,
    count: c_int,
}

fn is_ours(func: Option<lua_Hook>) -> bool {
    func.is_some_and(|f| f as *const () == hook as *const ())
}

/// Whether our hook is installed on the VM of `state` and fires (LuaJIT).
///
/// LuaJIT's own read-modify-writes of the mask byte (around finalizers:
/// `hook_entergc`, `hook_restore`; `hook_leave` on some targets) can write
/// back a mask read before a `lua_sethook` from the signal handler: our
/// function is then in place with no events, or with a user's mask it
/// replaced (say call events only), and a call-free loop never runs it.
/// Every mask we install has the count event: only that makes it ours.
///
/// # Safety
/// `state` must be alive.
#[cfg(feature = "luajit")]
pub unsafe fn ours_fires(state: *mut lua_State) -> bool {
    is_ours(ffi::lua_gethook(state)) && ffi::lua_gethookmask(state) & ffi::LUA_MASKCOUNT != 0
}

/// `lua_sethook` returns `int` up to 5.2 and nothing from 5.3 on.
#[allow(clippy::let_unit_value)]
unsafe fn set_hook(state: *mut lua_State, func: Option<lua_Hook>, mask: c_int, count: c_int) {
    let _ = ffi::lua_sethook(state, func, mask, count);
}

/// Installs `func` unless exactly that is installed: every write adds to
/// the races with the running thread.
unsafe fn install(state: *mut lua_State, func: Option<lua_Hook>, mask: c_int, count: c_int) {
    let (mask, count) = if func.is_some() && mask != 0 {
        (mask, count)
    } else {
        (0, 0)
    };
    let current = ffi::lua_gethook(state);
    let same = match (current, func) {
        (None, None) => true,
        (Some(a), Some(b)) => a as *const () == b as *const (),
        _ => false,
    };
    if !same || ffi::lua_gethookmask(state) != mask || ffi::lua_gethookcount(state) != count {
        set_hook(state, func.filter(|_| mask != 0), mask, count);
    }
}

/// Removes whatever hook is on `state` (its VM is closing or unknown).
///
/// # Safety
/// `state` is the running thread, inside its hook.
pub unsafe fn remove(state: *mut lua_State) {
    set_hook(state, None, 0, 0);
}

/// The hook installed on `state`, if it is someone else's.
unsafe fn foreign_hook(state: *mut lua_State) -> Option<SavedHook> {
    let func = ffi::lua_gethook(state)?;
    let mask = ffi::lua_gethookmask(state);
    (!is_ours(Some(func)) && mask != 0).then(|| SavedHook {
        func,
        mask,
        count: ffi::lua_gethookcount(state),
    })
}

#[cfg(not(feature = "luajit"))]
pub use puc::Arming;

#[cfg(feature = "luajit")]
pub use luajit::Arming;

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
/// re-arm, which rewrites the hook (see `Arming::arm`).
#[cfg(not(feature = "luajit"))]
fn delivery_mask(user: Option<SavedHook>) -> c_int {
    let line = user.map_or(0, |u| u.mask & ffi::LUA_MASKLINE);
    (DELIVERY_MASK & !ffi::LUA_MASKLINE) | line
}

#[cfg(not(feature = "luajit"))]
mod puc {
    use std::collections::HashMap;

    use super::*;

    /// Per state (by address), while our hook is on it: the user's hook it
    /// replaced, if any.
    #[derive(Default)]
    pub struct Arming {
        states: HashMap<usize, Option<SavedHook>>,
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

    impl Arming {
        /// Installs the delivery hook on `state`. It is written even if it
        /// looks installed: the running thread may have overwritten the
        /// count (`lua_gethookcount` shows the count set, not the one left),
        /// and this is how the watchdog's re-arm repairs that.
        ///
        /// # Safety
        /// `state` must be alive; the caller holds the VM lock.
        pub unsafe fn arm(&mut self, state: *mut lua_State, side: Side) {
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
        /// As for [`Arming::arm`].
        pub unsafe fn disarm(&mut self, state: *mut lua_State, side: Side) {
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
        pub unsafe fn settle(&mut self, state: *mut lua_State, need: Need) {
            if need != Need::Armed {
                self.disarm(state, Side::Owner);
            }
        }

        /// Whether our hook is on `state`.
        pub fn is_armed(&self, state: *mut lua_State) -> bool {
            self.states.contains_key(&(state as usize))
        }

        /// The user is about to change a hook with `debug.sethook`.
        pub fn begin_user_change(&mut self) {
            self.user_changing += 1;
        }

        /// Whether another thread's arming waited for the user's change,
        /// which has ended: the caller arms what is due now.
        pub fn take_deferred(&mut self) -> bool {
            self.user_changing == 0 && std::mem::take(&mut self.deferred)
        }

        /// The running thread called `debug.sethook` about `state` (itself
        /// or a coroutine): if our hook was on it, the user's new hook is
        /// what to put back later, and ours goes back on at once.
        ///
        /// # Safety
        /// `state` is alive and of the VM the calling OS thread runs; the
        /// caller holds the VM lock.
        pub unsafe fn user_hook_changed(&mut self, state: *mut lua_State) {
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
        /// As for [`Arming::user_hook_changed`].
        pub unsafe fn lend(&mut self, state: *mut lua_State) -> bool {
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
        pub fn is_resting(&self) -> bool {
            false
        }

        /// Nothing to catch up with on PUC Lua (no signal handler writes
        /// hooks there).
        pub unsafe fn sync(&mut self, _: *mut lua_State) {}

        /// The user's hook to call for this event: none on PUC Lua, where
        /// ours replaces it only while something is due.
        pub fn forward(&mut self, _event: c_int) -> Option<lua_Hook> {
            None
        }

        /// `state` is gone: forget what was saved for its address.
        pub fn forget(&mut self, state: *mut lua_State) {
            self.states.remove(&(state as usize));
        }
    }
}

#[cfg(feature = "luajit")]
mod luajit {
    use super::*;
    use crate::signal::Cell;

    /// The VM-wide hook, and the user's hook it chains.
    #[derive(Default)]
    pub struct Arming {
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
    }

    impl Arming {
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
                (_, user) => {
                    let user = user.map_or((0, LAZY_COUNT), |u| {
                        let count = if u.mask & ffi::LUA_MASKCOUNT != 0 {
                            u.count
                        } else {
                            LAZY_COUNT
                        };
                        (u.mask, count)
                    });
                    (user.0 | ffi::LUA_MASKCOUNT, user.1.clamp(1, LAZY_COUNT))
                }
            };
            self.write(state, Some(hook), mask, count);
            self.count = count;
        }

        /// `install`, with the signal handler kept off meanwhile: on the
        /// VM's thread it could interrupt our `lua_sethook` half-way (its
        /// update of the dispatch table), and it leaves the hook alone
        /// then (the arming is lost, and repaired by the watchdog).
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

        /// The VM lock's holder: takes the user's hook that the signal
        /// handler replaced with ours, if it did, and the count our hook
        /// runs with (the handler may have installed it).
        ///
        /// # Safety
        /// `state` is the running thread of the VM, on its OS thread.
        pub unsafe fn sync(&mut self, state: *mut lua_State) {
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
        unsafe fn adopt(&mut self, state: *mut lua_State) {
            if self.take_handover() || is_ours(ffi::lua_gethook(state)) {
                return;
            }
            self.user = foreign_hook(state);
            self.countdown = self.user.map_or(0, |u| u.count);
        }

        /// Installs the delivery hook on the VM of `state`.
        ///
        /// # Safety
        /// `state` must be alive (any thread of the VM: the anchor); the
        /// caller holds the VM lock.
        pub unsafe fn arm(&mut self, state: *mut lua_State, side: Side) {
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
        /// As for [`Arming::arm`].
        pub unsafe fn disarm(&mut self, state: *mut lua_State, side: Side) {
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
        pub unsafe fn settle(&mut self, state: *mut lua_State, need: Need) {
            self.due = false;
            self.apply(state, need);
        }

        /// Whether our hook only rests beside the user's: nothing is due,
        /// and it need do nothing but forward the user's events.
        pub fn is_resting(&self) -> bool {
            self.need == Some(Need::Nothing) && !self.due
        }

        /// Whether our hook is on the VM for something due.
        pub fn is_armed(&self, _: *mut lua_State) -> bool {
            matches!(self.need, Some(Need::Armed | Need::Poll))
        }

        /// Nothing waits for the user's change on LuaJIT: another thread's
        /// arming meanwhile is left to the hook and the watchdog's re-arm.
        pub fn take_deferred(&mut self) -> bool {
            false
        }

        /// The user is about to change the VM's hook with `debug.sethook`.
        pub fn begin_user_change(&mut self) {
            self.set_user_changing(self.user_changing + 1);
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

        /// The running thread `state` called `debug.sethook` (hooks are
        /// global on LuaJIT, whatever thread it named): chain the new hook.
        ///
        /// # Safety
        /// `state` is the running thread; the caller holds the VM lock.
        pub unsafe fn user_hook_changed(&mut self, state: *mut lua_State) {
            self.set_user_changing(self.user_changing.saturating_sub(1));
            self.apply(state, self.need.unwrap_or(Need::Nothing));
        }

        /// Puts the user's hook in place of ours for a moment (to read it);
        /// returns whether it did, and then `user_hook_changed` must follow.
        ///
        /// # Safety
        /// As for [`Arming::user_hook_changed`].
        pub unsafe fn lend(&mut self, state: *mut lua_State) -> bool {
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
        pub fn forward(&mut self, event: c_int) -> Option<lua_Hook> {
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
                self.countdown -= self.count;
                if self.countdown > 0 {
                    return None;
                }
                self.countdown = user.count.max(1);
            }
            Some(user.func)
        }

        /// Nothing is kept per coroutine on LuaJIT.
        pub fn forget(&mut self, _: *mut lua_State) {}
    }
}
