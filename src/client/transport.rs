//! Connect targets: where an agent listens, as a string (`unix:PATH`,
//! `vsock:CID:PORT`, `hvsock:UDS_PATH:PORT`), and how to open each.
//!
//! `vsock:` is AF_VSOCK from the host (the kernel's vhost-vsock, what QEMU's
//! `vhost-vsock-pci` gives). `hvsock:` is the *hybrid* vsock of Firecracker
//! and cloud-hypervisor, which expose a guest's vsock as a Unix socket on
//! the host: connect to it, send `CONNECT PORT\n`, read `OK HOSTPORT\n`,
//! and the rest of the stream is the guest's port. Each way that fails has
//! its own [`ConnectError`] variant, so a caller (and agentctl's one-line
//! message) can say what to do about it.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest reply line accepted from a hybrid vsock (`OK 1073741824\n`
/// is 14 bytes).
const MAX_HANDSHAKE_LINE: usize = 256;

/// How long the hybrid vsock handshake may take unless told otherwise.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where to reach an agent: see [`Target::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `unix:PATH`: an agent listening on a Unix socket (`agentd --listen
    /// unix:PATH`, or QEMU's `-chardev socket`).
    Unix(PathBuf),
    /// `vsock:CID:PORT`: AF_VSOCK to a guest's context id and port.
    Vsock {
        /// The guest's context id (3 and up for guests).
        cid: u32,
        /// The port the agent listens on (`agentd --listen vsock:PORT`).
        port: u32,
    },
    /// `hvsock:UDS_PATH:PORT`: the hybrid vsock of Firecracker and
    /// cloud-hypervisor (the Unix socket the monitor made, and the guest's
    /// port).
    Hybrid {
        /// The monitor's Unix socket (Firecracker's `uds_path`).
        path: PathBuf,
        /// The guest port to `CONNECT` to.
        port: u32,
    },
}

/// Why a connection to an agent could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The target string is not one of the forms [`Target::parse`] takes.
    #[error("{0}")]
    BadAddress(String),
    /// No socket at the path (nothing listens there, or a typo).
    #[error("no socket at {}: is the agent (or the VM) running?", .0.display())]
    SocketAbsent(PathBuf),
    /// Something is at the path but refuses connections (a stale socket
    /// whose server has gone).
    #[error("connection refused at {}: nothing is listening there any more", .0.display())]
    Refused(PathBuf),
    /// Any other failure opening a Unix socket.
    #[error("cannot connect to {}: {source}", path.display())]
    Unix {
        /// The socket's path.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// This host cannot make AF_VSOCK sockets (no `vhost_vsock` /
    /// `vsock` module loaded, or a kernel without vsock).
    #[error("this host has no vsock (AF_VSOCK: {0}); load the vhost_vsock module, or connect with unix: or hvsock:")]
    VsockUnavailable(#[source] io::Error),
    /// AF_VSOCK exists but the connection to `cid:port` failed.
    #[error("cannot connect to vsock:{cid}:{port}: {source}")]
    Vsock {
        /// The context id.
        cid: u32,
        /// The port.
        port: u32,
        /// The operating system's error (ECONNRESET or ETIMEDOUT when no
        /// guest or no listener answers, ENODEV for an unknown CID).
        #[source]
        source: io::Error,
    },
    /// The hybrid vsock closed before answering `CONNECT` (Firecracker
    /// does this when nothing listens on the guest port).
    #[error("{} closed the connection after CONNECT {port}: nothing listens on guest port {port}?", path.display())]
    HandshakeClosed {
        /// The monitor's socket.
        path: PathBuf,
        /// The guest port asked for.
        port: u32,
    },
    /// The hybrid vsock answered something other than `OK ...`.
    #[error("{} answered {reply:?} to CONNECT {port}, not OK: is it a Firecracker/cloud-hypervisor vsock socket?", path.display())]
    HandshakeRejected {
        /// The monitor's socket.
        path: PathBuf,
        /// The guest port asked for.
        port: u32,
        /// What it answered (the line, without its newline; cut at 256
        /// bytes).
        reply: String,
    },
    /// No answer to `CONNECT` within the handshake timeout.
    #[error("{} did not answer CONNECT {port} within {after:?}", path.display())]
    HandshakeTimeout {
        /// The monitor's socket.
        path: PathBuf,
        /// The guest port asked for.
        port: u32,
        /// The timeout.
        after: Duration,
    },
    /// Reading or writing the handshake failed.
    #[error("hybrid vsock handshake with {} failed: {source}", path.display())]
    HandshakeIo {
        /// The monitor's socket.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

fn parse_port(s: &str, whole: &str) -> Result<u32, ConnectError> {
    s.parse::<u32>().map_err(|_| {
        ConnectError::BadAddress(format!(
            "{whole:?}: the port {s:?} is not a number (e.g. vsock:3:1024)"
        ))
    })
}

impl Target {
    /// Parses `unix:PATH`, `vsock:CID:PORT` or `hvsock:UDS_PATH:PORT` (the
    /// path may itself contain `:`; the port is after the last one).
    pub fn parse(s: &str) -> Result<Target, ConnectError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ConnectError::BadAddress(
                    "unix: needs a path (unix:/run/agent.sock)".into(),
                ));
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            let Some((cid, port)) = rest.split_once(':') else {
                return Err(ConnectError::BadAddress(format!(
                    "{s:?}: give vsock:CID:PORT (e.g. vsock:3:1024)"
                )));
            };
            let cid = cid.parse::<u32>().map_err(|_| {
                ConnectError::BadAddress(format!(
                    "{s:?}: the CID {cid:?} is not a number (e.g. vsock:3:1024)"
                ))
            })?;
            return Ok(Target::Vsock {
                cid,
                port: parse_port(port, s)?,
            });
        }
        if let Some(rest) = s.strip_prefix("hvsock:") {
            let Some((path, port)) = rest.rsplit_once(':').filter(|(p, _)| !p.is_empty()) else {
                return Err(ConnectError::BadAddress(format!(
                    "{s:?}: give hvsock:UDS_PATH:PORT (e.g. hvsock:/run/fc/v.sock:1024)"
                )));
            };
            return Ok(Target::Hybrid {
                path: PathBuf::from(path),
                port: parse_port(port, s)?,
            });
        }
        Err(ConnectError::BadAddress(format!(
            "{s:?} is not an agent address: give unix:PATH, vsock:CID:PORT or hvsock:UDS_PATH:PORT"
        )))
    }

    /// Opens the connection (for `hvsock:`, the handshake done): one
    /// descriptor, read and written both ways.
    pub(crate) fn open(&self, handshake_timeout: Duration) -> Result<OwnedFd, ConnectError> {
        match self {
            Target::Unix(path) => Ok(OwnedFd::from(connect_unix(path)?)),
            Target::Vsock { cid, port } => connect_vsock(*cid, *port),
            Target::Hybrid { path, port } => {
                let stream = connect_unix(path)?;
                hybrid_handshake(&stream, path, *port, handshake_timeout)?;
                Ok(OwnedFd::from(stream))
            }
        }
    }
}

impl std::str::FromStr for Target {
    type Err = ConnectError;
    fn from_str(s: &str) -> Result<Target, ConnectError> {
        Target::parse(s)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
            Target::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Target::Hybrid { path, port } => write!(f, "hvsock:{}:{port}", path.display()),
        }
    }
}

pub(crate) fn connect_unix(path: &Path) -> Result<UnixStream, ConnectError> {
    UnixStream::connect(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => ConnectError::SocketAbsent(path.to_owned()),
        io::ErrorKind::ConnectionRefused => ConnectError::Refused(path.to_owned()),
        _ => ConnectError::Unix {
            path: path.to_owned(),
            source,
        },
    })
}

fn connect_vsock(cid: u32, port: u32) -> Result<OwnedFd, ConnectError> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(ConnectError::VsockUnavailable(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a descriptor socket(2) just returned, owned by no one else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: a zeroed sockaddr_vm is a valid value of it.
    let mut svm: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    svm.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    svm.svm_cid = cid;
    svm.svm_port = port;
    loop {
        // SAFETY: `svm` is a valid sockaddr_vm and the length is its size.
        let r = unsafe {
            libc::connect(
                raw,
                (&svm as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(fd);
        }
        let source = io::Error::last_os_error();
        if source.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Err(ConnectError::Vsock { cid, port, source });
    }
}

/// What the first line of a hybrid vsock's answer means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HandshakeReply {
    /// `OK ...`: connected.
    Ok,
    /// Anything else.
    Other(String),
}

/// Judges one reply line (without its newline).
pub(crate) fn judge_reply(line: &[u8]) -> HandshakeReply {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches('\r');
    if text == "OK" || text.starts_with("OK ") {
        HandshakeReply::Ok
    } else {
        HandshakeReply::Other(text.to_owned())
    }
}

/// `CONNECT PORT\n`, then one line, read a byte at a time so that nothing
/// after the newline (the agent's READY) is consumed.
fn hybrid_handshake(
    stream: &UnixStream,
    path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<(), ConnectError> {
    let io_err = |source| ConnectError::HandshakeIo {
        path: path.to_owned(),
        source,
    };
    let timeout = timeout.max(Duration::from_millis(1));
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    let mut w = stream;
    match w.write_all(format!("CONNECT {port}\n").as_bytes()) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            return Err(ConnectError::HandshakeClosed {
                path: path.to_owned(),
                port,
            })
        }
        Err(e) => return Err(io_err(e)),
    }
    let mut line = Vec::new();
    let mut r = stream;
    let mut byte = [0u8; 1];
    loop {
        match r.read(&mut byte) {
            Ok(0) => {
                return Err(ConnectError::HandshakeClosed {
                    path: path.to_owned(),
                    port,
                })
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                if line.len() == MAX_HANDSHAKE_LINE {
                    return Err(ConnectError::HandshakeRejected {
                        path: path.to_owned(),
                        port,
                        reply: String::from_utf8_lossy(&line).into_owned(),
                    });
                }
                line.push(byte[0]);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ConnectError::HandshakeTimeout {
                    path: path.to_owned(),
                    port,
                    after: timeout,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(ConnectError::HandshakeClosed {
                    path: path.to_owned(),
                    port,
                })
            }
            Err(e) => return Err(io_err(e)),
        }
    }
    stream.set_read_timeout(None).map_err(io_err)?;
    match judge_reply(&line) {
        HandshakeReply::Ok => Ok(()),
        HandshakeReply::Other(reply) => Err(ConnectError::HandshakeRejected {
            path: path.to_owned(),
            port,
            reply,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            Target::parse("unix:/a/b").unwrap(),
            Target::Unix("/a/b".into())
        );
        assert_eq!(
            Target::parse("vsock:3:1024").unwrap(),
            Target::Vsock { cid: 3, port: 1024 }
        );
        assert_eq!(
            Target::parse("hvsock:/run/a:b.sock:52").unwrap(),
            Target::Hybrid {
                path: "/run/a:b.sock".into(),
                port: 52
            }
        );
        for bad in [
            "unix:",
            "vsock:3",
            "vsock:x:1",
            "vsock:3:y",
            "hvsock:/x",
            "hvsock::5",
            "hvsock:/x:p",
            "tcp:1.2.3.4:5",
            "/tmp/sock",
        ] {
            assert!(
                matches!(Target::parse(bad), Err(ConnectError::BadAddress(_))),
                "{bad}"
            );
        }
        for s in ["unix:/a", "vsock:3:1024", "hvsock:/v.sock:52"] {
            assert_eq!(Target::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn replies() {
        assert_eq!(judge_reply(b"OK 1073741824"), HandshakeReply::Ok);
        assert_eq!(judge_reply(b"OK"), HandshakeReply::Ok);
        assert_eq!(judge_reply(b"OK 5\r"), HandshakeReply::Ok);
        assert_eq!(judge_reply(b"NOPE"), HandshakeReply::Other("NOPE".into()));
        assert_eq!(judge_reply(b"OKAY"), HandshakeReply::Other("OKAY".into()));
    }
}
