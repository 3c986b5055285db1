//! The `net` extension's test side: guest servers (a poll(2) echo server
//! for many connections at once, a thread per connection for scripted
//! ones, listeners whose backlog is full, closed ports) and a host's
//! helpers over the threaded [`Agent`]: connect, send within the window,
//! read NET_RECV acknowledging as it goes, collect a connection to its
//! final frame. Every frame still goes through the checker first, which
//! also holds the agent to each connection's window.
//!
//! Only loopback addresses are ever used.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use agentd::codec::OwnedFrame;
use agentd::messages::{
    Ack, Kind, Message, NetClose, NetClosed, NetConnect, NetConnected, NetFailed, NetMsg,
};

use super::agent::Agent;
use super::timeout;

pub const NET_CONNECTED: u8 = Kind::NetConnected as u8;
pub const NET_FAILED: u8 = Kind::NetFailed as u8;
pub const NET_SEND: u8 = Kind::NetSend as u8;
pub const NET_SEND_ACK: u8 = Kind::NetSendAck as u8;
pub const NET_RECV: u8 = Kind::NetRecv as u8;
pub const NET_EOF: u8 = Kind::NetEof as u8;
pub const NET_CLOSE: u8 = Kind::NetClose as u8;
pub const NET_CLOSED: u8 = Kind::NetClosed as u8;

/// Whether a frame is one of a connection's (agent → host).
pub fn is_net(kind: u8) -> bool {
    matches!(
        kind,
        NET_CONNECTED | NET_FAILED | NET_SEND_ACK | NET_RECV | NET_EOF | NET_CLOSED
    )
}

/// A guest-side socket, TCP or Unix.
pub enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
        }
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_nonblocking(on),
            Sock::Unix(s) => s.set_nonblocking(on),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) {
        let _ = match self {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
        };
    }

    /// Closes with SO_LINGER 0: a TCP RST instead of a FIN.
    pub fn reset(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt reads one linger struct.
        let rc = unsafe {
            libc::setsockopt(
                self.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
    }

    /// Reads to end of file (a read timeout of [`timeout`]).
    pub fn read_to_eof(&mut self) -> Vec<u8> {
        self.set_read_timeout(Some(timeout()));
        let mut v = Vec::new();
        self.read_to_end(&mut v).expect("reading to end of file");
        v
    }

    /// The peer's uid (SO_PEERCRED), for a Unix socket.
    pub fn peer_uid(&self) -> u32 {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes one ucred.
        let rc = unsafe {
            libc::getsockopt(
                self.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "SO_PEERCRED: {}", io::Error::last_os_error());
        cred.uid
    }
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A guest listener, TCP or Unix, and what NET_CONNECT reaches it by.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// TCP on 127.0.0.1, a free port.
    pub fn tcp4() -> Listener {
        Listener::Tcp(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1"))
    }

    /// TCP on [::1], or `None` where the machine has no IPv6 loopback.
    pub fn tcp6() -> Option<Listener> {
        TcpListener::bind((Ipv6Addr::LOCALHOST, 0))
            .ok()
            .map(Listener::Tcp)
    }

    /// A Unix socket at `path`.
    pub fn unix(path: &Path) -> Listener {
        let l =
            UnixListener::bind(path).unwrap_or_else(|e| panic!("binding {}: {e}", path.display()));
        Listener::Unix(l, path.to_owned())
    }

    pub fn port(&self) -> u16 {
        match self {
            Listener::Tcp(l) => l.local_addr().expect("a bound address").port(),
            Listener::Unix(..) => panic!("a Unix listener has no port"),
        }
    }

    /// The NET_CONNECT that reaches it (`host` as the listener's literal).
    pub fn request(&self) -> NetConnect {
        match self {
            Listener::Tcp(l) => {
                let a = l.local_addr().expect("a bound address");
                NetConnect::tcp(a.ip().to_string(), a.port())
            }
            Listener::Unix(_, p) => NetConnect::unix(p.to_str().expect("a UTF-8 path")),
        }
    }

    /// Sets the backlog (listen(2) again).
    pub fn backlog(&self, n: i32) {
        // SAFETY: listen(2) again on a listening socket changes its backlog.
        let rc = unsafe { libc::listen(self.as_raw_fd(), n) };
        assert_eq!(rc, 0, "listen: {}", io::Error::last_os_error());
    }

    /// Sets the backlog to 0 (one connection fits, the next waits).
    pub fn backlog_zero(&self) {
        // SAFETY: listen(2) again on a listening socket changes its backlog.
        let rc = unsafe { libc::listen(self.as_raw_fd(), 0) };
        assert_eq!(rc, 0, "listen: {}", io::Error::last_os_error());
    }

    /// Fills the backlog (after [`Listener::backlog_zero`]): connections
    /// that are never accepted, kept open by the returned sockets.
    pub fn fill_backlog(&self) -> Vec<Sock> {
        self.backlog_zero();
        let mut held = Vec::new();
        match self {
            Listener::Tcp(l) => {
                // One fits (the accept queue is full above the backlog);
                // every SYN after it is dropped.
                let a = l.local_addr().expect("a bound address");
                held.push(Sock::Tcp(
                    TcpStream::connect(a).expect("the first connection"),
                ));
            }
            Listener::Unix(_, p) => {
                held.push(Sock::Unix(
                    UnixStream::connect(p).expect("the first connection"),
                ));
            }
        }
        held
    }

    pub fn accept(&self) -> Sock {
        match self {
            Listener::Tcp(l) => Sock::Tcp(l.accept().expect("accept").0),
            Listener::Unix(l, _) => Sock::Unix(l.accept().expect("accept").0),
        }
    }

    fn set_nonblocking(&self) {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _) => l.set_nonblocking(true),
        }
        .expect("a nonblocking listener");
    }

    fn try_accept(&self) -> Option<Sock> {
        match self {
            Listener::Tcp(l) => l.accept().ok().map(|(s, _)| Sock::Tcp(s)),
            Listener::Unix(l, _) => l.accept().ok().map(|(s, _)| Sock::Unix(s)),
        }
    }

    /// Accepts, waiting at most [`timeout`].
    pub fn accept_within(&self) -> Sock {
        self.set_nonblocking();
        let end = std::time::Instant::now() + timeout();
        loop {
            if let Some(s) = self.try_accept() {
                s.set_nonblocking(false).expect("a blocking socket");
                return s;
            }
            assert!(std::time::Instant::now() < end, "nobody connected");
            super::host::poll_fd(self.as_raw_fd(), libc::POLLIN, Duration::from_millis(100));
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

/// A TCP port on 127.0.0.1 that refuses connections while the holder
/// lives: a bound socket that never listens answers a SYN with RST, and
/// nobody else can take the port meanwhile.
pub fn refusing_port() -> TcpStreamHolder {
    refusing_port_at(0).expect("a free port")
}

/// [`refusing_port`] on `port` (0: any), `None` when it is taken.
pub fn refusing_port_at(port: u16) -> Option<TcpStreamHolder> {
    // SAFETY: socket(2); owned by the holder.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    let holder = TcpStreamHolder(fd);
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a sockaddr_in of its size.
    let rc = unsafe {
        libc::bind(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    (rc == 0).then_some(holder)
}

/// A raw bound TCP socket, closed on drop.
pub struct TcpStreamHolder(RawFd);

impl TcpStreamHolder {
    pub fn port(&self) -> u16 {
        // SAFETY: a zeroed sockaddr_in is valid; getsockname writes it.
        let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: as above.
        let rc = unsafe {
            libc::getsockname(
                self.0,
                (&mut sin as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        u16::from_be(sin.sin_port)
    }
}

impl Drop for TcpStreamHolder {
    fn drop(&mut self) {
        // SAFETY: our fd.
        unsafe { libc::close(self.0) };
    }
}

/// A guest server that runs `handler` on a thread per accepted connection,
/// until dropped.
pub struct Server {
    pub request: NetConnect,
    pub accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start<F>(listener: Listener, handler: F) -> Server
    where
        F: Fn(Sock) + Send + Sync + 'static,
    {
        let request = listener.request();
        listener.set_nonblocking();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let thread = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.try_accept() {
                        Some(s) => {
                            s.set_nonblocking(false).expect("a blocking socket");
                            accepted.fetch_add(1, Ordering::Relaxed);
                            let h = handler.clone();
                            std::thread::spawn(move || h(s));
                        }
                        None => {
                            super::host::poll_fd(
                                listener.as_raw_fd(),
                                libc::POLLIN,
                                Duration::from_millis(50),
                            );
                        }
                    }
                }
            })
        };
        Server {
            request,
            accepted,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A single-threaded poll(2) echo server for many connections: echoes
/// every byte; at end of file it shuts its side down and closes.
pub struct EchoServer {
    pub request: NetConnect,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    /// Connections open now.
    pub open: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Echoing {
    sock: Sock,
    pending: Vec<u8>,
}

impl EchoServer {
    pub fn start(listener: Listener) -> EchoServer {
        let request = listener.request();
        listener.set_nonblocking();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, accepted, open) = (stop.clone(), accepted.clone(), open.clone());
            std::thread::spawn(move || echo_loop(&listener, &stop, &accepted, &open))
        };
        EchoServer {
            request,
            accepted,
            open,
            stop,
            thread: Some(thread),
        }
    }
}

fn echo_loop(listener: &Listener, stop: &AtomicBool, accepted: &AtomicUsize, open: &AtomicUsize) {
    let mut conns: Vec<Echoing> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let mut fds = vec![libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        for c in &conns {
            let events = if c.pending.is_empty() {
                libc::POLLIN
            } else {
                libc::POLLOUT
            };
            fds.push(libc::pollfd {
                fd: c.sock.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        // SAFETY: a valid array of pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        while let Some(s) = listener.try_accept() {
            s.set_nonblocking(true).expect("nonblocking");
            accepted.fetch_add(1, Ordering::Relaxed);
            open.fetch_add(1, Ordering::Relaxed);
            conns.push(Echoing {
                sock: s,
                pending: Vec::new(),
            });
        }
        let mut keep = Vec::with_capacity(conns.len());
        for (i, mut c) in conns.drain(..).enumerate() {
            // Connections accepted just now have no pollfd yet.
            let revents = fds.get(i + 1).map_or(0, |p| p.revents);
            if revents == 0 {
                keep.push(c);
                continue;
            }
            if echo_once(&mut c, &mut buf) {
                keep.push(c);
            } else {
                open.fetch_sub(1, Ordering::Relaxed);
            }
        }
        conns = keep;
    }
}

/// Services one connection; false once it is closed.
fn echo_once(c: &mut Echoing, buf: &mut [u8]) -> bool {
    if !c.pending.is_empty() {
        match c.sock.write(&c.pending) {
            Ok(n) => {
                c.pending.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
        return true;
    }
    loop {
        match c.sock.read(buf) {
            Ok(0) => {
                let _ = c.sock.shutdown(Shutdown::Write);
                return false;
            }
            Ok(n) => match c.sock.write(&buf[..n]) {
                Ok(w) if w == n => {}
                Ok(w) => {
                    c.pending.extend_from_slice(&buf[w..n]);
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.pending.extend_from_slice(&buf[..n]);
                    return true;
                }
                Err(_) => return false,
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a host saw of one connection up to its final frame.
#[derive(Debug, Default)]
pub struct NetSeen {
    pub data: Vec<u8>,
    pub eof: bool,
    /// NET_SEND_ACK bytes.
    pub send_acked: u64,
    pub closed: Option<NetClosed>,
    pub failed: Option<NetFailed>,
}

/// The host's side of the net extension, over the threaded agent.
pub trait NetHost {
    fn net_send_connect(&self, id: u32, req: &NetConnect);
    fn net_connect(&mut self, id: u32, req: &NetConnect) -> Result<NetConnected, NetFailed>;
    fn net_reply(&mut self, id: u32) -> Result<NetConnected, NetFailed>;
    fn net_send(&self, id: u32, data: &[u8]);
    fn net_ack(&self, id: u32, bytes: u32);
    fn net_shutdown(&self, id: u32);
    fn net_close(&self, id: u32, reset: bool);
    fn net_frame(&mut self, id: u32) -> OwnedFrame;
    fn net_collect(&mut self, id: u32, seen: &mut NetSeen, ack: bool) -> bool;
    fn net_until_closed(&mut self, id: u32) -> NetSeen;
    fn net_read_exactly(&mut self, id: u32, n: usize) -> Vec<u8>;
    fn net_expect_failed(&mut self, id: u32, req: &NetConnect, kind: &str) -> NetFailed;
    fn net_send_all(&mut self, id: u32, data: &[u8], seen: &mut NetSeen);
}

impl NetHost for Agent {
    fn net_send_connect(&self, id: u32, req: &NetConnect) {
        self.send(&Message::Net(NetMsg::Connect(Box::new(req.clone()))), id);
    }

    #[track_caller]
    fn net_connect(&mut self, id: u32, req: &NetConnect) -> Result<NetConnected, NetFailed> {
        self.net_send_connect(id, req);
        self.net_reply(id)
    }

    /// NET_CONNECTED or NET_FAILED for `id`.
    #[track_caller]
    fn net_reply(&mut self, id: u32) -> Result<NetConnected, NetFailed> {
        let f = self.recv_where(
            |f| f.id == id && (f.kind == NET_CONNECTED || f.kind == NET_FAILED),
            "NET_CONNECTED or NET_FAILED",
        );
        match Message::decode_from_agent(f.as_frame()).expect("checked") {
            Message::Net(NetMsg::Connected(c)) => Ok(c),
            Message::Net(NetMsg::Failed(e)) => Err(e),
            m => unreachable!("{m:?}"),
        }
    }

    fn net_send(&self, id: u32, data: &[u8]) {
        self.send(&Message::Net(NetMsg::Send(data)), id);
    }

    fn net_ack(&self, id: u32, bytes: u32) {
        self.send(&Message::Net(NetMsg::RecvAck(Ack { bytes })), id);
    }

    fn net_shutdown(&self, id: u32) {
        self.send(&Message::Net(NetMsg::Shutdown), id);
    }

    fn net_close(&self, id: u32, reset: bool) {
        self.send(&Message::Net(NetMsg::Close(NetClose { reset })), id);
    }

    /// The next frame of connection `id`.
    #[track_caller]
    fn net_frame(&mut self, id: u32) -> OwnedFrame {
        self.recv_where(
            |f| f.id == id && is_net(f.kind),
            "a frame of the connection",
        )
    }

    /// Takes one frame of `id` into `seen` (acknowledging NET_RECV when
    /// `ack`); true once it was the final one.
    #[track_caller]
    fn net_collect(&mut self, id: u32, seen: &mut NetSeen, ack: bool) -> bool {
        let f = self.net_frame(id);
        match f.kind {
            NET_RECV => {
                assert!(!seen.eof, "NET_RECV after NET_EOF on {id}");
                seen.data.extend_from_slice(&f.payload);
                if ack {
                    self.net_ack(id, f.payload.len() as u32);
                }
            }
            NET_EOF => {
                assert!(!seen.eof, "a second NET_EOF on {id}");
                seen.eof = true;
            }
            NET_SEND_ACK => seen.send_acked += super::agent::ack_bytes(&f),
            NET_CLOSED | NET_FAILED => {
                match Message::decode_from_agent(f.as_frame()).expect("checked") {
                    Message::Net(NetMsg::Closed(c)) => seen.closed = Some(c),
                    Message::Net(NetMsg::Failed(e)) => seen.failed = Some(e),
                    m => unreachable!("{m:?}"),
                }
                return true;
            }
            _ => panic!("unexpected {:#x} on {id}", f.kind),
        }
        false
    }

    /// Everything of `id` up to its final frame, acknowledging NET_RECV.
    #[track_caller]
    fn net_until_closed(&mut self, id: u32) -> NetSeen {
        let mut seen = NetSeen::default();
        while !self.net_collect(id, &mut seen, true) {}
        seen
    }

    /// Exactly `n` bytes of NET_RECV on `id` (acknowledged); anything else
    /// but acks meanwhile fails.
    #[track_caller]
    fn net_read_exactly(&mut self, id: u32, n: usize) -> Vec<u8> {
        let mut seen = NetSeen::default();
        while seen.data.len() < n {
            assert!(
                !self.net_collect(id, &mut seen, true),
                "{id} ended: {seen:?}"
            );
            assert!(
                !seen.eof,
                "NET_EOF on {id} after {} of {n} bytes",
                seen.data.len()
            );
        }
        assert_eq!(seen.data.len(), n, "more than {n} bytes on {id}");
        seen.data
    }

    /// Sends `data` on `id` in 64 KiB frames, never more than READY's
    /// `stdin_window` unacknowledged, taking (and acknowledging) what
    /// comes back meanwhile into `seen`.
    #[track_caller]
    fn net_send_all(&mut self, id: u32, data: &[u8], seen: &mut NetSeen) {
        let window = u64::from(self.stdin_window());
        let mut sent = 0u64;
        for chunk in data.chunks(64 * 1024) {
            while sent + chunk.len() as u64 - seen.send_acked > window {
                assert!(!self.net_collect(id, seen, true), "{id} ended: {seen:?}");
            }
            self.net_send(id, chunk);
            sent += chunk.len() as u64;
        }
    }

    #[track_caller]
    fn net_expect_failed(&mut self, id: u32, req: &NetConnect, kind: &str) -> NetFailed {
        match self.net_connect(id, req) {
            Ok(c) => panic!("NET_CONNECT {req:?} connected ({c:?}), expected {kind}"),
            Err(e) => {
                assert_eq!(e.kind, kind, "NET_FAILED for {req:?}: {e:?}");
                assert!(!e.message.is_empty(), "NET_FAILED without a message: {e:?}");
                e
            }
        }
    }
}
