//! Lazy work of the C library done before any filter is installed.
//!
//! glibc's malloc opens files the first time a thread needs them, from
//! whichever thread that is; under a filter that thread would be killed
//! for it (no list allows open). Both are done once per process, so doing
//! them here, in [`super::configure`] before the VM's threads exist, takes
//! them off the filtered threads:
//!
//! - the arena limit: once more than 8 arenas exist (a thread gets its
//!   own until then: 8 vCPU threads, the console and the API thread are
//!   enough), the next thread's first allocation reads
//!   `/sys/devices/system/cpu/online` to size the limit. Setting the
//!   limit (`M_ARENA_MAX`) to the value glibc would compute, 8 per CPU,
//!   makes it skip the read;
//! - the first time it shrinks a thread arena's heap, it reads
//!   `/proc/sys/vm/overcommit_memory`: a thread that allocates and frees
//!   1 MiB in blocks below the mmap threshold makes its arena grow, then
//!   shrink.

/// Does the C library's lazy, file-reading work now.
pub(super) fn malloc() {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let arenas = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
    set_arena_max(arenas);
    let warm = std::thread::Builder::new()
        .name("malloc-warm-up".into())
        .spawn(|| {
            let blocks: Vec<Vec<u8>> = (0..16).map(|i| vec![i; 64 << 10]).collect();
            std::hint::black_box(&blocks);
        });
    if let Ok(thread) = warm {
        let _ = thread.join();
    }
}

/// mallopt(M_ARENA_MAX, `arenas`).
fn set_arena_max(arenas: libc::c_int) {
    // SAFETY: mallopt takes two integers and only changes a malloc
    // parameter; it returns 0 on an invalid value, which is harmless.
    let _ = unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
}
