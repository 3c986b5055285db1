//! Per-session cgroups (cgroup v2): each session's processes in a cgroup
//! of their own under the agent's cgroup root, so a signal reaches every
//! one of them (including those that `setsid`ed out of the process group),
//! `memory_max`, `pids_max` and `cpu_max` bound them, and an OOM kill among
//! them is seen in `memory.events`.
//!
//! The root: `--cgroup-root DIR` (created if missing), or, as PID 1,
//! `/sys/fs/cgroup/agentd` under the cgroup2 that init mounts. The agent
//! itself stays where it is (as PID 1, in the root cgroup, which is exempt
//! from the rule that a cgroup with controllers for its children has no
//! processes of its own); it enables in the root's `cgroup.subtree_control`
//! each of the memory, pids and cpu controllers that the root has, and
//! refuses a limit whose controller is missing (EXEC_FAILED
//! `invalid_request`, stage `cgroup`), never ignores it.
//!
//! Placement: the session's cgroup is made before the child is cloned; the
//! child writes `0` to its `cgroup.procs` (an fd the agent opened) right
//! after `setsid`, before it drops privileges and before execve, so
//! nothing the program runs is ever outside it.
//!
//! Files under cgroupfs are kernel memory, not a disk: mkdir, rmdir and
//! reads and writes of its files do not block on I/O, so they run on the
//! loop.
//!
//! Removal: a cgroup can go only once empty. When a session ends, its
//! cgroup is removed if it can be; otherwise (a background grandchild
//! still runs in it) it is kept on a list the core retries after each
//! reap (the agent is a subreaper, so the last one's exit is a SIGCHLD
//! here) and signals at shutdown.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::messages::{Exec, ExecFailedKind};

use super::spawn::SpawnError;
use super::sys::send_signal;

/// `statfs` type of cgroup2.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where init mounts cgroup2.
const INIT_MOUNT: &str = "/sys/fs/cgroup";

/// The stage of an EXEC_FAILED about a session's cgroup.
const STAGE: &str = "cgroup";

/// The controllers the agent uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Controllers {
    pub(crate) memory: bool,
    pub(crate) pids: bool,
    pub(crate) cpu: bool,
}

impl Controllers {
    fn parse(list: &str) -> Controllers {
        let has = |name| list.split_whitespace().any(|c| c == name);
        Controllers {
            memory: has("memory"),
            pids: has("pids"),
            cpu: has("cpu"),
        }
    }

    fn names(self) -> impl Iterator<Item = &'static str> {
        [
            ("memory", self.memory),
            ("pids", self.pids),
            ("cpu", self.cpu),
        ]
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| n)
    }
}

/// The directory session cgroups are made in.
#[derive(Debug, Clone)]
pub(crate) struct CgroupRoot {
    dir: PathBuf,
    /// Enabled for the session cgroups.
    controllers: Controllers,
}

impl CgroupRoot {
    /// Opens `dir` (made if missing) as the parent of session cgroups and
    /// enables the controllers it has for its children. Fails unless `dir`
    /// is on cgroup2.
    pub(crate) fn open(dir: &Path) -> io::Result<CgroupRoot> {
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if !is_cgroup2(dir)? {
            return Err(io::Error::other(format!(
                "{} is not on a cgroup2 file system",
                dir.display()
            )));
        }
        let available = Controllers::parse(&fs::read_to_string(dir.join("cgroup.controllers"))?);
        enable(dir, available);
        let controllers =
            Controllers::parse(&fs::read_to_string(dir.join("cgroup.subtree_control"))?);
        remove_leftovers(dir);
        tracing::info!(root = %dir.display(), ?controllers, "per-session cgroups");
        Ok(CgroupRoot {
            dir: dir.to_owned(),
            controllers,
        })
    }

    /// As PID 1: `agentd` under the cgroup2 init mounted, with the
    /// controllers of the machine's root cgroup enabled down to it. `None`
    /// (logged) where the kernel has no cgroup2.
    pub(crate) fn for_init() -> Option<CgroupRoot> {
        let top = Path::new(INIT_MOUNT);
        if !is_cgroup2(top).unwrap_or(false) {
            tracing::info!("no cgroup2 on {INIT_MOUNT}: sessions get no cgroups");
            return None;
        }
        if let Ok(list) = fs::read_to_string(top.join("cgroup.controllers")) {
            enable(top, Controllers::parse(&list));
        }
        match CgroupRoot::open(&top.join("agentd")) {
            Ok(root) => Some(root),
            Err(e) => {
                tracing::warn!(error = %e, "no per-session cgroups");
                None
            }
        }
    }

    /// Checks that every limit `req` asks for can be enforced here.
    pub(crate) fn check(&self, req: &Exec) -> Result<(), SpawnError> {
        check_limits(Some(self.controllers), req)
    }

    /// Makes session `seq`'s cgroup with `req`'s limits, and opens its
    /// `cgroup.procs` for the child.
    pub(crate) fn create(&self, seq: u64, req: &Exec) -> Result<SessionCgroup, SpawnError> {
        let dir = self.dir.join(seq.to_string());
        if let Err(e) = fs::create_dir(&dir) {
            return Err(os_error("creating the session's cgroup", &dir, &e));
        }
        let cg = SessionCgroup {
            dir,
            procs: None,
            has_kill: false,
        };
        let cg = cg.limited(req)?.opened()?;
        Ok(cg)
    }
}

/// Refuses the limits of `req` that `controllers` (`None`: no cgroups at
/// all) cannot enforce, and a malformed `cpu_max`.
pub(crate) fn check_limits(controllers: Option<Controllers>, req: &Exec) -> Result<(), SpawnError> {
    let asked = [
        ("memory_max", "memory", req.memory_max.is_some()),
        ("pids_max", "pids", req.pids_max.is_some()),
        ("cpu_max", "cpu", req.cpu_max.is_some()),
    ];
    for (key, controller, on) in asked {
        if !on {
            continue;
        }
        let Some(c) = controllers else {
            return Err(invalid(format!(
                "{key} needs per-session cgroups (cgroup v2), which this agent does not have (PID 1 with cgroup2, or --cgroup-root)"
            )));
        };
        let has = match controller {
            "memory" => c.memory,
            "pids" => c.pids,
            _ => c.cpu,
        };
        if !has {
            return Err(invalid(format!(
                "{key} needs the {controller} controller, which the agent's cgroup root does not have"
            )));
        }
    }
    if let Some(cpu) = &req.cpu_max {
        parse_cpu_max(cpu).map_err(invalid)?;
    }
    Ok(())
}

/// `cpu.max` as EXEC gives it: `"QUOTA PERIOD"` or `"max PERIOD"`, in µs,
/// the period from 1 ms to 1 s as the kernel takes it, the quota at least
/// 1 ms.
pub(crate) fn parse_cpu_max(s: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "cpu_max {} is not \"QUOTA PERIOD\" or \"max PERIOD\" in microseconds (period 1000 to 1000000, quota at least 1000)",
            crate::messages::quote(s)
        )
    };
    let mut words = s.split(' ');
    let (Some(quota), Some(period), None) = (words.next(), words.next(), words.next()) else {
        return Err(bad());
    };
    let period: u64 = period.parse().map_err(|_| bad())?;
    if !(1000..=1_000_000).contains(&period) {
        return Err(bad());
    }
    if quota != "max" {
        let q: u64 = quota.parse().map_err(|_| bad())?;
        if q < 1000 {
            return Err(bad());
        }
    }
    Ok(())
}

fn invalid(message: String) -> SpawnError {
    SpawnError {
        kind: ExecFailedKind::InvalidRequest,
        message,
        errno: None,
        stage: Some(STAGE),
    }
}

fn os_error(what: &str, path: &Path, e: &io::Error) -> SpawnError {
    let errno = e.raw_os_error();
    let kind = match errno {
        Some(libc::EINVAL | libc::ERANGE) => ExecFailedKind::InvalidRequest,
        Some(libc::ENOMEM | libc::ENOSPC | libc::EAGAIN | libc::EMFILE | libc::ENFILE) => {
            ExecFailedKind::Resource
        }
        Some(libc::EACCES | libc::EPERM) => ExecFailedKind::PermissionDenied,
        _ => ExecFailedKind::Other,
    };
    SpawnError {
        kind,
        message: format!("{what} ({}): {e}", path.display()),
        errno,
        stage: Some(STAGE),
    }
}

/// A session's cgroup.
#[derive(Debug)]
pub(crate) struct SessionCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, open for writing, until the child is placed.
    procs: Option<OwnedFd>,
    /// The kernel has `cgroup.kill` (5.14 and later).
    has_kill: bool,
}

impl SessionCgroup {
    /// Writes the limits `req` asks for; on failure the cgroup is removed.
    fn limited(self, req: &Exec) -> Result<SessionCgroup, SpawnError> {
        let mut writes: Vec<(&str, String)> = Vec::new();
        if let Some(m) = req.memory_max {
            writes.push(("memory.max", m.to_string()));
        }
        if let Some(p) = req.pids_max {
            writes.push(("pids.max", p.to_string()));
        }
        if let Some(c) = &req.cpu_max {
            writes.push(("cpu.max", c.clone()));
        }
        for (file, value) in writes {
            let path = self.dir.join(file);
            if let Err(e) = write_file(&path, value.as_bytes()) {
                let err = os_error(&format!("writing {value:?} to {file}"), &path, &e);
                self.remove();
                return Err(err);
            }
        }
        Ok(self)
    }

    /// Opens `cgroup.procs` for the child (close-on-exec: the child uses it
    /// before execve, the program never has it).
    fn opened(mut self) -> Result<SessionCgroup, SpawnError> {
        let path = self.dir.join("cgroup.procs");
        match open_write(&path) {
            Ok(fd) => {
                self.procs = Some(fd);
                self.has_kill = self.dir.join("cgroup.kill").exists();
                Ok(self)
            }
            Err(e) => {
                let err = os_error("opening cgroup.procs", &path, &e);
                self.remove();
                Err(err)
            }
        }
    }

    /// The fd the child writes `0` to, while it has not been placed.
    pub(crate) fn procs_fd(&self) -> Option<RawFd> {
        self.procs.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// The child has been cloned: its copy of the fd is its own.
    pub(crate) fn child_placed(&mut self) {
        self.procs = None;
    }

    /// Signals every process in it: `cgroup.kill` for SIGKILL where the
    /// kernel has it (atomic, reaches processes forking as it runs), else
    /// each pid of `cgroup.procs`, read until it lists none that was not
    /// signalled already (a fork racing the reading is caught by a later
    /// pass).
    pub(crate) fn signal(&self, signal: libc::c_int) {
        if signal == libc::SIGKILL && self.has_kill {
            match write_file(&self.dir.join("cgroup.kill"), b"1") {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "cgroup.kill failed; signalling each process"),
            }
        }
        let mut done: Vec<libc::pid_t> = Vec::new();
        for _ in 0..8 {
            let pids = self.pids();
            let fresh: Vec<libc::pid_t> = pids.into_iter().filter(|p| !done.contains(p)).collect();
            if fresh.is_empty() {
                return;
            }
            for &pid in &fresh {
                send_signal(pid, signal);
            }
            done.extend(fresh);
        }
    }

    /// The processes in it now.
    fn pids(&self) -> Vec<libc::pid_t> {
        fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Whether the OOM killer has killed a process in it
    /// (`memory.events`' `oom_kill`; false without the memory controller).
    pub(crate) fn oom_killed(&self) -> bool {
        let Ok(events) = fs::read_to_string(self.dir.join("memory.events")) else {
            return false;
        };
        events
            .lines()
            .filter_map(|l| l.split_once(' '))
            .any(|(k, v)| k == "oom_kill" && v.trim().parse::<u64>().is_ok_and(|n| n > 0))
    }

    /// Removes it if it is empty; false while processes remain in it.
    pub(crate) fn remove(&self) -> bool {
        match fs::remove_dir(&self.dir) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => {
                if e.raw_os_error() != Some(libc::EBUSY) {
                    tracing::warn!(cgroup = %self.dir.display(), error = %e, "removing a session cgroup");
                }
                false
            }
        }
    }
}

/// Whether `dir` is on cgroup2.
fn is_cgroup2(dir: &Path) -> io::Result<bool> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: an all-zero statfs is a valid value for the kernel to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path, `st` a statfs to write.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == CGROUP2_SUPER_MAGIC)
}

/// Enables each of `want` in `dir`'s `cgroup.subtree_control`, one at a
/// time so that one the kernel refuses does not stop the others.
fn enable(dir: &Path, want: Controllers) {
    let path = dir.join("cgroup.subtree_control");
    for name in want.names() {
        if let Err(e) = write_file(&path, format!("+{name}").as_bytes()) {
            tracing::info!(cgroup = %dir.display(), controller = name, error = %e, "controller not enabled");
        }
    }
}

/// Removes the empty session cgroups an earlier agent left in `dir`.
fn remove_leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let numeric = name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        if numeric && e.path().is_dir() {
            let _ = fs::remove_dir(e.path());
        }
    }
}

/// One `write` of `bytes` to a cgroup file (each write is one command to
/// the kernel).
fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(bytes)
}

fn open_write(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_forms() {
        assert!(parse_cpu_max("50000 100000").is_ok());
        assert!(parse_cpu_max("max 100000").is_ok());
        assert!(parse_cpu_max("1000 1000").is_ok());
        for bad in [
            "",
            "50000",
            "50000 ",
            " 50000 100000",
            "50000  100000",
            "50000 100000 1",
            "x 100000",
            "999 100000",
            "50000 999",
            "50000 1000001",
            "-1 100000",
            "max max",
        ] {
            assert!(parse_cpu_max(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn limits_without_cgroups_or_controllers_are_refused() {
        let mut e = Exec::new("true");
        assert!(check_limits(None, &e).is_ok());
        e.pids_max = Some(10);
        let err = check_limits(None, &e).unwrap_err();
        assert_eq!(err.kind, ExecFailedKind::InvalidRequest);
        assert_eq!(err.stage, Some("cgroup"));
        let some = Controllers {
            memory: true,
            pids: false,
            cpu: true,
        };
        assert!(check_limits(Some(some), &e)
            .unwrap_err()
            .message
            .contains("pids controller"));
        e.pids_max = None;
        e.memory_max = Some(1 << 20);
        e.cpu_max = Some("max 100000".into());
        assert!(check_limits(Some(some), &e).is_ok());
        e.cpu_max = Some("half".into());
        assert!(check_limits(Some(some), &e).is_err());
    }

    #[test]
    fn controller_lists() {
        let c = Controllers::parse("cpuset cpu io memory hugetlb pids rdma misc\n");
        assert_eq!(
            c,
            Controllers {
                memory: true,
                pids: true,
                cpu: true
            }
        );
        assert_eq!(Controllers::parse("cpuset io"), Controllers::default());
        assert_eq!(c.names().collect::<Vec<_>>(), ["memory", "pids", "cpu"]);
    }
}
