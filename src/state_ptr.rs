//! A raw `lua_State` pointer that may cross OS threads.
//!
//! What makes dereferencing one sound is argued where it is done: the slot
//! lifetime argument in [`crate::vm`], the chain's in [`crate::watch`].

use mlua::ffi::lua_State;

/// A raw `lua_State` pointer that may cross OS threads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct StatePtr(pub *mut lua_State);

// SAFETY: the pointer is only dereferenced (through the Lua C API) under the
// VM lock while the slot says the state is alive; see `crate::vm`.
unsafe impl Send for StatePtr {}

impl StatePtr {
    pub const DEAD: StatePtr = StatePtr(std::ptr::null_mut());

    pub fn is_alive(self) -> bool {
        !self.0.is_null()
    }
}
