//! The VMM process's own resource use, read from `/proc/self`, served as
//! metrics so a soak run can see leaks from outside (also when the VMM
//! runs inside an emulated host).

/// Open fds, threads and resident memory of this process.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ProcessStats {
    /// Open file descriptors.
    pub open_fds: u64,
    /// Threads.
    pub threads: u64,
    /// Resident memory in bytes (guest memory included).
    pub resident_bytes: u64,
    /// Of that, guest memory.
    pub guest_resident_bytes: u64,
}

impl ProcessStats {
    /// This process's figures (zeros where `/proc` cannot be read).
    pub fn read() -> Self {
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        Self::from_status(&status, open_fds)
    }

    /// The figures in a `/proc/PID/status` text.
    pub fn from_status(status: &str, open_fds: u64) -> Self {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Self {
            open_fds,
            threads: field("Threads:"),
            resident_bytes: field("VmRSS:").saturating_mul(1024),
            guest_resident_bytes: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read() {
        let s = ProcessStats::from_status("Name:\tvmm\nVmRSS:\t  5120 kB\nThreads:\t7\n", 12);
        assert_eq!(
            s,
            ProcessStats {
                open_fds: 12,
                threads: 7,
                resident_bytes: 5120 * 1024,
                guest_resident_bytes: 0,
            }
        );
        let me = ProcessStats::read();
        assert!(me.open_fds > 0 && me.threads > 0 && me.resident_bytes > 0);
    }
}
