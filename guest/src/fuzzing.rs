//! Fuzz target bodies for what the kernel hands the agent: uevent
//! datagrams ([`uevent`]), sysfs and `/proc/cpuinfo` text read through the
//! real readers, and the id map fed from them ([`sysfs`]).
//!
//! Each body takes raw bytes, runs the real code and asserts its
//! invariants; a panic is a finding. The cargo-fuzz targets in `fuzz/` and
//! the bounded property tests in `guest/tests/fuzz_props.rs` (stable
//! `cargo test`) call the same functions. Not part of the crate's API;
//! hidden from its docs.

use std::cell::RefCell;
use std::path::PathBuf;

use agent_proto::fuzzing::Input;

use crate::ids::IdMap;
use crate::sysfs::{cpuinfo_apicid, CpuList, IdSource, Sysfs, SysfsError, MAX_CPU};
use crate::topology::to_registry_event;
use crate::uevent::{CpuEvent, CpuEventKind, ParseError, Uevent};

/// Target `uevent`: one netlink datagram through [`Uevent::parse`] and
/// [`CpuEvent`]. Checked: a parsed event's header is sane and agrees with
/// its `ACTION`/`DEVPATH` fields, `SUBSYSTEM`/`SEQNUM` are the last ones
/// given, the event rebuilt as a datagram parses to itself, and a CPU
/// event names exactly `/devices/system/cpu/cpuN` of subsystem `cpu`.
pub fn uevent(data: &[u8]) {
    match Uevent::parse(data) {
        Ok(event) => check_event(&event),
        Err(e) => {
            let _ = e.to_string();
            match e {
                ParseError::Empty => assert!(data.iter().all(|&b| b == 0)),
                ParseError::Libudev => assert!(data.starts_with(b"libudev\0")),
                ParseError::BadHeader(h) => assert!(h.chars().count() <= 64),
                ParseError::Mismatch(_) => {}
            }
        }
    }
    let cpu = CpuEvent::parse(data);
    assert_eq!(
        cpu,
        Uevent::parse(data)
            .ok()
            .as_ref()
            .and_then(CpuEvent::from_uevent)
    );
    if let Some(cpu) = cpu {
        assert_eq!(to_registry_event(cpu).cpu, cpu.cpu);
    }
}

fn check_event(event: &Uevent) {
    assert!(!event.action.is_empty());
    assert!(event.action.bytes().all(|b| b.is_ascii_lowercase()));
    assert!(event.devpath.starts_with('/'));
    let mut subsystem = None;
    let mut seqnum = None;
    for (key, value) in &event.vars {
        assert!(!key.contains('\0') && !value.contains('\0'));
        match key.as_str() {
            "ACTION" => assert_eq!(value, &event.action),
            "DEVPATH" => assert_eq!(value, &event.devpath),
            "SUBSYSTEM" => subsystem = Some(value.clone()),
            "SEQNUM" => seqnum = value.parse::<u64>().ok(),
            _ => {}
        }
    }
    assert_eq!(event.subsystem, subsystem);
    assert_eq!(event.seqnum, seqnum);
    if let Some((key, value)) = event.vars.first() {
        assert_eq!(event.var(key), Some(value.as_str()));
    }
    // The event as the kernel would send it parses to the same event.
    let mut datagram = format!("{}@{}\0", event.action, event.devpath).into_bytes();
    for (key, value) in &event.vars {
        datagram.extend(format!("{key}={value}\0").as_bytes());
    }
    assert_eq!(Uevent::parse(&datagram).as_ref(), Ok(event));
    if let Some(cpu) = CpuEvent::from_uevent(event) {
        assert_eq!(event.subsystem.as_deref(), Some("cpu"));
        let digits = event
            .devpath
            .strip_prefix("/devices/system/cpu/cpu")
            .expect("a CPU's devpath");
        assert!(!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(digits.parse::<u32>().ok(), Some(cpu.cpu));
        let kind = match event.action.as_str() {
            "add" => CpuEventKind::Add,
            "online" => CpuEventKind::Online,
            "offline" => CpuEventKind::Offline,
            "remove" => CpuEventKind::Remove,
            other => panic!("a CPU event of action {other:?}"),
        };
        assert_eq!(cpu.kind, kind);
    }
}

/// A CPU list as text: parsed, bounded, and printed back canonically.
fn check_cpu_list(text: &str) -> Option<CpuList> {
    match text.parse::<CpuList>() {
        Ok(list) => {
            assert!(list.iter().all(|cpu| cpu <= MAX_CPU));
            assert!(list.len() <= MAX_CPU as usize + 1);
            let printed = list.to_string();
            let again: CpuList = printed.parse().expect("a printed list parses");
            assert_eq!(again, list, "{text:?} printed as {printed:?}");
            assert_eq!(again.to_string(), printed);
            Some(list)
        }
        Err(e) => {
            assert_eq!(e.input, text);
            let _ = e.to_string();
            None
        }
    }
}

/// A fake tree, removed with its thread.
#[derive(Debug)]
struct Tree(PathBuf);

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

thread_local! {
    /// This thread's fake `/sys/devices/system/cpu` and `/proc/cpuinfo`.
    static TREE: RefCell<Option<Tree>> = const { RefCell::new(None) };
}

/// This thread's fake tree: `cpu/` with `cpu0`..`cpu7` and their
/// firmware nodes, made once; each run writes the files it needs.
fn tree() -> PathBuf {
    TREE.with(|t| {
        t.borrow_mut()
            .get_or_insert_with(|| {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // Memory-backed when there is one: the files are rewritten
                // on every run.
                let shm = std::path::Path::new("/dev/shm");
                let base = if shm.is_dir() {
                    shm.to_owned()
                } else {
                    std::env::temp_dir()
                };
                let root = base.join(format!("guest-fuzz-{}-{n}", std::process::id()));
                let _ = std::fs::remove_dir_all(&root);
                for cpu in 0..8 {
                    let node = root.join(format!("cpu/cpu{cpu}/firmware_node"));
                    std::fs::create_dir_all(node).expect("a temporary directory");
                }
                Tree(root)
            })
            .0
            .clone()
    })
}

/// Writes `text` at `path`, or removes the file.
fn put(path: PathBuf, text: Option<&[u8]>) {
    match text {
        Some(text) => std::fs::write(path, text).expect("a file"),
        None => {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Target `sysfs`: text for the CPU lists (`possible`, `present`,
/// `online`), one CPU's `online` and `firmware_node/uid` files and
/// `/proc/cpuinfo`, written into a fake tree and read back through the
/// real [`Sysfs`] readers; then [`IdMap`] calls. Checked: the readers say
/// what the text says (a list parses to what [`CpuList`] makes of it, not
/// UTF-8 is a read error, a CPU list stays within [`MAX_CPU`] and prints
/// back canonically), a vCPU id comes from the firmware node when it holds
/// a number, else from `/proc/cpuinfo`; the id map stays a bijection and
/// its former pairs never name a vCPU in use.
pub fn sysfs(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.byte();
    let cpu = u32::from(input.byte() % 8);
    let lists: Vec<&[u8]> = (0..3).map(|_| input.bytes(512)).collect();
    let online_file = input.bytes(16);
    let uid_file = input.bytes(32);
    let cpuinfo = input.bytes(2048);
    for text in lists.iter().chain([&cpuinfo]) {
        let text = String::from_utf8_lossy(text);
        check_cpu_list(&text);
        let _ = cpuinfo_apicid(&text, cpu);
    }

    let root = tree();
    let tree = root.join("cpu");
    for (name, text) in ["possible", "present", "online"].iter().zip(&lists) {
        put(tree.join(name), Some(text));
    }
    let dir = tree.join(format!("cpu{cpu}"));
    let has_online = flags & 1 != 0;
    let has_uid = flags & 2 != 0;
    put(dir.join("online"), has_online.then_some(online_file));
    put(dir.join("firmware_node/uid"), has_uid.then_some(uid_file));
    put(root.join("cpuinfo"), Some(cpuinfo));
    let sysfs = Sysfs::with_root(&tree).with_cpuinfo(root.join("cpuinfo"));

    let read = [sysfs.possible(), sysfs.present(), sysfs.online()];
    for (got, text) in read.iter().zip(&lists) {
        match std::str::from_utf8(text) {
            Err(_) => assert!(matches!(got, Err(SysfsError::Read { .. })), "{got:?}"),
            Ok(text) => match (got, text.parse::<CpuList>()) {
                (Ok(got), Ok(want)) => assert_eq!(got, &want),
                (Err(SysfsError::Parse { .. }), Err(_)) => {}
                (got, want) => panic!("{text:?}: read {got:?}, parsed {want:?}"),
            },
        }
    }
    assert!(sysfs.exists(cpu));
    match sysfs.is_online(cpu) {
        Ok(online) if has_online => {
            let text = std::str::from_utf8(online_file).expect("read as text");
            assert_eq!(online, text.trim() == "1");
        }
        // No file: the online list answers.
        Ok(online) => assert_eq!(Some(online), read[2].as_ref().ok().map(|l| l.contains(cpu))),
        Err(e) => {
            let _ = e.errno();
        }
    }
    let uid = std::str::from_utf8(uid_file)
        .ok()
        .map(str::trim)
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse::<u32>().ok())
        .filter(|_| has_uid);
    let apic = std::str::from_utf8(cpuinfo)
        .ok()
        .and_then(|t| cpuinfo_apicid(t, cpu));
    match sysfs.vcpu_id(cpu) {
        Ok(id) => match (uid, apic) {
            (Some(uid), _) => assert_eq!((id.id, id.source), (uid, IdSource::FirmwareUid)),
            (None, Some(apic)) => assert_eq!((id.id, id.source), (apic, IdSource::ApicId)),
            (None, None) => panic!("an id from nowhere: {id:?}"),
        },
        Err(e) => {
            assert!(uid.is_none() && apic.is_none(), "{e}");
            assert!(matches!(e, SysfsError::NoVcpuId { .. }));
            let _ = e.to_string();
        }
    }
    ids(&mut input);
}

/// [`IdMap`] calls over a small universe (so pairs collide), checked after
/// each: both directions agree, the pair just learnt is there, nothing
/// else changed but the pairs reported replaced, and a forgotten pair's
/// label never names a vCPU in use.
fn ids(input: &mut Input<'_>) {
    const N: u32 = 8;
    let mut map = IdMap::new();
    let mut steps = 0;
    while !input.is_empty() && steps < 256 {
        steps += 1;
        let before = map.pairs();
        let logical = u32::from(input.byte()) % N;
        if input.bool() {
            let id = u32::from(input.byte()) % N;
            let replaced = map.insert(logical, id);
            assert_eq!(
                (map.id(logical), map.logical(id)),
                (Some(id), Some(logical))
            );
            for &(l, i) in &replaced {
                assert!(before.contains(&(i, l)), "replaced a pair it did not have");
            }
            for &(i, l) in &before {
                let gone = replaced.contains(&(l, i));
                assert_eq!(
                    map.pairs().contains(&(i, l)),
                    !gone || (l, i) == (logical, id)
                );
            }
        } else {
            let had = map.id(logical);
            assert_eq!(map.forget(logical), had);
            assert_eq!(map.id(logical), None);
            if let Some(id) = had {
                assert_eq!(map.label(logical), Some(id));
                assert_eq!(map.logical(id), None);
            }
        }
        let pairs = map.pairs();
        assert_eq!(pairs.len(), map.len());
        assert_eq!(map.is_empty(), pairs.is_empty());
        assert!(pairs.windows(2).all(|w| w[0].0 < w[1].0), "pairs by id");
        for l in 0..N {
            match map.id(l) {
                Some(i) => {
                    assert_eq!(map.logical(i), Some(l));
                    assert_eq!(map.label(l), Some(i));
                }
                None => {
                    if let Some(former) = map.label(l) {
                        assert_eq!(map.logical(former), None, "cpu{l}'s former vCPU is in use");
                    }
                }
            }
        }
    }
}
