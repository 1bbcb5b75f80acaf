//! Keeps this library loaded until the process ends.
//!
//! Lua unloads a C library (dlclose) when the state that loaded it closes.
//! The registry and the watchdog thread are process-wide and outlive any one
//! state, so the image must stay mapped: we open ourselves once more with
//! RTLD_NODELETE and never close that handle.

use std::ffi::c_void;
use std::sync::Once;

static PINNED: Once = Once::new();

pub fn pin() {
    PINNED.call_once(|| {
        // SAFETY: dladdr only reads the loader's tables for an address in
        // this image; dlopen of the path it gives reopens this very image.
        unsafe {
            let mut info: libc::Dl_info = std::mem::zeroed();
            if libc::dladdr(pin as *const c_void, &mut info) != 0 && !info.dli_fname.is_null() {
                libc::dlopen(info.dli_fname, libc::RTLD_NOW | libc::RTLD_NODELETE);
            }
        }
    });
}
