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
    /// The fd table's size (`FDSize`), the bound for counting open fds.
    pub fd_table: u64,
}

/// Reads this process's figures with no `open` after it was made (the
/// VMM thread's seccomp filter allows none): `/proc/self/status` stays
/// open and is read again with `pread`, and open fds are counted with
/// `F_GETFD` up to the fd table's size.
#[derive(Debug)]
pub struct ProcessProbe {
    status: Option<std::fs::File>,
}

impl ProcessProbe {
    /// Opens `/proc/self/status` (do it before any seccomp filter).
    pub fn open() -> Self {
        Self {
            status: std::fs::File::open("/proc/self/status").ok(),
        }
    }

    /// This process's figures (zeros where `/proc` could not be read).
    pub fn read(&self) -> ProcessStats {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; 8192];
        let n = self
            .status
            .as_ref()
            .and_then(|f| f.read_at(&mut buf, 0).ok())
            .unwrap_or(0);
        let status = String::from_utf8_lossy(&buf[..n]);
        let fd_table = ProcessStats::from_status(&status, 0).fd_table;
        ProcessStats::from_status(&status, count_open_fds(fd_table))
    }
}

/// Open fds below `limit` (at most 65536 checked).
fn count_open_fds(limit: u64) -> u64 {
    let limit = i32::try_from(limit.min(65536)).unwrap_or(0);
    // SAFETY: F_GETFD only reads the descriptor's flags; any int is a
    // valid argument (closed ones answer EBADF).
    (0..limit)
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
        .count() as u64
}

impl ProcessStats {
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
            fd_table: field("FDSize:"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_are_read() {
        let s = ProcessStats::from_status(
            "Name:\tvmm\nFDSize:\t64\nVmRSS:\t  5120 kB\nThreads:\t7\n",
            12,
        );
        assert_eq!(
            s,
            ProcessStats {
                open_fds: 12,
                threads: 7,
                resident_bytes: 5120 * 1024,
                guest_resident_bytes: 0,
                fd_table: 64,
            }
        );
        let probe = ProcessProbe::open();
        let me = probe.read();
        assert!(me.open_fds >= 3 && me.threads > 0 && me.resident_bytes > 0);
        // Other tests of this process open and close files at the same
        // time: open many, and allow for their few.
        const EXTRA: u64 = 256;
        const SLACK: u64 = 32;
        let extra: Vec<_> = (0..EXTRA)
            .map(|_| std::fs::File::open("/proc/self/status").unwrap())
            .collect();
        let with = probe.read().open_fds;
        assert!(
            with + SLACK >= me.open_fds + EXTRA && with <= me.open_fds + EXTRA + SLACK,
            "{} fds, then {with} with {EXTRA} more",
            me.open_fds
        );
        drop(extra);
    }
}
