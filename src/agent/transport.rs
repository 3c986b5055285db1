//! The byte stream to the host, and the queue of frames waiting to go out.
//!
//! Three kinds of transport share one shape: a read fd and a write fd, both
//! nonblocking and close-on-exec (the same fd for a socket or a device).
//! What end of file means differs: on stdio or a socket it is the end of
//! the agent (contract guarantee 7), on a device port only the end of one
//! host connection.
//!
//! [`OutQueue`] is the only buffer on the output path. Frames are encoded
//! (or read from children) straight into it and written from a cursor;
//! it never blocks and it is bounded by the loop, which stops reading
//! children's output above a high-water mark.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::codec::HEADER_LEN;

use super::spawn::set_nonblocking;

/// What end of file on the transport means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// The agent's own stdin/stdout (loopback tests, `agentctl` embedded).
    Stdio,
    /// A Unix socket or a FIFO: one host, for the agent's lifetime.
    Stream,
    /// A virtio-console port: hosts come and go; the port stays open.
    Device,
}

#[derive(Debug)]
pub struct Transport {
    read: OwnedFd,
    /// `None` when the read fd is also written (socket, device).
    write: Option<OwnedFd>,
    pub kind: TransportKind,
    /// The write side is a pipe, so a pipe session's output can be moved
    /// into it with splice(2) (see [`OutQueue::splice_frame`]).
    pub write_is_pipe: bool,
}

/// True when `fd` is a pipe or FIFO.
fn is_pipe(fd: RawFd) -> bool {
    // SAFETY: fstat writes into a local stat buffer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFIFO
    }
}

fn dup_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC creates a new fd (>= 3) that we then own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl succeeded; the new fd is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

impl Transport {
    /// Takes over stdin and stdout: duplicates them close-on-exec above 2
    /// and points fds 0 and 1 at /dev/null, so no child can inherit the
    /// transport and no stray write to stdout can corrupt the stream.
    pub fn stdio() -> io::Result<Transport> {
        let read = dup_cloexec(0)?;
        let write = dup_cloexec(1)?;
        // SAFETY: a constant path; the fd is checked and closed below.
        let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if null < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: dup2 onto fds 0 and 1, which the agent owns; `null` is
        // closed once copied.
        unsafe {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::close(null);
        }
        set_nonblocking(read.as_raw_fd())?;
        set_nonblocking(write.as_raw_fd())?;
        grow_pipe(read.as_raw_fd());
        grow_pipe(write.as_raw_fd());
        Ok(Transport {
            write_is_pipe: is_pipe(write.as_raw_fd()),
            read,
            write: Some(write),
            kind: TransportKind::Stdio,
        })
    }

    /// Opens `path`: a Unix socket is connected to, anything else (a
    /// character device such as a virtio port, a FIFO) is opened
    /// read-write.
    pub fn open(path: &Path) -> io::Result<Transport> {
        let meta = std::fs::metadata(path)?;
        let ft = meta.file_type();
        if ft.is_socket() {
            let stream = UnixStream::connect(path)?;
            stream.set_nonblocking(true)?;
            return Ok(Transport {
                read: stream.into(),
                write: None,
                kind: TransportKind::Stream,
                write_is_pipe: false,
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path)?;
        let kind = if ft.is_char_device() {
            TransportKind::Device
        } else {
            TransportKind::Stream
        };
        Ok(Transport::from_fd(file.into(), kind))
    }

    /// Wraps an fd that is already open, close-on-exec and nonblocking.
    pub fn from_fd(fd: OwnedFd, kind: TransportKind) -> Transport {
        Transport {
            write_is_pipe: is_pipe(fd.as_raw_fd()),
            read: fd,
            write: None,
            kind,
        }
    }

    pub fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    pub fn write_fd(&self) -> RawFd {
        self.write.as_ref().unwrap_or(&self.read).as_raw_fd()
    }

    /// True when reading and writing use separate fds (stdio).
    pub fn split(&self) -> bool {
        self.write.is_some()
    }
}

/// Bytes a pipe between the host and the agent may buffer in the kernel, in
/// each direction. A 64 KiB frame fills a default (64 KiB) pipe by itself,
/// so each side would wake once per frame; with room for several frames
/// the agent writes its output, and the host its STDIN up to the window,
/// in one go.
const TRANSPORT_PIPE_SIZE: libc::c_int = 1 << 20;

/// Enlarges the pipe behind `fd`, if it is one (best effort: the limit
/// `/proc/sys/fs/pipe-max-size` may refuse it, which changes nothing).
fn grow_pipe(fd: RawFd) {
    // SAFETY: F_SETPIPE_SZ takes an integer; on a non-pipe it fails with
    // EBADF or EINVAL and nothing changes.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, TRANSPORT_PIPE_SIZE) };
}

/// What a flush achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Everything queued was written.
    All,
    /// The fd would block; the rest waits for writability.
    Partial,
}

/// Frames waiting for the transport: appended at the end, written from
/// `pos`. `frame_start` is the start of the frame that `pos` is in, so a
/// device reconnect can tell a half-sent frame from whole ones.
#[derive(Debug, Default)]
pub struct OutQueue {
    buf: Vec<u8>,
    pos: usize,
    frame_start: usize,
    /// The first `tail` bytes of `buf` end a frame whose beginning went to
    /// the transport directly ([`OutQueue::splice_frame`]); frames proper
    /// start after them. While `pos < tail` that frame is the one being
    /// sent, and `frame_start` is 0.
    tail: usize,
    /// splice(2) failed in a way that says it will keep failing.
    splice_unsupported: bool,
    /// A splice found the transport full; see `take_transport_full`.
    transport_full: bool,
}

/// What [`OutQueue::splice_frame`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Splice {
    /// A frame with this many payload bytes is on its way.
    Sent(usize),
    /// Nothing: read this output into the queue the ordinary way.
    No,
    /// Nothing: leave the output in the child's pipe for now.
    Wait,
}

/// Below this much buffered output a frame is read, not spliced: for a
/// few bytes one read beats an ioctl, a header write and a splice.
pub const SPLICE_MIN: usize = 16 * 1024;

/// Capacity kept when the loop goes to sleep with an empty queue; a
/// flood's larger buffer is given back then.
const KEEP_CAPACITY: usize = 256 * 1024;

impl OutQueue {
    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The buffer to append whole frames to.
    pub fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Writes as much as the fd takes. EINTR is retried; EAGAIN ends the
    /// flush with [`Flushed::Partial`]; any other error is returned (the
    /// caller decides what a broken transport means).
    pub fn flush(&mut self, fd: RawFd) -> io::Result<Flushed> {
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

    /// Sends one frame of `kind` for session `id` whose payload the kernel
    /// moves from the pipe `src` into the pipe `dst` (the transport) without
    /// copying it through the agent: the header is written, then splice(2)
    /// moves the bytes. Whatever splice does not move (the transport filled
    /// up) is read into the queue as the rest of that frame, so the frame
    /// is always whole. `src` must be a pipe only the agent reads.
    ///
    /// Less than [`SPLICE_MIN`] buffered in `src` (or its end) is
    /// [`Splice::No`]: the caller reads it the ordinary way. Otherwise, if
    /// something is queued (the frame would overtake it) or the transport
    /// is full, nothing is read ([`Splice::Wait`]): the output waits in the
    /// child's pipe, not in the agent, until the queue is empty and the
    /// transport writable again.
    pub fn splice_frame(
        &mut self,
        dst: RawFd,
        kind: u8,
        id: u32,
        src: RawFd,
        max: usize,
    ) -> Splice {
        if self.splice_unsupported || max < SPLICE_MIN {
            return Splice::No;
        }
        let mut buffered: libc::c_int = 0;
        // SAFETY: FIONREAD writes the byte count into a local integer.
        if unsafe { libc::ioctl(src, libc::FIONREAD, &mut buffered) } < 0 {
            return Splice::No;
        }
        let buffered = usize::try_from(buffered).unwrap_or(0);
        if buffered < SPLICE_MIN {
            return Splice::No;
        }
        if self.pending() != 0 {
            return Splice::Wait;
        }
        let len = buffered.min(max);
        let header = crate::codec::header(kind, id, len);
        let written = loop {
            // SAFETY: writing from a local array of the given length.
            let n = unsafe { libc::write(dst, header.as_ptr().cast(), header.len()) };
            if n >= 0 {
                break n as usize;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    self.transport_full = true;
                    return Splice::Wait;
                }
                // A broken transport: the ordinary path queues the frame,
                // and the flush meets the error.
                _ => return Splice::No,
            }
        };
        // Nine bytes into a pipe go in whole or not at all (PIPE_BUF), so
        // this is for form's sake.
        self.buf.clear();
        self.pos = 0;
        self.frame_start = 0;
        self.buf.extend_from_slice(&header[written..]);
        let mut moved = 0;
        while moved < len && self.buf.is_empty() {
            // SAFETY: splice between two fds we hold, null offsets (pipes).
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
                // read below settles it.
                break;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                // The transport is full: the rest goes through the queue.
                Some(libc::EAGAIN) => break,
                _ => {
                    // EINVAL and the like: this pair of fds cannot be
                    // spliced; never try again.
                    self.splice_unsupported = true;
                    break;
                }
            }
        }
        // The rest of the payload is buffered in `src` (FIONREAD counted it
        // and nobody else reads there): read it into the queue.
        let mut rest = len - moved;
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
        Splice::Sent(len)
    }

    /// True once after a splice found the transport full (EAGAIN): the
    /// loop then waits for it to become writable.
    pub fn take_transport_full(&mut self) -> bool {
        std::mem::take(&mut self.transport_full)
    }

    /// Gives back a flood's larger buffer once the queue is empty. The loop
    /// calls this before it sleeps, not each time the queue empties: in a
    /// flood the queue empties and refills many times a second, and
    /// shrinking then regrowing it each time costs a remap and a page
    /// fault per page of every round.
    pub fn release_spare(&mut self) {
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
    /// a frame the old host got part of, and puts `greeting` (a whole
    /// frame, READY) before every other queued frame.
    pub fn restart_with(&mut self, greeting: &[u8]) {
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
        let mut rest = self.buf.split_off(first_whole.min(self.buf.len()));
        // A READY still unsent (queued for a host that never read it) is
        // replaced, not repeated.
        if rest.len() >= HEADER_LEN && rest[4] == crate::messages::Kind::Ready as u8 {
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            rest.drain(..(4 + len).min(rest.len()));
        }
        self.buf.clear();
        self.buf.extend_from_slice(greeting);
        self.buf.extend_from_slice(&rest);
        self.pos = 0;
        self.frame_start = 0;
        self.tail = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{self, Decoded};

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new fds, which we then own.
        assert_eq!(
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

    #[test]
    fn splice_sends_a_whole_frame_without_queueing() {
        let (src_r, src_w) = pipe();
        let (dst_r, dst_w) = pipe();
        // SAFETY: F_SETPIPE_SZ on our own pipe.
        unsafe { libc::fcntl(dst_w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
        let data = pattern(40_000);
        write_all(src_w.as_raw_fd(), &data);
        let mut q = OutQueue::default();
        let sent = q.splice_frame(dst_w.as_raw_fd(), 0x30, 7, src_r.as_raw_fd(), 65536);
        assert_eq!(sent, Splice::Sent(40_000));
        assert_eq!(q.pending(), 0);
        assert_eq!(frames(&drain(dst_r.as_raw_fd())), [(0x30, 7, data)]);
        // Less than SPLICE_MIN buffered: left to the ordinary read.
        write_all(src_w.as_raw_fd(), &pattern(100));
        assert_eq!(
            q.splice_frame(dst_w.as_raw_fd(), 0x30, 7, src_r.as_raw_fd(), 65536),
            Splice::No
        );
        // Something queued: never spliced ahead of it; the output waits.
        write_all(src_w.as_raw_fd(), &pattern(40_000));
        codec::append_raw(q.buf(), 0x31, 7, b"queued");
        assert_eq!(
            q.splice_frame(dst_w.as_raw_fd(), 0x30, 7, src_r.as_raw_fd(), 65536),
            Splice::Wait
        );
        assert!(!q.take_transport_full());
        q.flush(dst_w.as_raw_fd()).unwrap();
        drain(dst_r.as_raw_fd());
        // A full transport: the output waits, and the loop is told.
        let mut filler = 0;
        loop {
            // SAFETY: writing from a local buffer to our own pipe.
            let n = unsafe { libc::write(dst_w.as_raw_fd(), [0u8; 4096].as_ptr().cast(), 4096) };
            if n <= 0 {
                break;
            }
            filler += n as usize;
        }
        assert!(filler > 0);
        assert_eq!(
            q.splice_frame(dst_w.as_raw_fd(), 0x30, 7, src_r.as_raw_fd(), 65536),
            Splice::Wait
        );
        assert!(q.take_transport_full());
        assert!(!q.take_transport_full(), "reported once");
        assert_eq!(q.pending(), 0, "nothing was read");
    }

    #[test]
    fn splice_into_a_full_transport_queues_the_rest_of_the_frame() {
        let (src_r, src_w) = pipe();
        let (dst_r, dst_w) = pipe();
        // A 64 KiB transport holding 60,000 bytes already: the splice can
        // move little or nothing of a 50,000-byte payload.
        let before = pattern(60_000);
        write_all(dst_w.as_raw_fd(), &before);
        let data = pattern(50_000);
        write_all(src_w.as_raw_fd(), &data);
        let mut q = OutQueue::default();
        let sent = q.splice_frame(dst_w.as_raw_fd(), 0x30, 9, src_r.as_raw_fd(), 65536);
        assert_eq!(sent, Splice::Sent(50_000));
        assert!(q.pending() > 0, "the transport took all of it");
        assert!(q.tail > 0);
        // A frame queued after the spliced one goes out after it.
        codec::append_raw(q.buf(), 0x31, 9, b"after");
        let mut stream = drain(dst_r.as_raw_fd());
        assert_eq!(&stream[..before.len()], &before[..]);
        stream.drain(..before.len());
        loop {
            let done = q.flush(dst_w.as_raw_fd()).unwrap() == Flushed::All;
            stream.extend(drain(dst_r.as_raw_fd()));
            if done {
                break;
            }
        }
        assert_eq!(
            frames(&stream),
            [(0x30, 9, data), (0x31, 9, b"after".to_vec())]
        );
    }

    #[test]
    fn splice_to_something_that_cannot_take_it_falls_back_for_good() {
        let (src_r, src_w) = pipe();
        // A file opened for appending: the header goes in, splice refuses
        // (EINVAL), and the payload is read into the queue instead.
        let path = std::env::temp_dir().join(format!("agentd-splice-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let data = pattern(30_000);
        write_all(src_w.as_raw_fd(), &data);
        let mut q = OutQueue::default();
        let sent = q.splice_frame(file.as_raw_fd(), 0x30, 3, src_r.as_raw_fd(), 65536);
        assert_eq!(sent, Splice::Sent(30_000));
        q.flush(file.as_raw_fd()).unwrap();
        drop(file);
        let stream = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(frames(&stream), [(0x30, 3, data)]);
        assert!(q.splice_unsupported);
        write_all(src_w.as_raw_fd(), &pattern(30_000));
        assert_eq!(
            q.splice_frame(1, 0x30, 3, src_r.as_raw_fd(), 65536),
            Splice::No,
            "tried again after splice said it cannot"
        );
    }

    #[test]
    fn restart_drops_the_unsent_rest_of_a_spliced_frame() {
        let mut q = OutQueue::default();
        // As after a partial splice: 5 bytes ending a frame, then a frame.
        q.buf.extend_from_slice(b"12345");
        q.tail = 5;
        codec::append_raw(q.buf(), 0x30, 1, b"next");
        q.pos = 2;
        let mut ready = Vec::new();
        codec::append_raw(&mut ready, 0x01, 0, b"\x80");
        q.restart_with(&ready);
        let mut expect = ready.clone();
        codec::append_raw(&mut expect, 0x30, 1, b"next");
        assert_eq!(q.buf, expect);
        assert_eq!(q.tail, 0);
    }

    #[test]
    fn compaction_keeps_the_tail_of_a_spliced_frame_until_sent() {
        let mut q = OutQueue::default();
        q.buf.extend_from_slice(&pattern(100_000));
        q.tail = 100_000;
        codec::append_raw(q.buf(), 0x30, 1, &pattern(70_000));
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

    #[test]
    fn restart_drops_half_sent_frame() {
        let mut q = OutQueue::default();
        codec::append_raw(q.buf(), 0x30, 1, b"aaaa");
        codec::append_raw(q.buf(), 0x30, 1, b"bbbb");
        q.pos = 3; // part of the first frame went out
        let mut ready = Vec::new();
        codec::append_raw(&mut ready, 0x01, 0, b"\x80");
        q.restart_with(&ready);
        let (items, dec) = codec::decode_chunks([&q.buf[..]]);
        assert_eq!(items.len(), 2);
        assert!(dec.is_at_boundary());
        let mut expect = ready.clone();
        codec::append_raw(&mut expect, 0x30, 1, b"bbbb");
        assert_eq!(q.buf, expect);
        // Reconnecting again before anything was sent: still one READY.
        q.restart_with(&ready);
        assert_eq!(q.buf, expect);
    }
}
