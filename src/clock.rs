//! corowatch's clock: monotonic nanoseconds in a `u64`, the unit of every
//! deadline on the chain and in its mirror.
//!
//! A watched resume reads the clock once, adds a limit and compares
//! deadlines; in `Instant`s each step goes through a `timespec`. A `u64`
//! is one `clock_gettime` and plain arithmetic, and fits in one atomic for
//! the mirror. The watchdog, which sleeps on `Instant`s, converts at its
//! border ([`to_instant`]). Where it can, the clock is the processor's
//! time-stamp counter, scaled ([`crate::tsc`]).

use std::time::{Duration, Instant};

/// Nanoseconds on the monotonic clock.
pub type Nanos = u64;

/// A deadline that never comes.
pub const NEVER: Nanos = u64::MAX;

/// Now: the time-stamp counter where it serves (see [`crate::tsc`]),
/// else `CLOCK_MONOTONIC`.
#[inline]
pub fn now() -> Nanos {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        if let Some(scale) = crate::tsc::scale() {
            return scale.now();
        }
        let now = monotonic();
        crate::tsc::learn(now, monotonic);
        now
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    monotonic()
}

/// Which clock [`now`] reads (`"tsc"` or `"monotonic"`) and its reading,
/// in seconds (specs compare its spans with another clock's).
pub fn describe() -> (&'static str, f64) {
    let now = now();
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    let source = if crate::tsc::in_use() {
        "tsc"
    } else {
        "monotonic"
    };
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    let source = "monotonic";
    (source, now as f64 / 1e9)
}

/// `CLOCK_MONOTONIC`, in nanoseconds.
#[inline]
pub fn monotonic() -> Nanos {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid timespec to write; CLOCK_MONOTONIC always
    // exists on the systems we build for (Rust's `Instant` reads it too).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut time) };
    (time.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(time.tv_nsec as u64)
}

/// A limit in nanoseconds (saturated: 584 years is never).
pub fn nanos(duration: Duration) -> Nanos {
    u64::try_from(duration.as_nanos()).unwrap_or(NEVER)
}

/// `at + span`, saturating at [`NEVER`].
#[inline]
pub fn after(at: Nanos, span: Nanos) -> Nanos {
    at.saturating_add(span)
}

/// The `Instant` of `at` (on the same monotonic clock), `None` for
/// [`NEVER`].
pub fn to_instant(at: Nanos) -> Option<Instant> {
    if at == NEVER {
        return None;
    }
    let (instant, now) = (Instant::now(), now());
    Some(match at.checked_sub(now) {
        Some(ahead) => instant + Duration::from_nanos(ahead),
        None => instant
            .checked_sub(Duration::from_nanos(now - at))
            .unwrap_or(instant),
    })
}
