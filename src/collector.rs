//! Lua 5.1 and LuaJIT: holding the collector for the length of a native
//! call, through the collector's threshold (see [`crate::gate`] for why).
//!
//! - 5.1 has no `LUA_GCISRUNNING`: `lua_gc` cannot say whether the user
//!   stopped the collector, so STOP/RESTART around a call would restart one
//!   the user stopped. The threshold itself says it, and saving and
//!   restoring it keeps the user's state exactly.
//! - LuaJIT can say, but RESTART sets the threshold to the byte count: a
//!   GC step comes due at the caller's very next allocation check, after
//!   every call. With the JIT on that check is often a trace exit, where
//!   LuaJIT runs the step unprotected and a finalizer's error crashes its
//!   unwinder (LuaJIT's own bug: README, Limitations); a step forced there
//!   after every call made that crash likely in a loop of calls. Putting
//!   the saved threshold back keeps the collector's own pace.
//!
//! The layouts (5.1.5's `lstate.h`; LuaJIT 2.1's `lj_obj.h`, 64-bit GC
//! references) are mirrored below up to the fields used, and checked
//! against the running VM once per VM ([`verify`]): the collector is held
//! this way only where every check passed.

use std::ffi::c_void;
#[cfg(feature = "lua51")]
use std::ffi::{c_char, c_int};
use std::mem::offset_of;
use std::ptr;

use mlua::ffi::{self, lua_State};

/// What `lua_gc(LUA_GCSTOP)` sets: `MAX_LUMEM` (5.1's `llimits.h`),
/// `LJ_MAX_MEM64` (LuaJIT's `lj_def.h`).
#[cfg(feature = "lua51")]
const STOPPED: usize = usize::MAX - 2;
#[cfg(feature = "luajit")]
const STOPPED: usize = 1 << 47;

/// What a held collector's threshold reads: above any byte count, so no
/// GC check ever steps, and not `STOPPED`, so a `collectgarbage("stop")`
/// made during the call is told apart from the hold and kept.
const HELD: usize = STOPPED - 1;

/// The start of 5.1's `lua_State`, up to `l_G`. (The mirrors' other
/// fields only place the ones used.)
#[cfg(feature = "lua51")]
#[allow(dead_code)]
#[repr(C)]
struct State {
    next: *mut c_void, // CommonHeader: GCObject *next; lu_byte tt, marked
    tt: u8,
    marked: u8,
    status: u8,
    top: *mut c_void,
    base: *mut c_void,
    l_g: *mut Global,
}

#[cfg(feature = "lua51")]
#[allow(dead_code)]
#[repr(C)]
struct StringTable {
    hash: *mut c_void,
    nuse: u32,
    size: c_int,
}

#[cfg(feature = "lua51")]
#[allow(dead_code)]
#[repr(C)]
struct Mbuffer {
    buffer: *mut c_char,
    n: usize,
    buffsize: usize,
}

/// The start of 5.1's `global_State`, up to `totalbytes` (`lu_mem` is
/// `size_t`).
#[cfg(feature = "lua51")]
#[allow(dead_code)]
#[repr(C)]
struct Global {
    strt: StringTable,
    frealloc: *const c_void,
    ud: *mut c_void,
    currentwhite: u8,
    gcstate: u8,
    sweepstrgc: c_int,
    rootgc: *mut c_void,
    sweepgc: *mut c_void,
    gray: *mut c_void,
    grayagain: *mut c_void,
    weak: *mut c_void,
    tmudata: *mut c_void,
    buff: Mbuffer,
    gc_threshold: usize,
    totalbytes: usize,
}

// The offsets on 64-bit Linux, as computed by hand from `lstate.h`.
#[cfg(all(feature = "lua51", target_pointer_width = "64"))]
const _: () = {
    assert!(offset_of!(State, l_g) == 32);
    assert!(offset_of!(Global, frealloc) == 16);
    assert!(offset_of!(Global, ud) == 24);
    assert!(offset_of!(Global, gc_threshold) == 112);
    assert!(offset_of!(Global, totalbytes) == 120);
};

/// The start of LuaJIT 2.1's `lua_State` with 64-bit GC references, up to
/// `glref` (`GCHeader` is `nextgc`, `marked`, `gct`).
#[cfg(feature = "luajit")]
#[allow(dead_code)]
#[repr(C)]
struct State {
    nextgc: u64,
    marked: u8,
    gct: u8,
    dummy_ffid: u8,
    status: u8,
    glref: *mut Global,
}

/// The start of LuaJIT 2.1's `global_State`, into its `GCState` (`GCSize`
/// is 64 bits with 64-bit GC references).
#[cfg(feature = "luajit")]
#[allow(dead_code)]
#[repr(C)]
struct Global {
    frealloc: *const c_void,
    ud: *mut c_void,
    totalbytes: usize,
    gc_threshold: usize,
}

// The offsets on 64-bit Linux, as computed by hand from `lj_obj.h`.
#[cfg(all(feature = "luajit", target_pointer_width = "64"))]
const _: () = {
    assert!(offset_of!(State, glref) == 16);
    assert!(offset_of!(Global, totalbytes) == 16);
    assert!(offset_of!(Global, gc_threshold) == 24);
};

/// The `global_State` of the VM that `state` belongs to.
///
/// # Safety
/// `state` is a live thread of a VM whose layout [`verify`] accepted (or
/// which `verify` is checking).
unsafe fn global(state: *mut lua_State) -> *mut Global {
    // SAFETY: per the contract, `state` points to this version's
    // `lua_State`, which starts as mirrored.
    unsafe {
        #[cfg(feature = "lua51")]
        return (*state.cast::<State>()).l_g;
        #[cfg(feature = "luajit")]
        return (*state.cast::<State>()).glref;
    }
}

/// Whether the running VM has the mirrored layout: `lua_getallocf` and the
/// byte count read the same as the mirrored fields, and STOP and RESTART
/// write the threshold where the mirror has it. The threshold is put back
/// as it was, so the collector's state is the user's.
///
/// # Safety
/// `state` is a live thread of the running VM, on the OS thread running it.
pub unsafe fn verify(state: *mut lua_State) -> bool {
    // SAFETY: this build links against this version's API, so `state` is
    // its lua_State, which starts with the mirrored fields on any build of
    // it (on LuaJIT, `glref` is a pointer with 64-bit GC references, else
    // a 32-bit word, whose read here is within the struct too); the global
    // pointer is read here, and trusted only once the checks below pass.
    let g = unsafe { global(state) };
    if g.is_null() || !g.is_aligned() {
        return false;
    }
    let mut ud = ptr::null_mut();
    // SAFETY: lua_getallocf only reads. The global pointer of a lua_State
    // points to its global_State, which is larger than the mirror (fields
    // follow the threshold), so these reads stay inside it even where a
    // patched build moved fields; whether they did is what is checked.
    let (same_alloc, total) = unsafe {
        let alloc = ffi::lua_getallocf(state, &mut ud);
        (
            (*g).frealloc == alloc as *const c_void && (*g).ud == ud,
            (*g).totalbytes,
        )
    };
    if !same_alloc {
        return false;
    }
    // SAFETY: COUNT and COUNTB only read the byte count.
    let counted = unsafe {
        ffi::lua_gc(state, ffi::LUA_GCCOUNT, 0) as usize * 1024
            + ffi::lua_gc(state, ffi::LUA_GCCOUNTB, 0) as usize
    };
    if counted != total {
        return false;
    }
    // SAFETY: the allocator and the byte count are where the mirror says,
    // so the threshold, between them, is too. RESTART and STOP only write
    // the threshold (no GC step, no allocation: the byte count stays), and
    // writing back what was read restores the user's collector state.
    unsafe {
        let saved = (*g).gc_threshold;
        ffi::lua_gc(state, ffi::LUA_GCRESTART, 0);
        let restarted = (*g).gc_threshold == total;
        ffi::lua_gc(state, ffi::LUA_GCSTOP, 0);
        let stopped = (*g).gc_threshold == STOPPED;
        (*g).gc_threshold = saved;
        restarted && stopped
    }
}

/// Holds the collector: no GC step runs until [`release`]. Returns what to
/// pass to it.
///
/// # Safety
/// `state` is a live thread of a VM that [`verify`] accepted, on the OS
/// thread running it.
pub unsafe fn hold(state: *mut lua_State) -> usize {
    // SAFETY: per the contract, the layout is the mirrored one.
    unsafe {
        let g = global(state);
        let saved = (*g).gc_threshold;
        (*g).gc_threshold = HELD;
        saved
    }
}

/// Releases the hold taken by [`hold`], which returned `saved`: the
/// threshold is the user's again, unless something set it meanwhile (a
/// `collectgarbage` call from Lua code run by the call), which is kept.
/// If the call's allocations made a step due and `step` is true (the call
/// succeeded: its error, if any, is raised first), it runs here: a loop that
/// allocates only inside our calls reaches no collection check outside
/// them, and would never collect. The step may run finalizers and raise
/// their errors (from this C frame, where `pcall` catches them as from
/// any allocation, on LuaJIT too: see the module comment).
///
/// # Safety
/// As for [`hold`]; the call the hold was for has returned (a finalizer
/// may call into mlua again), and the caller's frame may be left by a
/// Lua error.
pub unsafe fn release(state: *mut lua_State, saved: usize, step: bool) {
    // SAFETY: per the contract, the layout is the mirrored one.
    let due = unsafe {
        let g = global(state);
        if (*g).gc_threshold == HELD {
            (*g).gc_threshold = saved;
        }
        (*g).totalbytes >= (*g).gc_threshold
    };
    if due && step {
        // SAFETY: `state` runs on this OS thread; the step is what the
        // next collection check would take, with data 0 (no extra work).
        unsafe { ffi::lua_gc(state, ffi::LUA_GCSTEP, 0) };
    }
}
