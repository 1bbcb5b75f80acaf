//! What the one debug hook does: decides (through [`crate::vm`]) and
//! delivers. Lua calls [`crate::entry::hook`], which passes every call to
//! [`handle`].
//!
//! While nothing is pending no hook of ours is installed (on LuaJIT, none
//! but the one that chains the user's: see [`crate::arming`]): an interrupt
//! arms the hook on its target (on LuaJIT, where hooks are global to a VM,
//! on the VM), the hook delivers on the target's own OS thread and disarms
//! itself, giving back whatever hook was there before.
//!
//! Delivery does not depend on the instruction count alone. Another thread's
//! `lua_sethook` races with the running thread's own updates of the count
//! (Lua 5.2 loses interrupts that way): the hook is armed with the call and
//! return masks too, the watchdog re-arms it until it has delivered, and on
//! LuaJIT the line mask makes any loop's backward jump fire it. PUC Lua
//! gets the line mask only where the user's hook had it: see
//! `delivery_mask` in [`crate::arming`].

use std::ffi::{c_char, c_int, c_void};

use mlua::ffi::{self, lua_Debug, lua_Hook, lua_State};

use crate::arming;
use crate::contained::contained;
use crate::stack_room::Room;
use crate::vm::{self, Id, Verdict};
use crate::watch::Locate;

/// Registry keys (light userdata) under which the hook finds, without
/// allocating, the per-VM tables `thread -> id` (read on LuaJIT only: see
/// `Vm::on_hook`) and `thread -> handler`.
pub static IDS_KEY: u8 = 0;
pub static HANDLERS_KEY: u8 = 0;
/// corowatch's Lua dispatcher: `dispatch(event, co, depth)`.
pub static DISPATCH_KEY: u8 = 0;
/// corowatch's anchors: `depth -> thread` for the running chain.
pub static ANCHORS_KEY: u8 = 0;
/// LuaJIT: the functions whose upvalues are the VM's dispatch probes, at
/// their probe's index + 1 (see [`crate::probe`]).
#[cfg(feature = "luajit")]
pub static PROBES_KEY: u8 = 0;

pub fn key(key: &'static u8) -> *const c_void {
    key as *const u8 as *const c_void
}

/// The hook's work, called by [`crate::entry::hook`] for every event. It
/// runs on the OS thread that runs `state`.
///
/// Nothing with a destructor lives in this frame and no lock is held past
/// `decide`: the delivery below ends in `lua_error`, or in `lua_call` of a
/// handler or of corowatch's dispatcher, and the user's chained hook may
/// raise too; all leave this frame by longjmp (PUC Lua) or by a foreign
/// unwind (LuaJIT).
pub unsafe extern "C-unwind" fn handle(state: *mut lua_State, ar: *mut lua_Debug) {
    // SAFETY: Lua gives a hook `LUA_MINSTACK` free slots, as it does a C
    // function (`luaD_hook`; LuaJIT's `callhook`); nothing pushed yet.
    let room = Room::<{ ffi::LUA_MINSTACK }>::on_entry();
    // SAFETY: Lua passes the hook a valid `lua_Debug` for this call.
    let event = (*ar).event;
    // SAFETY: Lua calls the hook on the running thread, on its OS thread.
    let (verdict, user_hook) = decide(state, ar, event, room.part());
    match verdict {
        Verdict::Continue => {}
        Verdict::Deliver { id, handlers } => {
            if handlers && push_handler(state, room.part()) {
                ffi::lua_call(state, 0, 0);
            } else {
                push_interrupted_message(state, id, room.part());
                ffi::lua_error(state);
            }
        }
        Verdict::Watch(event, depth, locate) => {
            ffi::lua_rawgetp(state, ffi::LUA_REGISTRYINDEX, key(&DISPATCH_KEY));
            if ffi::lua_type(state, -1) == ffi::LUA_TFUNCTION {
                ffi::lua_pushinteger(state, event as ffi::lua_Integer);
                push_watched(state, depth, locate, room.above::<2, 2>());
                ffi::lua_pushinteger(state, depth as ffi::lua_Integer);
                ffi::lua_call(state, 3, 0);
            } else {
                ffi::lua_pop(state, 1);
            }
        }
        #[cfg(feature = "luajit")]
        Verdict::Probe(index) => {
            // `dispatch(KILL, co, 0)`: the coroutine is watched (the loop
            // watches each actor it probes), and the dispatcher kills it
            // as at its own kill deadline.
            ffi::lua_rawgetp(state, ffi::LUA_REGISTRYINDEX, key(&DISPATCH_KEY));
            if ffi::lua_type(state, -1) == ffi::LUA_TFUNCTION
                && push_probe_coroutine(state, index, room.above::<1, 3>())
            {
                ffi::lua_pushinteger(state, crate::watch::Event::Kill as ffi::lua_Integer);
                ffi::lua_insert(state, -2);
                ffi::lua_pushinteger(state, 0);
                ffi::lua_call(state, 3, 0);
            } else {
                ffi::lua_pop(state, 1);
            }
        }
    }
    if let Some(user_hook) = user_hook {
        // LuaJIT: the user's hook, chained (see `crate::arming`); it gets
        // the event as Lua gave it to us.
        user_hook(state, ar);
    }
}

/// Pushes the watched coroutine at `depth` on the chain, found as
/// `locate` says (nil if its anchor is missing).
///
/// # Safety
/// `state` runs its hook; `locate` was read from the chain in this same
/// hook call.
unsafe fn push_watched(state: *mut lua_State, depth: usize, locate: Locate, _: Room<2>) {
    match locate {
        Locate::Running => {
            ffi::lua_pushthread(state);
        }
        Locate::Anchored => {
            ffi::lua_rawgetp(state, ffi::LUA_REGISTRYINDEX, key(&ANCHORS_KEY));
            if ffi::lua_type(state, -1) == ffi::LUA_TTABLE {
                ffi::lua_rawgeti(state, -1, depth as _);
                ffi::lua_remove(state, -2);
            } else {
                ffi::lua_pop(state, 1);
                ffi::lua_pushnil(state);
            }
        }
        Locate::OnStackOf(resumer) => {
            // The resumer waits in the patched resume, whose stack holds
            // only the coroutine (see `resume::resume_suspended`): take it
            // off, copy it, put it back. Neither move grows a stack (the
            // slot put back is the one taken) nor raises, and the resumer,
            // a thread of this VM with a frame, is alive and runs on this
            // OS thread, where nothing else touches it meanwhile.
            ffi::lua_xmove(resumer.0, state, 1);
            ffi::lua_pushvalue(state, -1);
            ffi::lua_xmove(state, resumer.0, 1);
        }
    }
}

/// The Rust half of the hook: everything that takes locks or may panic.
/// A panic here must not cross into C, so it is caught and the hook carries on.
///
/// # Safety
/// `state` is the running thread, inside its hook, on its OS thread; `ar`
/// is this hook call's `lua_Debug`.
unsafe fn decide(
    state: *mut lua_State,
    ar: *mut lua_Debug,
    event: c_int,
    room: Room<3>,
) -> (Verdict, Option<lua_Hook>) {
    // SAFETY (all the calls below): as the caller promised.
    contained((Verdict::Continue, None), || {
        match unsafe { vm::of_state(state) } {
            Some(vm) => unsafe {
                vm.on_hook(
                    state,
                    || id_of_thread(state, None, room.part()),
                    || at_c_function(state, ar, event),
                    |index| probe_target(state, index, room),
                    event,
                )
            },
            None => {
                // SAFETY: we are on `state`'s own thread, inside its hook; the VM
                // is closing or unknown, so nobody else arms this state.
                unsafe { arming::remove(state) };
                (Verdict::Continue, None)
            }
        }
    })
}

/// Where the coroutine the probe at `index` names is (see
/// [`vm::ProbeTarget`]); `Gone` on PUC Lua, which has no probes.
///
/// # Safety
/// `state` is the running thread, in its hook; this allocates nothing.
#[cfg_attr(not(feature = "luajit"), allow(unused_variables))]
unsafe fn probe_target(state: *mut lua_State, index: usize, room: Room<3>) -> vm::ProbeTarget {
    #[cfg(feature = "luajit")]
    if push_probe_coroutine(state, index, room) {
        let co = ffi::lua_tothread(state, -1);
        ffi::lua_pop(state, 1);
        // The running thread runs, whatever its status says (inside an
        // `xpcall` message handler LuaJIT marks it LUA_ERRERR).
        if co == state {
            return vm::ProbeTarget::Runs;
        }
        // SAFETY: `co` is alive (the probe's function, anchored, holds it
        // in its upvalue) and of this VM; this is its OS thread.
        let status = ffi::lua_status(co);
        if status == ffi::LUA_YIELD {
            return vm::ProbeTarget::Gone;
        }
        let mut ar = std::mem::MaybeUninit::<ffi::lua_Debug>::zeroed();
        let has_frame = ffi::lua_getstack(co, 0, ar.as_mut_ptr()) != 0;
        return match (status == ffi::LUA_OK, has_frame) {
            (true, true) => vm::ProbeTarget::Runs,
            (false, true) => vm::ProbeTarget::Unsure,
            (_, false) => vm::ProbeTarget::Gone,
        };
    }
    vm::ProbeTarget::Gone
}

/// Pushes the coroutine the probe at `index` names (its function's third
/// upvalue) and returns true; if that is not a thread, leaves the stack as
/// it was and returns false.
///
/// # Safety
/// `state` is the running thread, in its hook; this allocates nothing.
#[cfg(feature = "luajit")]
unsafe fn push_probe_coroutine(state: *mut lua_State, index: usize, _: Room<3>) -> bool {
    ffi::lua_rawgetp(state, ffi::LUA_REGISTRYINDEX, key(&PROBES_KEY));
    if ffi::lua_type(state, -1) != ffi::LUA_TTABLE {
        ffi::lua_pop(state, 1);
        return false;
    }
    ffi::lua_rawgeti(state, -1, index as ffi::lua_Integer + 1);
    if ffi::lua_type(state, -1) != ffi::LUA_TFUNCTION || ffi::lua_getupvalue(state, -1, 3).is_null()
    {
        ffi::lua_pop(state, 2);
        return false;
    }
    // The table, the function, the coroutine: keep the last.
    ffi::lua_replace(state, -3);
    ffi::lua_pop(state, 1);
    if ffi::lua_type(state, -1) != ffi::LUA_TTHREAD {
        ffi::lua_pop(state, 1);
        return false;
    }
    true
}

/// Whether the event is the call or the return of a C function. Nothing is
/// delivered there: the C function may be one of ours, or mlua's, half-way
/// through its work (mlua runs its steps as C functions under `lua_pcall`),
/// and a handler or a kill run there would re-enter it. What is pending
/// waits for the next event in Lua code.
///
/// # Safety
/// `state` is in its hook, on its own thread; `ar` is the hook's
/// `lua_Debug`. `lua_getinfo` with "S" neither allocates nor raises.
unsafe fn at_c_function(state: *mut lua_State, ar: *mut lua_Debug, event: c_int) -> bool {
    if event != ffi::LUA_HOOKCALL && event != ffi::LUA_HOOKRET {
        // Line and count events are in Lua code; a tail call is a Lua
        // function's; Lua 5.1's tail return has no function to ask about.
        return false;
    }
    ffi::lua_getinfo(state, c"S".as_ptr(), ar) != 0
        && !(*ar).what.is_null()
        && *(*ar).what == b'C' as c_char
}

/// Pushes `table[thread]` from the per-VM table under `key`, for the thread
/// at stack index `thread` (absolute), or the running thread if `None`;
/// returns false, leaving the stack as it was, if there is no such table.
///
/// # Safety
/// `state` is the running thread; this allocates nothing.
unsafe fn push_thread_entry(
    state: *mut lua_State,
    table_key: &'static u8,
    thread: Option<c_int>,
    _: Room<2>,
) -> bool {
    ffi::lua_rawgetp(state, ffi::LUA_REGISTRYINDEX, key(table_key));
    if ffi::lua_type(state, -1) != ffi::LUA_TTABLE {
        ffi::lua_pop(state, 1);
        return false;
    }
    match thread {
        Some(index) => ffi::lua_pushvalue(state, index),
        None => {
            ffi::lua_pushthread(state);
        }
    }
    ffi::lua_rawget(state, -2);
    ffi::lua_remove(state, -2);
    true
}

/// The id of a thread (at absolute stack index `thread`, or the running
/// thread if `None`), read from the VM's weak `thread -> id` table.
///
/// # Safety
/// As for [`push_thread_entry`].
pub unsafe fn id_of_thread(
    state: *mut lua_State,
    thread: Option<c_int>,
    room: Room<2>,
) -> Option<Id> {
    if !push_thread_entry(state, &IDS_KEY, thread, room) {
        return None;
    }
    let id = ffi::lua_tonumber(state, -1);
    ffi::lua_pop(state, 1);
    // Ids are integers below 2^53, exact as a double.
    (id > 0.0).then_some(id as Id)
}

/// Pushes the interrupt handler set with `mtint.sethook` for the running
/// thread; returns false, leaving the stack as it was, if there is none.
///
/// # Safety
/// As for [`push_thread_entry`].
unsafe fn push_handler(state: *mut lua_State, room: Room<2>) -> bool {
    if !push_thread_entry(state, &HANDLERS_KEY, None, room) {
        return false;
    }
    if ffi::lua_type(state, -1) == ffi::LUA_TFUNCTION {
        true
    } else {
        ffi::lua_pop(state, 1);
        false
    }
}

/// Pushes `mtint.error.interrupted: interruptible id N`. The message is
/// written on the stack, not the heap: `lua_pushlstring` may raise (out of
/// memory), and nothing in this frame may need dropping then. Written by
/// hand: `write!` costs more than the rest of the delivery.
///
/// # Safety
/// `state` is the running thread, in its hook; the push may raise (out
/// of memory), so nothing with a destructor may be alive in the caller's
/// frame.
unsafe fn push_interrupted_message(state: *mut lua_State, id: Id, _: Room<1>) {
    const PREFIX: &str = ": interruptible id ";
    let name = crate::errors::INTERRUPTED.as_bytes();
    // The name, the prefix and an id's at most 20 digits.
    let mut buffer = [0u8; 96];
    let mut len = 0;
    for part in [name, PREFIX.as_bytes()] {
        buffer[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
    let mut digits = [0u8; 20];
    let mut count = 0;
    let mut rest = id;
    loop {
        digits[count] = b'0' + (rest % 10) as u8;
        count += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for &digit in digits[..count].iter().rev() {
        buffer[len] = digit;
        len += 1;
    }
    ffi::lua_pushlstring(state, buffer.as_ptr().cast(), len);
}
