//! Starting a session's process: everything from an EXEC request to a
//! running child with its stdio connected to fds the agent polls.
//!
//! The work is split at the clone. [`prepare`] runs in the agent and does
//! all that may allocate or fail for a reason the host should hear about:
//! it validates the request, resolves `cmd` on the child's `PATH`, reads the
//! user and group databases, and builds argv, envp and rlimits as C data.
//! [`spawn`] then opens the terminal or pipes and clones a child that
//! shares the agent's memory until execve (no page tables copied, no
//! copy-on-write faults) and runs on that prepared data with raw system
//! calls only: reset signals, `setsid`, connect stdio (and `TIOCSCTTY`),
//! `chdir`, `setrlimit`, drop privileges, `execve`. A failure in the child
//! is written as (stage, errno) to a close-on-exec status pipe. The parent
//! does not wait for it: the loop polls the pipe like any other fd, and its
//! end of file (exec succeeded) or its report (the program never ran)
//! decides between STARTED and EXEC_FAILED. So many children can be between
//! clone and exec at once.
//!
//! Every fd the agent opens here is close-on-exec, so the child ends up with
//! exactly its fds 0, 1 and 2.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::messages::{clip, quote, Exec, ExecFailedKind, RlimitResource};

use super::sys::{cvt, open_dev_null, pipe_cloexec, set_nonblocking};
use super::user::{self, Identity};

/// The `PATH` used to find `cmd` when the child's environment has none.
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The `TERM` a tty session gets unless its environment says otherwise.
pub(crate) const DEFAULT_TERM: &str = "xterm-256color";

/// Why a session could not start: becomes EXEC_FAILED.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct SpawnError {
    pub kind: ExecFailedKind,
    pub message: String,
    pub errno: Option<i32>,
    pub stage: Option<&'static str>,
}

impl SpawnError {
    fn invalid(message: impl Into<String>) -> Self {
        SpawnError {
            kind: ExecFailedKind::InvalidRequest,
            message: message.into(),
            errno: None,
            stage: None,
        }
    }

    fn os(kind: ExecFailedKind, stage: &'static str, what: &str, errno: i32) -> Self {
        SpawnError {
            kind,
            message: format!("{what}: {}", io::Error::from_raw_os_error(errno)),
            errno: Some(errno),
            stage: Some(stage),
        }
    }

    /// A failure to get fds or a process for the child.
    fn resources(stage: &'static str, err: &io::Error) -> Self {
        let errno = err.raw_os_error().unwrap_or(libc::EIO);
        let kind = match errno {
            libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN | libc::ENOSPC => {
                ExecFailedKind::Resource
            }
            _ => ExecFailedKind::Other,
        };
        SpawnError::os(kind, stage, stage, errno)
    }
}

/// What the agent gives every session unless the request overrides it.
#[derive(Debug, Clone, Default)]
pub struct SpawnDefaults {
    /// The base environment (`KEY=VALUE` order kept), used unless `clear_env`.
    pub env: Vec<(String, String)>,
    /// RLIMIT_NOFILE as the agent found it before raising its own (see
    /// `process::raise_fd_limit`): set in every child before the request's
    /// own `rlimits`, which may override it.
    pub child_nofile: Option<libc::rlimit>,
}

impl SpawnDefaults {
    /// The agent's own environment as the base.
    pub fn from_agent_env() -> Self {
        SpawnDefaults {
            env: std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
            child_nofile: None,
        }
    }
}

/// An EXEC turned into C data, ready for the child.
pub(crate) struct Prepared {
    path: CString,
    /// Owns the strings `argv_ptrs` points into.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    cwd: Option<CString>,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    identity: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    tty: Option<libc::winsize>,
    stdin: bool,
    no_new_privs: bool,
    reset_signals: &'static [libc::c_int],
    /// The session cgroup's `cgroup.procs`, which the child writes `0` to
    /// (see super::cgroups); open in the agent until the clone.
    cgroup_procs: Option<RawFd>,
}

impl Prepared {
    /// Places the child in the cgroup whose `cgroup.procs` is `fd` (which
    /// must stay open until [`spawn`] returns).
    pub(crate) fn place_in_cgroup(&mut self, fd: Option<RawFd>) {
        self.cgroup_procs = fd;
    }
}

/// The signals whose disposition in the agent is not SIG_DFL, read once.
/// A handler would be reset by execve anyway, but SIG_IGN is inherited,
/// so the child resets exactly these (one syscall each, instead of 64).
/// The agent changes no disposition after its start-up, which comes
/// before the first spawn.
fn non_default_signals() -> &'static [libc::c_int] {
    static SIGNALS: std::sync::OnceLock<Vec<libc::c_int>> = std::sync::OnceLock::new();
    SIGNALS.get_or_init(|| {
        (1..=64)
            .filter(|&sig| sig != libc::SIGKILL && sig != libc::SIGSTOP)
            .filter(|&sig| {
                let mut old = KernelSigaction::default();
                // SAFETY: a query only (no new action) into a buffer at
                // least as large as the kernel's struct sigaction.
                let rc = unsafe { raw_sigaction(sig, std::ptr::null(), &mut old) };
                rc == 0 && old.0[0] != libc::SIG_DFL as u64
            })
            .collect()
    })
}

/// The kernel's `struct sigaction` as raw words: the handler is the first
/// word on every Linux architecture; zero everywhere is SIG_DFL with no
/// flags and an empty mask. (glibc's `sigaction` refuses signals 32 and
/// 33, which it reserves, yet they can be inherited as ignored — glibc's
/// own posix_spawn leaves them so — hence the raw system call.)
#[derive(Default)]
#[repr(C)]
struct KernelSigaction([u64; 4]);

/// `rt_sigaction(2)` without libc's filtering.
///
/// # Safety
/// `act` is null or points to a valid action; `old` is null or writable.
unsafe fn raw_sigaction(
    sig: libc::c_int,
    act: *const KernelSigaction,
    old: *mut KernelSigaction,
) -> libc::c_long {
    // The last argument is the size of the kernel's sigset_t: 8 bytes.
    // SAFETY: the caller's contract: `act` and `old` are valid or null.
    unsafe { libc::syscall(libc::SYS_rt_sigaction, sig, act, old, 8usize) }
}

fn c_string(what: &str, s: &str) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError::invalid(format!("{what} contains a NUL byte")))
}

/// Validates an EXEC and builds everything the child needs.
pub(crate) fn prepare(exec: &Exec, defaults: &SpawnDefaults) -> Result<Prepared, SpawnError> {
    if exec.cmd.is_empty() {
        return Err(SpawnError::invalid("cmd is empty"));
    }
    let cmd = c_string("cmd", &exec.cmd)?;
    let mut argv = vec![cmd];
    for arg in &exec.args {
        argv.push(c_string("an argument", arg)?);
    }
    let cwd = exec
        .cwd
        .as_deref()
        .map(|c| c_string("cwd", c))
        .transpose()?;

    let mut rlimits = Vec::with_capacity(exec.rlimits.len() + 1);
    if let Some(nofile) = defaults.child_nofile {
        rlimits.push((libc::RLIMIT_NOFILE as libc::__rlimit_resource_t, nofile));
    }
    for r in &exec.rlimits {
        let res = RlimitResource::parse(&r.resource).ok_or_else(|| {
            SpawnError::invalid(format!("unknown rlimit resource {}", quote(&r.resource)))
        })?;
        if r.soft > r.hard {
            return Err(SpawnError::invalid(format!(
                "rlimit {}: soft limit {} is above hard limit {}",
                quote(&r.resource),
                r.soft,
                r.hard
            )));
        }
        rlimits.push((
            res.linux_resource() as libc::__rlimit_resource_t,
            libc::rlimit {
                rlim_cur: r.soft,
                rlim_max: r.hard,
            },
        ));
    }

    let identity: Option<Identity> = match &exec.user {
        Some(spec) => {
            c_string("user", spec)?;
            Some(user::resolve(spec).map_err(|e| SpawnError {
                kind: ExecFailedKind::BadUser,
                message: e.to_string(),
                errno: None,
                stage: Some("user"),
            })?)
        }
        None => None,
    };

    // The environment: base, then the user's identity, then TERM for a
    // terminal, then the request's entries, each replacing a same-named one.
    let mut env: Vec<(String, String)> = if exec.clear_env {
        Vec::new()
    } else {
        let mut env = defaults.env.clone();
        if let Some(id) = &identity {
            if let (Some(name), Some(home)) = (&id.name, &id.home) {
                set_var(&mut env, "HOME", home);
                set_var(&mut env, "USER", name);
                set_var(&mut env, "LOGNAME", name);
            }
        }
        if exec.tty && !env.iter().any(|(k, _)| k == "TERM") {
            env.push(("TERM".to_owned(), DEFAULT_TERM.to_owned()));
        }
        env
    };
    for entry in &exec.env {
        let (k, v) = entry.split_once('=').ok_or_else(|| {
            SpawnError::invalid(format!("env entry {} is not KEY=VALUE", quote(entry)))
        })?;
        if k.is_empty() {
            return Err(SpawnError::invalid(format!(
                "env entry {} has an empty key",
                quote(entry)
            )));
        }
        set_var(&mut env, k, v);
    }
    let envp = env
        .iter()
        .map(|(k, v)| c_string("an env entry", &format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;

    let path = resolve_program(&exec.cmd, &env, exec.cwd.as_deref())?;

    let argv_ptrs = null_terminated(&argv);
    let envp_ptrs = null_terminated(&envp);
    Ok(Prepared {
        path: c_string("cmd", &path.to_string_lossy())?,
        _argv: argv,
        argv_ptrs,
        _envp: envp,
        envp_ptrs,
        cwd,
        rlimits,
        identity: identity.map(|id| (id.uid, id.gid, id.groups)),
        tty: exec.tty.then_some(libc::winsize {
            ws_row: exec.rows,
            ws_col: exec.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }),
        stdin: exec.stdin,
        no_new_privs: exec.no_new_privs,
        reset_signals: non_default_signals(),
        cgroup_procs: None,
    })
}

fn set_var(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value.to_owned(),
        None => env.push((key.to_owned(), value.to_owned())),
    }
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Finds `cmd` the way `execvp` would, but before the clone and on the child's
/// `PATH`: a `cmd` with a `/` is used as it is (a relative one resolves
/// against the child's cwd at execve); otherwise the first executable
/// regular file in a `PATH` directory wins. If only non-executable matches
/// exist the error is `permission_denied`, if none `not_found`.
fn resolve_program(
    cmd: &str,
    env: &[(String, String)],
    cwd: Option<&str>,
) -> Result<PathBuf, SpawnError> {
    if cmd.contains('/') {
        return Ok(PathBuf::from(cmd));
    }
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    let mut denied = false;
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let mut candidate = PathBuf::from(dir);
        if candidate.is_relative() {
            if let Some(cwd) = cwd {
                candidate = Path::new(cwd).join(candidate);
            }
        }
        candidate.push(cmd);
        let Ok(meta) = fs::metadata(&candidate) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        if meta.permissions().mode() & 0o111 != 0 && is_executable(&candidate) {
            return Ok(candidate);
        }
        denied = true;
    }
    let (kind, errno, what) = if denied {
        (
            ExecFailedKind::PermissionDenied,
            libc::EACCES,
            "is not executable",
        )
    } else {
        (ExecFailedKind::NotFound, libc::ENOENT, "was not found")
    };
    Err(SpawnError {
        kind,
        message: format!("{} {what} in any PATH directory", quote(cmd)),
        errno: Some(errno),
        stage: Some("lookup"),
    })
}

fn is_executable(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
}

/// The agent's ends of a started child's stdio.
#[derive(Debug)]
pub(crate) enum ChildStdio {
    /// A terminal: the master carries output, and input unless `stdin` is
    /// false (then the child's stdin is /dev/null).
    Pty { master: OwnedFd, stdin: bool },
    /// Pipes; `stdin` is `None` when the child's stdin is /dev/null.
    Pipes {
        stdin: Option<OwnedFd>,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
}

/// A cloned child, on its way to execve. Whether it got there is read
/// from `status` (the loop polls it; see [`StartStatus`]).
#[derive(Debug)]
pub(crate) struct Child {
    pub pid: libc::pid_t,
    pub stdio: ChildStdio,
    pub status: StartStatus,
}

/// The steps of the child, as written to the error pipe.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
enum Stage {
    Setsid = 1,
    Cgroup,
    Stdio,
    Tty,
    Chdir,
    Setrlimit,
    Setgroups,
    Setgid,
    Setuid,
    NoNewPrivs,
    Execve,
}

impl Stage {
    const ALL: [Stage; 11] = [
        Stage::Setsid,
        Stage::Cgroup,
        Stage::Stdio,
        Stage::Tty,
        Stage::Chdir,
        Stage::Setrlimit,
        Stage::Setgroups,
        Stage::Setgid,
        Stage::Setuid,
        Stage::NoNewPrivs,
        Stage::Execve,
    ];

    fn name(self) -> &'static str {
        match self {
            Stage::Setsid => "setsid",
            Stage::Cgroup => "cgroup",
            Stage::Stdio => "stdio",
            Stage::Tty => "tty",
            Stage::Chdir => "chdir",
            Stage::Setrlimit => "setrlimit",
            Stage::Setgroups => "setgroups",
            Stage::Setgid => "setgid",
            Stage::Setuid => "setuid",
            Stage::NoNewPrivs => "no_new_privs",
            Stage::Execve => "execve",
        }
    }

    fn failure(self, errno: i32, program: &str, cwd: Option<&str>) -> SpawnError {
        use ExecFailedKind::*;
        let kind = match (self, errno) {
            (Stage::Execve, libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => NotFound,
            (
                Stage::Execve,
                libc::EACCES | libc::EPERM | libc::ENOEXEC | libc::ETXTBSY | libc::EISDIR,
            ) => PermissionDenied,
            (
                Stage::Execve,
                libc::E2BIG | libc::ENOMEM | libc::EMFILE | libc::ENFILE | libc::EAGAIN,
            ) => Resource,
            (Stage::Chdir, _) => BadCwd,
            (Stage::Setgroups | Stage::Setgid | Stage::Setuid, _) => BadUser,
            (Stage::Setrlimit, libc::EPERM) => PermissionDenied,
            (Stage::Setrlimit, libc::EINVAL) => InvalidRequest,
            // pids.max reached, or no memory for the move.
            (Stage::Cgroup, libc::EAGAIN | libc::ENOMEM) => Resource,
            _ => Other,
        };
        let what = match self {
            Stage::Execve => format!("execve {}", clip(program)),
            Stage::Chdir => format!("chdir {}", clip(cwd.unwrap_or(""))),
            other => other.name().to_owned(),
        };
        SpawnError::os(kind, self.name(), &what, errno)
    }
}

/// Opens a new pseudo-terminal: (master, slave), both close-on-exec, the
/// master nonblocking, the size set.
fn open_pty(size: &libc::winsize) -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: plain open of the multiplexer with flags; the fd is checked.
    let master = cvt(unsafe {
        libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK)
    })?;
    // SAFETY: posix_openpt succeeded, the fd is ours alone.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let m = master.as_raw_fd();
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `m` is a pty master; `name` is a writable buffer of the
    // length passed; ioctl TIOCSWINSZ reads a valid winsize.
    unsafe {
        cvt(libc::grantpt(m))?;
        cvt(libc::unlockpt(m))?;
        let rc = libc::ptsname_r(m, name.as_mut_ptr(), name.len());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        cvt(libc::ioctl(
            m,
            libc::TIOCSWINSZ,
            size as *const libc::winsize,
        ))?;
    }
    // SAFETY: ptsname_r wrote a NUL-terminated path into `name`.
    let slave = cvt(unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: open succeeded, the fd is ours alone.
    Ok((master, unsafe { OwnedFd::from_raw_fd(slave) }))
}

/// The child's three stdio fds before the clone (all close-on-exec; dup3 onto
/// 0, 1 and 2 in the child clears that flag on the copies).
struct ChildEnds {
    fds: [OwnedFd; 3],
    tty: bool,
}

/// Starts the child for the prepared program. On success the child is on
/// its way to execve and the caller must watch `Child::status`; on failure
/// no process is left behind.
///
/// The child is made with `clone(CLONE_VM)`: it runs in the agent's memory,
/// on a stack of its own, until execve gives it its own. That spares what
/// fork costs a process that keeps running: copying the page tables, then
/// a copy-on-write fault for each page the agent writes while the child
/// has not yet exec'd. The agent does not wait for the child (unlike
/// vfork), so a child stuck before exec (a hung filesystem under its cwd
/// or program) never stalls the loop. In exchange the child may touch
/// nothing it shares: it makes raw system calls only (no libc, which
/// would write `errno` in the agent's thread-local storage), reads the
/// [`Launch`] the agent keeps untouched until the child is done with it
/// (see [`StartStatus`]), and writes only to its own stack.
pub(crate) fn spawn(p: Prepared) -> Result<Child, SpawnError> {
    let (agent_side, child_ends) = match &p.tty {
        Some(size) => {
            let openpty_err = |e: io::Error| SpawnError::resources("openpty", &e);
            let (master, slave) = open_pty(size).map_err(openpty_err)?;
            let s1 = slave.try_clone().map_err(openpty_err)?;
            // Without stdin the terminal still has fds 1 and 2.
            let s0 = if p.stdin {
                slave.try_clone()
            } else {
                open_dev_null()
            }
            .map_err(openpty_err)?;
            (
                ChildStdio::Pty {
                    master,
                    stdin: p.stdin,
                },
                ChildEnds {
                    fds: [s0, s1, slave],
                    tty: true,
                },
            )
        }
        None => {
            let pipe_err = |e: io::Error| SpawnError::resources("pipe", &e);
            let (stdin_child, stdin_agent) = if p.stdin {
                let (r, w) = pipe_cloexec().map_err(pipe_err)?;
                (r, Some(w))
            } else {
                (open_dev_null().map_err(pipe_err)?, None)
            };
            let (stdout_agent, stdout_child) = pipe_cloexec().map_err(pipe_err)?;
            let (stderr_agent, stderr_child) = pipe_cloexec().map_err(pipe_err)?;
            for fd in stdin_agent.iter().chain([&stdout_agent, &stderr_agent]) {
                set_nonblocking(fd.as_raw_fd()).map_err(pipe_err)?;
            }
            (
                ChildStdio::Pipes {
                    stdin: stdin_agent,
                    stdout: stdout_agent,
                    stderr: stderr_agent,
                },
                ChildEnds {
                    fds: [stdin_child, stdout_child, stderr_child],
                    tty: false,
                },
            )
        }
    };
    let (err_read, err_write) = pipe_cloexec().map_err(|e| SpawnError::resources("pipe", &e))?;

    let program = p.path.to_string_lossy().into_owned();
    let cwd = p.cwd.as_deref().map(|c| c.to_string_lossy().into_owned());
    let mut launch = Box::new(Launch {
        fds: [0, 1, 2].map(|i| child_ends.fds[i].as_raw_fd()),
        tty: child_ends.tty,
        err_fd: err_write.as_raw_fd(),
        prepared: p,
        stack: Vec::with_capacity(CHILD_STACK),
    });
    // The stack grows down from the top of its allocation, 16-byte aligned
    // as both ABIs require at a call.
    let stack_top = {
        let base = launch.stack.as_mut_ptr() as usize;
        (base + CHILD_STACK) & !15
    };
    let arg: *const Launch = &*launch;
    // SAFETY: `child_main` only reads `*arg`, which stays valid and
    // unchanged until the child has exec'd or exited (the Box is kept by
    // the StartStatus, which frees it only then), and runs on the stack
    // above, which nothing else uses. SIGCHLD makes it an ordinary child
    // for waitpid.
    let pid = unsafe {
        libc::clone(
            child_main,
            stack_top as *mut libc::c_void,
            libc::CLONE_VM | libc::SIGCHLD,
            arg as *mut libc::c_void,
        )
    };
    if pid < 0 {
        return Err(SpawnError::resources("clone", &io::Error::last_os_error()));
    }
    // The parent's copies of the child's ends (the PTY slave among them)
    // close here, so end of file on the agent's side means the child side
    // is gone. The child's fd table is its own copy: this does not touch it.
    drop(child_ends);
    drop(err_write);

    if let Err(e) = set_nonblocking(err_read.as_raw_fd()) {
        // Without it the loop could block on this pipe: stop the child.
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        return Err(SpawnError::resources("pipe", &e));
    }
    Ok(Child {
        pid,
        stdio: agent_side,
        status: StartStatus {
            pipe: err_read,
            program,
            cwd,
            launch: Some(launch),
            child_done: std::cell::Cell::new(false),
        },
    })
}

/// The child's stack: its code is a straight line of system calls, a few
/// hundred bytes of frames.
const CHILD_STACK: usize = 64 * 1024;

/// What a cloned child reads before execve, at an address that does not
/// change (boxed), with its stack.
struct Launch {
    prepared: Prepared,
    /// The child's stdio-to-be, as fd numbers in its own fd table.
    fds: [RawFd; 3],
    tty: bool,
    /// The write end of the status pipe.
    err_fd: RawFd,
    /// Only its capacity is used, as the child's stack.
    stack: Vec<u8>,
}

/// The parent's end of a child's close-on-exec status pipe: it ends
/// without a byte when execve succeeds, or carries (stage, errno).
pub(crate) struct StartStatus {
    pipe: OwnedFd,
    program: String,
    cwd: Option<String>,
    /// The memory the child runs on until execve: freed once the child no
    /// longer uses it.
    launch: Option<Box<Launch>>,
    /// The child has exec'd (the pipe ended) or has been reaped.
    child_done: std::cell::Cell<bool>,
}

impl std::fmt::Debug for StartStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartStatus")
            .field("pipe", &self.pipe)
            .field("program", &self.program)
            .field("child_done", &self.child_done.get())
            .finish_non_exhaustive()
    }
}

impl Drop for StartStatus {
    fn drop(&mut self) {
        if !self.child_done.get() {
            // The child may still be running on this memory (the session
            // went away before its start was settled: an error path or the
            // agent's end). Leaking a few KiB beats a child writing into
            // freed memory.
            if let Some(launch) = self.launch.take() {
                std::mem::forget(launch);
            }
        }
    }
}

/// What the status pipe says so far.
#[derive(Debug)]
pub(crate) enum StartReport {
    /// Nothing yet: the child has not reached execve.
    Pending,
    /// execve succeeded: the program runs.
    Running,
    /// The child failed before exec and exits with 127.
    Failed(SpawnError),
}

impl StartStatus {
    pub(crate) fn fd(&self) -> RawFd {
        self.pipe.as_raw_fd()
    }

    /// Tells the status that its child has been reaped: the memory it ran
    /// on can be freed.
    pub(crate) fn child_reaped(&self) {
        self.child_done.set(true);
    }

    /// Reads the pipe without blocking.
    pub(crate) fn poll(&self) -> StartReport {
        let mut report = [0u8; 8];
        let n = loop {
            // SAFETY: reading into a local buffer of the given length.
            let n = unsafe { libc::read(self.fd(), report.as_mut_ptr().cast(), report.len()) };
            if n >= 0 {
                break n as usize;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return StartReport::Pending,
                errno => {
                    return StartReport::Failed(SpawnError {
                        kind: ExecFailedKind::Other,
                        message: "reading the child's status pipe failed".to_owned(),
                        errno,
                        stage: None,
                    })
                }
            }
        };
        if n == 0 {
            // The child's end closed: at execve (after the child left the
            // agent's memory for its own) or at its death.
            self.child_done.set(true);
            return StartReport::Running;
        }
        if n < report.len() {
            // The child writes its 8 bytes in one write to a pipe, which is
            // atomic; fewer means something else went wrong.
            return StartReport::Failed(SpawnError {
                kind: ExecFailedKind::Other,
                message: "the child failed before exec without saying why".to_owned(),
                errno: None,
                stage: None,
            });
        }
        let stage_no = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
        let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
        let stage = Stage::ALL
            .into_iter()
            .find(|s| *s as u32 == stage_no)
            .unwrap_or(Stage::Execve);
        StartReport::Failed(stage.failure(errno, &self.program, self.cwd.as_deref()))
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!(
    "spawn::sys (raw system calls for the cloned child) exists for x86_64 and aarch64 only"
);

/// A system call without libc: returns the result, or `-errno`. The cloned
/// child must not write `errno` (the agent's, in shared memory).
///
/// # Safety
/// As for the system call `nr` with these arguments.
#[cfg(target_arch = "x86_64")]
unsafe fn sys(nr: libc::c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the caller's contract: the call `nr` is sound with `a`;
    // the asm clobbers only what it declares.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// See the x86_64 version.
///
/// # Safety
/// As for the system call `nr` with these arguments.
#[cfg(target_arch = "aarch64")]
unsafe fn sys(nr: libc::c_long, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the caller's contract: the call `nr` is sound with `a`;
    // the asm clobbers only what it declares.
    unsafe {
        std::arch::asm!(
            "svc 0",
            in("x8") nr,
            inlateout("x0") a[0] as isize => ret,
            in("x1") a[1],
            in("x2") a[2],
            in("x3") a[3],
            in("x4") a[4],
            in("x5") a[5],
            options(nostack),
        );
    }
    ret
}

/// Writes (stage, errno) to the status pipe and exits with 127, running
/// nothing of the agent's.
///
/// # Safety
/// Only in the cloned child.
unsafe fn child_fail(err_fd: RawFd, stage: Stage, ret: isize) -> ! {
    // SAFETY: in the cloned child (the caller's contract): a write of a
    // local array and exit_group, raw system calls that touch nothing shared.
    unsafe {
        let errno = (-ret) as i32;
        let mut report = [0u8; 8];
        report[..4].copy_from_slice(&(stage as u32).to_ne_bytes());
        report[4..].copy_from_slice(&errno.to_ne_bytes());
        sys(
            libc::SYS_write,
            [
                err_fd as usize,
                report.as_ptr() as usize,
                report.len(),
                0,
                0,
                0,
            ],
        );
        loop {
            sys(libc::SYS_exit_group, [127, 0, 0, 0, 0, 0]);
        }
    }
}

/// The cloned child's entry: never returns.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the Launch that `spawn` keeps alive and unchanged
    // until this child has exec'd or exited.
    unsafe { child_after_clone(&*(arg as *const Launch)) }
}

/// The child between clone and execve.
///
/// # Safety
/// Only in the child cloned by `spawn`. Makes raw system calls only, writes
/// only its own stack, allocates nothing, and never returns.
unsafe fn child_after_clone(l: &Launch) -> ! {
    // SAFETY: the caller's contract (only in the child cloned by `spawn`):
    // every call below is a raw system call on data `spawn` prepared and
    // keeps unchanged, or on this stack.
    unsafe {
        let p = &l.prepared;
        let fail = |stage, ret| child_fail(l.err_fd, stage, ret);
        // Default dispositions for every signal the agent does not have at
        // default (SIG_IGN survives exec: the agent ignores SIGPIPE, and may
        // have inherited ignored signals), then an empty mask (the agent blocks
        // the signals its signalfd reads, and a blocked mask survives exec).
        let dfl = KernelSigaction::default();
        for &sig in p.reset_signals {
            let act = &dfl as *const KernelSigaction as usize;
            sys(libc::SYS_rt_sigaction, [sig as usize, act, 0, 8, 0, 0]);
        }
        let empty: u64 = 0;
        let set = &empty as *const u64 as usize;
        sys(
            libc::SYS_rt_sigprocmask,
            [libc::SIG_SETMASK as usize, set, 0, 8, 0, 0],
        );

        let r = sys(libc::SYS_setsid, [0; 6]);
        if r < 0 {
            fail(Stage::Setsid, r);
        }
        // Into the session's cgroup before anything else runs as the
        // program (and while still privileged to write cgroup.procs).
        if let Some(fd) = p.cgroup_procs {
            let zero = b"0";
            let r = sys(
                libc::SYS_write,
                [fd as usize, zero.as_ptr() as usize, 1, 0, 0, 0],
            );
            if r < 0 {
                fail(Stage::Cgroup, r);
            }
        }
        for (target, &fd) in l.fds.iter().enumerate() {
            let r = if fd == target as RawFd {
                // Already in place: only the close-on-exec flag must go.
                sys(
                    libc::SYS_fcntl,
                    [target, libc::F_SETFD as usize, 0, 0, 0, 0],
                )
            } else {
                sys(libc::SYS_dup3, [fd as usize, target, 0, 0, 0, 0])
            };
            if r < 0 {
                fail(Stage::Stdio, r);
            }
        }
        // fd 1 is the terminal even when stdin is /dev/null.
        if l.tty {
            let r = sys(libc::SYS_ioctl, [1, libc::TIOCSCTTY as usize, 0, 0, 0, 0]);
            if r < 0 {
                fail(Stage::Tty, r);
            }
        }
        if let Some(cwd) = &p.cwd {
            let r = sys(libc::SYS_chdir, [cwd.as_ptr() as usize, 0, 0, 0, 0, 0]);
            if r < 0 {
                fail(Stage::Chdir, r);
            }
        }
        for (resource, limit) in &p.rlimits {
            let limit = limit as *const libc::rlimit as usize;
            let r = sys(libc::SYS_prlimit64, [0, *resource as usize, limit, 0, 0, 0]);
            if r < 0 {
                fail(Stage::Setrlimit, r);
            }
        }
        if let Some((uid, gid, groups)) = &p.identity {
            let r = sys(
                libc::SYS_setgroups,
                [groups.len(), groups.as_ptr() as usize, 0, 0, 0, 0],
            );
            if r < 0 {
                fail(Stage::Setgroups, r);
            }
            let r = sys(libc::SYS_setgid, [*gid as usize, 0, 0, 0, 0, 0]);
            if r < 0 {
                fail(Stage::Setgid, r);
            }
            let r = sys(libc::SYS_setuid, [*uid as usize, 0, 0, 0, 0, 0]);
            if r < 0 {
                fail(Stage::Setuid, r);
            }
        }
        if p.no_new_privs {
            let r = sys(
                libc::SYS_prctl,
                [libc::PR_SET_NO_NEW_PRIVS as usize, 1, 0, 0, 0, 0],
            );
            if r < 0 {
                fail(Stage::NoNewPrivs, r);
            }
        }
        let r = sys(
            libc::SYS_execve,
            [
                p.path.as_ptr() as usize,
                p.argv_ptrs.as_ptr() as usize,
                p.envp_ptrs.as_ptr() as usize,
                0,
                0,
                0,
            ],
        );
        fail(Stage::Execve, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> SpawnDefaults {
        SpawnDefaults {
            env: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child_nofile: None,
        }
    }

    #[test]
    fn invalid_requests() {
        let d = env(&[("PATH", "/bin:/usr/bin")]);
        let kind = |e: Exec| prepare(&e, &d).err().map(|e| e.kind);
        assert_eq!(kind(Exec::new("")), Some(ExecFailedKind::InvalidRequest));
        assert_eq!(
            kind(Exec::new("a\0b")),
            Some(ExecFailedKind::InvalidRequest)
        );
        let mut e = Exec::new("sh");
        e.env = vec!["NOEQUALS".into()];
        assert_eq!(kind(e), Some(ExecFailedKind::InvalidRequest));
        let mut e = Exec::new("sh");
        e.rlimits = vec![crate::messages::Rlimit {
            resource: "bogus".into(),
            soft: 1,
            hard: 1,
        }];
        assert_eq!(kind(e), Some(ExecFailedKind::InvalidRequest));
        assert_eq!(
            kind(Exec::new("no-such-program-anywhere")),
            Some(ExecFailedKind::NotFound)
        );
    }

    #[test]
    fn env_merging() {
        let d = env(&[("PATH", "/bin:/usr/bin"), ("A", "1")]);
        let mut e = Exec::new("sh");
        e.env = vec!["A=2".into(), "B=x=y".into()];
        e.tty = true;
        let p = prepare(&e, &d).unwrap();
        let envp: Vec<_> = p
            ._envp
            .iter()
            .map(|c| c.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            envp,
            ["PATH=/bin:/usr/bin", "A=2", "TERM=xterm-256color", "B=x=y"]
        );
        e.clear_env = true;
        let p = prepare(&e, &d).unwrap();
        assert_eq!(p._envp.len(), 2);
    }
}
