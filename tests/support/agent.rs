//! The loopback suite's agent: `agentd --stdio` (optionally as PID 1 of a
//! new pid namespace) with a reader thread, so a test waits for the frames
//! it wants and the rest wait in a stash.
//!
//! - A reader thread cuts the agent's stdout into frames with
//!   [`agentd::codec::Decoder`] and sends them down a channel. It can be
//!   paused, to play a host that stops reading.
//! - Every frame the test consumes first goes through the
//!   [`Checker`](super::checker) (in the test's thread, after whatever the
//!   test has told it, such as [`Host::note_shutdown`]). A violation fails
//!   the test at once.
//! - Writes go through [`Host`] (cloneable, usable from other threads) and
//!   time out. Every wait has a timeout ([`timeout`]).
//! - Dropping the [`Agent`] kills its whole process tree.

use std::collections::VecDeque;
use std::process::ExitStatus;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use agentd::codec::{Decoder, FrameError, OwnedFrame};
use agentd::messages::{Exec, Message};

use super::checker::{
    kind_name, parse_exited, payload_map, show_payload, violation, Checker, ExitInfo,
};
use super::host::{
    sh, AgentProcess, Host, Opts, ERROR, EXEC_FAILED, EXITED, PONG, READY, STARTED, STDERR,
    STDIN_ACK, STDOUT,
};
use super::msgpack::Value;
use super::timeout;

/// What the reader thread sends.
enum Event {
    Frame(OwnedFrame),
    /// The agent sent something that is not a frame.
    Bad(FrameError),
    /// End of the stream; whether it fell between frames.
    Eof {
        at_boundary: bool,
    },
    ReadError(String),
}

/// A flag the reader thread waits on while a test plays a host that does
/// not read.
#[derive(Default)]
struct Pause {
    paused: Mutex<bool>,
    cond: Condvar,
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
    fn empty(id: u32) -> Output {
        Output {
            id,
            stdout: Vec::new(),
            stderr: Vec::new(),
            exit: ExitInfo::code(-1),
            exited_map: Value::Nil,
            acked: 0,
            frames: Vec::new(),
        }
    }
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
    // First: dropped (the process tree killed) before the transport
    // closes, as a test that fails leaves it.
    process: AgentProcess,
    host: Host,
    rx: Receiver<Event>,
    stash: VecDeque<OwnedFrame>,
    checker: Checker,
    pause: Arc<Pause>,
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
        let (process, to_agent, from_agent) = AgentProcess::spawn_stdio(&opts);
        let pause = Arc::new(Pause::default());
        let (tx, rx) = mpsc::channel();
        {
            let pause = pause.clone();
            let mut stdout = std::fs::File::from(from_agent);
            std::thread::spawn(move || {
                let mut dec = Decoder::new();
                loop {
                    {
                        let mut p = pause.paused.lock().expect("the pause flag");
                        while *p {
                            p = pause.cond.wait(p).expect("the pause flag");
                        }
                    }
                    match dec.read_from(&mut stdout) {
                        Ok(0) => {
                            let _ = tx.send(Event::Eof {
                                at_boundary: dec.is_at_boundary(),
                            });
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
        let mut agent = Agent {
            host: Host::new(to_agent, Some(timeout())),
            rx,
            stash: VecDeque::new(),
            checker: Checker::new(Some(process.ready_pid())),
            pause,
            ready: Value::Nil,
            host_pid: process.host_pid,
            pidns: process.pidns,
            eof: false,
            process,
        };
        let f = agent.recv();
        assert_eq!(f.kind, READY, "the first frame is not READY");
        agent.ready = payload_map(&f.payload).expect("READY's payload was checked");
        agent
    }

    /// A handle for sending from another thread.
    pub fn host(&self) -> Host {
        self.host.clone()
    }

    /// The agent process (its pid, log, /proc views).
    pub fn process(&self) -> &AgentProcess {
        &self.process
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
        self.process.log()
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
                let mut sent = self.host.sent().lock().expect("what the host sent");
                if let Err(e) = self.checker.check(&f.as_frame(), &mut sent) {
                    panic!("{}", violation(&e, &f.as_frame()));
                }
                Some(f)
            }
            Event::Bad(e) => panic!("the agent sent a bad frame: {e}"),
            Event::Eof { at_boundary } => {
                self.eof = true;
                if let Err(e) = self.checker.check_eof(at_boundary) {
                    panic!("protocol violation by the agent: {e}");
                }
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
                "\n    {} id {} {}",
                kind_name(f.kind),
                f.id,
                show_payload(f.kind, &f.payload)
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
        let payload = self.host.fresh_ping_payload();
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
        let m = payload_map(&f.payload).expect("the payload was checked");
        if f.kind == STARTED {
            Ok(m.get("pid")
                .and_then(Value::as_int)
                .expect("STARTED's pid was checked") as u32)
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
        let mut out = Output::empty(id);
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
                    out.exited_map = payload_map(&f.payload).expect("EXITED was checked");
                    out.exit = parse_exited(&out.exited_map).expect("EXITED was checked");
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
        self.pipe_stdin(id, input, 32 * 1024)
    }

    /// Sends `input` to session `id` (as [`Agent::feed_stdin`]: never more
    /// than the window outstanding), then STDIN_CLOSE, and collects the
    /// session.
    #[track_caller]
    pub fn pipe_stdin(&mut self, id: u32, input: &[u8], chunk: usize) -> Output {
        let mut out = self.feed_stdin(id, input, chunk);
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
        let mut out = Output::empty(id);
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
        *self.pause.paused.lock().expect("the pause flag") = true;
    }

    pub fn resume_reading(&self) {
        *self.pause.paused.lock().expect("the pause flag") = false;
        self.pause.cond.notify_all();
    }

    /// Waits for the agent process to exit.
    #[track_caller]
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        self.process.wait_exit(limit)
    }

    /// The agent's resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.process.rss_kib()
    }

    /// How many fds the agent has open.
    pub fn fd_count(&self) -> usize {
        self.process.fd_count()
    }

    /// The agent's children (host pids), zombies included.
    pub fn children(&self) -> Vec<i32> {
        self.process.children()
    }

    /// Every descendant of the agent (host pids).
    pub fn descendants(&self) -> Vec<i32> {
        self.process.descendants()
    }

    /// Waits until the agent has no children at all (every one exited and
    /// was reaped). Fails with the list (and states) after `limit`.
    #[track_caller]
    pub fn wait_no_children(&self, limit: Duration) {
        self.process.wait_no_children(limit)
    }

    /// The host pid of a pid the agent reported (STARTED `pid`), which is
    /// the same pid unless the agent runs in its own pid namespace.
    pub fn host_pid_of(&self, pid: u32) -> Option<i32> {
        self.process.host_pid_of(pid)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // The reader thread must not sit paused; the process (dropped
        // after this) kills the agent's tree, which ends the thread's read.
        self.resume_reading();
    }
}

fn is_session_kind(kind: u8) -> bool {
    matches!(kind, STDOUT | STDERR | STDIN_ACK | EXITED)
}

/// The `bytes` of a STDIN_ACK (or OUTPUT_ACK) frame.
pub fn ack_bytes(f: &OwnedFrame) -> u64 {
    payload_map(&f.payload)
        .ok()
        .and_then(|m| m.get("bytes").and_then(Value::as_int))
        .unwrap_or_else(|| panic!("an ack without bytes: {f:?}")) as u64
}

/// The string `key` of `what`'s map `m`.
fn text(m: &Value, key: &str, what: &str) -> String {
    m.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{what} without a string {key}: {m:?}"))
        .to_owned()
}

/// An ERROR frame's keys.
pub fn error_info(f: &OwnedFrame) -> ErrorInfo {
    let m = payload_map(&f.payload).unwrap_or_else(|e| panic!("ERROR payload: {e}"));
    ErrorInfo {
        id: f.id,
        kind: text(&m, "kind", "ERROR"),
        message: text(&m, "message", "ERROR"),
        frame_kind: m.get("frame_kind").and_then(Value::as_int).map(|i| i as u8),
    }
}

/// An EXEC_FAILED map's keys.
pub fn fail_info(m: &Value) -> FailInfo {
    FailInfo {
        kind: text(m, "kind", "EXEC_FAILED"),
        message: text(m, "message", "EXEC_FAILED"),
        errno: m.get("errno").and_then(Value::as_int).map(|i| i as i32),
        stage: m.get("stage").and_then(Value::as_str).map(str::to_owned),
    }
}
