//! Where CPU events come from.
//!
//! [`Topology`] is what a CPU source offers: the possible and online CPUs,
//! a way to bring one up or down, and a stream of events. The real Linux
//! implementation (sysfs `cpu/possible`, `cpu/online`, `cpuN/online` and
//! kernel uevents for `/devices/system/cpu/cpuN`) lives with the guest
//! agent; [`SimTopology`](crate::SimTopology) simulates one for tests.

use std::fmt;
use std::io;
use std::time::Duration;

use thiserror::Error;

/// Errors of a topology source.
#[derive(Debug, Error)]
pub enum TopologyError {
    /// The CPU is not a possible CPU.
    #[error("unknown CPU {0}")]
    UnknownCpu(u32),
    /// Bringing the CPU up failed (the write of 1 to `cpuN/online`).
    #[error("CPU {0} did not come up")]
    OnlineRefused(u32),
    /// Taking the CPU down failed (the write of 0 to `cpuN/online`).
    #[error("CPU {0} did not go down")]
    OfflineRefused(u32),
    /// Reading or writing a file failed.
    #[error("cannot access {path}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A CPU list (`0-3,5`) could not be parsed.
    #[error("malformed CPU list {0:?}")]
    Parse(String),
    /// The event source is gone.
    #[error("the event source is closed")]
    Closed,
}

/// What happened to a CPU, as a uevent `ACTION` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuEventKind {
    /// A CPU device appeared (ACPI hot-add); it starts offline.
    Added,
    /// A CPU device disappeared (hot-remove); it is offline.
    Removed,
    /// The CPU came up.
    Online,
    /// The CPU went down.
    Offline,
}

/// One CPU event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CpuEvent {
    /// The CPU.
    pub cpu: u32,
    /// What happened.
    pub kind: CpuEventKind,
}

/// A source of CPU topology and CPU events.
///
/// Events include the echoes of the source's own [`set_online`]
/// (the kernel sends a uevent for every change); a consumer checks
/// [`is_online`] before acting on one, since it may be stale.
///
/// [`set_online`]: Topology::set_online
/// [`is_online`]: Topology::is_online
pub trait Topology: Send + Sync + fmt::Debug {
    /// The possible CPUs, ascending (`/sys/devices/system/cpu/possible`).
    fn possible_cpus(&self) -> Result<Vec<u32>, TopologyError>;

    /// The online CPUs, ascending (`/sys/devices/system/cpu/online`).
    fn online_cpus(&self) -> Result<Vec<u32>, TopologyError>;

    /// Whether `cpu` is online now (`cpuN/online`; CPU 0 often has no such
    /// file and is always online).
    fn is_online(&self, cpu: u32) -> Result<bool, TopologyError>;

    /// Brings `cpu` up or down (writes 1 or 0 to `cpuN/online`). Setting
    /// the state it already has succeeds.
    fn set_online(&self, cpu: u32, online: bool) -> Result<(), TopologyError>;

    /// The next event, waiting at most `timeout`; `None` on timeout.
    fn next_event(&self, timeout: Duration) -> Result<Option<CpuEvent>, TopologyError>;
}

/// Parses a kernel CPU list such as `0-3,5,7-8` (an empty list is empty).
pub fn parse_cpu_list(text: &str) -> Result<Vec<u32>, TopologyError> {
    let bad = || TopologyError::Parse(text.to_owned());
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo, hi),
            None => (part, part),
        };
        let lo: u32 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u32 = hi.trim().parse().map_err(|_| bad())?;
        if lo > hi {
            return Err(bad());
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,5\n").unwrap(), vec![0, 1, 2, 3, 5]);
        assert_eq!(parse_cpu_list("7").unwrap(), vec![7]);
        assert_eq!(parse_cpu_list("").unwrap(), Vec::<u32>::new());
        assert_eq!(parse_cpu_list("2,0-1").unwrap(), vec![0, 1, 2]);
    }

    #[test]
    fn rejects_malformed_lists() {
        for bad in ["a", "3-1", "1-", "-2", "1,,x"] {
            assert!(
                matches!(parse_cpu_list(bad), Err(TopologyError::Parse(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            TopologyError::OfflineRefused(4).to_string(),
            "CPU 4 did not go down"
        );
        assert_eq!(
            TopologyError::Parse("x".into()).to_string(),
            "malformed CPU list \"x\""
        );
    }
}
