//! Where our hook is installed, and what becomes of the hook that was there.
//!
//! One interface, [`HookArming`], with one implementation per hook model:
//!
//! - [`puc`] (Lua 5.1–5.4): hooks belong to each thread. Ours goes on a
//!   target's thread while something is due there and comes off again,
//!   putting back the hook it replaced (the user's). Another OS thread may
//!   install it.
//! - [`luajit`]: one hook serves the whole VM, chained with the user's;
//!   another OS thread never writes it, but asks the VM's own thread with a
//!   signal.
//!
//! The VM (see [`crate::vm`]) holds one [`Arming`] under its lock and calls
//! it for every arming, from its own thread ([`Side::Owner`]) or another
//! ([`Side::Afar`]).

use std::ffi::c_int;

use mlua::ffi::{self, lua_Hook, lua_State};

#[cfg(feature = "luajit")]
pub use crate::entry::ours_fires;
use crate::entry::{hook, is_ours, DELIVERY_MASK};

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

/// `lua_sethook` returns `int` up to 5.2 and nothing from 5.3 on.
///
/// # Safety
/// `state` is alive. From an OS thread other than the one running its
/// VM, only under the VM lock, inside the frame handshake of
/// [`crate::vm::Vm::frame_freed`] (5.2–5.4), or never (LuaJIT).
#[allow(clippy::let_unit_value)]
unsafe fn set_hook(state: *mut lua_State, func: Option<lua_Hook>, mask: c_int, count: c_int) {
    let _ = ffi::lua_sethook(state, func, mask, count);
}

/// Installs `func` unless exactly that is installed: every write adds to
/// the races with the running thread.
///
/// # Safety
/// As for [`set_hook`].
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
///
/// # Safety
/// `state` is alive (reading a hook writes nothing).
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
mod puc;
#[cfg(not(feature = "luajit"))]
pub use puc::PucArming as Arming;

#[cfg(feature = "luajit")]
mod luajit;
#[cfg(feature = "luajit")]
pub use luajit::LuajitArming as Arming;

/// What the VM asks of its hook's arming. Every method is called with the
/// VM lock held.
pub trait HookArming {
    /// Installs the delivery hook for `state` (PUC Lua: on that thread;
    /// LuaJIT: on the VM, through any of its threads), asked by `side`.
    ///
    /// # Safety
    /// `state` must be alive and of this VM; from [`Side::Owner`], run by
    /// the calling OS thread.
    unsafe fn arm(&mut self, state: *mut lua_State, side: Side);

    /// Nothing is due on `state` any more: our hook may come off.
    ///
    /// # Safety
    /// As for [`HookArming::arm`].
    unsafe fn disarm(&mut self, state: *mut lua_State, side: Side);

    /// The hook ran on the running thread `state` and found `need`.
    ///
    /// # Safety
    /// `state` is the running thread, inside its hook.
    unsafe fn settle(&mut self, state: *mut lua_State, need: Need);

    /// Whether our hook is on `state` for something due.
    fn is_armed(&self, state: *mut lua_State) -> bool;

    /// Whether our hook only rests beside the user's (LuaJIT): nothing is
    /// due, and it need do nothing but forward the user's events.
    fn is_resting(&self) -> bool;

    /// The hook fired on the running thread `state`: catch up with what a
    /// signal handler did meanwhile (LuaJIT).
    ///
    /// # Safety
    /// `state` is the running thread of the VM, on its OS thread.
    unsafe fn sync(&mut self, state: *mut lua_State);

    /// The user's hook to call for this event of ours, if any.
    fn forward(&mut self, event: c_int) -> Option<lua_Hook>;

    /// `state` is gone: forget what was kept for its address.
    fn forget(&mut self, state: *mut lua_State);

    /// `state` left corowatch's chain (it returned, yielded or died): take
    /// our hook off it if it is there, unless `still_needed()` (an
    /// interrupt waits there). PUC Lua keeps the hook ours replaced by
    /// thread address: a coroutine that died with our hook on (killed, say)
    /// left it to the next coroutine at that address, which inherits our
    /// hook from its creator when that one is armed. LuaJIT's hook is the
    /// VM's, and settles itself.
    ///
    /// # Safety
    /// `state` is alive, of the VM the calling OS thread runs.
    unsafe fn release(&mut self, state: *mut lua_State, still_needed: impl FnOnce() -> bool);

    /// The user is about to change a hook with `debug.sethook`.
    fn begin_user_change(&mut self);

    /// The running thread called `debug.sethook` about `state` (itself or a
    /// coroutine): the user's new hook is what to put back later (PUC Lua)
    /// or what to chain (LuaJIT). Ends what `begin_user_change` or `lend`
    /// began.
    ///
    /// # Safety
    /// `state` is alive and of the VM the calling OS thread runs.
    unsafe fn user_hook_changed(&mut self, state: *mut lua_State);

    /// Whether another thread's arming waited for the user's change, which
    /// has ended: the caller arms what is due now.
    fn take_deferred(&mut self) -> bool;

    /// Puts the user's hook in place of ours on `state` for a moment (to
    /// read it); returns whether it did, and then `user_hook_changed` must
    /// follow.
    ///
    /// # Safety
    /// As for [`HookArming::user_hook_changed`].
    unsafe fn lend(&mut self, state: *mut lua_State) -> bool;
}
