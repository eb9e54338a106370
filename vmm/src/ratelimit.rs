//! Rate-limited warnings: at most one log line per interval (a second by
//! default) per cause, the next one saying how many were suppressed since.
//!
//! A guest can make the VMM see the same problem thousands of times a
//! second (a flood of bad agent lines, a corrupt mailbox ring rung on
//! every doorbell); logging each would turn one guest action into
//! unbounded work on the host. Causes are `&'static str`s named in the
//! code, so a limiter's table stays as small as the code that uses it.
//!
//! The clock is injectable ([`Clock`]) so tests can step time.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One log line per cause per this long, by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// Where a [`RateLimiter`] reads the time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now.
    fn now(&self) -> Instant;
}

/// The monotonic system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told (tests).
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<Mutex<Instant>>);

impl Default for ManualClock {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Instant::now())))
    }
}

impl ManualClock {
    /// A clock standing at the current instant.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by` (every clone sees it).
    pub fn advance(&self, by: Duration) {
        let mut t = crate::bus::lock(&self.0);
        *t += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *crate::bus::lock(&self.0)
    }
}

#[derive(Debug)]
struct CauseState {
    cause: &'static str,
    last: Instant,
    suppressed: u64,
}

/// Decides which occurrences of each cause get a log line.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    clock: Arc<dyn Clock>,
    causes: Vec<CauseState>,
    /// Occurrences not logged, all causes, ever.
    total_suppressed: u64,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new(DEFAULT_INTERVAL, Arc::new(SystemClock))
    }
}

impl RateLimiter {
    /// A limiter allowing one line per `interval` per cause, timed by `clock`.
    pub fn new(interval: Duration, clock: Arc<dyn Clock>) -> Self {
        Self {
            interval,
            clock,
            causes: Vec::new(),
            total_suppressed: 0,
        }
    }

    /// One more occurrence of `cause`: `Some(n)` if it should be logged
    /// now, `n` being the occurrences suppressed since the last logged
    /// one; `None` if it is suppressed.
    pub fn check(&mut self, cause: &'static str) -> Option<u64> {
        let now = self.clock.now();
        let Some(state) = self.causes.iter_mut().find(|c| c.cause == cause) else {
            self.causes.push(CauseState {
                cause,
                last: now,
                suppressed: 0,
            });
            return Some(0);
        };
        if now.saturating_duration_since(state.last) >= self.interval {
            state.last = now;
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed += 1;
            self.total_suppressed += 1;
            None
        }
    }

    /// Logs `args` at warning level unless `cause` was logged less than an
    /// interval ago; a logged line says how many were suppressed before it.
    /// Returns whether it logged. Guest text in `args` must be escaped by
    /// the caller (`{:?}`, `escape_debug`).
    pub fn warn(&mut self, cause: &'static str, args: fmt::Arguments<'_>) -> bool {
        match self.check(cause) {
            Some(0) => {
                log::warn!("{args}");
                true
            }
            Some(n) => {
                log::warn!("{args} ({n} more suppressed)");
                true
            }
            None => false,
        }
    }

    /// Occurrences suppressed so far, all causes.
    pub fn total_suppressed(&self) -> u64 {
        self.total_suppressed
    }
}

/// Guest-supplied bytes as printable text: lossy UTF-8, escaped like
/// `str::escape_debug` (control characters, quotes and non-printables
/// become escapes), cut to `max` characters with a `...` mark.
pub fn escape_guest(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == max {
            out.push_str("...");
            break;
        }
        out.extend(c.escape_debug());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_per_cause_with_the_suppressed_count() {
        let clock = ManualClock::new();
        let mut rl = RateLimiter::new(Duration::from_secs(1), Arc::new(clock.clone()));
        assert_eq!(rl.check("a"), Some(0));
        for _ in 0..1000 {
            assert_eq!(rl.check("a"), None);
        }
        // Another cause has its own budget.
        assert_eq!(rl.check("b"), Some(0));
        clock.advance(Duration::from_millis(999));
        assert_eq!(rl.check("a"), None);
        clock.advance(Duration::from_millis(1));
        assert_eq!(rl.check("a"), Some(1001));
        assert_eq!(rl.check("a"), None);
        clock.advance(Duration::from_secs(5));
        assert_eq!(rl.check("a"), Some(1));
        assert_eq!(rl.check("b"), Some(0));
        assert_eq!(rl.total_suppressed(), 1002);
    }

    #[test]
    fn warn_logs_only_what_check_allows() {
        let clock = ManualClock::new();
        let mut rl = RateLimiter::new(Duration::from_secs(1), Arc::new(clock.clone()));
        let logged = (0..10_000)
            .filter(|i| rl.warn("flood", format_args!("bad thing {i}")))
            .count();
        assert_eq!(logged, 1);
        clock.advance(Duration::from_secs(1));
        assert!(rl.warn("flood", format_args!("bad thing again")));
    }

    #[test]
    fn guest_text_is_escaped_and_cut() {
        assert_eq!(escape_guest(b"ok", 10), "ok");
        assert_eq!(
            escape_guest(b"\x1b[2J\nevil\"\xff", 100),
            "\\u{1b}[2J\\nevil\\\"\u{fffd}"
        );
        assert_eq!(escape_guest(b"abcdef", 3), "abc...");
    }
}
