//! The hook's entry point: the one C function installed as our debug hook,
//! the events it is installed for, and how to tell it from a user's hook.
//!
//! It only passes the call on to the handler that [`crate::hook`] gives it
//! at load time, so that the files that install it ([`crate::arming`],
//! [`crate::signal`]) need not depend on the files that decide and
//! deliver, which depend on them.

use std::ffi::c_int;
use std::sync::atomic::{AtomicUsize, Ordering};

use mlua::ffi::{self, lua_Debug, lua_Hook, lua_State};

/// Every event the hook can be called for: whichever comes first delivers.
pub const DELIVERY_MASK: c_int =
    ffi::LUA_MASKCALL | ffi::LUA_MASKRET | ffi::LUA_MASKLINE | ffi::LUA_MASKCOUNT;

/// The handler, a `lua_Hook` as an address; 0 until it is set.
static HANDLER: AtomicUsize = AtomicUsize::new(0);

/// Sets the function that every call of [`hook`] passes on to (once, at
/// load; the same function every time).
pub fn set_handler(handler: lua_Hook) {
    HANDLER.store(handler as usize, Ordering::Release);
}

/// Our debug hook, as Lua calls it. Nothing lives in this frame: the
/// handler may leave it by longjmp (PUC Lua) or a foreign unwind (LuaJIT).
pub unsafe extern "C-unwind" fn hook(state: *mut lua_State, ar: *mut lua_Debug) {
    let handler = HANDLER.load(Ordering::Acquire);
    if handler != 0 {
        // SAFETY: the address was stored from a `lua_Hook` by `set_handler`;
        // Lua called us as a hook, with the arguments a hook gets.
        let handler = std::mem::transmute::<usize, lua_Hook>(handler);
        handler(state, ar);
    }
}

/// Whether `func` is our hook.
pub fn is_ours(func: Option<lua_Hook>) -> bool {
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
