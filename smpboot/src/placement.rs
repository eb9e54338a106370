//! Where a per-CPU thread runs: pinning it and asking where it is.
//!
//! [`PinnedPlacement`] is the real thing (`sched_setaffinity` to one CPU,
//! `sched_getcpu` to check). Tests that simulate more CPUs than the
//! machine has use [`SimPlacement`](crate::SimPlacement) instead.

use std::fmt;
use std::io;

use thiserror::Error;

/// Errors of thread placement.
#[derive(Debug, Error)]
pub enum PlacementError {
    /// The CPU number does not fit in the kernel's CPU set.
    #[error("CPU {0} is out of range")]
    OutOfRange(u32),
    /// `sched_setaffinity` failed.
    #[error("cannot pin the thread to CPU {cpu}")]
    Pin {
        /// The CPU asked for.
        cpu: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A simulated placement was asked for a CPU it does not know.
    #[error("CPU {0} is not a possible CPU")]
    Unknown(u32),
}

/// How the registry places a thread on its CPU and learns where it runs.
///
/// Both methods are called on the per-CPU thread itself.
pub trait Placement: Send + Sync + fmt::Debug {
    /// Binds the calling thread to `cpu` alone. Called when the thread
    /// starts and each time it leaves park to run again (a CPU that went
    /// down broke the affinity, as the kernel does).
    fn bind(&self, cpu: u32) -> Result<(), PlacementError>;

    /// The CPU the calling thread runs on now; `cpu` is the one it serves.
    fn current_cpu(&self, cpu: u32) -> u32;
}

/// Real placement: `sched_setaffinity` to the CPU, `sched_getcpu` to check.
#[derive(Debug, Default, Clone, Copy)]
pub struct PinnedPlacement;

impl Placement for PinnedPlacement {
    fn bind(&self, cpu: u32) -> Result<(), PlacementError> {
        pin_current_thread(cpu)
    }

    fn current_cpu(&self, cpu: u32) -> u32 {
        current_cpu().unwrap_or(cpu)
    }
}

const CPU_SET_BITS: usize = 8 * std::mem::size_of::<libc::cpu_set_t>();

fn cpu_index(cpu: u32) -> Result<usize, PlacementError> {
    usize::try_from(cpu)
        .ok()
        .filter(|&c| c < CPU_SET_BITS)
        .ok_or(PlacementError::OutOfRange(cpu))
}

fn empty_cpu_set() -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    unsafe { std::mem::zeroed() }
}

fn cpu_set_add(set: &mut libc::cpu_set_t, index: usize) {
    debug_assert!(index < CPU_SET_BITS);
    // SAFETY: `index` is below the set's size in bits (checked by
    // `cpu_index`), so CPU_SET writes inside `set`.
    unsafe { libc::CPU_SET(index, set) }
}

fn cpu_set_has(set: &libc::cpu_set_t, index: usize) -> bool {
    debug_assert!(index < CPU_SET_BITS);
    // SAFETY: `index` is below the set's size in bits, so CPU_ISSET reads
    // inside `set`.
    unsafe { libc::CPU_ISSET(index, set) }
}

/// Pins the calling thread to `cpu` alone.
pub fn pin_current_thread(cpu: u32) -> Result<(), PlacementError> {
    let index = cpu_index(cpu)?;
    let mut set = empty_cpu_set();
    cpu_set_add(&mut set, index);
    set_affinity(&set).map_err(|source| PlacementError::Pin { cpu, source })
}

fn set_affinity(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the
    // size passed, which the kernel only reads.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The CPUs the calling thread may run on.
pub fn current_affinity() -> io::Result<Vec<u32>> {
    let mut set = empty_cpu_set();
    // SAFETY: pid 0 is the calling thread; `set` is a writable cpu_set_t of
    // the size passed.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..CPU_SET_BITS)
        .filter(|&i| cpu_set_has(&set, i))
        .filter_map(|i| u32::try_from(i).ok())
        .collect())
}

/// Replaces the calling thread's affinity with `cpus`.
pub fn set_current_affinity(cpus: &[u32]) -> Result<(), PlacementError> {
    let mut set = empty_cpu_set();
    for &cpu in cpus {
        cpu_set_add(&mut set, cpu_index(cpu)?);
    }
    let first = cpus.first().copied().unwrap_or(0);
    set_affinity(&set).map_err(|source| PlacementError::Pin { cpu: first, source })
}

/// The CPU the calling thread runs on (`sched_getcpu`).
pub fn current_cpu() -> Option<u32> {
    // SAFETY: sched_getcpu takes no arguments and only returns a value.
    let cpu = unsafe { libc::sched_getcpu() };
    u32::try_from(cpu).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_cpu_is_an_error() {
        assert!(matches!(
            pin_current_thread(1 << 20),
            Err(PlacementError::OutOfRange(_))
        ));
    }

    #[test]
    fn pinning_moves_the_thread() {
        let t = std::thread::spawn(|| {
            let allowed = current_affinity().unwrap();
            let cpu = *allowed.first().unwrap();
            PinnedPlacement.bind(cpu).unwrap();
            assert_eq!(current_affinity().unwrap(), vec![cpu]);
            assert_eq!(PinnedPlacement.current_cpu(cpu), cpu);
            set_current_affinity(&allowed).unwrap();
            assert_eq!(current_affinity().unwrap(), allowed);
        });
        t.join().unwrap();
    }
}
