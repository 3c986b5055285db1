//! The queue of frames waiting to go out on one host link.
//!
//! [`OutQueue`] is the only buffer on the output path. Frames are encoded
//! (or read from children) straight into it and written from a cursor; it
//! never blocks, and the loop bounds it: sessions stop reading children's
//! output above a high-water mark. On a pipe transport a child's output can
//! skip memory altogether (see [`OutQueue::splice_frame`]).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::codec::HEADER_LEN;

use super::sys;

/// What a flush achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// Everything queued was written.
    All,
    /// The fd would block; the rest waits for writability.
    Partial,
}

/// Frames waiting for the transport, in two parts sent in this order:
///
/// - the *staging pipe*, a pipe of the agent's own holding spliced output
///   frames (a header written, the payload moved from a child's pipe by
///   splice(2), never copied by the agent; see [`OutQueue::splice_frame`]);
/// - `buf`, frames encoded (or read from children) into memory, written
///   from `pos`. `frame_start` is the start of the frame that `pos` is in,
///   so a device reconnect can tell a half-sent frame from whole ones.
///
/// A frame is staged only while `buf` is empty, so everything in `buf`
/// was queued after everything staged and the order is kept.
#[derive(Debug, Default)]
pub(crate) struct OutQueue {
    buf: Vec<u8>,
    pos: usize,
    frame_start: usize,
    /// The first `tail` bytes of `buf` end a frame whose beginning was
    /// staged (a splice that moved only part of a payload); frames proper
    /// start after them. While `pos < tail` that frame is the one being
    /// sent, and `frame_start` is 0.
    tail: usize,
    /// (read end, write end), made at the first splice.
    staging: Option<(OwnedFd, OwnedFd)>,
    /// Bytes in the staging pipe.
    staged: usize,
    /// splice(2) failed in a way that says it will keep failing.
    splice_unsupported: bool,
}

/// What [`OutQueue::splice_frame`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Splice {
    /// A frame with this many payload bytes is queued.
    Sent(usize),
    /// Nothing: read this output into the queue the ordinary way.
    No,
    /// Nothing: leave the output in the child's pipe for now.
    Wait,
}

/// Below this much buffered output a frame is read, not spliced: for a
/// few bytes one read beats an ioctl, a header write and a splice. One
/// page: a child such as `head` writes 8 KiB at a time and the agent, when
/// it keeps up, finds one or two such writes per wake-up; copying those
/// (read, then write to the transport) cost the agent about 0.45 s of CPU
/// per GiB against 0.30 to 0.35 s when they are spliced (BENCHMARKS.md).
pub(crate) const SPLICE_MIN: usize = 4 * 1024;

/// The staging pipe's size, and the bytes staged at most (half of it, so
/// that payload pages not quite full still fit its 256 slots).
const STAGING_PIPE_SIZE: libc::c_int = 1 << 20;
pub(crate) const STAGE_LIMIT: usize = STAGING_PIPE_SIZE as usize / 2;

/// Capacity kept when the loop goes to sleep with an empty queue; a
/// flood's larger buffer is given back then.
const KEEP_CAPACITY: usize = 256 * 1024;

impl OutQueue {
    /// Bytes queued and not yet written.
    pub(crate) fn pending(&self) -> usize {
        self.staged + self.buf.len() - self.pos
    }

    /// Bytes queued in memory (not staged).
    pub(crate) fn in_memory(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Bytes in the staging pipe.
    pub(crate) fn staged(&self) -> usize {
        self.staged
    }

    /// The buffer to append whole frames to.
    pub(crate) fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Writes as much as the fd takes. EINTR is retried; EAGAIN ends the
    /// flush with [`Flushed::Partial`]; any other error is returned (the
    /// caller decides what a broken transport means).
    pub(crate) fn flush(&mut self, fd: RawFd) -> io::Result<Flushed> {
        while self.staged > 0 {
            let Some((staging, _)) = &self.staging else {
                break;
            };
            // SAFETY: splice between two fds we hold, null offsets (the
            // source is a pipe; the transport is a pipe or a stream).
            let n = unsafe {
                libc::splice(
                    staging.as_raw_fd(),
                    std::ptr::null_mut(),
                    fd,
                    std::ptr::null_mut(),
                    self.staged,
                    libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
                )
            };
            if n > 0 {
                self.staged -= (n as usize).min(self.staged);
                continue;
            }
            let err = if n == 0 {
                // The staging pipe is empty although bytes are counted:
                // cannot be, but never spin on it.
                tracing::error!(staged = self.staged, "staging pipe came up empty");
                self.staged = 0;
                break;
            } else {
                io::Error::last_os_error()
            };
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(Flushed::Partial),
                _ => return Err(err),
            }
        }
        while self.pos < self.buf.len() {
            let rest = &self.buf[self.pos..];
            // SAFETY: `rest` is a valid readable slice of the given length.
            let n = unsafe { libc::write(fd, rest.as_ptr().cast(), rest.len()) };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => {
                        self.compact();
                        return Ok(Flushed::Partial);
                    }
                    _ => return Err(err),
                }
            }
            self.pos += n as usize;
        }
        self.buf.clear();
        self.pos = 0;
        self.frame_start = 0;
        self.tail = 0;
        Ok(Flushed::All)
    }

    /// Queues one frame of `kind` for session `id` whose payload the kernel
    /// moves from the pipe `src` without the agent copying it: the header
    /// is written, then splice(2) moves the payload, straight into the
    /// transport `direct` (a pipe) when given and nothing at all is queued,
    /// into the staging pipe otherwise. Whatever splice does not move is
    /// read into `buf` as the rest of that frame, so the frame is always
    /// whole. `src` must be a pipe only the agent reads.
    ///
    /// Less than [`SPLICE_MIN`] buffered in `src` (or its end) is
    /// [`Splice::No`]: the caller reads it the ordinary way. Otherwise, if
    /// frames are queued in memory (the staged frame would overtake them)
    /// or [`STAGE_LIMIT`] bytes are staged, nothing is read
    /// ([`Splice::Wait`]): the output waits in the child's pipe, not in the
    /// agent, until the queue has been written.
    pub(crate) fn splice_frame(
        &mut self,
        kind: u8,
        id: u32,
        src: RawFd,
        max: usize,
        direct: Option<RawFd>,
    ) -> Splice {
        if self.splice_unsupported || max < SPLICE_MIN {
            return Splice::No;
        }
        let Some(buffered) = sys::readable_bytes(src) else {
            return Splice::No;
        };
        if buffered < SPLICE_MIN {
            return Splice::No;
        }
        if self.in_memory() != 0 || self.staged >= STAGE_LIMIT {
            return Splice::Wait;
        }
        let len = buffered.min(max);
        let header = crate::codec::header(kind, id, len);
        if let Some(transport) = direct.filter(|_| self.staged == 0) {
            // Nothing queued at all: straight into the transport.
            // SAFETY: writing from a local array of the given length.
            let n = unsafe { libc::write(transport, header.as_ptr().cast(), header.len()) };
            // Nine bytes to a pipe go in whole or not at all (PIPE_BUF).
            // Not at all (EAGAIN: the transport is full; or an error that
            // the next flush reports): the staging pipe takes the frame.
            if n == header.len() as isize {
                let moved = self.splice_payload(src, transport, len);
                self.read_rest_of_frame(src, id, len - moved);
                return Splice::Sent(len);
            }
        }
        let Some(dst) = self.staging_fd() else {
            return Splice::No;
        };
        // SAFETY: writing from a local array of the given length. Nine
        // bytes into a pipe with room (at most half of it is used) go in
        // whole (PIPE_BUF).
        let n = unsafe { libc::write(dst, header.as_ptr().cast(), header.len()) };
        if n != header.len() as isize {
            // Cannot be with the room left; the ordinary path takes over.
            self.splice_unsupported = true;
            return Splice::No;
        }
        self.staged += header.len();
        let moved = self.splice_payload(src, dst, len);
        self.staged += moved;
        self.read_rest_of_frame(src, id, len - moved);
        Splice::Sent(len)
    }

    /// Splices up to `len` bytes from the pipe `src` to `dst` (the staging
    /// pipe, or the transport) and returns how many moved: less when
    /// `dst` is full.
    fn splice_payload(&mut self, src: RawFd, dst: RawFd, len: usize) -> usize {
        let mut moved = 0;
        while moved < len {
            // SAFETY: splice between two pipes we hold, null offsets.
            let n = unsafe {
                libc::splice(
                    src,
                    std::ptr::null_mut(),
                    dst,
                    std::ptr::null_mut(),
                    len - moved,
                    libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
                )
            };
            if n > 0 {
                moved += n as usize;
                continue;
            }
            if n == 0 {
                // End of `src`, which cannot be with bytes buffered; the
                // read of the rest settles it.
                break;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                // `dst` is out of room: the rest goes through memory.
                Some(libc::EAGAIN) => break,
                // The host is gone: the next flush reports it.
                Some(libc::EPIPE) => break,
                _ => {
                    // EINVAL and the like: this pair of fds cannot be
                    // spliced; never try again.
                    self.splice_unsupported = true;
                    break;
                }
            }
        }
        moved
    }

    /// Reads the `rest` of a spliced frame's payload from `src` into `buf`
    /// (which holds nothing else: nothing was queued in memory), as its
    /// `tail`, so it goes out right after the part already spliced. The
    /// bytes are buffered in `src` (FIONREAD counted them and nobody else
    /// reads there).
    fn read_rest_of_frame(&mut self, src: RawFd, id: u32, mut rest: usize) {
        self.buf.clear();
        self.pos = 0;
        self.frame_start = 0;
        self.buf.reserve(rest);
        while rest > 0 {
            let spare = self.buf.spare_capacity_mut();
            // SAFETY: `spare` has room for `rest` bytes; only what read
            // reports written is marked initialised.
            let n = unsafe { libc::read(src, spare.as_mut_ptr().cast(), rest) };
            if n > 0 {
                // SAFETY: read initialised the first n spare bytes.
                unsafe { self.buf.set_len(self.buf.len() + n as usize) };
                rest -= n as usize;
                continue;
            }
            if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // Cannot happen for a pipe with the bytes counted above; the
            // header promised them, so the frame is completed with zeros
            // rather than left short (which would desynchronise the host).
            tracing::error!(id, missing = rest, "spliced output came up short");
            self.buf.resize(self.buf.len() + rest, 0);
            rest = 0;
        }
        self.tail = self.buf.len();
    }

    /// The staging pipe's write end, made on first use.
    fn staging_fd(&mut self) -> Option<RawFd> {
        if self.staging.is_none() {
            let Ok((r, w)) = sys::pipe_nonblocking() else {
                self.splice_unsupported = true;
                return None;
            };
            // Refused (the per-user pipe limits), the staging limit would
            // not fit: no staging.
            if sys::grow_pipe(w.as_raw_fd(), STAGING_PIPE_SIZE).unwrap_or(0) < STAGING_PIPE_SIZE {
                self.splice_unsupported = true;
                return None;
            }
            self.staging = Some((r, w));
        }
        self.staging.as_ref().map(|(_, w)| w.as_raw_fd())
    }

    /// Gives back a flood's larger buffer once the queue is empty. The loop
    /// calls this before it sleeps, not each time the queue empties: in a
    /// flood the queue empties and refills many times a second, and
    /// shrinking then regrowing it each time costs a remap and a page
    /// fault per page of every round.
    pub(crate) fn release_spare(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > KEEP_CAPACITY {
            self.buf.shrink_to(KEEP_CAPACITY);
        }
    }

    /// Moves `frame_start` up to the frame that contains `pos`.
    fn track_frames(&mut self) {
        if self.pos < self.tail {
            return;
        }
        self.frame_start = self.frame_start.max(self.tail);
        while self.frame_start + 4 <= self.buf.len() {
            let b = &self.buf[self.frame_start..self.frame_start + 4];
            let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
            let end = self.frame_start + 4 + len;
            if end > self.pos {
                break;
            }
            self.frame_start = end;
        }
    }

    /// Drops what was written once it is a good share of the buffer, so
    /// appends do not grow the buffer forever while the host lags.
    fn compact(&mut self) {
        self.track_frames();
        if self.frame_start >= 64 * 1024 && self.frame_start * 2 >= self.buf.len() {
            self.buf.drain(..self.frame_start);
            self.pos -= self.frame_start;
            self.tail = self.tail.saturating_sub(self.frame_start);
            self.frame_start = 0;
        }
    }

    /// For a new host connection on a device port: drops the unsent rest of
    /// a frame the old host got part of and the replies meant for the old
    /// host, and puts `greeting` (a whole frame, READY) before every other
    /// queued frame.
    pub(crate) fn restart_with(&mut self, greeting: &[u8]) {
        // Staged frames: only a pipe transport stages, and it has no
        // reconnects; were there any, they could be partly sent: drop them.
        if self.staged > 0 {
            self.staging = None;
            self.staged = 0;
            // With something staged nothing of `buf` was sent yet; the rest
            // of a staged frame's payload at its start goes too.
            self.buf.drain(..self.tail.min(self.buf.len()));
            self.pos = 0;
            self.frame_start = 0;
            self.tail = 0;
        }
        self.track_frames();
        let first_whole = if self.pos < self.tail {
            // The old host got the start of a spliced frame: skip its rest.
            self.tail
        } else if self.pos > self.frame_start {
            // `pos` is inside the frame at `frame_start`: skip to its end.
            let b = &self.buf[self.frame_start..self.frame_start + 4];
            self.frame_start + 4 + u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        } else {
            self.pos
        };
        debug_assert!(greeting.len() >= HEADER_LEN);
        let rest = self.buf.split_off(first_whole.min(self.buf.len()));
        self.buf.clear();
        self.buf.extend_from_slice(greeting);
        // Session frames carry over to the new host; replies to the
        // departed host do not: a PONG or an ERROR answers a frame the new
        // host never sent (an OUTPUT_ACK that crossed its session's EXITED
        // would reach the next host as an ERROR for a session it never
        // knew), and a READY still unsent is replaced, not repeated.
        let mut at = 0;
        while at + HEADER_LEN <= rest.len() {
            let len = u32::from_be_bytes([rest[at], rest[at + 1], rest[at + 2], rest[at + 3]]);
            let end = (at + 4 + len as usize).min(rest.len());
            if !is_reply_to_the_host(rest[at + 4]) {
                self.buf.extend_from_slice(&rest[at..end]);
            }
            at = end;
        }
        self.pos = 0;
        self.frame_start = 0;
        self.tail = 0;
    }
}

/// Frames that answer something a host sent on its connection, rather
/// than report on a session: READY, PONG and ERROR. They are dropped, not
/// carried over, when a new host connects to a device port.
fn is_reply_to_the_host(kind: u8) -> bool {
    use crate::messages::Kind;
    kind == Kind::Ready as u8 || kind == Kind::Pong as u8 || kind == Kind::Error as u8
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use super::*;
    use crate::codec::{self, Decoded};

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        assert_eq!(
            // SAFETY: pipe2 writes two new fds, which we then own.
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) },
            0
        );
        // SAFETY: both fds are new and ours.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn write_all(fd: RawFd, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            // SAFETY: writing from a valid slice.
            let n = unsafe { libc::write(fd, data[done..].as_ptr().cast(), data.len() - done) };
            assert!(n > 0, "{}", io::Error::last_os_error());
            done += n as usize;
        }
    }

    /// Everything readable from `fd` now.
    fn drain(fd: RawFd) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            // SAFETY: reading into a local buffer.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn frames(stream: &[u8]) -> Vec<(u8, u32, Vec<u8>)> {
        let (items, dec) = codec::decode_chunks([stream]);
        assert!(dec.is_at_boundary(), "a frame was left incomplete");
        items
            .into_iter()
            .map(|d| match d {
                Decoded::Frame(f) => (f.kind, f.id, f.payload),
                Decoded::Error(e) => panic!("{e:?}"),
            })
            .collect()
    }

    /// Flushes `q` into a fresh pipe until all is written; returns the bytes.
    fn flush_all(q: &mut OutQueue) -> Vec<u8> {
        let (r, w) = pipe();
        let mut stream = Vec::new();
        loop {
            let done = q.flush(w.as_raw_fd()).unwrap() == Flushed::All;
            stream.extend(drain(r.as_raw_fd()));
            if done {
                return stream;
            }
        }
    }

    /// With nothing queued, a spliced frame goes straight into the
    /// transport; when the transport fills in the middle of its payload,
    /// the rest waits in memory as the frame's tail, and later frames
    /// (staged or not) follow it in order.
    #[test]
    fn spliced_frames_go_straight_to_the_transport_when_nothing_is_queued() {
        let (src_r, src_w) = pipe();
        let (t_r, t_w) = pipe();
        // SAFETY: F_SETPIPE_SZ on our own pipe: the transport holds 64 KiB.
        assert!(unsafe { libc::fcntl(t_w.as_raw_fd(), libc::F_SETPIPE_SZ, 65536) } >= 65536);
        let mut q = OutQueue::default();
        let a = pattern(40_000);
        write_all(src_w.as_raw_fd(), &a);
        let direct = Some(t_w.as_raw_fd());
        assert_eq!(
            q.splice_frame(0x30, 1, src_r.as_raw_fd(), 65536, direct),
            Splice::Sent(40_000)
        );
        assert_eq!(q.pending(), 0, "all of it went into the transport");
        // The next one fills the transport in the middle of its payload.
        let b: Vec<u8> = pattern(60_000).into_iter().rev().collect();
        write_all(src_w.as_raw_fd(), &b);
        assert_eq!(
            q.splice_frame(0x31, 2, src_r.as_raw_fd(), 65536, direct),
            Splice::Sent(60_000)
        );
        assert!(
            q.in_memory() > 0 && q.tail == q.in_memory(),
            "the rest is the tail"
        );
        assert_eq!(q.staged(), 0);
        // Behind the tail, a frame in memory; output after it waits.
        codec::append_raw(q.buf(), 0x12, 3, b"after").unwrap();
        write_all(src_w.as_raw_fd(), &pattern(5_000));
        assert_eq!(
            q.splice_frame(0x30, 1, src_r.as_raw_fd(), 65536, direct),
            Splice::Wait
        );
        let mut stream = drain(t_r.as_raw_fd());
        loop {
            let done = q.flush(t_w.as_raw_fd()).unwrap() == Flushed::All;
            stream.extend(drain(t_r.as_raw_fd()));
            if done {
                break;
            }
        }
        assert_eq!(
            frames(&stream),
            vec![(0x30, 1, a), (0x31, 2, b), (0x12, 3, b"after".to_vec())]
        );
    }

    #[test]
    fn spliced_frames_are_staged_then_sent_in_order() {
        let (src_r, src_w) = pipe();
        let data = pattern(40_000);
        write_all(src_w.as_raw_fd(), &data);
        let mut q = OutQueue::default();
        assert_eq!(
            q.splice_frame(0x30, 7, src_r.as_raw_fd(), 65536, None),
            Splice::Sent(40_000)
        );
        assert_eq!(q.staged(), 9 + 40_000);
        assert_eq!(q.in_memory(), 0);
        assert_eq!(q.pending(), 9 + 40_000);
        // Staging again while nothing is in memory keeps the order.
        let more = pattern(20_000);
        write_all(src_w.as_raw_fd(), &more);
        assert_eq!(
            q.splice_frame(0x31, 8, src_r.as_raw_fd(), 65536, None),
            Splice::Sent(20_000)
        );
        // Less than SPLICE_MIN buffered: left to the ordinary read.
        write_all(src_w.as_raw_fd(), &pattern(100));
        assert_eq!(
            q.splice_frame(0x30, 7, src_r.as_raw_fd(), 65536, None),
            Splice::No
        );
        drain(src_r.as_raw_fd());
        // A frame in memory: later output must not overtake it; it waits.
        codec::append_raw(q.buf(), 0x12, 7, b"in memory").unwrap();
        write_all(src_w.as_raw_fd(), &pattern(30_000));
        assert_eq!(
            q.splice_frame(0x30, 7, src_r.as_raw_fd(), 65536, None),
            Splice::Wait
        );
        drain(src_r.as_raw_fd());
        assert_eq!(
            frames(&flush_all(&mut q)),
            [
                (0x30, 7, data),
                (0x31, 8, more),
                (0x12, 7, b"in memory".to_vec())
            ]
        );
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn staging_stops_at_its_limit() {
        let (src_r, src_w) = pipe();
        // SAFETY: F_SETPIPE_SZ on our own pipe.
        unsafe { libc::fcntl(src_w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
        let mut q = OutQueue::default();
        let mut sent = Vec::new();
        loop {
            let chunk = pattern(65536);
            write_all(src_w.as_raw_fd(), &chunk);
            match q.splice_frame(0x30, 1, src_r.as_raw_fd(), 65536, None) {
                Splice::Sent(n) => sent.push(chunk[..n].to_vec()),
                Splice::Wait => break,
                Splice::No => panic!("not spliced"),
            }
            assert!(sent.len() < 100, "staging never filled");
        }
        assert!(q.staged() >= STAGE_LIMIT);
        assert_eq!(q.in_memory(), 0, "the output waits in the child's pipe");
        let stream = flush_all(&mut q);
        let got: Vec<Vec<u8>> = frames(&stream).into_iter().map(|f| f.2).collect();
        assert_eq!(got, sent);
    }

    #[test]
    fn a_payload_the_staging_pipe_cannot_hold_ends_in_memory() {
        // A packet-mode source pipe (O_DIRECT): every write is a buffer of
        // its own, so 200 writes of 100 bytes take 200 slots. Two such
        // payloads need more than the staging pipe's 256 slots.
        let mut fds = [0; 2];
        assert_eq!(
            // SAFETY: pipe2 fills two new fds, which we then own.
            unsafe {
                libc::pipe2(
                    fds.as_mut_ptr(),
                    libc::O_CLOEXEC | libc::O_DIRECT | libc::O_NONBLOCK,
                )
            },
            0
        );
        // SAFETY: both fds are new and ours.
        let (src_r, src_w) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ on our own pipe.
        assert!(unsafe { libc::fcntl(src_w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) } >= 1 << 20);
        let mut q = OutQueue::default();
        let mut expect = Vec::new();
        for id in [1, 2] {
            let data = pattern(20_000 + id as usize);
            for piece in data.chunks(100) {
                write_all(src_w.as_raw_fd(), piece);
            }
            assert_eq!(
                q.splice_frame(0x30, id, src_r.as_raw_fd(), 65536, None),
                Splice::Sent(data.len())
            );
            expect.push((0x30, id, data));
        }
        assert!(q.tail > 0, "everything fit in the staging pipe");
        assert_eq!(q.staged() + q.in_memory(), 2 * 9 + 40_003);
        // A frame queued after them goes out after them.
        codec::append_raw(q.buf(), 0x31, 9, b"after").unwrap();
        expect.push((0x31, 9, b"after".to_vec()));
        assert_eq!(frames(&flush_all(&mut q)), expect);
    }

    #[test]
    fn restart_drops_staged_frames() {
        let (src_r, src_w) = pipe();
        write_all(src_w.as_raw_fd(), &pattern(40_000));
        let mut q = OutQueue::default();
        assert_eq!(
            q.splice_frame(0x30, 7, src_r.as_raw_fd(), 65536, None),
            Splice::Sent(40_000)
        );
        let mut ready = Vec::new();
        codec::append_raw(&mut ready, 0x01, 0, b"\x80").unwrap();
        q.restart_with(&ready);
        assert_eq!(q.staged(), 0);
        assert_eq!(flush_all(&mut q), ready);
    }

    #[test]
    fn restart_drops_the_unsent_rest_of_a_spliced_frame() {
        let mut q = OutQueue::default();
        // As after a partial splice: 5 bytes ending a frame, then a frame.
        q.buf.extend_from_slice(b"12345");
        q.tail = 5;
        codec::append_raw(q.buf(), 0x30, 1, b"next").unwrap();
        q.pos = 2;
        let mut ready = Vec::new();
        codec::append_raw(&mut ready, 0x01, 0, b"\x80").unwrap();
        q.restart_with(&ready);
        let mut expect = ready.clone();
        codec::append_raw(&mut expect, 0x30, 1, b"next").unwrap();
        assert_eq!(q.buf, expect);
        assert_eq!(q.tail, 0);
    }

    #[test]
    fn compaction_keeps_the_tail_of_a_spliced_frame_until_sent() {
        let mut q = OutQueue::default();
        q.buf.extend_from_slice(&pattern(100_000));
        q.tail = 100_000;
        codec::append_raw(q.buf(), 0x30, 1, &pattern(70_000)).unwrap();
        // Part of the tail sent: nothing before `tail` may go.
        q.pos = 90_000;
        q.compact();
        assert_eq!(q.buf.len(), 100_000 + 9 + 70_000);
        // The tail sent and the next frame begun: the tail can go.
        q.pos = 100_010;
        q.compact();
        assert_eq!(q.tail, 0);
        assert_eq!(q.pos, 10);
        assert_eq!(q.buf.len(), 9 + 70_000);
    }

    /// Replies to the departed host stay with it; every session frame goes
    /// to the next host, in order.
    #[test]
    fn restart_keeps_session_frames_and_drops_replies() {
        use crate::messages::Kind;
        let mut q = OutQueue::default();
        let mut ready = Vec::new();
        codec::append_raw(&mut ready, Kind::Ready as u8, 0, b"\x80").unwrap();
        q.buf.extend_from_slice(&ready);
        codec::append_raw(q.buf(), Kind::Started as u8, 4, b"\x81\xa3pid\x07").unwrap();
        codec::append_raw(q.buf(), Kind::Pong as u8, 0, b"ping").unwrap();
        codec::append_raw(q.buf(), Kind::Stdout as u8, 4, b"out").unwrap();
        codec::append_raw(q.buf(), Kind::Error as u8, 9, b"\x80").unwrap();
        codec::append_raw(q.buf(), Kind::StdinAck as u8, 4, b"\x80").unwrap();
        codec::append_raw(q.buf(), Kind::Pong as u8, 0, b"").unwrap();
        codec::append_raw(q.buf(), Kind::Exited as u8, 4, b"\x80").unwrap();
        codec::append_raw(q.buf(), Kind::Error as u8, 0, b"\x80").unwrap();
        q.restart_with(&ready);
        let mut expect = ready.clone();
        codec::append_raw(&mut expect, Kind::Started as u8, 4, b"\x81\xa3pid\x07").unwrap();
        codec::append_raw(&mut expect, Kind::Stdout as u8, 4, b"out").unwrap();
        codec::append_raw(&mut expect, Kind::StdinAck as u8, 4, b"\x80").unwrap();
        codec::append_raw(&mut expect, Kind::Exited as u8, 4, b"\x80").unwrap();
        assert_eq!(q.buf, expect);
        assert_eq!(flush_all(&mut q), expect);
    }

    #[test]
    fn restart_drops_half_sent_frame() {
        let mut q = OutQueue::default();
        codec::append_raw(q.buf(), 0x30, 1, b"aaaa").unwrap();
        codec::append_raw(q.buf(), 0x30, 1, b"bbbb").unwrap();
        q.pos = 3; // part of the first frame went out
        let mut ready = Vec::new();
        codec::append_raw(&mut ready, 0x01, 0, b"\x80").unwrap();
        q.restart_with(&ready);
        let (items, dec) = codec::decode_chunks([&q.buf[..]]);
        assert_eq!(items.len(), 2);
        assert!(dec.is_at_boundary());
        let mut expect = ready.clone();
        codec::append_raw(&mut expect, 0x30, 1, b"bbbb").unwrap();
        assert_eq!(q.buf, expect);
        // Reconnecting again before anything was sent: still one READY.
        q.restart_with(&ready);
        assert_eq!(q.buf, expect);
    }
}
