//! The fuzz targets `agent_sink`, `bus` and `http` (`vmm::fuzzing`) as
//! bounded property tests: the committed corpus plus seeded random inputs
//! (see `fuzz/props.rs`; `FUZZ_CASES`, `FUZZ_SEED`), and the seeds that
//! are programs, built here and checked against the committed files
//! (`FUZZ_WRITE_SEEDS=1` rewrites them).

#[path = "../../fuzz/props.rs"]
mod props;

use rand::rngs::StdRng;
use rand::Rng;
use vmm::fuzzing;

/// Writes or checks a committed seed built by this file.
fn seed(target: &str, name: &str, bytes: &[u8]) {
    let path = props::corpus_dir(target).join(name);
    if std::env::var_os("FUZZ_WRITE_SEEDS").is_some() {
        std::fs::write(&path, bytes).unwrap();
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == bytes,
        "{} is stale: FUZZ_WRITE_SEEDS=1 rewrites it",
        path.display()
    );
}

/// A `bus` program, op by op (the encoding `vmm::fuzzing::bus` reads).
#[derive(Default)]
struct Bus(Vec<u8>);

/// Devices, as `vmm::fuzzing::bus` numbers them.
const COM1: u8 = 0;
const COM2: u8 = 1;
const PM: u8 = 2;
const I8042: u8 = 3;
const CMOS: u8 = 4;
const HOTPLUG: u8 = 5;
const GED: u8 = 6;

/// Owner calls, as `vmm::fuzzing::bus` numbers them.
const BEGIN_INSERT: u8 = 0;
const BEGIN_REMOVE: u8 = 1;
const COMPLETE_REMOVAL: u8 = 2;

impl Bus {
    /// `max` vCPU slots, `boot` present, the RTC at `now`.
    fn new(max: u8, boot: u8, now: u64) -> Self {
        let mut p = Self(vec![max - 1, boot - 1]);
        p.0.extend(now.to_le_bytes());
        p
    }

    fn access(&mut self, device: u8, offset: u16, width: usize, write: Option<&[u8]>) -> &mut Self {
        self.0.extend([0, device]);
        if device >= HOTPLUG {
            self.0.extend(offset.to_le_bytes());
        } else {
            self.0.push(u8::try_from(offset).unwrap());
        }
        self.0.push(match width {
            1 => 0,
            2 => 1,
            4 => 2,
            8 => 3,
            _ => panic!("width {width}"),
        });
        match write {
            Some(bytes) => {
                assert_eq!(bytes.len(), width);
                self.0.push(1);
                self.0.extend(bytes);
            }
            None => self.0.push(0),
        }
        self
    }

    fn read(&mut self, device: u8, offset: u16, width: usize) -> &mut Self {
        self.access(device, offset, width, None)
    }

    fn write(&mut self, device: u8, offset: u16, bytes: &[u8]) -> &mut Self {
        self.access(device, offset, bytes.len(), Some(bytes))
    }

    /// The VMM thread calls the block (`notify`: and raises the GED).
    fn owner(&mut self, call: u8, id: u8, notify: bool) -> &mut Self {
        self.0.extend([2, id, call, if notify { 0 } else { 1 }]);
        self
    }

    /// The guest's GED `_EVT`: read the event register, scan every slot
    /// (`CSCN`: select, read the status, ack what it shows), as the AML
    /// does it; the statuses are what the program expects them to be.
    fn scan(&mut self, max: u8, acks: &[(u8, u8)]) -> &mut Self {
        self.read(GED, 0, 4);
        for id in 0..max {
            self.write(HOTPLUG, 0, &u32::from(id).to_le_bytes());
            self.read(HOTPLUG, 4, 1);
            for &(_, bit) in acks.iter().filter(|(which, _)| *which == id) {
                self.write(HOTPLUG, 4, &[bit]);
            }
        }
        self
    }

    /// `_STA` of `id` (CSTA).
    fn sta(&mut self, id: u8) -> &mut Self {
        self.write(HOTPLUG, 0, &u32::from(id).to_le_bytes())
            .read(HOTPLUG, 4, 1)
    }

    /// `_EJ0` of `id` (CEJ0).
    fn ej0(&mut self, id: u8) -> &mut Self {
        self.write(HOTPLUG, 0, &u32::from(id).to_le_bytes())
            .write(HOTPLUG, 4, &[0x08])
    }
}

/// The seeds of `bus`: what Linux does on a hot-add and a hot-remove, the
/// firmware's power and reset writes, the RTC read, a console line.
fn bus_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut add = Bus::new(8, 2, 1_795_404_671);
    add.owner(BEGIN_INSERT, 2, true)
        .owner(BEGIN_INSERT, 5, true)
        .scan(8, &[(2, 0x02), (5, 0x02)])
        .sta(2)
        .sta(5)
        .sta(3);
    let mut remove = Bus::new(4, 4, 0);
    remove
        .owner(BEGIN_REMOVE, 3, true)
        .scan(4, &[(3, 0x04)])
        .ej0(3)
        .sta(3)
        .owner(COMPLETE_REMOVAL, 3, false)
        .owner(BEGIN_INSERT, 3, true)
        .scan(4, &[(3, 0x02)])
        .sta(3);
    // A guest ejecting what it was not asked to: vCPU 0, a present one.
    let mut rogue = Bus::new(4, 3, 0);
    rogue.ej0(0).ej0(2).ej0(3).ej0(9);
    let mut power = Bus::new(1, 1, 0);
    power
        .write(PM, 1, &[0x80])
        .write(PM, 0, &[0x34])
        .write(PM, 4, &[0x01])
        .write(I8042, 0, &[0xfe]);
    let mut rtc = Bus::new(1, 1, 1_795_404_671);
    for reg in [
        0x0a, 0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32, 0x0b, 0x0d, 0x40,
    ] {
        rtc.write(CMOS, 0, &[reg | 0x80]).read(CMOS, 1, 1);
    }
    rtc.write(CMOS, 0, &[0x40])
        .write(CMOS, 1, &[0x5a])
        .read(CMOS, 1, 1);
    let mut serial = Bus::new(1, 1, 0);
    serial.write(COM1, 3, &[0x03]).write(COM1, 1, &[0x02]);
    for b in b"GUEST-READY\r\n" {
        serial.read(COM1, 5, 1).write(COM1, 0, &[*b]);
    }
    for b in b"{\"v\":2,\"type\":\"heartbeat\"}\n" {
        serial.write(COM2, 0, &[*b]);
    }
    vec![
        ("linux_hot_add", add.0),
        ("linux_hot_remove_then_readd", remove.0),
        ("rogue_ejects", rogue.0),
        ("power_off_and_resets", power.0),
        ("rtc_read", rtc.0),
        ("serial_lines", serial.0),
    ]
}

#[test]
fn bus_seeds_are_current() {
    for (name, bytes) in bus_seeds() {
        seed("bus", name, &bytes);
    }
}

/// A random `bus` program: the seeds' moves mixed with random ones.
fn bus_program(rng: &mut StdRng) -> Vec<u8> {
    let max = rng.gen_range(1..=8u8);
    let mut p = Bus::new(max, rng.gen_range(1..=max), rng.gen());
    for _ in 0..rng.gen_range(1..40) {
        let id = rng.gen_range(0..max + 2);
        match rng.gen_range(0..8) {
            0 => {
                p.owner(rng.gen_range(0..6), id, rng.gen());
            }
            1 => {
                p.scan(max, &[(id, 1 << rng.gen_range(1..3))]);
            }
            2 => {
                p.sta(id);
            }
            3 => {
                p.ej0(id);
            }
            4 => {
                let v: u8 = rng.gen();
                p.write(HOTPLUG, 4, &[v]);
            }
            5 => {
                let device = rng.gen_range(0..7);
                let offset = rng.gen_range(0..16);
                let width = [1, 2, 4, 8][rng.gen_range(0..4)];
                if rng.gen() {
                    let bytes: Vec<u8> = (0..width).map(|_| rng.gen()).collect();
                    p.write(device, offset, &bytes);
                } else {
                    p.read(device, offset, width);
                }
            }
            _ => p.0.extend(props::random_bytes(rng, 24)),
        }
    }
    p.0
}

#[test]
fn bus() {
    props::run("bus", 3000, fuzzing::bus, bus_program);
}

/// An `agent_sink` program (the encoding `vmm::fuzzing::agent_sink`
/// reads).
#[derive(Default)]
struct Sink(Vec<u8>);

impl Sink {
    /// With the mailbox or not, an event queue of `capacity` lines.
    fn new(mailbox: bool, capacity: u8) -> Self {
        Self(vec![u8::from(mailbox), capacity - 1])
    }

    fn len(bytes: &[u8]) -> [u8; 2] {
        u16::try_from(bytes.len()).unwrap().to_le_bytes()
    }

    /// The guest pushes into its ring.
    fn push(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.push(0);
        self.0.extend(Self::len(bytes));
        self.0.extend(bytes);
        self
    }

    /// The guest writes COM2 (one byte per write, as the UART does).
    fn uart(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.push(3);
        self.0.extend(Self::len(bytes));
        self.0.extend(bytes);
        self.0.push(1);
        self
    }

    /// The VMM thread takes a batch of lines.
    fn vmm_takes(&mut self) -> &mut Self {
        self.0.push(4);
        self
    }

    /// The VMM sends a host message (`kind` as `host_message` numbers
    /// them) into a FIFO with `room` bytes free.
    fn send(&mut self, cpu: u32, kind: u8, room: u8) -> &mut Self {
        self.0.push(5);
        self.0.extend(cpu.to_le_bytes());
        self.0.extend([kind, room]);
        self
    }

    /// The VMM flushes into a FIFO with `room` bytes free.
    fn flush(&mut self, room: u8) -> &mut Self {
        self.0.extend([6, room]);
        self
    }

    /// The guest drains its ring.
    fn guest_reads(&mut self) -> &mut Self {
        self.0.push(7);
        self
    }
}

const HEARTBEAT: &[u8] = b"{\"v\":2,\"type\":\"heartbeat\"}\n";
const READY: &[u8] =
    b"{\"v\":2,\"type\":\"ready\",\"version\":\"0.1.0\",\"online\":[0,6],\"cpus\":[[0,0],[6,1]]}\n";
const ONLINE: &[u8] =
    b"{\"v\":2,\"type\":\"cpu\",\"cpu\":6,\"logical\":1,\"online\":true,\"requested\":true}\n";
const PREPARED: &[u8] = b"{\"v\":2,\"type\":\"prepared\",\"cpu\":6,\"ok\":true}\n";

/// The seeds of `agent_sink`: a session over the UART, the same through
/// the mailbox (a removal: prepare_remove out, prepared back), a ring of
/// newlines rung again and again, a corrupt head.
fn agent_sink_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut uart = Sink::new(false, 64);
    uart.uart(READY)
        .uart(HEARTBEAT)
        .vmm_takes()
        .send(6, 0, 10)
        .flush(64)
        .uart(PREPARED)
        .vmm_takes();
    let mut mailbox = Sink::new(true, 64);
    mailbox
        .push(READY)
        .uart(&[0])
        .vmm_takes()
        .send(6, 0, 64)
        .guest_reads()
        .push(PREPARED)
        .push(ONLINE)
        .uart(&[0])
        .vmm_takes()
        .send(0, 2, 0)
        .flush(1)
        .guest_reads();
    // Bytes on the UART before the switch, the rest in the ring.
    let mut switch = Sink::new(true, 8);
    switch
        .uart(&HEARTBEAT[..10])
        .push(&HEARTBEAT[10..])
        .uart(&[0])
        .vmm_takes();
    let mut newlines = Sink::new(true, 4);
    newlines.push(&[b'\n'; 16320]).uart(&[0; 64]).vmm_takes();
    // The guest's head far ahead of the tail, then doorbells.
    let mut corrupt = Sink::new(true, 4);
    corrupt.0.extend([1, 1, 1, 0, 0, 0]);
    corrupt.0.extend((u32::MAX / 2).to_le_bytes());
    corrupt.uart(&[0; 8]).send(6, 0, 64);
    vec![
        ("session_over_uart", uart.0),
        ("removal_over_mailbox", mailbox.0),
        ("uart_then_ring", switch.0),
        ("ring_of_newlines", newlines.0),
        ("corrupt_head", corrupt.0),
    ]
}

#[test]
fn agent_sink_seeds_are_current() {
    for (name, bytes) in agent_sink_seeds() {
        seed("agent_sink", name, &bytes);
    }
}

/// A random `agent_sink` program: real lines, doorbells, sends, reads.
fn agent_sink_program(rng: &mut StdRng) -> Vec<u8> {
    let lines: [&[u8]; 5] = [HEARTBEAT, READY, ONLINE, PREPARED, b"\x1b[2J junk\n"];
    let mut p = Sink::new(rng.gen_range(0..4) != 0, rng.gen_range(1..=64));
    for _ in 0..rng.gen_range(1..30) {
        match rng.gen_range(0..9) {
            0 => {
                p.push(lines[rng.gen_range(0..lines.len())]);
            }
            1 => {
                let line = lines[rng.gen_range(0..lines.len())];
                p.uart(line);
            }
            2 => {
                let n = rng.gen_range(1..4);
                p.uart(&vec![0; n]);
            }
            3 => {
                p.vmm_takes();
            }
            4 => {
                p.send(
                    rng.gen_range(0..8),
                    rng.gen_range(0..6),
                    rng.gen_range(0..65),
                );
            }
            5 => {
                p.flush(rng.gen_range(0..65));
            }
            6 => {
                p.guest_reads();
            }
            _ => p.0.extend(props::random_bytes(rng, 16)),
        }
    }
    p.0
}

#[test]
fn agent_sink() {
    props::run("agent_sink", 1500, fuzzing::agent_sink, agent_sink_program);
}

/// Requests a client sends: every route and method, queries, bodies,
/// headers, pipelined.
fn http_request(rng: &mut StdRng) -> Vec<u8> {
    const PATHS: &[&str] = &[
        "/api/v1/vm",
        "/api/v1/vcpus",
        "/api/v1/vcpus/3",
        "/api/v1/vcpus/0",
        "/api/v1/vcpus/99",
        "/api/v1/operations/1",
        "/api/v1/metrics",
        "/api/v1/guest/workers",
        "/api/v1/test/faults",
        "/api/v1/vcpus/-1",
        "/api/v1//vcpus",
        "/",
    ];
    const METHODS: &[&str] = &["GET", "PUT", "DELETE", "POST", "HEAD", "PATCH", "OPTIONS"];
    const QUERIES: &[&str] = &[
        "",
        "?wait=1",
        "?wait=0.5",
        "?wait=-0",
        "?wait=x",
        "?a=b",
        "?wait=1&wait=2",
    ];
    const BODIES: &[&str] = &[
        "",
        "{\"desired\":4}",
        "{\"desired\":0}",
        "{\"desired\":4294967296}",
        "{\"fault\":\"agent_silence\"}",
        "{\"fault\":\"ignore_removal\",\"cpu\":1}",
        "{\"fault\":\"ignore_eject\",\"cpu\":0}",
        "{",
        "[]",
    ];
    let mut out = Vec::new();
    for _ in 0..rng.gen_range(1..4) {
        let method = METHODS[rng.gen_range(0..METHODS.len())];
        let path = PATHS[rng.gen_range(0..PATHS.len())];
        let query = QUERIES[rng.gen_range(0..QUERIES.len())];
        let body = BODIES[rng.gen_range(0..BODIES.len())];
        out.extend(format!("{method} {path}{query} HTTP/1.1\r\nHost: localhost\r\n").as_bytes());
        if !body.is_empty() || rng.gen() {
            if rng.gen() {
                out.extend(b"Content-Type: application/json\r\n");
            }
            out.extend(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        }
        out.extend(b"\r\n");
        out.extend(body.as_bytes());
    }
    out
}

#[test]
fn http() {
    props::run("http", 1000, fuzzing::http, http_request);
}

#[test]
fn http_answers_every_pipelined_request() {
    let answers = fuzzing::serve_http(
        b"GET /api/v1/vm HTTP/1.1\r\nHost: x\r\n\r\n\
          PUT /api/v1/vcpus/3?wait=5 HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /api/v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .answers;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 200, 404]);
}

/// Regression (`bus`, `crash-find-overflow-at-top`): a 4096-byte write at
/// port u64::MAX overflowed `offset + size` in `Bus::find` (a panic with
/// overflow checks; without them the sum wrapped and an access far past
/// a device could land in it). It must miss, like any access off a device.
#[test]
fn bus_access_at_the_top_of_the_address_space_misses() {
    use std::sync::{Arc, Mutex};
    use vmm::bus::Bus;
    use vmm::devices::BusDevice;

    struct Seen(usize);
    impl BusDevice for Seen {
        fn read(&mut self, _: u64, _: &mut [u8]) {
            self.0 += 1;
        }
        fn write(&mut self, _: u64, _: &[u8]) {
            self.0 += 1;
        }
    }
    let device = Arc::new(Mutex::new(Seen(0)));
    let mut bus = Bus::new();
    bus.insert(0x600, 5, device.clone()).unwrap();
    for width in [1, 8, 2560, 4096] {
        for k in 0..8 {
            let addr = u64::MAX - k;
            assert!(!bus.write(addr, &vec![0; width]));
            let mut data = vec![0; width];
            assert!(!bus.read(addr, &mut data));
            assert!(data.iter().all(|&b| b == 0xff));
        }
        // Where a wrapped sum would have landed inside the device.
        let addr = 0x600u64.wrapping_sub(width as u64);
        assert!(!bus.write(addr, &vec![0; width]));
    }
    assert_eq!(device.lock().unwrap().0, 0);
}
