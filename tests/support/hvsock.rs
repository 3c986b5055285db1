//! The host side of a hybrid vsock (Firecracker's, cloud-hypervisor's, and
//! rust-vmm's `vhost-device-vsock`, which the VM suite runs under QEMU):
//! the guest's vsock is a Unix socket on the host; a host connects to it,
//! writes `CONNECT PORT\n` and reads `OK HOST_PORT\n`, and from then on the
//! stream is the guest's vsock connection to PORT.
//!
//! The reply is read one byte at a time up to its newline, so that nothing
//! the guest sends right after it (the agent's READY) is taken with it.
//! Every way the handshake fails is its own [`HvsockError`]: a host that
//! retries while the VM boots needs to tell "nothing listens on the port
//! yet" (the monitor closes the socket: [`HvsockError::Closed`]) from "the
//! Unix socket is not there" and from a reply it cannot read.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest reply line taken (`OK 4294967295\n` is 14 bytes).
const MAX_REPLY: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum HvsockError {
    #[error("connecting to the hybrid vsock socket {path}: {source} (is the VM monitor, or vhost-device-vsock, running with this uds-path?)")]
    Connect { path: PathBuf, source: io::Error },
    #[error("writing `CONNECT {port}` to {path}: {source}")]
    Write {
        path: PathBuf,
        port: u32,
        source: io::Error,
    },
    #[error("reading the reply to `CONNECT {port}` from {path}: {source}")]
    Read {
        path: PathBuf,
        port: u32,
        source: io::Error,
    },
    #[error("no reply to `CONNECT {port}` from {path} within {limit:?}")]
    Timeout {
        path: PathBuf,
        port: u32,
        limit: Duration,
    },
    #[error("{path} closed the connection at `CONNECT {port}` (reply so far {got:?}): nothing listens on vsock port {port} in the guest (yet)")]
    Closed {
        path: PathBuf,
        port: u32,
        got: String,
    },
    #[error("{path} answered `CONNECT {port}` with {line:?}, not `OK <port>`")]
    Refused {
        path: PathBuf,
        port: u32,
        line: String,
    },
    #[error("{path} sent {MAX_REPLY} bytes after `CONNECT {port}` and no newline: {got:?}")]
    TooLong {
        path: PathBuf,
        port: u32,
        got: String,
    },
}

/// Connects to the hybrid vsock at `path`, guest port `port`: returns the
/// stream (blocking, no timeouts set) and the host-side port from `OK`.
pub fn connect(path: &Path, port: u32, limit: Duration) -> Result<(UnixStream, u32), HvsockError> {
    let stream = UnixStream::connect(path).map_err(|source| HvsockError::Connect {
        path: path.to_owned(),
        source,
    })?;
    handshake(stream, path, port, limit)
}

/// The handshake on a connected stream (split out so that it can be tested
/// against a fake monitor on a socket pair).
pub fn handshake(
    mut stream: UnixStream,
    path: &Path,
    port: u32,
    limit: Duration,
) -> Result<(UnixStream, u32), HvsockError> {
    let p = || path.to_owned();
    let read_err = |source| HvsockError::Read {
        path: p(),
        port,
        source,
    };
    stream.set_read_timeout(Some(limit)).map_err(read_err)?;
    if let Err(source) = stream.write_all(format!("CONNECT {port}\n").as_bytes()) {
        // A monitor that closes the socket before it has read the request
        // (vhost-device-vsock while the guest's device is not up yet) is
        // one that closed it after the request.
        return Err(match source.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => HvsockError::Closed {
                path: p(),
                port,
                got: String::new(),
            },
            _ => HvsockError::Write {
                path: p(),
                port,
                source,
            },
        });
    }
    let mut line = Vec::new();
    loop {
        let mut b = [0u8; 1];
        match stream.read(&mut b) {
            Ok(0) => {
                return Err(HvsockError::Closed {
                    path: p(),
                    port,
                    got: String::from_utf8_lossy(&line).into_owned(),
                })
            }
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HvsockError::Timeout {
                    path: p(),
                    port,
                    limit,
                })
            }
            // A monitor that resets the connection (nothing listening) is
            // the same as one that closes it.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(HvsockError::Closed {
                    path: p(),
                    port,
                    got: String::from_utf8_lossy(&line).into_owned(),
                })
            }
            Err(e) => return Err(read_err(e)),
        }
        if line.len() >= MAX_REPLY {
            return Err(HvsockError::TooLong {
                path: p(),
                port,
                got: String::from_utf8_lossy(&line).into_owned(),
            });
        }
    }
    let text = String::from_utf8_lossy(&line).into_owned();
    let host_port = text
        .strip_prefix("OK ")
        .and_then(|n| n.trim_end_matches('\r').parse::<u32>().ok())
        .ok_or_else(|| HvsockError::Refused {
            path: p(),
            port,
            line: text.clone(),
        })?;
    stream.set_read_timeout(None).map_err(read_err)?;
    Ok((stream, host_port))
}
