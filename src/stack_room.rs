//! `Room<N>`: stack-slot accounting carried by a type, in the spirit of
//! mlua's `StackGuard`, for the C functions and the hook that work on a
//! raw `lua_State`.
//!
//! Lua gives every C function, and every hook, `LUA_MINSTACK` (20) free
//! slots above what it was called with; beyond them a push writes past the
//! stack (Debian's Lua does not check API use). A function that pushes
//! takes a `Room<N>`, `N` its most values pushed at once, and can only get
//! one from its caller: the compiler checks that the rooms handed down add
//! up to what the C function was given.
//!
//! - [`Room::on_entry`] at the start of a C function or a hook: up to
//!   `LUA_MINSTACK` slots, no call.
//! - [`Room::part`] for a callee that pushes at most `M` of the `N` free
//!   slots (and leaves them as it found them, or pushes last).
//! - [`Room::above`] for a callee called with `USED` slots of the room
//!   taken already: `USED + M` must fit in `N`.
//!
//! Each of these is a `const` assertion, so an overdraft fails the build.
//! A room holds while the stack stays at or below the top it was counted
//! from: a function that lets a call leave results of its own (a
//! `lua_pcall` with `LUA_MULTRET`) grows the stack to keep it, or says why
//! it need not (`resume::call_original`).
//! What a single function's body pushes is still counted by reading it,
//! but each of those bodies is a few lines next to the `N` it declares.
//! A `Room` is zero-sized: passing one costs nothing.

use std::ffi::c_int;
use std::marker::PhantomData;

use mlua::ffi;

/// At least `N` free slots on the running thread's stack, from the top it
/// had when the room was handed over.
#[derive(Clone, Copy)]
pub struct Room<const N: c_int> {
    /// Not `Send`: a room belongs to one call on one thread.
    _call: PhantomData<*mut ()>,
}

impl<const N: c_int> Room<N> {
    /// The room Lua gives a C function, or a hook, on entry.
    ///
    /// # Safety
    /// Called at the start of a C function called by Lua, or of a hook,
    /// before anything is pushed: the room is counted from that top.
    #[inline(always)]
    pub unsafe fn on_entry() -> Self {
        const { assert!(N <= ffi::LUA_MINSTACK, "more than Lua gives a C function") };
        Room { _call: PhantomData }
    }

    /// `M` of these slots, for a callee called with the top as it was
    /// when this room was handed over.
    #[inline(always)]
    pub fn part<const M: c_int>(self) -> Room<M> {
        const { assert!(M <= N, "a part larger than its room") };
        Room { _call: PhantomData }
    }

    /// `M` slots above `USED` this room's owner has pushed and keeps on
    /// the stack while the callee runs.
    #[inline(always)]
    pub fn above<const USED: c_int, const M: c_int>(self) -> Room<M> {
        const {
            assert!(
                USED + M <= N,
                "a part and what lies below it overdraw the room"
            )
        };
        Room { _call: PhantomData }
    }
}
