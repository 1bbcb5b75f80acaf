//! `contained`: Rust work called from a C function or a hook that may
//! leave by `lua_error` (a longjmp on PUC Lua, a foreign unwind on LuaJIT),
//! in the style of mlua's `protect_lua!`, but the other way round: Lua
//! code may raise around it, Rust may panic inside it.
//!
//! Two rules of such a frame are carried by the signature instead of prose:
//! - a panic never crosses into C: it is caught here, and `on_panic`
//!   stands in for the result;
//! - what comes back has no destructor: `T: Copy`, and a `Copy` type cannot
//!   implement `Drop`. Whatever `work` made that has one (a lock guard, a
//!   `Vec`) was dropped when `work` returned, so a `lua_error` in the
//!   caller's frame skips no destructor of it.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `work` and returns its result, or `on_panic` if it panicked.
///
/// The state `work` leaves after a panic is what it is (a poisoned lock
/// answers later calls with its own panic, caught the same way): the
/// caller goes on with `on_panic`, which must be a safe answer (nothing
/// due, nothing entered).
#[inline(always)]
pub fn contained<T: Copy>(on_panic: T, work: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(work)).unwrap_or(on_panic)
}
