//! The processor's time-stamp counter as corowatch's clock, where the
//! kernel keeps time with it: reading it costs 11 ns here against 28 ns for
//! `clock_gettime`, and a watched resume reads the clock once.
//!
//! The counter's rate is learnt, not asked for: the first clock read
//! pairs the counter with `CLOCK_MONOTONIC`; reads go on through
//! `clock_gettime` until [`CALIBRATION`] has passed, and the first read
//! after that pairs them again and derives the rate (to about a millionth,
//! the pairs' jitter over the span). From then on the clock is the second
//! pair's monotonic time plus the counter's advance since, at that rate:
//! the two clocks agree where they meet, and the switch moves no deadline.
//! They drift apart afterwards by the rate's error and by NTP's slewing of
//! `CLOCK_MONOTONIC` (at most 0.05 %); nothing compares them but
//! [`crate::clock::to_instant`], which converts a span, not a point.
//!
//! Used only where the kernel's own clocksource is `tsc` (the kernel
//! checked that the counter is constant-rate, keeps counting in sleep
//! states and agrees across processors, and watches it) and the processor
//! says `constant_tsc` and `nonstop_tsc`; `COROWATCH_CLOCK=monotonic` in
//! the environment turns it off.

use std::sync::OnceLock;
use std::time::Duration;

/// How long the counter is watched before its rate is trusted.
const CALIBRATION: Duration = Duration::from_millis(50);

/// A reading of the counter and of the monotonic clock at one moment.
#[derive(Clone, Copy)]
struct Pair {
    ticks: u64,
    nanos: u64,
}

/// The counter's scale: nanoseconds = `origin.nanos` + (ticks since
/// `origin.ticks`) × `nanos_per_tick_q32` / 2^32.
pub struct Scale {
    origin: Pair,
    nanos_per_tick_q32: u64,
}

impl Scale {
    /// Now, from the counter.
    #[inline]
    pub fn now(&self) -> u64 {
        let ticks = read();
        // Signed: another processor's counter may be a few ticks behind
        // the one that took the origin.
        let since = ticks.wrapping_sub(self.origin.ticks) as i64 as i128;
        let nanos = (since * self.nanos_per_tick_q32 as i128) >> 32;
        (self.origin.nanos as i128 + nanos).max(0) as u64
    }
}

static SCALE: OnceLock<Scale> = OnceLock::new();
static USABLE: OnceLock<bool> = OnceLock::new();
static FIRST: OnceLock<Pair> = OnceLock::new();

/// The counter's scale, once it is learnt.
#[inline]
pub fn scale() -> Option<&'static Scale> {
    SCALE.get()
}

/// Whether the clock is the counter now (specs, diagnostics).
pub fn in_use() -> bool {
    SCALE.get().is_some()
}

/// A clock read through `clock_gettime` (`monotonic`, which returned
/// `now`, in nanoseconds) while the scale is not known: takes the first
/// pair, or the second once [`CALIBRATION`] has passed and learns the
/// scale from both.
#[cold]
pub fn learn(now: u64, monotonic: fn() -> u64) {
    if !*USABLE.get_or_init(usable) {
        return;
    }
    let Some(first) = FIRST.get() else {
        if let Some(pair) = pair(monotonic) {
            let _ = FIRST.set(pair);
        }
        return;
    };
    if now.saturating_sub(first.nanos) < CALIBRATION.as_nanos() as u64 {
        return;
    }
    let Some(second) = pair(monotonic) else {
        return;
    };
    let ticks = second.ticks.saturating_sub(first.ticks);
    let nanos = second.nanos.saturating_sub(first.nanos);
    if ticks == 0 || nanos == 0 {
        return;
    }
    let Ok(nanos_per_tick_q32) = u64::try_from((u128::from(nanos) << 32) / u128::from(ticks))
    else {
        return;
    };
    let _ = SCALE.set(Scale {
        origin: second,
        nanos_per_tick_q32,
    });
}

/// The counter.
#[inline]
fn read() -> u64 {
    // SAFETY: RDTSC reads a register; it exists on every x86_64 processor,
    // and the kernel lets user code run it where its clocksource is the
    // counter (checked by `usable` before the first read).
    unsafe { std::arch::x86_64::_rdtsc() }
}

/// The counter and the monotonic clock read together: the monotonic read
/// between two counter reads close enough that no preemption came between
/// (a few tries); `None` if none was.
fn pair(monotonic: fn() -> u64) -> Option<Pair> {
    for _ in 0..8 {
        let before = read();
        let nanos = monotonic();
        let after = read();
        // A clock_gettime takes about 100 ticks: 5000 means something
        // else ran in between.
        if after.wrapping_sub(before) < 5000 {
            return Some(Pair {
                ticks: before + (after - before) / 2,
                nanos,
            });
        }
    }
    None
}

/// Whether the counter may serve as the clock (see the module comment).
fn usable() -> bool {
    if std::env::var_os("COROWATCH_CLOCK").is_some_and(|value| value == "monotonic") {
        return false;
    }
    let source =
        std::fs::read_to_string("/sys/devices/system/clocksource/clocksource0/current_clocksource");
    if source.map_or(true, |source| source.trim() != "tsc") {
        return false;
    }
    let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
        return false;
    };
    let flags = cpuinfo.lines().find(|line| line.starts_with("flags"));
    flags.is_some_and(|flags| {
        let has = |flag: &str| flags.split_whitespace().any(|word| word == flag);
        has("constant_tsc") && has("nonstop_tsc")
    })
}
