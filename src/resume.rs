//! corowatch's `coroutine.resume` and `coroutine.yield`, as C functions,
//! and Lua 5.4's `coroutine.close`, which resumes a coroutine's `<close>`
//! handlers.
//!
//! They are the hot path: a Lua wrapper alone costs more than the resume it
//! wraps. A coroutine that yielded (or, on PUC Lua, has not started) is
//! resumed with `lua_resume` directly, as `coroutine.resume` does itself;
//! not watched, while nothing watched runs, that costs one table lookup on
//! top. Resuming watched code also tells the VM's chain (a lock and a clock
//! read) before and after; the coroutine stays alone on this call's stack,
//! where the hook finds it for the dispatcher (only threads that can stop
//! running unseen are anchored in a table: see [`crate::watch::Found`]).
//!
//! `lua_resume` catches whatever the coroutine raises, so nothing can leave
//! the chain naming a coroutine that does not run (the watchdog arms the
//! chain's top from another thread). Every other case (dead, running or
//! normal coroutines, LuaJIT's fresh ones) goes to the original resume under
//! `lua_pcall`, which refuses with its own messages; an error is raised
//! again once the chain is right. The resumed coroutine stays on our stack
//! throughout, so it cannot be collected while the chain names it.

use std::ffi::{c_int, c_void};
use std::mem::MaybeUninit;

use mlua::ffi::{self, lua_State};

use crate::allowhook;
use crate::clock::{self, Nanos};
use crate::contained::contained;
#[cfg(feature = "luajit")]
use crate::hook;
use crate::stack_room::Room;
use crate::vm::Vm;
use crate::watch::{LeftChain, Plan, Watch};

// Upvalues of `resume` (and `close`, with the original close first).
const ORIGINAL: c_int = ffi::lua_upvalueindex(1);
/// A userdata holding [`ResumeState`].
const STATE: c_int = ffi::lua_upvalueindex(2);
const WATCHED: c_int = ffi::lua_upvalueindex(3);
const KILLED: c_int = ffi::lua_upvalueindex(4);
const ANCHORS: c_int = ffi::lua_upvalueindex(5);
/// The settings record read last, held here so that its address, kept in
/// [`ResumeState`] with its limits, names no other table meanwhile.
const LAST_RECORD: c_int = ffi::lua_upvalueindex(6);
// Upvalues of `yield`.
const YIELD_KILLED: c_int = ffi::lua_upvalueindex(1);
const YIELD_VM: c_int = ffi::lua_upvalueindex(2);
// Upvalues of `set_watch`.
const SET_WATCH_WATCHED: c_int = ffi::lua_upvalueindex(1);
const SET_WATCH_VM: c_int = ffi::lua_upvalueindex(2);

/// What `resume` reads at every call, in one userdata upvalue: the VM (a
/// pointer the caller keeps alive for the life of the process) and the
/// limits of the settings record it read last. Coroutines watched alike
/// share one record, whose limits never change: a round trip reads them
/// once.
///
/// Also the watch it found for the coroutine it resumed last, with the VM's
/// watch epoch then: while the epoch has not moved, no watch was set and
/// no thread freed, so a coroutine at that address is the same one, with
/// the same watch, and the table lookup is skipped.
struct ResumeState {
    vm: *const Vm,
    last_record: *const c_void,
    last_limits: Limits,
    cached_co: *mut lua_State,
    cached_epoch: u64,
    cached_limits: Option<Limits>,
}

/// Pushes `resume` closed over: the original resume, its [`ResumeState`],
/// the `co -> settings` table, the `co -> kill message` table and the
/// `depth -> co` anchors table, all on the stack in this order except the
/// state.
///
/// # Safety
/// The stack of `state` holds the four Lua values on top; may raise (out
/// of memory): call it protected.
pub unsafe fn push_resume(state: *mut lua_State, vm: *const Vm, room: Room<2>) {
    push_tracking(state, vm, resume, room);
}

/// Pushes `close`, closed over the same values as `resume` (the original
/// close in place of the original resume).
///
/// # Safety
/// As for [`push_resume`].
pub unsafe fn push_close(state: *mut lua_State, vm: *const Vm, room: Room<2>) {
    push_tracking(state, vm, close, room);
}

/// Pushes `function` closed over what [`push_resume`] says.
///
/// # Safety
/// As for [`push_resume`].
unsafe fn push_tracking(
    state: *mut lua_State,
    vm: *const Vm,
    function: ffi::lua_CFunction,
    _: Room<2>,
) {
    let size = std::mem::size_of::<ResumeState>();
    let resume_state = ffi::lua_newuserdata(state, size) as *mut ResumeState;
    // SAFETY: a fresh block of that size, aligned for any type by Lua.
    resume_state.write(ResumeState {
        vm,
        last_record: std::ptr::null(),
        last_limits: (clock::NEVER, clock::NEVER),
        cached_co: std::ptr::null_mut(),
        cached_epoch: 0,
        cached_limits: None,
    });
    ffi::lua_insert(state, -4);
    ffi::lua_pushnil(state);
    ffi::lua_pushcclosure(state, function, 6);
}

/// Pushes `yield` closed over the `co -> kill message` table on the stack
/// and the VM (kept alive by the caller for the life of the process).
///
/// # Safety
/// The stack of `state` holds that table on top.
pub unsafe fn push_yield(state: *mut lua_State, vm: *const Vm, _: Room<1>) {
    ffi::lua_pushlightuserdata(state, vm as *mut c_void);
    ffi::lua_pushcclosure(state, yield_, 2);
}

/// Pushes `set_watch` closed over the `co -> settings` table on the stack
/// and the VM (kept alive by the caller for the life of the process).
///
/// # Safety
/// The stack of `state` holds that table on top.
pub unsafe fn push_set_watch(state: *mut lua_State, vm: *const Vm, _: Room<1>) {
    ffi::lua_pushlightuserdata(state, vm as *mut c_void);
    ffi::lua_pushcclosure(state, set_watch, 2);
}

/// `set_watch(co, settings)`: `watched[co] = settings`, the only way the
/// Lua side writes that table. The VM's watch epoch moves first, in the
/// same C call: no Lua code (a hook, a finalizer) runs between the two,
/// so no resume can remember `co`'s old watch past the write (see
/// [`ResumeState`]). If the write raises (out of memory), the table is
/// unchanged and the epoch moved for nothing.
unsafe extern "C-unwind" fn set_watch(state: *mut lua_State) -> c_int {
    // SAFETY: the upvalue is a `Vm` kept alive for the process's life.
    let vm = &*(ffi::lua_touserdata(state, SET_WATCH_VM) as *const Vm);
    ffi::lua_settop(state, 2);
    vm.move_watch_epoch();
    ffi::lua_rawset(state, SET_WATCH_WATCHED);
    0
}

/// A watch's kill and warn limits ([`clock::NEVER`]: none).
type Limits = (Nanos, Nanos);

/// A settings record `{kill, warn, ...}`: limit `index`, if it is one.
///
/// # Safety
/// `state` is the running thread and `record` an absolute index of a
/// table on its stack.
unsafe fn limit(state: *mut lua_State, record: c_int, index: c_int, _: Room<1>) -> Nanos {
    ffi::lua_rawgeti(state, record, index as _);
    let seconds = ffi::lua_tonumber(state, -1);
    ffi::lua_pop(state, 1);
    // `watch` checked the limits (positive, finite); `false` reads as 0.
    // Limits beyond u64 nanoseconds (584 years) saturate to never.
    if seconds > 0.0 {
        (seconds * 1e9) as Nanos
    } else {
        clock::NEVER
    }
}

/// The watch of the coroutine `co` at index 1, if it is watched.
///
/// # Safety
/// `state` runs `resume` or `close` with the coroutine `co` at index 1
/// (as [`look_up_limits`] needs), and `resume_state` is its upvalue.
#[inline(always)]
unsafe fn watch_limits(
    state: *mut lua_State,
    co: *mut lua_State,
    resume_state: &mut ResumeState,
    room: Room<2>,
) -> Option<Limits> {
    let epoch = (*resume_state.vm).watch_epoch();
    // Epoch 0: the VM cannot tell (its allocator could not be wrapped); a
    // host's own allocator put in later hides thread frees.
    if co == resume_state.cached_co
        && epoch == resume_state.cached_epoch
        && epoch != 0
        && allocator_sees_frees(state)
    {
        return resume_state.cached_limits;
    }
    let limits = look_up_limits(state, resume_state, room);
    resume_state.cached_co = co;
    resume_state.cached_epoch = epoch;
    resume_state.cached_limits = limits;
    limits
}

/// # Safety
/// `state` is the running thread of its VM, on this OS thread.
#[inline(always)]
unsafe fn allocator_sees_frees(state: *mut lua_State) -> bool {
    crate::allocator::is_wrapped(state)
}

/// The watch of the coroutine at index 1, looked up in the `co ->
/// settings` table.
///
/// # Safety
/// `state` runs `resume` or `close` (their upvalues are in place), with
/// the coroutine at index 1.
unsafe fn look_up_limits(
    state: *mut lua_State,
    resume_state: &mut ResumeState,
    room: Room<2>,
) -> Option<Limits> {
    ffi::lua_pushvalue(state, 1);
    ffi::lua_rawget(state, WATCHED);
    let limits = if ffi::lua_type(state, -1) == ffi::LUA_TTABLE {
        let record = ffi::lua_topointer(state, -1);
        if record != resume_state.last_record {
            let index = ffi::lua_gettop(state);
            let above_record = room.above::<1, 1>();
            resume_state.last_limits = (
                limit(state, index, 1, above_record),
                limit(state, index, 2, above_record),
            );
            resume_state.last_record = record;
            ffi::lua_pushvalue(state, index);
            ffi::lua_replace(state, LAST_RECORD);
        }
        Some(resume_state.last_limits)
    } else {
        None
    };
    ffi::lua_pop(state, 1);
    limits
}

/// `resume(co, ...)`, same results as `coroutine.resume`; a killed
/// coroutine answers `false, message`.
///
/// Nothing with a destructor lives in this frame or the ones it calls
/// here: it may end in `lua_error`, and the Rust calls that lock run in
/// their own frames.
unsafe extern "C-unwind" fn resume(state: *mut lua_State) -> c_int {
    // SAFETY: called by Lua, nothing pushed yet. The arguments only leave
    // this stack (for `co`'s) before the answer: every room handed down
    // counts from the top on entry or lower.
    let room = Room::<{ ffi::LUA_MINSTACK }>::on_entry();
    let (co, vm, limits) = match begin(state, room.part()) {
        Ok(begun) => begun,
        Err(results) => return results,
    };
    #[cfg(feature = "luajit")]
    arm_pending_interrupt(vm, state, room.part());
    let narg = ffi::lua_gettop(state) - 1;
    if !is_suspended(state, co) || (narg > 0 && ffi::lua_checkstack(co, narg) == 0) {
        return resume_through_original(vm, state, co, limits, false, room.part());
    }
    // `co` stays at index 1 throughout: alive while the chain names it.
    let (outcome, kill_seen) = tracked(vm, state, co, (limits, true), room.part(), || {
        resume_suspended(state, co)
    });
    answer_direct(state, co, outcome, kill_seen, room.part())
}

/// `close(co)`: Lua 5.4's `coroutine.close`, with `co`'s watch in force
/// while its pending to-be-closed variables run, from the call on, as a
/// resume puts it in force: a `<close>` handler that runs past the kill
/// limit is killed, and the handlers still pending get the kill at their
/// first instruction. A killed coroutine answers `false, message`, at
/// every close.
///
/// A coroutine that died from an error raised in a hook (its kill, the
/// kill of one that resumed it, an interrupt, a user's hook) keeps its
/// hooks off for good: no `pcall` in it caught the error, which is when
/// Lua turns them back on. They are turned back on first, or its handlers
/// would run out of every watch's reach (see [`crate::allowhook`]); for a
/// coroutine that died otherwise they are on already.
unsafe extern "C-unwind" fn close(state: *mut lua_State) -> c_int {
    // SAFETY: called by Lua, nothing pushed yet.
    let room = Room::<{ ffi::LUA_MINSTACK }>::on_entry();
    let (co, vm, limits) = match begin(state, room.part()) {
        Ok(begun) => begun,
        Err(results) => return results,
    };
    if ffi::lua_status(co) > ffi::LUA_YIELD {
        // SAFETY: `co` is dead (its status is an error), so it does not
        // run; it is a thread of this VM (it came as an argument), whose
        // OS thread this is.
        allowhook::set(co, true);
    }
    let killed_before = is_killed(state, room.part());
    resume_through_original(vm, state, co, limits, killed_before, room.part())
}

/// What `resume` and `close` begin with: the coroutine at index 1, the VM
/// and the coroutine's watch limits; or, if the argument is not a
/// coroutine, the result count of the original function, which refused it.
///
/// # Safety
/// `state` is running `resume` or `close` (their upvalues are in place).
#[inline(always)]
unsafe fn begin<'vm>(
    state: *mut lua_State,
    room: Room<2>,
) -> Result<(*mut lua_State, &'vm Vm, Option<Limits>), c_int> {
    let co = ffi::lua_tothread(state, 1);
    if co.is_null() {
        return Err(call_original_unprotected(state, room.part()));
    }
    // SAFETY: the upvalue is the `ResumeState` that `push_tracking` made;
    // its `vm` is kept alive for the process's life.
    let resume_state = ffi::lua_touserdata(state, STATE) as *mut ResumeState;
    let vm = &*(*resume_state).vm;
    vm.note_owner();
    // SAFETY: borrowed only for this call, which runs no Lua code (so no
    // nested `resume` borrows it meanwhile).
    let limits = watch_limits(state, co, &mut *resume_state, room);
    Ok((co, vm, limits))
}

/// Whether the coroutine at index 1 was killed.
///
/// # Safety
/// `state` runs `resume` or `close` with the coroutine at index 1 and the
/// killed table as upvalue.
unsafe fn is_killed(state: *mut lua_State, _: Room<1>) -> bool {
    ffi::lua_pushvalue(state, 1);
    ffi::lua_rawget(state, KILLED);
    let killed = ffi::lua_isnil(state, -1) == 0;
    ffi::lua_pop(state, 1);
    killed
}

/// Calls the original function (resume or close) with this call's
/// arguments, unprotected: for arguments that are not coroutines, which it
/// refuses with its usual error.
///
/// # Safety
/// `state` runs `resume` or `close` (the original is an upvalue); it may
/// raise, so nothing with a destructor may be alive in the caller's frame.
unsafe fn call_original_unprotected(state: *mut lua_State, _: Room<1>) -> c_int {
    ffi::lua_pushvalue(state, ORIGINAL);
    ffi::lua_insert(state, 1);
    ffi::lua_call(state, ffi::lua_gettop(state) - 1, ffi::LUA_MULTRET);
    ffi::lua_gettop(state)
}

/// Runs `resume_co`, which resumes the coroutine `co` at index 1 and
/// catches whatever it raises, with the VM's chain told: entered before
/// and left after when something watched is involved, or left as its root
/// if the coroutine watched itself meanwhile (`watch(nil)`). `direct`:
/// `resume_co` is [`resume_suspended`], which leaves `co` alone on this
/// stack while it runs. Returns what `resume_co` returned, and whether the
/// hook saw the coroutine's kill deadline pass (then the `killed` table
/// says whether it was killed).
///
/// `room` holds above the stack as `resume_co` leaves it, too: the chain's
/// bookkeeping after it pushes.
///
/// # Safety
/// `state` runs `resume` or `close` on this OS thread with `co` at index
/// 1, a coroutine of its VM held there until `resume_co` returns;
/// `resume_co` leaves the stack as [`answer_direct`] or
/// [`answer_original`] expects, with `room` free above it, and raises
/// nothing (it catches errors).
unsafe fn tracked<R>(
    vm: &Vm,
    state: *mut lua_State,
    co: *mut lua_State,
    (limits, direct): (Option<Limits>, bool),
    room: Room<1>,
    resume_co: impl FnOnce() -> R,
) -> (R, bool) {
    if limits.is_none() && !vm.is_active() {
        let outcome = resume_co();
        if !vm.is_active() {
            return (outcome, false);
        }
        let left = leave_root(vm, state, co);
        unanchor(state, left, room);
        if let Some(depth) = left.anchor_resumer_at {
            // The slot exists (see `Chain::leave_root`): no allocation,
            // nothing raised. This thread runs, so it is alive until then.
            ffi::lua_pushthread(state);
            ffi::lua_rawseti(state, ANCHORS, depth as _);
        }
        return (outcome, left.kill_seen);
    }
    // Every step that may raise (anchoring can run out of memory) comes
    // before the chain names the coroutine, and none after it does until
    // the chain has let it go: no error leaves the chain half told.
    let plan = plan_enter(vm, state);
    anchor(state, plan, direct, room);
    let depth = enter(vm, state, co, limits, (plan, direct));
    let outcome = resume_co();
    let left = leave(vm, state, depth);
    unanchor(state, left, room);
    (outcome, left.kill_seen)
}

/// LuaJIT: if an interrupt waits for the coroutine at index 1, arms the
/// hook so that it lands at the coroutine's first instruction, as it does on
/// PUC Lua, where the hook waits on the coroutine itself.
///
/// # Safety
/// `state` runs `resume`, with the coroutine at index 1.
#[cfg(feature = "luajit")]
unsafe fn arm_pending_interrupt(vm: &Vm, state: *mut lua_State, room: Room<2>) {
    if !vm.has_pending_interrupts() {
        return;
    }
    let Some(id) = hook::id_of_thread(state, Some(1), room) else {
        return;
    };
    contained((), || vm.arm_for_resume(id));
}

/// Whether `co` can be resumed by `lua_resume` as `coroutine.resume` would:
/// it yielded, or (PUC Lua) it has not started. Every other case (running,
/// normal, dead, LuaJIT's fresh coroutines) goes to the original resume,
/// which refuses it with its own message.
///
/// # Safety
/// `state` is the running thread and `co` a coroutine of its VM, alive
/// (held on `state`'s stack).
unsafe fn is_suspended(state: *mut lua_State, co: *mut lua_State) -> bool {
    if co == state {
        return false;
    }
    match ffi::lua_status(co) {
        ffi::LUA_YIELD => true,
        ffi::LUA_OK if cfg!(not(feature = "luajit")) => {
            let mut ar = MaybeUninit::<ffi::lua_Debug>::zeroed();
            // No frame yet, and a function to start: a fresh coroutine.
            ffi::lua_getstack(co, 0, ar.as_mut_ptr()) == 0 && ffi::lua_gettop(co) > 0
        }
        _ => false,
    }
}

#[cfg(feature = "lua51")]
extern "C-unwind" {
    /// Lua 5.1: gives `to` the C-call depth of `from`, as `coroutine.resume`
    /// does before `lua_resume` (later versions take `from` in `lua_resume`).
    fn lua_setlevel(from: *mut lua_State, to: *mut lua_State);
}

/// Moves the arguments above index 1 to the suspended `co` and resumes it;
/// returns the status and the number of results left on `co`'s stack.
///
/// # Safety
/// `state` runs `resume` with `co` at index 1, suspended (as
/// [`is_suspended`] said) and with room for the arguments moved to it.
unsafe fn resume_suspended(state: *mut lua_State, co: *mut lua_State) -> (c_int, c_int) {
    let narg = ffi::lua_gettop(state) - 1;
    ffi::lua_xmove(state, co, narg);
    // While `co` runs, it is alone on this stack, where the hook finds it
    // (`crate::watch::Locate::OnStackOf`).
    debug_assert_eq!(ffi::lua_gettop(state), 1);
    #[cfg(feature = "lua51")]
    lua_setlevel(state, co);
    let mut nres = 0;
    let status = ffi::lua_resume(co, state, narg, &mut nres);
    (status, nres)
}

/// The answer of a direct resume ([`resume_suspended`]): moves the outcome
/// left on `co`'s stack to `state` as `coroutine.resume` returns it: `true,
/// values...`, or `false, error`. A killed coroutine answers `false,
/// message`: it is in the `killed` table, looked up when the hook saw its
/// kill deadline pass (`kill_seen`). Returns the result count.
/// [`answer_original`] is the same answer for the results of the original
/// function.
///
/// # Safety
/// `state` runs `resume` with `co` at index 1 and the killed table as
/// upvalue; `co`'s stack holds what [`resume_suspended`] left. It may
/// raise (5.1, LuaJIT: too many results; out of memory), so nothing
/// with a destructor may be alive in the caller's frame.
unsafe fn answer_direct(
    state: *mut lua_State,
    co: *mut lua_State,
    (status, nres): (c_int, c_int),
    kill_seen: bool,
    room: Room<3>,
) -> c_int {
    let ran = status == ffi::LUA_OK || status == ffi::LUA_YIELD;
    if ran && !(kill_seen && is_killed(state, room.part())) {
        if ffi::lua_checkstack(state, nres + 1) == 0 {
            ffi::lua_pop(co, nres);
            // 5.1 and LuaJIT raise this; later versions return it.
            if cfg!(any(feature = "lua51", feature = "luajit")) {
                push_str(state, "too many results to resume", room.part());
                ffi::lua_error(state);
            }
            ffi::lua_pushboolean(state, 0);
            push_str(state, "too many results to resume", room.above::<1, 1>());
            return 2;
        }
        ffi::lua_pushboolean(state, 1);
        ffi::lua_xmove(co, state, nres);
        return nres + 1;
    }
    ffi::lua_pushboolean(state, 0);
    if ran {
        ffi::lua_pop(co, nres);
        ffi::lua_pushnil(state);
    } else {
        ffi::lua_xmove(co, state, 1);
    }
    // The error a killed coroutine left may be anything it raised since;
    // its answer is the kill message.
    ffi::lua_pushvalue(state, 1);
    ffi::lua_rawget(state, KILLED);
    if ffi::lua_isnil(state, -1) == 0 {
        ffi::lua_replace(state, -2);
    } else {
        ffi::lua_pop(state, 1);
    }
    2
}

/// # Safety
/// `state` is the running thread; the push may raise (out of memory), so
/// nothing with a destructor may be alive in the caller's frame.
unsafe fn push_str(state: *mut lua_State, text: &'static str, _: Room<1>) {
    ffi::lua_pushlstring(state, text.as_ptr().cast(), text.len());
}

/// The general path, through the original resume under `lua_pcall`, for
/// everything but a plainly suspended coroutine: the original gives its own
/// refusals and errors. No error can leave the chain naming a coroutine
/// that does not run; one is raised again once the chain is right.
/// `killed_before`: the coroutine was killed before this call (a close
/// answers for a killed coroutine whatever the original says).
///
/// # Safety
/// `state` runs `resume` or `close` with `co` at index 1, a coroutine of
/// its VM; it may raise (the original's error, once the chain is right),
/// so nothing with a destructor may be alive in the caller's frame.
unsafe fn resume_through_original(
    vm: &Vm,
    state: *mut lua_State,
    co: *mut lua_State,
    limits: Option<Limits>,
    killed_before: bool,
    room: Room<2>,
) -> c_int {
    // Keep `co` below everything: it stays alive while the chain names it.
    ffi::lua_pushvalue(state, 1);
    ffi::lua_insert(state, 1);
    let above_co = room.above::<1, 1>();
    let (status, kill_seen) = tracked(vm, state, co, (limits, false), above_co, || {
        call_original(state, above_co)
    });
    if status == TOO_MANY_RESULTS {
        push_str(state, "too many results to resume", room.above::<1, 1>());
    }
    if status != ffi::LUA_OK {
        ffi::lua_error(state);
    }
    // `call_original` left the room above its results.
    answer_original(state, kill_seen || killed_before, above_co)
}

/// Calls the original resume on the stack `[co, co, args...]` (the first
/// `co` stays, keeping the coroutine alive). Returns the pcall status.
///
/// The results may take the room `room` counted: the stack is grown so
/// that `room` holds above them too, for [`tracked`], which pushes once
/// this returns (to clear an anchor). If it cannot grow (a stack at Lua's
/// limit), the results are dropped and the answer is [`TOO_MANY_RESULTS`],
/// an error raised once the chain is right (pushing its message here
/// could raise, out of memory): the same refusal as `coroutine.resume`'s.
///
/// # Safety
/// `state` runs `resume` or `close` with its arguments on the stack; it
/// raises nothing.
unsafe fn call_original(state: *mut lua_State, _: Room<1>) -> c_int {
    ffi::lua_pushvalue(state, ORIGINAL);
    ffi::lua_insert(state, 2);
    let status = ffi::lua_pcall(state, ffi::lua_gettop(state) - 2, ffi::LUA_MULTRET, 0);
    if ffi::lua_checkstack(state, 1) != 0 {
        return status;
    }
    // Below the top the room was counted from: it holds again.
    ffi::lua_settop(state, 1);
    TOO_MANY_RESULTS
}

/// What [`call_original`] answers for results that left no room: not a
/// status Lua uses.
const TOO_MANY_RESULTS: c_int = -1;

/// The answer of a resume (or close) through the original function, whose
/// results are on this stack above index 1: left as they are, unless the
/// coroutine at index 1 was killed, then `false, message` (the `killed`
/// table is read when it failed or `maybe_killed`). Returns the result
/// count.
///
/// # Safety
/// `state` runs `resume` or `close`, with the results of
/// [`call_original`] on its stack, `room` free above them, and the killed
/// table as upvalue.
unsafe fn answer_original(state: *mut lua_State, maybe_killed: bool, _: Room<1>) -> c_int {
    let failed = ffi::lua_type(state, 2) == ffi::LUA_TBOOLEAN && ffi::lua_toboolean(state, 2) == 0;
    if maybe_killed || failed {
        ffi::lua_pushvalue(state, 1);
        ffi::lua_rawget(state, KILLED);
        if ffi::lua_isnil(state, -1) == 0 {
            ffi::lua_replace(state, 1);
            ffi::lua_settop(state, 1);
            ffi::lua_pushboolean(state, 0);
            ffi::lua_insert(state, 1);
            return 2;
        }
        ffi::lua_pop(state, 1);
    }
    ffi::lua_remove(state, 1);
    ffi::lua_gettop(state)
}

/// Anchors, as `plan` says, the running thread, and the coroutine at index
/// 1 unless it is resumed `direct`ly (then this stack holds it, where the
/// hook finds it: see [`crate::watch::Found`]). May raise (out of memory):
/// call it before the chain changes.
///
/// # Safety
/// `state` runs `resume` with the coroutine at index 1 and the anchors
/// table as upvalue.
unsafe fn anchor(state: *mut lua_State, plan: Plan, direct: bool, _: Room<1>) {
    if let Some(depth) = plan.anchor_resumer_at {
        ffi::lua_pushthread(state);
        ffi::lua_rawseti(state, ANCHORS, depth as _);
    }
    if !direct && plan.depth > 0 {
        ffi::lua_pushvalue(state, 1);
        ffi::lua_rawseti(state, ANCHORS, plan.depth as _);
    }
}

/// Clears the anchors the chain no longer needs (false, not nil: a slot set
/// to nil and back costs Lua a rehash). The slots exist, so this allocates
/// nothing and cannot raise.
///
/// # Safety
/// As for [`anchor`]; the slots of `left` exist.
unsafe fn unanchor(state: *mut lua_State, left: LeftChain, _: Room<1>) {
    for depth in left.unanchor_from.max(1)..=left.unanchor_to {
        ffi::lua_pushboolean(state, 0);
        ffi::lua_rawseti(state, ANCHORS, depth as _);
    }
}

/// `yield(...)`: `coroutine.yield`, but a killed coroutine cannot yield.
///
/// (While a killed coroutine runs, the hook raises at its every
/// instruction, so this check is a second line; it costs a table lookup
/// only while a killed coroutine is on the chain.)
unsafe extern "C-unwind" fn yield_(state: *mut lua_State) -> c_int {
    // SAFETY: called by Lua, nothing pushed yet.
    let room = Room::<1>::on_entry();
    // SAFETY: the upvalue is a `Vm` kept alive for the process's life.
    let vm = &*(ffi::lua_touserdata(state, YIELD_VM) as *const Vm);
    vm.note_owner();
    if vm.kill_seen() && is_running_killed(state, room) {
        ffi::lua_error(state);
    }
    ffi::lua_yield(state, ffi::lua_gettop(state))
}

/// Whether the running thread was killed; if so, its message is pushed.
///
/// # Safety
/// `state` runs `yield`, whose upvalue is the killed table.
unsafe fn is_running_killed(state: *mut lua_State, _: Room<1>) -> bool {
    ffi::lua_pushthread(state);
    ffi::lua_rawget(state, YIELD_KILLED);
    if ffi::lua_isnil(state, -1) == 0 {
        return true;
    }
    ffi::lua_pop(state, 1);
    false
}

// The calls into the VM, with panics kept out of C (`contained`). Each has
// the safety contract of the `Vm` method it calls: `resumer` is the running
// thread (this is its resume, on its OS thread), and every thread on the
// chain is held alive (anchored, or on a stack).
//
// They are inlined, down to the chain's own changes: a watched round trip
// made five calls deep with a struct copied at each level cost 5.1 a
// quarter more than with them flattened (bench/corowatch_bench.lua). What
// they lock is dropped inside `contained`'s closure, before anything here
// can raise.

/// # Safety
/// As for [`Vm::plan_enter`]: `resumer` is the running thread, on its
/// OS thread, and every thread on the chain is held alive.
#[inline(always)]
unsafe fn plan_enter(vm: &Vm, resumer: *mut lua_State) -> Plan {
    if let Some(plan) = vm.plan_unchanged(resumer) {
        return plan;
    }
    contained(Plan::default(), || unsafe { vm.plan_enter(resumer) })
}

/// # Safety
/// As for [`Vm::enter`]: `resumer` is the running thread, on its OS
/// thread, and `co` is held alive (on its stack or anchored, as the
/// plan said) until the matching [`leave`].
#[inline(always)]
unsafe fn enter(
    vm: &Vm,
    resumer: *mut lua_State,
    co: *mut lua_State,
    limits: Option<Limits>,
    placing: (Plan, bool),
) -> usize {
    contained(0, || {
        let now = clock::now();
        let watch = limits.map(|(kill, warn)| Watch::start(kill, warn, now));
        unsafe { vm.enter(resumer, co, watch, now, placing) }
    })
}

/// # Safety
/// As for [`Vm::leave`]: `resumer` is the running thread, on its OS
/// thread, and every thread on the chain is held alive.
#[inline(always)]
unsafe fn leave(vm: &Vm, resumer: *mut lua_State, depth: usize) -> LeftChain {
    contained(LeftChain::default(), || unsafe { vm.leave(resumer, depth) })
}

/// # Safety
/// As for [`Vm::leave_root`]: `resumer` is the running thread, on its
/// OS thread, and `co` is held alive.
unsafe fn leave_root(vm: &Vm, resumer: *mut lua_State, co: *mut lua_State) -> LeftChain {
    contained(LeftChain::default(), || unsafe {
        vm.leave_root(resumer, co)
    })
}
