//! The filters compile, the VMM list covers the vCPU list, and installed
//! on a test thread (answering EPERM instead of SIGSYS, so a refusal is
//! visible and harmless) they refuse and allow what the lists say,
//! arguments included.

use seccompiler::{BpfProgram, SeccompAction};

use super::rules::{self, Context};
use super::*;

/// The kernel's limit on a filter's length (BPF_MAXINSNS).
const BPF_MAXINSNS: usize = 4096;

const USER: User = User {
    uid: 65534,
    gid: 65534,
};

#[test]
fn every_filter_compiles_in_every_mode() {
    for class in ThreadClass::ALL {
        for mode in [SeccompMode::Enforce, SeccompMode::Log] {
            for user in [None, Some(USER)] {
                let p: BpfProgram = compile(class, mode, user).unwrap();
                assert!(!p.is_empty(), "{class} {mode}");
                assert!(p.len() < BPF_MAXINSNS, "{class} {mode}: {}", p.len());
            }
        }
        println!(
            "{class}: {} system calls ({} with --user)",
            allowed_count(class, None).unwrap(),
            allowed_count(class, Some(USER)).unwrap()
        );
    }
    assert!(!rules::clone3_enosys().unwrap().is_empty());
}

#[test]
fn the_vmm_list_covers_the_vcpu_list() {
    // Hot-added vCPU threads start under the VMM thread's filter.
    let ctx = Context::current(None);
    let vmm = rules::allowed(ThreadClass::Vmm, &ctx).unwrap();
    let vcpu = rules::allowed(ThreadClass::Vcpu, &ctx).unwrap();
    assert!(vmm.covers(&vcpu));
    assert!(!vcpu.covers(&vmm));
}

#[test]
fn no_list_allows_what_an_attacker_wants_first() {
    let ctx = Context::current(Some(USER));
    for class in ThreadClass::ALL {
        let a = rules::allowed(class, &ctx).unwrap();
        let calls: Vec<i64> = a.syscalls().collect();
        for nr in [
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_ptrace,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_kill,
            libc::SYS_setresuid,
            libc::SYS_mount,
            libc::SYS_bpf,
            libc::SYS_process_vm_writev,
        ] {
            assert!(!calls.contains(&nr), "{class} allows {nr}");
        }
        // Checked arguments stay checked.
        for nr in [
            libc::SYS_ioctl,
            libc::SYS_mmap,
            libc::SYS_mprotect,
            libc::SYS_tgkill,
            libc::SYS_clone,
            libc::SYS_prctl,
        ] {
            assert!(!a.allows_any(nr), "{class} allows {nr} unchecked");
        }
    }
}

#[test]
fn modes_and_classes_parse() {
    assert_eq!("enforce".parse(), Ok(SeccompMode::Enforce));
    assert_eq!("log".parse(), Ok(SeccompMode::Log));
    assert_eq!("off".parse(), Ok(SeccompMode::Off));
    assert!("strict".parse::<SeccompMode>().is_err());
    assert_eq!(SeccompMode::default(), SeccompMode::Enforce);
    for class in ThreadClass::ALL {
        assert_eq!(class.name().parse(), Ok(class));
    }
    assert!("main".parse::<ThreadClass>().is_err());
}

/// The filter of `class`, answering EPERM instead of SIGSYS.
fn eperm_filter(class: ThreadClass) -> BpfProgram {
    let allowed = rules::allowed(class, &Context::current(None)).unwrap();
    rules::compile_with(allowed, SeccompAction::Errno(1)).unwrap()
}

/// Runs `body` on a new thread under `filters` (installed in order).
fn filtered<T: Send + 'static>(
    filters: Vec<BpfProgram>,
    body: impl FnOnce() -> T + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        for f in &filters {
            seccompiler::apply_filter(f).unwrap();
        }
        body()
    })
    .join()
    .unwrap()
}

/// The errno of a failed call (`rc` = -1), or 0 if it succeeded.
fn errno_of(rc: libc::c_long) -> i32 {
    if rc == -1 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

fn socket() -> i32 {
    // SAFETY: socket(2) takes no pointers; a descriptor is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd >= 0 {
        // SAFETY: closing the descriptor just made.
        unsafe { libc::close(fd) };
    }
    errno_of(fd.into())
}

fn ioctl(request: u64) -> i32 {
    // SAFETY: on fd -1 the kernel answers EBADF before reading anything.
    errno_of(unsafe { libc::ioctl(-1, request, 0) }.into())
}

fn mmap(prot: libc::c_int) -> i32 {
    // SAFETY: an anonymous private mapping of one page, unmapped at once.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return errno_of(-1);
        }
        libc::munmap(p, 4096);
        0
    }
}

/// tgkill(2) of this thread with signal `sig` (0 only checks).
fn tgkill(sig: libc::c_int) -> i32 {
    // SAFETY: getpid and gettid take nothing; signal 0 is only checked.
    errno_of(unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::syscall(libc::SYS_gettid),
            sig,
        )
    })
}

#[test]
fn the_console_filter_refuses_sockets_and_executable_memory() {
    let (sock, rw, exec, write) = filtered(vec![eperm_filter(ThreadClass::Console)], || {
        let mut out = std::io::sink();
        let write = std::io::Write::write_all(&mut std::io::stderr(), b"").is_ok()
            && std::io::Write::write_all(&mut out, b"x").is_ok();
        (
            socket(),
            mmap(libc::PROT_READ | libc::PROT_WRITE),
            mmap(libc::PROT_READ | libc::PROT_EXEC),
            write,
        )
    });
    assert_eq!(sock, libc::EPERM);
    assert_eq!(rw, 0);
    assert_eq!(exec, libc::EPERM);
    assert!(write);
}

#[test]
fn the_vcpu_filter_checks_ioctl_request_numbers() {
    let (run, lapic, create, cpuid, tty) = filtered(vec![eperm_filter(ThreadClass::Vcpu)], || {
        (
            ioctl(kvm::KVM_RUN),
            ioctl(kvm::KVM_GET_LAPIC),
            ioctl(kvm::KVM_CREATE_VCPU),
            ioctl(kvm::KVM_SET_CPUID2),
            ioctl(libc::TIOCGWINSZ),
        )
    });
    // Allowed: the kernel answers (no such fd).
    assert_eq!(run, libc::EBADF);
    assert_eq!(lapic, libc::EBADF);
    // Refused by the filter.
    assert_eq!(create, libc::EPERM);
    assert_eq!(cpuid, libc::EPERM);
    assert_eq!(tty, libc::EPERM);
}

#[test]
fn the_vmm_thread_starts_vcpu_threads_that_filter_themselves() {
    let filters = vec![
        rules::clone3_enosys().unwrap(),
        eperm_filter(ThreadClass::Vmm),
    ];
    let vcpu = eperm_filter(ThreadClass::Vcpu);
    // The kick's handler, so that the kick below is harmless.
    crate::vcpu::kick::install_handler().unwrap();
    let (clone3, child, create, kick, other_signal) = filtered(filters, move || {
        // SAFETY: clone3 with a null argument: ENOSYS from the filter (or
        // EFAULT from the kernel if it got through).
        let clone3 = errno_of(unsafe { libc::syscall(libc::SYS_clone3, 0, 0) });
        // A hot-add: glibc falls back to clone(CLONE_THREAD); the new
        // thread names itself and installs the vCPU filter below ours.
        let child = std::thread::Builder::new()
            .name("vcpu9".into())
            .spawn(move || {
                seccompiler::apply_filter(&vcpu).unwrap();
                (ioctl(kvm::KVM_RUN), ioctl(kvm::KVM_CREATE_VCPU))
            })
            .unwrap()
            .join()
            .unwrap();
        (
            clone3,
            child,
            ioctl(kvm::KVM_CREATE_VCPU),
            tgkill(crate::vcpu::kick::kick_signal()),
            tgkill(0),
        )
    });
    assert_eq!(clone3, libc::ENOSYS);
    assert_eq!(child, (libc::EBADF, libc::EPERM));
    assert_eq!(create, libc::EBADF);
    // The kick, to a thread of this process; no other signal (0 is only
    // a check, and so harmless if the filter let it through).
    assert_eq!(kick, 0);
    assert_eq!(other_signal, libc::EPERM);
}

#[test]
fn the_vmm_filter_refuses_a_process_clone() {
    let rc = filtered(vec![eperm_filter(ThreadClass::Vmm)], || {
        // SAFETY: clone(SIGCHLD) without CLONE_THREAD would fork; a child
        // (if the filter let it through) exits at once without unwinding.
        let rc = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
        if rc == 0 {
            // SAFETY: the forked child ends here.
            unsafe { libc::_exit(0) };
        }
        errno_of(rc)
    });
    assert_eq!(rc, libc::EPERM);
}

#[test]
fn set_id_calls_are_allowed_only_with_the_users_ids() {
    let ctx = Context::current(Some(USER));
    let allowed = rules::allowed(ThreadClass::Api, &ctx).unwrap();
    let filter = rules::compile_with(allowed, SeccompAction::Errno(1)).unwrap();
    let (other_uid, other_gid) = filtered(vec![filter], || {
        // SAFETY: set-id calls of this thread only (raw system calls, not
        // glibc's process-wide broadcast); refused by the filter.
        unsafe {
            (
                errno_of(libc::syscall(libc::SYS_setuid, 12345)),
                errno_of(libc::syscall(libc::SYS_setgid, 12345)),
            )
        }
    });
    assert_eq!((other_uid, other_gid), (libc::EPERM, libc::EPERM));
}
