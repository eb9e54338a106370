//! The real [`smpboot::Topology`]: CPU state from sysfs, CPU events from
//! kernel uevents.
//!
//! [`SysfsTopology`] reads `possible`, `online` and `cpuN/online` through
//! [`Sysfs`], writes `cpuN/online` to bring CPUs up and down, and turns
//! the `cpu` subsystem's uevents (add, online, offline, remove) into
//! [`smpboot::CpuEvent`]s. The uevents come from a [`UeventSource`]: the
//! kernel's netlink socket in the guest, a queue of datagrams in tests.
//!
//! [`GuestPlacement`] pins the workers to their CPUs, tolerating CPUs that
//! are not up yet.
//!
//! When the socket overflowed (events were lost), the topology re-reads
//! `present` and `online`, compares them with what the events it did see
//! said, and synthesizes the missing events, so a consumer never has to
//! handle "lost events" itself.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use smpboot::{CpuEvent, CpuEventKind, Placement, PlacementError, Topology, TopologyError};

use crate::sysfs::{CpuList, Sysfs, SysfsError};
use crate::uevent::{self, Received, UeventSocket};

/// Largest uevent datagram accepted (the kernel's limit is 2 KiB of
/// environment plus the header).
const UEVENT_BUF: usize = 16 * 1024;

/// Where uevent datagrams come from.
pub trait UeventSource: Send + Sync + fmt::Debug {
    /// Reads one datagram into `buf` without blocking.
    fn recv(&self, buf: &mut [u8]) -> io::Result<Received>;

    /// Waits up to `timeout` until something can be read; false on timeout.
    fn wait(&self, timeout: Duration) -> io::Result<bool>;

    /// A descriptor an event loop can poll for readability, if any.
    fn poll_fd(&self) -> Option<BorrowedFd<'_>>;
}

impl UeventSource for UeventSocket {
    fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        UeventSocket::recv(self, buf)
    }

    fn wait(&self, timeout: Duration) -> io::Result<bool> {
        wait_readable(self.as_fd(), timeout)
    }

    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

/// Waits up to `timeout` until `fd` is readable.
fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: pfd is one live, initialised pollfd and the count is 1.
    let rc = unsafe { libc::poll(&raw mut pfd, 1, ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(err);
    }
    Ok(rc > 0)
}

/// What the topology knows from the events it delivered, for resyncing
/// after lost ones.
#[derive(Debug)]
struct Seen {
    pending: VecDeque<CpuEvent>,
    present: CpuList,
    online: CpuList,
    buf: Vec<u8>,
    overruns: u64,
}

impl Seen {
    fn note(&mut self, event: CpuEvent) {
        match event.kind {
            CpuEventKind::Added => self.present.insert(event.cpu),
            CpuEventKind::Removed => {
                self.present.remove(event.cpu);
                self.online.remove(event.cpu);
            }
            CpuEventKind::Online => self.online.insert(event.cpu),
            CpuEventKind::Offline => self.online.remove(event.cpu),
        }
    }
}

/// The guest's CPU topology: sysfs plus kernel uevents.
#[derive(Debug)]
pub struct SysfsTopology {
    sysfs: Sysfs,
    source: Box<dyn UeventSource>,
    readonly: bool,
    seen: Mutex<Seen>,
}

fn io_error(e: SysfsError) -> TopologyError {
    match e {
        SysfsError::Read { path, source } => TopologyError::Io {
            path: path.display().to_string(),
            source,
        },
        SysfsError::Parse { path, .. } => TopologyError::Parse(path.display().to_string()),
        SysfsError::SetOnline { cpu, source, .. } => TopologyError::Io {
            path: format!("cpu{cpu}/online"),
            source,
        },
        SysfsError::NoVcpuId { cpu, why } => TopologyError::Io {
            path: format!("cpu{cpu}/firmware_node/uid"),
            source: io::Error::new(io::ErrorKind::NotFound, why),
        },
    }
}

/// Converts a parsed uevent into the registry's event type.
pub fn to_registry_event(event: uevent::CpuEvent) -> CpuEvent {
    let kind = match event.kind {
        uevent::CpuEventKind::Add => CpuEventKind::Added,
        uevent::CpuEventKind::Online => CpuEventKind::Online,
        uevent::CpuEventKind::Offline => CpuEventKind::Offline,
        uevent::CpuEventKind::Remove => CpuEventKind::Removed,
    };
    CpuEvent {
        cpu: event.cpu,
        kind,
    }
}

impl SysfsTopology {
    /// A topology over `sysfs`, following `source` (which should be
    /// listening already, so no change falls between the first read and
    /// the first event). `readonly` refuses every write with `EROFS`, for
    /// an agent run by hand on a host.
    pub fn new(
        sysfs: Sysfs,
        source: Box<dyn UeventSource>,
        readonly: bool,
    ) -> Result<Self, TopologyError> {
        let present = sysfs.present().map_err(io_error)?;
        let online = sysfs.online().map_err(io_error)?;
        Ok(Self {
            sysfs,
            source,
            readonly,
            seen: Mutex::new(Seen {
                pending: VecDeque::new(),
                present,
                online,
                buf: vec![0; UEVENT_BUF],
                overruns: 0,
            }),
        })
    }

    /// The sysfs tree read.
    pub fn sysfs(&self) -> &Sysfs {
        &self.sysfs
    }

    /// Whether writes are refused.
    pub fn is_readonly(&self) -> bool {
        self.readonly
    }

    /// The descriptor to poll for new events, if the source has one.
    pub fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        self.source.poll_fd()
    }

    /// How many times events were lost and the state re-read.
    pub fn overruns(&self) -> u64 {
        self.lock().overruns
    }

    /// Present CPUs (`present`).
    pub fn present_cpus(&self) -> Result<CpuList, TopologyError> {
        self.sysfs.present().map_err(io_error)
    }

    fn lock(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-reads `present` and `online` and queues the events that explain
    /// the difference from what was seen.
    fn resync(&self, seen: &mut Seen) -> Result<(), TopologyError> {
        seen.overruns += 1;
        let present = self.sysfs.present().map_err(io_error)?;
        let online = self.sysfs.online().map_err(io_error)?;
        let mut push = |cpus: CpuList, kind| {
            for cpu in cpus.iter() {
                seen.pending.push_back(CpuEvent { cpu, kind });
            }
        };
        push(present.difference(&seen.present), CpuEventKind::Added);
        push(seen.online.difference(&online), CpuEventKind::Offline);
        push(seen.present.difference(&present), CpuEventKind::Removed);
        push(online.difference(&seen.online), CpuEventKind::Online);
        seen.present = present;
        seen.online = online;
        Ok(())
    }

    /// One event without waiting: queued, or the next usable datagram.
    fn try_next(&self, seen: &mut Seen) -> Result<Option<CpuEvent>, TopologyError> {
        loop {
            if let Some(event) = seen.pending.pop_front() {
                return Ok(Some(event));
            }
            let received = self
                .source
                .recv(&mut seen.buf)
                .map_err(|source| TopologyError::Io {
                    path: "uevent socket".into(),
                    source,
                })?;
            match received {
                Received::Message(n) => {
                    let parsed = seen
                        .buf
                        .get(..n)
                        .and_then(uevent::CpuEvent::parse)
                        .map(to_registry_event);
                    if let Some(event) = parsed {
                        seen.note(event);
                        return Ok(Some(event));
                    }
                }
                Received::Dropped => {}
                Received::Overrun => self.resync(seen)?,
                Received::WouldBlock => return Ok(None),
            }
        }
    }
}

impl Topology for SysfsTopology {
    fn possible_cpus(&self) -> Result<Vec<u32>, TopologyError> {
        Ok(self.sysfs.possible().map_err(io_error)?.iter().collect())
    }

    fn online_cpus(&self) -> Result<Vec<u32>, TopologyError> {
        Ok(self.sysfs.online().map_err(io_error)?.iter().collect())
    }

    fn is_online(&self, cpu: u32) -> Result<bool, TopologyError> {
        self.sysfs.is_online(cpu).map_err(io_error)
    }

    fn set_online(&self, cpu: u32, online: bool) -> Result<(), TopologyError> {
        if self.readonly {
            return Err(TopologyError::Io {
                path: format!("cpu{cpu}/online"),
                source: io::Error::from_raw_os_error(libc::EROFS),
            });
        }
        self.sysfs.set_online(cpu, online).map_err(io_error)
    }

    fn next_event(&self, timeout: Duration) -> Result<Option<CpuEvent>, TopologyError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(event) = self.try_next(&mut self.lock())? {
                return Ok(Some(event));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let ready = self.source.wait(left).map_err(|source| TopologyError::Io {
                path: "uevent socket".into(),
                source,
            })?;
            if !ready {
                return Ok(None);
            }
        }
    }
}

/// Pins each worker to its CPU, as the kernel binds a per-CPU kthread.
///
/// Unlike `kthread_bind`, `sched_setaffinity` refuses a CPU that is not
/// online (EINVAL), and the registry creates a CPU's threads (parked)
/// while preparing its bring-up, before it is online. Such a bind is
/// deferred, not an error: the thread is parked, and the registry binds it
/// again when it unparks it, after the CPU came up. (If the CPU went down
/// again in between, the thread runs unpinned until the agent learns of
/// it and parks it: the forced-offline case.)
#[derive(Debug, Default, Clone, Copy)]
pub struct GuestPlacement;

impl Placement for GuestPlacement {
    fn bind(&self, cpu: u32) -> Result<(), PlacementError> {
        match smpboot::pin_current_thread(cpu) {
            Err(PlacementError::Pin { source, .. })
                if source.raw_os_error() == Some(libc::EINVAL) =>
            {
                Ok(())
            }
            other => other,
        }
    }

    fn current_cpu(&self, cpu: u32) -> u32 {
        smpboot::current_cpu().unwrap_or(cpu)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sysfs::tests::FakeCpus;
    use std::sync::{Arc, Condvar};

    /// A kernel uevent datagram for `action` on CPU `cpu`.
    pub(crate) fn datagram(action: &str, cpu: u32) -> Vec<u8> {
        format!(
            "{action}@/devices/system/cpu/cpu{cpu}\0ACTION={action}\0DEVPATH=/devices/system/cpu/cpu{cpu}\0SUBSYSTEM=cpu\0SEQNUM=1\0"
        )
        .into_bytes()
    }

    /// A queue of datagrams standing in for the netlink socket.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct FakeUevents(Arc<(Mutex<VecDeque<FakeItem>>, Condvar)>);

    #[derive(Debug)]
    pub(crate) enum FakeItem {
        Datagram(Vec<u8>),
        Overrun,
    }

    impl FakeUevents {
        pub(crate) fn push(&self, bytes: &[u8]) {
            self.push_item(FakeItem::Datagram(bytes.to_vec()));
        }

        pub(crate) fn event(&self, action: &str, cpu: u32) {
            self.push(&datagram(action, cpu));
        }

        pub(crate) fn overrun(&self) {
            self.push_item(FakeItem::Overrun);
        }

        fn push_item(&self, item: FakeItem) {
            let (queue, ready) = &*self.0;
            queue.lock().unwrap().push_back(item);
            ready.notify_all();
        }
    }

    impl UeventSource for FakeUevents {
        fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
            match self.0 .0.lock().unwrap().pop_front() {
                None => Ok(Received::WouldBlock),
                Some(FakeItem::Overrun) => Ok(Received::Overrun),
                Some(FakeItem::Datagram(d)) if d.len() > buf.len() => Ok(Received::Dropped),
                Some(FakeItem::Datagram(d)) => {
                    buf[..d.len()].copy_from_slice(&d);
                    Ok(Received::Message(d.len()))
                }
            }
        }

        fn wait(&self, timeout: Duration) -> io::Result<bool> {
            let (queue, ready) = &*self.0;
            let q = queue.lock().unwrap();
            let (q, _) = ready
                .wait_timeout_while(q, timeout, |q| q.is_empty())
                .unwrap();
            Ok(!q.is_empty())
        }

        fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
            None
        }
    }

    fn topo(fake: &FakeCpus, readonly: bool) -> (SysfsTopology, FakeUevents) {
        let events = FakeUevents::default();
        let t = SysfsTopology::new(fake.sysfs(), Box::new(events.clone()), readonly).unwrap();
        (t, events)
    }

    fn ev(cpu: u32, kind: CpuEventKind) -> CpuEvent {
        CpuEvent { cpu, kind }
    }

    #[test]
    fn reads_cpu_state_from_sysfs() {
        let fake = FakeCpus::new("topo-read", "0-7", "0-2", "0-1");
        let (t, _) = topo(&fake, false);
        assert_eq!(t.possible_cpus().unwrap(), (0..8).collect::<Vec<_>>());
        assert_eq!(t.online_cpus().unwrap(), vec![0, 1]);
        assert!(t.is_online(0).unwrap());
        assert!(!t.is_online(2).unwrap());
        assert_eq!(t.present_cpus().unwrap().to_string(), "0-2");
        t.set_online(2, true).unwrap();
        assert_eq!(fake.get("cpu2/online"), "1");
        fake.set("possible", "x");
        assert!(matches!(t.possible_cpus(), Err(TopologyError::Parse(_))));
    }

    #[test]
    fn readonly_refuses_writes_with_erofs() {
        let fake = FakeCpus::new("topo-ro", "0-3", "0-2", "0-1");
        let (t, _) = topo(&fake, true);
        let err = t.set_online(2, true).unwrap_err();
        let TopologyError::Io { source, .. } = err else {
            panic!("{err:?}")
        };
        assert_eq!(source.raw_os_error(), Some(libc::EROFS));
        assert_eq!(fake.get("cpu2/online"), "0");
    }

    #[test]
    fn follows_cpu_uevents_and_drops_the_rest() {
        let fake = FakeCpus::new("topo-ev", "0-7", "0-1", "0-1");
        let (t, src) = topo(&fake, false);
        src.event("add", 2);
        src.push(b"garbage without header");
        src.push(b"add@/devices/LNXSYSTM:00/LNXCPU:02\0ACTION=add\0SUBSYSTEM=acpi\0");
        src.push(b"libudev\0\xfe\xed");
        src.push(b"online@/devices/system/cpu/cpu2\0ACTION=offline\0SUBSYSTEM=cpu\0");
        src.event("online", 2);
        src.event("offline", 2);
        src.event("remove", 2);
        let mut got = Vec::new();
        while let Some(e) = t.next_event(Duration::ZERO).unwrap() {
            got.push(e);
        }
        use CpuEventKind::*;
        assert_eq!(
            got,
            [ev(2, Added), ev(2, Online), ev(2, Offline), ev(2, Removed)]
        );
        assert_eq!(t.overruns(), 0);
    }

    #[test]
    fn waits_for_an_event_up_to_the_timeout() {
        let fake = FakeCpus::new("topo-wait", "0-3", "0-1", "0-1");
        let (t, src) = topo(&fake, false);
        let start = Instant::now();
        assert_eq!(t.next_event(Duration::from_millis(30)).unwrap(), None);
        assert!(start.elapsed() >= Duration::from_millis(25));
        let src2 = src.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            src2.event("online", 3);
        });
        let e = t.next_event(Duration::from_secs(10)).unwrap();
        assert_eq!(e, Some(ev(3, CpuEventKind::Online)));
        h.join().unwrap();
    }

    #[test]
    fn overrun_synthesizes_the_lost_events() {
        let fake = FakeCpus::new("topo-overrun", "0-7", "0-3", "0-3");
        let (t, src) = topo(&fake, false);
        // Lost: cpu4 added and onlined, cpu3 offlined and removed, cpu1
        // offlined.
        std::fs::create_dir_all(fake.0.join("cpu4")).unwrap();
        fake.set("present", "0-2,4");
        fake.set("online", "0,2,4");
        src.overrun();
        src.event("online", 1);
        let mut got = Vec::new();
        while let Some(e) = t.next_event(Duration::ZERO).unwrap() {
            got.push(e);
        }
        use CpuEventKind::*;
        assert_eq!(
            got,
            [
                ev(4, Added),
                ev(1, Offline),
                ev(3, Offline),
                ev(3, Removed),
                ev(4, Online),
                ev(1, Online),
            ]
        );
        assert_eq!(t.overruns(), 1);
        // Nothing more to explain on a second overrun.
        src.overrun();
        fake.set("online", "0-2,4");
        assert_eq!(t.next_event(Duration::ZERO).unwrap(), None);
    }

    #[test]
    fn oversized_datagrams_are_dropped() {
        let fake = FakeCpus::new("topo-big", "0-3", "0-1", "0-1");
        let (t, src) = topo(&fake, false);
        let mut big = datagram("add", 2);
        big.resize(UEVENT_BUF + 1, b'x');
        src.push(&big);
        src.event("add", 3);
        assert_eq!(
            t.next_event(Duration::ZERO).unwrap(),
            Some(ev(3, CpuEventKind::Added))
        );
    }

    #[test]
    fn placement_defers_offline_cpus_and_pins_online_ones() {
        std::thread::spawn(|| {
            let allowed = smpboot::current_affinity().unwrap();
            // A CPU number the machine does not have online.
            let absent = (64..1024).find(|c| !allowed.contains(c)).unwrap();
            GuestPlacement.bind(absent).unwrap();
            assert_eq!(smpboot::current_affinity().unwrap(), allowed, "unchanged");
            let cpu = allowed[0];
            GuestPlacement.bind(cpu).unwrap();
            assert_eq!(smpboot::current_affinity().unwrap(), vec![cpu]);
            assert_eq!(GuestPlacement.current_cpu(cpu), cpu);
            assert!(matches!(
                GuestPlacement.bind(1 << 20),
                Err(PlacementError::OutOfRange(_))
            ));
        })
        .join()
        .unwrap();
    }
}
