//! The guest's view of its CPUs, as its agent prints it on the console
//! (`GUEST-CPU online=<list> vcpus=<list>`: Linux's numbers and their vCPU
//! ids) and as the API reports it, and the check that the two agree.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use api::client::BlockingClient;

use crate::{BoxError, RunningVm};

/// Parses a CPU list like "0-3,5" (stops at the first other character:
/// console lines can be interleaved with other output).
pub fn cpu_list(s: &str) -> BTreeSet<u32> {
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == ',' || c == '-'))
        .unwrap_or(s.len());
    let s = &s[..end];
    let mut set = BTreeSet::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    set.extend(a..=b);
                }
            }
            None => {
                if let Ok(n) = part.parse() {
                    set.insert(n);
                }
            }
        }
    }
    set
}

/// The guest's online CPUs as last printed on its console: Linux's
/// numbers (`online=`) and their vCPU ids (`vcpus=`, `None` if the line
/// was cut).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestView {
    /// Linux's numbers of the online CPUs.
    pub online: BTreeSet<u32>,
    /// Their vCPU ids (`None` if the line was cut).
    pub vcpus: Option<BTreeSet<u32>>,
}

/// The view of one `GUEST-CPU` or `GUEST-READY` console line.
pub fn parse_view(line: &str) -> Option<GuestView> {
    let rest = match line.split_once("GUEST-CPU ") {
        Some((_, rest)) => rest,
        None => line.split_once("GUEST-READY ")?.1,
    };
    Some(GuestView {
        online: cpu_list(crate::job::field(rest, "online")?),
        vcpus: crate::job::field(rest, "vcpus").map(cpu_list),
    })
}

/// The guest's view as last printed on its console.
pub fn guest_view(vm: &RunningVm) -> Option<GuestView> {
    let lines = vm.console().lines();
    lines.iter().rev().find_map(|l| parse_view(&l.text))
}

/// The vCPUs the guest agent reported online, through the API, with
/// Linux's number for each (`guest_cpu`).
pub fn api_guest_online(client: &BlockingClient) -> Result<BTreeMap<u32, Option<u32>>, BoxError> {
    Ok(client
        .vcpus()?
        .vcpus
        .iter()
        .filter(|v| v.guest_online == Some(true))
        .map(|v| (v.id, v.guest_cpu))
        .collect())
}

/// Waits until the guest reports exactly the vCPUs `want` online, both on
/// its console and through the agent's reports in the API, and the two
/// agree on Linux's numbers: the API's `guest_cpu`s of those vCPUs are the
/// console's `online=`. Returns the API's vCPU id -> Linux number.
pub fn wait_guest_online(
    vm: &RunningVm,
    want: &BTreeSet<u32>,
    wait: Duration,
) -> Result<BTreeMap<u32, u32>, BoxError> {
    let client = BlockingClient::new(vm.api_socket())?;
    let deadline = Instant::now() + wait;
    loop {
        let view = guest_view(vm);
        let api = api_guest_online(&client)?;
        let numbers: Option<BTreeMap<u32, u32>> =
            api.iter().map(|(&id, cpu)| Some((id, (*cpu)?))).collect();
        let agree = |view: &GuestView, numbers: &BTreeMap<u32, u32>| {
            view.vcpus.as_ref().is_none_or(|v| v == want)
                && numbers.keys().eq(want.iter())
                && numbers.values().copied().collect::<BTreeSet<_>>() == view.online
        };
        if let (Some(view), Some(numbers)) = (&view, &numbers) {
            if agree(view, numbers) {
                return Ok(numbers.clone());
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "guest online: console {view:?}, agent via API (id: guest_cpu) {api:?}; \
                 expected vCPUs {want:?}"
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
