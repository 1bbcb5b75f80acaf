//! Test only (feature `widen-frame-window`, Lua 5.4): widens the window in
//! which another thread's `lua_sethook` walks a target's `CallInfo` chain.
//!
//! `lua_sethook` reads `L->ci`, then writes the trap flag of every Lua frame
//! down the chain (`settraps`). Meanwhile the target can return below those
//! frames and a GC step free them (`luaE_shrinkCI`); `Vm::frame_freed`'s
//! handshake makes such frees wait. The real walk is a few hundred
//! nanoseconds long, too short to hit under valgrind, where threads take
//! turns. This walk pauses between reading `L->ci` and writing, so that a
//! build with the handshake off (`unguarded-frames`) writes into freed
//! frames (valgrind: "Invalid write"), and one with it does not.
//!
//! The offsets are Lua 5.4.4–5.4.6's on 64-bit targets, checked before use:
//! the chain must end at the base frame inside the `lua_State`.

use std::time::Duration;

use mlua::ffi::lua_State;

/// `offsetof(lua_State, ci)`.
const STATE_CI: usize = 32;
/// `offsetof(lua_State, base_ci)`.
const STATE_BASE_CI: usize = 96;
/// `offsetof(CallInfo, previous)`.
const CI_PREVIOUS: usize = 16;
/// `offsetof(CallInfo, u.l.trap)`.
const CI_TRAP: usize = 40;
/// `offsetof(CallInfo, callstatus)`.
const CI_CALLSTATUS: usize = 62;
/// `CIST_C`: a C function's frame.
const CIST_C: u16 = 1 << 1;

/// Walks `state`'s frames as `settraps` does, pausing first.
///
/// # Safety
/// Test only: reads and writes another thread's frames, which is what this
/// build shows; the caller holds the VM lock with `writing_afar` set.
pub unsafe fn slow_settraps(state: *mut lua_State) {
    let base = state as *mut u8;
    let first = *(base.add(STATE_CI) as *const *mut u8);
    // Check the layout on the chain as it is now: it must reach the base
    // frame. The target runs meanwhile; a check that fails skips the walk.
    let mut ci = first;
    let mut steps = 0usize;
    while !ci.is_null() && ci != base.add(STATE_BASE_CI) && steps < 1_000_000 {
        ci = *(ci.add(CI_PREVIOUS) as *const *mut u8);
        steps += 1;
    }
    if ci != base.add(STATE_BASE_CI) {
        return;
    }
    std::thread::sleep(Duration::from_micros(200));
    let mut ci = first;
    while !ci.is_null() {
        if *(ci.add(CI_CALLSTATUS) as *const u16) & CIST_C == 0 {
            std::ptr::write_volatile(ci.add(CI_TRAP) as *mut i32, 1);
        }
        ci = *(ci.add(CI_PREVIOUS) as *const *mut u8);
    }
}
