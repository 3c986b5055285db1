//! Flow-controlled byte streams between a nonblocking fd and a host link:
//! the one implementation of what every stream of the protocol needs, used
//! by a session's stdout, stderr and stdin, and by the extensions' streams.
//!
//! - [`Outflow`]: bytes the agent reads from an fd (a child's pipe, a PTY
//!   master) and sends as frames of one kind. It stops at a [`Window`] of
//!   unacknowledged bytes (OUTPUT_ACK and its kin), at the link's
//!   high-water mark (backpressure: the writer blocks in `write()`), and
//!   after a turn's budget (fairness: a producer faster than the host
//!   cannot hold the loop). A pipe's bytes may be spliced into the
//!   transport instead of copied (`OutQueue::splice_frame`).
//! - [`Inflow`]: bytes the host sends (STDIN and its kin), within a window
//!   the agent announced, queued and written as the fd takes them,
//!   acknowledged as they go, and closed on the host's word. A large frame
//!   arriving on a pipe transport can be spliced straight from the
//!   transport into the fd ([`Inflow::stream_from`]).
//!
//! Edge-triggered epoll means each side keeps a "may have more" flag
//! (`readable`, `writable`) that only EAGAIN clears. Neither type owns its
//! fd: a PTY master is both a session's output and its input, so the owner
//! keeps the fds and passes them in, and closes them when a stream says it
//! is done.

use std::io;
use std::os::fd::RawFd;

use crate::codec::{self, HEADER_LEN, MAX_OUTPUT_PAYLOAD};
use crate::messages::{self, Ack};

use super::outqueue::{OutQueue, Splice};
use super::sys;

/// A window of unacknowledged bytes, shared by the streams it covers (a
/// session's stdout and stderr share its `output_window`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    /// Bytes that may still be sent; `None` when unlimited.
    left: Option<u32>,
    size: u32,
}

impl Window {
    /// A window of `size` bytes; 0 is unlimited.
    pub(crate) fn new(size: u32) -> Window {
        Window {
            left: (size > 0).then_some(size),
            size,
        }
    }

    /// How much may be sent now (`usize::MAX` when unlimited).
    pub(crate) fn room(&self) -> usize {
        self.left.map_or(usize::MAX, |w| w as usize)
    }

    /// Charges `n` bytes sent.
    pub(crate) fn take(&mut self, n: usize) {
        if let Some(w) = &mut self.left {
            *w = w.saturating_sub(n as u32);
        }
    }

    /// Whether the window is used up (never for an unlimited one).
    pub(crate) fn is_closed(&self) -> bool {
        self.left == Some(0)
    }

    /// Returns window (never above the size the stream started with).
    pub(crate) fn ack(&mut self, bytes: u32) {
        if let Some(w) = &mut self.left {
            *w = w.saturating_add(bytes).min(self.size);
        }
    }
}

/// A host link's output side, as a stream sees it.
pub(crate) struct LinkOut<'a> {
    pub(crate) queue: &'a mut OutQueue,
    /// The transport's write side is a pipe: a pipe's output may be
    /// spliced into it.
    pub(crate) splice: bool,
    /// The transport's write fd, when it takes bytes now: spliced frames
    /// go straight into it while nothing is queued.
    pub(crate) direct: Option<RawFd>,
    /// Above this many queued bytes, stop ([`Pumped::Backpressure`]).
    pub(crate) high_water: usize,
}

impl LinkOut<'_> {
    /// The buffer to append whole frames to.
    pub(crate) fn frames(&mut self) -> &mut Vec<u8> {
        self.queue.buf()
    }
}

/// Where an [`Outflow`]'s bytes go.
pub(crate) enum Sink<'a, 'b> {
    /// Into a host link's output queue, as frames.
    Queue(&'b mut LinkOut<'a>),
    /// Read and dropped, counted in [`Outflow::dropped`]: output the host
    /// will not get (a shutdown past its grace, with the window used up).
    Discard,
    /// No host has the stream (a detached session): read into its replay
    /// ring only (older bytes go as newer come), so it never blocks.
    Detached,
}

/// Why [`Outflow::pump`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pumped {
    /// The fd has nothing more now (EAGAIN), or the stream had nothing to
    /// do (not readable, or ended before).
    Drained,
    /// The stream ended now: end of file, EIO (a PTY's end), an error, or
    /// its final pass is over. The owner closes the fd.
    Ended,
    /// The window is used up; an ack resumes.
    Window,
    /// The turn's budget is spent: other streams go first.
    Yield,
    /// The link's queue is over its high-water mark (or, splicing, its
    /// staging is full): its draining resumes the stream.
    Backpressure,
}

/// After a stream's owner is gone (a session reaped and its linger time
/// over), a stream that keeps producing gets at most this much more, so a
/// descendant writing without pause cannot hold the owner's end.
pub(crate) const FINAL_READ_LIMIT: usize = 1024 * 1024;

/// What a stream's pipe is grown to once it streams (at its first spliced
/// frame): enough that the writer keeps writing while the agent and the
/// host catch up, instead of the three taking turns a default 64 KiB pipe
/// at a time.
const OUTPUT_PIPE_SIZE: libc::c_int = 1024 * 1024;

/// Bytes read from an fd and sent to the host as frames of one kind.
#[derive(Debug)]
pub(crate) struct Outflow {
    /// The frame kind (STDOUT, STDERR, ...).
    kind: u8,
    /// An edge said readable and no read has hit EAGAIN since.
    readable: bool,
    ended: bool,
    /// The fd is a pipe only the agent reads: frames may be spliced.
    spliceable: bool,
    /// After a short read, keep reading into the same frame (a PTY master
    /// hands out a few KiB per read; this turns 4 KiB frames into 64 KiB).
    fill: bool,
    /// The pipe has been offered more room.
    pipe_grown: bool,
    /// In its final pass: EAGAIN is its end, and it may read this much more.
    final_left: Option<usize>,
    /// Bytes read and dropped ([`Sink::Discard`]).
    dropped: u64,
    /// The errno of the read that ended the stream, when one did (not
    /// EIO, a PTY master's end of file).
    failed: Option<i32>,
    /// Bytes the stream has produced so far (read from its fd): the
    /// offset of its next byte.
    total: u64,
    /// Its last bytes, kept for a later reader (`replay_bytes`).
    ring: Option<Ring>,
    /// Replaying: the bytes from this offset on are sent from the ring
    /// before the fd is read again.
    cursor: Option<u64>,
}

/// The last `cap` bytes of a stream.
#[derive(Debug)]
pub(crate) struct Ring {
    buf: std::collections::VecDeque<u8>,
    cap: usize,
}

impl Ring {
    pub(crate) fn new(cap: usize) -> Ring {
        Ring {
            buf: std::collections::VecDeque::new(),
            cap,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(self.cap)..];
        let over = (self.buf.len() + bytes.len()).saturating_sub(self.cap);
        self.buf.drain(..over);
        self.buf.extend(bytes);
    }
}

/// Where a replay of a stream starts: see [`Outflow::replay_from`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReplayStart {
    /// The offset of the first byte that will be sent.
    pub(crate) from: u64,
    /// Bytes asked for that are no longer kept.
    pub(crate) lost: u64,
}

impl Outflow {
    /// A stream of frames of `kind`, readable until a read says otherwise
    /// (data may have arrived before the fd was registered).
    pub(crate) fn new(kind: u8, spliceable: bool, fill: bool) -> Outflow {
        Outflow {
            kind,
            readable: true,
            ended: false,
            spliceable,
            fill,
            pipe_grown: false,
            final_left: None,
            dropped: 0,
            failed: None,
            total: 0,
            ring: None,
            cursor: None,
        }
    }

    /// Keeps the last `cap` bytes for replay (0: none). A stream that keeps
    /// bytes is read, never spliced: the ring needs them in memory.
    pub(crate) fn keep(&mut self, cap: u32) {
        self.ring = (cap > 0).then(|| Ring::new(cap as usize));
    }

    /// The offset of the stream's next byte: how much it has produced.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// Sets up a replay for a new reader: from `from` (default: the oldest
    /// byte kept), or only the last `tail` bytes. What is asked for and no
    /// longer kept is counted as lost.
    pub(crate) fn replay_from(&mut self, from: Option<u64>, tail: Option<u64>) -> ReplayStart {
        let kept = self.ring.as_ref().map_or(0, |r| r.buf.len() as u64);
        let oldest = self.total - kept;
        let mut start = from.unwrap_or(oldest);
        if let Some(t) = tail {
            start = start.max(self.total.saturating_sub(t));
        }
        let start = start.min(self.total);
        let lost = oldest.saturating_sub(start);
        let from = start.max(oldest);
        self.cursor = (from < self.total).then_some(from);
        ReplayStart { from, lost }
    }

    /// Nothing is left to send: the fd has ended and no replay is pending.
    pub(crate) fn is_done(&self) -> bool {
        self.ended && self.cursor.is_none()
    }

    /// Sends what a replay still owes from the ring, within the window and
    /// the link's high-water mark. `None` when it is done.
    fn replay(&mut self, id: u32, link: &mut LinkOut<'_>, window: &mut Window) -> Option<Pumped> {
        let cursor = self.cursor?;
        let Some(ring) = &self.ring else {
            self.cursor = None;
            return None;
        };
        let oldest = self.total - ring.buf.len() as u64;
        let mut at = cursor.max(oldest);
        while at < self.total {
            if link.queue.pending() >= link.high_water {
                self.cursor = Some(at);
                return Some(Pumped::Backpressure);
            }
            if window.is_closed() {
                self.cursor = Some(at);
                return Some(Pumped::Window);
            }
            let n = ((self.total - at) as usize)
                .min(MAX_OUTPUT_PAYLOAD)
                .min(window.room());
            let skip = (at - oldest) as usize;
            let bytes: Vec<u8> = ring.buf.range(skip..skip + n).copied().collect();
            if let Err(e) = codec::append_raw(link.frames(), self.kind, id, &bytes) {
                tracing::error!(error = %e, "a replay frame could not be encoded");
            }
            window.take(n);
            at += n as u64;
        }
        self.cursor = None;
        None
    }

    /// A stream that has no fd at all (a terminal session's stderr).
    pub(crate) fn none(kind: u8) -> Outflow {
        Outflow {
            ended: true,
            readable: false,
            ..Outflow::new(kind, false, false)
        }
    }

    pub(crate) fn is_ended(&self) -> bool {
        self.ended
    }

    /// Could read without a new event.
    pub(crate) fn wants_read(&self) -> bool {
        self.readable && !self.ended
    }

    /// An edge (or a hang-up, or an error: the next read says which).
    pub(crate) fn on_readable(&mut self) {
        self.readable = true;
    }

    /// Marks the stream readable again: what the writer wrote before it
    /// went is in the fd even if its event has not been handled yet.
    pub(crate) fn recheck(&mut self) {
        self.readable = true;
    }

    /// From now on EAGAIN is the end of this stream, and it reads at most
    /// [`FINAL_READ_LIMIT`] more.
    pub(crate) fn begin_final_pass(&mut self) {
        if self.final_left.is_none() {
            self.final_left = Some(FINAL_READ_LIMIT);
        }
        self.readable = true;
    }

    /// Ends the stream (its owner closes the fd).
    pub(crate) fn end(&mut self) {
        self.ended = true;
        self.readable = false;
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The errno of a read that failed and so ended the stream.
    pub(crate) fn failure(&self) -> Option<i32> {
        self.failed
    }

    /// Reads `fd` into `sink` as frames for `id` until it would block,
    /// ends, or one of the limits stops it. `budget` is what is left of
    /// the owner's turn, shared by its streams; it is charged what is read.
    pub(crate) fn pump(
        &mut self,
        fd: RawFd,
        id: u32,
        sink: &mut Sink<'_, '_>,
        window: &mut Window,
        budget: &mut usize,
    ) -> Pumped {
        if let Sink::Queue(link) = sink {
            if let Some(stop) = self.replay(id, link, window) {
                return stop;
            }
        }
        while self.wants_read() {
            if *budget == 0 {
                return Pumped::Yield;
            }
            let read = match sink {
                Sink::Discard => self.discard_some(fd),
                Sink::Detached => self.keep_some(fd),
                Sink::Queue(link) => {
                    if link.queue.pending() >= link.high_water {
                        return Pumped::Backpressure;
                    }
                    if window.is_closed() {
                        return Pumped::Window;
                    }
                    let max = MAX_OUTPUT_PAYLOAD.min(window.room());
                    match self.frame_some(fd, id, link, max) {
                        None => return Pumped::Backpressure,
                        Some(read) => read,
                    }
                }
            };
            match read {
                Ok(0) => {
                    self.end();
                    return Pumped::Ended;
                }
                Ok(n) => {
                    *budget = budget.saturating_sub(n);
                    self.total += n as u64;
                    match sink {
                        Sink::Discard => self.dropped += n as u64,
                        Sink::Detached => {}
                        Sink::Queue(_) => window.take(n),
                    }
                    if let Some(left) = &mut self.final_left {
                        *left = left.saturating_sub(n);
                        if *left == 0 {
                            self.end();
                            return Pumped::Ended;
                        }
                    }
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN) => {
                        self.readable = false;
                        // In the final pass "nothing more right now" is the
                        // end: what is left belongs to a descendant.
                        if self.final_left.is_some() {
                            self.end();
                            return Pumped::Ended;
                        }
                        return Pumped::Drained;
                    }
                    // EIO is how a PTY master says every slave fd is
                    // closed: its end of file. Any other error ends the
                    // stream too; there is no way to read it further.
                    Some(libc::EIO) => {
                        self.end();
                        return Pumped::Ended;
                    }
                    _ => {
                        // A connection's reset is its peer's doing (and
                        // reported to the host); anything else is odd.
                        let reset = matches!(
                            e.raw_os_error(),
                            Some(
                                libc::ECONNRESET
                                    | libc::ECONNABORTED
                                    | libc::ETIMEDOUT
                                    | libc::EPIPE
                            )
                        );
                        if reset {
                            tracing::debug!(id, error = %e, "reading a stream failed");
                        } else {
                            tracing::warn!(id, error = %e, "reading a stream failed");
                        }
                        self.failed = e.raw_os_error();
                        self.end();
                        return Pumped::Ended;
                    }
                },
            }
        }
        if self.ended {
            Pumped::Ended
        } else {
            Pumped::Drained
        }
    }

    /// One frame of at most `max` payload bytes into `queue`: spliced when
    /// the stream and the transport allow it, read otherwise. `None` when
    /// the output must wait in the fd (a splice would overtake queued
    /// frames, or the staging pipe is full).
    fn frame_some(
        &mut self,
        fd: RawFd,
        id: u32,
        link: &mut LinkOut<'_>,
        max: usize,
    ) -> Option<io::Result<usize>> {
        let spliced = if link.splice && self.spliceable && self.ring.is_none() {
            link.queue.splice_frame(self.kind, id, fd, max, link.direct)
        } else {
            Splice::No
        };
        match spliced {
            Splice::Wait => None,
            Splice::Sent(n) => {
                if !self.pipe_grown {
                    self.pipe_grown = true;
                    sys::grow_pipe(fd, OUTPUT_PIPE_SIZE);
                }
                Some(Ok(n))
            }
            Splice::No => {
                let buf = link.queue.buf();
                let read = read_frame(buf, self.kind, id, fd, max, self.fill);
                if let (Ok(n), Some(ring)) = (&read, &mut self.ring) {
                    ring.push(&buf[buf.len() - n..]);
                }
                Some(read)
            }
        }
    }

    /// Reads one chunk into the ring only (a detached stream).
    fn keep_some(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut scratch = [0u8; 16 * 1024];
        // SAFETY: reading into a local buffer of the given length.
        let n = unsafe { libc::read(fd, scratch.as_mut_ptr().cast(), scratch.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(ring) = &mut self.ring {
            ring.push(&scratch[..n as usize]);
        }
        Ok(n as usize)
    }

    /// Reads and drops one chunk.
    fn discard_some(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut scratch = [0u8; 16 * 1024];
        // SAFETY: reading into a local buffer of the given length.
        let n = unsafe { libc::read(fd, scratch.as_mut_ptr().cast(), scratch.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Appends a frame of `kind` whose payload is read from `fd` straight into
/// `out` (at most `max` bytes). On end of file, an error or EAGAIN nothing
/// is appended.
///
/// With `fill`, after a short read it keeps reading into the same frame
/// until `max` or until a read returns nothing more (that condition,
/// EAGAIN, EIO or end of file, is sticky and is seen again by the next
/// call).
fn read_frame(
    out: &mut Vec<u8>,
    kind: u8,
    id: u32,
    fd: RawFd,
    max: usize,
    fill: bool,
) -> io::Result<usize> {
    let start = out.len();
    out.reserve(HEADER_LEN + max);
    out.extend_from_slice(&codec::header(kind, id, 0));
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

/// Where the acknowledgements of an [`Inflow`] go.
pub(crate) struct Acks<'a> {
    /// The owner's link queue; `None` when no host is there to tell (the
    /// window is still accounted).
    pub(crate) out: Option<&'a mut Vec<u8>>,
    /// The ack frame's kind (STDIN_ACK, ...) and id.
    pub(crate) kind: u8,
    pub(crate) id: u32,
}

/// How an [`Inflow`]'s close is carried out once its queue is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    /// Close the fd: a pipe's reader then sees end of file.
    Fd,
    /// Write the terminal's end-of-file character (VEOF) at the start of a
    /// line: twice when the line has text. The fd stays open.
    TerminalEof,
    /// Shut a socket down for writing (`SHUT_WR`): the peer reads end of
    /// file, and can still send. The fd stays open.
    ShutdownWrite,
}

/// Why an [`Inflow`] refused the host's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InflowError {
    /// The host closed the stream (or it never had an input side).
    Closed,
    /// The frame would take more than the window: dropped whole.
    WindowExceeded { in_use: u64, window: u32 },
}

/// What [`Inflow::flush`] asks of the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// Nothing: keep the fd.
    Keep,
    /// The input side is over (closed by the host and written out, or the
    /// reader is gone): deregister and close a pipe fd now.
    Done,
}

/// How much of a streaming payload one read takes into the queue when it
/// cannot be spliced.
const STREAM_READ_CHUNK: usize = 64 * 1024;

/// What an input pipe is grown to once its reader is slower than the host:
/// a few 64 KiB frames, so the agent and the reader do not take turns a
/// frame at a time.
const INPUT_PIPE_SIZE: libc::c_int = 256 * 1024;

/// The source a streaming payload comes from: the transport, which only
/// the host link reads (see `link::TransportReader`).
pub(crate) trait PayloadSource {
    /// splice(2) up to `len` bytes into the pipe `dst` (nonblocking).
    fn splice_into(&mut self, dst: RawFd, len: usize) -> io::Result<usize>;
    /// Reads up to `max` bytes onto the end of `buf`.
    fn read_into(&mut self, buf: &mut Vec<u8>, max: usize) -> io::Result<usize>;
    /// Reads up to `max` bytes and drops them.
    fn skip(&mut self, max: usize) -> io::Result<usize>;
}

/// Bytes the host sends to an fd, within a window, acknowledged as written.
#[derive(Debug)]
pub(crate) struct Inflow {
    queue: Vec<u8>,
    pos: usize,
    /// Received from the host and not yet acknowledged (the window in use).
    unacked: u64,
    /// Written or discarded, not yet acknowledged.
    ack_due: u64,
    /// The host closed it (or it has no input side): more bytes are an error.
    host_closed: bool,
    /// The reader is gone (EPIPE, EIO): bytes are discarded and acknowledged.
    gone: bool,
    /// The close has been carried out.
    close_done: bool,
    /// An edge said writable and no write has hit EAGAIN since.
    writable: bool,
    close: Close,
    /// The last byte written (a terminal's VEOF needs a line start).
    last_byte: Option<u8>,
    /// VEOF bytes still to write.
    eof_owed: u8,
    /// The pipe has been offered more room (once, at its first EAGAIN: a
    /// stream that streams gets a pipe that holds several frames; one that
    /// does not keeps the default).
    pipe_grown: bool,
    /// splice(2) from the transport into this fd failed (not EAGAIN):
    /// streamed payloads go through the queue.
    splice_failed: bool,
    /// Bytes a previous host sent whose acknowledgements nobody gets (see
    /// [`Inflow::rebase`]).
    silent: u64,
    /// The errno of the write that found the reader gone.
    failed: Option<i32>,
}

impl Inflow {
    /// An input stream closed in the way `close` says; `open: false` for
    /// one that takes nothing (a session started without stdin).
    pub(crate) fn new(close: Close, open: bool) -> Inflow {
        Inflow {
            queue: Vec::new(),
            pos: 0,
            unacked: 0,
            ack_due: 0,
            host_closed: !open,
            gone: false,
            close_done: !open,
            writable: true,
            close,
            last_byte: None,
            eof_owed: 0,
            pipe_grown: false,
            splice_failed: false,
            silent: 0,
            failed: None,
        }
    }

    /// A new host takes the stream over: it has sent nothing yet, so its
    /// window starts empty. What the previous host sent is still written,
    /// but its acknowledgements are swallowed, not misattributed.
    pub(crate) fn rebase(&mut self) {
        self.silent += self.unacked;
        self.unacked = 0;
    }

    /// Whether the host may still send (not closed, reader not gone).
    pub(crate) fn is_open(&self) -> bool {
        !self.host_closed && !self.gone
    }

    /// An edge: the fd takes bytes again.
    pub(crate) fn on_writable(&mut self) {
        self.writable = true;
    }

    /// The reader went away (a write failed with EPIPE, EIO, ECONNRESET):
    /// bytes are discarded from then on.
    pub(crate) fn is_gone(&self) -> bool {
        self.gone
    }

    /// The errno of the write that found the reader gone (EPIPE,
    /// ECONNRESET, EIO), once one did.
    pub(crate) fn failure(&self) -> Option<i32> {
        self.failed
    }

    /// The host's close has been carried out (or the reader is gone).
    pub(crate) fn is_done(&self) -> bool {
        self.close_done
    }

    /// Drops what is queued without writing it (a connection closed at
    /// once); nothing more is acknowledged.
    pub(crate) fn abandon(&mut self) {
        self.queue.clear();
        self.pos = 0;
        self.host_closed = true;
        self.close_done = true;
        self.gone = true;
    }

    fn queued(&self) -> usize {
        self.queue.len() - self.pos
    }

    /// The host's bytes: checks the window, then writes what `fd` takes
    /// (when given: the owner may hold writing back, as a session does
    /// until STARTED) and queues the rest.
    pub(crate) fn push(
        &mut self,
        data: &[u8],
        window: u32,
        fd: Option<RawFd>,
        acks: &mut Acks<'_>,
    ) -> Result<Flushed, InflowError> {
        if self.host_closed {
            return Err(InflowError::Closed);
        }
        if self.unacked + data.len() as u64 > u64::from(window) {
            return Err(InflowError::WindowExceeded {
                in_use: self.unacked,
                window,
            });
        }
        if data.is_empty() {
            return Ok(Flushed::Keep);
        }
        self.unacked += data.len() as u64;
        Ok(self.accept(data, fd, acks))
    }

    /// Bytes whose window is already charged: written while `fd` takes
    /// them, queued otherwise, discarded when the reader is gone.
    fn accept(&mut self, data: &[u8], fd: Option<RawFd>, acks: &mut Acks<'_>) -> Flushed {
        if self.gone {
            self.ack_due += data.len() as u64;
            self.send_acks(acks);
            return Flushed::Keep;
        }
        let mut data = data;
        if let (Some(fd), 0) = (fd, self.queued()) {
            // Nothing queued ahead of these bytes: write what the fd takes
            // straight from the frame, and queue only the rest.
            let n = self.write_now(fd, data);
            data = &data[n..];
        }
        if self.gone {
            self.ack_due += data.len() as u64;
        } else {
            self.queue.extend_from_slice(data);
        }
        match fd {
            Some(fd) => self.flush(fd, acks),
            None => {
                self.send_acks(acks);
                if self.gone {
                    Flushed::Done
                } else {
                    Flushed::Keep
                }
            }
        }
    }

    /// Writes `data` while `fd` takes it, without queueing; returns how
    /// much was consumed (written, or discarded because the reader left).
    fn write_now(&mut self, fd: RawFd, data: &[u8]) -> usize {
        let mut done = 0;
        while done < data.len() && self.writable && !self.gone {
            let rest = &data[done..];
            // SAFETY: `rest` is a valid readable slice of the given length.
            let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
            if n >= 0 {
                let n = n as usize;
                if n > 0 {
                    self.last_byte = Some(rest[n - 1]);
                }
                self.ack_due += n as u64;
                done += n;
                continue;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) => {
                    if !self.grow_pipe(fd) {
                        self.writable = false;
                    }
                }
                // EPIPE (no reader left) or EIO (terminal gone): what was
                // not written is discarded and acknowledged.
                _ => {
                    self.reader_gone();
                    self.ack_due += (data.len() - done) as u64;
                    return data.len();
                }
            }
        }
        done
    }

    /// At the first EAGAIN on a pipe, asks for a larger one. True when it
    /// grew, so the write is worth retrying at once.
    fn grow_pipe(&mut self, fd: RawFd) -> bool {
        if self.pipe_grown || self.close != Close::Fd {
            return false;
        }
        self.pipe_grown = true;
        // SAFETY: F_GETPIPE_SZ on our own pipe fd.
        let before = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
        sys::grow_pipe(fd, INPUT_PIPE_SIZE).is_some_and(|after| after > before)
    }

    /// The reader went away: everything queued is discarded (and
    /// acknowledged), and so is everything that comes later.
    fn reader_gone(&mut self) {
        // Every caller comes straight from the failed write.
        if !self.gone {
            self.failed = io::Error::last_os_error().raw_os_error();
        }
        self.gone = true;
        self.ack_due += self.queued() as u64;
        self.queue.clear();
        self.pos = 0;
        self.eof_owed = 0;
        self.close_done = true;
    }

    /// The host's close (STDIN_CLOSE and its kin): carried out once the
    /// queue is written. `fd` as for [`Inflow::push`].
    pub(crate) fn close(
        &mut self,
        fd: Option<RawFd>,
        acks: &mut Acks<'_>,
    ) -> Result<Flushed, InflowError> {
        if self.host_closed {
            return Err(InflowError::Closed);
        }
        self.host_closed = true;
        Ok(match fd {
            Some(fd) => self.flush(fd, acks),
            None => Flushed::Keep,
        })
    }

    /// Writes queued bytes while `fd` takes them, carries out a pending
    /// close, and acknowledges what was written or discarded.
    pub(crate) fn flush(&mut self, fd: RawFd, acks: &mut Acks<'_>) -> Flushed {
        let done = self.write_queue(fd);
        self.send_acks(acks);
        if done {
            Flushed::Done
        } else {
            Flushed::Keep
        }
    }

    /// The body of [`Inflow::flush`]; true once the input side is over.
    fn write_queue(&mut self, fd: RawFd) -> bool {
        while !self.gone && self.writable {
            if self.queued() == 0 {
                return self.finish_close(fd);
            }
            let rest = &self.queue[self.pos..];
            // SAFETY: `rest` is a valid readable slice of the given length.
            let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
            if n >= 0 {
                let n = n as usize;
                if n > 0 {
                    self.last_byte = Some(rest[n - 1]);
                }
                self.pos += n;
                self.ack_due += n as u64;
                if self.pos == self.queue.len() {
                    self.queue.clear();
                    self.pos = 0;
                }
                continue;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) => {
                    if self.grow_pipe(fd) {
                        continue;
                    }
                    self.writable = false;
                    // Keep the queue from creeping: drop what is written.
                    if self.pos > 0 {
                        self.queue.drain(..self.pos);
                        self.pos = 0;
                    }
                }
                // EPIPE (no reader left) or EIO (terminal gone): what is
                // queued can never be written.
                _ => self.reader_gone(),
            }
        }
        self.gone
    }

    /// With nothing queued: carries out the host's close, if it asked for
    /// one. True once the input side is over.
    fn finish_close(&mut self, fd: RawFd) -> bool {
        if !self.host_closed || self.close_done {
            return self.close_done && self.close == Close::Fd;
        }
        match self.close {
            Close::Fd => {
                // Closing the pipe's write end is the reader's EOF.
                self.close_done = true;
                true
            }
            Close::TerminalEof => {
                self.write_terminal_eof(fd);
                false
            }
            Close::ShutdownWrite => {
                // SAFETY: shutdown(2) on a socket the owner holds.
                if unsafe { libc::shutdown(fd, libc::SHUT_WR) } < 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::ENOTCONN) {
                        tracing::debug!(error = %e, "shutdown(SHUT_WR) failed");
                    }
                }
                self.close_done = true;
                false
            }
        }
    }

    /// A terminal's end of file is its VEOF character, at the start of a
    /// line: twice if the line has text.
    fn write_terminal_eof(&mut self, fd: RawFd) {
        if self.eof_owed == 0 {
            self.eof_owed = match self.last_byte {
                Some(b) if b != b'\n' => 2,
                _ => 1,
            };
        }
        let eof = [veof_char(fd); 2];
        loop {
            // SAFETY: writing from a local array of the given length.
            let n = unsafe { libc::write(fd, eof.as_ptr().cast(), usize::from(self.eof_owed)) };
            if n > 0 {
                self.eof_owed -= n as u8;
                if self.eof_owed == 0 {
                    self.close_done = true;
                    return;
                }
                continue;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => self.writable = false,
                _ => self.reader_gone(),
            }
            return;
        }
    }

    fn send_acks(&mut self, acks: &mut Acks<'_>) {
        let quiet = self.ack_due.min(self.silent);
        self.ack_due -= quiet;
        self.silent -= quiet;
        while self.ack_due > 0 {
            let bytes = self.ack_due.min(u64::from(u32::MAX)) as u32;
            if let Some(out) = acks.out.as_deref_mut() {
                if let Err(e) = messages::append_map(out, acks.kind, acks.id, &Ack { bytes }) {
                    tracing::error!(error = %e, "an ack could not be encoded");
                }
            }
            self.ack_due -= u64::from(bytes);
            self.unacked = self.unacked.saturating_sub(u64::from(bytes));
        }
    }

    /// Whether a frame with a `len`-byte payload can stream from the
    /// transport straight into `fd` (see [`Inflow::stream_from`]): the
    /// stream is open with nothing queued and the whole frame fits the
    /// window. Otherwise the frame takes the ordinary path, which also
    /// reports what is wrong with it.
    pub(crate) fn can_stream(&self, len: usize, window: u32) -> bool {
        !self.host_closed
            && !self.gone
            && self.queued() == 0
            && self.unacked + len as u64 <= u64::from(window)
    }

    /// Accepts a frame of `len` bytes that streams (the window is charged
    /// for all of it now) and takes `head`, the part of its payload already
    /// read; the rest follows through [`Inflow::stream_from`].
    pub(crate) fn begin_stream(
        &mut self,
        len: usize,
        head: &[u8],
        fd: RawFd,
        acks: &mut Acks<'_>,
    ) -> Flushed {
        self.unacked += len as u64;
        if head.is_empty() {
            Flushed::Keep
        } else {
            self.accept(head, Some(fd), acks)
        }
    }

    /// Moves up to `left` bytes of a streaming payload from `src` to `fd`
    /// (`None`: the fd is gone): with splice(2) while nothing is queued and
    /// the pipe has room, so the bytes are never copied through the agent;
    /// otherwise read into the queue, as for an ordinary frame. Bytes for
    /// a reader that is gone are read and discarded (and acknowledged).
    ///
    /// Returns how many bytes left `src` (`Ok(0)` is its end of file; a
    /// `WouldBlock` error means it holds nothing now) and what the owner
    /// must do.
    pub(crate) fn stream_from(
        &mut self,
        src: &mut dyn PayloadSource,
        left: usize,
        fd: Option<RawFd>,
        acks: &mut Acks<'_>,
    ) -> io::Result<(usize, Flushed)> {
        let fd = match fd {
            Some(fd) if !self.gone => fd,
            _ => return self.discard_from(src, left, acks),
        };
        while self.writable && self.queued() == 0 && !self.splice_failed {
            match src.splice_into(fd, left) {
                Ok(n) => {
                    self.ack_due += n as u64;
                    self.send_acks(acks);
                    return Ok((n, Flushed::Keep));
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // The transport is empty or the pipe is full: the read
                    // below tells which (and a full pipe is grown by the
                    // flush at its EAGAIN, as for any frame).
                    Some(libc::EAGAIN) => break,
                    Some(libc::EPIPE) => {
                        self.reader_gone();
                        return self.discard_from(src, left, acks);
                    }
                    // This pair cannot be spliced: the queue takes over.
                    _ => self.splice_failed = true,
                },
            }
        }
        let n = src.read_into(&mut self.queue, left.min(STREAM_READ_CHUNK))?;
        let flushed = if n > 0 {
            self.flush(fd, acks)
        } else {
            Flushed::Keep
        };
        Ok((n, flushed))
    }

    /// Reads and drops up to `left` bytes from `src`, acknowledging them.
    /// The reader is gone, so the owner closes the fd if it has not yet.
    fn discard_from(
        &mut self,
        src: &mut dyn PayloadSource,
        left: usize,
        acks: &mut Acks<'_>,
    ) -> io::Result<(usize, Flushed)> {
        let n = src.skip(left.min(STREAM_READ_CHUNK))?;
        self.ack_due += n as u64;
        self.send_acks(acks);
        Ok((n, Flushed::Done))
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
