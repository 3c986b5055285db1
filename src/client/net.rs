//! The `net` extension on the host side: connections to guest TCP and
//! Unix sockets as [`NetStream`]s (`std::io::Read + Write`, half-close
//! with `shutdown`), and a [`Forwarder`] that relays each connection of a
//! local listener to a guest address (what `agentctl port-forward` runs).
//!
//! Windows both ways (docs/PROTOCOL.md, "Extension net"): NET_RECV is
//! acknowledged only as the caller reads it, so a caller that stops
//! reading makes the agent stop reading the guest socket; NET_SEND never
//! has more than READY's `stdin_window` unacknowledged. Host-side
//! threads are fine here: the forwarder runs two per connection.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::conn::{lock, Conn};
use super::error::{Error, Result};
use super::stream::{Apply, Stream};
use crate::messages::{
    decode_map, Ack, ErrorMsg, Kind, Message, NetClose, NetConnect, NetConnected, NetErrorKind,
    NetFailed, NetMsg,
};

/// The frames that end a connection's id.
const FINALS: &[u8] = &[Kind::NetFailed as u8, Kind::NetClosed as u8];

/// The most NET_SEND payload in one frame.
const SEND_CHUNK: usize = 64 * 1024;

/// Retries on a fresh id after `duplicate_id`.
const ID_RETRIES: usize = 16;

#[derive(Default)]
struct NetState {
    connected: Option<NetConnected>,
    /// NET_FAILED (or the transport's end before NET_CONNECTED).
    failed: Option<Error>,
    recv: VecDeque<Vec<u8>>,
    /// NET_EOF came.
    eof: bool,
    /// NET_CLOSED came: `Ok` clean, `Err` broken (or transport gone).
    closed: Option<std::result::Result<(), NetFailed>>,
    transport_gone: Option<String>,
    send_credit: u32,
    send_window: u32,
    errors: Vec<ErrorMsg>,
}

impl NetState {
    fn over(&self) -> bool {
        self.failed.is_some() || self.closed.is_some() || self.transport_gone.is_some()
    }
}

fn violation(kind: u8, e: impl std::fmt::Display) -> NetFailed {
    NetFailed::new(
        NetErrorKind::Other,
        format!("agent broke the protocol: net frame of kind {kind:#04x}: {e}"),
        None,
    )
}

impl Apply for NetState {
    fn apply(&mut self, kind: u8, payload: Vec<u8>) {
        let Some(k) = Kind::from_u8(kind) else {
            self.closed = Some(Err(violation(kind, "unknown kind")));
            return;
        };
        match k {
            Kind::NetRecv => {
                if !payload.is_empty() {
                    self.recv.push_back(payload);
                }
                return;
            }
            Kind::Error => {
                if let Ok(e) = decode_map::<ErrorMsg>(k, &payload) {
                    tracing::warn!("agent error {}: {}", e.kind, e.message);
                    self.errors.push(e);
                }
                return;
            }
            _ => {}
        }
        match NetMsg::decode(k, &payload) {
            Ok(NetMsg::Connected(c)) => self.connected = Some(c),
            Ok(NetMsg::Failed(f)) => self.failed = Some(Error::Net(f)),
            Ok(NetMsg::SendAck(Ack { bytes })) => {
                self.send_credit = self.send_credit.saturating_add(bytes).min(self.send_window)
            }
            Ok(NetMsg::Eof) => self.eof = true,
            Ok(NetMsg::Closed(c)) => {
                self.closed = Some(match c.error {
                    None => Ok(()),
                    Some(kind) => Err(NetFailed {
                        kind,
                        message: c.message.unwrap_or_default(),
                        errno: c.errno,
                    }),
                })
            }
            Ok(other) => self.closed = Some(Err(violation(kind, format!("{other:?}")))),
            Err(e) => self.closed = Some(Err(violation(kind, e))),
        }
    }

    fn disconnected(&mut self, err: Error) {
        if self.transport_gone.is_none() {
            self.transport_gone = Some(err.to_string());
        }
    }
}

/// Where a connection goes in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// TCP to a host (an IP literal, `localhost`, or a name the guest
    /// resolves) and port.
    Tcp {
        /// The host.
        host: String,
        /// The port.
        port: u16,
    },
    /// A Unix socket path (abstract names start with `@`).
    Unix(PathBuf),
}

impl Target {
    /// Parses `HOST:PORT`, `[V6]:PORT`, a bare `PORT` (guest localhost),
    /// or `unix:PATH`.
    pub fn parse(s: &str) -> std::result::Result<Target, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        let port_of = |p: &str| match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{p:?} is not a port (1 to 65535)")),
            Ok(n) => Ok(n),
        };
        if let Some(rest) = s.strip_prefix('[') {
            let (host, port) = rest
                .split_once("]:")
                .ok_or_else(|| format!("{s:?}: expected [ADDR]:PORT"))?;
            return Ok(Target::Tcp {
                host: host.to_owned(),
                port: port_of(port)?,
            });
        }
        match s.rsplit_once(':') {
            None => Ok(Target::Tcp {
                host: "localhost".into(),
                port: port_of(s)?,
            }),
            Some((host, port)) if !host.is_empty() && !host.contains(':') => Ok(Target::Tcp {
                host: host.to_owned(),
                port: port_of(port)?,
            }),
            Some(_) => Err(format!(
                "{s:?}: expected HOST:PORT, [ADDR]:PORT, PORT or unix:PATH"
            )),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Target::Tcp { host, port } => write!(f, "{host}:{port}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Connections to guest sockets; from [`super::Client::net`].
///
/// ```no_run
/// use std::io::{Read, Write};
/// use std::net::Shutdown;
/// use agentd::client::Client;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let client = Client::spawn_agent("target/debug/agentd")?;
/// let mut s = client.connect_tcp("127.0.0.1:8080")?;
/// s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
/// s.shutdown(Shutdown::Write)?;
/// let mut reply = String::new();
/// s.read_to_string(&mut reply)?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Net {
    conn: Arc<Conn>,
    user: Option<String>,
    timeout: Option<Duration>,
    window: Option<u32>,
}

impl Net {
    pub(crate) fn new(conn: Arc<Conn>) -> Net {
        Net {
            conn,
            user: None,
            timeout: None,
            window: None,
        }
    }

    /// Connect with `user`'s credentials (a Unix socket's permissions
    /// apply).
    pub fn as_user(&self, user: impl Into<String>) -> Net {
        Net {
            user: Some(user.into()),
            ..self.clone()
        }
    }

    /// Give up connecting after `timeout` (`timed_out`); default the
    /// agent's (10 s).
    pub fn timeout(&self, timeout: Duration) -> Net {
        Net {
            timeout: Some(timeout),
            ..self.clone()
        }
    }

    /// The agent → host window (bytes received and not yet read); default
    /// the agent's (1 MiB).
    pub fn window(&self, window: u32) -> Net {
        Net {
            window: Some(window),
            ..self.clone()
        }
    }

    /// TCP to `addr`: `HOST:PORT` or `[ADDR]:PORT` (the guest resolves a
    /// name).
    pub fn connect_tcp(&self, addr: &str) -> Result<NetStream> {
        match Target::parse(addr) {
            Ok(t @ Target::Tcp { .. }) if addr.contains(':') => self.connect(&t),
            _ => Err(Error::Net(NetFailed::new(
                NetErrorKind::InvalidRequest,
                format!("{addr:?} is not HOST:PORT or [ADDR]:PORT"),
                None,
            ))),
        }
    }

    /// The guest Unix socket at `path`.
    pub fn connect_unix(&self, path: impl AsRef<Path>) -> Result<NetStream> {
        self.connect(&Target::Unix(path.as_ref().to_path_buf()))
    }

    /// Connects to `target`.
    pub fn connect(&self, target: &Target) -> Result<NetStream> {
        let mut req = match target {
            Target::Tcp { host, port } => NetConnect::tcp(host.clone(), *port),
            Target::Unix(p) => NetConnect::unix(p.to_string_lossy().into_owned()),
        };
        req.user = self.user.clone();
        req.timeout_ms = self
            .timeout
            .map(|t| t.as_millis().clamp(1, u128::from(u32::MAX)) as u32);
        req.window = self.window;
        let shared = &self.conn.shared;
        if !shared
            .ready()
            .is_some_and(|r| r.features.iter().any(|f| f == "net"))
        {
            return Err(Error::Unsupported("net"));
        }
        let window = shared.ready().map_or(0, |r| r.stdin_window);
        let max = shared
            .ready()
            .map_or(SEND_CHUNK, |r| r.max_payload as usize);
        for _ in 0..ID_RETRIES {
            let (id, rx) = shared.register_stream(FINALS)?;
            let msg = Message::Net(NetMsg::Connect(Box::new(req.clone())));
            if let Err(e) = shared.send(id, &msg) {
                shared.unregister_stream(id);
                return Err(e);
            }
            let state = NetState {
                send_credit: window,
                send_window: window,
                ..NetState::default()
            };
            let stream = Stream::new(self.conn.clone(), id, rx, state);
            let outcome = stream.wait_for(|s| {
                if let Some(c) = &s.connected {
                    return Some(Ok(c.clone()));
                }
                if let Some(e) = s.failed.take() {
                    return Some(Err(e));
                }
                if let Some(Err(f)) = &s.closed {
                    return Some(Err(Error::Net(f.clone())));
                }
                s.transport_gone
                    .clone()
                    .map(|r| Err(Error::TransportClosed(Some(r))))
            });
            match outcome {
                Ok(c) => {
                    return Ok(NetStream {
                        inner: Arc::new(Inner {
                            stream,
                            read: Mutex::new(ReadBuf::default()),
                            flags: Mutex::new(Flags::default()),
                            chunk: SEND_CHUNK.min(max).max(1),
                            connected: c,
                        }),
                    })
                }
                Err(e) if e.net_error_kind() == Some(NetErrorKind::DuplicateId) => {
                    tracing::debug!(id, "net id in use on the agent; retrying");
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::AgentViolation(
            "NET_FAILED duplicate_id for every id tried".into(),
        ))
    }

    /// Relays every connection accepted on `listener` to `target`, each in
    /// threads of its own, until [`Forwarder::stop`]. A connection that
    /// cannot be made (or breaks) is reported to `on_error` and closed;
    /// the forwarder goes on.
    pub fn forward(
        &self,
        listener: TcpListener,
        target: Target,
        on_error: impl Fn(SocketAddr, &Error) + Send + Sync + 'static,
    ) -> io::Result<Forwarder> {
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let net = self.clone();
        let on_error: OnError = Arc::new(on_error);
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("agentd-forward-accept".into())
            .spawn(move || accept_loop(&net, &listener, &target, &flag, &on_error))?;
        Ok(Forwarder {
            local,
            stop,
            thread: Some(thread),
        })
    }
}

// ---------------------------------------------------------------------------
// The stream.

#[derive(Default)]
struct ReadBuf {
    cur: Vec<u8>,
    pos: usize,
    /// `shutdown(Read)`: reads return end of file.
    shut: bool,
}

#[derive(Default)]
struct Flags {
    /// NET_SHUTDOWN sent.
    shut_wr: bool,
    /// NET_CLOSE sent.
    close_sent: bool,
}

struct Inner {
    stream: Stream<NetState>,
    read: Mutex<ReadBuf>,
    flags: Mutex<Flags>,
    chunk: usize,
    connected: NetConnected,
}

impl Inner {
    fn ack(&self, bytes: u32) {
        if bytes == 0 || self.stream.with(|s| s.over()) || lock(&self.flags).close_sent {
            return;
        }
        let _ = self
            .stream
            .send(&Message::Net(NetMsg::RecvAck(Ack { bytes })));
    }

    fn read(&self, buf: &mut [u8]) -> Result<usize> {
        let mut rb = lock(&self.read);
        if buf.is_empty() || rb.shut {
            return Ok(0);
        }
        loop {
            if rb.pos < rb.cur.len() {
                let n = buf.len().min(rb.cur.len() - rb.pos);
                buf[..n].copy_from_slice(&rb.cur[rb.pos..rb.pos + n]);
                rb.pos += n;
                if rb.pos == rb.cur.len() {
                    self.ack(rb.cur.len() as u32);
                }
                return Ok(n);
            }
            enum Next {
                Chunk(Vec<u8>),
                Eof,
                Broken(Error),
            }
            let next = self.stream.wait_for(|s| {
                if let Some(c) = s.recv.pop_front() {
                    return Some(Next::Chunk(c));
                }
                if s.eof {
                    return Some(Next::Eof);
                }
                match &s.closed {
                    Some(Ok(())) => return Some(Next::Eof),
                    Some(Err(f)) => return Some(Next::Broken(Error::Net(f.clone()))),
                    None => {}
                }
                s.transport_gone
                    .clone()
                    .map(|r| Next::Broken(Error::TransportClosed(Some(r))))
            });
            match next {
                Next::Chunk(c) => {
                    rb.cur = c;
                    rb.pos = 0;
                }
                Next::Eof => return Ok(0),
                Next::Broken(e) => return Err(e),
            }
        }
    }

    fn write(&self, buf: &[u8]) -> Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        {
            let f = lock(&self.flags);
            if f.shut_wr || f.close_sent {
                return Err(Error::StdinClosed);
            }
        }
        let chunk = self.chunk;
        let n = self.stream.wait_for(|s| {
            match &s.closed {
                Some(Err(f)) => return Some(Err(Error::Net(f.clone()))),
                Some(Ok(())) => return Some(Err(Error::StdinClosed)),
                None => {}
            }
            if let Some(r) = &s.transport_gone {
                return Some(Err(Error::TransportClosed(Some(r.clone()))));
            }
            if s.send_credit > 0 {
                let n = (s.send_credit as usize).min(chunk).min(buf.len());
                s.send_credit -= n as u32;
                return Some(Ok(n));
            }
            None
        })?;
        self.stream.send(&Message::Net(NetMsg::Send(&buf[..n])))?;
        Ok(n)
    }

    fn shutdown_write(&self) -> Result<()> {
        let mut f = lock(&self.flags);
        if f.shut_wr || f.close_sent || self.stream.with(|s| s.over()) {
            f.shut_wr = true;
            return Ok(());
        }
        f.shut_wr = true;
        self.stream.send(&Message::Net(NetMsg::Shutdown))
    }

    fn send_close(&self, reset: bool) -> Result<()> {
        let mut f = lock(&self.flags);
        if f.close_sent {
            return Ok(());
        }
        self.stream.poll();
        if self.stream.with(|s| s.over()) {
            return Ok(());
        }
        f.close_sent = true;
        self.stream
            .send(&Message::Net(NetMsg::Close(NetClose { reset })))
    }

    /// Waits for NET_CLOSED (or the transport's end). Received bytes
    /// nobody will read are dropped, their window returned, so that the
    /// agent can get to its NET_EOF and NET_CLOSED.
    fn wait_closed(&self) -> Result<()> {
        enum Next {
            Closed(Result<()>),
            Unread(usize),
        }
        loop {
            let next = self.stream.wait_for(|s| {
                if let Some(c) = &s.closed {
                    return Some(Next::Closed(c.clone().map_err(Error::Net)));
                }
                if s.failed.is_some() {
                    return Some(Next::Closed(Ok(())));
                }
                if let Some(r) = &s.transport_gone {
                    return Some(Next::Closed(Err(Error::TransportClosed(Some(r.clone())))));
                }
                let unread: usize = s.recv.drain(..).map(|c| c.len()).sum();
                (unread > 0).then_some(Next::Unread(unread))
            });
            match next {
                Next::Closed(r) => return r,
                Next::Unread(n) => {
                    let pending = {
                        let mut rb = lock(&self.read);
                        let left = rb.cur.len() - rb.pos;
                        rb.cur.clear();
                        rb.pos = 0;
                        left
                    };
                    self.ack((n + pending) as u32);
                }
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The id must end: NET_CLOSE unless it already has.
        let _ = self.send_close(false);
    }
}

/// A connection to a guest socket: `Read` and `Write` (also on `&NetStream`,
/// as for `TcpStream`), `shutdown`, `try_clone` for a second thread.
/// Dropping the last clone closes it (NET_CLOSE: bytes the agent has not
/// yet written to the guest socket are dropped; [`NetStream::close`]
/// waits for them first).
#[derive(Clone)]
pub struct NetStream {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NetStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetStream")
            .field("id", &self.inner.stream.id)
            .field("peer", &self.inner.connected.peer)
            .finish()
    }
}

impl NetStream {
    /// The guest address connected to (`ADDR:PORT`, `[ADDR]:PORT`, or the
    /// socket path).
    pub fn peer_addr(&self) -> &str {
        &self.inner.connected.peer
    }

    /// The guest-side local address (empty for a Unix socket).
    pub fn local_addr(&self) -> &str {
        &self.inner.connected.local
    }

    /// Another handle on the same connection.
    pub fn try_clone(&self) -> Result<NetStream> {
        Ok(self.clone())
    }

    /// Half-close like `TcpStream::shutdown`: `Write` sends the guest end
    /// of file once what was written is through (NET_SHUTDOWN); `Read`
    /// makes reads return end of file; `Both` does both.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            lock(&self.inner.read).shut = true;
        }
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            self.inner.shutdown_write()?;
        }
        Ok(())
    }

    /// Closes gracefully: waits until everything written has reached the
    /// guest socket, then ends the connection (NET_CLOSE unless both ends
    /// of file are already through) and waits for NET_CLOSED. Unread
    /// received bytes are discarded.
    pub fn close(self) -> Result<()> {
        let inner = &self.inner;
        let both_eof = {
            let f = lock(&inner.flags);
            f.shut_wr && inner.stream.with(|s| s.eof)
        };
        if !both_eof {
            inner
                .stream
                .wait_for(|s| (s.over() || s.send_credit >= s.send_window).then_some(()));
            inner.send_close(false)?;
        }
        inner.wait_closed()
    }

    /// Ends the connection at once with a TCP RST (NET_CLOSE `reset`).
    pub fn reset(self) -> Result<()> {
        self.inner.send_close(true)?;
        self.inner.wait_closed()
    }

    /// Reads with the client's typed errors.
    pub fn read_checked(&self, buf: &mut [u8]) -> Result<usize> {
        self.inner.read(buf)
    }

    /// Writes with the client's typed errors; returns how much was taken.
    pub fn write_checked(&self, buf: &[u8]) -> Result<usize> {
        self.inner.write(buf)
    }
}

impl Read for NetStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(Into::into)
    }
}

impl Read for &NetStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(Into::into)
    }
}

impl Write for NetStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).map_err(Into::into)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for &NetStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).map_err(Into::into)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The forwarder.

/// A running forward (from [`Net::forward`]): stops when told or dropped.
pub struct Forwarder {
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// The local address it accepts on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops accepting (connections already relayed go on to their end).
    pub fn stop(mut self) {
        self.halt();
    }

    /// Blocks for as long as the forwarder runs.
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.halt();
    }
}

type OnError = Arc<dyn Fn(SocketAddr, &Error) + Send + Sync>;

fn accept_loop(
    net: &Net,
    listener: &TcpListener,
    target: &Target,
    stop: &AtomicBool,
    on_error: &OnError,
) {
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => {
                on_error(
                    listener_addr(listener),
                    &Error::Io {
                        context: "poll on the listener".into(),
                        source: e.into(),
                    },
                );
                return;
            }
        }
        match listener.accept() {
            Ok((sock, peer)) => {
                let (net, target, report) = (net.clone(), target.clone(), on_error.clone());
                let spawned = std::thread::Builder::new()
                    .name("agentd-forward".into())
                    .spawn(move || relay(&net, sock, peer, &target, &report));
                if let Err(e) = spawned {
                    on_error(
                        peer,
                        &Error::Io {
                            context: "cannot start a relay thread".into(),
                            source: e,
                        },
                    );
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                on_error(
                    listener_addr(listener),
                    &Error::Io {
                        context: "accept".into(),
                        source: e,
                    },
                );
                // EMFILE and the like: do not spin.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if net.conn.shared.is_closed() {
            return;
        }
    }
}

fn listener_addr(l: &TcpListener) -> SocketAddr {
    l.local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Relays one accepted connection until both directions are through.
fn relay(net: &Net, sock: TcpStream, peer: SocketAddr, target: &Target, on_error: &OnError) {
    let remote = match net.connect(target) {
        Ok(r) => r,
        Err(e) => {
            on_error(peer, &e);
            return;
        }
    };
    let (up_sock, up_remote) = match sock.try_clone() {
        Ok(s) => (s, remote.clone()),
        Err(e) => {
            on_error(
                peer,
                &Error::Io {
                    context: "cannot duplicate the socket".into(),
                    source: e,
                },
            );
            return;
        }
    };
    // Local → guest in a thread of its own; guest → local here.
    let up = std::thread::Builder::new()
        .name("agentd-forward-up".into())
        .spawn(move || copy_up(up_sock, &up_remote));
    let down = copy_down(&remote, &sock);
    let up = match up {
        Ok(h) => h.join().unwrap_or(Ok(())),
        Err(e) => Err(Error::Io {
            context: "cannot start a relay thread".into(),
            source: e,
        }),
    };
    for r in [down, up] {
        if let Err(e) = r {
            on_error(peer, &e);
        }
    }
    if let Err(e) = remote.close() {
        tracing::debug!("closing a forwarded connection: {e}");
    }
}

fn copy_up(mut sock: TcpStream, remote: &NetStream) -> Result<()> {
    let mut buf = vec![0u8; SEND_CHUNK];
    loop {
        let n = match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = remote.inner.send_close(true);
                return Err(Error::Io {
                    context: "reading the local connection".into(),
                    source: e,
                });
            }
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            match remote.write_checked(rest) {
                Ok(k) => rest = &rest[k..],
                Err(e) => {
                    let _ = sock.shutdown(Shutdown::Read);
                    return Err(e);
                }
            }
        }
    }
    remote.inner.shutdown_write()
}

fn copy_down(remote: &NetStream, sock: &TcpStream) -> Result<()> {
    let mut buf = vec![0u8; SEND_CHUNK];
    let mut out = sock;
    loop {
        let n = match remote.read_checked(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let _ = sock.shutdown(Shutdown::Both);
                return Err(e);
            }
        };
        if let Err(e) = out.write_all(&buf[..n]) {
            let _ = remote.inner.send_close(true);
            return Err(Error::Io {
                context: "writing the local connection".into(),
                source: e,
            });
        }
    }
    let _ = sock.shutdown(Shutdown::Write);
    Ok(())
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net").field("user", &self.user).finish()
    }
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("local", &self.local)
            .finish()
    }
}
