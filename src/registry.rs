//! The process-wide table from interruptible id to target.
//!
//! Every Lua state in the process that loads this library shares it, so an id
//! obtained in one state (or OS thread) can be interrupted from any other.
//! The table holds weak references: a target lives as long as the guard tied
//! to its Lua thread, or an interruptible object, still holds it.

use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Weak};

use dashmap::DashMap;

use crate::key_hash::KeyHasher;
pub use crate::vm::Id;
use crate::vm::Vm;
use crate::watchdog::Rearm;

/// Ids start at 2^40 so that they are not mistaken for ordinary small
/// integers, and stay below 10^14 so that every Lua version, including those
/// that print numbers with `%.14g`, prints them exactly.
const FIRST_ID: Id = 1 << 40;
const LAST_ID: Id = 99_999_999_999_999;

static NEXT_ID: AtomicU64 = AtomicU64::new(FIRST_ID);
static TARGETS: LazyLock<DashMap<Id, Weak<Target>, BuildHasherDefault<KeyHasher>>> =
    LazyLock::new(DashMap::default);

/// A Lua main state or coroutine that has an id.
///
/// Its mutable part (the Lua thread pointer, pending interrupts) lives in its
/// VM's slot table, under the VM's lock.
pub struct Target {
    pub id: Id,
    pub vm: Arc<Vm>,
    /// How many interruptible objects hold this target: while any does, its
    /// id stays known after the thread dies.
    pub handles: AtomicUsize,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.vm.forget(self.id);
        // Ids are never reused, so this can only remove our own dead entry.
        TARGETS.remove_if(&self.id, |_, weak| weak.strong_count() == 0);
    }
}

impl Rearm for Target {
    fn rearm(&self) -> bool {
        self.vm.rearm(self.id)
    }
}

/// Makes a new target in `vm`, or `None` once the id space is exhausted.
pub fn create(vm: Arc<Vm>) -> Option<Arc<Target>> {
    let id = NEXT_ID
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |id| {
            (id < LAST_ID).then_some(id + 1)
        })
        .ok()?;
    let target = Arc::new(Target {
        id,
        vm,
        handles: AtomicUsize::new(0),
    });
    TARGETS.insert(id, Arc::downgrade(&target));
    Some(target)
}

/// The target with this id, if it is still known.
pub fn lookup(id: Id) -> Option<Arc<Target>> {
    // The map's shard guard is released at the end of this statement, before
    // the caller can drop the returned Arc (whose Drop removes the entry).
    let weak = TARGETS.get(&id).map(|entry| entry.value().clone());
    weak.and_then(|weak| weak.upgrade())
}
