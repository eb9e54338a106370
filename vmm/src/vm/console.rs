//! The console's output path: COM1's transmitted bytes go into a bounded
//! in-memory buffer ([`ConsoleSink`], what the UART writes to, on the vCPU
//! thread, under the device mutex) and a dedicated writer thread drains it
//! to stdout or a file ([`Console`]).
//!
//! A vCPU never waits for the terminal: a stdout nobody reads fills the
//! buffer, then bytes are dropped and counted, and once the writer catches
//! up it writes `[console: N bytes dropped]` where they were. Flushing at
//! exit waits a bounded time ([`FLUSH_BOUND`]).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::bus::lock;

/// Bytes the buffer holds.
pub const CONSOLE_BUFFER: usize = 64 << 10;
/// How long flushing the console at exit may take.
pub const FLUSH_BOUND: Duration = Duration::from_secs(1);
/// Bytes the writer takes per write.
const CHUNK: usize = 16 << 10;

#[derive(Debug, Default)]
struct State {
    buf: VecDeque<u8>,
    /// Bytes dropped since the last marker. While non-zero, new bytes are
    /// dropped too, until the writer has drained the buffer and written
    /// the marker: the marker sits exactly where bytes are missing.
    dropping: u64,
    dropped_total: u64,
    /// Bytes taken into the buffer, ever.
    accepted: u64,
    /// Bytes written out (or given up on), ever.
    written: u64,
    /// No more output: the handle is gone.
    closed: bool,
    /// The output failed: everything is discarded from now on.
    failed: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The writer waits here for bytes.
    data: Condvar,
    /// Flushers wait here for the writer's progress.
    progress: Condvar,
    capacity: usize,
    /// Output off: bytes are accepted and thrown away, nothing counted.
    discard: bool,
}

/// What the console UART writes to: never blocks on the output.
#[derive(Debug, Clone)]
pub struct ConsoleSink {
    shared: Arc<Shared>,
}

/// The console's writer thread and its buffer.
#[derive(Debug)]
pub struct Console {
    shared: Arc<Shared>,
}

impl Console {
    /// A console writing to `out` from its own thread through a buffer of
    /// `capacity` bytes; the sink goes to the UART.
    pub fn spawn(
        out: Box<dyn Write + Send>,
        capacity: usize,
    ) -> std::io::Result<(Self, ConsoleSink)> {
        let shared = Self::shared(capacity, false);
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                crate::seccomp::enter(crate::seccomp::ThreadClass::Console);
                write_out(&writer, out)
            })?;
        Ok((
            Self {
                shared: shared.clone(),
            },
            ConsoleSink { shared },
        ))
    }

    /// A console whose output is off: bytes are thrown away.
    pub fn discard() -> (Self, ConsoleSink) {
        let shared = Self::shared(0, true);
        (
            Self {
                shared: shared.clone(),
            },
            ConsoleSink { shared },
        )
    }

    fn shared(capacity: usize, discard: bool) -> Arc<Shared> {
        Arc::new(Shared {
            state: Mutex::new(State::default()),
            data: Condvar::new(),
            progress: Condvar::new(),
            capacity,
            discard,
        })
    }

    /// Waits at most `bound` for the bytes buffered now (and a pending
    /// drop marker) to be written. Returns whether they were.
    pub fn flush(&self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        let mut st = lock(&self.shared.state);
        let target = st.accepted;
        loop {
            if st.failed || (st.written >= target && st.dropping == 0) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .shared
                .progress
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Bytes dropped so far because the buffer was full (or the output failed).
    pub fn dropped(&self) -> u64 {
        lock(&self.shared.state).dropped_total
    }
}

impl Drop for Console {
    /// The writer drains what is buffered and ends; nobody waits for it.
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.data.notify_all();
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let s = &*self.shared;
        if s.discard || bytes.is_empty() {
            return Ok(bytes.len());
        }
        let len = bytes.len() as u64;
        let mut st = lock(&s.state);
        if st.failed {
            st.dropped_total += len;
            return Ok(bytes.len());
        }
        if st.dropping > 0 {
            st.dropping += len;
            st.dropped_total += len;
            return Ok(bytes.len());
        }
        let was_empty = st.buf.is_empty();
        let take = bytes.len().min(s.capacity - st.buf.len());
        st.buf.extend(&bytes[..take]);
        st.accepted += take as u64;
        let lost = (bytes.len() - take) as u64;
        st.dropping += lost;
        st.dropped_total += lost;
        drop(st);
        // The writer only waits on an empty buffer: wake it on the first byte.
        if was_empty {
            s.data.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the writer does next.
enum Work {
    Bytes(Vec<u8>),
    Marker(u64),
    Done,
}

fn next_work(shared: &Shared) -> Work {
    let mut st = lock(&shared.state);
    loop {
        if !st.buf.is_empty() {
            let n = st.buf.len().min(CHUNK);
            return Work::Bytes(st.buf.drain(..n).collect());
        }
        if st.dropping > 0 {
            return Work::Marker(st.dropping);
        }
        if st.closed {
            return Work::Done;
        }
        st = shared.data.wait(st).unwrap_or_else(|e| e.into_inner());
    }
}

/// The writer thread: drains the buffer into `out` until closed.
fn write_out(shared: &Shared, mut out: Box<dyn Write + Send>) {
    loop {
        // (bytes of the guest's written, drops the marker reports)
        let (len, dropped, result) = match next_work(shared) {
            Work::Done => return,
            Work::Bytes(bytes) => (bytes.len() as u64, 0, out.write_all(&bytes)),
            Work::Marker(n) => {
                let marker = format!("\n[console: {n} bytes dropped]\n");
                (0, n, out.write_all(marker.as_bytes()))
            }
        };
        let result = result.and_then(|()| out.flush());
        let mut st = lock(&shared.state);
        match result {
            Ok(()) => {
                st.written += len;
                st.dropping -= dropped;
            }
            Err(e) => {
                st.failed = true;
                st.written = st.accepted;
                st.dropped_total += len + st.buf.len() as u64;
                st.buf.clear();
                st.dropping = 0;
                drop(st);
                shared.progress.notify_all();
                log::warn!("console output failed, console output discarded from now on: {e}");
                return;
            }
        }
        drop(st);
        shared.progress.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::SerialDevice;
    use crate::devices::BusDevice;
    use std::io::Read;
    use std::sync::mpsc;
    use vmm_sys_util::eventfd::EventFd;

    fn letter(i: usize) -> u8 {
        b"abcdefghijklmnopqrstuvwxyz"[i % 26]
    }

    fn uart(sink: ConsoleSink) -> SerialDevice<ConsoleSink> {
        SerialDevice::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), sink)
    }

    /// Reads `r` to its end on a thread; the bytes come back on the channel.
    fn read_all(mut r: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = r.read_to_end(&mut all);
            let _ = tx.send(all);
        });
        rx
    }

    #[test]
    fn bytes_reach_the_output_in_order() {
        let (r, w) = std::io::pipe().unwrap();
        let (console, sink) = Console::spawn(Box::new(w), CONSOLE_BUFFER).unwrap();
        let mut dev = uart(sink);
        for b in b"hello, console\n" {
            dev.write(0, &[*b]);
        }
        assert!(console.flush(FLUSH_BOUND));
        assert_eq!(console.dropped(), 0);
        let out = read_all(r);
        drop(console);
        drop(dev);
        let got = out.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(got, b"hello, console\n");
    }

    #[test]
    fn a_stdout_nobody_reads_never_blocks_the_vcpu_and_flush_is_bounded() {
        let (r, w) = std::io::pipe().unwrap();
        let (console, sink) = Console::spawn(Box::new(w), CONSOLE_BUFFER).unwrap();
        // The vCPU side on its own thread: with a blocking sink it would
        // never finish (the pipe holds 64 KiB and nobody reads it).
        let total = 4 * CONSOLE_BUFFER + 12_345;
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut dev = uart(sink);
            let mut slowest = Duration::ZERO;
            for i in 0..total {
                let t = Instant::now();
                dev.write(0, &[letter(i)]);
                slowest = slowest.max(t.elapsed());
            }
            let _ = done_tx.send(slowest);
        });
        let slowest = done_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("a console write blocked the vCPU");
        assert!(slowest < Duration::from_millis(200), "{slowest:?}");
        let dropped = console.dropped();
        assert!(dropped > 0);

        let t = Instant::now();
        assert!(!console.flush(FLUSH_BOUND), "nobody reads: cannot flush");
        let took = t.elapsed();
        assert!(took >= FLUSH_BOUND && took < FLUSH_BOUND + Duration::from_millis(500));

        // Someone reads at last: what was kept comes out, then the marker.
        let out = read_all(r);
        assert!(console.flush(Duration::from_secs(5)));
        drop(console);
        let got = out.recv_timeout(Duration::from_secs(5)).unwrap();
        let marker = format!("\n[console: {dropped} bytes dropped]\n");
        assert!(
            got.ends_with(marker.as_bytes()),
            "{:?}",
            &got[got.len() - 64..]
        );
        let kept = got.len() - marker.len();
        assert_eq!(kept as u64 + dropped, total as u64);
        // The kept bytes are the first ones, in order.
        assert!(got[..kept].iter().enumerate().all(|(i, &b)| b == letter(i)));
    }

    #[test]
    fn an_output_that_fails_discards_instead_of_blocking() {
        let (r, w) = std::io::pipe().unwrap();
        drop(r); // EPIPE on the first write
        let (console, mut sink) = Console::spawn(Box::new(w), 16).unwrap();
        sink.write_all(b"lost").unwrap();
        assert!(console.flush(FLUSH_BOUND));
        sink.write_all(b"also lost").unwrap();
        assert!(console.flush(FLUSH_BOUND));
        assert_eq!(console.dropped(), 13);
    }

    #[test]
    fn output_off_takes_everything_and_keeps_nothing() {
        let (console, mut sink) = Console::discard();
        sink.write_all(&[0u8; 100_000]).unwrap();
        assert!(console.flush(Duration::ZERO));
        assert_eq!(console.dropped(), 0);
    }
}
