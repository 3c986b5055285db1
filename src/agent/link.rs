//! One host connection: its transport, the decoder of what the host sends,
//! the queue of what goes to it, and the connection's state. This is the
//! only code that reads or writes a transport fd.
//!
//! The loop keeps its links in a slab. Each link's frames are dispatched
//! against the agent's state (`Core`), and replies and session output are
//! queued on the link the host of that session is on; backpressure is per
//! link: a session stalled by a full queue waits on its link's list of
//! sessions to resume.
//!
//! A device port (virtio-console) is one link for the agent's life, whose
//! host comes and goes (`connected`): see docs/VM.md for how the port
//! reports that, and [`HostLink::host_arrived`] for what a new host gets.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry};

use crate::codec::{Decoder, PartialFrame, HEADER_LEN};

use super::core::Owned;
use super::outqueue::{Flushed, OutQueue, STAGE_LIMIT};
use super::stream::{LinkOut, PayloadSource};
use super::token::{LinkFd, Source};
use super::transport::{Transport, TransportKind};

/// Above this many queued output bytes the link's sessions stop reading
/// their children's output (the children block in write()).
pub(crate) const HIGH_WATER: usize = 1 << 20;
/// Stalled sessions read again once the queue is below this.
pub(crate) const LOW_WATER: usize = 256 << 10;
/// Above this the link also stops reading its transport: the host is not
/// reading, and every frame it sends may add a reply.
pub(crate) const TRANSPORT_READ_CAP: usize = 2 << 20;

/// A STDIN payload streams (is spliced from the transport into the
/// session's stdin pipe) when at least this much of it is still unread.
pub(crate) const STREAM_STDIN_MIN: usize = 16 * 1024;

/// The rest of a STDIN payload still in the transport, for session `id`:
/// it is moved without passing through the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StdinStream {
    pub(crate) id: u32,
    pub(crate) left: usize,
}

/// What one read of the transport gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Input {
    /// Bytes arrived (in the decoder, or moved by a stream).
    Bytes,
    /// Interrupted: read again.
    Again,
    /// Nothing more for now (EAGAIN): wait for the next edge.
    Empty,
    /// End of file or an error: this host is gone.
    Closed,
}

#[derive(Debug)]
pub(crate) struct HostLink {
    transport: Transport,
    decoder: Decoder,
    out: OutQueue,
    /// An edge said readable and no read has hit EAGAIN since.
    readable: bool,
    /// An edge said writable and no write has hit EAGAIN since.
    writable: bool,
    /// A host is there to talk to (always, but for a device port between
    /// hosts).
    connected: bool,
    /// A device port reported HUP: once what the departed host sent is
    /// read, its visit ends (see [`HostLink::end_departed_visit`]).
    hup_pending: bool,
    /// The decoder may hold whole frames not yet dispatched (their
    /// dispatch stopped at the output queue's cap).
    frames_pending: bool,
    /// A STDIN payload being spliced from the transport to its session.
    stdin_stream: Option<StdinStream>,
    /// The last frame was a large STDIN (streamed or not): the next read
    /// takes just a header, so that the next large STDIN payload streams
    /// whole.
    expect_stdin: bool,
    /// Sessions (slab keys) that stopped reading at this link's high-water
    /// mark or at their turn's end, to resume in order.
    stalled: VecDeque<Owned>,
}

impl HostLink {
    pub(crate) fn new(transport: Transport) -> HostLink {
        HostLink {
            transport,
            decoder: Decoder::new(),
            out: OutQueue::default(),
            readable: true,
            writable: true,
            connected: true,
            hup_pending: false,
            frames_pending: false,
            stdin_stream: None,
            expect_stdin: false,
            stalled: VecDeque::new(),
        }
    }

    /// Registers the transport's fds under `key`. epoll refuses regular
    /// files and /dev/null (EPERM); they never block, so such an fd simply
    /// stays "ready": its flag is never cleared by EAGAIN, and reading a
    /// file ends in end of file.
    pub(crate) fn register(&self, registry: &Registry, key: usize) -> io::Result<()> {
        let register = |fd: RawFd, which, interest| {
            let token = Source::Link(key, which).token();
            match registry.register(&mut SourceFd(&fd), token, interest) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
                other => other,
            }
        };
        let t = &self.transport;
        if t.split() {
            register(t.read_fd(), LinkFd::Read, Interest::READABLE)?;
            register(t.write_fd(), LinkFd::Write, Interest::WRITABLE)
        } else {
            let both = Interest::READABLE | Interest::WRITABLE;
            register(t.read_fd(), LinkFd::Read, both)
        }
    }

    pub(crate) fn kind(&self) -> TransportKind {
        self.transport.kind()
    }

    /// Takes the transport's fds out of the poll (before the link goes).
    pub(crate) fn deregister(&self, registry: &Registry) {
        let t = &self.transport;
        let _ = registry.deregister(&mut SourceFd(&t.read_fd()));
        if t.split() {
            let _ = registry.deregister(&mut SourceFd(&t.write_fd()));
        }
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected
    }

    /// Bytes queued for the host and not yet written.
    pub(crate) fn pending(&self) -> usize {
        self.out.pending()
    }

    /// The buffer to append whole frames (replies) to.
    pub(crate) fn frames(&mut self) -> &mut Vec<u8> {
        self.out.buf()
    }

    /// The output side as a stream sees it.
    pub(crate) fn output(&mut self) -> LinkOut<'_> {
        let splice = self.transport.write_is_pipe();
        // Straight into the transport only while it takes bytes.
        let direct = (splice && self.connected && self.writable).then(|| self.transport.write_fd());
        LinkOut {
            queue: &mut self.out,
            splice,
            direct,
            high_water: HIGH_WATER,
        }
    }

    /// A readiness event for one of the transport's fds. Returns true when
    /// it says a new host has arrived on a device port (the caller greets
    /// it with [`HostLink::host_arrived`]).
    pub(crate) fn on_event(&mut self, fd: LinkFd, hup: bool, writable: bool) -> bool {
        match fd {
            LinkFd::Write => {
                self.writable = true;
                return false;
            }
            LinkFd::Read => {
                self.readable = true;
                if writable {
                    self.writable = true;
                }
            }
        }
        if self.kind() != TransportKind::Device {
            return false;
        }
        if hup && self.connected {
            // Read (and serve) what the departed host sent before it left,
            // then end the visit: see end_departed_visit.
            self.hup_pending = true;
        }
        !hup && writable && !self.connected
    }

    /// A new host on a device port: the rest of a frame the old host got
    /// part of is dropped, `greeting` (READY) goes first, everything queued
    /// after it follows (see `OutQueue::restart_with`).
    pub(crate) fn host_arrived(&mut self, greeting: &[u8]) {
        tracing::info!("host connected");
        self.connected = true;
        self.reset_input();
        self.out.restart_with(greeting);
    }

    fn reset_input(&mut self) {
        self.decoder = Decoder::new();
        self.stdin_stream = None;
        self.expect_stdin = false;
        self.frames_pending = false;
    }

    /// The host of a device port went away: sessions keep running, output
    /// waits (backpressure applies) for the next host.
    pub(crate) fn host_left(&mut self) {
        tracing::info!("host went away; sessions keep running");
        self.connected = false;
        self.reset_input();
    }

    /// Whether a HUP is waiting to end the visit.
    pub(crate) fn hup_pending(&self) -> bool {
        self.hup_pending
    }

    /// After a HUP on a device port and the read that followed it: drops
    /// whatever the departed host's bytes still hold (the rest of a partial
    /// frame, or input left unread above the read cap) and ends the visit.
    /// The virtio port keeps bytes a host sent until they are read, even
    /// after that host is gone, so without this the next host's stream
    /// would start with the old host's leftovers.
    /// Returns whether the visit ended (the host had not already come back).
    pub(crate) fn end_departed_visit(&mut self) -> bool {
        self.hup_pending = false;
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: `buf` is a valid writable buffer of the given length.
            let n =
                unsafe { libc::read(self.transport.read_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            // 0: no host and nothing buffered; < 0: EAGAIN (a new host is
            // already there) or an error: stop either way.
            if n <= 0 {
                break;
            }
            tracing::debug!(bytes = n, "dropped input of a departed host");
        }
        if self.connected {
            self.host_left();
            return true;
        }
        false
    }

    /// Whether the transport may be read now: a host is there, an edge
    /// said readable, and the queue is under the read cap.
    pub(crate) fn may_read(&self) -> bool {
        self.connected && self.readable && self.out.pending() < TRANSPORT_READ_CAP
    }

    /// Whether frames wait in the decoder and the output queue has room
    /// for their replies: the loop must dispatch them before it sleeps.
    pub(crate) fn can_dispatch(&self) -> bool {
        self.frames_pending && self.connected && self.out.pending() < TRANSPORT_READ_CAP
    }

    pub(crate) fn frames_pending(&self) -> bool {
        self.frames_pending
    }

    /// Whether the queue is at the read cap: no more frames are dispatched
    /// until the host reads.
    pub(crate) fn at_read_cap(&self) -> bool {
        self.out.pending() >= TRANSPORT_READ_CAP
    }

    /// Reads once from the transport into the decoder (just a header when a
    /// large STDIN is expected next).
    pub(crate) fn read_frames(&mut self) -> Input {
        let limit = if self.expect_stdin {
            HEADER_LEN
        } else {
            usize::MAX
        };
        let read = self.decoder.read_fd_upto(self.transport.read_fd(), limit);
        let input = self.after_read(read);
        if input == Input::Bytes {
            self.expect_stdin = false;
            self.frames_pending = true;
        }
        input
    }

    /// Handles what a read of the transport returned: end of file and
    /// errors end the host's visit, EAGAIN waits for the next edge, EINTR
    /// reads again.
    fn after_read(&mut self, read: io::Result<usize>) -> Input {
        match read {
            Ok(0) => {
                self.readable = false;
                Input::Closed
            }
            Ok(_) => Input::Bytes,
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted => Input::Again,
                io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    Input::Empty
                }
                _ => {
                    tracing::warn!(error = %e, "reading the transport failed");
                    self.readable = false;
                    Input::Closed
                }
            },
        }
    }

    /// Takes the decoder out, to dispatch its frames against the rest of
    /// the agent; [`HostLink::put_decoder`] puts it back.
    pub(crate) fn take_decoder(&mut self) -> Decoder {
        std::mem::take(&mut self.decoder)
    }

    /// Puts the decoder back; `drained` says no whole frame is left in it.
    pub(crate) fn put_decoder(&mut self, decoder: Decoder, drained: bool) {
        self.decoder = decoder;
        if drained {
            self.frames_pending = false;
        }
    }

    /// Notes the kind and size of a frame just dispatched: after a large
    /// STDIN read whole, the next one may stream (a pipe only).
    pub(crate) fn note_frame(&mut self, stdin_len: Option<usize>) {
        self.expect_stdin =
            self.transport.read_is_pipe() && stdin_len.is_some_and(|len| len >= STREAM_STDIN_MIN);
    }

    pub(crate) fn stdin_stream(&self) -> Option<StdinStream> {
        self.stdin_stream
    }

    /// A STDIN frame whose header the decoder holds and most of whose
    /// payload is still in the transport (a pipe): a candidate to stream.
    pub(crate) fn streamable_stdin(&self, stdin_kind: u8) -> Option<PartialFrame> {
        if !self.transport.read_is_pipe() {
            return None;
        }
        self.decoder
            .partial_frame()
            .filter(|p| p.kind == stdin_kind && p.len - p.buffered >= STREAM_STDIN_MIN)
    }

    /// Starts streaming the partial frame `p`: returns the payload bytes
    /// the decoder held and the frame buffer for acknowledgements.
    pub(crate) fn begin_stdin_stream(&mut self, p: PartialFrame) -> (&[u8], &mut Vec<u8>) {
        self.stdin_stream = Some(StdinStream {
            id: p.id,
            left: p.len - p.buffered,
        });
        self.expect_stdin = true;
        (self.decoder.take_partial(), self.out.buf())
    }

    /// The streamed payload's session is gone: the decoder skips the rest.
    pub(crate) fn skip_stdin_stream(&mut self) {
        if let Some(s) = self.stdin_stream.take() {
            self.decoder.skip(s.left);
            self.expect_stdin = false;
        }
    }

    /// The transport as a source for the streamed payload, and the frame
    /// buffer for acknowledgements.
    pub(crate) fn stdin_source(&mut self) -> (TransportReader<'_>, &mut Vec<u8>) {
        (
            TransportReader {
                fd: self.transport.read_fd(),
                _link: std::marker::PhantomData,
            },
            self.out.buf(),
        )
    }

    /// Accounts for what a streaming step moved (`read` as from the
    /// transport: `Ok(0)` is its end).
    pub(crate) fn stdin_streamed(&mut self, read: io::Result<usize>) -> Input {
        let moved = *read.as_ref().unwrap_or(&0);
        let input = self.after_read(read);
        if let Some(s) = &mut self.stdin_stream {
            s.left -= moved.min(s.left);
            if s.left == 0 {
                self.stdin_stream = None;
            }
        }
        input
    }

    /// Writes what is queued while the transport takes it. An error is
    /// returned: the host is gone.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if !self.connected || !self.writable || self.out.pending() == 0 {
            return Ok(());
        }
        match self.out.flush(self.transport.write_fd()) {
            Ok(Flushed::All) => Ok(()),
            Ok(Flushed::Partial) => {
                self.writable = false;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "writing the transport failed");
                self.writable = false;
                Err(e)
            }
        }
    }

    /// Puts a session on the list of those to resume.
    pub(crate) fn stall(&mut self, owner: Owned) {
        self.stalled.push_back(owner);
    }

    /// The sessions to resume now, in order (and the list is emptied), or
    /// none when they would only stall again: over a pipe transport their
    /// output is staged by splice, which needs nothing queued in memory and
    /// room in the staging pipe (the transport's writability edge wakes the
    /// loop once it drains); over anything else, once the queue is under
    /// the low-water mark.
    pub(crate) fn take_resumable(&mut self) -> VecDeque<Owned> {
        if self.may_resume_stalled() {
            std::mem::take(&mut self.stalled)
        } else {
            VecDeque::new()
        }
    }

    pub(crate) fn may_resume_stalled(&self) -> bool {
        if self.stalled.is_empty() || !self.connected {
            return false;
        }
        if self.transport.write_is_pipe() {
            self.out.in_memory() == 0 && self.out.staged() < STAGE_LIMIT
        } else {
            self.out.pending() < LOW_WATER
        }
    }

    /// Before the loop sleeps: gives back a flood's larger buffer.
    pub(crate) fn release_spare(&mut self) {
        self.out.release_spare();
    }

    /// Before the agent exits: writes what is queued, waiting at most until
    /// `end` for a slow host.
    pub(crate) fn finish_output(&mut self, end: Instant) {
        while self.out.pending() > 0 && self.connected {
            match self.out.flush(self.transport.write_fd()) {
                Ok(Flushed::All) | Err(_) => return,
                Ok(Flushed::Partial) => {}
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let mut pfd = libc::pollfd {
                fd: self.transport.write_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            let ms = left.min(Duration::from_secs(1)).as_millis() as libc::c_int;
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
    }
}

/// The transport's read side, for a payload that streams out of it.
pub(crate) struct TransportReader<'a> {
    fd: RawFd,
    _link: std::marker::PhantomData<&'a HostLink>,
}

impl PayloadSource for TransportReader<'_> {
    fn splice_into(&mut self, dst: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: splice between two pipes we hold, null offsets.
        let n = unsafe {
            libc::splice(
                self.fd,
                std::ptr::null_mut(),
                dst,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn read_into(&mut self, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
        buf.reserve(max);
        let spare = buf.spare_capacity_mut();
        // SAFETY: `spare` has room for `max` bytes; only what read reports
        // written is marked initialised.
        let n = unsafe { libc::read(self.fd, spare.as_mut_ptr().cast(), max) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (n as usize).min(max);
        // SAFETY: read initialised the first n spare bytes.
        unsafe { buf.set_len(buf.len() + n) };
        Ok(n)
    }

    fn skip(&mut self, max: usize) -> io::Result<usize> {
        let mut scratch = [0u8; 64 * 1024];
        let want = max.min(scratch.len());
        // SAFETY: reading into a local buffer of at least `want` bytes.
        let n = unsafe { libc::read(self.fd, scratch.as_mut_ptr().cast(), want) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}
