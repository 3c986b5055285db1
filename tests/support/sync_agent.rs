//! The host of tests/reliability.rs and tests/security.rs: `agentd
//! --stdio` over two pipes, driven frame by frame in the test's thread, so
//! a test decides when the host reads (and when it stops: a host that does
//! not read reads nothing at all), and every frame is checked by the
//! [`Checker`](super::checker) as it arrives and recorded per session.
//!
//! Every wait is bounded ([`SYNC_TIMEOUT`] unless a test gives its own); a
//! test that times out panics with what it was waiting for. Dropping a
//! [`SyncAgent`] kills its whole process tree.

use std::collections::{HashMap, HashSet};
use std::io;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use agentd::codec::OwnedFrame;
use agentd::messages::{Ack, ErrorMsg, Exec, ExecFailed, Exited, Kind, Message, Ready, Signal};

use super::checker::Checker;
use super::host::{poll_fd, AgentProcess, Conn, Filled, Host, Opts};

/// The longest any single wait of a [`SyncAgent`] may take: longer than
/// [`super::timeout`], for tests that flood and fork-bomb a shared
/// machine.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// What the host saw of one session.
#[derive(Debug, Default, Clone)]
pub struct Log {
    pub pid: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_frames: usize,
    /// STDOUT and STDERR payload bytes, also for a session whose output is
    /// only counted (see [`SyncAgent::count_only`]).
    pub output_bytes: u64,
    /// STDIN bytes acknowledged.
    pub acked: u64,
    pub exited: Option<Exited>,
    pub failed: Option<ExecFailed>,
    pub errors: Vec<ErrorMsg>,
}

impl Log {
    pub fn done(&self) -> bool {
        self.exited.is_some() || self.failed.is_some()
    }

    pub fn code(&self) -> Option<i32> {
        self.exited.as_ref().and_then(|e| e.code)
    }

    pub fn signal(&self) -> Option<i32> {
        self.exited.as_ref().and_then(|e| e.signal)
    }

    pub fn stderr_contains(&self, text: &str) -> bool {
        String::from_utf8_lossy(&self.stderr).contains(text)
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

pub struct SyncAgent {
    // First: dropped (the process tree killed) before the transport closes.
    process: AgentProcess,
    conn: Conn,
    pub ready: Ready,
    /// The agent's pid.
    pub host_pid: i32,
    pub logs: HashMap<u32, Log>,
    /// Sessions whose log was taken: an ERROR may still come for them
    /// (a frame the host sent before it saw EXITED).
    pub finished: HashSet<u32>,
    pub late_errors: Vec<(u32, ErrorMsg)>,
    pub pongs: Vec<(u32, Vec<u8>)>,
    /// ERRORs with id 0.
    pub conn_errors: Vec<ErrorMsg>,
    pub shutdown_done: bool,
    /// The agent closed its stdout.
    pub eof: bool,
    /// Bytes read from the agent so far.
    pub bytes_in: u64,
    /// While false, a send that would block panics instead of reading
    /// (tests of a host that does not read).
    pub read_while_sending: bool,
    /// At most this many bytes per read (a slow host).
    pub read_chunk: Option<usize>,
    /// Sessions whose output is counted in [`Log::output_bytes`] but not
    /// kept (endless floods).
    pub count_only: HashSet<u32>,
    next_id: u32,
}

impl SyncAgent {
    /// `agentd --stdio ARGS`, READY read.
    pub fn start(args: &[&str]) -> SyncAgent {
        SyncAgent::start_with(Opts::plain(args))
    }

    /// The agent started with `opts` (see [`Opts::plain`] for what
    /// [`SyncAgent::start`] uses), READY read.
    pub fn start_with(opts: Opts) -> SyncAgent {
        let (process, to_agent, from_agent) = AgentProcess::spawn_stdio(&opts);
        let checker = Checker::new(Some(process.ready_pid()));
        let conn = Conn::with(from_agent, Host::new(to_agent, Some(SYNC_TIMEOUT)), checker);
        let host_pid = process.host_pid;
        let mut agent = SyncAgent {
            process,
            conn,
            ready: Ready::default(),
            host_pid,
            logs: HashMap::new(),
            finished: HashSet::new(),
            late_errors: Vec::new(),
            pongs: Vec::new(),
            conn_errors: Vec::new(),
            shutdown_done: false,
            eof: false,
            bytes_in: 0,
            read_while_sending: true,
            read_chunk: None,
            count_only: HashSet::new(),
            next_id: 1,
        };
        agent.wait_for("READY", SYNC_TIMEOUT, |a| a.ready.protocol != 0);
        agent
    }

    /// A session id not used before with this agent.
    pub fn new_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The host's read side (the agent's stdout).
    pub fn stdout_raw_fd(&self) -> i32 {
        self.conn.read_fd()
    }

    /// The agent process (its log, /proc views).
    pub fn process(&self) -> &AgentProcess {
        &self.process
    }

    /// Writes bytes to the agent. While the pipe is full it reads what the
    /// agent sends (unless `read_while_sending` is off). Errors (EPIPE once
    /// the agent is gone) are returned.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        let deadline = Instant::now() + SYNC_TIMEOUT;
        let mut off = 0;
        while off < bytes.len() {
            match self.conn.host.write_some(&bytes[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "writing to the agent timed out");
                    assert!(
                        self.read_while_sending,
                        "the agent stopped reading the transport"
                    );
                    if !self.eof && self.conn.read_open() {
                        self.pump(Duration::from_millis(5));
                    } else if let Some(fd) = self.conn.host.raw_fd() {
                        poll_fd(fd, libc::POLLOUT, Duration::from_millis(50));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn send(&mut self, msg: &Message<'_>, id: u32) {
        self.send_raw(&msg.to_bytes(id))
            .expect("write to the agent");
    }

    /// Sends EXEC and returns the new session's id.
    pub fn exec(&mut self, exec: &Exec) -> u32 {
        let id = self.new_id();
        self.exec_id(id, exec);
        id
    }

    /// Sends EXEC, one STDIN and STDIN_CLOSE in a single write, so the
    /// agent reads them together (the session is still starting when its
    /// STDIN arrives). Returns the session's id.
    pub fn exec_with_stdin(&mut self, exec: &Exec, data: &[u8]) -> u32 {
        let id = self.new_id();
        self.logs.entry(id).or_default();
        let mut bytes = Message::Exec(Box::new(exec.clone())).to_bytes(id);
        Message::Stdin(data)
            .encode(id, &mut bytes)
            .expect("the test's frames fit");
        Message::StdinClose
            .encode(id, &mut bytes)
            .expect("the test's frames fit");
        self.send_raw(&bytes).expect("write to the agent");
        id
    }

    pub fn exec_id(&mut self, id: u32, exec: &Exec) {
        self.logs.entry(id).or_default();
        self.send(&Message::Exec(Box::new(exec.clone())), id);
    }

    pub fn stdin(&mut self, id: u32, data: &[u8]) {
        self.send(&Message::Stdin(data), id);
    }

    pub fn close_stdin(&mut self, id: u32) {
        self.send(&Message::StdinClose, id);
    }

    pub fn signal(&mut self, id: u32, signal: i32) {
        self.send(
            &Message::Signal(Signal {
                signal,
                group: true,
                tree: false,
            }),
            id,
        );
    }

    pub fn output_ack(&mut self, id: u32, bytes: u32) {
        self.send(&Message::OutputAck(Ack { bytes }), id);
    }

    /// Writes all of `data` to a session's stdin, never more than the
    /// stdin window unacknowledged.
    pub fn write_stdin_all(&mut self, id: u32, data: &[u8]) {
        let window = u64::from(self.ready.stdin_window);
        let base = self.logs.get(&id).map_or(0, |l| l.acked);
        let mut sent = 0u64;
        for chunk in data.chunks(64 * 1024) {
            let need = sent + chunk.len() as u64;
            self.wait_for("STDIN window", SYNC_TIMEOUT, |a| {
                need - (a.logs.get(&id).map_or(0, |l| l.acked) - base) <= window
            });
            self.stdin(id, chunk);
            sent = need;
        }
    }

    /// Runs one request to its end (EXITED or EXEC_FAILED), stdin closed
    /// right away, and returns what the host saw.
    pub fn run(&mut self, exec: &Exec) -> Log {
        let id = self.exec(exec);
        if exec.stdin {
            self.close_stdin(id);
        }
        self.wait_done(id)
    }

    /// Waits for a session's EXITED or EXEC_FAILED and removes its log.
    pub fn wait_done(&mut self, id: u32) -> Log {
        self.wait_for(&format!("the end of session {id}"), SYNC_TIMEOUT, |a| {
            a.logs.get(&id).is_some_and(Log::done)
        });
        self.take_log(id)
    }

    /// Removes a session's log (its id is never used again).
    pub fn take_log(&mut self, id: u32) -> Log {
        self.finished.insert(id);
        self.logs.remove(&id).expect("a log for the session")
    }

    /// Waits for a session's STARTED; returns its pid.
    pub fn wait_started(&mut self, id: u32) -> i32 {
        self.wait_for(&format!("STARTED of session {id}"), SYNC_TIMEOUT, |a| {
            a.logs.get(&id).is_some_and(|l| l.pid.is_some() || l.done())
        });
        let log = &self.logs[&id];
        log.pid
            .unwrap_or_else(|| panic!("session {id} did not start: {:?}", log.failed))
    }

    /// Sends a PING and waits for its PONG; returns the round trip.
    pub fn ping(&mut self, payload: &[u8]) -> Duration {
        let t = Instant::now();
        let n = self.pongs.len();
        self.send(&Message::Ping(payload), 0);
        self.wait_for("PONG", SYNC_TIMEOUT, |a| a.pongs.len() > n);
        assert_eq!(self.pongs[n].1, payload);
        t.elapsed()
    }

    /// Reads and handles frames until `cond` holds; panics after `timeout`.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&SyncAgent) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(self) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {timeout:?} waiting for {what}"
            );
            assert!(
                !self.eof,
                "the agent closed the transport while waiting for {what}"
            );
            self.pump(left.min(Duration::from_millis(100)));
        }
    }

    /// Waits up to `timeout` for something to read, reads once and handles
    /// every whole frame. Returns whether anything was read.
    pub fn pump(&mut self, timeout: Duration) -> bool {
        if self.eof {
            return false;
        }
        match self.conn.fill(Some(timeout), self.read_chunk) {
            Filled::Bytes(n) => self.bytes_in += n as u64,
            Filled::Eof => {
                self.eof = true;
                return false;
            }
            Filled::Nothing => return false,
        }
        while let Some(frame) = self.conn.next_buffered() {
            let frame = frame.to_owned();
            self.handle(frame);
        }
        true
    }

    /// Records one frame (the connection's checker has passed it).
    fn handle(&mut self, f: OwnedFrame) {
        let msg = Message::decode_from_agent(f.as_frame()).unwrap_or_else(|e| {
            panic!("frame kind {:#x} id {} does not decode: {e}", f.kind, f.id)
        });
        let id = f.id;
        match msg {
            Message::Ready(r) => return self.ready = r,
            Message::Pong(p) => return self.pongs.push((id, p.to_vec())),
            Message::ShutdownDone => {
                self.shutdown_done = true;
                return;
            }
            Message::Error(e) if id == 0 => return self.conn_errors.push(e),
            Message::Error(e) if self.finished.contains(&id) => {
                return self.late_errors.push((id, e))
            }
            _ => {}
        }
        let log = self
            .logs
            .get_mut(&id)
            .unwrap_or_else(|| panic!("{msg:?} for session {id}, which the host never started"));
        match msg {
            Message::Error(e) => log.errors.push(e),
            Message::Started(s) => log.pid = Some(s.pid as i32),
            Message::ExecFailed(x) => log.failed = Some(x),
            Message::Stdout(p) | Message::Stderr(p) => {
                log.output_bytes += p.len() as u64;
                if self.count_only.contains(&id) {
                    // Counted only.
                } else if f.kind == Kind::Stdout as u8 {
                    log.stdout.extend_from_slice(p);
                    log.stdout_frames += 1;
                } else {
                    log.stderr.extend_from_slice(p);
                }
            }
            Message::StdinAck(a) => log.acked += u64::from(a.bytes),
            Message::Exited(x) => log.exited = Some(x),
            other => panic!("unexpected {other:?} for session {id}"),
        }
    }

    /// Reads until the agent closes its stdout.
    pub fn read_to_eof(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the agent did not close the transport");
            self.pump(left.min(Duration::from_millis(100)));
        }
    }

    /// Closes the host's write side (the agent reads end of file).
    pub fn close_write(&mut self) {
        self.conn.host.close();
    }

    /// Closes the host's read side (the agent's writes fail with EPIPE).
    pub fn close_read(&mut self) {
        self.conn.close_read();
    }

    /// Waits for the agent process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.process.wait_exit(timeout)
    }

    /// VmRSS of the agent in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.process.rss_kib()
    }

    pub fn fd_count(&self) -> usize {
        self.process.fd_count()
    }
}
