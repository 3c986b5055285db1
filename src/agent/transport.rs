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
        grow_pipe(write.as_raw_fd());
        Ok(Transport {
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

/// Bytes a pipe to the host may buffer in the kernel. A 64 KiB frame fills
/// a default (64 KiB) pipe by itself, so the agent would wake once per
/// frame; with room for several frames it writes them in one go.
const TRANSPORT_PIPE_SIZE: libc::c_int = 1 << 20;

/// Enlarges the pipe behind `fd`, if it is one (best effort: the limit
/// `/proc/sys/fs/pipe-max-size` may refuse it, which changes nothing).
fn grow_pipe(fd: RawFd) {
    // SAFETY: F_SETPIPE_SZ takes an integer; on a non-pipe it fails with
    // EBADF or EINVAL and nothing changes.
    unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, TRANSPORT_PIPE_SIZE) };
}

/// A reader over a raw fd the caller keeps open.
pub struct FdReader(pub RawFd);

impl io::Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a valid writable slice of the given length.
        let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
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
}

/// Capacity kept after the queue empties; a flood's larger buffer is
/// given back.
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
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf.shrink_to(KEEP_CAPACITY);
        }
        Ok(Flushed::All)
    }

    /// Moves `frame_start` up to the frame that contains `pos`.
    fn track_frames(&mut self) {
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
            self.frame_start = 0;
        }
    }

    /// For a new host connection on a device port: drops the unsent rest of
    /// a frame the old host got part of, and puts `greeting` (a whole
    /// frame, READY) before every other queued frame.
    pub fn restart_with(&mut self, greeting: &[u8]) {
        self.track_frames();
        let first_whole = if self.pos > self.frame_start {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

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
