//! Listening transports (`--listen unix:PATH`, `--listen vsock:PORT`):
//! sockets in the poll loop whose accepted connections become host links,
//! each with its own id space. A host that goes away from one ends no
//! session (extension rule 7): its sessions are detached.
//!
//! vsock is what Firecracker and cloud-hypervisor give a guest (they have
//! no virtio-console); the host reaches the port through the monitor's
//! hybrid Unix socket (`CONNECT PORT`), or through AF_VSOCK under QEMU's
//! vhost-vsock. A vsock transport reset (a snapshot) closes every accepted
//! connection: each is a host that went away, and the next one gets READY.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::str::FromStr;

use super::sys::cvt;

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix socket path (a stale socket file there is replaced).
    Unix(PathBuf),
    /// An AF_VSOCK port, on any CID.
    Vsock(u32),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<ListenAddr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path, as in unix:/run/agentd.sock".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Some(port) = s.strip_prefix("vsock:") {
            return port
                .parse::<u32>()
                .map(ListenAddr::Vsock)
                .map_err(|_| format!("vsock:{port}: the port must be a number (vsock:1024)"));
        }
        Err(format!(
            "{s:?} is not a listening address: give unix:PATH or vsock:PORT"
        ))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Vsock(port) => write!(f, "vsock:{port}"),
        }
    }
}

/// A bound, listening socket.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    addr: ListenAddr,
}

/// How many connections may wait to be accepted.
const BACKLOG: libc::c_int = 128;

impl Listener {
    /// Binds and listens on `addr` (nonblocking, close-on-exec). A Unix
    /// socket is made `0600`: only the agent's user may connect.
    pub fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        let family = match addr {
            ListenAddr::Unix(_) => libc::AF_UNIX,
            ListenAddr::Vsock(_) => libc::AF_VSOCK,
        };
        // SAFETY: plain socket(2); the fd is checked and owned below.
        let fd = cvt(unsafe { libc::socket(family, flags, 0) })?;
        // SAFETY: socket succeeded; the fd is ours alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        match addr {
            ListenAddr::Unix(path) => bind_unix(&fd, path)?,
            ListenAddr::Vsock(port) => bind_vsock(&fd, *port)?,
        }
        // SAFETY: listen on our own bound socket.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) })?;
        Ok(Listener {
            fd,
            addr: addr.clone(),
        })
    }

    pub(crate) fn fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// Accepts one connection (nonblocking, close-on-exec); `None` when
    /// none is waiting.
    pub(crate) fn accept(&self) -> io::Result<Option<OwnedFd>> {
        loop {
            let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
            // SAFETY: accept4 with null address pointers.
            let fd = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    flags,
                )
            };
            if fd >= 0 {
                // SAFETY: accept4 returned a new fd that is ours alone.
                return Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(None),
                // The connection went away before it was accepted: the next.
                Some(libc::ECONNABORTED) | Some(libc::EPROTO) => continue,
                _ => return Err(e),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenAddr::Unix(path) = &self.addr {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn bind_unix(fd: &OwnedFd, path: &std::path::Path) -> io::Result<()> {
    // A socket file left by an agent before: replaced. Anything else at the
    // path is refused.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= sun.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is longer than a socket path may be", path.display()),
        ));
    }
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (i, b) in bytes.iter().enumerate() {
        sun.sun_path[i] = *b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `sun` is a sockaddr_un of at least `len` bytes.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sun as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

fn bind_vsock(fd: &OwnedFd, port: u32) -> io::Result<()> {
    // SAFETY: a zeroed sockaddr_vm is valid.
    let mut svm: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    svm.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    svm.svm_port = port;
    svm.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: `svm` is a valid sockaddr_vm of the size given.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&svm as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "unix:/run/a.sock".parse::<ListenAddr>(),
            Ok(ListenAddr::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            "vsock:1024".parse::<ListenAddr>(),
            Ok(ListenAddr::Vsock(1024))
        );
        assert!("vsock:x".parse::<ListenAddr>().is_err());
        assert!("tcp:1".parse::<ListenAddr>().is_err());
        assert!("unix:".parse::<ListenAddr>().is_err());
    }
}
