//! The `net` extension, loop side: each NET_CONNECT becomes a [`Conn`], a
//! guest socket in the poll loop with a stream each way: an [`Outflow`]
//! (NET_RECV, within the request's window) and an [`Inflow`] (NET_SEND,
//! within READY's `stdin_window`, closed by `shutdown(SHUT_WR)` on the
//! host's NET_SHUTDOWN). Connecting never blocks: a nonblocking connect
//! whose outcome `SO_ERROR` gives once the socket is writable, or, for a
//! name to resolve or a `user`, a worker that connects and passes the
//! socket back (`connect`). A guest server that never reads stalls only
//! its own connection.

pub(crate) mod connect;
mod serve;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use mio::unix::SourceFd;
use mio::{Interest, Registry};

use crate::messages::{Kind, NetClosed, NetConnected, NetErrorKind, NetFailed};

use super::stream::{
    Acks, Close, Flushed, Inflow, InflowError, LinkOut, Outflow, Pumped, Sink, Window,
};
use super::timers::TimerKey;
use super::token::{NetFd, Source};

/// The default agent → host window of a connection.
pub(crate) const DEFAULT_WINDOW: u32 = 1 << 20;

/// How much a connection reads in one turn before the others go.
const READ_TURN: usize = 1024 * 1024;

/// Where a connection is.
#[derive(Debug)]
enum State {
    /// A nonblocking connect is under way on `sock`; `rest` are the
    /// addresses to try after it.
    Connecting {
        /// The address being tried (none yet: the first is being set up).
        current: Option<SocketAddr>,
        rest: Vec<SocketAddr>,
        timer: TimerKey,
    },
    /// A worker resolves and connects; it answers on `ctl`.
    Delegated {
        pid: libc::pid_t,
        ctl: OwnedFd,
        timer: TimerKey,
    },
    /// Connected: bytes flow.
    Open,
}

/// One connection to a guest socket.
#[derive(Debug)]
pub(crate) struct Conn {
    id: u32,
    link: usize,
    seq: u64,
    state: State,
    sock: Option<OwnedFd>,
    /// The Unix socket path, for NET_CONNECTED.
    unix_path: Option<String>,
    /// What NET_CONNECT asked for (`HOST:PORT` or the path) and its
    /// timeout, for messages.
    target: String,
    timeout_ms: u32,
    out: Outflow,
    window: Window,
    input: Inflow,
    /// NET_EOF has gone to the host.
    eof_sent: bool,
    /// An event came after NET_EOF, when the socket is no longer read: an
    /// error (the guest's RST) is only seen in SO_ERROR.
    check_error: bool,
    stalled: bool,
}

/// What servicing a connection came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    Idle,
    Stalled,
    /// Its final frame (NET_FAILED or NET_CLOSED) is queued.
    Done,
}

impl Conn {
    pub(crate) fn new(id: u32, link: usize, seq: u64, window: u32, timer: TimerKey) -> Conn {
        Conn {
            id,
            link,
            seq,
            state: State::Connecting {
                current: None,
                rest: Vec::new(),
                timer,
            },
            sock: None,
            unix_path: None,
            target: String::new(),
            timeout_ms: 0,
            out: Outflow::new(Kind::NetRecv as u8, true, false),
            window: Window::new(window),
            input: Inflow::new(Close::ShutdownWrite, true),
            eof_sent: false,
            check_error: false,
            stalled: false,
        }
    }

    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    pub(crate) fn link(&self) -> usize {
        self.link
    }

    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    pub(crate) fn set_unix_path(&mut self, path: String) {
        self.unix_path = Some(path);
    }

    /// What NET_CONNECT asked for, and its timeout, for messages.
    pub(crate) fn set_target(&mut self, target: String, timeout_ms: u32) {
        self.target = target;
        self.timeout_ms = timeout_ms;
    }

    /// The NET_FAILED of a connect timer that fired.
    pub(crate) fn timed_out(&self) -> NetFailed {
        let m = format!(
            "connect {}: no connection within {} ms (timeout_ms)",
            self.target, self.timeout_ms
        );
        NetFailed::new(NetErrorKind::TimedOut, m, Some(libc::ETIMEDOUT))
    }

    pub(crate) fn mark_stalled(&mut self) -> bool {
        !std::mem::replace(&mut self.stalled, true)
    }

    pub(crate) fn take_stalled(&mut self) -> bool {
        std::mem::take(&mut self.stalled)
    }

    /// The connect timer, while connecting.
    pub(crate) fn timer(&self) -> Option<TimerKey> {
        match &self.state {
            State::Connecting { timer, .. } | State::Delegated { timer, .. } => Some(*timer),
            State::Open => None,
        }
    }

    /// A connect under way on `sock` (registered under `key`), with the
    /// addresses to try after it.
    pub(crate) fn connecting(
        &mut self,
        sock: OwnedFd,
        addr: Option<SocketAddr>,
        rest: Vec<SocketAddr>,
        key: usize,
        registry: &Registry,
    ) -> std::io::Result<()> {
        register(registry, sock.as_raw_fd(), key, NetFd::Socket)?;
        self.sock = Some(sock);
        if let State::Connecting {
            current, rest: r, ..
        } = &mut self.state
        {
            *current = addr;
            *r = rest;
        }
        Ok(())
    }

    /// What is being connected to, for messages.
    pub(crate) fn describe_target(&self) -> String {
        match (&self.state, &self.unix_path) {
            (_, Some(p)) => p.clone(),
            (
                State::Connecting {
                    current: Some(a), ..
                },
                _,
            ) => a.to_string(),
            _ => String::new(),
        }
    }

    /// A worker connects for this connection; it answers on `ctl`.
    pub(crate) fn delegated(
        &mut self,
        pid: libc::pid_t,
        ctl: OwnedFd,
        key: usize,
        registry: &Registry,
    ) -> std::io::Result<()> {
        register(registry, ctl.as_raw_fd(), key, NetFd::Worker)?;
        if let State::Connecting { timer, .. } = self.state {
            self.state = State::Delegated { pid, ctl, timer };
        }
        Ok(())
    }

    /// The connected socket `sock` (registered under `key`): NET_CONNECTED
    /// goes to the host and bytes may flow.
    pub(crate) fn opened(
        &mut self,
        sock: OwnedFd,
        key: usize,
        link: &mut LinkOut<'_>,
        registry: &Registry,
    ) -> Result<(), NetFailed> {
        if self.sock.as_ref().map(AsRawFd::as_raw_fd) != Some(sock.as_raw_fd()) {
            super::sys::set_nonblocking(sock.as_raw_fd())
                .map_err(|e| connect::failure(&e, "the socket"))?;
            register(registry, sock.as_raw_fd(), key, NetFd::Socket)
                .map_err(|e| connect::failure(&e, "registering the socket"))?;
        }
        let (peer, local) = connect::addresses(sock.as_raw_fd(), self.unix_path.as_deref());
        self.sock = Some(sock);
        if let State::Delegated { ctl, .. } = &self.state {
            let _ = registry.deregister(&mut SourceFd(&ctl.as_raw_fd()));
        }
        self.state = State::Open;
        crate::agent::core::push_map(
            link.frames(),
            Kind::NetConnected,
            self.id,
            &NetConnected { peer, local },
        );
        Ok(())
    }

    /// Takes the socket out (a failed connect, to try the next address).
    pub(crate) fn take_socket(&mut self, registry: &Registry) -> Option<OwnedFd> {
        let sock = self.sock.take()?;
        let _ = registry.deregister(&mut SourceFd(&sock.as_raw_fd()));
        Some(sock)
    }

    /// The next address to try, while connecting.
    pub(crate) fn next_address(&mut self) -> Option<SocketAddr> {
        match &mut self.state {
            State::Connecting { rest, .. } if !rest.is_empty() => Some(rest.remove(0)),
            _ => None,
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        matches!(self.state, State::Open)
    }

    pub(crate) fn is_connecting(&self) -> bool {
        matches!(self.state, State::Connecting { .. })
    }

    /// The worker connecting for it, if one does.
    pub(crate) fn connector(&self) -> Option<(libc::pid_t, RawFd)> {
        match &self.state {
            State::Delegated { pid, ctl, .. } => Some((*pid, ctl.as_raw_fd())),
            _ => None,
        }
    }

    pub(crate) fn socket_fd(&self) -> Option<RawFd> {
        self.sock.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// A readiness event on the socket.
    pub(crate) fn on_event(&mut self, readable: bool, writable: bool) {
        if readable {
            self.out.on_readable();
            self.check_error = self.eof_sent;
        }
        if writable {
            self.input.on_writable();
        }
    }

    fn acks<'a>(&self, out: Option<&'a mut Vec<u8>>) -> Acks<'a> {
        Acks {
            out,
            kind: Kind::NetSendAck as u8,
            id: self.id,
        }
    }

    /// The fd NET_SEND bytes are written to: none before the connection is
    /// open (they are queued).
    fn in_fd(&self) -> Option<RawFd> {
        self.is_open().then(|| self.socket_fd()).flatten()
    }

    /// NET_SEND.
    pub(crate) fn push(
        &mut self,
        data: &[u8],
        window: u32,
        frames: &mut Vec<u8>,
    ) -> Result<(), InflowError> {
        let fd = self.in_fd();
        let mut acks = self.acks(Some(frames));
        self.input.push(data, window, fd, &mut acks).map(|_| ())
    }

    /// NET_SHUTDOWN.
    pub(crate) fn shutdown(&mut self, frames: &mut Vec<u8>) -> Result<(), InflowError> {
        let fd = self.in_fd();
        let mut acks = self.acks(Some(frames));
        self.input.close(fd, &mut acks).map(|_| ())
    }

    /// NET_RECV_ACK.
    pub(crate) fn ack(&mut self, bytes: u32) {
        self.window.ack(bytes);
    }

    /// Does what an open connection can do now.
    pub(crate) fn service(&mut self, link: &mut LinkOut<'_>, registry: &Registry) -> Progress {
        let Some(fd) = self.socket_fd().filter(|_| self.is_open()) else {
            return Progress::Idle;
        };
        let mut acks = self.acks(Some(link.frames()));
        if self.input.flush(fd, &mut acks) == Flushed::Done || self.input.is_gone() {
            // The write side broke (EPIPE, ECONNRESET): the connection is
            // over, whatever was queued is lost.
            if self.input.is_gone() {
                let errno = self.input.failure();
                let kind = errno.map_or(NetErrorKind::Reset, NetErrorKind::from_errno);
                return self.close_with(link, registry, Some(kind), errno);
            }
        }
        if !self.eof_sent {
            let mut budget = READ_TURN;
            let mut sink = Sink::Queue(&mut *link);
            match self
                .out
                .pump(fd, self.id, &mut sink, &mut self.window, &mut budget)
            {
                Pumped::Ended => {
                    if let Some(errno) = self.out.failure() {
                        let kind = NetErrorKind::from_errno(errno);
                        return self.close_with(link, registry, Some(kind), Some(errno));
                    }
                    self.eof_sent = true;
                    if let Err(e) =
                        crate::codec::append_raw(link.frames(), Kind::NetEof as u8, self.id, &[])
                    {
                        tracing::error!(error = %e, "NET_EOF could not be encoded");
                    }
                }
                Pumped::Drained | Pumped::Window => {}
                Pumped::Yield | Pumped::Backpressure => return Progress::Stalled,
            }
        }
        if self.eof_sent && self.input.is_done() {
            return self.close_with(link, registry, None, None);
        }
        if std::mem::take(&mut self.check_error) {
            // Past the guest's end of file nothing reads the socket, so a
            // reset (a peer that closed and got more bytes) would wait for
            // the host's next NET_SEND to be noticed.
            if let Err(e) = connect::finish(fd) {
                let errno = e.raw_os_error();
                let kind = errno.map_or(NetErrorKind::Reset, NetErrorKind::from_errno);
                return self.close_with(link, registry, Some(kind), errno);
            }
        }
        Progress::Idle
    }

    /// Ends the connection with NET_CLOSED (`error` when it broke).
    pub(crate) fn close_with(
        &mut self,
        link: &mut LinkOut<'_>,
        registry: &Registry,
        error: Option<NetErrorKind>,
        errno: Option<i32>,
    ) -> Progress {
        let message = error.map(|k| match errno {
            Some(e) => format!("{k}: {}", std::io::Error::from_raw_os_error(e)),
            None => k.to_string(),
        });
        let closed = NetClosed {
            error: error.map(|k| k.as_str().to_owned()),
            message,
            errno,
        };
        crate::agent::core::push_map(link.frames(), Kind::NetClosed, self.id, &closed);
        self.close(registry, false);
        Progress::Done
    }

    /// Closes the socket (with `reset`, by an RST) and any connector.
    pub(crate) fn close(&mut self, registry: &Registry, reset: bool) {
        self.input.abandon();
        if let Some(sock) = self.sock.take() {
            let _ = registry.deregister(&mut SourceFd(&sock.as_raw_fd()));
            if reset {
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: setsockopt reads one linger struct.
                unsafe {
                    libc::setsockopt(
                        sock.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    )
                };
            }
        }
        if let State::Delegated { pid, ctl, .. } = &self.state {
            let _ = registry.deregister(&mut SourceFd(&ctl.as_raw_fd()));
            super::sys::send_signal(*pid, libc::SIGKILL);
        }
        self.state = State::Open;
    }
}

fn register(registry: &Registry, fd: RawFd, key: usize, which: NetFd) -> std::io::Result<()> {
    let token = Source::Net(key, which).token();
    let interest = match which {
        NetFd::Socket => Interest::READABLE | Interest::WRITABLE,
        NetFd::Worker => Interest::READABLE,
    };
    registry.register(&mut SourceFd(&fd), token, interest)
}

/// A NET_FAILED frame for `id`.
pub(crate) fn failed_frame(out: &mut Vec<u8>, id: u32, f: &NetFailed) {
    crate::agent::core::push_map(out, Kind::NetFailed, id, f);
}
