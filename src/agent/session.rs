//! One session: a child process, its stdio fds and the flow control around
//! them, as a state machine the event loop drives.
//!
//! States (see docs/DESIGN.md):
//! - **starting**: `starting` is `Some`: cloned, not yet known to have
//!   exec'd. Nothing is read or written; SIGNALs are held (coalesced)
//!   until STARTED.
//! - **running**: `exit` is `None`; output is read as the child writes it,
//!   within the output window and the transport's high-water mark; STDIN
//!   is queued and written as the child reads.
//! - **lingering**: the child has been reaped (`exit` is `Some`), but an
//!   output stream is still open — data in flight, or a descendant holds
//!   it. At `deadline` (reap + `linger_ms`) every stream still open gets a
//!   final read until it would block, then counts as ended.
//! - **finished**: reaped and every output stream ended: the loop sends
//!   EXITED and frees the id.
//!
//! The session never writes to the transport fd itself: output and acks
//! are appended to the loop's output queue.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

use crate::codec::{self, HEADER_LEN, MAX_OUTPUT_PAYLOAD};
use crate::messages::{self, Ack, Exited, Kind};

use super::spawn::{ChildStdio, StartStatus};
use super::transport::{OutQueue, Splice};

/// Which fd of a session a token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The stdin pipe's write end.
    Stdin = 0,
    /// The stdout pipe's read end, or the PTY master.
    Stdout = 1,
    Stderr = 2,
    /// The close-on-exec status pipe of a child not yet known to run.
    Start = 3,
}

/// First token of session fds; lower ones are the loop's own.
pub const SESSION_TOKEN_BASE: usize = 8;

pub fn token(key: usize, stream: Stream) -> Token {
    Token(SESSION_TOKEN_BASE + key * 4 + stream as usize)
}

/// The (slab key, stream) a session token stands for.
pub fn untoken(token: Token) -> Option<(usize, Stream)> {
    let t = token.0.checked_sub(SESSION_TOKEN_BASE)?;
    let stream = match t % 4 {
        0 => Stream::Stdin,
        1 => Stream::Stdout,
        2 => Stream::Stderr,
        _ => Stream::Start,
    };
    Some((t / 4, stream))
}

/// After its deadline a lingering session reads at most this much more per
/// stream, so a descendant writing without pause cannot hold EXITED.
const FINAL_READ_LIMIT: usize = 1024 * 1024;

#[derive(Debug, Default)]
struct OutputStream {
    /// An edge said readable and no read has hit EAGAIN since.
    readable: bool,
    /// End of file seen (or the stream counted as ended after linger).
    ended: bool,
    /// Bytes read after the linger deadline.
    after_deadline: usize,
    /// The pipe has been offered more room (once, at the first frame large
    /// enough to be spliced: the child writes faster than it is read).
    pipe_grown: bool,
}

/// What a session's output pipe is grown to once the child streams: enough
/// that the child keeps writing while the agent and the host catch up,
/// instead of the three taking turns a default 64 KiB pipe at a time.
const OUTPUT_PIPE_SIZE: libc::c_int = 1024 * 1024;

/// Why reading a session's output stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStop {
    /// Every open stream would block or has ended.
    Idle,
    /// The output window is used up; OUTPUT_ACK resumes.
    Window,
    /// The transport queue is over its high-water mark; draining resumes.
    Backpressure,
}

#[derive(Debug, Default)]
pub struct StdinState {
    queue: Vec<u8>,
    pos: usize,
    /// Received from the host and not yet acknowledged (the window in use).
    unacked: u64,
    /// Written or discarded, not yet acknowledged.
    ack_due: u64,
    /// STDIN_CLOSE received, or the session has no stdin: STDIN is an error.
    pub host_closed: bool,
    /// The child side is gone: further bytes are discarded (and acked).
    child_gone: bool,
    /// The close has been carried out (pipe closed, or VEOF written).
    close_done: bool,
    /// VEOF bytes still to write to a terminal.
    eof_owed: u8,
    last_byte: Option<u8>,
    writable: bool,
    /// The child's stdin pipe has been offered more room (once, at its
    /// first EAGAIN: a session that streams input gets a pipe that holds
    /// several STDIN frames; one that does not keeps the default).
    pipe_grown: bool,
    /// splice(2) from the transport into this pipe failed (not EAGAIN):
    /// streamed STDIN goes through the queue.
    splice_failed: bool,
}

/// How much output one session reads in one turn of the loop before the
/// others get theirs (see [`Session::read_output`]).
const READ_TURN: usize = 1024 * 1024;

/// How much of a streaming STDIN payload one read takes into the queue
/// when it cannot be spliced.
const STREAM_READ_CHUNK: usize = 64 * 1024;

/// What a session's stdin pipe is grown to once the child is slower than
/// the host: a few 64 KiB frames, so the agent and the child do not take
/// turns a frame at a time.
const STDIN_PIPE_SIZE: libc::c_int = 256 * 1024;

#[derive(Debug)]
pub enum StdinError {
    Closed,
    WindowExceeded { in_use: u64, window: u32 },
}

#[derive(Debug)]
enum Fds {
    Pty {
        master: OwnedFd,
    },
    Pipes {
        stdin: Option<OwnedFd>,
        stdout: Option<OwnedFd>,
        stderr: Option<OwnedFd>,
    },
}

#[derive(Debug)]
pub struct Session {
    pub id: u32,
    pub pid: libc::pid_t,
    /// Until the child is known to have exec'd: its status pipe. Nothing
    /// of the session is read or written meanwhile (STARTED comes first).
    pub starting: Option<StartStatus>,
    fds: Fds,
    out: [OutputStream; 2],
    pub stdin: StdinState,
    /// Output window left; `None` when unlimited.
    window: Option<u32>,
    window_size: u32,
    /// How the process ended, once reaped.
    pub exit: Option<Exited>,
    /// When lingering ends.
    pub deadline: Option<Instant>,
    pub linger_ms: u32,
    lingered: bool,
    /// In the loop's list of sessions stalled by backpressure.
    pub stalled: bool,
    /// SIGNALs (signal, group) that arrived while starting: delivered after
    /// STARTED, dropped on EXEC_FAILED, so a signal cannot make a program
    /// that never ran look started. Each distinct pair is held once (see
    /// [`Session::hold_signal`]).
    held_signals: Vec<(libc::c_int, bool)>,
}

/// Adds (signal, group) to `held` unless it is there already, in the order
/// of first arrival. A host may send any number of SIGNALs before the
/// program starts (and it may take long to: a child stuck in `chdir` on a
/// hung filesystem); each costs no reply, so nothing else bounds them.
/// Coalesced, they take at most 65 × 2 entries. A repeated signal is
/// delivered once, like a standard signal already pending (real-time
/// signals, which the kernel would queue, are coalesced too).
fn hold_signal(held: &mut Vec<(libc::c_int, bool)>, signal: libc::c_int, group: bool) {
    if !held.contains(&(signal, group)) {
        held.push((signal, group));
    }
}

fn register(registry: &Registry, fd: RawFd, token: Token, interest: Interest) -> io::Result<()> {
    registry.register(&mut SourceFd(&fd), token, interest)
}

fn deregister(registry: &Registry, fd: RawFd) {
    // Closing an fd removes it from epoll only when no other copy of the
    // open file exists; a child between clone and exec holds copies, so
    // deregister explicitly. Failure means it was not registered.
    let _ = registry.deregister(&mut SourceFd(&fd));
}

/// Appends a frame of `kind` whose payload is read from `fd` straight into
/// `out` (at most `max` bytes). On end of file, an error or EAGAIN nothing
/// is appended.
///
/// With `fill`, after a short read it keeps reading into the same frame
/// until `max` or until a read returns nothing more (that condition,
/// EAGAIN, EIO or end of file, is sticky and is seen again by the next
/// call). A PTY master hands out at most a few KiB per read, so this
/// turns a stream of 4 KiB frames into 64 KiB ones.
fn read_frame(
    out: &mut Vec<u8>,
    kind: Kind,
    id: u32,
    fd: RawFd,
    max: usize,
    fill: bool,
) -> io::Result<usize> {
    let start = out.len();
    out.reserve(HEADER_LEN + max);
    out.extend_from_slice(&codec::header(kind as u8, id, 0));
    let mut total = 0;
    while total < max {
        let spare = out.spare_capacity_mut();
        // SAFETY: `spare` has at least `max - total` bytes of capacity; read
        // writes at most that many and we only mark as initialised what it
        // reports written.
        let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), max - total) };
        if n <= 0 {
            if total > 0 {
                break;
            }
            out.truncate(start);
            return if n == 0 {
                Ok(0)
            } else {
                Err(io::Error::last_os_error())
            };
        }
        let n = n as usize;
        // SAFETY: read initialised the first `n` spare bytes.
        unsafe { out.set_len(out.len() + n) };
        total += n;
        if !fill {
            break;
        }
    }
    let len = codec::LEN_OVERHEAD + total as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(total)
}

impl Session {
    /// Holds a SIGNAL that arrived while the program is starting, for
    /// delivery after STARTED.
    pub fn hold_signal(&mut self, signal: libc::c_int, group: bool) {
        hold_signal(&mut self.held_signals, signal, group);
    }

    /// The held SIGNALs, to deliver now (the program has started).
    pub fn take_held_signals(&mut self) -> Vec<(libc::c_int, bool)> {
        std::mem::take(&mut self.held_signals)
    }

    /// Registers a new child's fds and makes its session. On failure the
    /// child's start status comes back with the error: it owns the memory
    /// the child may still run on, to be kept until the child is reaped.
    pub fn new(
        id: u32,
        child: super::spawn::Child,
        output_window: u32,
        linger_ms: u32,
        key: usize,
        registry: &Registry,
    ) -> Result<Session, (io::Error, StartStatus)> {
        let super::spawn::Child { pid, stdio, status } = child;
        let has_stdin = match &stdio {
            ChildStdio::Pty { stdin, .. } => *stdin,
            ChildStdio::Pipes { stdin, .. } => stdin.is_some(),
        };
        if let Err(e) = register(
            registry,
            status.fd(),
            token(key, Stream::Start),
            Interest::READABLE,
        ) {
            return Err((e, status));
        }
        let fds = Self::register_stdio(stdio, key, registry);
        let fds = match fds {
            Ok(fds) => fds,
            Err(e) => {
                deregister(registry, status.fd());
                return Err((e, status));
            }
        };
        let mut stdin = StdinState::default();
        if !has_stdin {
            stdin.host_closed = true;
            stdin.close_done = true;
        }
        let tty = matches!(fds, Fds::Pty { .. });
        Ok(Session {
            id,
            pid,
            starting: Some(status),
            fds,
            // Assume readable until a read says otherwise: data may have
            // arrived before registration.
            out: [
                OutputStream {
                    readable: true,
                    ..Default::default()
                },
                OutputStream {
                    readable: true,
                    // A terminal has no separate stderr.
                    ended: tty,
                    ..Default::default()
                },
            ],
            stdin: StdinState {
                writable: true,
                ..stdin
            },
            window: (output_window > 0).then_some(output_window),
            window_size: output_window,
            exit: None,
            deadline: None,
            linger_ms,
            lingered: false,
            stalled: false,
            held_signals: Vec::new(),
        })
    }

    /// The child exec'd: the session runs.
    pub fn started(&mut self, registry: &Registry) {
        if let Some(status) = self.starting.take() {
            deregister(registry, status.fd());
        }
    }

    fn register_stdio(stdio: ChildStdio, key: usize, registry: &Registry) -> io::Result<Fds> {
        Ok(match stdio {
            ChildStdio::Pty { master, .. } => {
                register(
                    registry,
                    master.as_raw_fd(),
                    token(key, Stream::Stdout),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                Fds::Pty { master }
            }
            ChildStdio::Pipes {
                stdin: stdin_fd,
                stdout,
                stderr,
            } => {
                let fds = [
                    (stdin_fd.as_ref(), Stream::Stdin, Interest::WRITABLE),
                    (Some(&stdout), Stream::Stdout, Interest::READABLE),
                    (Some(&stderr), Stream::Stderr, Interest::READABLE),
                ];
                let mut done: Vec<RawFd> = Vec::new();
                for (fd, stream, interest) in fds {
                    let Some(fd) = fd else { continue };
                    if let Err(e) = register(registry, fd.as_raw_fd(), token(key, stream), interest)
                    {
                        for fd in done {
                            deregister(registry, fd);
                        }
                        return Err(e);
                    }
                    done.push(fd.as_raw_fd());
                }
                Fds::Pipes {
                    stdin: stdin_fd,
                    stdout: Some(stdout),
                    stderr: Some(stderr),
                }
            }
        })
    }

    pub fn is_tty(&self) -> bool {
        matches!(self.fds, Fds::Pty { .. })
    }

    /// The PTY master, for RESIZE.
    pub fn pty_fd(&self) -> Option<RawFd> {
        match &self.fds {
            Fds::Pty { master } => Some(master.as_raw_fd()),
            Fds::Pipes { .. } => None,
        }
    }

    fn out_fd(&self, i: usize) -> Option<RawFd> {
        match (&self.fds, i) {
            (Fds::Pty { master }, 0) => Some(master.as_raw_fd()),
            (Fds::Pty { .. }, _) => None,
            (Fds::Pipes { stdout, .. }, 0) => stdout.as_ref().map(AsRawFd::as_raw_fd),
            (Fds::Pipes { stderr, .. }, _) => stderr.as_ref().map(AsRawFd::as_raw_fd),
        }
    }

    fn in_fd(&self) -> Option<RawFd> {
        match &self.fds {
            Fds::Pty { master } => Some(master.as_raw_fd()),
            Fds::Pipes { stdin, .. } => stdin.as_ref().map(AsRawFd::as_raw_fd),
        }
    }

    /// A readiness event for one of this session's fds. `readable` includes
    /// hang-up and error: the next read reports what happened.
    pub fn on_event(&mut self, stream: Stream, readable: bool, writable: bool) {
        match stream {
            // The loop handles the status pipe itself.
            Stream::Start => {}
            Stream::Stdin => self.stdin.writable = true,
            Stream::Stdout | Stream::Stderr => {
                if readable {
                    self.out[stream as usize - 1].readable = true;
                }
                if self.is_tty() && writable {
                    self.stdin.writable = true;
                }
            }
        }
    }

    /// Marks output stream `i` ended and lets go of its fd (a PTY master
    /// stays open for RESIZE and is closed with the session).
    fn end_stream(&mut self, i: usize, registry: &Registry) {
        self.out[i].ended = true;
        self.out[i].readable = false;
        match &mut self.fds {
            Fds::Pty { .. } => {}
            Fds::Pipes { stdout, stderr, .. } => {
                let slot = if i == 0 { stdout } else { stderr };
                if let Some(fd) = slot.take() {
                    deregister(registry, fd.as_raw_fd());
                }
            }
        }
    }

    /// Reads output into the queue while there is something to read, window
    /// left, and the queue holds less than `high_water` bytes.
    ///
    /// With `splice` (the transport is a pipe), a pipe session's output is
    /// spliced instead of read (see [`OutQueue::splice_frame`]): straight
    /// into the transport `direct`, when given, while nothing is queued.
    pub fn read_output(
        &mut self,
        queue: &mut OutQueue,
        splice: bool,
        direct: Option<RawFd>,
        high_water: usize,
        registry: &Registry,
    ) -> ReadStop {
        let tty = self.is_tty();
        let mut turn = 0;
        for i in 0..2 {
            while self.out[i].readable && !self.out[i].ended {
                let Some(fd) = self.out_fd(i) else {
                    self.end_stream(i, registry);
                    break;
                };
                // Output spliced straight into a transport that keeps up
                // leaves nothing queued, so the high-water mark alone
                // would let a fast child hold the loop: after a turn's
                // worth the session yields, as under backpressure, and is
                // resumed after the others (and after the next poll).
                if queue.pending() >= high_water || turn >= READ_TURN {
                    return ReadStop::Backpressure;
                }
                let mut max = MAX_OUTPUT_PAYLOAD;
                if let Some(w) = self.window {
                    if w == 0 {
                        return ReadStop::Window;
                    }
                    max = max.min(w as usize);
                }
                let kind = if i == 0 { Kind::Stdout } else { Kind::Stderr };
                let spliced = if splice && !tty {
                    queue.splice_frame(kind as u8, self.id, fd, max, direct)
                } else {
                    Splice::No
                };
                if spliced == Splice::Wait {
                    // The output waits in the child's pipe until the queue
                    // has been written.
                    return ReadStop::Backpressure;
                }
                if spliced != Splice::No && !self.out[i].pipe_grown {
                    self.out[i].pipe_grown = true;
                    // SAFETY: F_SETPIPE_SZ on our own pipe fd; a refusal
                    // (the per-user pipe limits) changes nothing.
                    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, OUTPUT_PIPE_SIZE) };
                }
                let read = match spliced {
                    Splice::Sent(n) => Ok(n),
                    _ => read_frame(queue.buf(), kind, self.id, fd, max, tty),
                };
                match read {
                    Ok(0) => self.end_stream(i, registry),
                    Ok(n) => {
                        turn += n;
                        if let Some(w) = &mut self.window {
                            *w -= n as u32;
                        }
                        if self.lingered {
                            self.out[i].after_deadline += n;
                            if self.out[i].after_deadline >= FINAL_READ_LIMIT {
                                self.end_stream(i, registry);
                            }
                        }
                    }
                    Err(e) => match e.raw_os_error() {
                        Some(libc::EINTR) => {}
                        Some(libc::EAGAIN) => {
                            self.out[i].readable = false;
                            // After the deadline, "nothing more right now"
                            // is the end: what is left belongs to a
                            // descendant.
                            if self.lingered {
                                self.end_stream(i, registry);
                            }
                        }
                        // EIO is how a PTY master says every slave fd is
                        // closed: its end of file. Any other error ends the
                        // stream too; there is no way to read it further.
                        Some(libc::EIO) => self.end_stream(i, registry),
                        _ => {
                            tracing::warn!(id = self.id, error = %e, "reading output failed");
                            self.end_stream(i, registry);
                        }
                    },
                }
            }
        }
        ReadStop::Idle
    }

    /// True once nothing remains to be read.
    pub fn output_ended(&self) -> bool {
        self.out.iter().all(|s| s.ended)
    }

    /// True when a stream could still yield data without a new event.
    pub fn wants_read(&self) -> bool {
        self.out.iter().any(|s| s.readable && !s.ended)
    }

    /// OUTPUT_ACK: gives back window (never more than the session was
    /// started with).
    pub fn ack_output(&mut self, bytes: u32) {
        if let Some(w) = &mut self.window {
            *w = w.saturating_add(bytes).min(self.window_size);
        }
    }

    pub fn has_output_window(&self) -> bool {
        self.window.is_some()
    }

    /// The process was reaped.
    pub fn reaped(&mut self, exit: Exited, now: Instant) {
        self.exit = Some(exit);
        self.deadline = Some(now + std::time::Duration::from_millis(u64::from(self.linger_ms)));
        // The final read pass: whatever the child wrote is in the pipe now,
        // and the event for it may not have been handled yet.
        for s in &mut self.out {
            s.readable = true;
        }
    }

    /// The linger deadline passed: from now on, a stream that would block
    /// has ended.
    pub fn linger_expired(&mut self) {
        self.lingered = true;
        self.deadline = None;
        for s in &mut self.out {
            s.readable = true;
        }
    }

    pub fn finished(&self) -> bool {
        self.exit.is_some() && self.output_ended()
    }

    /// STDIN from the host: checks the window, queues the bytes and writes
    /// what the child takes.
    pub fn push_stdin(
        &mut self,
        data: &[u8],
        window: u32,
        out: &mut Vec<u8>,
        registry: &Registry,
    ) -> Result<(), StdinError> {
        let st = &mut self.stdin;
        if st.host_closed {
            return Err(StdinError::Closed);
        }
        if st.unacked + data.len() as u64 > u64::from(window) {
            return Err(StdinError::WindowExceeded {
                in_use: st.unacked,
                window,
            });
        }
        if data.is_empty() {
            return Ok(());
        }
        st.unacked += data.len() as u64;
        self.accept_stdin(data, out, registry);
        Ok(())
    }

    /// Bytes of an accepted STDIN frame (its window already charged):
    /// writes what the child takes, queues the rest.
    fn accept_stdin(&mut self, data: &[u8], out: &mut Vec<u8>, registry: &Registry) {
        let st = &mut self.stdin;
        if st.child_gone {
            st.ack_due += data.len() as u64;
            self.send_stdin_ack(out);
            return;
        }
        // Before STARTED nothing is written (and so nothing acknowledged).
        let started = self.starting.is_none();
        let mut data = data;
        if started && st.queue.is_empty() {
            // Nothing queued ahead of these bytes: write what the child
            // takes straight from the frame, and queue only the rest.
            let n = self.write_stdin_now(data, registry);
            data = &data[n..];
        }
        if !self.stdin.child_gone {
            self.stdin.queue.extend_from_slice(data);
        } else {
            self.stdin.ack_due += data.len() as u64;
        }
        if started {
            self.flush_stdin(out, registry);
        }
    }

    /// Whether a STDIN frame with a `len`-byte payload can stream from the
    /// transport straight into this session's stdin pipe (see
    /// [`Session::stream_stdin`]): the session is started, on pipes, its
    /// stdin open with nothing queued, and the whole frame fits the window.
    /// Otherwise the frame takes the ordinary path, which also reports
    /// what is wrong with it.
    pub fn can_stream_stdin(&self, len: usize, window: u32) -> bool {
        let st = &self.stdin;
        self.starting.is_none()
            && !self.is_tty()
            && self.in_fd().is_some()
            && !st.host_closed
            && !st.child_gone
            && st.queue.len() == st.pos
            && st.unacked + len as u64 <= u64::from(window)
    }

    /// Accepts a STDIN frame of `len` bytes that streams (the window is
    /// charged for all of it now) and takes `head`, the part of its
    /// payload already read; the rest follows through
    /// [`Session::stream_stdin`].
    pub fn begin_stdin_stream(
        &mut self,
        len: usize,
        head: &[u8],
        out: &mut Vec<u8>,
        registry: &Registry,
    ) {
        self.stdin.unacked += len as u64;
        if !head.is_empty() {
            self.accept_stdin(head, out, registry);
        }
    }

    /// Moves up to `left` bytes of a streaming STDIN payload from `src`
    /// (the transport, a pipe) to the child: with splice(2) straight into
    /// its stdin pipe while nothing is queued and the pipe has room, so
    /// the bytes are never copied through the agent; otherwise read into
    /// the stdin queue, as for an ordinary frame. Bytes for a child whose
    /// stdin is gone are read and discarded (and acknowledged).
    ///
    /// Returns how many bytes left `src`: `Ok(0)` is its end of file, and
    /// `WouldBlock` means it holds nothing now.
    pub fn stream_stdin(
        &mut self,
        src: RawFd,
        left: usize,
        out: &mut Vec<u8>,
        registry: &Registry,
    ) -> io::Result<usize> {
        loop {
            let Some(fd) = self.in_fd().filter(|_| !self.stdin.child_gone) else {
                return self.discard_stdin(src, left, out);
            };
            let st = &mut self.stdin;
            if !(st.writable && st.queue.len() == st.pos && !st.splice_failed) {
                break;
            }
            // SAFETY: splice between two pipes we hold, null offsets.
            let n = unsafe {
                libc::splice(
                    src,
                    std::ptr::null_mut(),
                    fd,
                    std::ptr::null_mut(),
                    left,
                    libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
                )
            };
            if n >= 0 {
                st.ack_due += n as u64;
                self.send_stdin_ack(out);
                return Ok(n as usize);
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                // The transport is empty or the child's pipe is full: the
                // read below tells which (and a full pipe is grown by
                // flush_stdin at its EAGAIN, as for any frame).
                Some(libc::EAGAIN) => break,
                Some(libc::EPIPE) => self.stdin_gone(registry),
                // This pair cannot be spliced: the queue takes over.
                _ => {
                    self.stdin.splice_failed = true;
                    break;
                }
            }
        }
        let st = &mut self.stdin;
        let want = left.min(STREAM_READ_CHUNK);
        st.queue.reserve(want);
        let spare = st.queue.spare_capacity_mut();
        // SAFETY: `spare` has room for `want` bytes; only what read reports
        // written is marked initialised.
        let n = unsafe { libc::read(src, spare.as_mut_ptr().cast(), want) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (n as usize).min(want);
        // SAFETY: read initialised the first n spare bytes.
        unsafe { st.queue.set_len(st.queue.len() + n) };
        if n > 0 {
            self.flush_stdin(out, registry);
        }
        Ok(n)
    }

    /// Reads and drops up to `left` bytes from `src`, acknowledging them.
    fn discard_stdin(&mut self, src: RawFd, left: usize, out: &mut Vec<u8>) -> io::Result<usize> {
        let mut scratch = [0u8; 64 * 1024];
        let want = left.min(scratch.len());
        // SAFETY: reading into a local buffer of at least `want` bytes.
        let n = unsafe { libc::read(src, scratch.as_mut_ptr().cast(), want) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.stdin.ack_due += n as u64;
        self.send_stdin_ack(out);
        Ok(n as usize)
    }

    /// Writes `data` to the child's stdin (a pipe or the terminal) while it
    /// takes it, without queueing; returns how much was written. Nothing
    /// is written while the fd is known to be full.
    fn write_stdin_now(&mut self, data: &[u8], registry: &Registry) -> usize {
        let mut done = 0;
        while done < data.len() {
            let Some(fd) = self.in_fd() else { break };
            let st = &mut self.stdin;
            if st.child_gone || !st.writable {
                break;
            }
            let rest = &data[done..];
            // SAFETY: `rest` is a valid readable slice of the given length.
            let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
            if n >= 0 {
                let n = n as usize;
                if n > 0 {
                    st.last_byte = Some(rest[n - 1]);
                }
                st.ack_due += n as u64;
                done += n;
                continue;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    if !self.grow_stdin_pipe(fd) {
                        self.stdin.writable = false;
                    }
                }
                // EPIPE (no reader left) or EIO (terminal gone).
                _ => {
                    self.stdin_gone(registry);
                    // What was not written is discarded and acknowledged.
                    self.stdin.ack_due += (data.len() - done) as u64;
                    return data.len();
                }
            }
            if !self.stdin.writable {
                break;
            }
        }
        done
    }

    /// At the first EAGAIN on a stdin pipe, asks for a larger pipe (best
    /// effort: the per-user pipe limits may refuse). True when the pipe
    /// grew, so the write is worth retrying at once.
    fn grow_stdin_pipe(&mut self, fd: RawFd) -> bool {
        if self.stdin.pipe_grown || self.is_tty() {
            return false;
        }
        self.stdin.pipe_grown = true;
        // SAFETY: F_GETPIPE_SZ/F_SETPIPE_SZ on our own pipe fd; a refusal
        // changes nothing.
        unsafe {
            let before = libc::fcntl(fd, libc::F_GETPIPE_SZ);
            let after = libc::fcntl(fd, libc::F_SETPIPE_SZ, STDIN_PIPE_SIZE);
            after > before
        }
    }

    /// STDIN_CLOSE from the host.
    pub fn close_stdin(
        &mut self,
        out: &mut Vec<u8>,
        registry: &Registry,
    ) -> Result<(), StdinError> {
        if self.stdin.host_closed {
            return Err(StdinError::Closed);
        }
        self.stdin.host_closed = true;
        if self.starting.is_none() {
            self.flush_stdin(out, registry);
        }
        Ok(())
    }

    fn stdin_gone(&mut self, registry: &Registry) {
        let st = &mut self.stdin;
        st.child_gone = true;
        st.ack_due += (st.queue.len() - st.pos) as u64;
        st.queue.clear();
        st.pos = 0;
        st.eof_owed = 0;
        st.close_done = true;
        if let Fds::Pipes { stdin, .. } = &mut self.fds {
            if let Some(fd) = stdin.take() {
                deregister(registry, fd.as_raw_fd());
            }
        }
    }

    /// Writes queued stdin while the child's side takes it, carries out a
    /// pending close, and acknowledges what was written or discarded.
    pub fn flush_stdin(&mut self, out: &mut Vec<u8>, registry: &Registry) {
        let tty = self.is_tty();
        while let Some(fd) = self.in_fd() {
            let st = &mut self.stdin;
            if st.child_gone || !st.writable {
                break;
            }
            let rest = &st.queue[st.pos..];
            if rest.is_empty() {
                if !st.host_closed || st.close_done {
                    break;
                }
                if !tty {
                    // Closing the pipe's write end is the child's EOF.
                    self.stdin.close_done = true;
                    if let Fds::Pipes { stdin, .. } = &mut self.fds {
                        if let Some(fd) = stdin.take() {
                            deregister(registry, fd.as_raw_fd());
                        }
                    }
                    break;
                }
                // A terminal's end of file is its VEOF character, at the
                // start of a line: twice if the line has text.
                if st.eof_owed == 0 {
                    st.eof_owed = match st.last_byte {
                        Some(b) if b != b'\n' => 2,
                        _ => 1,
                    };
                }
                let veof = veof_char(fd);
                let eof = [veof; 2];
                // SAFETY: writing from a local array of the given length.
                let n = unsafe { libc::write(fd, eof.as_ptr().cast(), usize::from(st.eof_owed)) };
                if n > 0 {
                    st.eof_owed -= n as u8;
                    if st.eof_owed == 0 {
                        st.close_done = true;
                    }
                    continue;
                }
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => st.writable = false,
                    _ => self.stdin_gone(registry),
                }
                break;
            }
            // SAFETY: `rest` is a valid readable slice of the given length.
            let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
            if n >= 0 {
                let n = n as usize;
                if n > 0 {
                    st.last_byte = Some(rest[n - 1]);
                }
                st.pos += n;
                st.ack_due += n as u64;
                if st.pos == st.queue.len() {
                    st.queue.clear();
                    st.pos = 0;
                }
                continue;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    if self.grow_stdin_pipe(fd) {
                        continue;
                    }
                    let st = &mut self.stdin;
                    st.writable = false;
                    // Keep the queue from creeping: drop what is written.
                    if st.pos > 0 {
                        st.queue.drain(..st.pos);
                        st.pos = 0;
                    }
                }
                // EPIPE (no reader left) or EIO (terminal gone): the child
                // side is closed, and what is queued can never be written.
                _ => self.stdin_gone(registry),
            }
            break;
        }
        self.send_stdin_ack(out);
    }

    fn send_stdin_ack(&mut self, out: &mut Vec<u8>) {
        let st = &mut self.stdin;
        while st.ack_due > 0 {
            let bytes = st.ack_due.min(u64::from(u32::MAX)) as u32;
            messages::append_map(out, Kind::StdinAck as u8, self.id, &Ack { bytes });
            st.ack_due -= u64::from(bytes);
            st.unacked -= u64::from(bytes);
        }
    }

    /// Lets go of every fd (before EXITED).
    pub fn close(&mut self, registry: &Registry) {
        self.started(registry);
        match &mut self.fds {
            Fds::Pty { master } => deregister(registry, master.as_raw_fd()),
            Fds::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                for fd in [stdin.take(), stdout.take(), stderr.take()]
                    .into_iter()
                    .flatten()
                {
                    deregister(registry, fd.as_raw_fd());
                }
            }
        }
    }
}

/// The terminal's end-of-file character (^D unless the child changed it).
fn veof_char(fd: RawFd) -> u8 {
    // SAFETY: a zeroed termios is a valid out-parameter for tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open PTY master; `t` is a valid termios.
    if unsafe { libc::tcgetattr(fd, &mut t) } == 0 {
        t.c_cc[libc::VEOF]
    } else {
        4
    }
}

#[cfg(test)]
mod tests {
    use super::hold_signal;

    #[test]
    fn held_signals_are_coalesced_in_order_of_arrival() {
        let mut held = Vec::new();
        for round in 0..10_000 {
            for signal in [15, 2, 64, 15] {
                hold_signal(&mut held, signal, round % 2 == 0);
            }
        }
        assert_eq!(
            held,
            [
                (15, true),
                (2, true),
                (64, true),
                (15, false),
                (2, false),
                (64, false)
            ]
        );
        for signal in 0..=64 {
            hold_signal(&mut held, signal, true);
            hold_signal(&mut held, signal, false);
        }
        assert_eq!(held.len(), 130);
    }
}
