//! `OwnerOnly`: data that only a VM's own OS thread touches, shared with
//! other threads inside a `Vm` that they hold but never read this through.
//!
//! Lua runs a VM on one OS thread at a time (a program that moves it to
//! another thread synchronises the move, which orders our accesses too).
//! The invariant "called on the owner thread" is carried by the type: the
//! only way in is [`OwnerOnly::with`], an `unsafe fn` whose contract says
//! so, and whose borrow cannot escape the closure.

use std::cell::UnsafeCell;

pub struct OwnerOnly<T>(UnsafeCell<T>);

// SAFETY: other threads hold the cell but never access its value (the
// contract of `with`); the value moves between OS threads only as the VM
// does, in order.
unsafe impl<T: Send> Sync for OwnerOnly<T> {}

impl<T> OwnerOnly<T> {
    pub fn new(value: T) -> Self {
        OwnerOnly(UnsafeCell::new(value))
    }

    /// Runs `f` on the value.
    ///
    /// # Safety
    /// Called on the VM's own OS thread, and not from inside another `with`
    /// on this cell: `f` runs no Lua code (the hook, the one way back into
    /// the library on this thread, fires only between Lua instructions)
    /// and calls nothing that takes this cell again.
    #[inline(always)]
    pub unsafe fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        // SAFETY: only the owner thread gets here (contract), and not
        // nested, so this is the only reference.
        f(unsafe { &mut *self.0.get() })
    }
}
