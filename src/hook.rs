//! The one debug hook, how it is armed and disarmed, and how it delivers.
//!
//! While nothing is pending no hook of ours is installed: an interrupt arms
//! the hook on its target (on LuaJIT, where hooks are global to a VM, on the
//! VM), the hook delivers on the target's own OS thread and disarms itself,
//! giving back whatever hook was there before.
//!
//! Delivery does not depend on the instruction count alone. Another thread's
//! `lua_sethook` races with the running thread's own updates of the count
//! (Lua 5.2 loses interrupts that way), so the hook is armed with the line,
//! call and return masks too: any loop jumps backwards and fires the line hook.

use std::ffi::{c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use mlua::ffi::{self, lua_Debug, lua_Hook, lua_State};

use crate::registry::Id;
use crate::vm;
use crate::watch::Event;

/// Every event the hook can be called for: whichever comes first delivers.
pub const DELIVERY_MASK: c_int =
    ffi::LUA_MASKCALL | ffi::LUA_MASKRET | ffi::LUA_MASKLINE | ffi::LUA_MASKCOUNT;

/// On LuaJIT the hook is global: while an interrupt waits for a coroutine
/// that is not running, the hook polls at this count instead of firing on
/// every instruction of whatever runs meanwhile.
#[cfg(feature = "luajit")]
pub const LAZY_COUNT: c_int = 1000;

/// Registry keys (light userdata) under which the hook finds, without
/// allocating, the per-VM tables `thread -> id` and `thread -> handler`.
pub static IDS_KEY: u8 = 0;
pub static HANDLERS_KEY: u8 = 0;
/// corowatch's Lua dispatcher: `dispatch(event, co, depth)`.
pub static DISPATCH_KEY: u8 = 0;
/// corowatch's anchors: `depth -> thread` for the running chain.
pub static ANCHORS_KEY: u8 = 0;

pub fn key(key: &'static u8) -> *const c_void {
    key as *const u8 as *const c_void
}

/// A hook that was installed before ours, to put back when we disarm.
#[derive(Clone, Copy)]
pub struct SavedHook {
    func: Option<lua_Hook>,
    mask: c_int,
    count: c_int,
}

fn is_ours(func: Option<lua_Hook>) -> bool {
    func.is_some_and(|f| f as *const () == hook as *const ())
}

/// `lua_sethook` returns `int` up to 5.2 and nothing from 5.3 on.
#[allow(clippy::let_unit_value)]
unsafe fn set_hook(state: *mut lua_State, func: Option<lua_Hook>, mask: c_int, count: c_int) {
    let _ = ffi::lua_sethook(state, func, mask, count);
}

/// Installs the delivery hook on `state`, remembering a foreign hook in `saved`.
///
/// # Safety
/// `state` must be alive, and the caller must hold its VM's lock so that no
/// other thread installs or removes a hook on it at the same time.
pub unsafe fn arm(state: *mut lua_State, saved: &mut Option<SavedHook>) {
    let func = ffi::lua_gethook(state);
    if is_ours(func)
        && ffi::lua_gethookmask(state) == DELIVERY_MASK
        && ffi::lua_gethookcount(state) == 1
    {
        // Already armed: writing again would only add to the races.
        return;
    }
    if !is_ours(func) {
        *saved = Some(SavedHook {
            func,
            mask: ffi::lua_gethookmask(state),
            count: ffi::lua_gethookcount(state),
        });
    }
    set_hook(state, Some(hook), DELIVERY_MASK, 1);
}

/// Puts back the hook that was there before ours (or none).
///
/// # Safety
/// As for [`arm`].
pub unsafe fn disarm(state: *mut lua_State, saved: Option<SavedHook>) {
    match saved {
        Some(s) if s.func.is_some() && s.mask != 0 => set_hook(state, s.func, s.mask, s.count),
        _ => set_hook(state, None, 0, 0),
    }
}

/// Keeps the hook but lets it fire only every [`LAZY_COUNT`] instructions.
///
/// # Safety
/// As for [`arm`].
#[cfg(feature = "luajit")]
pub unsafe fn poll_lazily(state: *mut lua_State) {
    set_hook(state, Some(hook), ffi::LUA_MASKCOUNT, LAZY_COUNT);
}

/// What the hook does once it has looked at the pending interrupts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// An mtint interrupt for the thread with this id.
    Deliver(Id),
    /// A corowatch event for the watched coroutine at this chain depth.
    Watch(Event, usize),
}

/// The hook itself. It runs on the OS thread that runs `state`.
///
/// Nothing with a destructor lives in this frame and no lock is held past
/// `decide`: the delivery below ends in `lua_error`, or in `lua_call` of a
/// handler or of corowatch's dispatcher, which may raise; both leave this
/// frame by longjmp (PUC Lua) or by a foreign unwind (LuaJIT).
pub unsafe extern "C-unwind" fn hook(state: *mut lua_State, _ar: *mut lua_Debug) {
    let id = thread_id(state);
    match decide(state, id) {
        Verdict::Continue => {}
        Verdict::Deliver(id) => {
            if push_handler(state) {
                ffi::lua_call(state, 0, 0);
            } else {
                push_interrupted_message(state, id);
                ffi::lua_error(state);
            }
        }
        Verdict::Watch(event, depth) => {
            ffi::lua_rawgetp(state, ffi::LUA_REGISTRYINDEX, key(&DISPATCH_KEY));
            ffi::lua_rawgetp(state, ffi::LUA_REGISTRYINDEX, key(&ANCHORS_KEY));
            if ffi::lua_type(state, -2) == ffi::LUA_TFUNCTION
                && ffi::lua_type(state, -1) == ffi::LUA_TTABLE
            {
                ffi::lua_rawgeti(state, -1, depth as _);
                ffi::lua_remove(state, -2);
                ffi::lua_pushinteger(state, event as ffi::lua_Integer);
                ffi::lua_insert(state, -2);
                ffi::lua_pushinteger(state, depth as ffi::lua_Integer);
                ffi::lua_call(state, 3, 0);
            } else {
                ffi::lua_pop(state, 2);
            }
        }
    }
}

/// The Rust half of the hook: everything that takes locks or may panic.
/// A panic here must not cross into C, so it is caught and the hook carries on.
fn decide(state: *mut lua_State, id: Option<Id>) -> Verdict {
    catch_unwind(AssertUnwindSafe(|| match vm::of_state(state) {
        Some(vm) => vm.on_hook(state, id),
        None => {
            // SAFETY: we are on `state`'s own thread, inside its hook; the VM
            // is closing or unknown, so nobody else arms this state.
            unsafe { disarm(state, None) };
            Verdict::Continue
        }
    }))
    .unwrap_or(Verdict::Continue)
}

/// Pushes `table[running thread]` from the per-VM table under `key`;
/// returns false, leaving the stack as it was, if there is no such table.
///
/// SAFETY (caller): `state` is the running thread, inside its hook, which
/// Lua guarantees `LUA_MINSTACK` free stack slots; this uses two and
/// allocates nothing.
unsafe fn push_thread_entry(state: *mut lua_State, table_key: &'static u8) -> bool {
    ffi::lua_rawgetp(state, ffi::LUA_REGISTRYINDEX, key(table_key));
    if ffi::lua_type(state, -1) != ffi::LUA_TTABLE {
        ffi::lua_pop(state, 1);
        return false;
    }
    ffi::lua_pushthread(state);
    ffi::lua_rawget(state, -2);
    ffi::lua_remove(state, -2);
    true
}

/// The id of the running thread, read from the VM's weak `thread -> id` table.
unsafe fn thread_id(state: *mut lua_State) -> Option<Id> {
    if !push_thread_entry(state, &IDS_KEY) {
        return None;
    }
    let id = ffi::lua_tonumber(state, -1);
    ffi::lua_pop(state, 1);
    // Ids are integers below 2^53, exact as a double.
    (id > 0.0).then_some(id as Id)
}

/// Pushes the interrupt handler set with `mtint.sethook` for the running
/// thread; returns false, leaving the stack as it was, if there is none.
unsafe fn push_handler(state: *mut lua_State) -> bool {
    if !push_thread_entry(state, &HANDLERS_KEY) {
        return false;
    }
    if ffi::lua_type(state, -1) == ffi::LUA_TFUNCTION {
        true
    } else {
        ffi::lua_pop(state, 1);
        false
    }
}

/// Pushes `mtint.error.interrupted: ...`. The message is built and freed in
/// this frame, so the caller's frame holds nothing to drop when it raises.
#[inline(never)]
unsafe fn push_interrupted_message(state: *mut lua_State, id: Id) {
    let message = format!("{}: interruptible id {id}", crate::errors::INTERRUPTED);
    ffi::lua_pushlstring(state, message.as_ptr().cast(), message.len());
}
