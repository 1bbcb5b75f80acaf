//! An asymmetric fence: a cheap side, taken by a VM's own thread at every
//! change of its chain, and an expensive side, taken by the watchdog when
//! it reads what that thread published.
//!
//! Both handshakes of the lock-free chain (see [`crate::mirror`]) are
//! Dekker's: each side stores, fences, then loads what the other stored;
//! the fences order the two sides so that at least one sees the other's
//! store. A SeqCst fence on both sides costs the owner an `mfence` at
//! every resume. Linux's `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`
//! runs a full memory barrier on every running thread of the process
//! before it returns, so the owner's side needs only to keep the compiler
//! from moving its store past its load (the technique of liburcu's
//! membarrier flavour). Where the call is refused (an old kernel, a
//! sandbox), both sides fall back to SeqCst fences.

use std::sync::atomic::{compiler_fence, fence, Ordering};
use std::sync::LazyLock;

/// Whether this process registered for expedited private membarriers.
/// Decided once, before any chain change relies on it (the first VM's
/// creation reads it), and never changed.
static ASYMMETRIC: LazyLock<bool> = LazyLock::new(register);

#[cfg(target_os = "linux")]
fn register() -> bool {
    const MEMBARRIER_CMD_QUERY: libc::c_long = 0;
    const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;
    // SAFETY: membarrier takes plain integers and touches no memory of ours.
    unsafe {
        let supported = libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_QUERY, 0, 0);
        supported >= 0
            && supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED != 0
            && libc::syscall(
                libc::SYS_membarrier,
                MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
                0,
                0,
            ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn register() -> bool {
    false
}

/// Decides the flavour now (called when a VM is created, on its thread).
pub fn init() {
    LazyLock::force(&ASYMMETRIC);
}

/// The owner's side, between its store and its load.
#[inline(always)]
pub fn light() {
    if *ASYMMETRIC {
        compiler_fence(Ordering::SeqCst);
    } else {
        fence(Ordering::SeqCst);
    }
}

/// The watchdog's side, between its store and its load: every thread of
/// the process has run a full barrier by the time it returns.
pub fn heavy() {
    if *ASYMMETRIC {
        #[cfg(target_os = "linux")]
        {
            const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
            // SAFETY: as in `register`; registered there for this process.
            let done = unsafe {
                libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0)
            };
            if done == 0 {
                return;
            }
            // Refused after registering: cannot happen on Linux, but then
            // the owners' compiler fences are not enough, and no fence here
            // makes up for them. Abort rather than race.
            std::process::abort();
        }
    } else {
        fence(Ordering::SeqCst);
    }
}
