//! Starting agents and talking frames to them.
//!
//! - [`Opts`] and [`AgentProcess`]: `agentd --stdio` (or `--port PATH`),
//!   optionally as PID 1 of a new pid namespace, with the process state a
//!   careless parent might leave (ignored and blocked signals, a leaked
//!   fd, a low fd limit) or a seccomp filter. Dropping an [`AgentProcess`]
//!   kills its whole process tree.
//! - [`Host`]: the write side of a connection (cloneable, usable from any
//!   thread). Writes time out: an agent that stops reading fails the test
//!   instead of hanging it. Every byte written is accounted for in the
//!   checker's [`Sent`], the way the agent's decoder cuts it into frames.
//! - [`Conn`]: a host driven in the caller's thread on any pair of fds
//!   (pipes, a socket, a FIFO pair, a terminal): it reads only when asked,
//!   with a timeout, and checks every frame it hands out with the
//!   [`Checker`]. The threaded [`super::agent::Agent`] and the
//!   [`super::sync_agent::SyncAgent`] are built on these pieces.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentd::codec::{self, Decoder, Frame, OwnedFrame};
use agentd::messages::{Ack, Exec, Kind, Message, Ready, Resize, Shutdown, Signal as SignalMsg};

use super::checker::{violation, Checker, Sent};
use super::proc::{
    children_of, descendants_of, fd_count, kill_tree, proc_stat, status_field, status_number,
};
use super::{timeout, AGENTD};

pub const READY: u8 = Kind::Ready as u8;
pub const PING: u8 = Kind::Ping as u8;
pub const PONG: u8 = Kind::Pong as u8;
pub const SHUTDOWN: u8 = Kind::Shutdown as u8;
pub const SHUTDOWN_DONE: u8 = Kind::ShutdownDone as u8;
pub const ERROR: u8 = Kind::Error as u8;
pub const EXEC: u8 = Kind::Exec as u8;
pub const STARTED: u8 = Kind::Started as u8;
pub const EXEC_FAILED: u8 = Kind::ExecFailed as u8;
pub const STDIN: u8 = Kind::Stdin as u8;
pub const STDIN_CLOSE: u8 = Kind::StdinClose as u8;
pub const STDIN_ACK: u8 = Kind::StdinAck as u8;
pub const RESIZE: u8 = Kind::Resize as u8;
pub const SIGNAL: u8 = Kind::Signal as u8;
pub const OUTPUT_ACK: u8 = Kind::OutputAck as u8;
pub const STDOUT: u8 = Kind::Stdout as u8;
pub const STDERR: u8 = Kind::Stderr as u8;
pub const EXITED: u8 = Kind::Exited as u8;

/// `sh -c script`, stdin on (callers set `stdin` as they need).
pub fn sh(script: &str) -> Exec {
    cmd("sh", &["-c", script])
}

/// An Exec of `cmd` with `args`.
pub fn cmd(cmd: &str, args: &[&str]) -> Exec {
    let mut e = Exec::new(cmd);
    e.args = args.iter().map(|s| s.to_string()).collect();
    e
}

/// `e` on a terminal.
pub fn tty(mut e: Exec) -> Exec {
    e.tty = true;
    e
}

/// The value of the environment variable the harness gives every agent
/// (with [`Env::Harness`]), so tests can check that children inherit the
/// agent's environment.
pub const BASE_ENV_KEY: &str = "AGENTD_TEST_BASE";
pub const BASE_ENV_VALUE: &str = "from-the-agent";

/// The agent's environment.
#[derive(Debug, Clone)]
pub enum Env {
    /// The test's, with [`BASE_ENV_KEY`] set and `AGENTD_LOG` removed;
    /// `AGENTD_TEST_LOG`, when set, becomes `--log-level`.
    Harness,
    /// The test's, as it is.
    Inherit,
    /// Only these variables.
    Only(Vec<(String, String)>),
}

/// Where the agent's stderr (its log) goes.
#[derive(Debug, Clone)]
pub enum Stderr {
    /// Kept (the last 256 KiB) for [`AgentProcess::log`], and its tail
    /// printed when a test fails.
    Capture,
    /// The test's stderr.
    Inherit,
    /// A file, created.
    File(PathBuf),
}

/// How to start the agent.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Arguments after `--stdio` (or `--port PATH`).
    pub args: Vec<String>,
    /// Run the agent as PID 1 of a new pid namespace
    /// (`unshare --pid --fork --mount-proc`; `-Urpf` when not root).
    pub pidns: bool,
    /// Signals the agent starts with ignored (dispositions survive exec),
    /// as a careless parent might leave them.
    pub ignore_signals: Vec<i32>,
    /// Signals the agent starts with blocked (the mask survives exec).
    pub block_signals: Vec<i32>,
    /// Leave an fd (a copy of stderr, at fd 9) open across exec into the
    /// agent, as a careless parent might.
    pub leak_fd: bool,
    /// RLIMIT_NOFILE (soft and hard) for the agent.
    pub nofile: Option<u64>,
    /// A seccomp filter lets `epoll_ctl(EPOLL_CTL_ADD)` succeed only for
    /// these fds and fails it with ENOSPC (what a full `max_user_watches`
    /// gives) for any other: given an idle agent's fds, the agent starts
    /// but cannot watch a new session's. x86_64 only (elsewhere setting it
    /// fails the test).
    pub epoll_add_only: Option<Vec<u32>>,
    /// A seccomp filter fails every epoll_wait (and epoll_pwait,
    /// epoll_pwait2) with EINVAL: the agent's poll can never succeed.
    /// x86_64 only (elsewhere setting it fails the test).
    pub epoll_wait_fails: bool,
    pub env: Env,
    pub stderr: Stderr,
    /// The agent binary; `None`: this build's agentd.
    pub program: Option<PathBuf>,
}

/// With `AGENTD_TEST_PIDNS=1` every agent started with default options
/// runs as PID 1 of its own pid namespace, not just the tests written for
/// both modes (`.ci/run` runs the loopback suite once more this way).
impl Default for Opts {
    fn default() -> Opts {
        let pidns = std::env::var("AGENTD_TEST_PIDNS").is_ok_and(|v| v == "1");
        assert!(
            !pidns || pidns_available(),
            "AGENTD_TEST_PIDNS=1 but no pid namespace here (unshare --pid --fork --mount-proc, or -Urpf --mount-proc when not root)"
        );
        Opts {
            pidns,
            ..Opts::plain(&[])
        }
        .harness()
    }
}

impl Opts {
    pub fn args(args: &[&str]) -> Opts {
        Opts {
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Opts::default()
        }
    }

    pub fn pidns(mut self, on: bool) -> Opts {
        self.pidns = on;
        self
    }

    /// `agentd ARGS` as a plain child of the test, whatever
    /// `AGENTD_TEST_PIDNS` says, in the test's environment and with its
    /// stderr.
    pub fn plain(args: &[&str]) -> Opts {
        Opts {
            args: args.iter().map(|s| s.to_string()).collect(),
            pidns: false,
            ignore_signals: Vec::new(),
            block_signals: Vec::new(),
            leak_fd: false,
            nofile: None,
            epoll_add_only: None,
            epoll_wait_fails: false,
            env: Env::Inherit,
            stderr: Stderr::Inherit,
            program: None,
        }
    }

    /// The harness's environment and a captured log.
    fn harness(self) -> Opts {
        Opts {
            env: Env::Harness,
            stderr: Stderr::Capture,
            ..self
        }
    }
}

/// The `unshare` options that make a new pid namespace with its own /proc:
/// as root `--pid --fork --mount-proc`; otherwise the same in a new user
/// namespace mapping the caller to root (`-Urpf --mount-proc`), where the
/// machine allows unprivileged user namespaces.
fn unshare_args() -> &'static [&'static str] {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        &["--pid", "--fork", "--mount-proc", "--kill-child"]
    } else {
        &[
            "--user",
            "--map-root-user",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
        ]
    }
}

/// True when [`unshare_args`] work here. Checked once.
pub fn pidns_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        Command::new("unshare")
            .args(unshare_args())
            .arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Sets `sig` to SIG_IGN with the raw system call: glibc's sigaction
/// refuses the signals it reserves (32 and 33), which a parent can still
/// leave ignored.
fn ignore_signal_raw(sig: i32) -> io::Result<()> {
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let sa = KernelSigaction {
        handler: libc::SIG_IGN,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: rt_sigaction with a valid struct of the kernel's layout
    // (x86_64 and aarch64 share it) and the kernel's sigset size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            sig,
            &sa as *const KernelSigaction,
            std::ptr::null_mut::<KernelSigaction>(),
            8usize,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets O_NONBLOCK on an fd.
pub fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an fd the caller owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        assert!(flags >= 0, "F_GETFL: {}", io::Error::last_os_error());
        assert!(
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0,
            "F_SETFL: {}",
            io::Error::last_os_error()
        );
    }
}

/// poll(2) on one fd; true if it is ready for `events` (or hung up)
/// within `limit`.
pub fn poll_fd(fd: RawFd, events: libc::c_short, limit: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = limit.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents != 0
}

/// How the agent is reached.
enum Transport<'a> {
    /// `--stdio`: its stdin and stdout, piped to the test.
    Stdio,
    /// `--port PATH`: stdin and stdout /dev/null.
    Port(&'a Path),
    /// `--listen unix:PATH`: no transport of its own, hosts connect.
    Listen(&'a Path),
}

/// A running agent process. Dropping it kills its whole process tree:
/// every session's process group, every descendant (orphans a test left
/// behind), the agent (and `unshare`).
pub struct AgentProcess {
    child: Option<Child>,
    /// The agent's pid as this test process sees it (inside a pid
    /// namespace READY's `pid` is 1).
    pub host_pid: i32,
    pub pidns: bool,
    /// The child (the agent, or `unshare`) has been waited for: its pid
    /// may belong to another process now.
    reaped: bool,
    stderr: Option<Arc<Mutex<Vec<u8>>>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl AgentProcess {
    /// Starts `agentd --stdio` with `opts`; also returns the host's ends
    /// of the transport: (to the agent, from the agent).
    pub fn spawn_stdio(opts: &Opts) -> (AgentProcess, OwnedFd, OwnedFd) {
        let (mut process, child_stdin, child_stdout) = AgentProcess::spawn(opts, Transport::Stdio);
        let to_agent = child_stdin.expect("the agent's stdin is piped");
        let from_agent = child_stdout.expect("the agent's stdout is piped");
        if opts.pidns {
            process.host_pid = process.find_ns_child();
        }
        (process, to_agent, from_agent)
    }

    /// Starts `agentd --port PATH` with `opts` (never in a pid namespace:
    /// the test needs the pids its sessions report).
    pub fn spawn_port(opts: &Opts, port: &Path) -> AgentProcess {
        assert!(!opts.pidns, "--port agents run outside pid namespaces");
        AgentProcess::spawn(opts, Transport::Port(port)).0
    }

    /// Starts `agentd --listen unix:PATH` with `opts` (in a pid namespace
    /// when `opts.pidns`) and waits until the socket accepts.
    pub fn spawn_listen(opts: &Opts, path: &Path) -> AgentProcess {
        let mut process = AgentProcess::spawn(opts, Transport::Listen(path)).0;
        if opts.pidns {
            process.host_pid = process.find_ns_child();
        }
        let end = Instant::now() + timeout();
        while std::os::unix::net::UnixStream::connect(path).is_err() {
            process.assert_running("listening");
            assert!(Instant::now() < end, "{} never accepted", path.display());
            std::thread::sleep(Duration::from_millis(5));
        }
        process
    }

    fn spawn(
        opts: &Opts,
        transport: Transport<'_>,
    ) -> (AgentProcess, Option<OwnedFd>, Option<OwnedFd>) {
        let bin = opts
            .program
            .clone()
            .unwrap_or_else(|| PathBuf::from(AGENTD));
        let mut cmd = if opts.pidns {
            let mut c = Command::new("unshare");
            c.args(unshare_args()).arg(bin);
            c
        } else {
            Command::new(bin)
        };
        match transport {
            Transport::Stdio => {
                cmd.arg("--stdio")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped());
            }
            Transport::Port(path) => {
                cmd.arg("--port")
                    .arg(path)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null());
            }
            Transport::Listen(path) => {
                let mut addr = std::ffi::OsString::from("unix:");
                addr.push(path);
                cmd.arg("--listen")
                    .arg(addr)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null());
            }
        }
        cmd.args(&opts.args);
        match &opts.env {
            Env::Harness => {
                if let Ok(level) = std::env::var("AGENTD_TEST_LOG") {
                    cmd.args(["--log-level", &level]);
                }
                cmd.env(BASE_ENV_KEY, BASE_ENV_VALUE)
                    .env_remove("AGENTD_LOG");
            }
            Env::Inherit => {}
            Env::Only(vars) => {
                cmd.env_clear();
                for (k, v) in vars {
                    cmd.env(k, v);
                }
            }
        }
        match &opts.stderr {
            Stderr::Capture => cmd.stderr(Stdio::piped()),
            Stderr::Inherit => cmd.stderr(Stdio::inherit()),
            Stderr::File(path) => cmd.stderr(
                std::fs::File::create(path)
                    .unwrap_or_else(|e| panic!("creating {}: {e}", path.display())),
            ),
        };
        pre_exec(&mut cmd, opts);
        let mut child = cmd.spawn().expect("spawning agentd");
        let child_stdin = child.stdin.take().map(OwnedFd::from);
        let child_stdout = child.stdout.take().map(OwnedFd::from);
        let (stderr, stderr_reader) = match child.stderr.take() {
            Some(mut pipe) => {
                let log = Arc::new(Mutex::new(Vec::new()));
                let keep = log.clone();
                let reader = std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = pipe.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let mut s = keep.lock().expect("the agent's log");
                        // Keep the last 256 KiB of logs.
                        if s.len() > 256 * 1024 {
                            s.drain(..128 * 1024);
                        }
                        s.extend_from_slice(&buf[..n]);
                    }
                });
                (Some(log), Some(reader))
            }
            None => (None, None),
        };
        let host_pid = child.id() as i32;
        let process = AgentProcess {
            child: Some(child),
            host_pid,
            pidns: opts.pidns,
            reaped: false,
            stderr,
            stderr_reader,
        };
        (process, child_stdin, child_stdout)
    }

    /// The agent inside the namespace: the child of `unshare` running agentd.
    fn find_ns_child(&self) -> i32 {
        let unshare = self.host_pid;
        let end = Instant::now() + timeout();
        loop {
            if let Some(&pid) = children_of(unshare).first() {
                return pid;
            }
            assert!(Instant::now() < end, "no agent process under unshare");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The agent's log so far (empty unless its stderr is captured).
    pub fn log(&self) -> String {
        self.stderr.as_ref().map_or_else(String::new, |s| {
            String::from_utf8_lossy(&s.lock().expect("the agent's log")).into_owned()
        })
    }

    /// The exit status, if the agent has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("agent already reaped");
        let status = child.try_wait().expect("try_wait on the agent");
        self.reaped |= status.is_some();
        status
    }

    /// Whether `host_pid` is still this agent (or its zombie): the child
    /// has not been waited for and, in a pid namespace, the agent is still
    /// `unshare`'s child.
    fn still_ours(&self) -> bool {
        let Some(child) = &self.child else {
            return false;
        };
        !self.reaped
            && (!self.pidns
                || proc_stat(self.host_pid).is_some_and(|p| p.ppid == child.id() as i32))
    }

    /// Waits for the agent process to exit (and, for a second at most, for
    /// the end of its log).
    #[track_caller]
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let end = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.try_wait() {
                break status;
            }
            assert!(
                Instant::now() < end,
                "the agent did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let log_end = Instant::now() + Duration::from_secs(1);
        if let Some(reader) = self.stderr_reader.take() {
            while !reader.is_finished() && Instant::now() < log_end {
                std::thread::sleep(Duration::from_millis(5));
            }
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
        status
    }

    /// Fails the test if the agent has exited (it would never open or
    /// connect to what the test waits on).
    #[track_caller]
    pub fn assert_running(&mut self, what: &str) {
        if self.try_wait().is_some() {
            // Already exited: this only waits for the end of its log.
            let status = self.wait_exit(Duration::ZERO);
            panic!("agentd exited ({status}) before {what}: {}", self.log());
        }
    }

    /// The agent's resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        status_number(self.host_pid, "VmRSS")
            .unwrap_or_else(|| panic!("no VmRSS for agent pid {}", self.host_pid))
    }

    /// How many fds the agent has open.
    pub fn fd_count(&self) -> usize {
        fd_count(self.host_pid)
    }

    /// The agent's children (host pids), zombies included.
    pub fn children(&self) -> Vec<i32> {
        children_of(self.host_pid)
    }

    /// Every descendant of the agent (host pids).
    pub fn descendants(&self) -> Vec<i32> {
        descendants_of(self.host_pid)
    }

    /// Waits until the agent has no children at all (every one exited and
    /// was reaped). Fails with the list (and states) after `limit`.
    #[track_caller]
    pub fn wait_no_children(&self, limit: Duration) {
        let end = Instant::now() + limit;
        loop {
            let kids = self.children();
            if kids.is_empty() {
                return;
            }
            if Instant::now() >= end {
                let states: Vec<String> = kids
                    .iter()
                    .map(|p| {
                        format!(
                            "{p} ({}, {})",
                            status_field(*p, "State").unwrap_or_default(),
                            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                                .unwrap_or_default()
                                .replace('\0', " ")
                        )
                    })
                    .collect();
                panic!("the agent still has children after {limit:?}: {states:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The host pid of a pid the agent reported (STARTED `pid`), which is
    /// the same pid unless the agent runs in its own pid namespace.
    pub fn host_pid_of(&self, pid: u32) -> Option<i32> {
        if !self.pidns {
            return Some(pid as i32);
        }
        self.descendants().into_iter().find(|&p| {
            status_field(p, "NSpid").and_then(|v| v.split_whitespace().last()?.parse::<u32>().ok())
                == Some(pid)
        })
    }

    /// The pid READY must give: the agent's own, or 1 in a pid namespace.
    pub fn ready_pid(&self) -> u32 {
        if self.pidns {
            1
        } else {
            self.host_pid as u32
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            if !log.is_empty() {
                let tail = &log[log.len().saturating_sub(8192)..];
                eprintln!("---- agentd stderr (tail) ----\n{tail}\n------------------------------");
            }
        }
        if self.still_ours() {
            kill_tree(self.host_pid);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What runs between fork and exec: the process state of [`Opts`].
fn pre_exec(cmd: &mut Command, opts: &Opts) {
    if opts.ignore_signals.is_empty()
        && opts.block_signals.is_empty()
        && !opts.leak_fd
        && opts.nofile.is_none()
        && opts.epoll_add_only.is_none()
        && !opts.epoll_wait_fails
    {
        return;
    }
    let ignore = opts.ignore_signals.clone();
    // SAFETY: sigset_t is plain data; sigemptyset and sigaddset fill it.
    let block = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &sig in &opts.block_signals {
            libc::sigaddset(&mut set, sig);
        }
        set
    };
    let blocking = !opts.block_signals.is_empty();
    let leak_fd = opts.leak_fd;
    let nofile = opts.nofile;
    let wants_filter = opts.epoll_add_only.is_some() || opts.epoll_wait_fails;
    #[cfg(target_arch = "x86_64")]
    let filter = wants_filter.then(|| {
        super::seccomp::epoll_filter(opts.epoll_add_only.as_deref(), opts.epoll_wait_fails)
    });
    #[cfg(not(target_arch = "x86_64"))]
    assert!(!wants_filter, "the epoll filters are written for x86_64");
    // SAFETY: between fork and exec only async-signal-safe system calls
    // run, on data prepared before fork.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            for &sig in &ignore {
                ignore_signal_raw(sig)?;
            }
            if blocking && libc::sigprocmask(libc::SIG_BLOCK, &block, std::ptr::null_mut()) < 0 {
                return Err(io::Error::last_os_error());
            }
            // dup2 clears close-on-exec on the copy.
            if leak_fd && libc::dup2(2, 9) < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(n) = nofile {
                let lim = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            #[cfg(target_arch = "x86_64")]
            if let Some(filter) = &filter {
                super::seccomp::install_seccomp_filter(filter)?;
            }
            Ok(())
        });
    }
}

/// The host's write side: cloneable, usable from any thread. Every byte
/// written goes into the [`Sent`] the connection's checker reads.
#[derive(Clone)]
pub struct Host {
    fd: Arc<Mutex<Option<OwnedFd>>>,
    sent: Arc<Mutex<Sent>>,
    /// How long a write may wait for the agent to read; `None`: the fd
    /// stays blocking and a write waits as long as it takes (the
    /// benchmark, whose host must not add system calls to what it
    /// measures).
    limit: Option<Duration>,
    next_ping: Arc<AtomicU64>,
    next_id: Arc<AtomicU32>,
}

impl Host {
    /// A write side on `fd`, writes waiting at most `limit` (the fd is
    /// made non-blocking) or, with `None`, as long as they take.
    pub fn new(fd: OwnedFd, limit: Option<Duration>) -> Host {
        Host::with_sent(fd, limit, Arc::new(Mutex::new(Sent::default())))
    }

    /// Like [`Host::new`], accounting into an existing [`Sent`] (a host
    /// that reconnects to the same agent).
    pub fn with_sent(fd: OwnedFd, limit: Option<Duration>, sent: Arc<Mutex<Sent>>) -> Host {
        if limit.is_some() {
            set_nonblocking(fd.as_raw_fd());
        }
        Host {
            fd: Arc::new(Mutex::new(Some(fd))),
            sent,
            limit,
            next_ping: Arc::new(AtomicU64::new(1)),
            next_id: Arc::new(AtomicU32::new(1000)),
        }
    }

    /// What this host sent, for the checker.
    pub fn sent(&self) -> &Arc<Mutex<Sent>> {
        &self.sent
    }

    /// Writes bytes as they are, within the host's limit. Panics when the
    /// agent does not take them in time or the transport is closed.
    pub fn send_raw(&self, bytes: &[u8]) {
        self.write_all(bytes, self.limit)
            .unwrap_or_else(|e| panic!("sending {} bytes to the agent: {e}", bytes.len()));
    }

    /// Writes bytes, giving up after `limit` (the fd is non-blocking).
    pub fn try_send_raw(&self, bytes: &[u8], limit: Duration) -> Result<(), String> {
        self.write_all(bytes, Some(limit))
    }

    /// Writes all of `bytes` holding the transport, so that what other
    /// threads send does not land inside them; with a `limit`, waits at most
    /// that long for the agent to take them. The bytes are accounted for
    /// before they are written: a checker in another thread may see the
    /// agent's answer to them before this write returns.
    fn write_all(&self, mut bytes: &[u8], limit: Option<Duration>) -> Result<(), String> {
        let guard = self.fd.lock().expect("the host's transport");
        let fd = guard
            .as_ref()
            .ok_or("transport already closed")?
            .as_raw_fd();
        self.sent
            .lock()
            .expect("what the host sent")
            .note_bytes(bytes);
        let end = limit.map(|l| Instant::now() + l);
        while !bytes.is_empty() {
            match write_fd(fd, bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let left = end.map_or(Duration::from_millis(100), |end| {
                        end.saturating_duration_since(Instant::now())
                    });
                    if left.is_zero() {
                        return Err(format!(
                            "the agent did not read its transport for {:?} ({} bytes left)",
                            limit.unwrap_or_default(),
                            bytes.len()
                        ));
                    }
                    poll_fd(fd, libc::POLLOUT, left.min(Duration::from_millis(100)));
                }
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        Ok(())
    }

    /// One write(2) of as much of `bytes` as the transport takes; what was
    /// written is accounted for, after the write (for a host that reads,
    /// and so checks, in the thread that writes).
    pub fn write_some(&self, bytes: &[u8]) -> io::Result<usize> {
        let guard = self.fd.lock().expect("the host's transport");
        let fd = guard
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "transport already closed"))?
            .as_raw_fd();
        let n = write_fd(fd, bytes)?;
        // Still holding the transport: the accounting is in write order.
        self.sent
            .lock()
            .expect("what the host sent")
            .note_bytes(&bytes[..n]);
        Ok(n)
    }

    /// The transport's fd, while it is open.
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.fd
            .lock()
            .expect("the host's transport")
            .as_ref()
            .map(AsRawFd::as_raw_fd)
    }

    /// Sends one frame with a raw payload.
    pub fn send_frame(&self, kind: u8, id: u32, payload: &[u8]) {
        let mut buf = Vec::new();
        codec::append_raw(&mut buf, kind, id, payload).expect("the test's frames fit");
        self.send_raw(&buf);
    }

    /// Sends a message.
    pub fn send(&self, msg: &Message<'_>, id: u32) {
        self.send_raw(&msg.to_bytes(id));
    }

    /// Sends an EXEC whose map payload the test encoded itself.
    pub fn send_exec_payload(&self, id: u32, payload: &[u8]) {
        self.send_frame(EXEC, id, payload);
    }

    pub fn send_exec(&self, id: u32, exec: &Exec) {
        self.send(&Message::Exec(Box::new(exec.clone())), id);
    }

    pub fn send_stdin(&self, id: u32, data: &[u8]) {
        self.send(&Message::Stdin(data), id);
    }

    pub fn send_stdin_close(&self, id: u32) {
        self.send(&Message::StdinClose, id);
    }

    pub fn send_signal(&self, id: u32, signal: i32, group: bool) {
        self.send(
            &Message::Signal(SignalMsg {
                signal,
                group,
                tree: false,
            }),
            id,
        );
    }

    pub fn send_resize(&self, id: u32, rows: u16, cols: u16) {
        self.send(&Message::Resize(Resize { rows, cols }), id);
    }

    pub fn send_output_ack(&self, id: u32, bytes: u32) {
        self.send(&Message::OutputAck(Ack { bytes }), id);
    }

    pub fn send_shutdown(&self, grace_ms: u32) {
        self.send(&Message::Shutdown(Shutdown { grace_ms }), 0);
    }

    /// SHUTDOWN with an empty payload (an empty map: every key default).
    pub fn send_shutdown_empty(&self) {
        self.send_frame(SHUTDOWN, 0, &[]);
    }

    /// Records that a shutdown was asked for by other means (a signal to
    /// the agent), so SHUTDOWN_DONE is expected.
    pub fn note_shutdown(&self) {
        self.sent
            .lock()
            .expect("what the host sent")
            .note_shutdown();
    }

    /// Closes the host → agent direction: end of file for the agent.
    pub fn close(&self) {
        self.fd.lock().expect("the host's transport").take();
    }

    /// A session id no other test step in this agent has used.
    pub fn new_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A PING payload not used before on this connection.
    pub fn fresh_ping_payload(&self) -> Vec<u8> {
        let n = self.next_ping.fetch_add(1, Ordering::Relaxed);
        format!("barrier-{n}").into_bytes()
    }
}

/// write(2) on an fd the caller keeps open.
fn write_fd(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: writing from a valid slice to an open fd.
    let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A reader on a raw fd the caller keeps open.
struct FdReader(RawFd);

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reading into a valid buffer from an open fd.
        let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// A reader that hands out at most `.1` bytes per read.
struct Limited<R>(R, usize);

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.1);
        self.0.read(&mut buf[..n])
    }
}

/// What one [`Conn::fill`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// This many bytes.
    Bytes(usize),
    /// End of the stream (also a reset connection, or EIO from a
    /// terminal whose other side is gone).
    Eof,
    /// Nothing within the time given (or the read side is closed).
    Nothing,
}

/// A host driven in the caller's thread, on any pair of fds: it reads only
/// when asked, and every frame it hands out has passed the [`Checker`].
pub struct Conn {
    pub host: Host,
    read: Option<OwnedFd>,
    dec: Decoder,
    checker: Checker,
    /// The last READY, decoded.
    pub ready: Option<Ready>,
    /// The agent closed its end.
    pub eof: bool,
}

impl std::ops::Deref for Conn {
    type Target = Host;
    fn deref(&self) -> &Host {
        &self.host
    }
}

impl Conn {
    /// A host reading `read` and writing `write` (writes time out after
    /// [`timeout`]).
    pub fn new(read: OwnedFd, write: OwnedFd) -> Conn {
        Conn::with(read, Host::new(write, Some(timeout())), Checker::default())
    }

    /// A host reading `read`, writing with `host`, checking with `checker`
    /// (which may carry the state of an earlier connection).
    pub fn with(read: OwnedFd, host: Host, checker: Checker) -> Conn {
        Conn {
            host,
            read: Some(read),
            dec: Decoder::new(),
            checker,
            ready: None,
            eof: false,
        }
    }

    pub fn checker(&self) -> &Checker {
        &self.checker
    }

    /// Takes the checker's state (to carry it to a new connection).
    pub fn take_checker(&mut self) -> Checker {
        std::mem::take(&mut self.checker)
    }

    /// The read side's fd.
    pub fn read_fd(&self) -> RawFd {
        self.read
            .as_ref()
            .expect("the host's read side is open")
            .as_raw_fd()
    }

    /// Closes the host's read side (the agent's writes fail with EPIPE).
    pub fn close_read(&mut self) {
        self.read = None;
    }

    /// Whether the host's read side is still open.
    pub fn read_open(&self) -> bool {
        self.read.is_some()
    }

    /// Waits up to `limit` (`None`: as long as it takes, without a poll)
    /// for something to read and reads once, at most `max` bytes.
    pub fn fill(&mut self, limit: Option<Duration>, max: Option<usize>) -> Filled {
        if self.eof {
            return Filled::Eof;
        }
        let Some(fd) = self.read.as_ref().map(AsRawFd::as_raw_fd) else {
            return Filled::Nothing;
        };
        if let Some(limit) = limit {
            if !poll_fd(fd, libc::POLLIN, limit) {
                return Filled::Nothing;
            }
        }
        loop {
            let r = match max {
                Some(max) => self.dec.read_from(&mut Limited(FdReader(fd), max)),
                None => self.dec.read_from(&mut FdReader(fd)),
            };
            match r {
                Ok(0) => return self.end_of_stream(),
                Ok(n) => return Filled::Bytes(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Filled::Nothing,
                Err(e)
                    if e.kind() == io::ErrorKind::ConnectionReset
                        || e.raw_os_error() == Some(libc::EIO) =>
                {
                    return self.end_of_stream()
                }
                Err(e) => panic!("reading from the agent: {e}"),
            }
        }
    }

    fn end_of_stream(&mut self) -> Filled {
        self.eof = true;
        if let Err(e) = self.checker.check_eof(self.dec.is_at_boundary()) {
            panic!("protocol violation by the agent: {e}");
        }
        Filled::Eof
    }

    /// The next whole frame already read, checked.
    pub fn next_buffered(&mut self) -> Option<Frame<'_>> {
        let f = match self.dec.next_frame()? {
            Ok(f) => f,
            Err(e) => panic!("the agent sent a bad frame: {e}"),
        };
        let mut sent = self.host.sent.lock().expect("what the host sent");
        if let Err(e) = self.checker.check(&f, &mut sent) {
            panic!("{}", violation(&e, &f));
        }
        if f.kind == READY {
            if let Ok(Message::Ready(r)) = Message::decode_from_agent(f) {
                self.ready = Some(r);
            }
        }
        Some(f)
    }

    /// The next frame, or `None` at the end of the stream; fails the test
    /// after `limit`.
    #[track_caller]
    pub fn next_frame(&mut self, limit: Duration) -> Option<OwnedFrame> {
        let end = Instant::now() + limit;
        loop {
            if let Some(f) = self.next_buffered() {
                return Some(f.to_owned());
            }
            if self.eof {
                return None;
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {limit:?} waiting for a frame from the agent"
            );
            self.fill(Some(left.min(Duration::from_secs(1))), None);
        }
    }

    /// The next frame of `kind` for `id` within [`timeout`], skipping
    /// others; an ERROR meanwhile fails the test.
    #[track_caller]
    pub fn expect(&mut self, kind: Kind, id: u32) -> OwnedFrame {
        loop {
            let f = self
                .next_frame(timeout())
                .expect("end of file from the agent");
            if f.kind == kind as u8 && f.id == id {
                return f;
            }
            assert_ne!(f.kind, ERROR, "ERROR from the agent");
        }
    }
}
