//! The VM's allocator, wrapped: the core hears of the frees that another
//! OS thread's `lua_sethook` must not race with, and of threads' deaths.
//!
//! - Lua 5.1 and LuaJIT, thread blocks. They have no ephemerons, so a
//!   coroutine can be swept a whole GC cycle before the finalizer of its
//!   guard runs; another OS thread interrupting it in that window would
//!   write into freed memory (5.1), and its id would answer as alive
//!   (both). Every free of a block the size of a thread is checked against
//!   the coroutines with ids, whose slot is nulled (under the VM lock)
//!   before the block is released. An interrupter holding the lock finishes
//!   its `lua_sethook` first; one arriving later sees the target dead.
//! - Lua 5.2–5.4, `CallInfo` blocks. Their `lua_sethook` reads the running
//!   frame (5.2, 5.3: `L->ci` for `L->oldpc`) or writes the trap flag of
//!   every frame down the chain (5.4: `settraps`). The running thread may
//!   meanwhile return below a frame, and a GC step free it
//!   (`luaE_shrinkCI`, `luaE_freeCI`). Each free of a block the size of a
//!   `CallInfo` first waits for any `lua_sethook` from another thread to
//!   end: see [`crate::vm::Vm::frame_freed`] for the handshake.
//!
//! - Every version, thread blocks again: each free of one moves the VM's
//!   watch epoch ([`crate::vm::Vm::move_watch_epoch`]), so that the patched
//!   resume can trust the watch it read last for a coroutine at the same
//!   address: no other coroutine can be there without a free between.
//!
//! The sizes to watch are learned at install by watching what the VM
//! allocates for a new thread and for a thread's first call frame.

use std::cell::{Cell, RefCell};
use std::ffi::{c_int, c_void};
use std::ptr;
use std::sync::Arc;

use mlua::ffi::{self, lua_Alloc, lua_State};

use crate::contained::contained;
use crate::stack_room::Room;
use crate::vm::Vm;

struct Shim {
    inner_alloc: lua_Alloc,
    inner_ud: *mut c_void,
    vm: Arc<Vm>,
    /// Size of the blocks whose frees the VM must hear of: a thread (5.1)
    /// or a `CallInfo` (5.2–5.4); 0 until calibrated.
    watched_size: Cell<usize>,
    /// Size of a thread's block; 0 until calibrated.
    thread_size: Cell<usize>,
    /// While calibrating: every new block, as (address, size).
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
    if nsize == 0 && !block.is_null() {
        if osize == shim.watched_size.get() {
            // A panic must not unwind into Lua's allocator call; if one
            // happened the free goes on, as it did before the VM was
            // wrapped.
            contained((), || freeing(&shim.vm, block as usize));
        }
        if osize == shim.thread_size.get() {
            shim.vm.move_watch_epoch();
        }
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

#[cfg(any(feature = "lua51", feature = "luajit"))]
fn freeing(vm: &Vm, block: usize) {
    vm.block_freed(block);
}

#[cfg(not(any(feature = "lua51", feature = "luajit")))]
fn freeing(vm: &Vm, _: usize) {
    vm.frame_freed();
}

/// Wraps the allocator of `state`'s VM and learns the size to watch.
///
/// Only the first step may raise (out of memory), before anything changes;
/// the calibration runs in protected mode, so that it ends whatever
/// happens.
///
/// # Safety
/// `state` must be alive and used by the calling thread; called once per VM.
pub unsafe fn install(state: *mut lua_State, vm: &Arc<Vm>) {
    // May raise: nothing is changed yet.
    ffi::lua_pushcfunction(state, calibrate);
    let mut inner_ud = ptr::null_mut();
    let inner_alloc = ffi::lua_getallocf(state, &mut inner_ud);
    let shim = Box::into_raw(Box::new(Shim {
        inner_alloc,
        inner_ud,
        vm: vm.clone(),
        watched_size: Cell::new(0),
        thread_size: Cell::new(0),
        calibration: RefCell::new(None),
    }));
    ffi::lua_setallocf(state, shim_alloc, shim.cast());
    // An error (out of memory) is caught here; the size stays unknown:
    // on 5.1 ids of coroutines are then refused as not supported.
    if ffi::lua_pcall(state, 0, 0, 0) != 0 {
        ffi::lua_pop(state, 1);
    }
    (*shim).calibration.borrow_mut().take();
}

/// Records the blocks allocated by `step`, in the shim of `state`'s VM.
/// (If `step` raises, `install` ends the recording.)
///
/// # Safety
/// `state` is a thread of the VM `install` is wrapping, run by the calling
/// OS thread, with our shim in place (as [`shim_of`] needs).
unsafe fn recording(state: *mut lua_State, step: impl FnOnce()) -> Vec<(usize, usize)> {
    let shim = shim_of(state);
    *shim.calibration.borrow_mut() = Some(Vec::new());
    step();
    shim.calibration.borrow_mut().take().unwrap_or_default()
}

/// The shim `install` put in `state`'s VM just before calibrating.
///
/// # Safety
/// `state` is a live thread of a VM whose allocator is our shim (put there
/// by `install`, and not yet taken out by `uninstall`).
unsafe fn shim_of(state: *mut lua_State) -> &'static Shim {
    let mut ud = ptr::null_mut();
    ffi::lua_getallocf(state, &mut ud);
    // SAFETY: `install` put our shim there just before calling us; it lives
    // until `uninstall`, at `lua_close`.
    &*(ud as *const Shim)
}

/// Lua 5.1 and LuaJIT: creates a thread, and learns the size of its block
/// and where in the block the `lua_State` lies.
#[cfg(any(feature = "lua51", feature = "luajit"))]
unsafe extern "C-unwind" fn calibrate(state: *mut lua_State) -> c_int {
    // SAFETY: called by Lua, nothing pushed yet; the new thread is the one
    // value pushed.
    let _thread = Room::<1>::on_entry();
    let mut thread = 0;
    let blocks = recording(state, || {
        thread = ffi::lua_newthread(state) as usize;
    });
    if let Some(&(block, size)) = blocks
        .iter()
        .find(|&&(block, size)| block <= thread && thread < block + size)
    {
        let shim = shim_of(state);
        shim.watched_size.set(size);
        shim.thread_size.set(size);
        shim.vm.track_watch_epoch();
        shim.vm.set_block_offset(thread - block);
    }
    0
}

/// Lua 5.2–5.4: creates a thread and calls a C function in it: the one new
/// block of that call is its first `CallInfo` (the base one lies inside
/// the thread; a light C function allocates nothing).
#[cfg(not(any(feature = "lua51", feature = "luajit")))]
unsafe extern "C-unwind" fn calibrate(state: *mut lua_State) -> c_int {
    unsafe extern "C-unwind" fn nothing(_: *mut lua_State) -> c_int {
        0
    }
    // SAFETY: called by Lua, nothing pushed yet; the new thread is the one
    // value pushed here (the new thread's own stack starts with more than
    // the one function pushed on it).
    let _thread = Room::<1>::on_entry();
    let mut thread = std::ptr::null_mut();
    let blocks = recording(state, || thread = ffi::lua_newthread(state));
    let shim = shim_of(state);
    if let Some(&(_, size)) = blocks
        .iter()
        .find(|&&(block, size)| (block..block + size).contains(&(thread as usize)))
    {
        shim.thread_size.set(size);
        shim.vm.track_watch_epoch();
    }
    ffi::lua_pushcfunction(thread, nothing);
    let blocks = recording(state, || ffi::lua_call(thread, 0, 0));
    if let [(_, size)] = blocks[..] {
        shim.watched_size.set(size);
    }
    0
}

/// Whether `state`'s VM still allocates through our shim, which hears of
/// every thread free (a host may put its own allocator in later).
///
/// # Safety
/// `state` is alive and used by the calling thread.
#[inline]
pub unsafe fn is_wrapped(state: *mut lua_State) -> bool {
    ffi::lua_getallocf(state, ptr::null_mut()) as *const () == shim_alloc as *const ()
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
