//! One end of the API forward: many Unix socket connections multiplexed
//! over one byte link (the emulated host's second serial port).
//!
//! Threads: one link reader per [`Mux`], and two pumps per channel
//! (local socket to link, link to local socket). Frames are written to the
//! link under one mutex. Back-pressure: a sender may have at most
//! [`WINDOW`] unacknowledged bytes per channel; the receiver acknowledges
//! bytes once it has written them to its local socket, so the link reader
//! never blocks and one slow channel cannot stall the others.
//!
//! Lock order: `conns` before `writer`; `link` and credits are leaves.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use super::codec::{Decoder, Frame, Kind, MAX_PAYLOAD};

/// Unacknowledged bytes a sender may have in flight per channel and direction.
pub const WINDOW: usize = 16 * 1024;

/// Opens the local end of a channel the peer opened (inside the emulated host).
pub type Connector = Box<dyn Fn(u32) -> io::Result<UnixStream> + Send + Sync>;

/// Kept alive by a channel's two pump threads and dropped when both have
/// ended: whoever opens a channel can count its channels with it.
pub type Guard = Arc<dyn std::any::Any + Send + Sync>;

/// What a channel's inbound pump receives from the link reader.
#[derive(Debug)]
enum Inbound {
    Data(Vec<u8>),
    Eof,
    Close,
}

/// Send credit of one channel.
#[derive(Debug)]
struct Credit {
    state: Mutex<(usize, bool)>,
    cond: Condvar,
}

impl Credit {
    fn new() -> Self {
        Credit {
            state: Mutex::new((WINDOW, false)),
            cond: Condvar::new(),
        }
    }

    /// Waits for some credit; takes at most `want`. `None` once closed.
    fn take(&self, want: usize) -> Option<usize> {
        let mut st = lock(&self.state);
        loop {
            if st.1 {
                return None;
            }
            if st.0 > 0 {
                let n = want.min(st.0);
                st.0 -= n;
                return Some(n);
            }
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn add(&self, n: usize) {
        lock(&self.state).0 += n;
        self.cond.notify_all();
    }

    fn close(&self) {
        lock(&self.state).1 = true;
        self.cond.notify_all();
    }
}

#[derive(Debug)]
struct Conn {
    tx: Sender<Inbound>,
    credit: Arc<Credit>,
    stream: Option<UnixStream>,
    sent_eof: bool,
    recv_eof: bool,
}

#[derive(Debug, Default)]
struct LinkState {
    hello: bool,
    dead: Option<String>,
}

struct Shared {
    writer: Mutex<Box<dyn Write + Send>>,
    conns: Mutex<HashMap<u32, Conn>>,
    link: Mutex<LinkState>,
    link_cond: Condvar,
    next_id: AtomicU32,
    connector: Option<Connector>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("link", &self.link)
            .field("next_id", &self.next_id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One end of the multiplexed link.
#[derive(Debug, Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

impl Mux {
    /// The listening end (the harness): channels are opened with [`Mux::open`].
    pub fn listener(
        reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
    ) -> io::Result<Self> {
        Self::start(reader, writer, None)
    }

    /// The connecting end (inside the emulated host): sends Hello, then opens
    /// a local connection with `connector` for every channel the peer opens.
    pub fn connector(
        reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
        connector: Connector,
    ) -> io::Result<Self> {
        let mux = Self::start(reader, writer, Some(connector))?;
        mux.shared.send(&Frame::hello())?;
        Ok(mux)
    }

    fn start(
        reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
        connector: Option<Connector>,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            writer: Mutex::new(writer),
            conns: Mutex::new(HashMap::new()),
            link: Mutex::new(LinkState::default()),
            link_cond: Condvar::new(),
            next_id: AtomicU32::new(1),
            connector,
        });
        let s = shared.clone();
        thread::Builder::new()
            .name("mux-link".into())
            .spawn(move || s.read_link(reader))?;
        Ok(Mux { shared })
    }

    /// Waits until the peer said Hello. False on timeout or a dead link.
    pub fn wait_hello(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.link);
        while !st.hello && st.dead.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .shared
                .link_cond
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.hello && st.dead.is_none()
    }

    /// Why the link died, if it did.
    pub fn dead(&self) -> Option<String> {
        lock(&self.shared.link).dead.clone()
    }

    /// Number of open channels.
    pub fn open_channels(&self) -> usize {
        lock(&self.shared.conns).len()
    }

    /// Forwards `stream` to the peer as a new channel (listening end only).
    /// Waits for the peer's Hello first, up to `hello_timeout`.
    pub fn open(&self, stream: UnixStream, hello_timeout: Duration) -> io::Result<u32> {
        self.open_guarded(stream, hello_timeout, Arc::new(()))
    }

    /// [`Mux::open`], keeping `guard` alive until the channel's pump
    /// threads have ended (dropped at once if it cannot be opened).
    pub fn open_guarded(
        &self,
        stream: UnixStream,
        hello_timeout: Duration,
        guard: Guard,
    ) -> io::Result<u32> {
        if !self.wait_hello(hello_timeout) {
            let _ = stream.shutdown(Shutdown::Both);
            let why = self.dead().unwrap_or_else(|| "no hello from peer".into());
            return Err(io::Error::new(io::ErrorKind::NotConnected, why));
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let credit = Arc::new(Credit::new());
        let clone = stream.try_clone()?;
        lock(&self.shared.conns).insert(
            id,
            Conn {
                tx,
                credit: credit.clone(),
                stream: Some(clone),
                sent_eof: false,
                recv_eof: false,
            },
        );
        if let Err(e) = self.shared.send(&Frame::empty(id, Kind::Open)) {
            self.shared.remove(id);
            return Err(e);
        }
        self.shared.start_pumps(id, stream, rx, credit, guard)?;
        Ok(id)
    }

    /// Closes every channel and marks the link dead.
    pub fn close(&self, why: &str) {
        self.shared.kill(why);
    }
}

impl Shared {
    fn send(&self, frame: &Frame) -> io::Result<()> {
        let bytes = frame
            .encode()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut w = lock(&self.writer);
        let res = w.write_all(&bytes).and_then(|()| w.flush());
        drop(w);
        if let Err(e) = &res {
            self.kill(&format!("link write failed: {e}"));
        }
        res
    }

    fn kill(&self, why: &str) {
        {
            let mut st = lock(&self.link);
            if st.dead.is_none() {
                st.dead = Some(why.to_string());
            }
        }
        self.link_cond.notify_all();
        let conns: Vec<Conn> = lock(&self.conns).drain().map(|(_, c)| c).collect();
        for c in conns {
            close_local(&c);
        }
    }

    fn remove(&self, id: u32) -> Option<Conn> {
        lock(&self.conns).remove(&id)
    }

    /// Sends Close for `id` and drops it locally.
    fn abort(&self, id: u32) {
        if let Some(c) = self.remove(id) {
            close_local(&c);
            let _ = self.send(&Frame::empty(id, Kind::Close));
        }
    }

    /// Records one half of the orderly close; drops the channel when both are done.
    fn half_closed(&self, id: u32, sent: bool) {
        let mut conns = lock(&self.conns);
        let done = match conns.get_mut(&id) {
            Some(c) => {
                if sent {
                    c.sent_eof = true;
                } else {
                    c.recv_eof = true;
                }
                c.sent_eof && c.recv_eof
            }
            None => false,
        };
        if done {
            conns.remove(&id);
        }
    }

    fn read_link(self: Arc<Self>, mut reader: Box<dyn Read + Send>) {
        let mut dec = Decoder::new();
        let mut buf = vec![0u8; 16 * 1024];
        let why = loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break "link closed".to_string(),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break format!("link read failed: {e}"),
            };
            dec.push(&buf[..n]);
            let mut failed = None;
            loop {
                match dec.next_frame() {
                    Ok(Some(frame)) => self.dispatch(frame),
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(format!("link protocol error: {e}"));
                        break;
                    }
                }
            }
            if let Some(why) = failed {
                break why;
            }
        };
        self.kill(&why);
    }

    fn dispatch(self: &Arc<Self>, frame: Frame) {
        let id = frame.conn;
        match frame.kind {
            Kind::Hello => {
                lock(&self.link).hello = true;
                self.link_cond.notify_all();
            }
            Kind::Open => self.accept_open(id),
            Kind::Data => {
                if let Some(c) = lock(&self.conns).get(&id) {
                    let _ = c.tx.send(Inbound::Data(frame.payload));
                }
            }
            Kind::Eof => {
                if let Some(c) = lock(&self.conns).get(&id) {
                    let _ = c.tx.send(Inbound::Eof);
                }
                self.half_closed(id, false);
            }
            Kind::Close => {
                if let Some(c) = self.remove(id) {
                    close_local(&c);
                }
            }
            Kind::Ack => {
                if let (Ok(n), Some(c)) = (frame.ack_count(), lock(&self.conns).get(&id)) {
                    c.credit.add(n as usize);
                }
            }
        }
    }

    fn accept_open(self: &Arc<Self>, id: u32) {
        if self.connector.is_none() {
            let _ = self.send(&Frame::empty(id, Kind::Close));
            return;
        }
        let (tx, rx) = mpsc::channel();
        let credit = Arc::new(Credit::new());
        lock(&self.conns).insert(
            id,
            Conn {
                tx,
                credit: credit.clone(),
                stream: None,
                sent_eof: false,
                recv_eof: false,
            },
        );
        let s = self.clone();
        let spawned = thread::Builder::new()
            .name(format!("mux-connect-{id}"))
            .spawn(move || {
                let Some(connector) = s.connector.as_ref() else {
                    return;
                };
                let stream = match connector(id) {
                    Ok(stream) => stream,
                    Err(_) => return s.abort(id),
                };
                let clone = stream.try_clone();
                let registered = match (clone, lock(&s.conns).get_mut(&id)) {
                    (Ok(clone), Some(c)) => {
                        c.stream = Some(clone);
                        true
                    }
                    _ => false,
                };
                let started =
                    registered && s.start_pumps(id, stream, rx, credit, Arc::new(())).is_ok();
                if !started {
                    s.abort(id);
                }
            });
        if spawned.is_err() {
            self.abort(id);
        }
    }

    fn start_pumps(
        self: &Arc<Self>,
        id: u32,
        stream: UnixStream,
        rx: Receiver<Inbound>,
        credit: Arc<Credit>,
        guard: Guard,
    ) -> io::Result<()> {
        let out = stream.try_clone()?;
        let s = self.clone();
        let held = guard.clone();
        thread::Builder::new()
            .name(format!("mux-in-{id}"))
            .spawn(move || {
                let _guard = held;
                s.pump_in(id, out, rx);
            })?;
        let s = self.clone();
        thread::Builder::new()
            .name(format!("mux-out-{id}"))
            .spawn(move || {
                let _guard = guard;
                s.pump_out(id, stream, credit);
            })?;
        Ok(())
    }

    /// Link to local socket.
    fn pump_in(&self, id: u32, mut stream: UnixStream, rx: Receiver<Inbound>) {
        for msg in rx {
            match msg {
                Inbound::Data(bytes) => {
                    if stream.write_all(&bytes).is_err() {
                        return self.abort(id);
                    }
                    let n = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                    let _ = self.send(&Frame::ack(id, n));
                }
                Inbound::Eof => {
                    let _ = stream.shutdown(Shutdown::Write);
                    return;
                }
                Inbound::Close => {
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
    }

    /// Local socket to link.
    fn pump_out(&self, id: u32, mut stream: UnixStream, credit: Arc<Credit>) {
        let mut buf = vec![0u8; MAX_PAYLOAD];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => {
                    if lock(&self.conns).contains_key(&id)
                        && self.send(&Frame::empty(id, Kind::Eof)).is_ok()
                    {
                        self.half_closed(id, true);
                    }
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.abort(id),
            };
            let mut sent = 0;
            while sent < n {
                let Some(k) = credit.take(n - sent) else {
                    return;
                };
                if self.send(&Frame::data(id, &buf[sent..sent + k])).is_err() {
                    return;
                }
                sent += k;
            }
        }
    }
}

fn close_local(c: &Conn) {
    c.credit.close();
    let _ = c.tx.send(Inbound::Close);
    if let Some(s) = &c.stream {
        let _ = s.shutdown(Shutdown::Both);
    }
}
