//! The agent's link to the VMM: `/dev/ttyS1` (the VMM's COM2, a 16550),
//! raw mode, 115200 8N1, no echo, line-delimited JSON (`agent_proto::agent`).
//!
//! The descriptor is non-blocking. Outgoing lines are queued and written
//! as far as the tty takes them ([`Channel::flush`]); the event loop polls
//! for writability while anything is queued, so a slow UART (one VM exit
//! per byte) never blocks the agent. Incoming bytes are split into lines
//! by [`LineDecoder`](agent_proto::agent::LineDecoder); decoding them is the caller's business.
//!
//! With the VMM's mailbox attached ([`Channel::attach_mailbox`]) the bytes
//! go through its shared-memory rings instead and the UART carries one
//! doorbell byte per flush (see `agent_proto::mailbox`): a few VM exits per
//! message instead of one or two per byte.

use std::ffi::CString;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use agent_proto::agent::Line;
use agent_proto::mailbox::{Inbound, DOORBELL};
use thiserror::Error;

use crate::mailbox::GuestMailbox;

/// How soon to retry pushing bytes into a full mailbox ring (the VMM
/// empties it as soon as it reads the doorbell).
pub const RING_RETRY: std::time::Duration = std::time::Duration::from_millis(2);

/// The guest's side of the VMM's agent UART.
pub const DEFAULT_PATH: &str = "/dev/ttyS1";
/// Outgoing bytes kept at most; beyond that new lines are dropped (the
/// VMM is not reading, and memory is better spent elsewhere).
pub const MAX_QUEUED: usize = 64 * 1024;

/// Why the channel could not be opened.
#[derive(Debug, Error)]
pub enum ChannelError {
    /// open(2) failed (no such UART, or no hardware behind it: EIO).
    #[error("cannot open {path}")]
    Open {
        /// The device.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The terminal settings could not be applied.
    #[error("cannot set raw mode on {path}")]
    Termios {
        /// The device.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A line-oriented, non-blocking link to the VMM.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
    inbound: Inbound,
    out: Vec<u8>,
    dropped_out: u64,
    mailbox: Option<GuestMailbox>,
    /// Bytes went into the ring; their doorbell is not written yet.
    doorbell_owed: bool,
}

fn open_nonblocking(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC;
    // SAFETY: c is a NUL-terminated path that outlives the call.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly opened descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn get_termios(fd: BorrowedFd<'_>) -> io::Result<libc::termios> {
    let mut t = MaybeUninit::<libc::termios>::zeroed();
    // SAFETY: t is valid for writes of one termios.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), t.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: tcgetattr succeeded and filled the structure (which was
    // zeroed before anyway).
    Ok(unsafe { t.assume_init() })
}

fn set_termios(fd: BorrowedFd<'_>, t: &libc::termios) -> io::Result<()> {
    // SAFETY: t points to a live, initialised termios.
    if unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSANOW, t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn make_raw(t: &mut libc::termios) {
    // SAFETY: t is a live termios; cfmakeraw only edits its flags.
    unsafe { libc::cfmakeraw(t) };
    // The speed bits directly: the libc crate binds cfset*speed to
    // versioned glibc symbols that a static link cannot resolve.
    t.c_cflag = (t.c_cflag & !libc::CBAUD) | libc::B115200;
    t.c_ispeed = libc::B115200;
    t.c_ospeed = libc::B115200;
    t.c_cflag &= !(libc::CSIZE | libc::PARENB | libc::CSTOPB | libc::CRTSCTS);
    t.c_cflag |= libc::CS8 | libc::CREAD | libc::CLOCAL;
    t.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
}

/// Puts the terminal `fd` in raw mode, 115200 8N1, no echo, no flow
/// control, and drops whatever was pending in either direction.
pub fn set_raw(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut t = get_termios(fd)?;
    make_raw(&mut t);
    set_termios(fd, &t)?;
    // SAFETY: tcflush takes a descriptor and a constant.
    unsafe { libc::tcflush(fd.as_raw_fd(), libc::TCIOFLUSH) };
    Ok(())
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl with F_GETFL takes no pointer.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl with F_SETFL takes an int.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn read_some(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.unsigned_abs())
}

fn write_some(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for reads of buf.len() bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.unsigned_abs())
}

/// What one [`Channel::read_lines`] call got.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Incoming {
    /// Complete lines (oversized ones as [`Line::Oversized`]).
    pub lines: Vec<Line>,
    /// The peer hung up (end of file).
    pub closed: bool,
}

impl Channel {
    /// Opens the UART at `path` and sets raw mode.
    pub fn open_tty(path: &Path) -> Result<Self, ChannelError> {
        let fd = open_nonblocking(path).map_err(|source| ChannelError::Open {
            path: path.to_owned(),
            source,
        })?;
        set_raw(fd.as_fd()).map_err(|source| ChannelError::Termios {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self::with_fd(fd))
    }

    /// A channel over any descriptor (a socket in tests), made
    /// non-blocking.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_fd())?;
        Ok(Self::with_fd(fd))
    }

    fn with_fd(fd: OwnedFd) -> Self {
        Self {
            fd,
            inbound: Inbound::new(),
            out: Vec::new(),
            dropped_out: 0,
            mailbox: None,
            doorbell_owed: false,
        }
    }

    /// From now on, bytes go through `mailbox` (doorbells on the tty).
    pub fn attach_mailbox(&mut self, mailbox: GuestMailbox) {
        self.mailbox = Some(mailbox);
    }

    /// Whether the mailbox carries the bytes.
    pub fn uses_mailbox(&self) -> bool {
        self.mailbox.is_some()
    }

    /// When to call [`Self::flush`] again without waiting for the tty: the
    /// mailbox ring was full.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        (self.mailbox.is_some() && !self.out.is_empty()).then_some(RING_RETRY)
    }

    /// Queues one encoded line; false (and counted) if the queue is full.
    pub fn queue(&mut self, line: &str) -> bool {
        if self.out.len() + line.len() > MAX_QUEUED {
            self.dropped_out += 1;
            return false;
        }
        self.out.extend_from_slice(line.as_bytes());
        true
    }

    /// Whether queued bytes (or a doorbell) wait for the tty.
    pub fn wants_write(&self) -> bool {
        match self.mailbox {
            Some(_) => self.doorbell_owed,
            None => !self.out.is_empty(),
        }
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// Lines dropped because the queue was full.
    pub fn dropped_out(&self) -> u64 {
        self.dropped_out
    }

    /// Writes queued bytes until the tty would block; with the mailbox,
    /// pushes them into its ring and rings the doorbell.
    pub fn flush(&mut self) -> io::Result<()> {
        if let Some(mailbox) = &self.mailbox {
            if !self.out.is_empty() {
                let n = mailbox
                    .to_host
                    .push(&self.out)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                self.out.drain(..n);
                self.doorbell_owed |= n > 0;
            }
            if self.doorbell_owed {
                match write_some(self.fd.as_fd(), &[DOORBELL]) {
                    Ok(1) => self.doorbell_owed = false,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok(());
        }
        let mut written = 0;
        let result = loop {
            if written == self.out.len() {
                break Ok(());
            }
            match write_some(self.fd.as_fd(), &self.out[written..]) {
                Ok(0) => break Ok(()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.out.drain(..written);
        result
    }

    /// Flushes until everything queued left the guest (the tty's own
    /// output queue included) or `deadline` passes (`TimedOut`).
    pub fn drain(&mut self, deadline: std::time::Instant) -> io::Result<()> {
        loop {
            self.flush()?;
            if self.out.is_empty() && !self.doorbell_owed {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(io::ErrorKind::TimedOut.into());
            }
            std::thread::sleep(RING_RETRY);
        }
        loop {
            let mut queued: libc::c_int = 0;
            // SAFETY: TIOCOUTQ writes one int to the pointer, which is live.
            let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) };
            if rc < 0 || queued <= 0 {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(io::ErrorKind::TimedOut.into());
            }
            std::thread::sleep(RING_RETRY);
        }
    }

    /// Reads what is available and returns the complete lines.
    pub fn read_lines(&mut self) -> io::Result<Incoming> {
        let mut incoming = Incoming::default();
        let mut buf = [0u8; 512];
        loop {
            match read_some(self.fd.as_fd(), &mut buf) {
                Ok(0) => {
                    incoming.closed = true;
                    return Ok(incoming);
                }
                Ok(n) => {
                    // A corrupt ring (the VMM's; it never is) yields nothing.
                    let ring = self.mailbox.as_ref().map(|m| &m.to_guest);
                    incoming
                        .lines
                        .extend(self.inbound.receive(&buf[..n], ring).lines);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(incoming),
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn pair() -> (Channel, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Channel::from_fd(OwnedFd::from(a)).unwrap(), b)
    }

    #[test]
    fn lines_in_and_out() {
        let (mut ch, mut peer) = pair();
        assert_eq!(ch.read_lines().unwrap(), Incoming::default());
        peer.write_all(b"{\"a\":1}\r\n{\"b\"").unwrap();
        let got = ch.read_lines().unwrap();
        assert_eq!(got.lines, vec![Line::Complete(b"{\"a\":1}".to_vec())]);
        peer.write_all(b":2}\n").unwrap();
        assert_eq!(
            ch.read_lines().unwrap().lines,
            vec![Line::Complete(b"{\"b\":2}".to_vec())]
        );
        assert!(ch.queue("hello\n"));
        assert!(ch.wants_write());
        ch.flush().unwrap();
        assert!(!ch.wants_write());
        let mut buf = [0u8; 6];
        peer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello\n");
        drop(peer);
        assert!(ch.read_lines().unwrap().closed);
    }

    #[test]
    fn a_full_peer_leaves_bytes_queued_and_a_full_queue_drops_lines() {
        let (mut ch, mut peer) = pair();
        let line = format!("{}\n", "x".repeat(1023));
        while ch.queue(&line) {}
        assert_eq!(ch.dropped_out(), 1);
        assert!(ch.queued() > MAX_QUEUED - line.len());
        // The socket takes some at a time; the rest stays queued.
        let queued = ch.queued();
        let (mut got, mut buf) = (0, vec![0u8; 8192]);
        while got < queued {
            ch.flush().unwrap();
            got += peer.read(&mut buf).unwrap();
        }
        assert_eq!(got, queued);
        assert!(!ch.wants_write());
    }

    #[test]
    fn drain_waits_until_the_peer_took_everything() {
        let (mut ch, mut peer) = pair();
        let line = format!("{}\n", "y".repeat(4095));
        for _ in 0..15 {
            assert!(ch.queue(&line));
        }
        let total = ch.queued();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; total];
            peer.read_exact(&mut got).map(|()| got.len())
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        ch.drain(deadline).unwrap();
        assert_eq!(ch.queued(), 0);
        assert_eq!(reader.join().unwrap().unwrap(), total);
        // Nobody reads: the deadline ends it.
        let (mut ch, _peer) = pair();
        while ch.queue(&line) {}
        let err = ch.drain(std::time::Instant::now()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn raw_mode_on_a_pty() {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: both out-pointers are live c_ints; the name, termios and
        // window size pointers may be null.
        let rc = unsafe {
            libc::openpty(
                &raw mut master,
                &raw mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if rc < 0 {
            println!("SKIP: no ptys here: {}", io::Error::last_os_error());
            return;
        }
        // SAFETY: openpty returned two fresh descriptors we now own.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        set_raw(slave.as_fd()).unwrap();
        let t = get_termios(slave.as_fd()).unwrap();
        assert_eq!(t.c_lflag & (libc::ECHO | libc::ICANON | libc::ISIG), 0);
        assert_eq!(t.c_cflag & libc::CSIZE, libc::CS8);
        assert_eq!(t.c_cflag & (libc::PARENB | libc::CSTOPB | libc::CRTSCTS), 0);
        assert_ne!(t.c_cflag & (libc::CLOCAL | libc::CREAD), 0);
        assert_eq!(t.c_oflag & libc::OPOST, 0, "no output processing");
        assert_eq!(t.c_cflag & libc::CBAUD, libc::B115200);
        // No echo, no line editing: what the master writes arrives as is.
        let mut ch = Channel::from_fd(slave).unwrap();
        let mut m = std::fs::File::from(master);
        m.write_all(b"ab\x03c\n").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let got = ch.read_lines().unwrap();
        assert_eq!(got.lines, vec![Line::Complete(b"ab\x03c".to_vec())]);
    }

    #[test]
    fn the_mailbox_carries_the_bytes_and_the_tty_only_doorbells() {
        use agent_proto::mailbox::{Ring, MAILBOX_SIZE, TO_GUEST, TO_HOST};
        let mut memory = vec![0u64; MAILBOX_SIZE / 8];
        let base = memory.as_mut_ptr().cast::<u8>();
        // SAFETY: `memory` is aligned, MAILBOX_SIZE bytes and outlives
        // the channel and the VMM-side rings of this test.
        let (vmm_to_guest, vmm_to_host) =
            unsafe { (Ring::new(base.add(TO_GUEST)), Ring::new(base.add(TO_HOST))) };
        vmm_to_guest.init();
        vmm_to_host.init();
        let (mut ch, mut peer) = pair();
        // SAFETY: as above.
        ch.attach_mailbox(unsafe { GuestMailbox::over(base) });
        assert!(ch.uses_mailbox());
        // Out: the line in the ring, one doorbell on the tty.
        assert!(ch.queue("{\"a\":1}\n"));
        ch.flush().unwrap();
        assert!(!ch.wants_write());
        assert_eq!(ch.retry_after(), None);
        let mut bell = [9u8; 1];
        peer.read_exact(&mut bell).unwrap();
        assert_eq!(bell, [DOORBELL]);
        let mut got = Vec::new();
        vmm_to_host.pop_into(&mut got).unwrap();
        assert_eq!(got, b"{\"a\":1}\n");
        // In: tty bytes first, then the ring's at the doorbell.
        vmm_to_guest.push(b"2}\n{\"c\":3}\n").unwrap();
        peer.write_all(b"{\"b\":\0").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let lines = ch.read_lines().unwrap().lines;
        assert_eq!(
            lines,
            [
                Line::Complete(b"{\"b\":2}".to_vec()),
                Line::Complete(b"{\"c\":3}".to_vec())
            ]
        );
    }

    #[test]
    fn opening_a_missing_tty_fails_cleanly() {
        let err = Channel::open_tty(Path::new("/nonexistent/ttyS1")).unwrap_err();
        assert!(matches!(err, ChannelError::Open { .. }), "{err}");
        let err = Channel::open_tty(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(err, ChannelError::Termios { .. }), "{err}");
    }
}
