//! The raw host of tests/reliability.rs and tests/security.rs: `agentd
//! --stdio` over two pipes, driven frame by frame, so a test decides when
//! the host reads (and when it stops), and every frame the agent sends is
//! checked against the contract as it arrives. Plus /proc helpers: RSS, fd
//! counts, children, zombies, the processes of a session.
//!
//! Every wait is bounded; a test that times out panics with what it was
//! waiting for. Dropping an [`Agent`] kills every session's process group
//! and the agent.

#![allow(dead_code)] // each test crate uses a different subset

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use agentd::codec::{Decoder, OwnedFrame, MAX_OUTPUT_PAYLOAD};
use agentd::messages::{Ack, ErrorMsg, Exec, ExecFailed, Exited, Kind, Message, Ready, Signal};

pub const AGENTD: &str = env!("CARGO_BIN_EXE_agentd");

/// The longest any single wait in these tests may take.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// What the host saw of one session.
#[derive(Debug, Default, Clone)]
pub struct Log {
    pub pid: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_frames: usize,
    /// STDOUT and STDERR payload bytes, also for a session whose output is
    /// only counted (see [`Agent::count_only`]).
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

pub struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<ChildStdout>,
    dec: Decoder,
    pub ready: Ready,
    pub pid: i32,
    pub logs: HashMap<u32, Log>,
    /// Sessions whose log was taken: an ERROR may still come for them
    /// (a frame the host sent before it saw EXITED).
    pub finished: HashSet<u32>,
    pub late_errors: Vec<(u32, ErrorMsg)>,
    /// The pids of sessions STARTED and not yet EXITED: their groups are
    /// killed on drop. Only those: once the agent has reaped a leader its
    /// pid is free (pid_max is often 32768), and killing that process
    /// group later could hit a stranger's, another test's session in this
    /// very process among them.
    pub started: HashSet<i32>,
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

/// A reader that hands out at most `.1` bytes per read.
struct Limited<'a, R>(&'a mut R, usize);

impl<R: Read> Read for Limited<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.1);
        self.0.read(&mut buf[..n])
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an fd this process owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        assert!(flags >= 0);
        assert!(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0);
    }
}

/// poll(2) on one fd; true if it is ready for `events` (or hung up).
pub fn poll_fd(fd: RawFd, events: libc::c_short, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0 && pfd.revents != 0
}

impl Agent {
    /// `agentd --stdio ARGS`, READY read.
    pub fn start(args: &[&str]) -> Agent {
        let mut cmd = Command::new(AGENTD);
        cmd.arg("--stdio").args(args);
        Agent::start_cmd(cmd)
    }

    /// Starts `cmd` (an agent in stdio mode) with piped stdin/stdout.
    pub fn start_cmd(mut cmd: Command) -> Agent {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("start agentd");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        set_nonblocking(stdin.as_raw_fd());
        let pid = child.id() as i32;
        let mut agent = Agent {
            child,
            stdin: Some(stdin),
            stdout: Some(stdout),
            dec: Decoder::new(),
            ready: Ready::default(),
            pid,
            logs: HashMap::new(),
            finished: HashSet::new(),
            late_errors: Vec::new(),
            started: HashSet::new(),
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
        agent.wait_for("READY", TIMEOUT, |a| a.ready.protocol != 0);
        assert_eq!(agent.ready.protocol, 1);
        assert_eq!(agent.ready.pid as i32, pid);
        agent
    }

    pub fn fresh_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub fn stdout_raw_fd(&self) -> RawFd {
        self.stdout_fd()
    }

    fn stdout_fd(&self) -> RawFd {
        self.stdout
            .as_ref()
            .expect("host read side open")
            .as_raw_fd()
    }

    /// Writes bytes to the agent. While the pipe is full it reads what the
    /// agent sends (unless `read_while_sending` is off). Errors (EPIPE once
    /// the agent is gone) are returned.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        let mut off = 0;
        while off < bytes.len() {
            let fd = self
                .stdin
                .as_ref()
                .expect("host write side open")
                .as_raw_fd();
            let rest = &bytes[off..];
            // SAFETY: writing from a valid slice.
            let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
            if n >= 0 {
                off += n as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "writing to the agent timed out");
                    if self.read_while_sending && self.stdout.is_some() && !self.eof {
                        self.pump(Duration::from_millis(5));
                    } else {
                        assert!(
                            self.read_while_sending,
                            "the agent stopped reading the transport"
                        );
                        poll_fd(fd, libc::POLLOUT, Duration::from_millis(50));
                    }
                }
                _ => return Err(e),
            }
        }
        Ok(())
    }

    pub fn send(&mut self, id: u32, msg: &Message<'_>) {
        self.send_raw(&msg.to_bytes(id))
            .expect("write to the agent");
    }

    /// Sends EXEC and returns the new session's id.
    pub fn exec(&mut self, exec: &Exec) -> u32 {
        let id = self.fresh_id();
        self.exec_id(id, exec);
        id
    }

    /// Sends EXEC, one STDIN and STDIN_CLOSE in a single write, so the
    /// agent reads them together (the session is still starting when its
    /// STDIN arrives). Returns the session's id.
    pub fn exec_with_stdin(&mut self, exec: &Exec, data: &[u8]) -> u32 {
        let id = self.fresh_id();
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
        self.send(id, &Message::Exec(Box::new(exec.clone())));
    }

    pub fn stdin(&mut self, id: u32, data: &[u8]) {
        self.send(id, &Message::Stdin(data));
    }

    pub fn close_stdin(&mut self, id: u32) {
        self.send(id, &Message::StdinClose);
    }

    pub fn signal(&mut self, id: u32, signal: i32) {
        self.send(
            id,
            &Message::Signal(Signal {
                signal,
                group: true,
                tree: false,
            }),
        );
    }

    pub fn output_ack(&mut self, id: u32, bytes: u32) {
        self.send(id, &Message::OutputAck(Ack { bytes }));
    }

    /// Writes all of `data` to a session's stdin, never more than the
    /// stdin window unacknowledged.
    pub fn write_stdin_all(&mut self, id: u32, data: &[u8]) {
        let window = u64::from(self.ready.stdin_window);
        let base = self.logs.get(&id).map_or(0, |l| l.acked);
        let mut sent = 0u64;
        for chunk in data.chunks(64 * 1024) {
            let need = sent + chunk.len() as u64;
            self.wait_for("STDIN window", TIMEOUT, |a| {
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
        self.wait_for(&format!("the end of session {id}"), TIMEOUT, |a| {
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
        self.wait_for(&format!("STARTED of session {id}"), TIMEOUT, |a| {
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
        self.send(0, &Message::Ping(payload));
        self.wait_for("PONG", TIMEOUT, |a| a.pongs.len() > n);
        assert_eq!(self.pongs[n].1, payload);
        t.elapsed()
    }

    /// Reads and handles frames until `cond` holds; panics after `timeout`.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Agent) -> bool,
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
        if self.eof || self.stdout.is_none() {
            return false;
        }
        if !poll_fd(self.stdout_fd(), libc::POLLIN, timeout) {
            return false;
        }
        let stdout = self.stdout.as_mut().unwrap();
        let n = loop {
            let r = match self.read_chunk {
                Some(max) => self.dec.read_from(&mut Limited(&mut *stdout, max)),
                None => self.dec.read_from(stdout),
            };
            match r {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("reading from the agent: {e}"),
            }
        };
        if n == 0 {
            assert!(
                self.dec.is_at_boundary(),
                "the agent's stream ended inside a frame"
            );
            self.eof = true;
            return false;
        }
        self.bytes_in += n as u64;
        while let Some(item) = self.dec.next_frame() {
            let frame = item.expect("the agent sends well-formed frames").to_owned();
            self.handle(frame);
        }
        true
    }

    /// Checks one frame against the contract and records it.
    fn handle(&mut self, f: OwnedFrame) {
        assert!(
            !self.shutdown_done,
            "a frame after SHUTDOWN_DONE: kind {:#x} id {}",
            f.kind, f.id
        );
        let msg = Message::decode_from_agent(f.as_frame()).unwrap_or_else(|e| {
            panic!("frame kind {:#x} id {} does not decode: {e}", f.kind, f.id)
        });
        let id = f.id;
        if let Message::Ready(r) = msg {
            assert_eq!(self.ready.protocol, 0, "a second READY on stdio");
            self.ready = r;
            return;
        }
        match msg {
            Message::Pong(p) => return self.pongs.push((id, p.to_vec())),
            Message::ShutdownDone => {
                assert_eq!(id, 0);
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
        let live = log.pid.is_some() && log.exited.is_none();
        match msg {
            Message::Error(e) => log.errors.push(e),
            Message::Started(s) => {
                assert!(log.pid.is_none() && !log.done(), "second STARTED for {id}");
                log.pid = Some(s.pid as i32);
                self.started.insert(s.pid as i32);
            }
            Message::ExecFailed(x) => {
                assert!(
                    log.pid.is_none() && !log.done(),
                    "EXEC_FAILED for {id} after {log:?}"
                );
                log.failed = Some(x);
            }
            Message::Stdout(p) | Message::Stderr(p) => {
                assert!(live, "output for session {id} outside STARTED..EXITED");
                assert!(!p.is_empty() && p.len() <= MAX_OUTPUT_PAYLOAD);
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
            Message::StdinAck(a) => {
                assert!(live, "STDIN_ACK for session {id} outside STARTED..EXITED");
                log.acked += u64::from(a.bytes);
            }
            Message::Exited(x) => {
                assert!(live, "EXITED for session {id} outside STARTED..EXITED");
                assert!(x.code.is_some() != x.signal.is_some());
                if let Some(pid) = log.pid {
                    self.started.remove(&pid);
                }
                log.exited = Some(x);
            }
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
        self.stdin = None;
    }

    /// Closes the host's read side (the agent's writes fail with EPIPE).
    pub fn close_read(&mut self) {
        self.stdout = None;
    }

    /// Waits for the agent process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// VmRSS of the agent in KiB.
    pub fn rss_kib(&self) -> u64 {
        status_kib(self.pid, "VmRSS").expect("agent VmRSS")
    }

    pub fn fd_count(&self) -> usize {
        fd_count(self.pid)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        for &pid in &self.started {
            kill(-pid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// kill(2), ignoring errors.
pub fn kill(target: i32, sig: i32) {
    // SAFETY: kill with plain integers.
    unsafe { libc::kill(target, sig) };
}

/// A numeric field of /proc/PID/status in KiB (e.g. VmRSS, VmHWM).
pub fn status_kib(pid: i32, field: &str) -> Option<u64> {
    status_field(pid, field)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The value of a /proc/PID/status line, trimmed.
pub fn status_field(pid: i32, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// The value of `field` in a /proc/self/status text.
pub fn field_of<'a>(status: &'a str, field: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The open fd numbers of a process.
pub fn fds_of(pid: i32) -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc/PID/fd")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    fds
}

/// (pid, ppid, state, session id, process group) of every process.
#[derive(Debug, Clone, Copy)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    pub state: char,
    pub pgrp: i32,
    pub sid: i32,
}

pub fn proc_stat(pid: i32) -> Option<Proc> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command is in parentheses and may hold anything: parse after
    // the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(Proc {
        pid,
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        sid: f.get(3)?.parse().ok()?,
    })
}

pub fn all_procs() -> Vec<Proc> {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter_map(proc_stat)
        .collect()
}

/// Processes (zombies included) whose session id is one of `sids`.
pub fn procs_in_sessions(sids: &[i32]) -> Vec<Proc> {
    let set: HashSet<i32> = sids.iter().copied().collect();
    all_procs()
        .into_iter()
        .filter(|p| set.contains(&p.sid))
        .collect()
}

/// Children of `pid` that are zombies.
pub fn zombie_children(pid: i32) -> Vec<i32> {
    all_procs()
        .into_iter()
        .filter(|p| p.ppid == pid && p.state == 'Z')
        .map(|p| p.pid)
        .collect()
}

pub fn children_of(pid: i32) -> Vec<i32> {
    all_procs()
        .into_iter()
        .filter(|p| p.ppid == pid)
        .map(|p| p.pid)
        .collect()
}

/// Waits until `cond` holds, polling every 10 ms; false after `timeout`.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILLs every process in the given sessions until none is left.
pub fn kill_sessions(sids: &[i32]) {
    let ok = eventually(Duration::from_secs(10), || {
        let left = procs_in_sessions(sids);
        for p in &left {
            if p.state != 'Z' {
                kill(p.pid, libc::SIGKILL);
            }
        }
        left.iter().all(|p| p.state == 'Z')
    });
    assert!(ok, "processes of sessions {sids:?} survive SIGKILL");
}

pub fn exec(cmd: &str, args: &[&str]) -> Exec {
    let mut e = Exec::new(cmd);
    e.args = args.iter().map(|s| s.to_string()).collect();
    e
}

pub fn sh(script: &str) -> Exec {
    exec("sh", &["-c", script])
}

/// The output of `seq 1 n`.
pub fn seq_output(n: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 1..=n {
        out.extend_from_slice(i.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

/// Reads a file that may not exist yet.
pub fn read_opt(path: &str) -> Option<String> {
    let mut s = String::new();
    std::fs::File::open(path)
        .ok()?
        .read_to_string(&mut s)
        .ok()?;
    Some(s)
}
