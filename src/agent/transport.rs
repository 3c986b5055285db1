//! The byte stream to one host: how it is opened, and what its end means.
//!
//! Every transport has the same shape: a read fd and a write fd, both
//! nonblocking and close-on-exec (the same fd for a socket or a device).
//! What end of file means is its [`TransportKind`]: on stdio, a FIFO pair
//! or a socket given with `--port` it is the end of the agent (contract
//! guarantee 7); on a device port only the end of one host's visit.
//!
//! Only [`super::link::HostLink`] reads or writes these fds.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::sys::{dup_cloexec, grow_pipe, is_pipe, open_dev_null, set_nonblocking};

/// What the transport is, which decides what its end of file means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// Two pipes: the agent's own stdin/stdout (loopback tests, `agentctl`
    /// embedded), a FIFO pair `PATH.in`/`PATH.out`, or the fuzz harness's
    /// pipes. End of file ends the agent.
    Pipes,
    /// A Unix socket the agent connected to (`--port` on a socket): one
    /// host, for the agent's lifetime. End of file ends the agent.
    Socket,
    /// A device port (virtio-console, a serial line or other terminal):
    /// hosts come and go; the port stays open, and its end of file is only
    /// the end of one host's visit.
    Device,
    /// A connection accepted on a listening socket: its end of file is the
    /// end of that host's link only (its sessions are detached).
    Accepted,
}

/// The fds of one host connection.
#[derive(Debug)]
pub struct Transport {
    read: OwnedFd,
    /// `None` when the read fd is also written (socket, device).
    write: Option<OwnedFd>,
    kind: TransportKind,
    /// The write side is a pipe, so a pipe session's output can be moved
    /// into it with splice(2) (see `OutQueue::splice_frame`).
    write_is_pipe: bool,
    /// The read side is a pipe, so a STDIN payload can be moved out of it
    /// with splice(2) (see `Inflow::stream_from`).
    read_is_pipe: bool,
}

impl Transport {
    /// Takes over stdin and stdout: duplicates them close-on-exec above 2
    /// and points fds 0 and 1 at /dev/null, so no child can inherit the
    /// transport and no stray write to stdout can corrupt the stream.
    pub fn stdio() -> io::Result<Transport> {
        let read = dup_cloexec(0)?;
        let write = dup_cloexec(1)?;
        let null = open_dev_null()?;
        // SAFETY: dup2 onto fds 0 and 1, which the agent owns (their old
        // files live on in `read` and `write`).
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(null.as_raw_fd(), 1);
        }
        set_nonblocking(read.as_raw_fd())?;
        set_nonblocking(write.as_raw_fd())?;
        Ok(Transport::from_pipes(read, write))
    }

    /// Opens `path`:
    ///
    /// - a Unix socket is connected to (one host, for the agent's life);
    /// - a character device (a virtio port, a serial line, a pty) is
    ///   opened read-write, and put in raw mode if it is a terminal (a
    ///   `/dev/hvc*` console would otherwise echo frames back, rewrite
    ///   CR/LF, and turn a 0x03 byte into SIGINT);
    /// - a FIFO pair `PATH.in` (host to agent) and `PATH.out` (agent to
    ///   host), when `PATH` itself does not exist, as QEMU's
    ///   `-chardev pipe,path=PATH` and `agentctl --port PATH` use it: like
    ///   stdio, end of file on `PATH.in` ends the agent.
    ///
    /// A single FIFO is refused: opened read-write, the agent would read
    /// its own frames back, and it would never see end of file.
    pub fn open(path: &Path) -> io::Result<Transport> {
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let (host_to_agent, agent_to_host) = fifo_pair(path);
                if is_fifo(&host_to_agent) && is_fifo(&agent_to_host) {
                    return Transport::open_fifo_pair(&host_to_agent, &agent_to_host);
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let ft = meta.file_type();
        if ft.is_socket() {
            let stream = UnixStream::connect(path)?;
            stream.set_nonblocking(true)?;
            return Ok(Transport::from_fd(stream.into(), TransportKind::Socket));
        }
        if ft.is_fifo() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is a single FIFO, which cannot carry both directions: \
                     create the pair {p}.in (host to agent) and {p}.out (agent to host) \
                     and pass {p}",
                    path.display(),
                    p = path.display()
                ),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(path)?;
        if ft.is_char_device() {
            make_raw_if_terminal(file.as_raw_fd())?;
            return Ok(Transport::from_fd(file.into(), TransportKind::Device));
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a regular file or directory, not a transport: \
                 give a character device, a Unix socket or a FIFO pair",
                path.display()
            ),
        ))
    }

    /// Opens a FIFO pair: `host_to_agent` for reading, `agent_to_host` for
    /// writing, each waiting (blocking: there is nothing else to do yet)
    /// until the host has opened its end, in this order, which is the
    /// order the host opens them in too. Opened read-only and write-only,
    /// so the host closing its ends is end of file here, as on stdio.
    fn open_fifo_pair(host_to_agent: &Path, agent_to_host: &Path) -> io::Result<Transport> {
        let read = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(host_to_agent)?;
        let write = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(agent_to_host)?;
        set_nonblocking(read.as_raw_fd())?;
        set_nonblocking(write.as_raw_fd())?;
        Ok(Transport::from_pipes(read.into(), write.into()))
    }

    /// Two fds already open, close-on-exec and nonblocking, usually
    /// pipes: `read` from the host, `write` to it. End of file ends the
    /// agent, as for [`Transport::stdio`] (which this is without the
    /// takeover of fds 0 and 1; the fuzz harness runs the agent this way).
    pub fn from_pipes(read: OwnedFd, write: OwnedFd) -> Transport {
        grow_pipe(read.as_raw_fd(), TRANSPORT_PIPE_SIZE);
        grow_pipe(write.as_raw_fd(), TRANSPORT_PIPE_SIZE);
        Transport {
            write_is_pipe: is_pipe(write.as_raw_fd()),
            read_is_pipe: is_pipe(read.as_raw_fd()),
            read,
            write: Some(write),
            kind: TransportKind::Pipes,
        }
    }

    /// Wraps an fd that is already open, close-on-exec and nonblocking.
    pub fn from_fd(fd: OwnedFd, kind: TransportKind) -> Transport {
        Transport {
            write_is_pipe: is_pipe(fd.as_raw_fd()),
            read_is_pipe: is_pipe(fd.as_raw_fd()),
            read: fd,
            write: None,
            kind,
        }
    }

    pub(crate) fn kind(&self) -> TransportKind {
        self.kind
    }

    pub(crate) fn read_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    pub(crate) fn write_fd(&self) -> RawFd {
        self.write.as_ref().unwrap_or(&self.read).as_raw_fd()
    }

    /// True when reading and writing use separate fds (pipes).
    pub(crate) fn split(&self) -> bool {
        self.write.is_some()
    }

    pub(crate) fn write_is_pipe(&self) -> bool {
        self.write_is_pipe
    }

    pub(crate) fn read_is_pipe(&self) -> bool {
        self.read_is_pipe
    }
}

/// Bytes a pipe between the host and the agent may buffer in the kernel, in
/// each direction. A 64 KiB frame fills a default (64 KiB) pipe by itself,
/// so each side would wake once per frame; with room for several frames
/// the agent writes its output, and the host its STDIN up to the window,
/// in one go.
const TRANSPORT_PIPE_SIZE: libc::c_int = 1 << 20;

/// `PATH.in` and `PATH.out`: the FIFO pair that `PATH` names when it does
/// not exist itself (QEMU's `-chardev pipe` convention, seen from the
/// guest's side: the host writes `.in` and reads `.out`).
pub(crate) fn fifo_pair(path: &Path) -> (PathBuf, PathBuf) {
    let with = |suffix: &str| {
        let mut s = OsString::from(path.as_os_str());
        s.push(suffix);
        PathBuf::from(s)
    };
    (with(".in"), with(".out"))
}

fn is_fifo(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// Puts `fd` in raw mode if it is a terminal: no echo, no line editing, no
/// CR/LF translation, no signals or flow control from bytes, 8-bit clean.
fn make_raw_if_terminal(fd: RawFd) -> io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it in or fails.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios to write into.
    if unsafe { libc::tcgetattr(fd, &mut t) } < 0 {
        // ENOTTY: a character device that is not a terminal (a virtio
        // port): nothing to set.
        return match io::Error::last_os_error().raw_os_error() {
            Some(libc::ENOTTY) | Some(libc::EINVAL) => Ok(()),
            _ => Err(io::Error::last_os_error()),
        };
    }
    // SAFETY: `t` came from tcgetattr; cfmakeraw only edits its flags.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: setting the attributes just read and edited.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
