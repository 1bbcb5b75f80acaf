//! LuaJIT: another OS thread never writes a VM's hook; it asks the VM's own
//! OS thread to, with a signal, as `luajit.c` does for Ctrl-C.
//!
//! # Why
//!
//! LuaJIT keeps one hook per VM, and a "hook running" bit (`HOOK_ACTIVE`)
//! in the byte that holds the hook mask, which the VM's thread sets and
//! clears around every hook call with plain read-modify-writes.
//! `lua_sethook` is one too (`hookmask = (hookmask & ~EVENTMASK) | mask`).
//! Done from another OS thread, its read can see the bit set and its write
//! land after the VM's thread cleared it: the bit stays set and no hook
//! ever runs again in that VM (a kill never lands).
//!
//! # How
//!
//! A signal handler runs on the thread it interrupts, between two of its
//! instructions: its read-modify-write of the mask is atomic with respect
//! to that thread's own. If the handler interrupts the VM's thread inside
//! one of those, the thread writes back what it read before, and the
//! handler's arming is lost; never the other way round, so the bit ends as
//! the VM's thread last wrote it. A lost arming is repaired by the
//! watchdog, which comes back until the hook has delivered (see
//! [`crate::watchdog`]) and asks again. LuaJIT itself says `lua_sethook`
//! may be called asynchronously, from a signal handler, on its thread.
//!
//! - Each LuaJIT VM takes a [`Cell`] of a fixed array at creation: all
//!   atomics, reachable without a lock or an allocation.
//! - The VM's thread writes its `pthread_self()` there on every entry into
//!   this library (the hook, the gate of every native function, the
//!   patched resume and yield): one load and compare when unchanged. A
//!   thread recorded anew unblocks [`SIGNAL`] for itself (cqueues' threads
//!   block every signal).
//! - Another thread (holding the VM lock) sets the cell's `requested` flag,
//!   counts it in [`PENDING`], and sends [`SIGNAL`] to the recorded thread
//!   with `pthread_sigqueue` and a cookie, so that the handler can tell our
//!   signals from the host's.
//! - The handler (on that thread) finds the cells whose owner is itself and
//!   whose request is pending, and installs the hook there (see
//!   [`Cell::service`]). It takes no lock, allocates nothing, and keeps
//!   `errno`.
//!
//! # Threads that exit, VMs that close or move
//!
//! - `pthread_kill` of a thread that has exited is undefined. A thread
//!   that records itself first registers a thread-local guard; when the
//!   thread exits, the guard's destructor erases the thread from every cell
//!   under [`SIGNAL_LOCK`], which the sender holds from reading the owner
//!   to sending. A recorded thread is therefore alive while it is signalled.
//! - A VM closes on its own thread. The handler marks the cell busy
//!   (`OPEN -> BUSY`) before touching the VM and [`Cell::release`] waits for
//!   `BUSY` to end: on the VM's thread the handler is over before the close
//!   goes on; on another thread (a stale owner, below) it ends by itself.
//! - A VM that moved to another OS thread is known by its new thread from
//!   its first entry into this library there. Until then the old thread is
//!   signalled and writes the hook of a VM it no longer runs: the race of
//!   old, but only in that window (README, Limitations).
//! - When a signal cannot be sent (no cell left, no thread recorded, our
//!   handler replaced by the host's) or a request stays unanswered for
//!   [`STALE`] (the thread blocks the signal), the hook is written from
//!   the other thread as before (README, Limitations).
//!
//! # The host's signals
//!
//! [`SIGNAL`] is `SIGURG`, ignored by default: a signal of ours that
//! arrives after the handler is gone does nothing. The handler is installed
//! once per process (the library is never unloaded: [`crate::image`]) with
//! `SA_RESTART | SA_SIGINFO`; a signal that is not ours (not sent by this
//! process with our cookie) goes to the handler that was there before.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{
    compiler_fence, AtomicBool, AtomicI32, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
use std::sync::{LazyLock, Mutex, Once};
use std::time::{Duration, Instant};

use mlua::ffi::{self, lua_Hook, lua_State};

use crate::entry::{hook, ours_fires, DELIVERY_MASK};

/// The signal: ignored by default, rarely used by hosts (Go's runtime uses
/// it to preempt goroutines, and chains it).
pub const SIGNAL: c_int = libc::SIGURG;

/// What a signal of ours carries (`si_value`), to tell it from the host's.
const COOKIE: usize = 0x636f_726f_7761_7463; // "corowatc"

/// After this long without an answer, a request gives up on the signal if
/// the thread blocks it.
const STALE: Duration = Duration::from_millis(50);

/// How many LuaJIT VMs can be armed by signal at once; more are armed from
/// the other thread, as before.
const CELLS: usize = 256;

// States of a cell.
const FREE: u8 = 0;
const SETUP: u8 = 1;
const OPEN: u8 = 2;
const BUSY: u8 = 3;
const CLOSING: u8 = 4;

/// The per-VM part that the signal handler reads.
pub struct Cell {
    state: AtomicU8,
    /// The VM's anchor thread (any thread of the VM names its hook).
    anchor: AtomicPtr<lua_State>,
    /// `pthread_self()` of the VM's thread, as last recorded; 0 if unknown.
    owner: AtomicUsize,
    /// Its kernel thread id (to read its signal mask when a request stays
    /// unanswered).
    owner_tid: AtomicI32,
    /// The handler installed the hook: the hook must look at everything
    /// once (it may have come after what asked for it was delivered).
    installed: AtomicBool,
    /// Another thread asked for the hook and the handler has not answered.
    requested: AtomicBool,
    /// When `requested` was set (nanoseconds since [`EPOCH`]).
    requested_at: AtomicU64,
    /// The VM's thread is writing the hook itself, or reading the handover:
    /// the handler leaves the hook alone (the arming is lost, and repaired).
    owner_writing: AtomicBool,
    /// The user changes or reads the hook through corowatch's
    /// `debug.sethook`/`debug.gethook`: the hook in place must stay.
    user_changing: AtomicBool,
    /// A hook that was not ours, replaced by the handler: the user's, for
    /// the VM's thread to chain (taken under `owner_writing`).
    handover: AtomicBool,
    handover_func: AtomicUsize,
    handover_mask: AtomicI32,
    handover_count: AtomicI32,
}

impl Cell {
    const fn new() -> Cell {
        Cell {
            state: AtomicU8::new(FREE),
            anchor: AtomicPtr::new(std::ptr::null_mut()),
            owner: AtomicUsize::new(0),
            owner_tid: AtomicI32::new(0),
            installed: AtomicBool::new(false),
            requested: AtomicBool::new(false),
            requested_at: AtomicU64::new(0),
            owner_writing: AtomicBool::new(false),
            user_changing: AtomicBool::new(false),
            handover: AtomicBool::new(false),
            handover_func: AtomicUsize::new(0),
            handover_mask: AtomicI32::new(0),
            handover_count: AtomicI32::new(0),
        }
    }
}

static TABLE: [Cell; CELLS] = [const { Cell::new() }; CELLS];

/// How many cells have a request pending: the handler looks at the table
/// only if some do.
static PENDING: AtomicUsize = AtomicUsize::new(0);

/// Held from reading a cell's owner to signalling it, and by an exiting
/// thread while it erases itself from the cells (never by the handler).
static SIGNAL_LOCK: Mutex<()> = Mutex::new(());

/// How many signals were sent (diagnostics: specs check that the signal
/// path is the one taken).
static SENT: AtomicUsize = AtomicUsize::new(0);

/// How many signals were sent to ask for the hook, in this process.
pub fn sent() -> usize {
    SENT.load(Ordering::Relaxed)
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);
/// The handler that was in place before ours (`sa_sigaction`) and its flags.
static PREVIOUS_ACTION: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREVIOUS_FLAGS: AtomicI32 = AtomicI32::new(0);

fn me() -> usize {
    // SAFETY: pthread_self has no preconditions and is async-signal-safe.
    unsafe { libc::pthread_self() as usize }
}

fn nanos() -> u64 {
    EPOCH.elapsed().as_nanos() as u64
}

/// Lets [`SIGNAL`] reach the calling thread, which runs a VM. Threads that
/// block every signal are common (cqueues' threads do, so that signals go
/// to the main thread); unanswered, every arming there would wait
/// [`STALE`] and then be written from the other thread after all.
fn unblock_signal() {
    // SAFETY: `set` is initialized by sigemptyset before use;
    // pthread_sigmask changes only the calling thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, SIGNAL);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// Erases the thread from every cell when it exits (see the module comment).
struct ExitGuard;

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let me = me();
        let _held = SIGNAL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        for cell in &TABLE {
            let _ = cell
                .owner
                .compare_exchange(me, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}

thread_local! {
    static EXIT_GUARD: ExitGuard = const { ExitGuard };
}

/// Installs the handler, once per process.
fn install() {
    INSTALL.call_once(|| {
        // SAFETY: sigaction with a zeroed struct queries the current action
        // into `previous`; the second call installs ours, a function that
        // stays mapped for the life of the process (the image is pinned).
        unsafe {
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(SIGNAL, std::ptr::null(), &mut previous) != 0 {
                return;
            }
            // Stored before ours is in place: a signal in between finds
            // nothing pending and goes to the previous handler.
            PREVIOUS_ACTION.store(previous.sa_sigaction, Ordering::Release);
            PREVIOUS_FLAGS.store(previous.sa_flags, Ordering::Release);
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            // SA_ONSTACK: a host handler we pass a signal on to may need
            // its alternate stack (Go's runtime preempts with SIGURG and
            // requires it); its mask, for the same reason.
            action.sa_flags = libc::SA_RESTART | libc::SA_SIGINFO | libc::SA_ONSTACK;
            action.sa_mask = previous.sa_mask;
            if libc::sigaction(SIGNAL, &action, std::ptr::null_mut()) == 0 {
                INSTALLED.store(true, Ordering::Release);
            }
        }
    });
}

/// Whether our handler is the one in place (the host may have replaced it).
fn handler_in_place() -> bool {
    if !INSTALLED.load(Ordering::Acquire) {
        return false;
    }
    // SAFETY: a query only: the current action is written into `current`.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(SIGNAL, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == on_signal as *const () as usize
    }
}

/// Takes a cell for a new VM with this anchor, run by the calling thread;
/// `None` if all are taken.
///
/// # Safety
/// As for [`crate::vm::create`]: the handler installs the hook on
/// `anchor`'s VM through it until the cell is released.
pub unsafe fn claim(anchor: *mut lua_State) -> Option<&'static Cell> {
    install();
    let cell = TABLE.iter().find(|cell| {
        cell.state
            .compare_exchange(FREE, SETUP, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    })?;
    cell.anchor.store(anchor, Ordering::Relaxed);
    cell.owner.store(0, Ordering::Relaxed);
    cell.requested.store(false, Ordering::Relaxed);
    cell.owner_writing.store(false, Ordering::Relaxed);
    cell.user_changing.store(false, Ordering::Relaxed);
    cell.handover.store(false, Ordering::Relaxed);
    cell.state.store(OPEN, Ordering::Release);
    cell.note_owner();
    Some(cell)
}

/// The previous handler's entry points.
type Action = extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void);
type Handler = extern "C" fn(c_int);

/// The start of a Linux `siginfo_t` for a queued signal (`rt` fields).
#[repr(C)]
struct QueuedInfo {
    signo: c_int,
    errno: c_int,
    code: c_int,
    #[cfg(target_pointer_width = "64")]
    _pad: c_int,
    pid: libc::pid_t,
    uid: libc::uid_t,
    value: *mut c_void,
}

/// Whether the signal was sent by this process with our cookie.
///
/// # Safety
/// `info` is the handler's `siginfo_t` (or null).
unsafe fn is_ours(info: *mut libc::siginfo_t) -> bool {
    if info.is_null() {
        return false;
    }
    let info = &*(info as *const QueuedInfo);
    info.code == libc::SI_QUEUE && info.pid == libc::getpid() && info.value as usize == COOKIE
}

/// The handler. Async-signal-safe: atomics, `lua_gethook*`/`lua_sethook`
/// on this thread's own VM (plain field reads and writes in LuaJIT, which
/// allows `lua_sethook` from a signal handler), `getpid`, `pthread_self`.
extern "C" fn on_signal(signal: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: `__errno_location` is this thread's errno; we put it back.
    let errno = unsafe { *libc::__errno_location() };
    // Whatever the signal says of itself: one of ours can arrive without
    // its information (the queue of signal information is full), and
    // serving the requests is harmless when none is for this thread.
    if PENDING.load(Ordering::Acquire) > 0 {
        let me = me();
        for cell in &TABLE {
            cell.service(me);
        }
    }
    // SAFETY: `info` is what the kernel gave this SA_SIGINFO handler.
    if unsafe { !is_ours(info) } {
        let action = PREVIOUS_ACTION.load(Ordering::Acquire);
        if action != libc::SIG_DFL && action != libc::SIG_IGN {
            // SAFETY: `action` was the handler in place before ours, of the
            // kind its flags say; the host installed it for this signal.
            unsafe {
                if PREVIOUS_FLAGS.load(Ordering::Acquire) & libc::SA_SIGINFO != 0 {
                    std::mem::transmute::<usize, Action>(action)(signal, info, context);
                } else {
                    std::mem::transmute::<usize, Handler>(action)(signal);
                }
            }
        }
        // SIG_DFL of SIGURG is to ignore it.
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// `lua_sethook` returns `int` on LuaJIT.
///
/// # Safety
/// `state` is alive and of a VM whose own OS thread is the caller (the
/// signal handler runs there), outside any other hook write of ours.
unsafe fn set_hook(state: *mut lua_State, func: Option<lua_Hook>, mask: c_int, count: c_int) {
    let _ = ffi::lua_sethook(state, func, mask, count);
}

impl Cell {
    /// The VM's thread entered the library: records it if it is new.
    #[inline]
    pub fn note_owner(&self) {
        let me = me();
        if self.owner.load(Ordering::Relaxed) != me {
            self.note_owner_slow(me);
        }
    }

    #[cold]
    fn note_owner_slow(&self, me: usize) {
        // The exit guard is registered before the thread is named: it will
        // erase it. A thread already past its thread-local destructors is
        // not named at all.
        let registered = EXIT_GUARD.try_with(|_| ()).is_ok();
        unblock_signal();
        // SAFETY: gettid has no preconditions.
        self.owner_tid
            .store(unsafe { libc::gettid() }, Ordering::Relaxed);
        self.owner
            .store(if registered { me } else { 0 }, Ordering::Release);
    }

    /// The VM closes (on its own thread, under the VM lock): the cell is
    /// free again once no handler uses it.
    pub fn release(&self) {
        loop {
            match self
                .state
                .compare_exchange(OPEN, CLOSING, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => break,
                // A handler on another thread (a stale owner): it ends
                // without waiting for anything.
                Err(BUSY) => std::hint::spin_loop(),
                Err(_) => return,
            }
        }
        if self.requested.swap(false, Ordering::AcqRel) {
            PENDING.fetch_sub(1, Ordering::AcqRel);
        }
        self.anchor.store(std::ptr::null_mut(), Ordering::Relaxed);
        self.owner.store(0, Ordering::Relaxed);
        self.state.store(FREE, Ordering::Release);
    }

    /// Runs `write`, a write of the hook or a read of the handover by the
    /// VM lock's holder, with the handler kept off this VM meanwhile (on
    /// the VM's thread, it could interrupt `write` half-way).
    pub fn owner_writes<R>(&self, write: impl FnOnce() -> R) -> R {
        self.owner_writing.store(true, Ordering::Relaxed);
        // A handler interrupting `write` sees the flag: the signal handler
        // runs on this thread, so only the compiler could reorder.
        compiler_fence(Ordering::SeqCst);
        let result = write();
        compiler_fence(Ordering::SeqCst);
        self.owner_writing.store(false, Ordering::Relaxed);
        result
    }

    /// Mirrors `Arming::user_changing` for the handler.
    pub fn set_user_changing(&self, changing: bool) {
        compiler_fence(Ordering::SeqCst);
        self.user_changing.store(changing, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
    }

    /// The hook the handler replaced, if it did: the user's, to chain.
    /// Called by the VM lock's holder.
    pub fn take_handover(&self) -> Option<(lua_Hook, c_int, c_int)> {
        self.owner_writes(|| {
            if !self.handover.swap(false, Ordering::Acquire) {
                return None;
            }
            let func = self.handover_func.load(Ordering::Relaxed);
            // SAFETY: the handler stored a non-null `lua_Hook` there.
            let func = unsafe { std::mem::transmute::<usize, lua_Hook>(func) };
            Some((
                func,
                self.handover_mask.load(Ordering::Relaxed),
                self.handover_count.load(Ordering::Relaxed),
            ))
        })
    }

    /// Asks the VM's thread to install the hook (the caller, on another
    /// thread, holds the VM lock and found no hook of ours in place).
    /// Returns false if it cannot: the caller writes the hook itself.
    pub fn request(&self) -> bool {
        if !handler_in_place() {
            return false;
        }
        let now = nanos();
        if self.requested.load(Ordering::Acquire) {
            let since = now.saturating_sub(self.requested_at.load(Ordering::Relaxed));
            if since > STALE.as_nanos() as u64 && self.owner_blocks_signal() {
                // Unanswered because the thread blocks the signal (a slow
                // answer, from a thread not scheduled, is waited for: the
                // write from here is the race this module avoids).
                self.requested_at.store(now, Ordering::Relaxed);
                if self.requested.swap(false, Ordering::AcqRel) {
                    PENDING.fetch_sub(1, Ordering::AcqRel);
                }
                return false;
            }
        } else {
            self.requested_at.store(now, Ordering::Relaxed);
        }
        let _held = SIGNAL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let owner = self.owner.load(Ordering::Acquire);
        if owner == 0 {
            return false;
        }
        if !self.requested.swap(true, Ordering::AcqRel) {
            PENDING.fetch_add(1, Ordering::AcqRel);
        }
        let value = libc::sigval {
            sival_ptr: COOKIE as *mut c_void,
        };
        // SAFETY: `owner` is a live thread: it is erased from the cell by
        // its exit guard, under SIGNAL_LOCK, which we hold (module comment).
        let sent = unsafe { libc::pthread_sigqueue(owner as libc::pthread_t, SIGNAL, value) };
        SENT.fetch_add(usize::from(sent == 0), Ordering::Relaxed);
        if sent != 0 {
            if self.requested.swap(false, Ordering::AcqRel) {
                PENDING.fetch_sub(1, Ordering::AcqRel);
            }
            return false;
        }
        true
    }

    /// Whether the recorded thread blocks [`SIGNAL`] (from its
    /// `/proc/self/task/TID/status`); false if that cannot be read.
    fn owner_blocks_signal(&self) -> bool {
        let tid = self.owner_tid.load(Ordering::Relaxed);
        let Ok(status) = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")) else {
            return false;
        };
        status
            .lines()
            .find_map(|line| line.strip_prefix("SigBlk:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & (1u64 << (SIGNAL - 1)) != 0)
    }

    /// Whether the handler installed the hook since the last call (by the
    /// VM lock's holder).
    pub fn take_installed(&self) -> bool {
        self.installed.swap(false, Ordering::Relaxed)
    }

    /// In the handler, on thread `me`: installs the hook if this cell's VM
    /// is run by `me` and asked for it.
    fn service(&self, me: usize) {
        if self.owner.load(Ordering::Relaxed) != me || !self.requested.load(Ordering::Relaxed) {
            return;
        }
        // The VM cannot close while the cell is BUSY (see `release`).
        if self
            .state
            .compare_exchange(OPEN, BUSY, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        if self.owner.load(Ordering::Relaxed) == me && self.requested.swap(false, Ordering::AcqRel)
        {
            PENDING.fetch_sub(1, Ordering::AcqRel);
            if !self.owner_writing.load(Ordering::Relaxed)
                && !self.user_changing.load(Ordering::Relaxed)
            {
                // SAFETY: the anchor lives until the VM closes, which waits
                // for BUSY to end; this is the VM's thread, so the
                // read-modify-writes below are atomic with respect to its
                // own (module comment).
                unsafe { self.install_hook(self.anchor.load(Ordering::Relaxed)) };
            }
        }
        self.state.store(OPEN, Ordering::Release);
    }

    /// Installs our hook, armed, handing over a foreign hook to chain.
    ///
    /// # Safety
    /// `state` is alive; the caller is the VM's thread, in the handler.
    unsafe fn install_hook(&self, state: *mut lua_State) {
        if ours_fires(state) {
            // Ours fires by itself (at least every LAZY_COUNT instructions).
            return;
        }
        let current = ffi::lua_gethook(state);
        if let Some(func) = current {
            let mask = ffi::lua_gethookmask(state);
            if mask != 0 {
                self.handover_func.store(func as usize, Ordering::Relaxed);
                self.handover_mask.store(mask, Ordering::Relaxed);
                self.handover_count
                    .store(ffi::lua_gethookcount(state), Ordering::Relaxed);
                self.handover.store(true, Ordering::Release);
            }
        }
        set_hook(state, Some(hook), DELIVERY_MASK, 1);
        self.installed.store(true, Ordering::Relaxed);
    }
}
