//! Per-VM state: the slots of a VM's targets, behind one lock, and the
//! lifetime argument that makes touching a `lua_State` from another OS thread
//! sound.
//!
//! # Why a slot's `lua_State` pointer is never dangling
//!
//! Another OS thread calls `lua_sethook` on a target's state only while
//! holding the VM lock and only if the slot's pointer is non-null and the VM
//! is not closed. Every way a state can be freed nulls the pointer (under the
//! same lock) before the memory goes:
//!
//! - Main state: `lua_close` runs all finalizers before freeing anything. The
//!   [`VmGuard`] in the Lua registry is finalized there and closes the VM.
//! - Coroutine, Lua 5.2–5.4: its guard (in a weak-keyed table) has the thread
//!   as its user value. That is an ephemeron: the guard is collected with the
//!   thread, and because a value reachable from an object being finalized is
//!   kept alive until its finalizer has run, the thread outlives the guard's
//!   finalizer, which nulls the slot.
//! - Coroutine, Lua 5.1: there are no ephemerons, and a thread can be swept a
//!   whole cycle before its guard's finalizer runs. The VM's allocator is
//!   wrapped ([`crate::thread_free`]) and nulls the slot when the thread's own
//!   memory block is freed, before passing the free on.
//! - Coroutine, LuaJIT: never touched from another thread. Hooks are global
//!   to a LuaJIT VM, so interrupts arm the VM through its anchor thread,
//!   which lives until `lua_close`.
//!
//! The hook compares the running state with the slot's pointer only on the
//! running thread itself, where the state is alive by definition.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use dashmap::DashMap;
use mlua::ffi::{self, lua_State};

use crate::hook::{self, SavedHook, Verdict};
use crate::registry::Id;

/// A raw `lua_State` pointer that may cross OS threads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StatePtr(pub *mut lua_State);

// SAFETY: the pointer is only dereferenced (through the Lua C API) under the
// VM lock while the slot says the state is alive; see the module comment.
unsafe impl Send for StatePtr {}

impl StatePtr {
    pub const DEAD: StatePtr = StatePtr(std::ptr::null_mut());

    pub fn is_alive(self) -> bool {
        !self.0.is_null()
    }
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
    /// PUC Lua: whether our hook is installed on `state`, and what it replaced.
    #[cfg(not(feature = "luajit"))]
    armed: bool,
    #[cfg(not(feature = "luajit"))]
    saved: Option<SavedHook>,
}

struct VmInner {
    closed: bool,
    /// A thread pinned in the registry until `lua_close`: a handle on the VM
    /// for calls that act on the whole VM (LuaJIT's global hook, the 5.1
    /// allocator).
    anchor: StatePtr,
    slots: HashMap<Id, Slot>,
    /// How many live slots have an interrupt pending.
    pending: usize,
    /// LuaJIT: whether our hook is installed (globally) and what it replaced.
    #[cfg(feature = "luajit")]
    global_armed: bool,
    #[cfg(feature = "luajit")]
    global_saved: Option<SavedHook>,
    /// Lua 5.1: memory block of each watched coroutine -> its id.
    #[cfg(feature = "lua51")]
    blocks: HashMap<usize, Id>,
    /// Lua 5.1: distance from a thread's memory block to its `lua_State`,
    /// once the allocator is wrapped; `None` if it could not be.
    #[cfg(feature = "lua51")]
    block_offset: Option<usize>,
}

/// One Lua VM (a main state and all its coroutines).
pub struct Vm {
    key: usize,
    inner: Mutex<VmInner>,
}

/// Live VMs by the address of their registry table, which is unique among
/// live VMs and constant for a VM's life. The hook finds its VM here.
static VMS: LazyLock<DashMap<usize, Arc<Vm>>> = LazyLock::new(DashMap::new);

/// The key of the VM that `state` belongs to.
///
/// # Safety
/// `state` must be alive and used by the calling OS thread.
pub unsafe fn registry_key(state: *mut lua_State) -> usize {
    ffi::lua_topointer(state, ffi::LUA_REGISTRYINDEX) as usize
}

/// The VM of a running state, if it has one.
pub fn of_state(state: *mut lua_State) -> Option<Arc<Vm>> {
    // SAFETY: called from the hook, on the state's own thread.
    let key = unsafe { registry_key(state) };
    of_key(key)
}

pub fn of_key(key: usize) -> Option<Arc<Vm>> {
    let vm = VMS.get(&key).map(|entry| entry.value().clone());
    vm
}

/// Registers a new VM. `anchor` must stay alive until [`Vm::close`].
pub fn create(key: usize, anchor: *mut lua_State) -> Arc<Vm> {
    let vm = Arc::new(Vm {
        key,
        inner: Mutex::new(VmInner {
            closed: false,
            anchor: StatePtr(anchor),
            slots: HashMap::new(),
            pending: 0,
            #[cfg(feature = "luajit")]
            global_armed: false,
            #[cfg(feature = "luajit")]
            global_saved: None,
            #[cfg(feature = "lua51")]
            blocks: HashMap::new(),
            #[cfg(feature = "lua51")]
            block_offset: None,
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

    /// The anchor thread, or `None` once the VM is closed.
    #[cfg(feature = "lua51")]
    pub fn anchor(&self) -> Option<*mut lua_State> {
        let inner = self.lock();
        (!inner.closed).then_some(inner.anchor.0)
    }

    /// Starts tracking a target whose thread is `state`.
    pub fn add(&self, id: Id, state: *mut lua_State) {
        let mut inner = self.lock();
        inner.slots.insert(
            id,
            Slot {
                state: StatePtr(state),
                pending: Pending::None,
                rearm_queued: false,
                #[cfg(not(feature = "luajit"))]
                armed: false,
                #[cfg(not(feature = "luajit"))]
                saved: None,
            },
        );
    }

    /// Lua 5.1: the allocator is wrapped; thread blocks start `offset`
    /// bytes before their `lua_State`.
    #[cfg(feature = "lua51")]
    pub fn set_block_offset(&self, offset: usize) {
        self.lock().block_offset = Some(offset);
    }

    /// Lua 5.1: remembers the memory block of a coroutine's state. Returns
    /// false if thread frees cannot be seen in this VM.
    #[cfg(feature = "lua51")]
    pub fn watch_block(&self, id: Id, state: *mut lua_State) -> bool {
        let mut inner = self.lock();
        let Some(offset) = inner.block_offset else {
            return false;
        };
        inner
            .blocks
            .insert((state as usize).wrapping_sub(offset), id);
        true
    }

    /// Lua 5.1: the allocator is freeing `block`; if it is a target's
    /// thread, that target is dead from now on.
    #[cfg(feature = "lua51")]
    pub fn block_freed(&self, block: usize) {
        let mut inner = self.lock();
        if let Some(id) = inner.blocks.remove(&block) {
            inner.kill(id);
        }
    }

    /// The target's thread is being collected.
    pub fn target_died(&self, id: Id) {
        let mut inner = self.lock();
        inner.kill(id);
        #[cfg(feature = "lua51")]
        inner.blocks.retain(|_, slot_id| *slot_id != id);
    }

    /// The target itself is gone (no guard, no interruptible object).
    pub fn forget(&self, id: Id) {
        let mut inner = self.lock();
        inner.kill(id);
        inner.slots.remove(&id);
    }

    /// `lua_close` is running: nothing of this VM may be touched any more.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.anchor = StatePtr::DEAD;
        inner.pending = 0;
        for slot in inner.slots.values_mut() {
            slot.state = StatePtr::DEAD;
            slot.pending = Pending::None;
        }
        drop(inner);
        VMS.remove_if(&self.key, |_, vm| std::ptr::eq(&**vm, self));
    }

    /// Applies an interrupt request. Returns false if the target is dead, and
    /// whether the watchdog should re-arm it later.
    pub fn interrupt(&self, id: Id, request: Request) -> (bool, bool) {
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
            inner.disarm(id);
        } else {
            inner.arm(id);
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
            inner.arm(id);
        }
        pending
    }

    /// The hook fired on `state`, whose id (if any) is `id`. Decides whether
    /// to deliver, and leaves the hook armed only while something is pending.
    pub fn on_hook(&self, state: *mut lua_State, id: Option<Id>) -> Verdict {
        let mut inner = self.lock();
        let mut verdict = Verdict::Continue;
        let mut keep_armed = false;
        if let Some(id) = id {
            if let Some(slot) = inner.slots.get_mut(&id) {
                if slot.state.0 == state {
                    let before = slot.pending;
                    if before != Pending::None {
                        verdict = Verdict::Deliver(id);
                    }
                    if before == Pending::Once {
                        slot.pending = Pending::None;
                    }
                    keep_armed = slot.pending == Pending::Sticky;
                    let after = slot.pending;
                    inner.count_transition(before, after);
                }
            }
        }
        inner.settle_hook(state, id, keep_armed);
        verdict
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
            (true, false) => self.pending += 1,
            (false, true) => self.pending -= 1,
            _ => {}
        }
    }

    /// Marks a target dead: nothing may touch its thread any more.
    fn kill(&mut self, id: Id) {
        if let Some(slot) = self.slots.get_mut(&id) {
            let before = slot.pending;
            slot.state = StatePtr::DEAD;
            slot.pending = Pending::None;
            #[cfg(not(feature = "luajit"))]
            {
                slot.armed = false;
            }
            self.count_transition(before, Pending::None);
        }
    }

    /// Installs the delivery hook for a live target.
    fn arm(&mut self, id: Id) {
        #[cfg(not(feature = "luajit"))]
        if let Some(slot) = self.live_slot(id) {
            // SAFETY: the slot is live and we hold the VM lock (module comment).
            unsafe { hook::arm(slot.state.0, &mut slot.saved) };
            slot.armed = true;
        }
        #[cfg(feature = "luajit")]
        if self.live_slot(id).is_some() {
            // SAFETY: the anchor lives until `close`, which we are not past.
            unsafe { hook::arm(self.anchor.0, &mut self.global_saved) };
            self.global_armed = true;
        }
    }

    /// Removes the delivery hook of a target whose interrupt was cleared.
    fn disarm(&mut self, id: Id) {
        #[cfg(not(feature = "luajit"))]
        if let Some(slot) = self.live_slot(id) {
            if slot.armed {
                // SAFETY: as in `arm`.
                unsafe { hook::disarm(slot.state.0, slot.saved.take()) };
                slot.armed = false;
            }
        }
        #[cfg(feature = "luajit")]
        {
            let _ = id;
            if self.pending == 0 && self.global_armed && !self.closed {
                // SAFETY: as in `arm`.
                unsafe { hook::disarm(self.anchor.0, self.global_saved.take()) };
                self.global_armed = false;
            }
        }
    }

    /// After the hook ran on `state` (the running thread): keep, relax or
    /// remove it.
    fn settle_hook(&mut self, state: *mut lua_State, id: Option<Id>, keep_armed: bool) {
        if keep_armed {
            return;
        }
        #[cfg(not(feature = "luajit"))]
        {
            // Per-state hooks: only this state's own pending interrupts count.
            // A state without a slot got our hook by inheritance (lua_newthread
            // copies the creator's hook); it had no hook of its own to restore.
            let saved = match id.and_then(|id| self.slots.get_mut(&id)) {
                Some(slot) if slot.state.0 == state => {
                    slot.armed = false;
                    slot.saved.take()
                }
                _ => None,
            };
            // SAFETY: `state` is the running thread, we are in its hook.
            unsafe { hook::disarm(state, saved) };
        }
        #[cfg(feature = "luajit")]
        {
            let _ = id;
            // SAFETY: `state` is the running thread, we are in its hook; the
            // hook is global, so this acts on the whole VM, as intended.
            unsafe {
                if self.pending == 0 {
                    hook::disarm(state, self.global_saved.take());
                    self.global_armed = false;
                } else {
                    hook::poll_lazily(state);
                }
            }
        }
    }
}

/// Guard kept in the Lua registry: finalized by `lua_close`, it closes the VM.
pub struct VmGuard(pub Arc<Vm>);

impl Drop for VmGuard {
    fn drop(&mut self) {
        #[cfg(feature = "lua51")]
        if let Some(anchor) = self.0.anchor() {
            // SAFETY: lua_close runs finalizers before freeing any state, so
            // the anchor is alive; this runs on the closing thread.
            unsafe { crate::thread_free::uninstall(anchor) };
        }
        self.0.close();
    }
}

impl mlua::UserData for VmGuard {}
