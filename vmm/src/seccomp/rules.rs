//! The building blocks of the filters: an allow-list ([`Allowed`]) with
//! argument conditions, the list every thread shares ([`common`]), the
//! set-id calls of `--user` ([`set_ids`]), and compiling a class's list
//! into a BPF program ([`compile`]).

use std::collections::BTreeMap;

use libc::c_long;
use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::{SeccompError, SeccompMode, ThreadClass};
use crate::privileges::User;

/// What the filters are compiled for: facts known once, at start-up.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Context {
    /// This process (tgkill(2) may only signal it).
    pub pid: u32,
    /// `--user`: the set-id calls of the privilege drop, for the threads
    /// that exist when it happens.
    pub user: Option<User>,
}

impl Context {
    /// The context of the running process.
    pub fn current(user: Option<User>) -> Self {
        Self {
            pid: std::process::id(),
            user,
        }
    }
}

/// An allow-list: system call number -> the argument conditions under
/// which it is allowed (one [`SeccompRule`] per alternative; no rule at
/// all = allowed whatever the arguments).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Allowed(BTreeMap<i64, Vec<SeccompRule>>);

/// One condition: argument `arg` (its low 32 bits: every argument the
/// filters check is an `int`, or an ioctl request, which the kernel takes
/// as `unsigned int`) compared with `value`.
pub(crate) fn arg(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
}

/// A condition on a flag argument: `(arg & mask) == value`.
pub(crate) fn masked(
    arg_index: u8,
    mask: u64,
    value: u64,
) -> Result<SeccompCondition, BackendError> {
    arg(arg_index, SeccompCmpOp::MaskedEq(mask), value)
}

/// Widens a constant of the libc crate (`c_int`, `c_ulong`, ...) to the
/// `u64` a condition compares; a negative one (none is) maps to 0.
pub(crate) fn c(v: impl TryInto<u64>) -> u64 {
    v.try_into().unwrap_or(0)
}

impl Allowed {
    /// Allows `nr` whatever its arguments.
    pub fn any(&mut self, nr: c_long) -> &mut Self {
        self.0.insert(nr, Vec::new());
        self
    }

    /// Allows `nr` when all of `conditions` hold (added as one more
    /// alternative, unless `nr` is already allowed unconditionally).
    pub fn when(
        &mut self,
        nr: c_long,
        conditions: Vec<SeccompCondition>,
    ) -> Result<&mut Self, BackendError> {
        let rule = SeccompRule::new(conditions)?;
        match self.0.get_mut(&nr) {
            Some(rules) if rules.is_empty() => {}
            Some(rules) => {
                if !rules.contains(&rule) {
                    rules.push(rule);
                }
            }
            None => {
                self.0.insert(nr, vec![rule]);
            }
        }
        Ok(self)
    }

    /// Allows `nr` when argument `arg_index` equals one of `values`.
    pub fn when_arg_in(
        &mut self,
        nr: c_long,
        arg_index: u8,
        values: &[u64],
    ) -> Result<&mut Self, BackendError> {
        for &v in values {
            self.when(nr, vec![arg(arg_index, SeccompCmpOp::Eq, v)?])?;
        }
        Ok(self)
    }

    /// Adds everything `other` allows.
    pub fn merge(&mut self, other: Allowed) -> &mut Self {
        for (nr, rules) in other.0 {
            match self.0.get_mut(&nr) {
                None => {
                    self.0.insert(nr, rules);
                }
                Some(mine) if mine.is_empty() => {}
                Some(mine) if rules.is_empty() => mine.clear(),
                Some(mine) => {
                    for rule in rules {
                        if !mine.contains(&rule) {
                            mine.push(rule);
                        }
                    }
                }
            }
        }
        self
    }

    /// The system call numbers allowed (in some form).
    #[cfg(test)]
    pub fn syscalls(&self) -> impl Iterator<Item = i64> + '_ {
        self.0.keys().copied()
    }

    /// How many system calls are allowed (in some form).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether everything `other` allows, this allows too (the same
    /// alternatives or unconditionally).
    #[cfg(test)]
    pub fn covers(&self, other: &Allowed) -> bool {
        other.0.iter().all(|(nr, rules)| match self.0.get(nr) {
            None => false,
            Some(mine) if mine.is_empty() => true,
            Some(mine) => !rules.is_empty() && rules.iter().all(|r| mine.contains(r)),
        })
    }

    /// Whether `nr` is allowed whatever its arguments.
    #[cfg(test)]
    pub fn allows_any(&self, nr: c_long) -> bool {
        self.0.get(&nr).is_some_and(Vec::is_empty)
    }

    fn into_rules(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.0
    }
}

/// What every thread of the VMM may do: allocate, synchronise, tell the
/// time, log, take signals, end.
pub(crate) fn common(ctx: &Context) -> Result<Allowed, BackendError> {
    let no_exec = || masked(2, c(libc::PROT_EXEC), 0);
    let mut a = Allowed::default();
    // Log lines and panic messages on stderr, the SIGSYS line; eventfds:
    // irqfds, the event queue's and the control channel's wake-ups, and
    // the SIGINT/SIGTERM eventfd (that handler runs on whichever thread
    // the signal lands on).
    a.any(libc::SYS_write);
    // glibc's last words (a malloc corruption report) before abort().
    a.any(libc::SYS_writev);
    // Dropping what holds an fd (debug builds check it with F_GETFD first).
    a.any(libc::SYS_close);
    a.when_arg_in(libc::SYS_fcntl, 1, &[c(libc::F_GETFD)])?;
    // Mutexes, condition variables, channels, joins.
    a.any(libc::SYS_futex);
    a.any(libc::SYS_sched_yield);
    // The allocator (glibc's thread arenas grow by mprotect and give pages
    // back by madvise) and thread stacks; never executable memory.
    a.any(libc::SYS_brk);
    a.when(libc::SYS_mmap, vec![no_exec()?])?;
    a.when(libc::SYS_mprotect, vec![no_exec()?])?;
    a.any(libc::SYS_mremap);
    a.any(libc::SYS_munmap);
    a.any(libc::SYS_madvise);
    // glibc sizes a thread's first malloc arena from its CPU affinity.
    a.any(libc::SYS_sched_getaffinity);
    // std's HashMap keys, once per thread.
    a.any(libc::SYS_getrandom);
    // Instant::now where the vDSO falls back to the system call (no
    // usable TSC, as in an emulated host); thread::sleep and its restart
    // after a signal.
    a.any(libc::SYS_clock_gettime);
    a.any(libc::SYS_clock_nanosleep);
    a.any(libc::SYS_restart_syscall);
    // Signals: returning from a handler (SIGINT/SIGTERM, the vCPU kick,
    // glibc's set-id broadcast); masks around thread exit and abort.
    a.any(libc::SYS_rt_sigreturn);
    a.any(libc::SYS_rt_sigprocmask);
    // std's stack-overflow guard, unregistered when a thread ends.
    a.any(libc::SYS_sigaltstack);
    a.any(libc::SYS_gettid);
    a.any(libc::SYS_getpid);
    // The SIGSYS handler names a thread that has no label yet (one still
    // starting under its creator's filter) by its kernel name.
    a.when_arg_in(libc::SYS_prctl, 0, &[c(libc::PR_GET_NAME)])?;
    // abort() (a panic while panicking) signals this process only.
    a.when(
        libc::SYS_tgkill,
        vec![
            arg(0, SeccompCmpOp::Eq, u64::from(ctx.pid))?,
            arg(2, SeccompCmpOp::Eq, c(libc::SIGABRT))?,
        ],
    )?;
    // A thread's end, the process's end (also the SIGSYS handler's).
    a.any(libc::SYS_exit);
    a.any(libc::SYS_exit_group);
    Ok(a)
}

/// `--user`: glibc makes every thread of the process run setgroups,
/// setgid and setuid itself (its set-id broadcast), so the threads alive
/// at the drop (console, API) may make exactly these calls, which are
/// no-ops once done.
pub(crate) fn set_ids(user: Option<User>) -> Result<Allowed, BackendError> {
    let mut a = Allowed::default();
    if let Some(user) = user {
        a.when_arg_in(libc::SYS_setgroups, 0, &[0])?;
        a.when_arg_in(libc::SYS_setgid, 0, &[u64::from(user.gid)])?;
        a.when_arg_in(libc::SYS_setuid, 0, &[u64::from(user.uid)])?;
    }
    Ok(a)
}

/// Everything a thread of `class` may do.
pub(crate) fn allowed(class: ThreadClass, ctx: &Context) -> Result<Allowed, BackendError> {
    let mut a = common(ctx)?;
    match class {
        ThreadClass::Vmm => {
            a.merge(super::vmm::allowed(ctx)?);
            // Hot-added vCPU threads are the VMM thread's children: they
            // run under this filter too, below their own.
            a.merge(super::vcpu::allowed()?);
        }
        ThreadClass::Vcpu => {
            a.merge(super::vcpu::allowed()?);
        }
        ThreadClass::Api => {
            a.merge(super::api::allowed()?);
            a.merge(set_ids(ctx.user)?);
        }
        ThreadClass::Console => {
            a.merge(super::console::allowed()?);
            a.merge(set_ids(ctx.user)?);
        }
    }
    Ok(a)
}

/// The action for a system call outside the list.
fn mismatch(mode: SeccompMode) -> SeccompAction {
    match mode {
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log | SeccompMode::Off => SeccompAction::Log,
    }
}

/// Compiles `allowed` with `on_mismatch` for anything else.
pub(crate) fn compile_with(
    allowed: Allowed,
    on_mismatch: SeccompAction,
) -> Result<BpfProgram, BackendError> {
    SeccompFilter::new(
        allowed.into_rules(),
        on_mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?
    .try_into()
}

/// The filter of `class` in `mode` (`Off` compiles as `Log`).
pub(crate) fn compile(
    class: ThreadClass,
    mode: SeccompMode,
    ctx: &Context,
) -> Result<BpfProgram, SeccompError> {
    let fail = |e| SeccompError::Compile(class, e);
    compile_with(allowed(class, ctx).map_err(fail)?, mismatch(mode)).map_err(fail)
}

/// clone3(2) passes its flags in memory a filter cannot read, so it
/// answers ENOSYS (a second filter, stacked on the VMM thread's) and glibc
/// falls back to clone(2), whose flags the VMM filter checks.
pub(crate) fn clone3_enosys() -> Result<BpfProgram, SeccompError> {
    let mut a = Allowed::default();
    a.any(libc::SYS_clone3);
    let fail = |e| SeccompError::Compile(ThreadClass::Vmm, e);
    SeccompFilter::new(
        a.into_rules(),
        SeccompAction::Allow,
        SeccompAction::Errno(u32::try_from(libc::ENOSYS).unwrap_or(38)),
        TargetArch::x86_64,
    )
    .map_err(fail)?
    .try_into()
    .map_err(fail)
}
