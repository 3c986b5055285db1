//! Loopback harness: runs `agentd --stdio` (optionally as PID 1 of a new pid
//! namespace) and talks protocol v1 to it over its stdin and stdout.
//!
//! - A reader thread cuts the agent's stdout into frames with
//!   [`agentd::codec::Decoder`] and sends them down a channel. It can be
//!   paused, to play a host that stops reading.
//! - Every frame the test consumes first goes through [`Checker`], a host's
//!   view of the contract: known agent → host kinds only, map payloads that
//!   are maps with the keys and types the contract gives, per-session order
//!   (STARTED, then output and acks, then one EXITED; or EXEC_FAILED alone;
//!   nothing after EXITED), STDOUT/STDERR of at most 64 KiB, acks never
//!   above what was sent. A violation fails the test at once.
//! - Writes go through [`Host`] (cloneable, usable from other threads) and
//!   time out: an agent that stops reading fails the test instead of
//!   hanging it. Every wait has a timeout.
//! - Dropping the [`Agent`] kills its whole process tree.

#![allow(dead_code)]

pub mod msgpack;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use agentd::codec::{self, Decoder, FrameError, OwnedFrame, MAX_OUTPUT_PAYLOAD};
use agentd::messages::{
    Direction, Encoding, ErrorKind, Exec, ExecFailedKind, Kind, Message, Signal as SignalMsg,
};

pub use msgpack::Value;

/// How long any single wait may take before the test fails. The machine
/// is shared, so this is generous; a hung agent still fails in bounded
/// time. `AGENTD_TEST_TIMEOUT_MS` overrides it.
pub fn timeout() -> Duration {
    static T: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("AGENTD_TEST_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(20), Duration::from_millis)
    })
}

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

/// How to start the agent.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Arguments after `--stdio`.
    pub args: Vec<String>,
    /// Run the agent as PID 1 of a new pid namespace
    /// (`unshare --pid --fork --mount-proc`; `-Urpf` when not root).
    pub pidns: bool,
    /// Signals the agent starts with ignored (dispositions survive exec),
    /// as a careless parent might leave them.
    pub ignore_signals: Vec<i32>,
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
}

/// With `AGENTD_TEST_PIDNS=1` every agent the suite starts runs as PID 1
/// of its own pid namespace, not just the tests written for both modes
/// (`.ci/run` runs the loopback suite once more this way).
impl Default for Opts {
    fn default() -> Opts {
        let pidns = std::env::var("AGENTD_TEST_PIDNS").is_ok_and(|v| v == "1");
        assert!(
            !pidns || pidns_available(),
            "AGENTD_TEST_PIDNS=1 but no pid namespace here (unshare --pid --fork --mount-proc, or -Urpf --mount-proc when not root)"
        );
        Opts {
            args: Vec::new(),
            pidns,
            ignore_signals: Vec::new(),
            leak_fd: false,
            nofile: None,
            epoll_add_only: None,
            epoll_wait_fails: false,
        }
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

/// The value of the environment variable the harness gives every agent,
/// so tests can check that children inherit the agent's environment.
pub const BASE_ENV_KEY: &str = "AGENTD_TEST_BASE";
pub const BASE_ENV_VALUE: &str = "from-the-agent";

/// What the reader thread sends.
enum Event {
    Frame(OwnedFrame),
    /// The agent sent something that is not a frame.
    Bad(FrameError),
    Eof,
    ReadError(String),
}

/// A flag the reader thread waits on while a test plays a host that does
/// not read.
#[derive(Default)]
struct Pause {
    paused: Mutex<bool>,
    cond: Condvar,
}

/// What the harness tracks about what the host sent, for [`Checker`].
#[derive(Default)]
struct Sent {
    /// EXECs sent per id and not yet answered.
    pending_exec: HashMap<u32, u32>,
    /// STDIN payload bytes sent per id, over the agent's lifetime.
    stdin_bytes: HashMap<u32, u64>,
    /// A SHUTDOWN went out.
    shutdown: bool,
}

/// The host's write side: cloneable, usable from any thread.
#[derive(Clone)]
pub struct Host {
    fd: Arc<Mutex<Option<OwnedFd>>>,
    sent: Arc<Mutex<Sent>>,
    next_ping: Arc<AtomicU64>,
    next_id: Arc<AtomicU32>,
}

impl Host {
    /// Writes bytes as they are, within [`timeout`]. Panics when the agent
    /// does not take them in time or the transport is closed.
    pub fn send_raw(&self, bytes: &[u8]) {
        self.try_send_raw(bytes, timeout())
            .unwrap_or_else(|e| panic!("sending {} bytes to the agent: {e}", bytes.len()));
    }

    /// Writes bytes, giving up after `limit`.
    pub fn try_send_raw(&self, mut bytes: &[u8], limit: Duration) -> Result<(), String> {
        let guard = self.fd.lock().unwrap();
        let fd = guard
            .as_ref()
            .ok_or("transport already closed")?
            .as_raw_fd();
        let end = Instant::now() + limit;
        while !bytes.is_empty() {
            // SAFETY: writing from a valid slice to an fd we own.
            let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
            if n > 0 {
                bytes = &bytes[n as usize..];
                continue;
            }
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    let left = end.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(format!(
                            "the agent did not read its transport for {limit:?} ({} bytes left)",
                            bytes.len()
                        ));
                    }
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, left.as_millis().clamp(1, 100) as i32) };
                }
                _ => return Err(format!("write: {err}")),
            }
        }
        Ok(())
    }

    /// Sends one frame with a raw payload (no tracking).
    pub fn send_frame(&self, kind: u8, id: u32, payload: &[u8]) {
        let mut buf = Vec::new();
        codec::append_raw(&mut buf, kind, id, payload).expect("the test's frames fit");
        self.send_raw(&buf);
    }

    /// Sends a message, tracking EXEC and STDIN for the checker.
    pub fn send(&self, msg: &Message<'_>, id: u32) {
        self.note(msg.kind() as u8, id, msg);
        self.send_raw(&msg.to_bytes(id));
    }

    fn note(&self, kind: u8, id: u32, msg: &Message<'_>) {
        let mut sent = self.sent.lock().unwrap();
        match msg {
            Message::Exec(_) => *sent.pending_exec.entry(id).or_default() += 1,
            Message::Stdin(data) => *sent.stdin_bytes.entry(id).or_default() += data.len() as u64,
            Message::Shutdown(_) => sent.shutdown = true,
            _ => {}
        }
        let _ = kind;
    }

    /// Records an EXEC the test sends by other means (split, raw).
    pub fn note_exec(&self, id: u32) {
        *self
            .sent
            .lock()
            .unwrap()
            .pending_exec
            .entry(id)
            .or_default() += 1;
    }

    /// Records that a shutdown was asked for by other means (a signal to
    /// the agent), so SHUTDOWN_DONE is expected.
    pub fn note_shutdown(&self) {
        self.sent.lock().unwrap().shutdown = true;
    }

    /// Records STDIN bytes the test sends by other means.
    pub fn note_stdin(&self, id: u32, n: u64) {
        *self.sent.lock().unwrap().stdin_bytes.entry(id).or_default() += n;
    }

    /// Sends an EXEC whose map payload the test encoded itself (tracked).
    pub fn send_exec_payload(&self, id: u32, payload: &[u8]) {
        *self
            .sent
            .lock()
            .unwrap()
            .pending_exec
            .entry(id)
            .or_default() += 1;
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
        self.send(
            &Message::Resize(agentd::messages::Resize { rows, cols }),
            id,
        );
    }

    pub fn send_output_ack(&self, id: u32, bytes: u32) {
        self.send(&Message::OutputAck(agentd::messages::Ack { bytes }), id);
    }

    pub fn send_shutdown(&self, grace_ms: u32) {
        self.send(
            &Message::Shutdown(agentd::messages::Shutdown { grace_ms }),
            0,
        );
    }

    /// SHUTDOWN with an empty payload (an empty map: every key default).
    pub fn send_shutdown_empty(&self) {
        self.sent.lock().unwrap().shutdown = true;
        self.send_frame(SHUTDOWN, 0, &[]);
    }

    /// Closes the host → agent direction: end of file for the agent.
    pub fn close(&self) {
        self.fd.lock().unwrap().take();
    }

    /// A session id no other test step in this agent has used.
    pub fn new_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// A host's view of the contract, applied to every frame the agent sends.
#[derive(Default)]
struct Checker {
    frames: u64,
    ready_seen: bool,
    running: HashSet<u32>,
    acked: HashMap<u32, u64>,
    shutdown_done: bool,
}

fn kind_name(kind: u8) -> String {
    Kind::from_u8(kind).map_or_else(|| format!("kind {kind:#04x}"), |k| k.name().to_owned())
}

/// Checks that `map` has exactly the required keys of the right types,
/// optional keys of the right types when present, and (by the contract's
/// rule that unknown keys are ignored) anything else.
fn check_keys(
    what: &str,
    map: &Value,
    required: &[(&str, Ty)],
    optional: &[(&str, Ty)],
) -> Result<(), String> {
    if !matches!(map, Value::Map(_)) {
        return Err(format!("{what} payload is not a map: {map:?}"));
    }
    if map.keys().iter().any(Option::is_none) {
        return Err(format!("{what} has a non-string key: {map:?}"));
    }
    for (key, ty) in required {
        let v = map
            .get(key)
            .ok_or_else(|| format!("{what} lacks required key {key:?}: {map:?}"))?;
        ty.check(what, key, v)?;
    }
    for (key, ty) in optional {
        if let Some(v) = map.get(key) {
            ty.check(what, key, v)?;
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Ty {
    U8,
    U32,
    I32,
    U64,
    Bool,
    Str,
}

impl Ty {
    fn check(self, what: &str, key: &str, v: &Value) -> Result<(), String> {
        let ok = match self {
            Ty::U8 => v.as_int().is_some_and(|i| (0..=255).contains(&i)),
            Ty::U32 => v
                .as_int()
                .is_some_and(|i| (0..=i128::from(u32::MAX)).contains(&i)),
            Ty::I32 => v
                .as_int()
                .is_some_and(|i| (i128::from(i32::MIN)..=i128::from(i32::MAX)).contains(&i)),
            Ty::U64 => v
                .as_int()
                .is_some_and(|i| (0..=i128::from(u64::MAX)).contains(&i)),
            Ty::Bool => v.as_bool().is_some(),
            Ty::Str => v.as_str().is_some(),
        };
        if ok {
            Ok(())
        } else {
            Err(format!("{what} key {key:?} has the wrong type: {v:?}"))
        }
    }
}

/// Decodes a map payload (empty = empty map).
pub fn payload_map(payload: &[u8]) -> Result<Value, String> {
    if payload.is_empty() {
        return Ok(Value::Map(Vec::new()));
    }
    msgpack::decode(payload)
}

impl Checker {
    fn check(&mut self, f: &OwnedFrame, sent: &Mutex<Sent>) -> Result<(), String> {
        self.frames += 1;
        let name = kind_name(f.kind);
        let kind = Kind::from_u8(f.kind).ok_or_else(|| format!("agent sent unknown {name}"))?;
        if kind.direction() != Direction::AgentToHost {
            return Err(format!("agent sent {name}, a host → agent kind"));
        }
        if self.shutdown_done {
            return Err(format!("agent sent {name} after SHUTDOWN_DONE"));
        }
        if !self.ready_seen && kind != Kind::Ready {
            return Err(format!("first frame is {name}, not READY"));
        }
        let map = match kind.encoding() {
            Encoding::Map => {
                Some(payload_map(&f.payload).map_err(|e| format!("{name} payload: {e}"))?)
            }
            Encoding::Empty => {
                if !f.payload.is_empty() {
                    return Err(format!("{name} has a {}-byte payload", f.payload.len()));
                }
                None
            }
            Encoding::Raw => None,
        };
        let id = f.id;
        match kind {
            Kind::Ready => {
                if self.ready_seen {
                    return Err("a second READY on a stdio transport".into());
                }
                if id != 0 {
                    return Err(format!("READY with id {id}"));
                }
                self.ready_seen = true;
                let m = map.unwrap();
                check_keys(
                    "READY",
                    &m,
                    &[
                        ("protocol", Ty::U32),
                        ("agent", Ty::Str),
                        ("pid", Ty::U32),
                        ("pid1", Ty::Bool),
                        ("max_payload", Ty::U32),
                        ("stdin_window", Ty::U32),
                        ("max_sessions", Ty::U32),
                    ],
                    &[],
                )?;
                if m.get("protocol").and_then(Value::as_int) != Some(1) {
                    return Err(format!("READY protocol is not 1: {m:?}"));
                }
                if m.get("max_payload").and_then(Value::as_int) != Some(1 << 20) {
                    return Err(format!("READY max_payload is not 1 MiB: {m:?}"));
                }
            }
            Kind::Pong => {}
            Kind::ShutdownDone => {
                if id != 0 {
                    return Err(format!("SHUTDOWN_DONE with id {id}"));
                }
                if !sent.lock().unwrap().shutdown {
                    return Err("SHUTDOWN_DONE without SHUTDOWN".into());
                }
                if !self.running.is_empty() {
                    return Err(format!(
                        "SHUTDOWN_DONE before EXITED of sessions {:?}",
                        self.running
                    ));
                }
                self.shutdown_done = true;
            }
            Kind::Error => {
                let m = map.unwrap();
                check_keys(
                    "ERROR",
                    &m,
                    &[("kind", Ty::Str), ("message", Ty::Str)],
                    &[("frame_kind", Ty::U8)],
                )?;
                let k = m.get("kind").and_then(Value::as_str).unwrap();
                if ErrorKind::parse(k).is_none() {
                    return Err(format!("ERROR kind {k:?} is not in the contract"));
                }
            }
            Kind::Started => {
                check_keys("STARTED", &map.unwrap(), &[("pid", Ty::U32)], &[])?;
                self.take_pending(id, sent, "STARTED")?;
                if !self.running.insert(id) {
                    return Err(format!("STARTED for id {id}, which is running"));
                }
            }
            Kind::ExecFailed => {
                let m = map.unwrap();
                check_keys(
                    "EXEC_FAILED",
                    &m,
                    &[("kind", Ty::Str), ("message", Ty::Str)],
                    &[("errno", Ty::I32), ("stage", Ty::Str)],
                )?;
                let k = m.get("kind").and_then(Value::as_str).unwrap();
                let fk = ExecFailedKind::parse(k)
                    .ok_or_else(|| format!("EXEC_FAILED kind {k:?} is not in the contract"))?;
                self.take_pending(id, sent, "EXEC_FAILED")?;
                if self.running.contains(&id) && fk != ExecFailedKind::DuplicateId {
                    return Err(format!(
                        "EXEC_FAILED {k} for id {id}, which is running (expected duplicate_id)"
                    ));
                }
            }
            Kind::StdinAck => {
                let m = map.unwrap();
                check_keys("STDIN_ACK", &m, &[("bytes", Ty::U32)], &[])?;
                self.session_frame(id, &name)?;
                let bytes = m.get("bytes").and_then(Value::as_int).unwrap() as u64;
                let acked = self.acked.entry(id).or_default();
                *acked += bytes;
                let sent_bytes = sent
                    .lock()
                    .unwrap()
                    .stdin_bytes
                    .get(&id)
                    .copied()
                    .unwrap_or(0);
                if *acked > sent_bytes {
                    return Err(format!(
                        "STDIN_ACK total {acked} for id {id} exceeds the {sent_bytes} bytes sent"
                    ));
                }
            }
            Kind::Stdout | Kind::Stderr => {
                self.session_frame(id, &name)?;
                // docs/PROTOCOL.md: never an empty one.
                if f.payload.is_empty() {
                    return Err(format!("{name} with an empty payload"));
                }
                if f.payload.len() > MAX_OUTPUT_PAYLOAD {
                    return Err(format!(
                        "{name} with {} bytes of payload (limit 64 KiB)",
                        f.payload.len()
                    ));
                }
            }
            Kind::Exited => {
                let m = map.unwrap();
                parse_exited(&m)?;
                self.session_frame(id, &name)?;
                self.running.remove(&id);
            }
            _ => unreachable!("direction checked above"),
        }
        Ok(())
    }

    fn take_pending(&mut self, id: u32, sent: &Mutex<Sent>, what: &str) -> Result<(), String> {
        let mut sent = sent.lock().unwrap();
        match sent.pending_exec.get_mut(&id) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Ok(())
            }
            _ => Err(format!("{what} for id {id} without an EXEC waiting for it")),
        }
    }

    fn session_frame(&self, id: u32, name: &str) -> Result<(), String> {
        if self.running.contains(&id) {
            Ok(())
        } else {
            Err(format!(
                "{name} for id {id}, which is not a running session (before STARTED or after EXITED)"
            ))
        }
    }
}

/// EXITED, read key by key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub core_dumped: bool,
    pub status: i32,
}

impl ExitInfo {
    pub fn code(code: i32) -> ExitInfo {
        ExitInfo {
            code: Some(code),
            signal: None,
            core_dumped: false,
            status: code,
        }
    }
    pub fn signal(signal: i32) -> ExitInfo {
        ExitInfo {
            code: None,
            signal: Some(signal),
            core_dumped: false,
            status: 128 + signal,
        }
    }
}

/// Validates an EXITED map: `code` xor `signal`, `core_dumped` a bool
/// (present: the contract gives it no default), `status` = code or
/// 128 + signal.
pub fn parse_exited(m: &Value) -> Result<ExitInfo, String> {
    check_keys(
        "EXITED",
        m,
        &[("core_dumped", Ty::Bool), ("status", Ty::I32)],
        &[("code", Ty::I32), ("signal", Ty::I32)],
    )?;
    let code = m.get("code").and_then(Value::as_int).map(|i| i as i32);
    let signal = m.get("signal").and_then(Value::as_int).map(|i| i as i32);
    let core_dumped = m.get("core_dumped").and_then(Value::as_bool).unwrap();
    let status = m.get("status").and_then(Value::as_int).unwrap() as i32;
    match (code, signal) {
        (Some(c), None) if status == c => {}
        (None, Some(s)) if status == 128 + s => {}
        _ => {
            return Err(format!(
                "EXITED must carry code or signal (one of them) and status = code or 128 + signal: {m:?}"
            ))
        }
    }
    if core_dumped && signal.is_none() {
        return Err(format!("EXITED core_dumped without a signal: {m:?}"));
    }
    Ok(ExitInfo {
        code,
        signal,
        core_dumped,
        status,
    })
}

/// An ERROR frame, read key by key.
#[derive(Debug, Clone)]
pub struct ErrorInfo {
    pub id: u32,
    pub kind: String,
    pub message: String,
    pub frame_kind: Option<u8>,
}

/// An EXEC_FAILED frame, read key by key.
#[derive(Debug, Clone)]
pub struct FailInfo {
    pub kind: String,
    pub message: String,
    pub errno: Option<i32>,
    pub stage: Option<String>,
}

/// Everything a session sent, up to and including EXITED.
#[derive(Debug, Clone)]
pub struct Output {
    pub id: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: ExitInfo,
    /// The EXITED payload, as a map.
    pub exited_map: Value,
    /// Sum of STDIN_ACK bytes.
    pub acked: u64,
    /// Every frame of the session in order (STDOUT, STDERR, STDIN_ACK, EXITED).
    pub frames: Vec<OwnedFrame>,
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    /// Asserts exit code 0 and shows the output when not.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert_eq!(
            self.exit,
            ExitInfo::code(0),
            "session {} failed; stdout {:?} stderr {:?}",
            self.id,
            self.stdout_str(),
            self.stderr_str()
        );
        self
    }
}

/// A running agent.
pub struct Agent {
    child: Option<Child>,
    host: Host,
    rx: Receiver<Event>,
    stash: VecDeque<OwnedFrame>,
    checker: Checker,
    pause: Arc<Pause>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// READY's payload.
    pub ready: Value,
    /// The agent's pid as this test process sees it (the pid inside the
    /// namespace is READY's `pid`).
    pub host_pid: i32,
    pub pidns: bool,
    eof: bool,
}

impl std::ops::Deref for Agent {
    type Target = Host;
    fn deref(&self) -> &Host {
        &self.host
    }
}

/// Sets `sig` to SIG_IGN with the raw system call: glibc's sigaction
/// refuses the signals it reserves (32 and 33), which a parent can still
/// leave ignored.
fn ignore_signal_raw(sig: i32) -> std::io::Result<()> {
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
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn set_nonblocking(fd: i32) {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

impl Agent {
    /// Starts `agentd --stdio` with default options and waits for READY.
    pub fn start() -> Agent {
        Agent::start_with(Opts::default())
    }

    /// Starts the agent with extra arguments, waits for READY.
    pub fn start_args(args: &[&str]) -> Agent {
        Agent::start_with(Opts::args(args))
    }

    pub fn start_with(opts: Opts) -> Agent {
        let bin = env!("CARGO_BIN_EXE_agentd");
        let mut cmd = if opts.pidns {
            let mut c = Command::new("unshare");
            c.args(unshare_args()).arg(bin);
            c
        } else {
            Command::new(bin)
        };
        cmd.arg("--stdio").args(&opts.args);
        if let Ok(level) = std::env::var("AGENTD_TEST_LOG") {
            cmd.args(["--log-level", &level]);
        }
        cmd.env(BASE_ENV_KEY, BASE_ENV_VALUE)
            .env_remove("AGENTD_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !opts.ignore_signals.is_empty()
            || opts.leak_fd
            || opts.nofile.is_some()
            || opts.epoll_add_only.is_some()
            || opts.epoll_wait_fails
        {
            let sigs = opts.ignore_signals.clone();
            let leak_fd = opts.leak_fd;
            let nofile = opts.nofile;
            let wants_filter = opts.epoll_add_only.is_some() || opts.epoll_wait_fails;
            #[cfg(target_arch = "x86_64")]
            let deny_filter = wants_filter
                .then(|| epoll_filter(opts.epoll_add_only.as_deref(), opts.epoll_wait_fails));
            #[cfg(not(target_arch = "x86_64"))]
            assert!(!wants_filter, "the epoll filters are written for x86_64");
            // SAFETY: between fork and exec only async-signal-safe system
            // calls run, on data prepared before fork.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    for &sig in &sigs {
                        ignore_signal_raw(sig)?;
                    }
                    // dup2 clears close-on-exec on the copy.
                    if leak_fd && libc::dup2(2, 9) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if let Some(n) = nofile {
                        let lim = libc::rlimit {
                            rlim_cur: n,
                            rlim_max: n,
                        };
                        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    #[cfg(target_arch = "x86_64")]
                    if let Some(filter) = &deny_filter {
                        install_seccomp_filter(filter)?;
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawning agentd");
        let stdin: OwnedFd = child.stdin.take().unwrap().into();
        set_nonblocking(stdin.as_raw_fd());
        let mut stdout = child.stdout.take().unwrap();
        let mut stderr_pipe = child.stderr.take().unwrap();

        let stderr = Arc::new(Mutex::new(Vec::new()));
        {
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stderr_pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut s = stderr.lock().unwrap();
                    // Keep the last 256 KiB of logs.
                    if s.len() > 256 * 1024 {
                        s.drain(..128 * 1024);
                    }
                    s.extend_from_slice(&buf[..n]);
                }
            });
        }

        let pause = Arc::new(Pause::default());
        let (tx, rx) = mpsc::channel();
        {
            let pause = pause.clone();
            std::thread::spawn(move || {
                let mut dec = Decoder::new();
                loop {
                    {
                        let mut p = pause.paused.lock().unwrap();
                        while *p {
                            p = pause.cond.wait(p).unwrap();
                        }
                    }
                    match dec.read_from(&mut stdout) {
                        Ok(0) => {
                            let _ = tx.send(Event::Eof);
                            return;
                        }
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            let _ = tx.send(Event::ReadError(e.to_string()));
                            return;
                        }
                    }
                    while let Some(item) = dec.next_frame() {
                        let ev = match item {
                            Ok(f) => Event::Frame(f.to_owned()),
                            Err(e) => Event::Bad(e),
                        };
                        if tx.send(ev).is_err() {
                            return;
                        }
                    }
                }
            });
        }

        let child_pid = child.id() as i32;
        let mut agent = Agent {
            child: Some(child),
            host: Host {
                fd: Arc::new(Mutex::new(Some(stdin))),
                sent: Arc::new(Mutex::new(Sent::default())),
                next_ping: Arc::new(AtomicU64::new(1)),
                next_id: Arc::new(AtomicU32::new(1000)),
            },
            rx,
            stash: VecDeque::new(),
            checker: Checker::default(),
            pause,
            stderr,
            ready: Value::Nil,
            host_pid: child_pid,
            pidns: opts.pidns,
            eof: false,
        };
        let f = agent.recv();
        assert_eq!(f.kind, READY, "the first frame is not READY");
        agent.ready = payload_map(&f.payload).unwrap();
        if opts.pidns {
            agent.host_pid = agent.find_ns_child(child_pid);
        }
        agent
    }

    /// The agent inside the namespace: the child of `unshare` running agentd.
    fn find_ns_child(&self, unshare_pid: i32) -> i32 {
        let end = Instant::now() + timeout();
        loop {
            if let Some(&pid) = children_of(unshare_pid).first() {
                return pid;
            }
            assert!(Instant::now() < end, "no agent process under unshare");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A handle for sending from another thread.
    pub fn host(&self) -> Host {
        self.host.clone()
    }

    /// READY's value for `key`, as an integer.
    pub fn ready_int(&self, key: &str) -> i128 {
        self.ready
            .get(key)
            .and_then(Value::as_int)
            .unwrap_or_else(|| panic!("READY has no integer {key}: {:?}", self.ready))
    }

    pub fn stdin_window(&self) -> u32 {
        self.ready_int("stdin_window") as u32
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Takes the next frame off the channel and checks it; `None` on
    /// timeout or end of stream.
    fn pull(&mut self, limit: Duration) -> Option<OwnedFrame> {
        if self.eof {
            return None;
        }
        let ev = match self.rx.recv_timeout(limit) {
            Ok(ev) => ev,
            Err(RecvTimeoutError::Timeout) => return None,
            Err(RecvTimeoutError::Disconnected) => {
                self.eof = true;
                return None;
            }
        };
        match ev {
            Event::Frame(f) => {
                if let Err(e) = self.checker.check(&f, &self.host.sent) {
                    panic!(
                        "protocol violation by the agent: {e}\n  frame: {} id {} payload {:?}",
                        kind_name(f.kind),
                        f.id,
                        show_payload(&f)
                    );
                }
                Some(f)
            }
            Event::Bad(e) => panic!("the agent sent a bad frame: {e}"),
            Event::Eof => {
                self.eof = true;
                None
            }
            Event::ReadError(e) => panic!("reading the agent's stdout: {e}"),
        }
    }

    /// True once the agent's stdout has ended.
    pub fn at_eof(&self) -> bool {
        self.eof
    }

    /// The next frame (stashed ones first), or a failure after [`timeout`].
    #[track_caller]
    pub fn recv(&mut self) -> OwnedFrame {
        self.recv_where(|_| true, "any frame")
    }

    /// The first frame (stashed ones first) matching `pred`; frames that do
    /// not match are stashed in order. Fails after [`timeout`].
    #[track_caller]
    pub fn recv_where(&mut self, pred: impl Fn(&OwnedFrame) -> bool, what: &str) -> OwnedFrame {
        self.recv_where_within(&pred, timeout()).unwrap_or_else(|| {
            panic!(
                "timed out after {:?} waiting for {what}{}; stashed: {}",
                timeout(),
                if self.eof {
                    " (agent stdout closed)"
                } else {
                    ""
                },
                self.describe_stash()
            )
        })
    }

    /// Like [`Agent::recv_where`] but `None` after `limit`.
    pub fn recv_where_within(
        &mut self,
        pred: &dyn Fn(&OwnedFrame) -> bool,
        limit: Duration,
    ) -> Option<OwnedFrame> {
        if let Some(i) = self.stash.iter().position(pred) {
            return self.stash.remove(i);
        }
        let end = Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let f = self.pull(left)?;
            if pred(&f) {
                return Some(f);
            }
            self.stash.push_back(f);
        }
    }

    /// Moves every frame that has arrived into the stash, waiting at most
    /// `limit` for the first.
    pub fn drain_into_stash(&mut self, limit: Duration) {
        let end = Instant::now() + limit;
        while let Some(f) = self.pull(end.saturating_duration_since(Instant::now())) {
            self.stash.push_back(f);
        }
    }

    /// Stashed frames matching `pred`, removed from the stash.
    pub fn take_stashed(&mut self, pred: impl Fn(&OwnedFrame) -> bool) -> Vec<OwnedFrame> {
        let (take, keep): (Vec<_>, Vec<_>) = self.stash.drain(..).partition(|f| pred(f));
        self.stash = keep.into();
        take
    }

    pub fn describe_stash(&self) -> String {
        let mut s = String::new();
        for f in self.stash.iter().take(20) {
            s.push_str(&format!(
                "\n    {} id {} {:?}",
                kind_name(f.kind),
                f.id,
                show_payload(f)
            ));
        }
        if self.stash.len() > 20 {
            s.push_str(&format!("\n    ... {} more", self.stash.len() - 20));
        }
        if s.is_empty() {
            s.push_str("(none)");
        }
        s
    }

    /// A PING round trip on id 0 with a fresh payload. The agent handles
    /// frames in order, so everything it answers to earlier frames is in
    /// the stash afterwards.
    #[track_caller]
    pub fn ping(&mut self) {
        let n = self.host.next_ping.fetch_add(1, Ordering::Relaxed);
        let payload = format!("barrier-{n}").into_bytes();
        self.send(&Message::Ping(&payload), 0);
        let f = self.recv_where(
            |f| f.kind == PONG && f.id == 0 && f.payload == payload,
            "PONG",
        );
        assert_eq!(f.payload, payload);
    }

    /// Waits for an ERROR with this id.
    #[track_caller]
    pub fn expect_error(&mut self, id: u32) -> ErrorInfo {
        let f = self.recv_where(|f| f.kind == ERROR && f.id == id, "ERROR");
        error_info(&f)
    }

    /// Waits for an ERROR with this id and kind (and checks frame_kind
    /// when given).
    #[track_caller]
    pub fn expect_error_kind(&mut self, id: u32, kind: &str, frame_kind: Option<u8>) -> ErrorInfo {
        let e = self.expect_error(id);
        assert_eq!(e.kind, kind, "ERROR for id {id}: {e:?}");
        assert!(!e.message.is_empty(), "ERROR without a message: {e:?}");
        if let Some(fk) = frame_kind {
            // Optional in the contract; docs/PROTOCOL.md: present in every
            // ERROR that answers a frame whose kind could be read.
            assert_eq!(e.frame_kind, Some(fk), "ERROR frame_kind: {e:?}");
        }
        e
    }

    /// Asserts that no ERROR has arrived (after a PING barrier).
    #[track_caller]
    pub fn assert_no_errors(&mut self) {
        self.ping();
        let errors = self.take_stashed(|f| f.kind == ERROR);
        assert!(
            errors.is_empty(),
            "unexpected ERROR frames: {:?}",
            errors.iter().map(error_info).collect::<Vec<_>>()
        );
    }

    /// Sends EXEC and waits for STARTED (returns the pid) or EXEC_FAILED.
    #[track_caller]
    pub fn exec_result(&mut self, id: u32, exec: &Exec) -> Result<u32, FailInfo> {
        self.send_exec(id, exec);
        self.exec_reply(id)
    }

    /// Waits for STARTED or EXEC_FAILED for `id`.
    #[track_caller]
    pub fn exec_reply(&mut self, id: u32) -> Result<u32, FailInfo> {
        let f = self.recv_where(
            |f| f.id == id && (f.kind == STARTED || f.kind == EXEC_FAILED),
            "STARTED or EXEC_FAILED",
        );
        let m = payload_map(&f.payload).unwrap();
        if f.kind == STARTED {
            Ok(m.get("pid").and_then(Value::as_int).unwrap() as u32)
        } else {
            Err(fail_info(&m))
        }
    }

    /// Sends EXEC and waits for STARTED; returns the pid.
    #[track_caller]
    pub fn exec(&mut self, id: u32, exec: &Exec) -> u32 {
        match self.exec_result(id, exec) {
            Ok(pid) => pid,
            Err(e) => panic!("EXEC {:?} {:?} failed: {e:?}", exec.cmd, exec.args),
        }
    }

    /// Sends EXEC and expects EXEC_FAILED of `kind`.
    #[track_caller]
    pub fn exec_fail(&mut self, id: u32, exec: &Exec, kind: &str) -> FailInfo {
        match self.exec_result(id, exec) {
            Ok(pid) => panic!(
                "EXEC {:?} {:?} started (pid {pid}), expected EXEC_FAILED {kind}",
                exec.cmd, exec.args
            ),
            Err(e) => {
                assert_eq!(e.kind, kind, "EXEC_FAILED for {:?}: {e:?}", exec.cmd);
                assert!(!e.message.is_empty(), "EXEC_FAILED without message: {e:?}");
                e
            }
        }
    }

    /// Collects a session's frames until its EXITED.
    #[track_caller]
    pub fn collect(&mut self, id: u32) -> Output {
        self.collect_within(id, timeout())
            .unwrap_or_else(|| panic!("session {id} did not exit within {:?}", timeout()))
    }

    /// Collects a session's frames until its EXITED, `None` after `limit`.
    pub fn collect_within(&mut self, id: u32, limit: Duration) -> Option<Output> {
        let end = Instant::now() + limit;
        let mut out = Output {
            id,
            stdout: Vec::new(),
            stderr: Vec::new(),
            exit: ExitInfo::code(-1),
            exited_map: Value::Nil,
            acked: 0,
            frames: Vec::new(),
        };
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let f = self.recv_where_within(&|f| f.id == id && is_session_kind(f.kind), left)?;
            match f.kind {
                STDOUT => out.stdout.extend_from_slice(&f.payload),
                STDERR => out.stderr.extend_from_slice(&f.payload),
                STDIN_ACK => {
                    out.acked += ack_bytes(&f);
                }
                EXITED => {
                    out.exited_map = payload_map(&f.payload).unwrap();
                    out.exit = parse_exited(&out.exited_map).unwrap();
                    out.frames.push(f);
                    return Some(out);
                }
                _ => {}
            }
            out.frames.push(f);
        }
    }

    /// Runs `exec` as a new session and collects it. A pipe session gets
    /// no stdin (/dev/null); a tty session keeps its terminal as stdin
    /// (whatever `stdin` says is left as the caller set it).
    #[track_caller]
    pub fn run(&mut self, mut exec: Exec) -> Output {
        if !exec.tty {
            exec.stdin = false;
        }
        let id = self.new_id();
        self.exec(id, &exec);
        self.collect(id)
    }

    /// Runs `sh -c script` (stdin /dev/null) and collects it.
    #[track_caller]
    pub fn sh(&mut self, script: &str) -> Output {
        self.run(sh(script))
    }

    /// Runs `exec` with `input` on stdin (sent within the window, then
    /// STDIN_CLOSE) and collects it.
    #[track_caller]
    pub fn run_with_stdin(&mut self, exec: Exec, input: &[u8]) -> Output {
        let id = self.new_id();
        self.exec(id, &exec);
        let mut out = self.feed_stdin(id, input, 32 * 1024);
        self.send_stdin_close(id);
        let rest = self.collect(id);
        out.stdout.extend_from_slice(&rest.stdout);
        out.stderr.extend_from_slice(&rest.stderr);
        out.acked += rest.acked;
        out.frames.extend(rest.frames);
        out.exit = rest.exit;
        out.exited_map = rest.exited_map;
        out
    }

    /// Sends `input` to session `id` in frames of at most `chunk` bytes,
    /// never having more than READY's `stdin_window` unacknowledged. Output
    /// and acks that arrive meanwhile are returned (EXITED is left stashed
    /// if it comes).
    #[track_caller]
    pub fn feed_stdin(&mut self, id: u32, input: &[u8], chunk: usize) -> Output {
        let window = u64::from(self.stdin_window());
        let mut out = Output {
            id,
            stdout: Vec::new(),
            stderr: Vec::new(),
            exit: ExitInfo::code(-1),
            exited_map: Value::Nil,
            acked: 0,
            frames: Vec::new(),
        };
        let mut sent: u64 = 0;
        let mut pos = 0;
        while pos < input.len() {
            let n = chunk.min(input.len() - pos);
            if sent + n as u64 - out.acked > window {
                // Wait for window: take this session's frames as they come.
                let f = self.recv_where(
                    |f| f.id == id && matches!(f.kind, STDOUT | STDERR | STDIN_ACK),
                    "STDIN_ACK (window used up)",
                );
                match f.kind {
                    STDOUT => out.stdout.extend_from_slice(&f.payload),
                    STDERR => out.stderr.extend_from_slice(&f.payload),
                    _ => out.acked += ack_bytes(&f),
                }
                out.frames.push(f);
                continue;
            }
            self.send_stdin(id, &input[pos..pos + n]);
            sent += n as u64;
            pos += n;
            // Take what has already arrived, without waiting.
            while let Some(f) = self.recv_where_within(
                &|f| f.id == id && matches!(f.kind, STDOUT | STDERR | STDIN_ACK),
                Duration::ZERO,
            ) {
                match f.kind {
                    STDOUT => out.stdout.extend_from_slice(&f.payload),
                    STDERR => out.stderr.extend_from_slice(&f.payload),
                    _ => out.acked += ack_bytes(&f),
                }
                out.frames.push(f);
            }
        }
        out
    }

    /// Stops reading the agent's stdout (the reader thread finishes the
    /// read it is in, then waits).
    pub fn pause_reading(&self) {
        *self.pause.paused.lock().unwrap() = true;
    }

    pub fn resume_reading(&self) {
        *self.pause.paused.lock().unwrap() = false;
        self.pause.cond.notify_all();
    }

    /// Waits for the agent process to exit.
    #[track_caller]
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let end = Instant::now() + limit;
        let child = self.child.as_mut().expect("agent already reaped");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < end,
                "the agent did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The agent's resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_field(self.host_pid, "VmRSS")
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS for agent pid {}", self.host_pid))
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
                            proc_status_field(*p, "State").unwrap_or_default(),
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
            proc_status_field(p, "NSpid")
                .and_then(|v| v.split_whitespace().last()?.parse::<u32>().ok())
                == Some(pid)
        })
    }
}

fn show_payload(f: &OwnedFrame) -> String {
    match Kind::from_u8(f.kind).map(Kind::encoding) {
        Some(Encoding::Map) => match payload_map(&f.payload) {
            Ok(v) => format!("{v:?}"),
            Err(e) => format!("<bad map: {e}>"),
        },
        _ => {
            let s = String::from_utf8_lossy(&f.payload[..f.payload.len().min(200)]).into_owned();
            format!("{} bytes {s:?}", f.payload.len())
        }
    }
}

fn is_session_kind(kind: u8) -> bool {
    matches!(kind, STDOUT | STDERR | STDIN_ACK | EXITED)
}

pub fn ack_bytes(f: &OwnedFrame) -> u64 {
    payload_map(&f.payload)
        .unwrap()
        .get("bytes")
        .and_then(Value::as_int)
        .unwrap() as u64
}

pub fn error_info(f: &OwnedFrame) -> ErrorInfo {
    let m = payload_map(&f.payload).unwrap();
    ErrorInfo {
        id: f.id,
        kind: m.get("kind").and_then(Value::as_str).unwrap().to_owned(),
        message: m.get("message").and_then(Value::as_str).unwrap().to_owned(),
        frame_kind: m.get("frame_kind").and_then(Value::as_int).map(|i| i as u8),
    }
}

pub fn fail_info(m: &Value) -> FailInfo {
    FailInfo {
        kind: m.get("kind").and_then(Value::as_str).unwrap().to_owned(),
        message: m.get("message").and_then(Value::as_str).unwrap().to_owned(),
        errno: m.get("errno").and_then(Value::as_int).map(|i| i as i32),
        stage: m.get("stage").and_then(Value::as_str).map(str::to_owned),
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            if !log.is_empty() {
                let tail = &log[log.len().saturating_sub(8192)..];
                eprintln!("---- agentd stderr (tail) ----\n{tail}\n------------------------------");
            }
        }
        self.resume_reading();
        // The agent's descendants first (orphans a test left behind), then
        // the agent (and unshare).
        for pid in self.descendants() {
            // SAFETY: kill with a pid and a signal number.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // SAFETY: as above.
        unsafe { libc::kill(self.host_pid, libc::SIGKILL) };
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `/proc/<pid>/status` field `name`, trimmed.
pub fn proc_status_field(pid: i32, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

#[cfg(target_arch = "x86_64")]
/// The classic BPF program behind [`Opts::epoll_add_only`] and
/// [`Opts::epoll_wait_fails`]: on x86_64, `epoll_ctl(_, EPOLL_CTL_ADD, fd,
/// _)` for an fd not in `add_only` (when given) returns ENOSPC, and with
/// `wait_fails` every epoll_wait, epoll_pwait and epoll_pwait2 returns
/// EINVAL; every other system call is allowed.
fn epoll_filter(add_only: Option<&[u32]>, wait_fails: bool) -> Vec<libc::sock_filter> {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const LD_ABS_W: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    /// Where a jump goes: on to the next instruction, or to one of the
    /// three returns at the end.
    #[derive(Clone, Copy)]
    enum To {
        Next,
        Allow,
        NoSpace,
        Invalid,
    }
    // struct seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (the
    // low 32 bits first, little endian).
    let mut prog: Vec<(u16, To, To, u32)> = vec![
        (LD_ABS_W, To::Next, To::Next, 4),
        (JEQ, To::Next, To::Allow, AUDIT_ARCH_X86_64),
        (LD_ABS_W, To::Next, To::Next, 0),
    ];
    if wait_fails {
        for nr in [
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_pwait2,
        ] {
            prog.push((JEQ, To::Invalid, To::Next, nr as u32));
        }
    }
    if let Some(allowed) = add_only {
        prog.push((JEQ, To::Next, To::Allow, libc::SYS_epoll_ctl as u32));
        prog.push((LD_ABS_W, To::Next, To::Next, 24));
        prog.push((JEQ, To::Next, To::Allow, libc::EPOLL_CTL_ADD as u32));
        prog.push((LD_ABS_W, To::Next, To::Next, 32));
        for &fd in allowed {
            prog.push((JEQ, To::Allow, To::Next, fd));
        }
        prog.push((JEQ, To::NoSpace, To::NoSpace, 0));
    }
    let (allow, no_space, invalid) = (prog.len(), prog.len() + 1, prog.len() + 2);
    let offset = |i: usize, to: To| -> u8 {
        let target = match to {
            To::Next => return 0,
            To::Allow => allow,
            To::NoSpace => no_space,
            To::Invalid => invalid,
        };
        u8::try_from(target - i - 1).expect("a jump too far for classic BPF")
    };
    let mut out: Vec<libc::sock_filter> = prog
        .iter()
        .enumerate()
        .map(|(i, &(code, jt, jf, k))| libc::sock_filter {
            code,
            jt: offset(i, jt),
            jf: offset(i, jf),
            k,
        })
        .collect();
    for ret in [
        libc::SECCOMP_RET_ALLOW,
        libc::SECCOMP_RET_ERRNO | libc::ENOSPC as u32,
        libc::SECCOMP_RET_ERRNO | libc::EINVAL as u32,
    ] {
        out.push(libc::sock_filter {
            code: RET,
            jt: 0,
            jf: 0,
            k: ret,
        });
    }
    out
}

#[cfg(target_arch = "x86_64")]
/// Installs a seccomp filter on the calling process (between fork and
/// exec: two prctl calls, no allocation).
fn install_seccomp_filter(filter: &[libc::sock_filter]) -> std::io::Result<()> {
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with integer arguments, then with a pointer to a
    // program that outlives the call (the kernel copies it).
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A new pseudo-terminal, both ends close-on-exec from the moment they
/// exist (openpty's are inheritable until fixed up, and an agent another
/// test starts in between would inherit them): (master, slave, slave path).
pub fn cloexec_pty() -> (OwnedFd, OwnedFd, PathBuf) {
    use std::os::fd::FromRawFd;
    // SAFETY: posix_openpt returns a new fd or -1; grantpt and unlockpt
    // take that fd; ptsname_r writes a NUL-terminated path into the buffer
    // of the given length; open returns a new fd or -1.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(
            master >= 0,
            "posix_openpt: {}",
            std::io::Error::last_os_error()
        );
        let master = OwnedFd::from_raw_fd(master);
        assert_eq!(libc::grantpt(master.as_raw_fd()), 0, "grantpt");
        assert_eq!(libc::unlockpt(master.as_raw_fd()), 0, "unlockpt");
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(
            libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()),
            0,
            "ptsname_r"
        );
        let slave = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        assert!(
            slave >= 0,
            "open the slave: {}",
            std::io::Error::last_os_error()
        );
        let path = std::ffi::CStr::from_ptr(name.as_ptr())
            .to_str()
            .expect("a UTF-8 slave path")
            .into();
        (master, OwnedFd::from_raw_fd(slave), path)
    }
}

/// Reads /proc/<pid>/stat utime + stime (clock ticks).
pub fn cpu_ticks(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = s[s.rfind(')').unwrap() + 2..].split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The agent's open fds.
pub fn open_fds(pid: i32) -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    fds.sort_unstable();
    fds
}

/// True if `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    proc_status_field(pid, "State").is_some_and(|s| !s.starts_with('Z') && !s.starts_with('X'))
}

/// Children of `pid`, from every thread's `children` file.
pub fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out
}

pub fn descendants_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in children_of(p) {
            if !out.contains(&c) {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

/// Waits until `cond` holds, polling; false after `limit`.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `sh -c script`, stdin on (callers set `stdin` as they need).
pub fn sh(script: &str) -> Exec {
    let mut e = Exec::new("sh");
    e.args = vec!["-c".into(), script.into()];
    e
}

/// An Exec of `cmd` with `args`.
pub fn cmd(cmd: &str, args: &[&str]) -> Exec {
    let mut e = Exec::new(cmd);
    e.args = args.iter().map(|s| s.to_string()).collect();
    e
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "agentd-test-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic pseudo-random bytes (xorshift), for exact-content checks.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Encodes a frame header and payload (any `len`, even invalid ones).
pub fn raw_frame(len: u32, kind: u8, id: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = len.to_be_bytes().to_vec();
    v.push(kind);
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// The checker itself must catch what it is there to catch.
#[cfg(test)]
mod checker_tests {
    use super::*;

    fn frame(kind: u8, id: u32, payload: Vec<u8>) -> OwnedFrame {
        OwnedFrame { kind, id, payload }
    }

    fn ready() -> OwnedFrame {
        frame(
            READY,
            0,
            Value::map([
                ("protocol", Value::int(1)),
                ("agent", Value::str("agentd/x")),
                ("pid", Value::int(10)),
                ("pid1", Value::Bool(false)),
                ("max_payload", Value::int(1 << 20)),
                ("stdin_window", Value::int(1000)),
                ("max_sessions", Value::int(5)),
            ])
            .encode(),
        )
    }

    fn exited(pairs: Vec<(&str, Value)>) -> Vec<u8> {
        Value::map(pairs).encode()
    }

    /// Runs `frames` through a fresh checker (with one EXEC for id 1 and
    /// 10 STDIN bytes sent); returns the first violation.
    fn run(frames: Vec<OwnedFrame>) -> Result<(), String> {
        let sent = Mutex::new(Sent::default());
        sent.lock().unwrap().pending_exec.insert(1, 1);
        sent.lock().unwrap().stdin_bytes.insert(1, 10);
        let mut c = Checker::default();
        for f in std::iter::once(ready()).chain(frames) {
            c.check(&f, &sent)?;
        }
        Ok(())
    }

    fn started() -> OwnedFrame {
        frame(STARTED, 1, Value::map([("pid", Value::int(5))]).encode())
    }

    fn good_exit() -> OwnedFrame {
        frame(
            EXITED,
            1,
            exited(vec![
                ("code", Value::int(0)),
                ("core_dumped", Value::Bool(false)),
                ("status", Value::int(0)),
            ]),
        )
    }

    #[test]
    fn accepts_a_proper_session() {
        run(vec![
            started(),
            frame(STDOUT, 1, b"x".to_vec()),
            frame(
                STDIN_ACK,
                1,
                Value::map([("bytes", Value::int(10))]).encode(),
            ),
            good_exit(),
        ])
        .unwrap();
    }

    #[test]
    fn rejects_violations() {
        let bad: Vec<(&str, Vec<OwnedFrame>)> = vec![
            (
                "output before STARTED",
                vec![frame(STDOUT, 1, b"x".to_vec())],
            ),
            (
                "output after EXITED",
                vec![started(), good_exit(), frame(STDOUT, 1, b"x".to_vec())],
            ),
            ("two EXITED", vec![started(), good_exit(), good_exit()]),
            (
                "STARTED without EXEC",
                vec![frame(
                    STARTED,
                    2,
                    Value::map([("pid", Value::int(5))]).encode(),
                )],
            ),
            ("second READY", vec![ready()]),
            ("unknown kind", vec![frame(0x7f, 0, Vec::new())]),
            ("host kind", vec![frame(STDIN, 1, Vec::new())]),
            (
                "oversized STDOUT",
                vec![started(), frame(STDOUT, 1, vec![0; 65537])],
            ),
            (
                "acks above sent",
                vec![
                    started(),
                    frame(
                        STDIN_ACK,
                        1,
                        Value::map([("bytes", Value::int(11))]).encode(),
                    ),
                ],
            ),
            (
                "EXITED without core_dumped",
                vec![
                    started(),
                    frame(
                        EXITED,
                        1,
                        exited(vec![("code", Value::int(0)), ("status", Value::int(0))]),
                    ),
                ],
            ),
            (
                "EXITED with both",
                vec![
                    started(),
                    frame(
                        EXITED,
                        1,
                        exited(vec![
                            ("code", Value::int(0)),
                            ("signal", Value::int(9)),
                            ("core_dumped", Value::Bool(false)),
                            ("status", Value::int(0)),
                        ]),
                    ),
                ],
            ),
            (
                "EXITED wrong status",
                vec![
                    started(),
                    frame(
                        EXITED,
                        1,
                        exited(vec![
                            ("signal", Value::int(9)),
                            ("core_dumped", Value::Bool(false)),
                            ("status", Value::int(9)),
                        ]),
                    ),
                ],
            ),
            (
                "EXITED core_dumped not bool",
                vec![
                    started(),
                    frame(
                        EXITED,
                        1,
                        exited(vec![
                            ("code", Value::int(0)),
                            ("core_dumped", Value::int(0)),
                            ("status", Value::int(0)),
                        ]),
                    ),
                ],
            ),
            (
                "ERROR kind outside the contract",
                vec![frame(
                    ERROR,
                    0,
                    Value::map([("kind", Value::str("oops")), ("message", Value::str("m"))])
                        .encode(),
                )],
            ),
            (
                "EXEC_FAILED for a running id",
                vec![
                    started(),
                    frame(
                        EXEC_FAILED,
                        1,
                        Value::map([("kind", Value::str("other")), ("message", Value::str("m"))])
                            .encode(),
                    ),
                ],
            ),
            (
                "SHUTDOWN_DONE without SHUTDOWN",
                vec![frame(SHUTDOWN_DONE, 0, Vec::new())],
            ),
            (
                "map payload that is an array",
                vec![frame(STARTED, 1, vec![0x91, 0x01])],
            ),
        ];
        for (what, frames) in bad {
            assert!(run(frames).is_err(), "checker accepted: {what}");
        }
    }
}
