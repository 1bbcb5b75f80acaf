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

use std::collections::HashMap;
use std::ffi::c_int;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use mlua::ffi::{self, lua_Hook, lua_State};

use crate::arming::{Arming, HookArming, Need, Side};
use crate::barrier;
use crate::clock::{self, Nanos, NEVER};
use crate::mirror::ChainMirror;
use crate::owner_only::OwnerOnly;
use crate::state_ptr::StatePtr;
use crate::watch::{Chain, Event, LeftChain, Locate, Plan, Watch, WatchAnchors};
use crate::watchdog::{self, Alarm, Backoff};

/// An interruptible id. Never reused within a process (see
/// [`crate::registry`], which hands them out).
pub type Id = u64;

/// What the hook does once it has looked at the pending interrupts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    /// An mtint interrupt for the thread with this id.
    Deliver(Id),
    /// A corowatch event for the watched coroutine at this chain depth,
    /// found there.
    Watch(Event, usize, Locate),
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
    slots: HashMap<Id, Slot>,
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
    /// Lua 5.1: memory block of each watched coroutine -> its id.
    #[cfg(feature = "lua51")]
    blocks: HashMap<usize, Id>,
    /// Lua 5.1: distance from a thread's memory block to its `lua_State`,
    /// once the allocator is wrapped; `None` if it could not be.
    #[cfg(feature = "lua51")]
    block_offset: Option<usize>,
}

/// How long before a watch's deadline the hook goes on (LuaJIT). There
/// another OS thread asks for it with a signal (see [`crate::signal`]),
/// whose delivery took 30–80 µs on this kind of machine: armed that early,
/// the hook looks at the clock at every instruction for the last stretch,
/// and delivers at the deadline itself. PUC Lua writes the hook from the
/// watchdog at the deadline.
const HOOK_LEAD: Duration = if cfg!(feature = "luajit") {
    Duration::from_micros(150)
} else {
    Duration::ZERO
};

/// [`HOOK_LEAD`] on the chain's clock.
const HOOK_LEAD_NANOS: Nanos = HOOK_LEAD.as_nanos() as Nanos;

/// When the hook must be on for a deadline.
fn hook_time(deadline: Nanos) -> Nanos {
    if deadline == NEVER {
        return NEVER;
    }
    deadline.saturating_sub(HOOK_LEAD_NANOS)
}

/// The deadlines that need the hook on at `now`: those up to `now` plus
/// the hook's lead.
fn hook_horizon(now: Nanos) -> Nanos {
    now.saturating_add(HOOK_LEAD_NANOS)
}

/// What only the VM's own thread touches: corowatch's chain of running
/// coroutines, and the threads a change of it popped.
#[derive(Default)]
struct OwnerSide {
    chain: Chain,
    popped: Vec<StatePtr>,
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
    /// the VM cannot tell (LuaJIT, or thread frees not seen). Only the
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
static VMS: LazyLock<DashMap<usize, Arc<Vm>, BuildHasherDefault<AddressHasher>>> =
    LazyLock::new(DashMap::default);

/// Hashes an address by multiplying it with a large odd constant: the
/// keys are not chosen by an adversary, only spread by the allocator.
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_usize(&mut self, address: usize) {
        self.write_u64(address as u64);
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0 ^ value)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

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
            slots: HashMap::new(),
            pending: pending.clone(),
            writing_afar,
            arming,
            retry: Backoff::first(),
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

    /// Whether any target of this VM has an interrupt pending.
    #[cfg(feature = "luajit")]
    pub fn has_pending_interrupts(&self) -> bool {
        self.pending.load(Ordering::Relaxed) > 0
    }

    /// LuaJIT: the running thread is about to resume the coroutine with
    /// this id; if an interrupt is pending for it, arm the (VM-global) hook
    /// so that it fires at the coroutine's first instruction. Polling alone
    /// can miss a coroutine that runs few instructions per resume.
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
    #[cfg(not(feature = "luajit"))]
    pub fn anchor(&self) -> Option<*mut lua_State> {
        let inner = self.lock();
        (!inner.closed).then_some(inner.anchor.0)
    }

    /// Starts tracking a target whose thread is `state`.
    ///
    /// # Safety
    /// `state` is a live thread of this VM whose death will be reported
    /// (its guard's finalizer, or on 5.1 its block's free) before its memory
    /// is reused: until then other threads arm it.
    pub unsafe fn add(&self, id: Id, state: *mut lua_State) {
        let mut inner = self.lock();
        inner.slots.insert(
            id,
            Slot {
                state: StatePtr(state),
                pending: Pending::None,
                rearm_queued: false,
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
    ///
    /// # Safety
    /// `state` is a live coroutine of this VM (its block is where the
    /// allocator will free it).
    #[cfg(feature = "lua51")]
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

    /// Lua 5.1: the allocator is freeing `block`; if it is a target's
    /// thread, that target is dead from now on.
    #[cfg(feature = "lua51")]
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
        #[cfg(feature = "lua51")]
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

    /// The hook fired on `state` for `event`; `id_of_state` reads the id of
    /// `state`, if any. Decides what to deliver, and leaves the hook armed
    /// only while something needs it. Also returns the user's chained hook,
    /// if this event is one the user asked for.
    ///
    /// # Safety
    /// `state` is the running thread, inside its hook, on its OS thread.
    pub unsafe fn on_hook(
        &self,
        state: *mut lua_State,
        id_of_state: impl FnOnce() -> Option<Id>,
        at_c_function: impl FnOnce() -> bool,
        event: c_int,
    ) -> (Verdict, Option<lua_Hook>) {
        self.note_owner();
        let mut inner = self.lock();
        // SAFETY: `state` is the running thread, in its hook, on its thread.
        unsafe { inner.arming.sync(state) };
        let forward = inner.arming.forward(event);
        if inner.arming.is_resting() || at_c_function() {
            // Resting: nothing is pending. At a C function: what is pending
            // stays, and the hook stays armed for the next Lua event.
            return (Verdict::Continue, forward);
        }
        let id = id_of_state();
        let now = clock::now();
        // SAFETY: this is the VM's thread, in its hook: no other use of the
        // chain is under way (they run no Lua code).
        let verdict = unsafe {
            self.owner.with(|own| {
                let chain = &mut own.chain;
                if chain.is_below_top(state) {
                    // A Lua event in `state` (those at C functions, the
                    // patched resume's among them, were let pass above): it
                    // runs, so what the chain holds above it has returned
                    // or yielded unseen.
                    inner.change_chain(chain, |chain, gone| chain.drop_above(state, gone));
                }
                // A watch's event first: an interrupt handler that returns
                // (a sticky one runs at every instruction) must not starve a
                // kill. An interrupt left pending keeps the hook armed, for
                // the next event.
                let (verdict, interrupt_stays) = match chain.event(state, now) {
                    Some((event, depth, locate)) => (
                        Verdict::Watch(event, depth, locate),
                        inner.has_interrupt(state, id),
                    ),
                    None => inner.take_interrupt(state, id),
                };
                self.mirror.publish(chain);
                let watch_needs_hook = chain.top().is_some_and(|top| top.0 == state)
                    && chain.needs_hook(hook_horizon(now));
                inner.settle_hook(state, interrupt_stays || watch_needs_hook, chain, now);
                self.end_arming_if_settled(&inner, chain);
                self.set_alarm(&mut inner, chain.next_deadline());
                verdict
            })
        };
        (verdict, forward)
    }

    // ---- corowatch -------------------------------------------------------

    /// The watch epoch (see the field); 0 if the VM cannot tell.
    #[inline]
    pub fn watch_epoch(&self) -> u64 {
        self.watch_epoch.load(Ordering::Relaxed)
    }

    /// Every thread free is seen from now on (the allocator is wrapped and
    /// knows a thread's size).
    #[cfg(not(feature = "luajit"))]
    pub fn track_watch_epoch(&self) {
        self.watch_epoch.store(1, Ordering::Relaxed);
    }

    /// A thread's memory is being freed (the VM's own thread, in its
    /// allocator): a coroutine at that address from now on is another.
    #[cfg(not(feature = "luajit"))]
    #[inline]
    pub fn thread_freed(&self) {
        self.bump_watch_epoch();
    }

    /// The running thread set a coroutine's watch.
    pub fn watches_changed(&self) {
        self.bump_watch_epoch();
    }

    fn bump_watch_epoch(&self) {
        // Only the VM's own thread writes: no read-modify-write needed.
        let epoch = self.watch_epoch.load(Ordering::Relaxed);
        if epoch != 0 {
            self.watch_epoch
                .store(epoch.wrapping_add(1).max(1), Ordering::Relaxed);
        }
    }

    /// Whether anything watched runs in this VM (the chain is active).
    pub fn is_active(&self) -> bool {
        self.mirror.is_active()
    }

    /// Whether a killed coroutine may be running in this VM.
    pub fn has_killed(&self) -> bool {
        self.mirror.has_killed()
    }

    /// Runs `change` on the chain, from the VM's own thread, and publishes
    /// the result; each thread it pops goes to the arming record. `check`,
    /// once the chain changed, says whether to look at its deadlines, as of
    /// when: the top is armed at once if one passed, and the watchdog's
    /// alarm moves earlier if needed.
    ///
    /// Without the lock unless the watchdog armed the chain (its threads
    /// leaving then go to the arming record), a deadline passed, or the
    /// alarm must move: the handshakes are [`crate::mirror`]'s.
    ///
    /// # Safety
    /// Called on the VM's own thread, outside every other use of the chain;
    /// the threads the chain names, and those `change` pops, are held alive
    /// until it returns (on stacks or in anchors: see the module comment).
    unsafe fn change_chain<R>(
        &self,
        change: impl FnOnce(&mut Chain, &mut dyn FnMut(StatePtr)) -> R,
        check: impl FnOnce(&Chain) -> Option<Nanos>,
    ) -> R {
        if self.mirror.is_armed_afar() {
            let mut inner = self.lock();
            // SAFETY: the caller's contract.
            return unsafe {
                self.owner.with(|own| {
                    let result = inner.change_chain(&mut own.chain, change);
                    self.after_change_locked(&mut inner, &mut own.chain, check);
                    result
                })
            };
        }
        // SAFETY: the caller's contract.
        let (result, due, hook_time, popped) = unsafe {
            self.owner.with(|own| {
                let OwnerSide { chain, popped } = own;
                popped.clear();
                let result = change(chain, &mut |state| popped.push(state));
                let now = check(chain);
                let due = now.is_some_and(|now| chain.needs_hook(hook_horizon(now)));
                let earliest = self.mirror.publish(chain);
                // When the hook must be on, if the alarm is to be checked.
                let hook_time = now.map_or(NEVER, |_| hook_time(earliest));
                (result, due, hook_time, !popped.is_empty())
            })
        };
        barrier::light();
        let armed_afar = popped && self.mirror.is_armed_afar();
        let late_alarm = hook_time != NEVER && !self.mirror.alarm_by(hook_time);
        if armed_afar || due || late_alarm {
            let mut inner = self.lock();
            // SAFETY: the caller's contract; the popped threads are alive
            // and the watchdog, which held the lock, is done with them.
            unsafe {
                self.owner.with(|own| {
                    let VmInner { arming, slots, .. } = &mut *inner;
                    for &state in &own.popped {
                        release(arming, slots, state);
                    }
                    self.after_change_locked(&mut inner, &mut own.chain, |_| {
                        (due || late_alarm).then(clock::now)
                    });
                })
            };
        }
        result
    }

    /// The end of a change made under the lock: the deadlines as `check`
    /// says, and the watchdog's mark taken off once nothing it armed is
    /// left on the chain.
    fn after_change_locked(
        &self,
        inner: &mut VmInner,
        chain: &mut Chain,
        check: impl FnOnce(&Chain) -> Option<Nanos>,
    ) {
        if let Some(now) = check(chain) {
            if let Some(top) = chain.top() {
                if chain.needs_hook(hook_horizon(now)) {
                    // SAFETY: the top is the running thread, or the
                    // coroutine it is resuming (held on its stack); this is
                    // its OS thread.
                    unsafe { inner.arming.arm(top.0, Side::Owner) };
                }
            }
            self.set_alarm(inner, chain.next_deadline());
        }
        self.mirror.publish(chain);
        self.end_arming_if_settled(inner, chain);
    }

    /// Under the lock, on the VM's thread: once no thread of the chain
    /// carries our hook, the watchdog's arming is over for the owner, whose
    /// changes go lock-free again.
    fn end_arming_if_settled(&self, inner: &VmInner, chain: &Chain) {
        if self.mirror.is_armed_afar()
            && !chain.threads().any(|state| inner.arming.is_armed(state.0))
        {
            self.mirror.end_arming();
        }
    }

    /// The running thread `resumer` is about to resume a coroutine (with
    /// something watched involved): repairs the chain and says where the
    /// coroutine will go, for the caller to anchor it before `enter`.
    ///
    /// # Safety
    /// `resumer` is the running thread, run by the calling OS thread; every
    /// thread on the chain is anchored (so alive).
    pub unsafe fn plan_enter(&self, resumer: *mut lua_State) -> Plan {
        // The common cases need no change: the resumer is the top, or the
        // chain is empty (and so it goes at depth 1).
        let len = self.mirror.len();
        if len == 0 {
            return Plan {
                depth: 2,
                anchor_resumer_at: None,
            };
        }
        if self.mirror.top() == resumer {
            return Plan {
                depth: len + 1,
                anchor_resumer_at: None,
            };
        }
        // SAFETY: the chain's threads are alive and belong to this VM, which
        // the calling OS thread runs (caller's contract).
        unsafe {
            self.change_chain(
                |chain, gone| chain.plan(StatePtr(resumer), |state| has_stopped(state), gone),
                |_| None,
            )
        }
    }

    /// The running thread `resumer` is about to resume `resumed`, watched
    /// if `watch` is given, as `plan_enter` said just before (see
    /// [`Chain::enter`] for `direct`). Returns the depth of `resumed` in
    /// the chain. `now` is when the watch started (the caller read the
    /// clock once).
    ///
    /// # Safety
    /// `resumer` is the running thread, on its OS thread; `resumed` is a
    /// coroutine of this VM that the caller keeps alive (on its stack or
    /// anchored, as `plan` says) until the matching `leave`.
    pub unsafe fn enter(
        &self,
        resumer: *mut lua_State,
        resumed: *mut lua_State,
        watch: Option<Watch>,
        now: Nanos,
        (plan, direct): (Plan, bool),
    ) -> usize {
        // SAFETY: the caller's contract.
        unsafe {
            self.change_chain(
                |chain, _| chain.enter(StatePtr(resumer), StatePtr(resumed), watch, plan, direct),
                |_| Some(now),
            )
        }
    }

    /// The resume that `enter` announced at `depth` returned, on `resumer`
    /// (now running again).
    ///
    /// # Safety
    /// `resumer` is the running thread, on its OS thread, and every thread
    /// on the chain is still held alive (the one leaving included).
    pub unsafe fn leave(&self, resumer: *mut lua_State, depth: usize) -> LeftChain {
        // SAFETY: the caller's contract.
        unsafe { self.change_chain(|chain, gone| chain.leave(depth, gone), back_on_top(resumer)) }
    }

    /// A coroutine that watched itself (or a thread that resumed it)
    /// returned to `resumer`, which resumed it unwatched.
    ///
    /// # Safety
    /// As for [`Vm::leave`].
    pub unsafe fn leave_root(&self, resumer: *mut lua_State, co: *mut lua_State) -> LeftChain {
        // SAFETY: the caller's contract.
        unsafe {
            self.change_chain(
                |chain, gone| chain.leave_root(StatePtr(co), gone),
                back_on_top(resumer),
            )
        }
    }

    /// What to anchor before [`Vm::watch_running`] watches `state`, which
    /// is `running` or a thread that may have resumed it.
    ///
    /// # Safety
    /// As for [`Vm::watch_running`].
    pub unsafe fn watch_anchors(
        &self,
        state: *mut lua_State,
        running: *mut lua_State,
    ) -> WatchAnchors {
        // SAFETY: the VM's thread (caller), which runs no other use of the
        // chain now; `state` is alive, of this VM (caller).
        unsafe {
            self.owner.with(|own| {
                own.chain
                    .watch_anchors(StatePtr(state), StatePtr(running), |state| {
                        !has_stopped(state)
                    })
            })
        }
    }

    /// Watches `state` from now on if it runs: it is the running thread
    /// `running`, or on the chain, or (with nothing watched yet) a thread
    /// that resumed `running`. `anchored`: what the caller anchored, as
    /// `watch_anchors` said. Returns `Ok(false)` if it does not run (its
    /// watch starts when it is next resumed), `Err` with what to anchor if
    /// the chain changed since.
    ///
    /// # Safety
    /// `state` is alive and `running` is the running thread, both of the
    /// VM the calling OS thread runs.
    pub unsafe fn watch_running(
        &self,
        state: *mut lua_State,
        running: *mut lua_State,
        watch: Watch,
        anchored: WatchAnchors,
    ) -> Result<bool, WatchAnchors> {
        let started = std::cell::Cell::new(false);
        // SAFETY: the caller's contract; nothing is popped here.
        unsafe {
            self.change_chain(
                |chain, _| {
                    let watched = chain.watch_running(
                        StatePtr(state),
                        StatePtr(running),
                        |state| !has_stopped(state),
                        watch,
                        anchored,
                    );
                    started.set(watched == Ok(true));
                    watched
                },
                |_| started.get().then(clock::now),
            )
        }
    }

    /// A warn callback at `depth` asked for more time.
    ///
    /// # Safety
    /// Called on the VM's own thread, which runs the callback.
    pub unsafe fn reset(&self, depth: usize) {
        let now = clock::now();
        // SAFETY: the caller's contract; nothing is popped here.
        unsafe { self.change_chain(|chain, _| chain.reset(depth, now), |_| Some(now)) }
    }

    /// Called by the watchdog when the alarm set by `set_alarm` goes off.
    /// Returns the next alarm, if the watchdog should wait for it.
    fn alarm_went_off(&self) -> Nanos {
        let mut inner = self.lock();
        self.mirror.set_alarm(NEVER);
        if inner.closed {
            return NEVER;
        }
        // PUC Lua writes the hooks of the threads the mirror names: mark
        // the chain before reading it (see `crate::mirror`). LuaJIT arms
        // the VM through its anchor, and no thread of the chain is touched.
        let armed_before = cfg!(feature = "luajit") || self.mirror.begin_arming();
        barrier::heavy();
        let now = clock::now();
        if self.mirror.needs_hook(hook_horizon(now)) {
            inner.arm_chain(Side::Afar, self.mirror.watched_and_above());
            // Come back in case the arming is undone before the hook fires.
            let next = clock::after(now, clock::nanos(inner.retry.step()));
            self.mirror.set_alarm(next);
            return next;
        }
        if !armed_before {
            self.mirror.end_arming();
        }
        inner.retry = Backoff::first();
        let next = hook_time(self.mirror.next_deadline());
        self.mirror.set_alarm(next);
        next
    }

    /// The running thread is about to call `debug.sethook`.
    pub fn begin_user_hook_change(&self) {
        self.lock().arming.begin_user_change();
    }

    /// The running thread called `debug.sethook` about `state` (itself or
    /// a coroutine): the user's new hook is what to put back later (PUC
    /// Lua) or what to chain (LuaJIT).
    ///
    /// # Safety
    /// `state` is alive and of the VM the calling OS thread runs.
    pub unsafe fn user_hook_changed(&self, state: *mut lua_State) {
        let mut inner = self.lock();
        // SAFETY: as the caller promised; we hold the lock.
        unsafe { inner.arming.user_hook_changed(state) };
        if inner.arming.take_deferred() {
            // SAFETY: the VM's thread, outside every other use of the chain.
            unsafe { self.owner.with(|own| inner.arm_everything_due(&own.chain)) };
        }
    }

    /// While our hook is in place of the user's on `state`, puts the
    /// user's back for a moment (to read it with `debug.gethook`); returns
    /// whether it did, and then `user_hook_changed` must follow.
    ///
    /// # Safety
    /// As for [`Vm::user_hook_changed`].
    pub unsafe fn lend_user_hook(&self, state: *mut lua_State) -> bool {
        let mut inner = self.lock();
        // SAFETY: as the caller promised; we hold the lock.
        unsafe { inner.arming.lend(state) }
    }

    /// Makes sure the watchdog wakes up by `deadline` (the chain's next,
    /// less the hook's lead). Under the lock.
    fn set_alarm(&self, _: &mut VmInner, deadline: Nanos) {
        let at = hook_time(deadline);
        if self.mirror.alarm_by(at) {
            return; // and so if there is no deadline
        }
        self.mirror.set_alarm(at);
        if let Some(at) = clock::to_instant(at) {
            watchdog::schedule_alarm(self.me.clone(), at);
        }
    }
}

/// The `check` of a change that leaves a resume: with the resumer back on
/// top (it is on the chain, so something watched runs), its own deadlines
/// may have passed meanwhile.
fn back_on_top(resumer: *mut lua_State) -> impl FnOnce(&Chain) -> Option<Nanos> {
    move |chain| {
        chain
            .top()
            .is_some_and(|top| top.0 == resumer)
            .then(clock::now)
    }
}

impl VmInner {
    /// Runs `change` on the VM's `chain`; each thread it pops is handed to
    /// `gone`, which takes our hook off it (see [`release`]). Called on the
    /// VM's own OS thread (the patched resume, the hook).
    fn change_chain<R>(
        &mut self,
        chain: &mut Chain,
        change: impl FnOnce(&mut Chain, &mut dyn FnMut(StatePtr)) -> R,
    ) -> R {
        let VmInner { arming, slots, .. } = self;
        // SAFETY: the threads the chain pops are alive (module comment)
        // and of this VM, whose OS thread runs this; we hold the VM lock.
        let mut gone = |state: StatePtr| unsafe { release(arming, slots, state) };
        change(chain, &mut gone)
    }

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
            }
        }
    }

    /// Whether an interrupt is pending for the running thread `state`.
    fn has_interrupt(&self, state: *mut lua_State, id: Option<Id>) -> bool {
        id.and_then(|id| self.slots.get(&id))
            .is_some_and(|slot| slot.state.0 == state && slot.pending != Pending::None)
    }

    /// Takes the interrupt pending for the running thread `state`, if any;
    /// also says whether one stays pending there (sticky).
    fn take_interrupt(&mut self, state: *mut lua_State, id: Option<Id>) -> (Verdict, bool) {
        let Some(id) = id else {
            return (Verdict::Continue, false);
        };
        let Some(slot) = self.slots.get_mut(&id).filter(|slot| slot.state.0 == state) else {
            return (Verdict::Continue, false);
        };
        let before = slot.pending;
        if before == Pending::Once {
            slot.pending = Pending::None;
        }
        let after = slot.pending;
        self.count_transition(before, after);
        if before == Pending::None {
            (Verdict::Continue, false)
        } else {
            (Verdict::Deliver(id), after == Pending::Sticky)
        }
    }

    /// Arms, from the VM's own thread, what another thread would have
    /// armed while the user changed a hook: every target with an interrupt
    /// pending, and the chain if a deadline passed.
    fn arm_everything_due(&mut self, chain: &Chain) {
        let pending: Vec<Id> = self
            .slots
            .iter()
            .filter(|(_, slot)| slot.pending != Pending::None)
            .map(|(id, _)| *id)
            .collect();
        for id in pending {
            self.arm(id, Side::Owner);
        }
        if chain.needs_hook(hook_horizon(clock::now())) {
            self.arm_chain(Side::Owner, chain.watched_and_above());
        }
    }

    /// Arms the chain's threads for a passed deadline. The top may have
    /// returned or yielded unseen (resumed with the original `resume`):
    /// then a thread below it runs. Every thread from the watched one up is
    /// armed, and the hook, where it fires, drops the stale entries above.
    /// `threads`: those, from the chain (the owner) or its mirror (the
    /// watchdog, after the handshake of [`crate::mirror`]).
    fn arm_chain(&mut self, side: Side, threads: impl Iterator<Item = StatePtr>) {
        // LuaJIT's hook is the VM's: armed once, through the anchor, which
        // lives until `close`; no thread of the chain is touched.
        #[cfg(feature = "luajit")]
        let threads = {
            let mut threads = threads;
            std::iter::once(self.anchor).take(usize::from(threads.next().is_some()))
        };
        let VmInner {
            arming,
            writing_afar,
            ..
        } = self;
        for state in threads {
            // SAFETY: the chain's threads are alive while it names them,
            // and the mirror's until the owner has seen `armed_afar`
            // (module comments here and in `crate::mirror`); one that does
            // not run is armed for when it runs again. We hold the lock.
            writing_from(side, writing_afar, || unsafe { arming.arm(state.0, side) });
        }
    }

    /// Installs the delivery hook for a live target.
    fn arm(&mut self, id: Id, side: Side) {
        let Some(slot) = self.live_slot(id) else {
            return;
        };
        #[cfg(not(feature = "luajit"))]
        let state = slot.state.0;
        #[cfg(feature = "luajit")]
        let state = {
            let _ = slot;
            self.anchor.0
        };
        // SAFETY: a live slot's state is alive (module comment); the anchor
        // lives until `close`, which we are not past. We hold the VM lock.
        let arming = &mut self.arming;
        writing_from(side, &self.writing_afar, || unsafe {
            arming.arm(state, side)
        });
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
                    || mirror.needs_hook(hook_horizon(clock::now())),
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

    /// After the hook ran on `state` (the running thread): keep it armed if
    /// `needed` there, else relax or remove it.
    ///
    /// # Safety
    /// `state` is the running thread, inside its hook, on its OS thread.
    unsafe fn settle_hook(
        &mut self,
        state: *mut lua_State,
        needed: bool,
        chain: &Chain,
        now: Nanos,
    ) {
        let need = if needed {
            Need::Armed
        } else if cfg!(feature = "luajit")
            && (self.pending.load(Ordering::Relaxed) > 0 || chain.needs_hook(hook_horizon(now)))
        {
            // The hook is global: someone else (a suspended target, or the
            // chain's top when it runs again) still needs it.
            Need::Poll
        } else {
            Need::Nothing
        };
        // SAFETY: `state` is the running thread, we are in its hook, and we
        // hold the VM lock.
        unsafe { self.arming.settle(state, need) };
    }
}

/// A thread left the chain: our hook comes off it unless an interrupt
/// waits there (see [`HookArming::release`]).
///
/// # Safety
/// `state` is alive, of the VM the calling OS thread runs, which holds the
/// VM lock.
unsafe fn release(arming: &mut Arming, slots: &HashMap<Id, Slot>, state: StatePtr) {
    arming.release(state.0, || {
        slots
            .values()
            .any(|slot| slot.state == state && slot.pending != Pending::None)
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

impl Alarm for Vm {
    fn on_alarm(&self) -> Option<Instant> {
        clock::to_instant(self.alarm_went_off())
    }
}
