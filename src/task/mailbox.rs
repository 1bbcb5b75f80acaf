//! A VM's task mailbox: which ids are live tasks, the cancels sent to them
//! from any OS thread, and the scheduler's idle sleep that a cancel cuts
//! short.
//!
//! `cancel_id` may run on any OS thread, in any Lua state that loaded the
//! core: it finds the task's VM through the process-wide id registry, then
//! that VM's mailbox here. It records the cancel, interrupts the thread in
//! the scheduler's cell (whatever task runs now: its interrupt handler takes
//! the recorded cancels at once, so a cancel reaches a CPU-bound task or
//! descendant at its next instruction; a waiting task is woken by the
//! scheduler's next step) and wakes the scheduler's idle sleep, or makes
//! the eventfd that a host loop polls readable.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::cell::Cell;
use crate::arming::Side;
use crate::registry::{self, Id};
use crate::vm::{Request, Vm};

#[derive(Default)]
struct Inner {
    /// Ids of the live tasks of this VM.
    tasks: HashSet<Id>,
    /// The scheduler's cell: the thread that runs a task now.
    cell: Option<Arc<Cell>>,
    /// Cancels sent with `cancel_id`, not yet taken by the scheduler.
    cancels: Vec<(Id, Option<String>)>,
    /// Set by a cancel, cleared when the sleep returns.
    woken: bool,
}

pub struct Mailbox {
    vm: Weak<Vm>,
    inner: Mutex<Inner>,
    wake: Condvar,
    /// Becomes readable when a cancel arrives: for a host's event loop
    /// (luv polls it) that waits instead of [`Mailbox::sleep`].
    event: Option<EventFd>,
}

/// A Linux eventfd, non-blocking; elsewhere there is none and a host loop
/// has to poll the mailbox instead.
struct EventFd(std::ffi::c_int);

impl EventFd {
    #[cfg(target_os = "linux")]
    fn new() -> Option<EventFd> {
        // SAFETY: eventfd takes no pointer; a negative result is an error.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        (fd >= 0).then_some(EventFd(fd))
    }

    #[cfg(not(target_os = "linux"))]
    fn new() -> Option<EventFd> {
        None
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own descriptor; a
        // full counter (EAGAIN) already means "readable", which is the point.
        unsafe { libc::write(self.0, (&one as *const u64).cast(), 8) };
    }

    fn clear(&self) {
        let mut count: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our own
        // non-blocking descriptor; EAGAIN (nothing to read) is fine.
        unsafe { libc::read(self.0, (&mut count as *mut u64).cast(), 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor and close it once.
        unsafe { libc::close(self.0) };
    }
}

/// Mailboxes by the address of their VM (checked against `Mailbox::vm`,
/// since an address can be reused once a VM is gone).
static MAILBOXES: LazyLock<Mutex<HashMap<usize, Weak<Mailbox>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn address(vm: &Arc<Vm>) -> usize {
    Arc::as_ptr(vm) as usize
}

/// The mailbox of `vm`, made on first use. The caller keeps it alive (in
/// its Lua state); once it is dropped, cancels for that VM find nothing.
pub fn of_vm(vm: &Arc<Vm>) -> Arc<Mailbox> {
    let mut boxes = lock(&MAILBOXES);
    if let Some(mailbox) = boxes.get(&address(vm)).and_then(Weak::upgrade) {
        if mailbox.vm.ptr_eq(&Arc::downgrade(vm)) {
            return mailbox;
        }
    }
    boxes.retain(|_, mailbox| mailbox.strong_count() > 0);
    let mailbox = Arc::new(Mailbox {
        vm: Arc::downgrade(vm),
        inner: Mutex::new(Inner::default()),
        wake: Condvar::new(),
        event: EventFd::new(),
    });
    boxes.insert(address(vm), Arc::downgrade(&mailbox));
    mailbox
}

fn find(vm: &Arc<Vm>) -> Option<Arc<Mailbox>> {
    let mailbox = lock(&MAILBOXES).get(&address(vm)).and_then(Weak::upgrade)?;
    mailbox.vm.ptr_eq(&Arc::downgrade(vm)).then_some(mailbox)
}

impl Mailbox {
    pub fn set_cell(&self, cell: Arc<Cell>) {
        lock(&self.inner).cell = Some(cell);
    }

    pub fn register(&self, id: Id) {
        lock(&self.inner).tasks.insert(id);
    }

    pub fn unregister(&self, id: Id) {
        lock(&self.inner).tasks.remove(&id);
    }

    /// Takes the cancels received so far, oldest first.
    pub fn drain(&self) -> Vec<(Id, Option<String>)> {
        let mut inner = lock(&self.inner);
        if inner.cancels.is_empty() {
            return Vec::new();
        }
        if let Some(event) = &self.event {
            event.clear();
        }
        std::mem::take(&mut inner.cancels)
    }

    /// The descriptor that becomes readable when a cancel arrives, if any.
    pub fn fd(&self) -> Option<std::ffi::c_int> {
        self.event.as_ref().map(|event| event.0)
    }

    /// Sleeps until `timeout` passes (forever if `None`) or a cancel
    /// arrives; returns whether a cancel woke it (or had arrived before).
    pub fn sleep(&self, timeout: Option<Duration>) -> bool {
        let until = timeout.and_then(|timeout| Instant::now().checked_add(timeout));
        let mut inner = lock(&self.inner);
        while !inner.woken {
            let now = Instant::now();
            inner = match until {
                Some(until) if until <= now => break,
                Some(until) => {
                    self.wake
                        .wait_timeout(inner, until - now)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0
                }
                None => self
                    .wake
                    .wait(inner)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            };
        }
        std::mem::replace(&mut inner.woken, false)
    }
}

/// `cancel_id(id, reason)`: true if `id` is a live task (of any VM in the
/// process). `same_vm` says whether the caller runs on the task's VM.
pub fn cancel_id(id: Id, reason: Option<String>, caller: Option<&Arc<Vm>>) -> bool {
    let Some(target) = registry::lookup(id) else {
        return false;
    };
    let Some(mailbox) = find(&target.vm) else {
        return false;
    };
    let side = match caller {
        Some(vm) if Arc::ptr_eq(vm, &target.vm) => Side::Owner,
        _ => Side::Afar,
    };
    drop(target);
    let cell = {
        let mut inner = lock(&mailbox.inner);
        if !inner.tasks.contains(&id) {
            return false;
        }
        inner.cancels.push((id, reason));
        inner.woken = true;
        if let Some(event) = &mailbox.event {
            event.signal();
        }
        inner.cell.clone()
    };
    mailbox.wake.notify_all();
    if let Some(cell) = cell {
        cell.interrupt(Request::Once, side);
    }
    true
}
