//! Lua 5.1 only: learning the moment a coroutine's memory is freed.
//!
//! Lua 5.1 has no ephemerons, so a coroutine can be swept a whole GC cycle
//! before the finalizer of its guard runs; another OS thread interrupting it
//! in that window would write into freed memory. The VM's allocator is
//! wrapped instead: every free of a block the size of a thread is checked
//! against the watched coroutines, whose slot is nulled (under the VM lock)
//! before the block is released. An interrupter holding the lock finishes
//! its `lua_sethook` first; one arriving later sees the target dead.

use std::cell::{Cell, RefCell};
use std::ffi::{c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::Arc;

use mlua::ffi::{self, lua_Alloc, lua_State};

use crate::vm::Vm;

struct Shim {
    inner_alloc: lua_Alloc,
    inner_ud: *mut c_void,
    vm: Arc<Vm>,
    /// Size of a thread's memory block; 0 until calibrated.
    thread_size: Cell<usize>,
    /// While calibrating: every block allocated, as (address, size).
    calibration: RefCell<Option<Vec<(usize, usize)>>>,
}

/// The wrapped allocator. The VM calls it only from the OS thread running
/// the VM, so the `Cell`s need no synchronisation.
unsafe extern "C" fn shim_alloc(
    ud: *mut c_void,
    block: *mut c_void,
    osize: usize,
    nsize: usize,
) -> *mut c_void {
    // SAFETY: `ud` is the `Shim` we installed; it is freed only after the
    // allocator is put back (see `uninstall`).
    let shim = unsafe { &*(ud as *const Shim) };
    if nsize == 0 && !block.is_null() && osize == shim.thread_size.get() {
        // A panic must not unwind into Lua's allocator call; if one happened
        // the slot stays as it was, which is what the lock protects anyway.
        let _ = catch_unwind(AssertUnwindSafe(|| shim.vm.block_freed(block as usize)));
    }
    // SAFETY: the allocator and its data that Lua used before us.
    let result = unsafe { (shim.inner_alloc)(shim.inner_ud, block, osize, nsize) };
    if block.is_null() && nsize > 0 {
        if let Ok(mut calibration) = shim.calibration.try_borrow_mut() {
            if let Some(blocks) = calibration.as_mut() {
                blocks.push((result as usize, nsize));
            }
        }
    }
    result
}

/// Wraps the allocator of `state`'s VM and learns the size of a thread.
///
/// Only the first step may raise (out of memory), before anything changes;
/// the thread whose block is measured is created in protected mode, so
/// that calibration ends whatever happens.
///
/// # Safety
/// `state` must be alive and used by the calling thread; called once per VM.
pub unsafe fn install(state: *mut lua_State, vm: &Arc<Vm>) {
    // May raise: nothing is changed yet.
    ffi::lua_pushcfunction(state, new_thread);
    let mut inner_ud = ptr::null_mut();
    let inner_alloc = ffi::lua_getallocf(state, &mut inner_ud);
    let shim = Box::into_raw(Box::new(Shim {
        inner_alloc,
        inner_ud,
        vm: vm.clone(),
        thread_size: Cell::new(0),
        calibration: RefCell::new(Some(Vec::new())),
    }));
    ffi::lua_setallocf(state, shim_alloc, shim.cast());

    // Watch which block a new thread lands in. An error (out of memory) is
    // caught here; the thread size stays unknown and ids of coroutines are
    // then refused as not supported.
    let status = ffi::lua_pcall(state, 0, 1, 0);
    let thread = if status == 0 {
        ffi::lua_touserdata(state, -1) as usize
    } else {
        0
    };
    ffi::lua_pop(state, 1);
    let blocks = (*shim).calibration.borrow_mut().take().unwrap_or_default();
    if let Some(&(block, size)) = blocks
        .iter()
        .find(|&&(block, size)| block <= thread && thread < block + size)
    {
        (*shim).thread_size.set(size);
        vm.set_block_offset(thread - block);
    }
}

/// Creates a thread and returns its address (as a light userdata): the
/// thread itself is garbage at once.
unsafe extern "C-unwind" fn new_thread(state: *mut lua_State) -> c_int {
    let thread = ffi::lua_newthread(state);
    ffi::lua_pushlightuserdata(state, thread.cast());
    1
}

/// Puts the VM's original allocator back (at `lua_close`).
///
/// # Safety
/// `state` must be alive and used by the calling thread.
pub unsafe fn uninstall(state: *mut lua_State) {
    let mut ud = ptr::null_mut();
    let current = ffi::lua_getallocf(state, &mut ud);
    if current as *const () == shim_alloc as *const () {
        let shim = Box::from_raw(ud as *mut Shim);
        ffi::lua_setallocf(state, shim.inner_alloc, shim.inner_ud);
    }
    // Otherwise someone wrapped our allocator in theirs and still calls it:
    // the shim must stay, and is left allocated on purpose.
}
