//! Lines from the kernel log buffer that `quiet` keeps off the console.
//!
//! The boot test needs "smpboot: Allowing 8 CPUs, 6 hotplug CPUs" (an
//! info-level message). Rather than raise the console log level (every
//! console line costs ~15 ms nested), the agent reads the log buffer once
//! with `klogctl(SYSLOG_ACTION_READ_ALL)` and prints the one line it needs
//! as `GUEST-KMSG <text>`.

use std::io;

/// `SYSLOG_ACTION_READ_ALL`: read the whole ring buffer, non-destructively.
const READ_ALL: libc::c_int = 3;
/// `SYSLOG_ACTION_SIZE_BUFFER`: the ring buffer's size.
const SIZE_BUFFER: libc::c_int = 10;
/// Ceiling on the buffer read, whatever the kernel says.
const MAX_BUFFER: usize = 4 << 20;
/// What the kernel prints about possible and hotpluggable CPUs.
pub const SMPBOOT_ALLOWING: &str = "smpboot: Allowing ";

fn klogctl(cmd: libc::c_int, buf: &mut [u8]) -> io::Result<usize> {
    let len = libc::c_int::try_from(buf.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: buf is valid for writes of `len` bytes (len <= buf.len());
    // with a zero length the kernel does not touch it.
    let rc = unsafe { libc::klogctl(cmd, buf.as_mut_ptr().cast(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc.unsigned_abs() as usize)
}

/// The kernel log buffer as text (needs CAP_SYSLOG or a permissive
/// `dmesg_restrict`).
pub fn read_kernel_log() -> io::Result<String> {
    let size = klogctl(SIZE_BUFFER, &mut [])?.clamp(4096, MAX_BUFFER);
    let mut buf = vec![0u8; size];
    let n = klogctl(READ_ALL, &mut buf)?;
    buf.truncate(n);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The text of the last log line containing `needle`, from `needle` to
/// the end of that line (dropping the `<6>[    0.1234] ` prefix).
pub fn find_message<'a>(log: &'a str, needle: &str) -> Option<&'a str> {
    log.lines()
        .rev()
        .find_map(|line| line.find(needle).map(|at| line[at..].trim_end()))
}

/// The `GUEST-KMSG` console line for the smpboot CPU count, if the log
/// has it.
pub fn smpboot_line() -> Option<String> {
    let log = read_kernel_log().ok()?;
    find_message(&log, SMPBOOT_ALLOWING).map(|m| format!("GUEST-KMSG {m}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "<6>[    0.000000] Linux version 6.1.0-56-cloud-amd64\n\
<6>[    0.012000] smpboot: Allowing 8 CPUs, 6 hotplug CPUs\n\
<6>[    0.150000] smp: Bringing up secondary CPUs ...\n";

    #[test]
    fn finds_the_smpboot_line() {
        assert_eq!(
            find_message(LOG, SMPBOOT_ALLOWING),
            Some("smpboot: Allowing 8 CPUs, 6 hotplug CPUs")
        );
        assert_eq!(find_message(LOG, "nothing like this"), None);
        assert_eq!(find_message("", SMPBOOT_ALLOWING), None);
        // Carriage returns and the last occurrence.
        let log = "smpboot: Allowing 1 CPUs\r\nx smpboot: Allowing 2 CPUs, 1 hotplug CPUs\r\n";
        assert_eq!(
            find_message(log, SMPBOOT_ALLOWING),
            Some("smpboot: Allowing 2 CPUs, 1 hotplug CPUs")
        );
    }

    #[test]
    fn reading_the_log_never_panics() {
        // Unprivileged or sandboxed: an error; as root on a host: text.
        match read_kernel_log() {
            Ok(text) => assert!(text.len() <= MAX_BUFFER),
            Err(e) => println!("no kernel log here: {e}"),
        }
        let _ = smpboot_line();
    }
}
