//! LuaJIT: a VM's dispatch probes (see [`crate::probe`]): registered on
//! the VM's thread, sampled by the watchdog under the VM lock, and
//! turned into a kill by the hook.

use std::time::Instant;

use super::{ProbeTarget, Vm, VmInner};
use crate::arming::Side;
use crate::clock::{self, Nanos, NEVER};
use crate::probe::{Probe, Sample, MAX_PROBES};
use crate::watchdog::{self, Sampler};

/// What registering a probe did.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// A new probe, at this index: its function goes at index + 1 of the
    /// registry's probe table.
    New(usize),
    /// The probe reading this count was there already; it took the limit.
    Known,
    /// No room, or the VM is closing.
    Refused,
}

impl Vm {
    /// Registers the probe whose count, limit and chain length are at
    /// these addresses (see [`crate::probe::locate`]), or tells the one registered that its
    /// loop may deliver with a limit as small as `limit`.
    ///
    /// # Safety
    /// The addresses come from `locate` on this VM's thread, for a function
    /// the caller anchors until `lua_close` when this returns `New`.
    pub unsafe fn add_probe(
        &self,
        count: usize,
        limit_at: usize,
        chain_length_at: usize,
        limit: Nanos,
    ) -> Registered {
        let mut inner = self.lock();
        if inner.closed {
            return Registered::Refused;
        }
        if let Some(probe) = inner.probes.iter_mut().find(|probe| probe.reads(count)) {
            if probe.announce(limit) {
                // Sampled less often until now: the next sample must not
                // wait for the old period.
                let me: std::sync::Weak<dyn Sampler> = self.me.clone();
                watchdog::schedule_sample(me, Instant::now());
            }
            return Registered::Known;
        }
        if inner.probes.len() >= MAX_PROBES {
            return Registered::Refused;
        }
        inner.probes.push(Probe::new(count, limit_at, limit));
        self.mirror.add_probe(chain_length_at);
        if !inner.sampling {
            inner.sampling = true;
            let me: std::sync::Weak<dyn Sampler> = self.me.clone();
            watchdog::schedule_sample(me, Instant::now());
        }
        Registered::New(inner.probes.len() - 1)
    }
}

impl Sampler for Vm {
    fn sample(&self) -> Option<Instant> {
        let mut inner = self.lock();
        if inner.closed {
            inner.sampling = false;
            return None;
        }
        let now = clock::now();
        let mut next = NEVER;
        let mut stalled = false;
        for probe in &mut inner.probes {
            // SAFETY: the VM is not closed and we hold its lock: every
            // probe's upvalues are alive (see `crate::probe`).
            let (sample, at) = unsafe { probe.sample(now) };
            stalled |= sample == Sample::Stalled;
            next = next.min(at);
        }
        if stalled {
            inner.arm_vm(Side::Afar);
        }
        clock::to_instant(next)
    }
}

impl VmInner {
    /// The index of a probe whose kill is due on the running thread, if
    /// any: its count stands and `target(index)` says its coroutine runs.
    /// A probe whose delivery is over, or whose coroutine is gone, settles;
    /// one whose coroutine's state is unsure is timed again.
    ///
    /// # Safety
    /// On the VM's own thread, in its hook, the VM not closed.
    pub(super) unsafe fn probe_kill(
        &mut self,
        now: Nanos,
        mut target: impl FnMut(usize) -> ProbeTarget,
    ) -> Option<usize> {
        for (index, probe) in self.probes.iter_mut().enumerate() {
            // SAFETY: the caller's contract (see `crate::probe`).
            if unsafe { probe.kill_due(now) } {
                match target(index) {
                    ProbeTarget::Runs => return Some(index),
                    // SAFETY: as above.
                    ProbeTarget::Gone => unsafe { probe.settled() },
                    ProbeTarget::Unsure => probe.retime(now),
                }
            }
        }
        None
    }

    /// Whether a probe's kill is due: the VM-wide hook must stay on.
    pub(super) fn probe_due(&self) -> bool {
        self.probes.iter().any(Probe::is_due)
    }
}
