//! Eight clients at once against the fake VMM: every answer is one the API
//! promises, the vCPU view stays consistent, and the server keeps count.

use std::collections::BTreeSet;
use std::time::Duration;

use api::client::{BlockingClient, ClientError, MutationOutcome};
use api::{ErrorCode, OperationStatus, VcpuList, VcpuState};

use crate::fake::{Harness, Settle, MAX};

const CLIENTS: u64 = 8;
const ROUNDS: u64 = 100;

/// A tiny deterministic generator (xorshift), one per client.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn id(&mut self, n: u32) -> u32 {
        u32::try_from(self.below(u64::from(n))).unwrap()
    }

    fn index(&mut self, len: usize) -> usize {
        let len = u64::try_from(len.max(1)).unwrap();
        usize::try_from(self.below(len)).unwrap()
    }
}

fn check_list(list: &VcpuList) {
    assert_eq!(list.max_vcpus, MAX);
    let ids: Vec<u32> = list.vcpus.iter().map(|v| v.id).collect();
    assert_eq!(ids, (0..MAX).collect::<Vec<_>>());
    assert_eq!(list.vcpus[0].state, VcpuState::Present, "vCPU 0 must stay");
    for v in &list.vcpus {
        match v.state {
            VcpuState::Present => assert_eq!(v.guest_online, Some(true)),
            VcpuState::Absent => assert_eq!(v.guest_online, None),
            VcpuState::Adding | VcpuState::Removing => {}
            VcpuState::Stuck => panic!("the fake VMM never has a stuck vCPU"),
        }
    }
}

fn check_mutation(result: Result<MutationOutcome, ClientError>, ops: &mut BTreeSet<u64>) {
    match result {
        Ok(MutationOutcome::Unchanged(op)) => {
            assert!(op.vcpus.is_empty());
            assert_eq!(op.status, OperationStatus::Succeeded);
        }
        Ok(MutationOutcome::Accepted(op)) => {
            assert!(!op.vcpus.is_empty());
            ops.insert(op.id);
        }
        Ok(MutationOutcome::Finished(op)) => {
            assert!(op.status.is_finished());
            ops.insert(op.id);
        }
        Err(ClientError::WaitTimedOut(op)) => {
            assert_eq!(op.status, OperationStatus::Running);
        }
        Err(ClientError::Api { error, .. }) => assert!(
            matches!(
                error.code,
                ErrorCode::Conflict
                    | ErrorCode::Vcpu0NotRemovable
                    | ErrorCode::VcpuNotFound
                    | ErrorCode::InvalidVcpuCount
            ),
            "{error:?}"
        ),
        Err(e) => panic!("{e}"),
    }
}

fn client_loop(c: &BlockingClient, seed: u64) -> u64 {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut ops = BTreeSet::new();
    let mut requests = 0;
    for _ in 0..ROUNDS {
        requests += 1;
        let wait = (rng.below(4) == 0).then(|| Duration::from_millis(rng.below(30)));
        match rng.below(7) {
            0 => check_list(&c.vcpus().unwrap()),
            1 => {
                let vm = c.vm().unwrap();
                assert!(vm.present_vcpus >= 1 && vm.present_vcpus <= MAX);
            }
            2 => check_mutation(c.resize(rng.id(MAX + 2), wait), &mut ops),
            3 => check_mutation(c.add_vcpu(rng.id(MAX + 1), wait), &mut ops),
            4 => check_mutation(c.remove_vcpu(rng.id(MAX + 1), wait), &mut ops),
            5 => {
                if let Some(&id) = ops.iter().nth(rng.index(ops.len())) {
                    match c.operation(id) {
                        Ok(op) => assert_eq!(op.id, id),
                        Err(ClientError::Api { error, .. }) => {
                            assert_eq!(error.code, ErrorCode::OperationNotFound)
                        }
                        Err(e) => panic!("{e}"),
                    }
                } else {
                    c.vm().unwrap();
                }
            }
            _ => assert!(c.metrics().unwrap().contains("vmm_api_requests_total")),
        }
    }
    requests
}

#[test]
fn eight_clients_at_once() {
    let h = Harness::start(Settle::After(Duration::from_millis(3)));
    let socket = h.socket.clone();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|seed| {
            let socket = socket.clone();
            std::thread::spawn(move || client_loop(&BlockingClient::new(socket).unwrap(), seed))
        })
        .collect();
    let requests: u64 = threads
        .into_iter()
        .map(|t| t.join().expect("client panicked"))
        .sum();
    assert_eq!(requests, CLIENTS * ROUNDS);
    assert_eq!(h.metrics.total(), requests);
    for status in [400, 405, 413, 415, 500, 503] {
        assert_eq!(h.metrics.requests(status), 0, "status {status}");
    }
    // Everything settles, and a final resize lands exactly.
    let c = h.blocking();
    h.fake.settle_all();
    let done = c.resize(4, Some(Duration::from_secs(5))).unwrap();
    assert!(
        done.operation().status == OperationStatus::Succeeded,
        "{done:?}"
    );
    let list = c.vcpus().unwrap();
    check_list(&list);
    assert_eq!(list.count(VcpuState::Present), 4);
    assert_eq!(
        list.count(VcpuState::Adding) + list.count(VcpuState::Removing),
        0
    );
    let present: Vec<u32> = list
        .vcpus
        .iter()
        .filter(|v| v.state == VcpuState::Present)
        .map(|v| v.id)
        .collect();
    assert_eq!(present[0], 0);
}
