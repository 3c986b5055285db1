//! One session: a child process, its stdio fds and the flow control around
//! them, as a state machine the loop drives.
//!
//! The states, and what each holds ([`State`]; docs/DESIGN.md draws them):
//! - **starting**: cloned, not yet known to have exec'd; holds the status
//!   pipe and the SIGNALs that arrived meanwhile (coalesced, delivered
//!   after STARTED). Nothing is read or written or acknowledged: the status
//!   pipe decides between STARTED and EXEC_FAILED first.
//! - **running**: output is read as the child writes it, within the output
//!   window and the link's high-water mark; STDIN is queued and written as
//!   the child reads.
//! - **lingering**: reaped, with its exit status; an output stream is still
//!   open (data in flight, or a descendant holds it). It has a timer for
//!   `linger_ms` after the reap; when that fires every open stream gets its
//!   final pass (read until it would block, at most
//!   [`FINAL_READ_LIMIT`](super::stream::FINAL_READ_LIMIT) more), then
//!   counts as ended.
//! - **finished**: reaped and every stream ended (and any replay sent):
//!   EXITED goes to the host that has it, the fds are closed and the id is
//!   free. The finished session is kept as a record (its exit and replay
//!   rings) for LIST and a later ATTACH, a bounded number of them.
//!
//! Orthogonal to its state, a session has an **owner**, the (link, id) of
//! the host connection that started or last attached it, or none: it is
//! **detached** (its host went away from a listening transport, or it was
//! started detached). A detached session sends no frames; its output goes
//! to its replay rings only, so it never blocks.
//!
//! The streams themselves are [`Outflow`]s (stdout, stderr) sharing one
//! [`Window`], and an [`Inflow`] (stdin). The session never writes to a
//! transport: its frames go to the queue of the link that owns it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry};

use crate::messages::{Exited, Kind};

use super::cgroups::SessionCgroup;
use super::spawn::{Child, ChildStdio, StartStatus};
use super::stream::{
    Acks, Close, Flushed, Inflow, InflowError, LinkOut, Outflow, PayloadSource, Pumped,
    ReplayStart, Sink, Window,
};
use super::sys::send_signal;
use super::timers::{Timer, TimerKey, Timers};
use super::token::{SessionFd, Source};

/// How much output one session reads in one turn of the loop before the
/// others get theirs (see [`Session::service`]).
const READ_TURN: usize = 1024 * 1024;

/// Where a session is in its life, with what it has in that state.
#[derive(Debug)]
enum State {
    Starting {
        status: StartStatus,
        /// SIGNALs (signal, group) that arrived while starting: delivered
        /// after STARTED, dropped on EXEC_FAILED, so a signal cannot make
        /// a program that never ran look started. Each distinct pair is
        /// held once (see [`hold_signal`]).
        held: Vec<(libc::c_int, Target)>,
    },
    Running,
    Lingering {
        exit: Exited,
        /// The linger deadline; `None` once it has passed (the final pass).
        timer: Option<TimerKey>,
    },
    Finished {
        exit: Exited,
        /// A host has received its EXITED.
        seen: bool,
    },
}

/// Why reading a session's output stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadStop {
    /// Every open stream would block or has ended.
    Idle,
    /// The output window is used up; OUTPUT_ACK resumes.
    Window,
    /// The turn's budget is spent: the session yields to the others and is
    /// resumed after them, as under backpressure.
    Yield,
    /// The link's queue is over its high-water mark; its draining resumes.
    Backpressure,
}

impl ReadStop {
    /// Whether the session must be resumed by the loop (it has more to
    /// read, and no event will say so).
    pub(crate) fn stalls(self) -> bool {
        matches!(self, ReadStop::Yield | ReadStop::Backpressure)
    }
}

#[derive(Debug)]
enum Fds {
    Pty {
        master: OwnedFd,
    },
    /// A finished session's, all closed.
    Closed,
    Pipes {
        stdin: Option<OwnedFd>,
        stdout: Option<OwnedFd>,
        stderr: Option<OwnedFd>,
    },
}

/// The host connection a session belongs to, and its id there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owner {
    pub(crate) link: usize,
    pub(crate) id: u32,
}

/// What LIST says of a session besides its state.
#[derive(Debug, Clone)]
pub(crate) struct Info {
    pub(crate) tag: Option<String>,
    pub(crate) cmd: String,
    pub(crate) args: Vec<String>,
    pub(crate) user: Option<String>,
    pub(crate) started_ms: u64,
}

/// What the loop needs to know to make a session.
#[derive(Debug, Clone)]
pub(crate) struct SessionSpec {
    pub(crate) owner: Owner,
    /// The agent-wide number of the session (never reused).
    pub(crate) seq: u64,
    pub(crate) output_window: u32,
    pub(crate) linger_ms: u32,
    /// Bytes of each output stream kept for replay.
    pub(crate) replay_bytes: u32,
    pub(crate) info: Info,
    /// `timeout_ms` and `kill_grace_ms`, set at STARTED.
    pub(crate) timeout: Option<(u32, u32)>,
    /// Detached once STARTED has gone out.
    pub(crate) detach: bool,
}

/// A session's deadline (`timeout_ms`): SIGTERM to its tree when it
/// passes, SIGKILL `kill_grace` later.
#[derive(Debug, Default)]
struct Deadline {
    /// `timeout_ms` and `kill_grace_ms`, until STARTED sets the timer.
    pending: Option<(u32, u32)>,
    /// Detach at STARTED (EXEC's `detach`).
    detach: bool,
    timer: Option<TimerKey>,
    kill_grace_ms: u32,
    /// The deadline passed: EXITED says `timed_out`.
    passed: bool,
}

#[derive(Debug)]
pub(crate) struct Session {
    owner: Option<Owner>,
    seq: u64,
    info: Info,
    deadline: Deadline,
    pid: libc::pid_t,
    state: State,
    fds: Fds,
    out: [Outflow; 2],
    stdin: Inflow,
    window: Window,
    linger_ms: u32,
    /// On a pseudo-terminal (kept when its fds are gone).
    tty: bool,
    /// On its link's list of sessions to resume.
    stalled: bool,
    /// Output the host cannot get (a shutdown past its grace) is read and
    /// dropped, and counted in EXITED's `output_dropped`.
    discard: bool,
    /// Its cgroup, where the agent has a cgroup root.
    cgroup: Option<SessionCgroup>,
}

/// Whom a host's SIGNAL is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// The session's process alone.
    Process,
    /// Its process group.
    Group,
    /// Every process in its cgroup (SIGNAL `tree`).
    Tree,
}

/// Adds (signal, target) to `held` unless it is there already, in the
/// order of first arrival. A host may send any number of SIGNALs before the
/// program starts (and it may take long to: a child stuck in `chdir` on a
/// hung filesystem); each costs no reply, so nothing else bounds them.
/// Coalesced, they take at most 65 × 3 entries. A repeated signal is
/// delivered once, like a standard signal already pending (real-time
/// signals, which the kernel would queue, are coalesced too).
fn hold_signal(held: &mut Vec<(libc::c_int, Target)>, signal: libc::c_int, target: Target) {
    if !held.contains(&(signal, target)) {
        held.push((signal, target));
    }
}

fn register(registry: &Registry, fd: RawFd, source: Source, interest: Interest) -> io::Result<()> {
    registry.register(&mut SourceFd(&fd), source.token(), interest)
}

fn deregister(registry: &Registry, fd: RawFd) {
    // Closing an fd removes it from epoll only when no other copy of the
    // open file exists; a child between clone and exec holds copies, so
    // deregister explicitly. Failure means it was not registered.
    let _ = registry.deregister(&mut SourceFd(&fd));
}

impl Session {
    /// Registers a new child's fds and makes its session, in the starting
    /// state. On failure the child's start status comes back with the
    /// error: it owns the memory the child may still run on, to be kept
    /// until the child is reaped.
    pub(crate) fn new(
        spec: SessionSpec,
        child: Child,
        key: usize,
        registry: &Registry,
    ) -> Result<Session, (io::Error, StartStatus)> {
        let Child { pid, stdio, status } = child;
        let has_stdin = match &stdio {
            ChildStdio::Pty { stdin, .. } => *stdin,
            ChildStdio::Pipes { stdin, .. } => stdin.is_some(),
        };
        let start = Source::Session(key, SessionFd::Start);
        if let Err(e) = register(registry, status.fd(), start, Interest::READABLE) {
            return Err((e, status));
        }
        let fds = match register_stdio(stdio, key, registry) {
            Ok(fds) => fds,
            Err(e) => {
                deregister(registry, status.fd());
                return Err((e, status));
            }
        };
        let tty = matches!(fds, Fds::Pty { .. });
        let (stdout, stderr) = (Kind::Stdout as u8, Kind::Stderr as u8);
        let mut out = if tty {
            // A terminal has no separate stderr.
            [Outflow::new(stdout, false, true), Outflow::none(stderr)]
        } else {
            [
                Outflow::new(stdout, true, false),
                Outflow::new(stderr, true, false),
            ]
        };
        for o in &mut out {
            o.keep(spec.replay_bytes);
        }
        Ok(Session {
            owner: Some(spec.owner),
            seq: spec.seq,
            info: spec.info,
            deadline: Deadline {
                pending: spec.timeout,
                detach: spec.detach,
                ..Deadline::default()
            },
            pid,
            state: State::Starting {
                status,
                held: Vec::new(),
            },
            fds,
            out,
            stdin: Inflow::new(if tty { Close::TerminalEof } else { Close::Fd }, has_stdin),
            window: Window::new(spec.output_window),
            linger_ms: spec.linger_ms,
            tty,
            stalled: false,
            discard: false,
            cgroup: None,
        })
    }

    /// The host connection that has it, with its id there.
    pub(crate) fn owner(&self) -> Option<Owner> {
        self.owner
    }

    /// Detaches it: no host has it any more; its output goes to its rings.
    pub(crate) fn detach(&mut self) {
        self.owner = None;
        self.stdin.rebase();
        self.forget_stall();
    }

    /// A stall on the link that had it no longer holds it back: whatever
    /// list it is on, a stall on the next link (or a yield while detached)
    /// must be registered afresh, or the session would wait for a link
    /// that no longer drains for it (found by the VM suite's t15 over
    /// vsock: sessions stuck after ATTACHED).
    fn forget_stall(&mut self) {
        self.stalled = false;
    }

    /// A new host has it from now on, with `output_window`: its streams
    /// replay from `from` (stdout, stderr) or only their `tail`.
    pub(crate) fn attach(
        &mut self,
        owner: Owner,
        output_window: u32,
        from: [Option<u64>; 2],
        tail: Option<u64>,
    ) -> [ReplayStart; 2] {
        self.owner = Some(owner);
        self.stdin.rebase();
        self.forget_stall();
        self.window = Window::new(output_window);
        let starts = [
            self.out[0].replay_from(from[0], tail),
            self.out[1].replay_from(from[1], tail),
        ];
        for o in &mut self.out {
            o.recheck();
        }
        starts
    }

    pub(crate) fn info(&self) -> &Info {
        &self.info
    }

    /// Bytes each stream has produced.
    pub(crate) fn totals(&self) -> [u64; 2] {
        [self.out[0].total(), self.out[1].total()]
    }

    /// `starting`, `running`, `lingering` or `exited`, as LIST says it.
    pub(crate) fn state_name(&self) -> &'static str {
        match self.state {
            State::Starting { .. } => "starting",
            State::Running => "running",
            State::Lingering { .. } => "lingering",
            State::Finished { .. } => "exited",
        }
    }

    /// How it ended, once it has.
    pub(crate) fn exit(&self) -> Option<Exited> {
        match &self.state {
            State::Lingering { exit, .. } | State::Finished { exit, .. } => Some(*exit),
            _ => None,
        }
    }

    /// Whether a host has received its EXITED.
    pub(crate) fn exit_seen(&self) -> bool {
        matches!(self.state, State::Finished { seen: true, .. })
    }

    /// Whether the host may still send STDIN.
    pub(crate) fn stdin_open(&self) -> bool {
        !self.is_finished() && self.stdin.is_open()
    }

    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    pub(crate) fn pid(&self) -> libc::pid_t {
        self.pid
    }

    pub(crate) fn is_starting(&self) -> bool {
        matches!(self.state, State::Starting { .. })
    }

    /// Reaped (lingering or finished).
    pub(crate) fn is_reaped(&self) -> bool {
        matches!(self.state, State::Lingering { .. } | State::Finished { .. })
    }

    pub(crate) fn is_finished(&self) -> bool {
        matches!(self.state, State::Finished { .. })
    }

    pub(crate) fn is_tty(&self) -> bool {
        self.tty
    }

    /// The PTY master, for RESIZE.
    pub(crate) fn pty_fd(&self) -> Option<RawFd> {
        match &self.fds {
            Fds::Pty { master } => Some(master.as_raw_fd()),
            Fds::Pipes { .. } | Fds::Closed => None,
        }
    }

    /// Notes that it is on its link's list of sessions to resume: true if
    /// it was not there yet (the caller puts it there).
    pub(crate) fn mark_stalled(&mut self) -> bool {
        !std::mem::replace(&mut self.stalled, true)
    }

    /// Notes that it came off that list: true if it was on it (the caller
    /// services it).
    pub(crate) fn take_stalled(&mut self) -> bool {
        std::mem::take(&mut self.stalled)
    }

    /// Whether its output is being dropped (a shutdown past its grace).
    pub(crate) fn is_discarding(&self) -> bool {
        self.discard
    }

    /// The status pipe of a starting session.
    pub(crate) fn start_status(&self) -> Option<&StartStatus> {
        match &self.state {
            State::Starting { status, .. } => Some(status),
            _ => None,
        }
    }

    /// The child exec'd: the session runs. Deregisters the status pipe,
    /// delivers the SIGNALs held until now and sets the deadline. Returns
    /// whether it is to be detached now (EXEC's `detach`).
    pub(crate) fn started(
        &mut self,
        registry: &Registry,
        key: usize,
        now: Instant,
        timers: &mut Timers,
    ) -> bool {
        let State::Starting { status, held } = std::mem::replace(&mut self.state, State::Running)
        else {
            return false;
        };
        deregister(registry, status.fd());
        for (signal, target) in held {
            self.deliver(signal, target);
        }
        if let Some((timeout, grace)) = self.deadline.pending.take() {
            self.set_deadline(timeout, grace, key, now, timers);
        }
        self.deadline.detach
    }

    /// A host's SIGNAL: held while starting (see [`hold_signal`]), else
    /// delivered.
    pub(crate) fn signal(&mut self, signal: libc::c_int, target: Target) {
        match &mut self.state {
            State::Starting { held, .. } => hold_signal(held, signal, target),
            _ => self.deliver(signal, target),
        }
    }

    fn deliver(&self, signal: libc::c_int, target: Target) {
        if self.is_finished() {
            // Its process group may be someone else's by now.
            return;
        }
        match target {
            // The group outlives its leader while descendants remain, so it
            // is signalled after reaping too.
            Target::Group => send_signal(-self.pid, signal),
            // Once reaped the pid may belong to someone else.
            Target::Process if !self.is_reaped() => send_signal(self.pid, signal),
            Target::Process => {}
            Target::Tree => match &self.cgroup {
                Some(cg) => cg.signal(signal),
                None => send_signal(-self.pid, signal),
            },
        }
    }

    /// Signals its whole tree: the cgroup where it has one, and the
    /// process group, and the process itself while it may not have called
    /// setsid yet (still starting). What deadlines and shutdowns use.
    pub(crate) fn signal_group(&self, signal: libc::c_int) {
        if self.is_finished() {
            return;
        }
        if let Some(cg) = &self.cgroup {
            cg.signal(signal);
        }
        send_signal(-self.pid, signal);
        if self.is_starting() {
            send_signal(self.pid, signal);
        }
    }

    /// Whether it has a cgroup of its own (SIGNAL `tree` needs one).
    pub(crate) fn has_cgroup(&self) -> bool {
        self.cgroup.is_some()
    }

    /// Gives it its cgroup (the child is in it already).
    pub(crate) fn set_cgroup(&mut self, cg: SessionCgroup) {
        self.cgroup = Some(cg);
    }

    /// Its cgroup, whatever its state: the agent is exiting.
    pub(crate) fn release_cgroup(&mut self) -> Option<SessionCgroup> {
        self.cgroup.take()
    }

    /// Its cgroup, once it has finished (to be removed when empty).
    pub(crate) fn take_cgroup(&mut self) -> Option<SessionCgroup> {
        if self.is_finished() {
            self.cgroup.take()
        } else {
            None
        }
    }

    /// A readiness event for one of this session's fds. `readable` includes
    /// hang-up and error: the next read reports what happened.
    pub(crate) fn on_event(&mut self, fd: SessionFd, readable: bool, writable: bool) {
        match fd {
            // The loop handles the status pipe itself.
            SessionFd::Start => {}
            SessionFd::Stdin => self.stdin.on_writable(),
            SessionFd::Stdout | SessionFd::Stderr => {
                if readable {
                    self.out[fd as usize - 1].on_readable();
                }
                if self.is_tty() && writable {
                    self.stdin.on_writable();
                }
            }
        }
    }

    fn out_fd(&self, i: usize) -> Option<RawFd> {
        match (&self.fds, i) {
            (Fds::Pty { master }, 0) => Some(master.as_raw_fd()),
            (Fds::Pty { .. }, _) => None,
            (Fds::Pipes { stdout, .. }, 0) => stdout.as_ref().map(AsRawFd::as_raw_fd),
            (Fds::Pipes { stderr, .. }, _) => stderr.as_ref().map(AsRawFd::as_raw_fd),
            (Fds::Closed, _) => None,
        }
    }

    /// The fd STDIN is written to now: none while starting (nothing is
    /// written before STARTED) or once the input side is closed.
    fn in_fd(&self) -> Option<RawFd> {
        if self.is_starting() {
            return None;
        }
        match &self.fds {
            Fds::Pty { master } => Some(master.as_raw_fd()),
            Fds::Pipes { stdin, .. } => stdin.as_ref().map(AsRawFd::as_raw_fd),
            Fds::Closed => None,
        }
    }

    fn acks<'a>(&self, link: Option<&'a mut Vec<u8>>) -> Acks<'a> {
        Acks {
            out: link.filter(|_| self.owner.is_some()),
            kind: Kind::StdinAck as u8,
            id: self.owner.map_or(0, |o| o.id),
        }
    }

    /// Sets its deadline: `timeout_ms` from now.
    pub(crate) fn set_deadline(
        &mut self,
        timeout_ms: u32,
        kill_grace_ms: u32,
        key: usize,
        now: Instant,
        timers: &mut Timers,
    ) {
        let at = now + Duration::from_millis(u64::from(timeout_ms));
        self.deadline.timer = Some(timers.add(at, Timer::Deadline { key, seq: self.seq }));
        self.deadline.kill_grace_ms = kill_grace_ms;
    }

    /// Its deadline passed: SIGTERM to its tree now, SIGKILL after the
    /// grace (a second timer).
    pub(crate) fn deadline_passed(&mut self, key: usize, now: Instant, timers: &mut Timers) {
        if self.is_reaped() && self.is_finished() {
            return;
        }
        self.deadline.passed = true;
        self.signal_group(libc::SIGTERM);
        let at = now + Duration::from_millis(u64::from(self.deadline.kill_grace_ms));
        self.deadline.timer = Some(timers.add(at, Timer::DeadlineKill { key, seq: self.seq }));
    }

    /// The grace after the deadline is over: SIGKILL to its tree.
    pub(crate) fn deadline_kill(&mut self) {
        self.deadline.timer = None;
        if !self.is_finished() {
            self.signal_group(libc::SIGKILL);
        }
    }

    /// What the input side asked for: a pipe whose input is over is closed
    /// (its reader's end of file); a terminal keeps its master.
    fn after_input(&mut self, flushed: Flushed, registry: &Registry) {
        if flushed == Flushed::Done {
            if let Fds::Pipes { stdin, .. } = &mut self.fds {
                if let Some(fd) = stdin.take() {
                    deregister(registry, fd.as_raw_fd());
                }
            }
        }
    }

    /// STDIN from the host.
    pub(crate) fn push_stdin(
        &mut self,
        data: &[u8],
        window: u32,
        frames: Option<&mut Vec<u8>>,
        registry: &Registry,
    ) -> Result<(), InflowError> {
        let fd = self.in_fd();
        let mut acks = self.acks(frames);
        let flushed = self.stdin.push(data, window, fd, &mut acks)?;
        self.after_input(flushed, registry);
        Ok(())
    }

    /// STDIN_CLOSE from the host.
    pub(crate) fn close_stdin(
        &mut self,
        frames: Option<&mut Vec<u8>>,
        registry: &Registry,
    ) -> Result<(), InflowError> {
        let fd = self.in_fd();
        let mut acks = self.acks(frames);
        let flushed = self.stdin.close(fd, &mut acks)?;
        self.after_input(flushed, registry);
        Ok(())
    }

    /// Whether a STDIN frame with a `len`-byte payload can stream from the
    /// transport straight into this session's stdin pipe: the session is
    /// started, on pipes, its stdin open with nothing queued, and the whole
    /// frame fits the window.
    pub(crate) fn can_stream_stdin(&self, len: usize, window: u32) -> bool {
        !self.is_tty() && self.in_fd().is_some() && self.stdin.can_stream(len, window)
    }

    /// Accepts a STDIN frame of `len` bytes that streams, with `head`, the
    /// part of its payload already read (see [`Inflow::begin_stream`]).
    pub(crate) fn begin_stdin_stream(
        &mut self,
        len: usize,
        head: &[u8],
        frames: Option<&mut Vec<u8>>,
        registry: &Registry,
    ) {
        let Some(fd) = self.in_fd() else { return };
        let mut acks = self.acks(frames);
        let flushed = self.stdin.begin_stream(len, head, fd, &mut acks);
        self.after_input(flushed, registry);
    }

    /// Moves more of a streaming STDIN payload (see [`Inflow::stream_from`]).
    pub(crate) fn stream_stdin(
        &mut self,
        src: &mut dyn PayloadSource,
        left: usize,
        frames: Option<&mut Vec<u8>>,
        registry: &Registry,
    ) -> io::Result<usize> {
        let fd = self.in_fd();
        let mut acks = self.acks(frames);
        let (n, flushed) = self.stdin.stream_from(src, left, fd, &mut acks)?;
        self.after_input(flushed, registry);
        Ok(n)
    }

    /// OUTPUT_ACK: gives back window (never more than the session was
    /// started with).
    pub(crate) fn ack_output(&mut self, bytes: u32) {
        self.window.ack(bytes);
    }

    /// Does whatever the session can do now: write queued STDIN, read
    /// output into `link`, and become finished when it is done. A starting
    /// session does nothing (STARTED comes first).
    pub(crate) fn service(
        &mut self,
        mut link: Option<&mut LinkOut<'_>>,
        registry: &Registry,
        timers: &mut Timers,
    ) -> ReadStop {
        if self.is_starting() {
            return ReadStop::Idle;
        }
        if let Some(fd) = self.in_fd() {
            let frames = link.as_deref_mut().map(LinkOut::frames);
            let mut acks = self.acks(frames);
            let flushed = self.stdin.flush(fd, &mut acks);
            self.after_input(flushed, registry);
        }
        let stop = self.read_output(link, registry);
        if let State::Lingering { exit, timer } = self.state {
            if self.out.iter().all(Outflow::is_ended) {
                if let Some(t) = timer {
                    // Every stream ended before the linger time ran out.
                    timers.cancel(t);
                }
                self.state = State::Lingering { exit, timer: None };
            }
        }
        stop
    }

    /// Reaped, every stream at its end and any replay sent: what is left is
    /// to send EXITED (if a host has it) and keep the record.
    pub(crate) fn is_done(&self) -> bool {
        matches!(
            self.state,
            State::Lingering { timer: None, .. } | State::Finished { .. }
        ) && self.out.iter().all(Outflow::is_done)
            && self.out.iter().all(Outflow::is_ended)
    }

    /// Reads output while there is something to read, window left, room in
    /// the link's queue and budget in this turn.
    fn read_output(&mut self, mut link: Option<&mut LinkOut<'_>>, registry: &Registry) -> ReadStop {
        let mut budget = READ_TURN;
        for i in 0..2 {
            if self.out[i].is_done() || (!self.out[i].wants_read() && link.is_none()) {
                continue;
            }
            // An ended stream may still owe a replay: it reads no fd then.
            let fd = self.out_fd(i).unwrap_or(-1);
            if fd < 0 && !self.out[i].is_ended() {
                self.end_stream(i, registry);
            }
            let mut sink = match (&mut link, self.discard) {
                (_, true) => Sink::Discard,
                (Some(link), false) => Sink::Queue(link),
                (None, false) => Sink::Detached,
            };
            let id = self.owner.map_or(0, |o| o.id);
            match self.out[i].pump(fd, id, &mut sink, &mut self.window, &mut budget) {
                Pumped::Drained => {}
                Pumped::Ended => self.end_stream(i, registry),
                Pumped::Window => return ReadStop::Window,
                Pumped::Yield => return ReadStop::Yield,
                Pumped::Backpressure => return ReadStop::Backpressure,
            }
        }
        ReadStop::Idle
    }

    /// Marks output stream `i` ended and lets go of its fd (a PTY master
    /// stays open for RESIZE and is closed with the session).
    fn end_stream(&mut self, i: usize, registry: &Registry) {
        self.out[i].end();
        if let Fds::Pipes { stdout, stderr, .. } = &mut self.fds {
            let slot = if i == 0 { stdout } else { stderr };
            if let Some(fd) = slot.take() {
                deregister(registry, fd.as_raw_fd());
            }
        }
    }

    /// The process was reaped: the session lingers until its streams end,
    /// at most `linger_ms`.
    pub(crate) fn reaped(&mut self, exit: Exited, key: usize, now: Instant, timers: &mut Timers) {
        let at = now + Duration::from_millis(u64::from(self.linger_ms));
        let timer = timers.add(at, Timer::Linger { key, seq: self.seq });
        self.state = State::Lingering {
            exit,
            timer: Some(timer),
        };
        // The final read pass: whatever the child wrote is in the pipe
        // now, and the event for it may not have been handled yet.
        for s in &mut self.out {
            s.recheck();
        }
    }

    /// The linger time is over (or cut short): from now on a stream that
    /// would block has ended.
    pub(crate) fn linger_over(&mut self, timers: &mut Timers) {
        if let State::Lingering { exit, timer } = self.state {
            if let Some(t) = timer {
                timers.cancel(t);
            }
            self.state = State::Lingering { exit, timer: None };
            for s in &mut self.out {
                s.begin_final_pass();
            }
        }
    }

    /// The shutdown's grace is over and SIGKILL has gone out: output held
    /// behind a used-up window will never be acknowledged in time, so from
    /// now on it is dropped and counted.
    pub(crate) fn drop_output_behind_window(&mut self) {
        if self.window.is_closed() {
            self.discard = true;
        }
    }

    /// The shutdown's drain is over too: whatever output is still held
    /// (the host is not reading) is dropped and counted.
    pub(crate) fn drop_all_output(&mut self) {
        self.discard = true;
        for s in &mut self.out {
            s.recheck();
        }
    }

    /// Makes a done session (see [`Session::is_done`]) finished: lets go of
    /// every fd and of its deadline, and returns its EXITED (with the
    /// output it dropped, whether its deadline ended it), and whether a
    /// host is there to get it (it is then seen, and the host's id free).
    pub(crate) fn finish(
        &mut self,
        registry: &Registry,
        timers: &mut Timers,
    ) -> Option<(Exited, Option<Owner>)> {
        let mut exit = match self.state {
            State::Lingering { exit, timer: None } => exit,
            // A record attached again: its replay is sent, EXITED follows.
            State::Finished { exit, .. } if self.owner.is_some() => exit,
            _ => return None,
        };
        let dropped: u64 = self.out.iter().map(Outflow::dropped).sum();
        if dropped > 0 {
            exit.output_dropped = Some(dropped);
        }
        exit.timed_out |= self.deadline.passed;
        exit.oom_killed |= self.cgroup.as_ref().is_some_and(SessionCgroup::oom_killed);
        if let Some(t) = self.deadline.timer.take() {
            timers.cancel(t);
        }
        self.close(registry);
        let owner = self.owner.take();
        self.state = State::Finished {
            exit,
            seen: owner.is_some(),
        };
        Some((exit, owner))
    }

    /// Lets go of every fd (they are closed here).
    pub(crate) fn close(&mut self, registry: &Registry) {
        if let Some(status) = self.start_status() {
            deregister(registry, status.fd());
        }
        match std::mem::replace(&mut self.fds, Fds::Closed) {
            Fds::Pty { master } => deregister(registry, master.as_raw_fd()),
            Fds::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                for fd in [stdin, stdout, stderr].into_iter().flatten() {
                    deregister(registry, fd.as_raw_fd());
                }
            }
            Fds::Closed => {}
        }
    }
}

/// Registers a new child's stdio: the PTY master (output and input), or
/// the pipes. On failure nothing stays registered.
fn register_stdio(stdio: ChildStdio, key: usize, registry: &Registry) -> io::Result<Fds> {
    Ok(match stdio {
        ChildStdio::Pty { master, .. } => {
            register(
                registry,
                master.as_raw_fd(),
                Source::Session(key, SessionFd::Stdout),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Fds::Pty { master }
        }
        ChildStdio::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            let fds = [
                (stdin.as_ref(), SessionFd::Stdin, Interest::WRITABLE),
                (Some(&stdout), SessionFd::Stdout, Interest::READABLE),
                (Some(&stderr), SessionFd::Stderr, Interest::READABLE),
            ];
            let mut done: Vec<RawFd> = Vec::new();
            for (fd, which, interest) in fds {
                let Some(fd) = fd else { continue };
                let source = Source::Session(key, which);
                if let Err(e) = register(registry, fd.as_raw_fd(), source, interest) {
                    for fd in done {
                        deregister(registry, fd);
                    }
                    return Err(e);
                }
                done.push(fd.as_raw_fd());
            }
            Fds::Pipes {
                stdin,
                stdout: Some(stdout),
                stderr: Some(stderr),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::{hold_signal, Target};

    #[test]
    fn held_signals_are_coalesced_in_order_of_arrival() {
        let mut held = Vec::new();
        for round in 0..10_000 {
            for signal in [15, 2, 64, 15] {
                let target = if round % 2 == 0 {
                    Target::Group
                } else {
                    Target::Process
                };
                hold_signal(&mut held, signal, target);
            }
        }
        assert_eq!(
            held,
            [
                (15, Target::Group),
                (2, Target::Group),
                (64, Target::Group),
                (15, Target::Process),
                (2, Target::Process),
                (64, Target::Process)
            ]
        );
        for signal in 0..=64 {
            hold_signal(&mut held, signal, Target::Group);
            hold_signal(&mut held, signal, Target::Process);
            hold_signal(&mut held, signal, Target::Tree);
        }
        assert_eq!(held.len(), 195);
    }
}
