//! Where a NET_CONNECT goes and how: socket addresses, a nonblocking
//! connect for what needs no lookup (IP literals, `localhost`, a Unix
//! socket as the agent's user), and a worker for what might block or needs
//! other credentials (a name to resolve, a `user`), which connects and
//! hands the connected socket back over a Unix socketpair (SCM_RIGHTS).

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{self as nsock, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::messages::{NetConnect, NetErrorKind, NetFailed};

use super::super::sys::cvt;
use super::super::worker::{self, SetupError};

/// Where to connect, as checked from NET_CONNECT.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// Addresses to try in order (a literal, or `localhost`).
    Addrs(Vec<SocketAddr>),
    /// A name the guest must resolve (in a worker).
    Name(String, u16),
    /// A Unix socket (`@name` is abstract).
    Unix(String),
}

/// The default connect timeout.
pub(crate) const DEFAULT_TIMEOUT_MS: u32 = 10_000;

fn invalid(m: impl Into<String>) -> NetFailed {
    NetFailed::new(NetErrorKind::InvalidRequest, m, None)
}

/// Checks a NET_CONNECT and says where it goes.
pub(crate) fn target(req: &NetConnect) -> Result<Target, NetFailed> {
    match (&req.host, req.port, &req.path) {
        (Some(host), Some(port), None) => {
            if port == 0 {
                return Err(invalid("port 0"));
            }
            if host.is_empty() || host.contains('\0') {
                return Err(invalid("host is empty or has a NUL byte"));
            }
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = bare.parse::<IpAddr>() {
                return Ok(Target::Addrs(vec![SocketAddr::new(ip, port)]));
            }
            if host.starts_with('[') || (host.contains(':') && !host.contains('%')) {
                // Not an address, and no name has brackets or a colon: a
                // port written into `host` ("127.0.0.1:80"), which would
                // otherwise go to DNS.
                return Err(invalid(format!(
                    "host {} is neither an IP literal nor a name (the port goes in `port`)",
                    crate::messages::quote(host)
                )));
            }
            if host.eq_ignore_ascii_case("localhost") {
                return Ok(Target::Addrs(vec![
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
                    SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
                ]));
            }
            Ok(Target::Name(host.clone(), port))
        }
        (None, None, Some(path)) => {
            if path.is_empty() || path.contains('\0') {
                return Err(invalid("path is empty or has a NUL byte"));
            }
            if path.len() >= 108 {
                return Err(invalid(format!(
                    "a Unix socket path has at most 107 bytes, not {}",
                    path.len()
                )));
            }
            Ok(Target::Unix(path.clone()))
        }
        _ => Err(invalid(
            "NET_CONNECT takes host and port, or path (exactly one of the two)",
        )),
    }
}

/// A `sockaddr` for `addr`, as connect(2) takes it.
fn sockaddr_in(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: a zeroed sockaddr_storage is valid; we fill the family's part.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for any
            // sockaddr.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// A `sockaddr_un` for `path` (`@name`: the abstract namespace).
fn sockaddr_un(path: &str) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: a zeroed sockaddr_un is valid.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes();
    let (abstract_name, name) = match bytes.strip_prefix(b"@") {
        Some(rest) => (true, rest),
        None => (false, bytes),
    };
    let start = usize::from(abstract_name);
    for (i, b) in name.iter().enumerate() {
        sun.sun_path[start + i] = *b as libc::c_char;
    }
    let base = std::mem::size_of::<libc::sa_family_t>();
    let len = if abstract_name {
        base + 1 + name.len()
    } else {
        base + name.len() + 1
    };
    (sun, len as libc::socklen_t)
}

/// What a nonblocking connect came to at once.
pub(crate) enum Started {
    /// Connected already (a Unix socket, or loopback TCP, often is).
    Connected(OwnedFd),
    /// In progress: wait for writability, then [`finish`].
    Pending(OwnedFd),
}

/// Starts a nonblocking connect to `addr`.
pub(crate) fn start_tcp(addr: &SocketAddr) -> io::Result<Started> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let (ss, len) = sockaddr_in(addr);
    start(family, (&ss as *const libc::sockaddr_storage).cast(), len)
}

/// Starts a nonblocking connect to the Unix socket `path`.
pub(crate) fn start_unix(path: &str) -> io::Result<Started> {
    let (sun, len) = sockaddr_un(path);
    start(
        libc::AF_UNIX,
        (&sun as *const libc::sockaddr_un).cast(),
        len,
    )
}

fn start(
    family: libc::c_int,
    addr: *const libc::sockaddr,
    len: libc::socklen_t,
) -> io::Result<Started> {
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: plain socket(2); the fd is checked and owned below.
    let fd = cvt(unsafe { libc::socket(family, flags, 0) })?;
    // SAFETY: socket succeeded; the fd is ours alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` points to a sockaddr of `len` bytes the caller built.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), addr, len) };
    if rc == 0 {
        return Ok(Started::Connected(fd));
    }
    // EAGAIN is no connect in progress: for a Unix socket a listener with
    // a full backlog (the caller waits for room), for TCP no free local
    // port (`resource`).
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EINPROGRESS) => Ok(Started::Pending(fd)),
        _ => Err(io::Error::last_os_error()),
    }
}

/// A socket's pending error (SO_ERROR): a pending connect's outcome once
/// writable, or a reset that came when nothing reads the socket.
pub(crate) fn finish(fd: RawFd) -> io::Result<()> {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int into `err`.
    cvt(unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    Ok(())
}

/// The peer and local addresses of a connected socket, as NET_CONNECTED
/// says them.
pub(crate) fn addresses(fd: RawFd, unix_path: Option<&str>) -> (String, String) {
    if let Some(p) = unix_path {
        return (p.to_owned(), String::new());
    }
    let name = |get: unsafe extern "C" fn(
        libc::c_int,
        *mut libc::sockaddr,
        *mut libc::socklen_t,
    ) -> libc::c_int| {
        // SAFETY: a zeroed storage is valid; the call writes at most `len`.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: as above.
        let rc = unsafe {
            get(
                fd,
                (&mut ss as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        if rc < 0 {
            return String::new();
        }
        format_sockaddr(&ss)
    };
    (name(libc::getpeername), name(libc::getsockname))
}

fn format_sockaddr(ss: &libc::sockaddr_storage) -> String {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            format!("{ip}:{}", u16::from_be(sin.sin_port))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says it holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            format!("[{ip}]:{}", u16::from_be(sin6.sin6_port))
        }
        _ => String::new(),
    }
}

/// The NET_FAILED for a failed connect.
pub(crate) fn failure(e: &io::Error, what: &str) -> NetFailed {
    let errno = e.raw_os_error();
    let kind = errno.map_or(NetErrorKind::Other, NetErrorKind::from_errno);
    NetFailed::new(kind, format!("{what}: {e}"), errno)
}

/// Resolves `host` the way the guest does: `/etc/hosts` first, then the C
/// library (DNS). In a worker only: it may block.
fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    if let Ok(text) = std::fs::read_to_string("/etc/hosts") {
        let mut found = Vec::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) else {
                continue;
            };
            if words.any(|n| n.eq_ignore_ascii_case(host)) {
                found.push(SocketAddr::new(ip, port));
            }
        }
        if !found.is_empty() {
            return Ok(found);
        }
    }
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    Ok(addrs)
}

/// Connects in the worker (blocking, within `timeout`): the first address
/// that answers wins.
fn connect_blocking(target: &Target, timeout: Duration) -> Result<OwnedFd, NetFailed> {
    match target {
        Target::Unix(path) => {
            let (sun, len) = sockaddr_un(path);
            let flags = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
            // SAFETY: plain socket(2); checked and owned below.
            let fd = cvt(unsafe { libc::socket(libc::AF_UNIX, flags, 0) })
                .map_err(|e| failure(&e, "socket"))?;
            // SAFETY: the fd is ours alone.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: `sun` is a sockaddr_un of `len` bytes.
            let rc = unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    (&sun as *const libc::sockaddr_un).cast(),
                    len,
                )
            };
            if rc < 0 {
                return Err(failure(
                    &io::Error::last_os_error(),
                    &format!("connect {path}"),
                ));
            }
            Ok(fd)
        }
        Target::Addrs(addrs) => connect_any(addrs, timeout),
        Target::Name(host, port) => {
            let addrs = resolve(host, *port).map_err(|e| {
                NetFailed::new(
                    NetErrorKind::NotFound,
                    format!("{} does not resolve: {e}", crate::messages::quote(host)),
                    e.raw_os_error(),
                )
            })?;
            connect_any(&addrs, timeout)
        }
    }
}

fn connect_any(addrs: &[SocketAddr], timeout: Duration) -> Result<OwnedFd, NetFailed> {
    let mut last = None;
    for a in addrs {
        match std::net::TcpStream::connect_timeout(a, timeout) {
            Ok(s) => return Ok(OwnedFd::from(s)),
            // std says so without an errno: the same `timed_out` as the
            // loop's timer gives.
            Err(e) if e.kind() == io::ErrorKind::TimedOut && e.raw_os_error().is_none() => {
                let e = io::Error::from_raw_os_error(libc::ETIMEDOUT);
                last = Some(failure(&e, &format!("connect {a}")));
            }
            Err(e) => last = Some(failure(&e, &format!("connect {a}"))),
        }
    }
    Err(last.unwrap_or_else(|| NetFailed::new(NetErrorKind::NotFound, "no address", None)))
}

/// Starts a worker that connects to `target` as `user` and sends the
/// connected socket back on its control socket. Its control socket (the
/// agent's end, nonblocking) is the returned fd.
pub(crate) fn spawn_connector(
    target: Target,
    user: Option<&str>,
    timeout: Duration,
) -> io::Result<(libc::pid_t, OwnedFd)> {
    let (ours, theirs) = nsock::socketpair(
        nsock::AddressFamily::Unix,
        nsock::SockType::Stream,
        None,
        nsock::SockFlag::SOCK_CLOEXEC,
    )?;
    // The socketpair is the worker's control channel (its fd 3), so that
    // it can pass the socket back.
    let w = worker::spawn_on(ours, theirs, user, false, false, move |io, setup| {
        let result = match setup {
            Ok(_) => connect_blocking(&target, timeout),
            Err(SetupError::User(e)) => {
                Err(NetFailed::new(NetErrorKind::BadUser, e.to_string(), None))
            }
            Err(SetupError::Credentials(call, e)) => Err(failure(&e, call)),
        };
        report(io.ctl.as_raw_fd(), result)
    })?;
    Ok((w.pid, w.pipes.ctl))
}

/// In the worker: sends the socket (one byte 1 with SCM_RIGHTS), or the
/// failure (byte 0, then the NET_FAILED map).
fn report(sock: RawFd, result: Result<OwnedFd, NetFailed>) -> i32 {
    match result {
        Ok(fd) => {
            let fds = [fd.as_raw_fd()];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            let iov = [IoSlice::new(&[1u8])];
            i32::from(nsock::sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::empty(), None).is_err())
        }
        Err(f) => {
            let mut msg = vec![0u8];
            if rmp_serde::encode::write_named(&mut msg, &f).is_err() {
                return 1;
            }
            // SAFETY: writing from a valid buffer to our socket.
            let n = unsafe { libc::write(sock, msg.as_ptr().cast(), msg.len()) };
            i32::from(n < 0)
        }
    }
}

/// What a connector worker said, read from the agent's end (nonblocking):
/// `None` while nothing has come.
pub(crate) fn receive(sock: RawFd) -> Option<Result<OwnedFd, NetFailed>> {
    let mut buf = [0u8; 2048];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg =
        match nsock::recvmsg::<()>(sock, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => m,
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => return None,
            Err(e) => return Some(Err(failure(&io::Error::from(e), "the connector"))),
        };
    let mut fd = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for f in fds {
                    // SAFETY: the kernel gave us this fd; it is ours now.
                    let owned = unsafe { OwnedFd::from_raw_fd(f) };
                    fd.get_or_insert(owned);
                }
            }
        }
    }
    let n = msg.bytes;
    Some(match (fd, n) {
        (Some(fd), _) => Ok(fd),
        (None, 0) => Err(NetFailed::new(
            NetErrorKind::Other,
            "the connector ended without an answer",
            None,
        )),
        (None, n) => {
            let f = if buf[0] == 0 {
                rmp_serde::from_slice::<NetFailed>(&buf[1..n]).ok()
            } else {
                None
            };
            Err(f.unwrap_or_else(|| {
                NetFailed::new(NetErrorKind::Other, "the connector sent garbage", None)
            }))
        }
    })
}
