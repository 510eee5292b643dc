// SPDX-License-Identifier: Apache-2.0
//! Confinement of executor worker processes.
//!
//! A worker runs one VM's work: guest PTX is JIT-compiled there and guest-chosen sizes
//! reach the driver from there. So the worker gives up everything it does not need
//! before it reads anything a guest sent:
//!
//! 1. `PR_SET_NO_NEW_PRIVS` (no exec can gain privileges) and `PR_SET_DUMPABLE(0)` (no
//!    core dumps of guest data, no ptrace by processes of the same user).
//! 2. A dedicated unprivileged user: when started as root the worker switches to
//!    [`DEFAULT_WORKER_USER`] (or the user the mediator names), with no supplementary
//!    groups. It keeps only its inherited channel and staging area.
//! 3. Resource limits: no core files, a cap on the user's processes and threads, an
//!    optional cap on private memory, and CPU time for each PTX compilation
//!    ([`JitCpuLimit`]).
//! 4. A seccomp allow-list ([`install_seccomp`]), installed on every thread once the
//!    executor is open and before the first guest request: no exec, no new processes
//!    (threads only), no ptrace or access to other processes' memory, no signals to other
//!    processes, no network sockets, no file creation, no mounts, namespaces, keys, BPF,
//!    perf, modules or clock changes. A call outside the list fails with `EPERM` and its
//!    number is reported on stderr.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;

/// The user workers switch to when started as root, if it exists (else `nobody`).
pub const DEFAULT_WORKER_USER: &str = "vgpu-worker";
/// Set to `0` to run workers without the seccomp filter (for diagnosing a driver that
/// needs a call outside the list; the denied call's number is on the worker's stderr).
pub const SECCOMP_ENV: &str = "VGPU_WORKER_SECCOMP";
/// CPU seconds one PTX module load (the JIT compilation) may take by default.
pub const DEFAULT_JIT_CPU_SECONDS: u64 = 120;
/// Threads and processes the worker user may have at once, by default.
pub const DEFAULT_MAX_TASKS: u64 = 4096;

/// Why a user could not be looked up, or a worker not confined (its message goes to the
/// worker's stderr, or into its start failure).
///
/// Its `Display` is one line with the system's reason in it: the `io::Error`s and
/// seccompiler's errors are fields (named `error`, or `.0`) rather than sources, so that a
/// printer that also walks `source()` does not repeat them.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The name cannot be passed to the password database (a NUL byte).
    #[error("bad user name '{0}'")]
    BadUserName(String),
    /// The password database could not be read.
    #[error("looking up user '{name}': {error}")]
    UserLookup { name: String, error: io::Error },
    #[error("no user '{0}'")]
    NoSuchUser(String),
    /// A `prctl` (named by its option) failed.
    #[error("{option}: {error}")]
    Prctl {
        option: &'static str,
        error: io::Error,
    },
    /// A resource limit could not be set.
    #[error("setrlimit: {0}")]
    SetLimit(io::Error),
    /// Switching to the worker user failed: `call` is `setgroups`, `setresgid` or
    /// `setresuid`.
    #[error("{call}: {error}")]
    SwitchUser {
        call: &'static str,
        error: io::Error,
    },
    /// After dropping privileges the process could still become root again.
    #[error("could switch back to root after dropping privileges")]
    RegainedRoot,
    /// The parent died while the worker switched users.
    #[error("the mediator that started this worker is gone")]
    ParentGone,
    /// The capability sets could not be cleared.
    #[error("capset: {0}")]
    Capabilities(io::Error),
    /// The seccomp allow-list could not be built: `what` is the `rule` or the `filter`.
    #[error("seccomp {what}: {error}")]
    SeccompBuild {
        what: &'static str,
        error: seccompiler::BackendError,
    },
    /// The kernel refused the seccomp filter.
    #[error("installing the seccomp filter: {0}")]
    SeccompInstall(seccompiler::Error),
    /// This build has no allow-list for this architecture.
    #[error("the seccomp allow-list is written for x86_64 Linux")]
    SeccompUnsupported,
    /// The handler that reports denied calls could not be installed.
    #[error("sigaction(SIGSYS): {0}")]
    SigsysReporter(io::Error),
}

/// A user to run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl WorkerUser {
    /// Looks a user up in the password database.
    pub fn lookup(name: &str) -> Result<WorkerUser, SandboxError> {
        let cname = CString::new(name).map_err(|_| SandboxError::BadUserName(name.to_string()))?;
        // SAFETY: `passwd` is plain data (integers and pointers); all zeroes is valid.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16384];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; `buf` outlives the use of `pwd`.
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc != 0 {
            return Err(SandboxError::UserLookup {
                name: name.to_string(),
                error: io::Error::from_raw_os_error(rc),
            });
        }
        if result.is_null() {
            return Err(SandboxError::NoSuchUser(name.to_string()));
        }
        Ok(WorkerUser {
            name: name.to_string(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }

    /// The user workers of this process run as by default: none (stay) unless running
    /// as root, then [`DEFAULT_WORKER_USER`], else `nobody`.
    pub fn default_for_this_process() -> Option<WorkerUser> {
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        match WorkerUser::lookup(DEFAULT_WORKER_USER) {
            Ok(u) => Some(u),
            Err(_) => {
                let nobody = WorkerUser::lookup("nobody").unwrap_or(WorkerUser {
                    name: "nobody".into(),
                    uid: 65534,
                    gid: 65534,
                });
                log::warn!(
                    "no user '{DEFAULT_WORKER_USER}': executor workers run as '{}' (uid {}); \
                     create a dedicated user (useradd --system {DEFAULT_WORKER_USER}) or pass \
                     --worker-user",
                    nobody.name,
                    nobody.uid
                );
                Some(nobody)
            }
        }
    }
}

/// What the mediator asks of each worker it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sandbox {
    /// Switch to this user (needs root or CAP_SETUID/CAP_SETGID); `None`: stay.
    pub user: Option<WorkerUser>,
    /// Cap on the worker's private writable memory (`RLIMIT_DATA`), bytes.
    pub max_data_bytes: Option<u64>,
    /// Cap on the worker user's processes and threads (`RLIMIT_NPROC`).
    pub max_tasks: u64,
    /// CPU seconds one PTX module load may take.
    pub jit_cpu_seconds: u64,
    pub seccomp: bool,
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox {
            user: None,
            max_data_bytes: None,
            max_tasks: DEFAULT_MAX_TASKS,
            jit_cpu_seconds: DEFAULT_JIT_CPU_SECONDS,
            seccomp: seccomp_by_default(),
        }
    }
}

impl Sandbox {
    /// One line for the log, e.g. `user vgpu-worker (uid 998), seccomp on`.
    pub fn describe(&self) -> String {
        let user = match &self.user {
            Some(u) => format!("user {} (uid {})", u.name, u.uid),
            None => "the mediator's user".into(),
        };
        format!(
            "as {user}, seccomp {}, JIT CPU limit {} s{}",
            if self.seccomp { "on" } else { "OFF" },
            self.jit_cpu_seconds,
            self.max_data_bytes
                .map(|b| format!(", private memory limit {} MiB", b >> 20))
                .unwrap_or_default()
        )
    }

    /// The worker's command-line arguments that carry this.
    pub fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(u) = &self.user {
            a.extend(["--uid".into(), u.uid.to_string()]);
            a.extend(["--gid".into(), u.gid.to_string()]);
        }
        if let Some(b) = self.max_data_bytes {
            a.extend(["--max-data-bytes".into(), b.to_string()]);
        }
        a.extend(["--max-tasks".into(), self.max_tasks.to_string()]);
        a.extend(["--jit-cpu-seconds".into(), self.jit_cpu_seconds.to_string()]);
        if !self.seccomp {
            a.push("--no-seccomp".into());
        }
        a
    }
}

/// `Ok` for a system call's 0, else `error(errno)`.
fn check(
    rc: libc::c_int,
    error: impl FnOnce(io::Error) -> SandboxError,
) -> Result<(), SandboxError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(error(io::Error::last_os_error()))
    }
}

/// [`check`] for a `prctl` setting `option`.
fn prctl(rc: libc::c_int, option: &'static str) -> Result<(), SandboxError> {
    check(rc, |error| SandboxError::Prctl { option, error })
}

/// [`check`] for a call that switches users.
fn switch(rc: libc::c_int, call: &'static str) -> Result<(), SandboxError> {
    check(rc, |error| SandboxError::SwitchUser { call, error })
}

fn set_limit(
    resource: libc::__rlimit_resource_t,
    soft: u64,
    hard: u64,
) -> Result<(), SandboxError> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid rlimit.
    check(
        unsafe { libc::setrlimit(resource, &lim) },
        SandboxError::SetLimit,
    )
}

/// Steps 1-3 of the module documentation, in the worker, before anything else.
pub fn confine(
    uid: Option<u32>,
    gid: Option<u32>,
    max_data_bytes: Option<u64>,
    max_tasks: u64,
) -> Result<(), SandboxError> {
    // SAFETY: prctl with integer arguments.
    unsafe {
        prctl(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "PR_SET_NO_NEW_PRIVS",
        )?;
    }
    set_limit(libc::RLIMIT_CORE, 0, 0)?;
    if let Some(bytes) = max_data_bytes {
        set_limit(libc::RLIMIT_DATA, bytes, bytes)?;
    }
    if let (Some(uid), Some(gid)) = (uid, gid) {
        // SAFETY: no preconditions.
        let parent = unsafe { libc::getppid() };
        // Before the switch: root is not held to RLIMIT_NPROC, the user is.
        set_limit(libc::RLIMIT_NPROC, max_tasks, max_tasks)?;
        // SAFETY: plain system calls with integer arguments.
        unsafe {
            switch(libc::setgroups(0, std::ptr::null()), "setgroups")?;
            switch(libc::setresgid(gid, gid, gid), "setresgid")?;
            switch(libc::setresuid(uid, uid, uid), "setresuid")?;
            if libc::setuid(0) == 0 && uid != 0 {
                return Err(SandboxError::RegainedRoot);
            }
            // A change of credentials clears the parent-death signal the mediator set:
            // set it again, and leave if the parent is already gone.
            prctl(
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ),
                "PR_SET_PDEATHSIG",
            )?;
            if libc::getppid() != parent {
                return Err(SandboxError::ParentGone);
            }
        }
    }
    drop_capabilities()?;
    // After the switch, which may reset it.
    // SAFETY: prctl with integer arguments.
    unsafe {
        prctl(
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0),
            "PR_SET_DUMPABLE",
        )?;
    }
    Ok(())
}

/// Clears every capability set: a worker needs none, and one started by a daemon that
/// was given some (e.g. ambient CAP_SETUID to switch users) must not keep them.
fn drop_capabilities() -> Result<(), SandboxError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: prctl with integer arguments; capset reads the header and two data records.
    unsafe {
        prctl(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            ),
            "PR_CAP_AMBIENT_CLEAR_ALL",
        )?;
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
            return Err(SandboxError::Capabilities(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// For the daemon itself (it maps every VM's memory): not dumpable, so no core file holds
/// guest memory and no process of the same user (an executor worker included) may
/// ptrace it or read its memory through /proc.
pub fn protect_daemon() {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        log::warn!(
            "PR_SET_DUMPABLE: {}; the daemon stays dumpable",
            io::Error::last_os_error()
        );
    }
}

/// Limits the CPU time of what runs while it lives (a PTX compilation) to `seconds` more
/// than the process has used so far: past it the kernel ends the worker (`SIGXCPU`), and
/// its VM gets `DEVICE_LOST`. The limit is lifted again when dropped.
pub struct JitCpuLimit {
    armed: bool,
}

impl JitCpuLimit {
    pub fn arm(seconds: u64) -> JitCpuLimit {
        // SAFETY: `rusage` is plain integers; all zeroes is valid.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `usage` is a valid out-parameter.
        let used = if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0 {
            (usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) as u64 + 1
        } else {
            0
        };
        let armed = set_limit(
            libc::RLIMIT_CPU,
            used.saturating_add(seconds),
            libc::RLIM_INFINITY,
        )
        .is_ok();
        JitCpuLimit { armed }
    }
}

impl Drop for JitCpuLimit {
    fn drop(&mut self) {
        if self.armed {
            let _ = set_limit(libc::RLIMIT_CPU, libc::RLIM_INFINITY, libc::RLIM_INFINITY);
        }
    }
}

/// Whether workers install the filter unless told otherwise: where it is supported and
/// [`SECCOMP_ENV`] is not `0`.
pub fn seccomp_by_default() -> bool {
    seccomp_supported() && std::env::var(SECCOMP_ENV).map_or(true, |v| v != "0")
}

/// Whether this build can install the filter (its allow-list is written for x86_64).
pub fn seccomp_supported() -> bool {
    cfg!(all(target_arch = "x86_64", target_os = "linux"))
}

/// Installs the allow-list on every thread of the process (step 4). Needs
/// [`confine`] first (no_new_privs).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub fn install_seccomp() -> Result<(), SandboxError> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond,
        SeccompFilter, SeccompRule, TargetArch,
    };

    install_sigsys_reporter()?;
    let build = |what| move |error| SandboxError::SeccompBuild { what, error };
    let cond =
        |arg: u8, op: Op, value: u64| Cond::new(arg, Len::Qword, op, value).map_err(build("rule"));
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in ALLOWED {
        rules.insert(*nr, Vec::new());
    }
    let rule = |conds: Vec<Cond>| SeccompRule::new(conds).map_err(build("rule"));
    let flag = |mask: u64, value: u64, arg: u8| cond(arg, Op::MaskedEq(mask), value);
    // Threads only: a clone that makes a new process is refused.
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(libc::SYS_clone, vec![rule(vec![flag(thread, thread, 0)?])?]);
    // Files are opened, never created.
    let creat = libc::O_CREAT as u64 | libc::O_TMPFILE as u64;
    rules.insert(libc::SYS_openat, vec![rule(vec![flag(creat, 0, 2)?])?]);
    rules.insert(libc::SYS_open, vec![rule(vec![flag(creat, 0, 1)?])?]);
    // Local sockets only (the driver's helpers); no network.
    rules.insert(
        libc::SYS_socket,
        vec![rule(vec![cond(0, Op::Eq, libc::AF_UNIX as u64)?])?],
    );
    // Signals to this process only.
    // SAFETY: no preconditions.
    let pid = unsafe { libc::getpid() } as u64;
    rules.insert(libc::SYS_tgkill, vec![rule(vec![cond(0, Op::Eq, pid)?])?]);
    rules.insert(
        libc::SYS_kill,
        vec![
            rule(vec![cond(0, Op::Eq, pid)?])?,
            rule(vec![cond(0, Op::Eq, 0)?])?,
        ],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build("filter"))?;
    // clone3's flags are behind a pointer a filter cannot read: answer it ENOSYS so that
    // glibc falls back to clone, whose flags are checked above. A filter of its own: of
    // all filters' answers the strictest wins, and ERRNO is stricter than ALLOW.
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(build("filter"))?;
    for f in [clone3, filter] {
        let program: seccompiler::BpfProgram = f.try_into().map_err(build("filter"))?;
        seccompiler::apply_filter_all_threads(&program).map_err(SandboxError::SeccompInstall)?;
    }
    Ok(())
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub fn install_seccomp() -> Result<(), SandboxError> {
    Err(SandboxError::SeccompUnsupported)
}

/// A denied call raises SIGSYS: report its number once on stderr and make it fail with
/// EPERM, the way a call the process may not make fails.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn install_sigsys_reporter() -> Result<(), SandboxError> {
    extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        // siginfo_t for SIGSYS: si_signo, si_errno, si_code (3 ints, padded to 16 bytes),
        // then si_call_addr (pointer), si_syscall (int), si_arch (uint).
        // SAFETY: the kernel passes a valid siginfo_t and ucontext_t.
        unsafe {
            let nr = *(info as *const u8).add(24).cast::<i32>();
            let uc = ctx.cast::<libc::ucontext_t>();
            (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -(libc::EPERM as i64);
            let mut msg = *b"vgpu-executor-worker: seccomp denied system call      \n";
            let mut n = nr.unsigned_abs();
            let mut i = msg.len() - 2;
            loop {
                msg[i] = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 || i == 0 {
                    break;
                }
                i -= 1;
            }
            libc::write(2, msg.as_ptr().cast(), msg.len());
        }
    }
    // SAFETY: installs a handler that only writes registers of the interrupted context
    // and calls write(2), which is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        check(
            libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()),
            SandboxError::SigsysReporter,
        )
    }
}

/// Calls a CUDA worker makes (the driver, its JIT, glibc, the Rust runtime). Those that
/// need their arguments checked (clone, open, openat, socket, kill, tgkill) are added
/// with their conditions in [`install_seccomp`].
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
const ALLOWED: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_lseek,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getdents64,
    libc::SYS_getcwd,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_ioctl,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mincore,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_brk,
    libc::SYS_membarrier,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_get_mempolicy,
    libc::SYS_set_mempolicy,
    libc::SYS_mbind,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_select,
    libc::SYS_pselect6,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_get_robust_list,
    libc::SYS_rseq,
    libc::SYS_set_tid_address,
    libc::SYS_clone3,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_tkill,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getresuid,
    libc::SYS_getresgid,
    libc::SYS_getgroups,
    libc::SYS_getrlimit,
    libc::SYS_setrlimit,
    libc::SYS_prlimit64,
    libc::SYS_getrusage,
    libc::SYS_times,
    libc::SYS_sysinfo,
    libc::SYS_uname,
    libc::SYS_prctl,
    libc::SYS_arch_prctl,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_getparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_getpriority,
    libc::SYS_setpriority,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_connect,
    libc::SYS_socketpair,
    libc::SYS_restart_syscall,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_becomes_worker_arguments() {
        let s = Sandbox {
            user: Some(WorkerUser {
                name: "w".into(),
                uid: 7,
                gid: 8,
            }),
            max_data_bytes: Some(1 << 30),
            max_tasks: 64,
            jit_cpu_seconds: 5,
            seccomp: false,
        };
        assert_eq!(
            s.args().join(" "),
            "--uid 7 --gid 8 --max-data-bytes 1073741824 --max-tasks 64 --jit-cpu-seconds 5 \
             --no-seccomp"
        );
    }

    #[test]
    fn root_resolves_to_an_existing_user() {
        assert_eq!(WorkerUser::lookup("root").unwrap().uid, 0);
        let e = WorkerUser::lookup("no-such-user-here").unwrap_err();
        assert!(matches!(&e, SandboxError::NoSuchUser(n) if n == "no-such-user-here"));
        assert_eq!(e.to_string(), "no user 'no-such-user-here'");
        assert!(matches!(
            WorkerUser::lookup("a\0b"),
            Err(SandboxError::BadUserName(_))
        ));
    }
}
