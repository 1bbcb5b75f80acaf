//! PUC Lua: turns a thread's hooks back on where Lua leaves them off.
//!
//! Lua keeps one flag per thread, `allowhook`, cleared while a hook runs
//! and set again when the hook returns, or when a `pcall` in that thread
//! catches an error. Two things run with it cleared and could loop forever
//! out of any watch's reach:
//! - a corowatch warn callback, called from inside the hook;
//! - on Lua 5.4, the `<close>` handlers that `coroutine.close` runs for a
//!   coroutine that the kill (raised from the hook) ended: no `pcall` in
//!   that coroutine caught it, so its flag stays cleared for good.
//!
//! The Lua API has no call for the flag, so it is written at its offset in
//! `lua_State`, taken from each version's `lstate.h` for 64-bit targets
//! and checked once per process ([`calibrate`]) against the fields around
//! it that the API does read: the hook, its mask and count, the status. A
//! build whose layout differs never writes (everything then runs as Lua
//! runs it).
//!
//! LuaJIT keeps the "hook running" bit for the whole VM, not per thread:
//! nothing here applies to it.

use std::sync::atomic::{AtomicU8, Ordering};

use mlua::ffi::{self, lua_State};
use mlua::Lua;

/// The offsets of the fields checked and of `allowhook` itself, and the
/// width of the hook mask (a byte on 5.1 and 5.2, an int on 5.3 and 5.4).
struct Layout {
    status: usize,
    hook: usize,
    basehookcount: usize,
    hookmask: usize,
    hookmask_is_int: bool,
    allowhook: usize,
}

// Lua 5.1.5: status after the common header (next, tt, marked); then six
// pointers and four pointers/ints up to `nCcalls`, `baseCcalls`,
// `hookmask`, `allowhook`, `basehookcount`, `hookcount`, `hook`.
#[cfg(feature = "lua51")]
const LAYOUT: Option<Layout> = Some(Layout {
    status: 10,
    hook: 112,
    basehookcount: 104,
    hookmask: 100,
    hookmask_is_int: false,
    allowhook: 101,
});
// Lua 5.2.4: status; top, l_G, ci, oldpc, stack_last, stack; stacksize,
// nny, nCcalls, hookmask, allowhook, basehookcount, hookcount, hook.
#[cfg(feature = "lua52")]
const LAYOUT: Option<Layout> = Some(Layout {
    status: 10,
    hook: 88,
    basehookcount: 76,
    hookmask: 72,
    hookmask_is_int: false,
    allowhook: 73,
});
// Lua 5.3.6: nci, status; nine pointers; base_ci (72 bytes) at 96; hook,
// errfunc, stacksize, basehookcount, hookcount, nny, nCcalls, hookmask
// (sig_atomic_t), allowhook.
#[cfg(feature = "lua53")]
const LAYOUT: Option<Layout> = Some(Layout {
    status: 12,
    hook: 168,
    basehookcount: 188,
    hookmask: 200,
    hookmask_is_int: true,
    allowhook: 204,
});
// Lua 5.4.0–5.4.7: status and allowhook right after the common header;
// base_ci (64 bytes) at 96; hook, errfunc, nCcalls, oldpc, basehookcount,
// hookcount, hookmask (sig_atomic_t).
#[cfg(feature = "lua54")]
const LAYOUT: Option<Layout> = Some(Layout {
    status: 10,
    hook: 160,
    basehookcount: 184,
    hookmask: 192,
    hookmask_is_int: true,
    allowhook: 11,
});
#[cfg(feature = "luajit")]
const LAYOUT: Option<Layout> = None;

const UNCHECKED: u8 = 0;
const MATCHES: u8 = 1;
const DIFFERS: u8 = 2;

/// Whether this build's `lua_State` has [`LAYOUT`]: checked once.
static LAYOUT_CHECK: AtomicU8 = AtomicU8::new(UNCHECKED);

/// A hook with a mask and count no program would choose, set on a fresh
/// thread only while [`calibrate`] reads its fields.
unsafe extern "C-unwind" fn probe_hook(_: *mut lua_State, _: *mut ffi::lua_Debug) {}
const PROBE_MASK: i32 = ffi::LUA_MASKCALL | ffi::LUA_MASKRET | ffi::LUA_MASKCOUNT;
const PROBE_COUNT: i32 = 0x5eed;

/// Checks [`LAYOUT`] on a fresh thread of `lua` (it allocates, so it may
/// raise: call it where mlua catches errors, at module setup). Once per
/// process: every state of a process runs the same Lua library.
pub fn calibrate(lua: &Lua) -> mlua::Result<()> {
    let Some(layout) = LAYOUT else {
        return Ok(());
    };
    if LAYOUT_CHECK.load(Ordering::Relaxed) != UNCHECKED {
        return Ok(());
    }
    let thread = lua.create_thread(lua.create_function(|_, ()| Ok(()))?)?;
    let state = thread.to_pointer() as *mut lua_State;
    // SAFETY: `thread` holds the fresh thread alive; it has not run, and
    // this OS thread runs its VM. Its hook is set and removed here, and
    // the reads stay within the `lua_State` (the offsets are below its
    // size on every version, and are only trusted once they match).
    let matches = unsafe {
        ffi::lua_sethook(state, Some(probe_hook), PROBE_MASK, PROBE_COUNT);
        let base = state as *const u8;
        let hook = std::ptr::read_unaligned(base.add(layout.hook) as *const usize);
        let count = std::ptr::read_unaligned(base.add(layout.basehookcount) as *const i32);
        let mask = if layout.hookmask_is_int {
            std::ptr::read_unaligned(base.add(layout.hookmask) as *const i32)
        } else {
            i32::from(*base.add(layout.hookmask))
        };
        let fits = hook == probe_hook as *const () as usize
            && count == PROBE_COUNT
            && mask == PROBE_MASK
            && i32::from(*base.add(layout.status)) == ffi::lua_status(state)
            && *base.add(layout.allowhook) == 1;
        ffi::lua_sethook(state, None, 0, 0);
        fits
    };
    let verdict = if matches { MATCHES } else { DIFFERS };
    LAYOUT_CHECK.store(verdict, Ordering::Relaxed);
    Ok(())
}

/// Turns `state`'s hooks on or off, as Lua does around a hook; returns
/// whether it could (PUC Lua with the layout checked).
///
/// # Safety
/// `state` is a live thread of a VM run by the calling OS thread, either
/// the running thread or one that does not run (Lua reads the flag only
/// on the OS thread that runs the VM). Turning the running thread's hooks
/// on inside a hook lets the hook be called again, nested, before this
/// one returns: the caller's frame must allow that.
pub unsafe fn set(state: *mut lua_State, on: bool) -> bool {
    let Some(layout) = LAYOUT else {
        return false;
    };
    if LAYOUT_CHECK.load(Ordering::Relaxed) != MATCHES {
        return false;
    }
    *(state as *mut u8).add(layout.allowhook) = u8::from(on);
    true
}
