//! Kernel uevents: the `NETLINK_KOBJECT_UEVENT` socket and a parser that
//! turns messages into typed CPU events.
//!
//! A kernel uevent is one datagram of NUL-separated fields:
//! `add@/devices/system/cpu/cpu2\0ACTION=add\0DEVPATH=/devices/system/cpu/cpu2\0SUBSYSTEM=cpu\0SEQNUM=1234\0`.
//! The parser never panics: anything malformed is an `Err`, and the caller
//! drops it.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use thiserror::Error;

/// Netlink multicast group of kernel-originated uevents.
pub const KERNEL_GROUP: u32 = 1;
/// Receive buffer asked for, so a burst of hotplug events is not dropped.
const RCVBUF: libc::c_int = 1 << 20;

/// Why a datagram is not a usable kernel uevent.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    /// The datagram is empty.
    #[error("empty message")]
    Empty,
    /// A udev daemon's rebroadcast (binary header), not a kernel message.
    #[error("libudev message, not from the kernel")]
    Libudev,
    /// The first field is not `action@devpath`.
    #[error("bad header {0:?}")]
    BadHeader(String),
    /// An `ACTION=` or `DEVPATH=` field contradicts the header.
    #[error("{0} field contradicts the header")]
    Mismatch(&'static str),
}

/// A parsed kernel uevent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    /// `add`, `remove`, `online`, `offline`, `change`, `bind`...
    pub action: String,
    /// Device path below `/sys`, e.g. `/devices/system/cpu/cpu2`.
    pub devpath: String,
    /// `SUBSYSTEM=`, if given.
    pub subsystem: Option<String>,
    /// `SEQNUM=`, if given and numeric.
    pub seqnum: Option<u64>,
    /// All `KEY=value` fields in order (including the ones above).
    pub vars: Vec<(String, String)>,
}

impl Uevent {
    /// Parses one datagram.
    pub fn parse(buf: &[u8]) -> Result<Self, ParseError> {
        if buf.iter().all(|&b| b == 0) {
            return Err(ParseError::Empty);
        }
        if buf.starts_with(b"libudev\0") {
            return Err(ParseError::Libudev);
        }
        let mut fields = buf
            .split(|&b| b == 0)
            .filter(|f| !f.is_empty())
            .map(String::from_utf8_lossy);
        let header = fields.next().ok_or(ParseError::Empty)?;
        let (action, devpath) = header
            .split_once('@')
            .filter(|(a, d)| {
                !a.is_empty() && a.bytes().all(|b| b.is_ascii_lowercase()) && d.starts_with('/')
            })
            .ok_or_else(|| ParseError::BadHeader(header.chars().take(64).collect()))?;
        let mut event = Uevent {
            action: action.to_owned(),
            devpath: devpath.to_owned(),
            subsystem: None,
            seqnum: None,
            vars: Vec::new(),
        };
        for field in fields {
            // Fields without '=' carry nothing; skip them.
            let Some((key, value)) = field.split_once('=') else {
                continue;
            };
            match key {
                "ACTION" if value != event.action => return Err(ParseError::Mismatch("ACTION")),
                "DEVPATH" if value != event.devpath => return Err(ParseError::Mismatch("DEVPATH")),
                "SUBSYSTEM" => event.subsystem = Some(value.to_owned()),
                "SEQNUM" => event.seqnum = value.parse().ok(),
                _ => {}
            }
            event.vars.push((key.to_owned(), value.to_owned()));
        }
        Ok(event)
    }

    /// The value of field `key`.
    pub fn var(&self, key: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// What happened to a CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuEventKind {
    /// The CPU device appeared (hot-add); it starts offline.
    Add,
    /// The CPU came online.
    Online,
    /// The CPU went offline.
    Offline,
    /// The CPU device disappeared (hot-remove).
    Remove,
}

/// A uevent of the `cpu` subsystem about one CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuEvent {
    /// What happened.
    pub kind: CpuEventKind,
    /// The CPU number.
    pub cpu: u32,
}

impl CpuEvent {
    /// The CPU event a uevent describes, if any: subsystem `cpu`, devpath
    /// `/devices/system/cpu/cpuN`, action add, online, offline or remove.
    pub fn from_uevent(event: &Uevent) -> Option<Self> {
        if event.subsystem.as_deref() != Some("cpu") {
            return None;
        }
        let name = event.devpath.strip_prefix("/devices/system/cpu/")?;
        let digits = name.strip_prefix("cpu")?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let cpu = digits.parse().ok()?;
        let kind = match event.action.as_str() {
            "add" => CpuEventKind::Add,
            "online" => CpuEventKind::Online,
            "offline" => CpuEventKind::Offline,
            "remove" => CpuEventKind::Remove,
            _ => return None,
        };
        Some(Self { kind, cpu })
    }

    /// Parses a datagram straight into a CPU event.
    pub fn parse(buf: &[u8]) -> Option<Self> {
        Uevent::parse(buf).ok().as_ref().and_then(Self::from_uevent)
    }
}

/// A netlink socket subscribed to kernel uevents. Opening it needs no
/// privileges.
#[derive(Debug)]
pub struct UeventSocket {
    fd: OwnedFd,
}

/// `AF_NETLINK` (16) as the `sa_family_t` field of a socket address.
#[allow(clippy::cast_possible_truncation)]
const AF_NETLINK_FAMILY: libc::sa_family_t = libc::AF_NETLINK as libc::sa_family_t;

/// The size of a socket option or address type, as the kernel takes it.
#[allow(clippy::cast_possible_truncation)] // These types are a few bytes long.
const fn socklen_of<T>() -> libc::socklen_t {
    size_of::<T>() as libc::socklen_t
}

fn new_netlink_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_KOBJECT_UEVENT,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_rcvbuf(fd: BorrowedFd<'_>, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: the option value points to a live c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const bytes).cast(),
            socklen_of::<libc::c_int>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn bind_groups(fd: BorrowedFd<'_>, groups: u32) -> io::Result<()> {
    // SAFETY: sockaddr_nl is plain data for which all-zero is valid.
    let mut addr: libc::sockaddr_nl = unsafe { MaybeUninit::zeroed().assume_init() };
    addr.nl_family = AF_NETLINK_FAMILY;
    addr.nl_groups = groups;
    // SAFETY: addr is a live, initialised sockaddr_nl and the length passed
    // is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            socklen_of::<libc::sockaddr_nl>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one datagram; returns its full length (which may exceed the
/// buffer: `MSG_TRUNC`) and the sender's netlink port id.
fn recv_from(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, u32)> {
    // SAFETY: sockaddr_nl is plain data for which all-zero is valid.
    let mut addr: libc::sockaddr_nl = unsafe { MaybeUninit::zeroed().assume_init() };
    let mut len = socklen_of::<libc::sockaddr_nl>();
    // SAFETY: buf is valid for writes of buf.len() bytes; addr and len are
    // live locals with len holding addr's size.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC,
            (&raw mut addr).cast(),
            &raw mut len,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((n.unsigned_abs(), addr.nl_pid))
}

/// One thing read from the uevent socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A kernel message of this many bytes at the start of the buffer.
    Message(usize),
    /// A datagram that was dropped: not from the kernel, or truncated.
    Dropped,
    /// Nothing is waiting (the socket is non-blocking).
    WouldBlock,
    /// The socket's buffer overflowed and events were lost: the caller
    /// should re-read the state it tracks.
    Overrun,
}

impl UeventSocket {
    /// Opens a non-blocking socket subscribed to the kernel's uevents.
    pub fn open() -> io::Result<Self> {
        let fd = new_netlink_socket()?;
        // Best effort: the default buffer also holds a few hundred events.
        let _ = set_rcvbuf(fd.as_fd(), RCVBUF);
        bind_groups(fd.as_fd(), KERNEL_GROUP)?;
        Ok(Self { fd })
    }

    /// Reads one datagram into `buf` without blocking.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        match recv_from(self.fd.as_fd(), buf) {
            Ok((n, _)) if n > buf.len() => Ok(Received::Dropped),
            // Only the kernel (port 0) sends on this group legitimately.
            Ok((_, pid)) if pid != 0 => Ok(Received::Dropped),
            Ok((n, _)) => Ok(Received::Message(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Received::WouldBlock),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Received::Dropped),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(Received::Overrun),
            Err(e) => Err(e),
        }
    }
}

impl AsFd for UeventSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADD_CPU2: &[u8] = b"add@/devices/system/cpu/cpu2\0ACTION=add\0DEVPATH=/devices/system/cpu/cpu2\0SUBSYSTEM=cpu\0SEQNUM=1812\0";

    #[test]
    fn parses_a_kernel_message() {
        let e = Uevent::parse(ADD_CPU2).unwrap();
        assert_eq!(e.action, "add");
        assert_eq!(e.devpath, "/devices/system/cpu/cpu2");
        assert_eq!(e.subsystem.as_deref(), Some("cpu"));
        assert_eq!(e.seqnum, Some(1812));
        assert_eq!(e.var("ACTION"), Some("add"));
        assert_eq!(e.vars.len(), 4);
        assert_eq!(
            CpuEvent::from_uevent(&e),
            Some(CpuEvent {
                kind: CpuEventKind::Add,
                cpu: 2
            })
        );
    }

    #[test]
    fn maps_cpu_actions() {
        let kinds = [
            ("online", Some(CpuEventKind::Online)),
            ("offline", Some(CpuEventKind::Offline)),
            ("remove", Some(CpuEventKind::Remove)),
            ("change", None),
            ("bind", None),
        ];
        for (action, kind) in kinds {
            let msg =
                format!("{action}@/devices/system/cpu/cpu17\0ACTION={action}\0SUBSYSTEM=cpu\0");
            let ev = CpuEvent::parse(msg.as_bytes());
            assert_eq!(ev.map(|e| e.kind), kind, "{action}");
            assert!(ev.is_none_or(|e| e.cpu == 17));
        }
    }

    #[test]
    fn ignores_other_devices() {
        let acpi = b"add@/devices/LNXSYSTM:00/LNXCPU:02\0ACTION=add\0SUBSYSTEM=acpi\0";
        assert_eq!(CpuEvent::parse(acpi), None);
        let cache = b"add@/devices/system/cpu/cpu2/cache\0ACTION=add\0SUBSYSTEM=cpu\0";
        assert_eq!(CpuEvent::parse(cache), None);
        let no_subsystem = b"add@/devices/system/cpu/cpu2\0ACTION=add\0";
        assert_eq!(CpuEvent::parse(no_subsystem), None);
        let cpufreq = b"add@/devices/system/cpu/cpufreq\0SUBSYSTEM=cpu\0";
        assert_eq!(CpuEvent::parse(cpufreq), None);
        let memory = b"online@/devices/system/memory/memory32\0ACTION=online\0SUBSYSTEM=memory\0";
        assert_eq!(CpuEvent::parse(memory), None);
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        type Check = fn(&ParseError) -> bool;
        let cases: &[(&[u8], Check)] = &[
            (b"", |e| *e == ParseError::Empty),
            (b"\0\0\0", |e| *e == ParseError::Empty),
            (b"libudev\0\xfe\xed\xca\xfe", |e| *e == ParseError::Libudev),
            (b"ACTION=add\0SUBSYSTEM=cpu\0", |e| {
                matches!(e, ParseError::BadHeader(_))
            }),
            (b"@/devices/system/cpu/cpu1\0", |e| {
                matches!(e, ParseError::BadHeader(_))
            }),
            (b"add@\0SUBSYSTEM=cpu\0", |e| {
                matches!(e, ParseError::BadHeader(_))
            }),
            (b"add@devices\0", |e| matches!(e, ParseError::BadHeader(_))),
            (b"ADD@/x\0", |e| matches!(e, ParseError::BadHeader(_))),
            (b"add@/devices/system/cpu/cpu1\0ACTION=remove\0", |e| {
                *e == ParseError::Mismatch("ACTION")
            }),
            (
                b"add@/devices/system/cpu/cpu1\0DEVPATH=/devices/system/cpu/cpu9\0",
                |e| *e == ParseError::Mismatch("DEVPATH"),
            ),
        ];
        for (msg, check) in cases {
            let err = Uevent::parse(msg).unwrap_err();
            assert!(check(&err), "{msg:?} gave {err:?}");
        }
    }

    #[test]
    fn tolerates_odd_but_harmless_input() {
        // Unterminated, no '=' fields, invalid UTF-8, empty fields, bad SEQNUM.
        let msg = b"online@/devices/system/cpu/cpu3\0\0junk\0SUBSYSTEM=cpu\0SEQNUM=x\0K=\xff\xfe";
        let e = Uevent::parse(msg).unwrap();
        assert_eq!(e.seqnum, None);
        assert_eq!(e.var("K"), Some("\u{fffd}\u{fffd}"));
        assert_eq!(CpuEvent::parse(msg).map(|e| e.cpu), Some(3));
        // CPU numbers that overflow or are not digits.
        let big = b"add@/devices/system/cpu/cpu99999999999\0SUBSYSTEM=cpu\0";
        assert_eq!(CpuEvent::parse(big), None);
        let signed = b"add@/devices/system/cpu/cpu+1\0SUBSYSTEM=cpu\0";
        assert_eq!(CpuEvent::parse(signed), None);
    }

    #[test]
    fn every_prefix_and_byte_flip_is_handled() {
        for end in 0..=ADD_CPU2.len() {
            let _ = Uevent::parse(&ADD_CPU2[..end]);
        }
        for i in 0..ADD_CPU2.len() {
            for b in [0u8, b'@', b'=', 0xff] {
                let mut m = ADD_CPU2.to_vec();
                m[i] = b;
                let _ = CpuEvent::parse(&m);
            }
        }
    }

    #[test]
    fn socket_opens_unprivileged_and_does_not_block() {
        match UeventSocket::open() {
            Ok(sock) => {
                let mut buf = [0u8; 8192];
                // Drain whatever the host happens to send; must not block.
                for _ in 0..64 {
                    if sock.recv(&mut buf).unwrap() == Received::WouldBlock {
                        break;
                    }
                }
            }
            // Some sandboxes forbid netlink; the parser tests still run.
            Err(e) => println!("SKIP: no uevent socket here: {e}"),
        }
    }
}
