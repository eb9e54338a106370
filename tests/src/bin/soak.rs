//! `soak`: N random add/remove/resize steps against one guest, checking
//! after every step that the API and the guest agree, and that the VMM
//! leaks nothing (its fds, threads and RSS, from its own metrics, at the
//! start, every `--report-every` steps and at the end), with operation
//! latencies. Never asserts on time.
//!
//! ```sh
//! cargo run --release -p e2e --bin soak -- --steps 1000 --seed 7
//! ```
//!
//! Exit status: 0 every step consistent and fds/threads equal and RSS
//! within `--rss-slack-mib` at the end; 1 otherwise. When the emulated
//! host itself dies (a classified failure), the run starts a fresh VM and
//! goes on from the next step, announced with `E2E-RETRY:` (at most
//! `--host-retries` times); the report says how many steps each VM lived.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use api::client::{BlockingClient, ClientError, MutationOutcome};
use api::{OperationStatus, VcpuState};
use clap::Parser;
use e2e::guest_view::wait_guest_online;
use e2e::{RunningVm, VmSpec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "Random vCPU hotplug steps against one guest, checking agreement and leaks")]
struct Args {
    /// Steps to run.
    #[arg(long, default_value_t = 1000)]
    steps: u32,
    /// Seed of the random steps (printed; the same seed replays them).
    #[arg(long)]
    seed: Option<u64>,
    /// Maximum vCPUs.
    #[arg(long, default_value_t = 8)]
    max: u32,
    /// Print the resource figures every this many steps.
    #[arg(long, default_value_t = 100)]
    report_every: u32,
    /// How long one step may take, seconds.
    #[arg(long, default_value_t = 90)]
    step_timeout: u64,
    /// Fresh VMs after the emulated host died, at most [default: sized to
    /// the steps and the mix from the measured rate of the emulated host's
    /// failures, see `host_retries`].
    #[arg(long)]
    host_retries: Option<u32>,
    /// A step slower than this (ms) prints the console's last lines.
    #[arg(long, default_value_t = 4000)]
    slow_ms: u64,
    /// RSS growth allowed from start to end, MiB.
    #[arg(long, default_value_t = 1)]
    rss_slack_mib: u64,
    /// Which steps: `any` (add, remove and resize alike) or `resize`
    /// (resizes only, the heaviest churn for the emulated host).
    #[arg(long, default_value = "any", value_parser = ["any", "resize"])]
    mix: String,
}

/// The VMM's own figures, from its metrics (`rss`: the process's resident
/// memory less the guest's RAM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resources {
    fds: u64,
    threads: u64,
    rss: u64,
}

fn metric(text: &str, name: &str) -> Result<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("metric {name} missing"))
}

fn resources(client: &BlockingClient) -> Result<Resources> {
    let text = client.metrics()?;
    Ok(Resources {
        fds: metric(&text, "process_open_fds")?,
        threads: metric(&text, "process_threads")?,
        rss: metric(&text, "process_resident_memory_bytes")?
            .saturating_sub(metric(&text, "vmm_guest_memory_resident_bytes")?),
    })
}

/// How many fresh VMs a run may start after the emulated host died: the
/// flag, else sized from the rates measured with `scripts/host-matrix` and
/// the soak (Debian 12's QEMU 7.2 as the outer emulator): about one failure
/// per 100 resize-only steps and one per 500 mixed steps, with room for
/// twice that and two more. Real KVM never retries (no emulated host).
fn host_retries(args: &Args) -> u32 {
    args.host_retries.unwrap_or_else(|| {
        let per_failure = if args.mix == "resize" { 100 } else { 500 };
        2 * args.steps.div_ceil(per_failure) + 2
    })
}

/// One random step.
#[derive(Debug, Clone, Copy)]
enum Step {
    Add(u32),
    Remove(u32),
    Resize(u32),
}

fn pick(rng: &mut StdRng, max: u32, resize_only: bool) -> Step {
    if resize_only {
        return Step::Resize(rng.gen_range(1..=max));
    }
    match rng.gen_range(0..3) {
        0 => Step::Add(rng.gen_range(1..max)),
        1 => Step::Remove(rng.gen_range(1..max)),
        _ => Step::Resize(rng.gen_range(1..=max)),
    }
}

fn run_step(
    client: &BlockingClient,
    step: Step,
    wait: Duration,
) -> Result<MutationOutcome, ClientError> {
    match step {
        Step::Add(id) => client.add_vcpu(id, Some(wait)),
        Step::Remove(id) => client.remove_vcpu(id, Some(wait)),
        Step::Resize(n) => client.resize(n, Some(wait)),
    }
}

/// The `pct`-th percentile (nearest rank) of sorted values.
fn percentile(sorted: &[u64], pct: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) * pct).div_ceil(100);
    sorted[i.min(sorted.len() - 1)]
}

fn report(at: &str, step: u32, r: Resources, present: usize, lat: &[u64]) {
    let mut sorted = lat.to_vec();
    sorted.sort_unstable();
    println!(
        "SOAK {at} step={step} fds={} threads={} rss_kib={} present={present} \
         ops={} p50_ms={} p90_ms={} p99_ms={} max_ms={}",
        r.fds,
        r.threads,
        r.rss / 1024,
        sorted.len(),
        percentile(&sorted, 50),
        percentile(&sorted, 90),
        percentile(&sorted, 99),
        sorted.last().copied().unwrap_or(0),
    );
}

/// A classified failure of the emulated host or its nested guest (see
/// tests/README.md), if that is what happened.
fn classified(vm: &RunningVm) -> Option<String> {
    vm.host_failure_after(Duration::from_secs(5))
        .or_else(|| vm.nested_guest_failure())
}

/// What one VM's life gave.
struct Life {
    next_step: u32,
    failure: Option<String>,
}

#[allow(clippy::too_many_arguments)]
fn soak_vm(
    vm: &mut RunningVm,
    args: &Args,
    rng: &mut StdRng,
    first: u32,
    lat: &mut Vec<u64>,
    baseline: &mut Option<Resources>,
    inconsistent: &mut u32,
) -> Result<Life> {
    vm.wait_for_console("GUEST-READY", Duration::from_secs(300))?;
    let client = BlockingClient::new(vm.api_socket())?;
    let wait = Duration::from_secs(args.step_timeout);
    wait_guest_online(vm, &BTreeSet::from([0]), wait).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Warm-up: every vCPU fd exists once (they are kept for reuse), so the
    // baseline counts them.
    client.resize(args.max, Some(wait))?;
    client.resize(1, Some(wait))?;
    wait_guest_online(vm, &BTreeSet::from([0]), wait).map_err(|e| anyhow::anyhow!("{e}"))?;
    let start = resources(&client)?;
    if baseline.is_none() {
        *baseline = Some(start);
    }
    report("start", first, start, 1, lat);
    let mut step = first;
    while step < args.steps {
        let s = pick(rng, args.max, args.mix == "resize");
        let t = Instant::now();
        let outcome = run_step(&client, s, wait);
        let ms = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
        if ms > args.slow_ms {
            let reason = outcome
                .as_ref()
                .ok()
                .and_then(|o| o.operation().reason.clone());
            println!(
                "SOAK slow step={step} {s:?} ms={ms} reason={reason:?}; the console's last lines:"
            );
            let lines = vm.console().lines();
            for l in lines.iter().rev().take(25).rev() {
                println!("SOAK |   {}", l.text.escape_debug());
            }
        }
        match &outcome {
            Ok(o) if o.operation().status == OperationStatus::Succeeded => lat.push(ms),
            Ok(o) => {
                println!("SOAK step={step} {s:?}: operation {:?}", o.operation());
                if let Some(f) = classified(vm) {
                    return Ok(Life {
                        next_step: step,
                        failure: Some(f),
                    });
                }
                *inconsistent += 1;
            }
            // A refused change (e.g. a conflict) is an answer, not a failure.
            Err(ClientError::Api { status, error }) => {
                println!("SOAK step={step} {s:?}: {status} {}", error.message);
            }
            Err(e) => {
                if let Some(f) = classified(vm) {
                    return Ok(Life {
                        next_step: step,
                        failure: Some(f),
                    });
                }
                bail!("step {step} {s:?}: {e}");
            }
        }
        let present: BTreeSet<u32> = client
            .vcpus()?
            .vcpus
            .iter()
            .filter(|v| v.state == VcpuState::Present)
            .map(|v| v.id)
            .collect();
        if let Err(e) = wait_guest_online(vm, &present, wait) {
            if let Some(f) = classified(vm) {
                return Ok(Life {
                    next_step: step,
                    failure: Some(f),
                });
            }
            println!("SOAK step={step} {s:?}: the API and the guest disagree: {e}");
            *inconsistent += 1;
        }
        step += 1;
        if step.is_multiple_of(args.report_every.max(1)) || step == args.steps {
            report("at", step, resources(&client)?, present.len(), lat);
        }
    }
    // Back to the start's shape, then compare.
    let _ = client.resize(1, Some(wait));
    wait_guest_online(vm, &BTreeSet::from([0]), wait).map_err(|e| anyhow::anyhow!("{e}"))?;
    std::thread::sleep(Duration::from_secs(2));
    let end = resources(&client)?;
    report("end", step, end, 1, lat);
    let base = baseline.unwrap_or(start);
    let rss_grew = end.rss.saturating_sub(base.rss);
    println!(
        "SOAK leak fds={}->{} threads={}->{} rss_kib={}->{} (growth {} KiB)",
        base.fds,
        end.fds,
        base.threads,
        end.threads,
        base.rss / 1024,
        end.rss / 1024,
        rss_grew / 1024
    );
    if end.fds != base.fds || end.threads != base.threads || rss_grew > args.rss_slack_mib << 20 {
        bail!("resources at the end differ from the start beyond the slack");
    }
    Ok(Life {
        next_step: step,
        failure: None,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    println!(
        "SOAK seed={seed} steps={} max={} mix={} host_retries={}",
        args.steps,
        args.max,
        args.mix,
        host_retries(&args)
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let spec = VmSpec::new(1, args.max).timeout(Duration::from_secs(
        600 + u64::from(args.steps) * (args.step_timeout + 10),
    ));
    let (mut step, mut lat, mut baseline, mut inconsistent) = (0, Vec::new(), None, 0);
    let mut lives = Vec::new();
    let mut retries = 0;
    loop {
        let mut vm = e2e::launch(&spec).context("launch the VM")?;
        // The emulated host's configuration (its kvm-amd features), if any.
        let log = vm.console_log();
        if let Some(ready) = log.lines().find(|l| l.contains(e2e::job::READY)) {
            println!("SOAK host {}", ready.trim().escape_debug());
        }
        let life = soak_vm(
            &mut vm,
            &args,
            &mut rng,
            step,
            &mut lat,
            &mut baseline,
            &mut inconsistent,
        );
        let life = match life {
            Ok(l) => l,
            Err(e) => match classified(&vm) {
                Some(f) => Life {
                    next_step: step,
                    failure: Some(f),
                },
                None => return Err(e.context(format!("seed {seed}"))),
            },
        };
        lives.push(life.next_step - step);
        step = life.next_step;
        match life.failure {
            None => break,
            Some(f) if retries < host_retries(&args) => {
                retries += 1;
                // A new VM: its own baseline.
                baseline = None;
                println!(
                    "E2E-RETRY: the emulated host failed at step {step} ({f}); a fresh VM goes on"
                );
            }
            Some(f) => bail!(
                "the emulated host failed {} times; last at step {step}: {f}",
                retries + 1
            ),
        }
    }
    println!(
        "SOAK done seed={seed} steps={step} inconsistent={inconsistent} vms={} steps_per_vm={lives:?}",
        lives.len()
    );
    if inconsistent > 0 {
        bail!("{inconsistent} steps left the API and the guest disagreeing");
    }
    Ok(())
}
