//! CPU state in sysfs: the `possible`, `present` and `online` CPU lists,
//! the per-CPU `online` switch under `/sys/devices/system/cpu`, and each
//! CPU's vCPU id ([`Sysfs::vcpu_id`]).
//!
//! Linux numbers CPUs in the order it meets them (`cpuN`, the *logical*
//! number); the VMM names them by vCPU id (= APIC ID = the `_UID` of the
//! ACPI processor device). The id is read from `cpuN/firmware_node/uid`
//! (the ACPI device, there even while the CPU is offline), else from the
//! `apicid` of `/proc/cpuinfo` (online CPUs only).

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use thiserror::Error;

/// Where the kernel describes CPUs.
pub const CPU_ROOT: &str = "/sys/devices/system/cpu";
/// Where the kernel lists each online CPU's APIC ID.
pub const CPUINFO: &str = "/proc/cpuinfo";
/// CPU numbers above this are refused when parsing, so that a hostile or
/// corrupt list (`0-4294967295`) cannot make the agent allocate gigabytes.
/// The Debian kernel has `NR_CPUS=8192`.
pub const MAX_CPU: u32 = 65_535;

/// A malformed CPU list.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("bad CPU list {input:?}: {reason}")]
pub struct ParseCpuListError {
    /// The text that failed.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A set of CPU numbers, written by the kernel as `0-3,5`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuList(BTreeSet<u32>);

impl CpuList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// True if `cpu` is in the list.
    pub fn contains(&self, cpu: u32) -> bool {
        self.0.contains(&cpu)
    }

    /// Number of CPUs in the list.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if the list is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The CPUs in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    /// Adds `cpu`.
    pub fn insert(&mut self, cpu: u32) {
        self.0.insert(cpu);
    }

    /// Removes `cpu`.
    pub fn remove(&mut self, cpu: u32) {
        self.0.remove(&cpu);
    }

    /// CPUs in `self` but not in `other`.
    pub fn difference(&self, other: &CpuList) -> CpuList {
        CpuList(self.0.difference(&other.0).copied().collect())
    }
}

impl FromIterator<u32> for CpuList {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl FromStr for CpuList {
    type Err = ParseCpuListError;

    /// Parses `0-3,5` (surrounding whitespace and an empty list allowed).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseCpuListError {
            input: s.to_owned(),
            reason,
        };
        let number = |t: &str| -> Result<u32, ParseCpuListError> {
            let t = t.trim();
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err("not a number"));
            }
            match t.parse::<u32>() {
                Ok(n) if n <= MAX_CPU => Ok(n),
                _ => Err(err("CPU number too large")),
            }
        };
        let mut set = BTreeSet::new();
        let body = s.trim();
        if body.is_empty() {
            return Ok(Self(set));
        }
        for part in body.split(',') {
            match part.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (number(lo)?, number(hi)?);
                    if lo > hi {
                        return Err(err("range runs backwards"));
                    }
                    set.extend(lo..=hi);
                }
                None => {
                    set.insert(number(part)?);
                }
            }
        }
        Ok(Self(set))
    }
}

impl fmt::Display for CpuList {
    /// Writes the compact kernel form, e.g. `0-2,5` (an empty list as the
    /// empty string, as the kernel does).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut iter = self.0.iter().copied().peekable();
        let mut first = true;
        while let Some(start) = iter.next() {
            let mut end = start;
            while iter.peek() == Some(&(end + 1)) {
                end += 1;
                iter.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

/// Why a sysfs access failed.
#[derive(Debug, Error)]
pub enum SysfsError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A CPU list file held garbage.
    #[error("unexpected contents in {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ParseCpuListError,
    },
    /// Neither the firmware node nor `/proc/cpuinfo` gave the CPU's vCPU id.
    #[error("no vCPU id for cpu{cpu}: {why}")]
    NoVcpuId {
        /// The logical CPU.
        cpu: u32,
        /// What each source said (file contents escaped).
        why: String,
    },
    /// Writing a CPU's `online` file failed; the kernel's errno says why
    /// (EBUSY, EINVAL, EPERM, EIO...).
    #[error("cannot set cpu{cpu} {} (errno {errno})", if *.online { "online" } else { "offline" })]
    SetOnline {
        /// The CPU.
        cpu: u32,
        /// The requested state.
        online: bool,
        /// The errno of the write, 0 if none was reported.
        errno: i32,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Where a CPU's vCPU id was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSource {
    /// `cpuN/firmware_node/uid`: the ACPI processor device's `_UID`.
    FirmwareUid,
    /// The `apicid` of `/proc/cpuinfo` (the CPU has no firmware node).
    ApicId,
}

impl fmt::Display for IdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdSource::FirmwareUid => "firmware_node/uid",
            IdSource::ApicId => "apicid in /proc/cpuinfo",
        })
    }
}

/// A CPU's vCPU id and where it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuId {
    /// The vCPU id (= APIC ID = `_UID`).
    pub id: u32,
    /// Where it came from.
    pub source: IdSource,
}

/// Parses a decimal id as sysfs and `/proc/cpuinfo` write it.
fn parse_id(text: &str) -> Option<u32> {
    let t = text.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    t.parse().ok()
}

/// The `apicid` of logical CPU `cpu` in `/proc/cpuinfo` text (blocks of
/// `key : value` lines, one block per online CPU, `processor` first).
pub fn cpuinfo_apicid(text: &str, cpu: u32) -> Option<u32> {
    let mut current = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            current = None;
            continue;
        };
        match key.trim() {
            "processor" => current = parse_id(value),
            "apicid" if current == Some(cpu) => return parse_id(value),
            _ => {}
        }
    }
    None
}

impl SysfsError {
    /// The errno of the failed operation, if the kernel gave one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            SysfsError::Read { source, .. } => source.raw_os_error(),
            SysfsError::SetOnline { errno, .. } => Some(*errno),
            SysfsError::Parse { .. } | SysfsError::NoVcpuId { .. } => None,
        }
    }
}

/// Access to the CPU part of sysfs, rooted at [`CPU_ROOT`] or, for tests,
/// at any directory laid out the same way.
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
    cpuinfo: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self::new()
    }
}

impl Sysfs {
    /// The real `/sys/devices/system/cpu`.
    pub fn new() -> Self {
        Self::with_root(CPU_ROOT)
    }

    /// A tree laid out like `/sys/devices/system/cpu` at `root` (APIC IDs
    /// still from [`CPUINFO`]).
    pub fn with_root(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            cpuinfo: PathBuf::from(CPUINFO),
        }
    }

    /// The same tree, with APIC IDs read from `cpuinfo` instead.
    pub fn with_cpuinfo(mut self, cpuinfo: impl Into<PathBuf>) -> Self {
        self.cpuinfo = cpuinfo.into();
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn read(&self, path: &Path) -> Result<String, SysfsError> {
        std::fs::read_to_string(path).map_err(|source| SysfsError::Read {
            path: path.to_owned(),
            source,
        })
    }

    fn list(&self, name: &str) -> Result<CpuList, SysfsError> {
        let path = self.root.join(name);
        self.read(&path)?
            .parse()
            .map_err(|source| SysfsError::Parse { path, source })
    }

    /// CPUs the kernel can ever bring up (`possible`).
    pub fn possible(&self) -> Result<CpuList, SysfsError> {
        self.list("possible")
    }

    /// CPUs physically present now (`present`).
    pub fn present(&self) -> Result<CpuList, SysfsError> {
        self.list("present")
    }

    /// CPUs online now (`online`).
    pub fn online(&self) -> Result<CpuList, SysfsError> {
        self.list("online")
    }

    fn online_file(&self, cpu: u32) -> PathBuf {
        self.root.join(format!("cpu{cpu}")).join("online")
    }

    /// Whether `cpu` is online, from `cpuN/online`. A present CPU without
    /// that file (the boot CPU is usually not hot-pluggable) is online.
    pub fn is_online(&self, cpu: u32) -> Result<bool, SysfsError> {
        let path = self.online_file(cpu);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(s.trim() == "1"),
            // Gone, or going (a file of a device being removed reads
            // ENODEV): the kernel's online mask still answers.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENODEV) =>
            {
                Ok(self.online()?.contains(cpu))
            }
            Err(source) => Err(SysfsError::Read { path, source }),
        }
    }

    /// Whether `cpuN` exists (present, or not yet gone).
    pub fn exists(&self, cpu: u32) -> bool {
        self.root.join(format!("cpu{cpu}")).is_dir()
    }

    /// The vCPU id of logical CPU `cpu`: its firmware node's `uid`, else
    /// (no firmware node) the APIC ID `/proc/cpuinfo` lists for it, which
    /// it does only while the CPU is online.
    pub fn vcpu_id(&self, cpu: u32) -> Result<VcpuId, SysfsError> {
        let uid = self
            .root
            .join(format!("cpu{cpu}"))
            .join("firmware_node")
            .join("uid");
        let uid_why = match std::fs::read_to_string(&uid) {
            Ok(text) => match parse_id(&text) {
                Some(id) => {
                    return Ok(VcpuId {
                        id,
                        source: IdSource::FirmwareUid,
                    })
                }
                None => format!("firmware_node/uid holds {:?}", text.trim()),
            },
            Err(e) => format!("firmware_node/uid: {e}"),
        };
        let apic_why = match std::fs::read_to_string(&self.cpuinfo) {
            Ok(text) => match cpuinfo_apicid(&text, cpu) {
                Some(id) => {
                    return Ok(VcpuId {
                        id,
                        source: IdSource::ApicId,
                    })
                }
                None => format!(
                    "no apicid for processor {cpu} in {}",
                    self.cpuinfo.display()
                ),
            },
            Err(e) => format!("{}: {e}", self.cpuinfo.display()),
        };
        Err(SysfsError::NoVcpuId {
            cpu,
            why: format!("{uid_why}; {apic_why}"),
        })
    }

    /// Writes `1` or `0` to `cpuN/online`. The write blocks while the
    /// kernel brings the CPU up or down.
    pub fn set_online(&self, cpu: u32, online: bool) -> Result<(), SysfsError> {
        let value: &[u8] = if online { b"1" } else { b"0" };
        let result = std::fs::OpenOptions::new()
            .write(true)
            .open(self.online_file(cpu))
            .and_then(|mut f| io::Write::write_all(&mut f, value));
        result.map_err(|source| SysfsError::SetOnline {
            cpu,
            online,
            errno: source.raw_os_error().unwrap_or(0),
            source,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fake `/sys/devices/system/cpu` in a fresh temporary directory.
    pub(crate) struct FakeCpus(pub PathBuf);

    impl FakeCpus {
        pub(crate) fn new(tag: &str, possible: &str, present: &str, online: &str) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let root =
                std::env::temp_dir().join(format!("guest-sysfs-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).unwrap();
            let fake = Self(root);
            fake.set("possible", possible);
            fake.set("present", present);
            fake.set("online", online);
            let online: CpuList = online.parse().unwrap();
            for cpu in present.parse::<CpuList>().unwrap().iter() {
                // Numbered as booted: cpuN is vCPU N.
                fake.add_cpu(cpu, cpu);
                if cpu != 0 {
                    let v = if online.contains(cpu) { "1\n" } else { "0\n" };
                    fake.set(&format!("cpu{cpu}/online"), v);
                }
            }
            fake
        }

        /// Creates `cpu{logical}` with the firmware node of vCPU `id`.
        pub(crate) fn add_cpu(&self, logical: u32, id: u32) {
            let node = self.0.join(format!("cpu{logical}/firmware_node"));
            std::fs::create_dir_all(&node).unwrap();
            std::fs::write(node.join("uid"), format!("{id}\n")).unwrap();
        }

        pub(crate) fn set(&self, file: &str, contents: &str) {
            std::fs::write(self.0.join(file), contents).unwrap();
        }

        pub(crate) fn get(&self, file: &str) -> String {
            std::fs::read_to_string(self.0.join(file))
                .unwrap()
                .trim()
                .to_owned()
        }

        /// The tree, with its fake `/proc/cpuinfo` (`cpuinfo` in the root).
        pub(crate) fn sysfs(&self) -> Sysfs {
            Sysfs::with_root(&self.0).with_cpuinfo(self.0.join("cpuinfo"))
        }
    }

    impl Drop for FakeCpus {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn list(s: &str) -> CpuList {
        s.parse().unwrap()
    }

    #[test]
    fn parses_cpu_lists() {
        assert_eq!(list("0-3,5").iter().collect::<Vec<_>>(), [0, 1, 2, 3, 5]);
        assert_eq!(list("0\n").iter().collect::<Vec<_>>(), [0]);
        assert_eq!(list(" 2 , 0-1 ").iter().collect::<Vec<_>>(), [0, 1, 2]);
        assert!(list("").is_empty());
        assert!(list("\n").is_empty());
        assert_eq!(list("3-3").len(), 1);
    }

    #[test]
    fn rejects_bad_cpu_lists() {
        for bad in [
            "a",
            "1-",
            "-1",
            "3-1",
            "1,,2",
            "0-4294967295",
            "99999999999",
            "+1",
            "1-2-3",
        ] {
            let err = bad.parse::<CpuList>().unwrap_err();
            assert_eq!(err.input, bad);
        }
    }

    #[test]
    fn displays_compactly() {
        assert_eq!(list("0-3,5").to_string(), "0-3,5");
        assert_eq!(list("5,0,1,2,7,8").to_string(), "0-2,5,7-8");
        assert_eq!(list("4").to_string(), "4");
        assert_eq!(CpuList::new().to_string(), "");
        for s in ["0", "0-7", "0,2,4-6,8190-8191"] {
            assert_eq!(list(s).to_string(), s);
        }
    }

    #[test]
    fn reads_lists_and_online_state() {
        let fake = FakeCpus::new("read", "0-7", "0-2", "0-1");
        let sys = fake.sysfs();
        assert_eq!(sys.possible().unwrap().to_string(), "0-7");
        assert_eq!(sys.present().unwrap().to_string(), "0-2");
        assert_eq!(sys.online().unwrap().to_string(), "0-1");
        assert!(sys.is_online(0).unwrap(), "cpu0 has no online file");
        assert!(sys.is_online(1).unwrap());
        assert!(!sys.is_online(2).unwrap());
        assert!(!sys.is_online(5).unwrap(), "absent CPU");
        fake.set("online", "garbage");
        assert!(matches!(sys.online(), Err(SysfsError::Parse { .. })));
    }

    #[test]
    fn writes_online_and_reports_errno() {
        let fake = FakeCpus::new("write", "0-3", "0-2", "0-1");
        let sys = fake.sysfs();
        sys.set_online(2, true).unwrap();
        assert_eq!(fake.get("cpu2/online"), "1");
        let err = sys.set_online(3, true).unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOENT));
        assert_eq!(
            err.to_string(),
            format!("cannot set cpu3 online (errno {})", libc::ENOENT)
        );
    }

    #[test]
    fn reads_vcpu_ids_from_the_firmware_node_else_the_apic_id() {
        let fake = FakeCpus::new("ids", "0-7", "0-1", "0-1");
        let sys = fake.sysfs();
        let uid = |id| VcpuId {
            id,
            source: IdSource::FirmwareUid,
        };
        assert_eq!(sys.vcpu_id(0).unwrap(), uid(0));
        fake.add_cpu(2, 6);
        assert_eq!(sys.vcpu_id(2).unwrap(), uid(6));
        assert!(sys.exists(2) && !sys.exists(3));
        // No firmware node: the APIC ID of an online CPU.
        std::fs::remove_dir_all(fake.0.join("cpu1/firmware_node")).unwrap();
        let err = sys.vcpu_id(1).unwrap_err();
        assert!(matches!(err, SysfsError::NoVcpuId { cpu: 1, .. }), "{err}");
        fake.set(
            "cpuinfo",
            "processor\t: 0\napicid\t\t: 0\ninitial apicid\t: 0\n\n\
             processor\t: 1\ninitial apicid\t: 9\napicid\t\t: 5\n\n",
        );
        assert_eq!(
            sys.vcpu_id(1).unwrap(),
            VcpuId {
                id: 5,
                source: IdSource::ApicId
            }
        );
        // Garbage in the uid is not a number, and is quoted in the error.
        fake.set("cpu2/firmware_node/uid", "6\u{1b}[2J");
        let err = sys.vcpu_id(2).unwrap_err().to_string();
        assert!(err.contains(r#"holds "6\u{1b}[2J""#), "{err}");
    }

    #[test]
    fn cpuinfo_apic_ids() {
        let text = "processor : 0\napicid : 0\n\nprocessor : 1\napicid : 6\n";
        assert_eq!(cpuinfo_apicid(text, 1), Some(6));
        assert_eq!(cpuinfo_apicid(text, 0), Some(0));
        assert_eq!(cpuinfo_apicid(text, 2), None);
        assert_eq!(cpuinfo_apicid("apicid : 3\n", 0), None, "no processor line");
        assert_eq!(cpuinfo_apicid("processor : 0\napicid : -1\n", 0), None);
    }

    #[test]
    fn reads_the_real_sysfs_when_present() {
        let sys = Sysfs::new();
        if let Ok(online) = sys.online() {
            assert!(!online.is_empty());
            assert!(sys.possible().unwrap().len() >= online.len());
        }
    }
}
