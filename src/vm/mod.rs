//! Per-VM state: the slots of a VM's targets, behind one lock, and the
//! lifetime argument that makes touching a `lua_State` from another OS thread
//! sound. Beside this file: corowatch's chain on the VM, without the lock
//! (`chain.rs`), and what the hook decides when it fires (`decide.rs`).
//!
//! # Why a slot's `lua_State` pointer is never dangling
//!
//! Another OS thread calls `lua_sethook` on a target's state only while
//! holding the VM lock and only if the slot's pointer is non-null and the VM
//! is not closed. Every way a state can be freed nulls the pointer (under the
//! same lock) before the memory goes:
//!
//! - Main state: `lua_close` runs all finalizers before freeing anything. The
//!   VM's guard in the Lua registry (`crate::state`) is finalized there
//!   and closes the VM.
//! - Coroutine, Lua 5.2–5.4: its guard (in a weak-keyed table) has the thread
//!   as its user value. That is an ephemeron: the guard is collected with the
//!   thread, and because a value reachable from an object being finalized is
//!   kept alive until its finalizer has run, the thread outlives the guard's
//!   finalizer, which nulls the slot.
//! - Coroutine, Lua 5.1: there are no ephemerons, and a thread can be swept a
//!   whole cycle before its guard's finalizer runs. The VM's allocator is
//!   wrapped ([`crate::allocator`]) and nulls the slot when the thread's own
//!   memory block is freed, before passing the free on.
//! - Coroutine, LuaJIT: interrupts never touch it from another thread.
//!   Hooks are global to a LuaJIT VM, so they arm the VM through its anchor
//!   thread, which lives until `lua_close`.
//! - Threads on corowatch's chain (any version): the watchdog arms them
//!   while the chain names them, so each is alive until popped. A thread
//!   that runs, or waits in a resume (a "normal" coroutine), is alive:
//!   Lua requires whoever resumed it to hold it. An entry resumed by the
//!   patched resume's own `lua_resume` stops running only by returning
//!   into that call, which pops it first. Every other entry (a root the
//!   coroutine watched itself into, a resumer the chain did not see being
//!   resumed, a coroutine resumed through the original resume) can stop
//!   running unseen, and is anchored in the VM's anchors table before the
//!   chain names it, until the `leave` after it is popped (see
//!   [`crate::watch::Found`]). So a thread that yielded through the
//!   original resume, left on top until the next patched resume or hook
//!   repairs the chain, is still a live state, armed for when it runs
//!   again.
//!
//! The hook compares the running state with the slot's pointer only on the
//! running thread itself, where the state is alive by definition.

use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};

use dashmap::DashMap;
use mlua::ffi::{self, lua_State};

use crate::arming::{Arming, HookArming, Side};
use crate::barrier;
use crate::clock::{self, Nanos};
use crate::key_hash::{KeyHasher, KeyMap};
use crate::mirror::ChainMirror;
use crate::owner_only::OwnerOnly;
use crate::state_ptr::StatePtr;
use crate::watch::{Event, Locate};
use crate::watchdog::Backoff;

mod chain;
mod decide;
#[cfg(feature = "luajit")]
mod probe;

#[cfg(feature = "luajit")]
use chain::hook_horizon;
use chain::OwnerSide;
#[cfg(feature = "luajit")]
pub use probe::Registered;

/// An interruptible id. Never reused within a process (see
/// [`crate::registry`], which hands them out).
pub type Id = u64;

/// Where the coroutine a dispatch probe names is, as the hook finds it
/// (LuaJIT; see [`crate::probe`]).
#[derive(Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "luajit"), allow(dead_code))]
pub enum ProbeTarget {
    /// Running, or "normal" (it resumed the running thread): it is killed.
    Runs,
    /// Suspended or dead: the delivery is over, or a loop cut short left
    /// the probe behind.
    Gone,
    /// Marked failed but with frames: inside an `xpcall` message handler
    /// (LuaJIT sets LUA_ERRERR while one runs), from which it resumed the
    /// running thread, or dead from an error in one. Timed again.
    Unsure,
}

/// What the hook does once it has looked at the pending interrupts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// An mtint interrupt for the thread with this id; `handlers`: whether
    /// any interrupt handler was ever set in the VM (if not, none is
    /// looked for).
    Deliver {
        id: Id,
        handlers: bool,
    },
    /// A corowatch event for the watched coroutine at this chain depth,
    /// found there.
    Watch(Event, usize, Locate),
    /// LuaJIT: the kill of the coroutine a dispatch probe names (the
    /// probe at this index: see [`crate::probe`]).
    #[cfg(feature = "luajit")]
    Probe(usize),
}

/// What an interrupt asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Pending {
    None,
    /// Deliver once, then disarm.
    Once,
    /// Deliver at every operation until cleared.
    Sticky,
}

/// What `mtint.interrupt` was asked to do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Request {
    Once,
    Sticky,
    Clear,
}

/// The mutable part of a target.
struct Slot {
    state: StatePtr,
    pending: Pending,
    /// Whether a re-arm is queued with the watchdog (at most one at a time).
    rearm_queued: bool,
}

struct VmInner {
    closed: bool,
    /// A thread pinned in the registry until `lua_close`: a handle on the VM
    /// for calls that act on the whole VM (LuaJIT's global hook, the 5.1
    /// allocator).
    anchor: StatePtr,
    slots: KeyMap<Id, Slot>,
    /// The id of each live slot's thread, by its address: how the hook
    /// finds the running thread's slot without a Lua table lookup.
    ids_by_state: KeyMap<usize, Id>,
    /// Set once an interrupt handler was set in this VM: until then the
    /// hook does not look for one.
    handlers_used: bool,
    /// Set while another OS thread writes a hook of this VM (shared with
    /// [`Vm::frame_freed`]; see there).
    writing_afar: Arc<AtomicBool>,
    /// How many live slots have an interrupt pending (shared with
    /// [`Vm::has_pending_interrupts`], which reads it without the lock).
    pending: Arc<AtomicUsize>,
    arming: Arming,
    /// While the chain needs the hook, the watchdog arms it again after
    /// the watchdog's backoff: the running thread can undo an arming
    /// (LuaJIT restores its hook mask after running a finalizer; 5.4 can
    /// clear the trap just set), and a kill must not wait forever.
    retry: Backoff,
    /// The deadline whose arming the watchdog timed last (see
    /// [`crate::watchdog::note_lateness`]): its re-arms are late on
    /// purpose, and are not timed.
    lateness_timed_for: Nanos,
    /// Lua 5.1 and LuaJIT: memory block of each coroutine with an id -> its id.
    #[cfg(any(feature = "lua51", feature = "luajit"))]
    blocks: KeyMap<usize, Id>,
    /// Lua 5.1 and LuaJIT: distance from a thread's memory block to its `lua_State`,
    /// once the allocator is wrapped; `None` if it could not be.
    #[cfg(any(feature = "lua51", feature = "luajit"))]
    block_offset: Option<usize>,
    /// LuaJIT: the dispatch probes of this VM (see [`crate::probe`]).
    #[cfg(feature = "luajit")]
    probes: Vec<crate::probe::Probe>,
    /// LuaJIT: whether the watchdog samples them (one queued sample).
    #[cfg(feature = "luajit")]
    sampling: bool,
}

/// One Lua VM (a main state and all its coroutines).
pub struct Vm {
    key: usize,
    me: Weak<Vm>,
    /// corowatch's chain, changed without the lock by the VM's own thread
    /// (see [`crate::mirror`] for the handshakes).
    owner: OwnerOnly<OwnerSide>,
    /// What the owner publishes of the chain, for the watchdog and for its
    /// own lock-free checks (the patched resume and yield).
    mirror: ChainMirror,
    /// Moves whenever the watch of a coroutine may have changed: a watch
    /// set, or a thread freed (then another can take its address). 0:
    /// the VM cannot tell (thread frees not seen). Only the
    /// VM's own thread writes it.
    watch_epoch: AtomicU64,
    /// How many of its targets have an interrupt pending (written under the
    /// lock, read without it by LuaJIT's patched resume).
    #[cfg(feature = "luajit")]
    pending: Arc<AtomicUsize>,
    /// Set while another OS thread writes a hook of this VM.
    #[cfg(not(any(feature = "lua51", feature = "luajit")))]
    writing_afar: Arc<AtomicBool>,
    /// Set once `lua_close` finalized the VM's guard: read without the lock
    /// by the gates (see [`crate::gate`]).
    closed: AtomicBool,
    /// LuaJIT: where the VM's own OS thread is recorded and other threads
    /// ask it for the hook (see [`crate::signal`]); `None` if no cell was
    /// left.
    #[cfg(feature = "luajit")]
    cell: Option<&'static crate::signal::Cell>,
    inner: Mutex<VmInner>,
}

/// Live VMs by the address of their registry table, which is unique among
/// live VMs and constant for a VM's life. The hook finds its VM here, at
/// every event while it chains the user's hook: the key is hashed cheaply.
static VMS: LazyLock<DashMap<usize, Arc<Vm>, BuildHasherDefault<KeyHasher>>> =
    LazyLock::new(DashMap::default);

/// The key of the VM that `state` belongs to.
///
/// # Safety
/// `state` must be alive and used by the calling OS thread.
pub unsafe fn registry_key(state: *mut lua_State) -> usize {
    ffi::lua_topointer(state, ffi::LUA_REGISTRYINDEX) as usize
}

/// The VM of a running state, if it has one.
///
/// # Safety
/// As for [`registry_key`].
pub unsafe fn of_state(state: *mut lua_State) -> Option<Arc<Vm>> {
    let key = registry_key(state);
    of_key(key)
}

pub fn of_key(key: usize) -> Option<Arc<Vm>> {
    let vm = VMS.get(&key).map(|entry| entry.value().clone());
    vm
}

/// Whether `state`, which is not the running thread, no longer runs: it
/// yielded, returned or died (through the original resume, unseen by the
/// chain). A thread that resumed the running one is "normal": it has a frame.
///
/// # Safety
/// `state` is alive and belongs to the VM the calling OS thread runs.
unsafe fn has_stopped(state: StatePtr) -> bool {
    if ffi::lua_status(state.0) != ffi::LUA_OK {
        return true; // suspended, or dead by an error
    }
    let mut ar = std::mem::MaybeUninit::<ffi::lua_Debug>::zeroed();
    ffi::lua_getstack(state.0, 0, ar.as_mut_ptr()) == 0
}

/// Registers a new VM.
///
/// # Safety
/// `anchor` is a thread of the VM with this `key`, run by the calling OS
/// thread, and stays alive until [`Vm::close`]: the watchdog and other
/// threads arm it from afar.
pub unsafe fn create(key: usize, anchor: *mut lua_State) -> Arc<Vm> {
    barrier::init();
    let pending = Arc::new(AtomicUsize::new(0));
    let writing_afar = Arc::new(AtomicBool::new(false));
    #[allow(unused_mut)]
    let mut arming = Arming::default();
    // The VM is created on its own thread (at `require`), which the cell
    // records.
    #[cfg(feature = "luajit")]
    let cell = crate::signal::claim(anchor);
    #[cfg(feature = "luajit")]
    arming.set_cell(cell);
    let vm = Arc::new_cyclic(|me| Vm {
        #[cfg(feature = "luajit")]
        cell,
        #[cfg(not(any(feature = "lua51", feature = "luajit")))]
        writing_afar: writing_afar.clone(),
        #[cfg(feature = "luajit")]
        pending: pending.clone(),
        key,
        me: me.clone(),
        owner: OwnerOnly::new(OwnerSide::default()),
        mirror: ChainMirror::default(),
        watch_epoch: AtomicU64::new(0),
        closed: AtomicBool::new(false),
        inner: Mutex::new(VmInner {
            closed: false,
            anchor: StatePtr(anchor),
            slots: KeyMap::default(),
            ids_by_state: KeyMap::default(),
            handlers_used: false,
            pending: pending.clone(),
            writing_afar,
            arming,
            retry: Backoff::first(),
            lateness_timed_for: clock::NEVER,
            #[cfg(any(feature = "lua51", feature = "luajit"))]
            blocks: KeyMap::default(),
            #[cfg(any(feature = "lua51", feature = "luajit"))]
            block_offset: None,
            #[cfg(feature = "luajit")]
            probes: Vec::new(),
            #[cfg(feature = "luajit")]
            sampling: false,
        }),
    });
    VMS.insert(key, vm.clone());
    vm
}

impl Vm {
    fn lock(&self) -> MutexGuard<'_, VmInner> {
        // A panic while holding the lock leaves plain data behind; carry on.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether any target of this VM has an interrupt pending.
    #[cfg(feature = "luajit")]
    pub fn has_pending_interrupts(&self) -> bool {
        self.pending.load(Ordering::Relaxed) > 0
    }

    /// LuaJIT: the running thread is about to resume the coroutine with
    /// this id (read from the weak `thread -> id` table); if an interrupt
    /// is pending for it, arm the (VM-global) hook so that it fires at the
    /// coroutine's first instruction. Polling alone can miss a coroutine
    /// that runs few instructions per resume.
    #[cfg(feature = "luajit")]
    pub fn arm_for_resume(&self, id: Id) {
        let mut inner = self.lock();
        if inner
            .live_slot(id)
            .is_some_and(|slot| slot.pending != Pending::None)
        {
            inner.arm(id, Side::Owner);
        }
    }

    /// Called on every entry into the library on the VM's own OS thread
    /// (the hook, the gates, the patched resume and yield): LuaJIT records
    /// the thread for the signal that asks it for the hook. One load and
    /// compare while the thread does not change.
    #[inline]
    pub fn note_owner(&self) {
        // A closed VM gave its cell back (finalizers still run its
        // functions during `lua_close`): the cell may be another VM's now.
        #[cfg(feature = "luajit")]
        if let Some(cell) = self.cell.filter(|_| !self.is_closed()) {
            cell.note_owner();
        }
    }

    /// Whether `lua_close` has begun finalizing this VM.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The anchor thread, or `None` once the VM is closed.
    pub fn anchor(&self) -> Option<*mut lua_State> {
        let inner = self.lock();
        (!inner.closed).then_some(inner.anchor.0)
    }

    /// Whether `id` still names the thread `state`: its death was not
    /// reported. A coroutine that a finalizer brought back (Lua 5.2–5.4)
    /// outlives its guard, whose finalizer ended its id.
    pub fn names(&self, id: Id, state: *mut lua_State) -> bool {
        self.lock()
            .slots
            .get(&id)
            .is_some_and(|slot| slot.state == StatePtr(state))
    }

    /// Starts tracking a target whose thread is `state`.
    ///
    /// # Safety
    /// `state` is a live thread of this VM whose death will be reported
    /// (its guard's finalizer, or on 5.1 its block's free) before its memory
    /// is reused: until then other threads arm it.
    pub unsafe fn add(&self, id: Id, state: *mut lua_State) {
        let mut inner = self.lock();
        // An older entry at this address was a thread whose death was
        // reported already (as promised), and is being replaced; on
        // LuaJIT it may not have been, and the map is not read there
        // (see `slot_of_state`).
        inner.ids_by_state.insert(state as usize, id);
        inner.slots.insert(
            id,
            Slot {
                state: StatePtr(state),
                pending: Pending::None,
                rearm_queued: false,
            },
        );
    }

    /// An interrupt handler is being set in this VM: from now on the hook
    /// looks for one before it raises.
    pub fn note_handler_set(&self) {
        self.lock().handlers_used = true;
    }

    /// Lua 5.1 and LuaJIT: the allocator is wrapped; thread blocks start `offset`
    /// bytes before their `lua_State`.
    #[cfg(any(feature = "lua51", feature = "luajit"))]
    pub fn set_block_offset(&self, offset: usize) {
        self.lock().block_offset = Some(offset);
    }

    /// Lua 5.1 and LuaJIT: remembers the memory block of a coroutine's state. Returns
    /// false if thread frees cannot be seen in this VM.
    ///
    /// # Safety
    /// `state` is a live coroutine of this VM (its block is where the
    /// allocator will free it).
    #[cfg(any(feature = "lua51", feature = "luajit"))]
    pub unsafe fn watch_block(&self, id: Id, state: *mut lua_State) -> bool {
        let mut inner = self.lock();
        let Some(offset) = inner.block_offset else {
            return false;
        };
        inner
            .blocks
            .insert((state as usize).wrapping_sub(offset), id);
        true
    }

    /// Lua 5.1 and LuaJIT: the allocator is freeing `block`; if it is a target's
    /// thread, that target is dead from now on.
    #[cfg(any(feature = "lua51", feature = "luajit"))]
    pub fn block_freed(&self, block: usize) {
        let mut inner = self.lock();
        if let Some(id) = inner.blocks.remove(&block) {
            inner.mark_dead(id);
        }
    }

    /// Lua 5.2–5.4: the VM's own thread is about to free a block that may
    /// be a `CallInfo` (see [`crate::allocator`]).
    ///
    /// The handshake: another OS thread writes a hook only under the VM
    /// lock, with `writing_afar` set and a SeqCst fence before its
    /// `lua_sethook` reads `L->ci`. Here a SeqCst fence comes before
    /// `writing_afar` is read. A frame is freed only once unused, that is
    /// after this thread moved `L->ci` below it, before our fence. The two
    /// fences are ordered. If ours comes first, the writer's read of
    /// `L->ci` (after its fence) sees a frame below the one freed, and its
    /// walk down the chain never reaches it. If the writer's comes first,
    /// we see the flag and wait for the lock, which the writer holds until
    /// its `lua_sethook` is over. Either way no write lands in a freed
    /// frame. The owner never frees Lua memory while it holds the VM lock
    /// itself, so the wait cannot deadlock.
    #[cfg(not(any(feature = "lua51", feature = "luajit")))]
    pub fn frame_freed(&self) {
        if cfg!(feature = "unguarded-frames") {
            return;
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.writing_afar.load(Ordering::Relaxed) {
            drop(self.lock());
        }
    }

    /// The target's thread is being collected.
    pub fn target_died(&self, id: Id) {
        let mut inner = self.lock();
        inner.mark_dead(id);
        #[cfg(any(feature = "lua51", feature = "luajit"))]
        inner.blocks.retain(|_, slot_id| *slot_id != id);
    }

    /// The target itself is gone (no guard, no interruptible object).
    pub fn forget(&self, id: Id) {
        let mut inner = self.lock();
        inner.mark_dead(id);
        inner.slots.remove(&id);
    }

    /// `lua_close` is running: nothing of this VM may be touched any more.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        self.closed.store(true, Ordering::Release);
        // On the VM's thread, under the lock: no handler touches the VM
        // after this (it waits for one that does on another thread).
        #[cfg(feature = "luajit")]
        if let Some(cell) = self.cell {
            cell.release();
            inner.arming.set_cell(None);
        }
        inner.anchor = StatePtr::DEAD;
        inner.pending.store(0, Ordering::Relaxed);
        #[cfg(feature = "luajit")]
        self.mirror.forget_probes();
        // SAFETY: `lua_close` runs this on the VM's thread (the guard's
        // finalizer), and nothing else uses the chain meanwhile.
        unsafe {
            self.owner.with(|own| {
                own.chain.clear();
                self.mirror.publish(&mut own.chain);
            })
        };
        for slot in inner.slots.values_mut() {
            slot.state = StatePtr::DEAD;
            slot.pending = Pending::None;
        }
        inner.ids_by_state.clear();
        drop(inner);
        VMS.remove_if(&self.key, |_, vm| std::ptr::eq(&**vm, self));
    }

    /// Applies an interrupt request, made on this VM's own thread or from
    /// another. Returns false if the target is dead, and whether the
    /// watchdog should re-arm it later.
    pub fn interrupt(&self, id: Id, request: Request, side: Side) -> (bool, bool) {
        let mut inner = self.lock();
        let Some(slot) = inner.live_slot(id) else {
            return (false, false);
        };
        let before = slot.pending;
        slot.pending = match (request, before) {
            (Request::Clear, _) => Pending::None,
            (Request::Sticky, _) | (Request::Once, Pending::Sticky) => Pending::Sticky,
            (Request::Once, _) => Pending::Once,
        };
        let after = slot.pending;
        let queue_rearm = after != Pending::None && !slot.rearm_queued;
        slot.rearm_queued |= queue_rearm;
        inner.count_transition(before, after);
        if after == Pending::None {
            inner.disarm(id, side, &self.mirror);
        } else {
            inner.arm(id, side);
        }
        (true, queue_rearm)
    }

    /// Called by the watchdog: arms the target again if its interrupt is
    /// still pending (a racing thread may have undone the first arming).
    /// Returns whether it should be called again later.
    pub fn rearm(&self, id: Id) -> bool {
        let mut inner = self.lock();
        let pending = match inner.live_slot(id) {
            Some(slot) => {
                let pending = slot.pending != Pending::None;
                slot.rearm_queued = pending;
                pending
            }
            None => {
                if let Some(slot) = inner.slots.get_mut(&id) {
                    slot.rearm_queued = false;
                }
                false
            }
        };
        if pending {
            inner.arm(id, Side::Afar);
        }
        pending
    }
}

impl VmInner {
    /// The slot of a live target, if any.
    fn live_slot(&mut self, id: Id) -> Option<&mut Slot> {
        if self.closed {
            return None;
        }
        self.slots.get_mut(&id).filter(|slot| slot.state.is_alive())
    }

    fn count_transition(&mut self, before: Pending, after: Pending) {
        match (before == Pending::None, after == Pending::None) {
            (true, false) => _ = self.pending.fetch_add(1, Ordering::Relaxed),
            (false, true) => _ = self.pending.fetch_sub(1, Ordering::Relaxed),
            _ => {}
        }
    }

    /// Marks a target dead: nothing may touch its thread any more.
    fn mark_dead(&mut self, id: Id) {
        if let Some(slot) = self.slots.get_mut(&id) {
            let before = slot.pending;
            let state = slot.state;
            slot.state = StatePtr::DEAD;
            slot.pending = Pending::None;
            self.count_transition(before, Pending::None);
            if state.is_alive() {
                self.arming.forget(state.0);
                let key = state.0 as usize;
                if self.ids_by_state.get(&key) == Some(&id) {
                    self.ids_by_state.remove(&key);
                }
            }
        }
    }

    /// The slot of the live thread `state`, if it has an id.
    ///
    /// PUC Lua reports a thread's death (its guard's finalizer; on 5.1 its
    /// block's free) before its memory can be reused, so the map by
    /// address names live threads only. LuaJIT reports it a collection
    /// after it frees the thread (no ephemerons, no allocator watch), and
    /// a new thread at that address would find the dead one's slot: there
    /// the id comes from `id_of_state`, a lookup in the weak `thread -> id`
    /// table, which the collector clears before it frees the thread.
    fn slot_of_state(
        &mut self,
        state: *mut lua_State,
        id_of_state: impl FnOnce() -> Option<Id>,
    ) -> Option<(Id, &mut Slot)> {
        #[cfg(feature = "luajit")]
        let id = id_of_state()?;
        #[cfg(not(feature = "luajit"))]
        let id = {
            let _ = id_of_state;
            *self.ids_by_state.get(&(state as usize))?
        };
        let slot = self.slots.get_mut(&id)?;
        (slot.state.0 == state).then_some((id, slot))
    }

    /// Installs the delivery hook for a live target.
    fn arm(&mut self, id: Id, side: Side) {
        let Some(slot) = self.live_slot(id) else {
            return;
        };
        #[cfg(feature = "luajit")]
        {
            let _ = slot;
            self.arm_vm(side);
        }
        #[cfg(not(feature = "luajit"))]
        {
            let state = slot.state.0;
            // SAFETY: a live slot's state is alive (module comment). We
            // hold the VM lock.
            let arming = &mut self.arming;
            writing_from(side, &self.writing_afar, || unsafe {
                arming.arm(state, side)
            });
        }
    }

    /// LuaJIT: arms the VM-wide hook, through the anchor (for an
    /// interrupt, the chain, or a dispatch probe).
    #[cfg(feature = "luajit")]
    fn arm_vm(&mut self, side: Side) {
        let anchor = self.anchor;
        if !anchor.is_alive() {
            return;
        }
        let VmInner {
            arming,
            writing_afar,
            ..
        } = self;
        // SAFETY: the anchor lives until `close`, which we are not past;
        // we hold the VM lock.
        writing_from(side, writing_afar, || unsafe { arming.arm(anchor.0, side) });
    }

    /// Removes the delivery hook of a target whose interrupt was cleared,
    /// unless something else still needs it there.
    fn disarm(&mut self, id: Id, side: Side, mirror: &ChainMirror) {
        let Some(slot) = self.live_slot(id) else {
            return;
        };
        #[cfg(not(feature = "luajit"))]
        let (state, needed) = {
            let state = slot.state.0;
            let watch = mirror.top() == state;
            (state, watch && mirror.needs_hook(clock::now()))
        };
        #[cfg(feature = "luajit")]
        let (state, needed) = {
            let _ = slot;
            (
                self.anchor.0,
                self.pending.load(Ordering::Relaxed) > 0
                    || mirror.needs_hook(hook_horizon(clock::now()))
                    || self.probe_due(),
            )
        };
        if !needed && self.arming.is_armed(state) {
            // SAFETY: as in `arm`.
            let arming = &mut self.arming;
            writing_from(side, &self.writing_afar, || unsafe {
                arming.disarm(state, side)
            });
        }
    }
}

/// A thread left the chain: our hook comes off it unless an interrupt
/// waits there (see [`HookArming::release`]).
///
/// # Safety
/// `state` is alive, of the VM the calling OS thread runs, which holds the
/// VM lock.
unsafe fn release(
    arming: &mut Arming,
    slots: &KeyMap<Id, Slot>,
    ids_by_state: &KeyMap<usize, Id>,
    state: StatePtr,
) {
    arming.release(state.0, || {
        ids_by_state
            .get(&(state.0 as usize))
            .and_then(|id| slots.get(id))
            .is_some_and(|slot| slot.state == state && slot.pending != Pending::None)
    });
}

/// Runs `write`, a `lua_sethook` by `side`; from another OS thread, with
/// `writing_afar` set around it and a SeqCst fence before it (the handshake
/// of [`Vm::frame_freed`]). The caller holds the VM lock.
fn writing_from(side: Side, writing_afar: &AtomicBool, write: impl FnOnce()) {
    if side == Side::Owner {
        return write();
    }
    writing_afar.store(true, Ordering::Relaxed);
    std::sync::atomic::fence(Ordering::SeqCst);
    write();
    writing_afar.store(false, Ordering::Release);
}
