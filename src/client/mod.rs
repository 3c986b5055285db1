//! The host side of protocol v1: a client that drives an agent over any
//! transport and multiplexes many sessions over one connection.
//!
//! A [`Client`] is connected to one agent: a child process speaking the
//! protocol on its stdin/stdout ([`Client::spawn_agent`], for `agentd
//! --stdio`), a Unix socket ([`Client::connect_unix`], what QEMU's
//! `-chardev socket` gives), an address (`unix:`, `vsock:`, `hvsock:`:
//! [`Client::connect`]), or a device or FIFO pair ([`Client::open_port`]).
//! It waits for READY, checks `protocol == 1`, and then runs sessions:
//!
//! ```no_run
//! use agentd::client::{Client, Command, Event};
//!
//! # fn main() -> Result<(), agentd::client::Error> {
//! let client = Client::spawn_agent("target/debug/agentd")?;
//!
//! // Run to completion, like std::process::Command::output().
//! let out = client.output(Command::new("uname").arg("-a"))?;
//! print!("{}", String::from_utf8_lossy(&out.stdout));
//!
//! // Or stream: write stdin, read events as they come.
//! let mut session = client.exec(Command::new("tr").args(["a-z", "A-Z"]))?;
//! session.write_stdin(b"hello\n")?;
//! session.close_stdin()?;
//! for event in session.events() {
//!     match event? {
//!         Event::Stdout(bytes) => print!("{}", String::from_utf8_lossy(&bytes)),
//!         Event::Stderr(bytes) => eprint!("{}", String::from_utf8_lossy(&bytes)),
//!         Event::Error(e) => eprintln!("agent: {}: {}", e.kind, e.message),
//!         Event::Exited(status) => println!("{status}"),
//!         Event::Detached(d) => println!("session {} taken by another host", d.session),
//!     }
//! }
//! println!("round trip: {:?}", client.ping()?);
//! # Ok(())
//! # }
//! ```
//!
//! # Threads
//!
//! The client runs two threads per connection: a reader that decodes
//! frames and routes them by session id to per-session channels, and a
//! writer that owns the write side of the transport. [`Client`] is `Clone`,
//! `Send` and `Sync`; sessions can be driven from different threads at once,
//! and a [`SessionHandle`] lets one thread feed a session's stdin while
//! another reads its output. When the transport closes, every call that is
//! waiting returns [`Error::TransportClosed`].
//!
//! # Flow control
//!
//! STDIN never exceeds the agent's `stdin_window`: writers wait for
//! STDIN_ACK. With [`Command::output_window`] set, the session sends
//! OUTPUT_ACK as output is consumed through [`Session::next_event`], so a
//! consumer that falls behind makes the remote process block instead of
//! growing the client's memory. Without it (the default), output is
//! buffered in the client until read.
//!
//! # Ending
//!
//! Dropping the last [`Client`], [`Session`] or [`SessionHandle`] of a
//! connection closes the transport: an agent in stdio or socket mode then
//! kills every session and exits. A spawned agent is reaped.
//! [`Client::shutdown`] asks the agent to end every session and stop.

#![warn(missing_docs)]

mod clock;
mod command;
mod conn;
mod error;
mod fs;
mod net;
mod session;
mod sessions;
mod status;
mod stream;
mod transport;
mod tree;

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

pub use clock::{system_time_ns, ClockStep, GuestClock, ENTROPY_CHUNK, SYNC_ENTROPY_BYTES};
pub use command::Command;
pub use error::{Error, Result};
pub use session::{DetachOutcome, Event, Events, Output, Session, SessionHandle};
pub use sessions::{AttachOptions, DetachedSession, SessionRecord, SessionRef, SessionState};
pub use status::ExitStatus;
pub use transport::{ConnectError, Target, DEFAULT_HANDSHAKE_TIMEOUT};

pub use fs::{
    DirEntry, FileReader, FileType, FileWriter, Fs, Metadata, OpenOptions, ReadDir, TarOptions,
    TarReader, TreeDone, Watch, WatchEvent, WatchKind,
};
pub use net::{Forwarder, Net, NetStream, Target as NetTarget};
pub use tree::local_size;

pub use crate::messages::{FsErrorKind, NetErrorKind};

pub use crate::messages::{
    AttachFailed, AttachFailedKind, Attached, Detached, ErrorKind, ErrorMsg, Exec, ExecFailed,
    ExecFailedKind, Ready, RlimitResource,
};

use conn::{Conn, Routed, SessState, SessionShared};

use crate::codec::MAX_PAYLOAD;
use crate::messages::Kind;

/// The most STDIN payload the client puts in one frame.
const STDIN_CHUNK: usize = 64 * 1024;

/// How long [`Builder`] waits for READY unless told otherwise.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection to one agent. Cheap to clone; every clone drives the same
/// connection.
///
/// ```no_run
/// use agentd::client::{Client, Command};
///
/// # fn main() -> Result<(), agentd::client::Error> {
/// let client = Client::connect_unix("/tmp/vm0.sock")?;
/// let ready = client.ready();
/// println!("{} (protocol {}, pid {})", ready.agent, ready.protocol, ready.pid);
/// let status = client.exec(Command::new("true"))?.wait()?;
/// assert!(status.success());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Client {
    conn: Arc<Conn>,
}

/// Options for opening a [`Client`].
///
/// ```no_run
/// use std::time::Duration;
/// use agentd::client::Client;
///
/// # fn main() -> Result<(), agentd::client::Error> {
/// // A VM may take a while to boot before its agent says READY.
/// let client = Client::builder()
///     .ready_timeout(Some(Duration::from_secs(120)))
///     .connect_unix("/run/vm0/agent.sock")?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Builder {
    ready_timeout: Option<Duration>,
    handshake_timeout: Duration,
    clock_sync: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            ready_timeout: Some(DEFAULT_READY_TIMEOUT),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            clock_sync: true,
        }
    }
}

impl Builder {
    /// How long to wait for READY after the transport is open (`None`:
    /// forever). Default [`DEFAULT_READY_TIMEOUT`].
    pub fn ready_timeout(&mut self, timeout: Option<Duration>) -> &mut Self {
        self.ready_timeout = timeout;
        self
    }

    /// Whether to set the guest's clock to the host's and feed its entropy
    /// pool after READY, and again after every later READY (a VM restored
    /// from a snapshot; READY's `restores` counts them). Done only where
    /// the agent serves it (READY's `clock_set`: a VM's init, or `agentd
    /// --allow-clock`), before the connecting call returns (which waits for
    /// it as long as for READY, at most 10 s). Default `true`.
    pub fn clock_sync(&mut self, sync: bool) -> &mut Self {
        self.clock_sync = sync;
        self
    }

    /// How long the hybrid vsock (`hvsock:`) may take to answer `CONNECT`.
    /// Default [`DEFAULT_HANDSHAKE_TIMEOUT`].
    pub fn handshake_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Connects to an agent at `address`: `unix:PATH`, `vsock:CID:PORT`
    /// (AF_VSOCK, the host kernel's vhost-vsock) or `hvsock:UDS_PATH:PORT`
    /// (the hybrid vsock of Firecracker and cloud-hypervisor: `CONNECT
    /// PORT` on the monitor's Unix socket). Failures are
    /// [`Error::Transport`], one [`ConnectError`] variant for each way.
    pub fn connect(&self, address: &str) -> Result<Client> {
        self.connect_target(&Target::parse(address)?)
    }

    /// As [`connect`](Self::connect), with a parsed [`Target`].
    pub fn connect_target(&self, target: &Target) -> Result<Client> {
        let fd = target.open(self.handshake_timeout)?;
        let write = fd.try_clone().map_err(|source| Error::Connect {
            context: format!("cannot duplicate the socket to {target}"),
            source,
        })?;
        self.start(fd, write, None)
    }

    /// Starts `cmd` (an agent in stdio mode, e.g. `agentd --stdio`) and
    /// talks to it over its stdin and stdout. Its stderr is left as `cmd`
    /// has it (inherited by default).
    pub fn spawn(&self, mut cmd: std::process::Command) -> Result<Client> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd.spawn().map_err(|source| Error::Connect {
            context: format!("cannot start the agent {:?}", cmd.get_program()),
            source,
        })?;
        let pipes = (child.stdin.take(), child.stdout.take());
        let (Some(stdin), Some(stdout)) = pipes else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Connect {
                context: "cannot start the agent".into(),
                source: std::io::Error::other("no pipes to the child"),
            });
        };
        self.start(OwnedFd::from(stdout), OwnedFd::from(stdin), Some(child))
    }

    /// Starts the agent binary at `path` with `--stdio`.
    pub fn spawn_agent(&self, path: impl AsRef<Path>) -> Result<Client> {
        let mut cmd = std::process::Command::new(path.as_ref());
        cmd.arg("--stdio");
        self.spawn(cmd)
    }

    /// Connects to the Unix socket at `path`.
    pub fn connect_unix(&self, path: impl AsRef<Path>) -> Result<Client> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
            context: format!("cannot connect to {}", path.display()),
            source,
        })?;
        self.from_stream(stream)
    }

    /// Talks over a connected Unix stream (for example one end of
    /// `UnixStream::pair`).
    pub fn from_stream(&self, stream: UnixStream) -> Result<Client> {
        let write = stream.try_clone().map_err(|source| Error::Connect {
            context: "cannot duplicate the socket".into(),
            source,
        })?;
        self.start(OwnedFd::from(stream), OwnedFd::from(write), None)
    }

    /// Opens a port: a character device (a serial line or a pty, which is
    /// put in raw mode), or a FIFO pair in QEMU's `-chardev pipe,path=PATH`
    /// convention, `PATH.in` (host → guest) and `PATH.out` (guest → host).
    /// A single FIFO cannot carry both directions and is refused.
    pub fn open_port(&self, path: impl AsRef<Path>) -> Result<Client> {
        let (read, write) = open_port(path.as_ref())?;
        self.start(read, write, None)
    }

    /// Talks over any pair of descriptors: frames are read from `read` and
    /// written to `write` (they may be the same file, duplicated).
    pub fn from_fds(&self, read: OwnedFd, write: OwnedFd) -> Result<Client> {
        self.start(read, write, None)
    }

    fn start(
        &self,
        read: OwnedFd,
        write: OwnedFd,
        child: Option<std::process::Child>,
    ) -> Result<Client> {
        let conn = Conn::start(read, write, child).map_err(|source| Error::Connect {
            context: "cannot start the client threads".into(),
            source,
        })?;
        let client = Client {
            conn: Arc::new(conn),
        };
        let ready = client.conn.shared.wait_ready(self.ready_timeout)?;
        if self.clock_sync && ready.has(crate::messages::Feature::Clock) {
            let gen = client.conn.shared.ready_gen();
            // As long as READY was waited for, at most FIRST_SYNC_WAIT.
            let wait = self
                .ready_timeout
                .map_or(clock::FIRST_SYNC_WAIT, |t| t.min(clock::FIRST_SYNC_WAIT));
            clock::watch_readies(
                Arc::downgrade(&client.conn),
                client.conn.shared.clone(),
                gen,
                wait,
            );
        }
        Ok(client)
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

fn open_port(path: &Path) -> Result<(OwnedFd, OwnedFd)> {
    let open = |p: &Path| {
        // Read-write even for a FIFO end: on Linux that never blocks
        // waiting for the other side to open it.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(p)
            .map_err(|source| Error::Connect {
                context: format!("cannot open {}", p.display()),
                source,
            })
    };
    let (pin, pout) = (with_suffix(path, ".in"), with_suffix(path, ".out"));
    if !path.exists() && pin.exists() && pout.exists() {
        let write = open(&pin)?;
        let read = open(&pout)?;
        return Ok((OwnedFd::from(read), OwnedFd::from(write)));
    }
    let meta = std::fs::metadata(path).map_err(|source| Error::Connect {
        context: format!("cannot open {}", path.display()),
        source,
    })?;
    if meta.file_type().is_fifo() {
        return Err(Error::Connect {
            context: format!("{} is a single FIFO", path.display()),
            source: std::io::Error::other(
                "one FIFO cannot carry both directions; use PATH.in and PATH.out",
            ),
        });
    }
    let file = open(path)?;
    if nix::unistd::isatty(&file).unwrap_or(false) {
        let raw = nix::sys::termios::tcgetattr(&file).and_then(|mut t| {
            nix::sys::termios::cfmakeraw(&mut t);
            nix::sys::termios::tcsetattr(&file, nix::sys::termios::SetArg::TCSANOW, &t)
        });
        raw.map_err(|e| Error::Connect {
            context: format!("cannot put {} in raw mode", path.display()),
            source: e.into(),
        })?;
    }
    let write = file.try_clone().map_err(|source| Error::Connect {
        context: format!("cannot duplicate {}", path.display()),
        source,
    })?;
    Ok((OwnedFd::from(file), OwnedFd::from(write)))
}

impl Client {
    /// Options: READY timeout.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// See [`Builder::spawn`].
    pub fn spawn(cmd: std::process::Command) -> Result<Client> {
        Builder::default().spawn(cmd)
    }

    /// See [`Builder::spawn_agent`].
    pub fn spawn_agent(path: impl AsRef<Path>) -> Result<Client> {
        Builder::default().spawn_agent(path)
    }

    /// See [`Builder::connect`]: `unix:PATH`, `vsock:CID:PORT` or
    /// `hvsock:UDS_PATH:PORT`.
    pub fn connect(address: &str) -> Result<Client> {
        Builder::default().connect(address)
    }

    /// See [`Builder::connect_unix`].
    pub fn connect_unix(path: impl AsRef<Path>) -> Result<Client> {
        Builder::default().connect_unix(path)
    }

    /// See [`Builder::from_stream`].
    pub fn from_stream(stream: UnixStream) -> Result<Client> {
        Builder::default().from_stream(stream)
    }

    /// See [`Builder::open_port`].
    pub fn open_port(path: impl AsRef<Path>) -> Result<Client> {
        Builder::default().open_port(path)
    }

    /// See [`Builder::from_fds`].
    pub fn from_fds(read: OwnedFd, write: OwnedFd) -> Result<Client> {
        Builder::default().from_fds(read, write)
    }

    /// The agent's READY (the latest one, if it sent READY again).
    pub fn ready(&self) -> Ready {
        // A Client only exists once READY has arrived.
        self.conn.shared.ready().unwrap_or_else(|| Ready {
            protocol: crate::messages::PROTOCOL_VERSION,
            agent: String::new(),
            pid: 0,
            pid1: false,
            max_payload: MAX_PAYLOAD as u32,
            stdin_window: 0,
            max_sessions: 0,
            uptime_ms: None,
            ..Ready::default()
        })
    }

    /// Starts a process (EXEC) and waits for STARTED.
    ///
    /// Fails with [`Error::ExecFailed`] when the agent answers EXEC_FAILED
    /// (see [`Error::exec_failed_kind`]).
    ///
    /// ```no_run
    /// use agentd::client::{Client, Command, Error, ExecFailedKind};
    ///
    /// # fn main() -> Result<(), Error> {
    /// let client = Client::spawn_agent("target/debug/agentd")?;
    /// match client.exec(Command::new("no-such-program")) {
    ///     Err(e) if e.exec_failed_kind() == Some(ExecFailedKind::NotFound) => {}
    ///     other => panic!("expected not_found, got {other:?}"),
    /// }
    /// let mut top = client.exec(Command::new("top").tty(40, 120))?;
    /// top.resize(50, 160)?;
    /// top.write_stdin(b"q")?;
    /// assert!(top.wait()?.success());
    /// # Ok(())
    /// # }
    /// ```
    pub fn exec(&self, request: impl Into<Exec>) -> Result<Session> {
        let request: Exec = request.into();
        if request.detach {
            return Err(Error::InvalidArgument(
                "a detached EXEC delivers no events: start it with Client::exec_detached".into(),
            ));
        }
        let ready = self.ready();
        let chunk = STDIN_CHUNK
            .min(ready.max_payload as usize)
            .clamp(1, MAX_PAYLOAD);
        let shared = &self.conn.shared;
        // A duplicate_id can only come from sessions a previous host left
        // on a device port: pick another id and try again.
        for _ in 0..16 {
            let (id, sess, rx) = shared.register(|id| {
                Arc::new(SessionShared::new(
                    id,
                    SessState {
                        stdin_credit: ready.stdin_window,
                        stdin_window: ready.stdin_window,
                        stdin_chunk: chunk,
                        stdin_closed: !request.stdin,
                        ended: false,
                        closed: false,
                        detached: false,
                        output_window: request.output_window,
                        handles: 1,
                        lost: None,
                    },
                ))
            })?;
            // Serialised straight into the outgoing buffer: no copy of the
            // request, no buffer of its own.
            let sent = shared
                .send_with(|buf| crate::messages::append_map(buf, Kind::Exec as u8, id, &request));
            if let Err(e) = sent {
                shared.unregister(id);
                return Err(e);
            }
            match rx.recv() {
                Ok(Routed::Started(pid, number)) => {
                    let handle = SessionHandle::new(self.conn.clone(), sess);
                    return Ok(
                        Session::new(handle, rx, pid, request.tty, request.output_window)
                            .with_number(number),
                    );
                }
                Ok(Routed::ExecFailed(f)) => {
                    if f.failed_kind() == Some(ExecFailedKind::DuplicateId) {
                        tracing::debug!(id, "session id in use on the agent; retrying");
                        continue;
                    }
                    return Err(Error::ExecFailed(f));
                }
                Ok(Routed::Error(e)) => {
                    shared.unregister(id);
                    return Err(Error::Protocol(e));
                }
                Ok(other) => {
                    shared.unregister(id);
                    return Err(Error::AgentViolation(format!(
                        "{other:?} for session {id} before STARTED"
                    )));
                }
                Err(_) => return Err(shared.closed_error().unwrap_or_else(Error::closed)),
            }
        }
        Err(Error::AgentViolation(
            "EXEC_FAILED duplicate_id for every id tried".into(),
        ))
    }

    /// Runs a process to completion with no stdin and returns its status and
    /// output, like [`std::process::Command::output`].
    ///
    /// ```no_run
    /// use agentd::client::{Client, Command};
    ///
    /// # fn main() -> Result<(), agentd::client::Error> {
    /// let client = Client::spawn_agent("target/debug/agentd")?;
    /// let out = client.output(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]))?;
    /// assert_eq!(out.stdout, b"out\n");
    /// assert_eq!(out.stderr, b"err\n");
    /// assert_eq!(out.status.code, Some(3));
    /// # Ok(())
    /// # }
    /// ```
    pub fn output(&self, request: impl Into<Exec>) -> Result<Output> {
        let mut request: Exec = request.into();
        request.stdin = false;
        self.exec(request)?.wait_with_output()
    }

    /// File operations on the guest, shaped like `std::fs` (the `fs`
    /// extension): see [`Fs`].
    pub fn fs(&self) -> Fs {
        Fs::new(self.conn.clone())
    }

    /// Connections to guest sockets (the `net` extension): see [`Net`].
    /// (A guest Unix socket is `client.net().connect_unix(path)`:
    /// [`Client::connect_unix`] connects to an agent.)
    pub fn net(&self) -> Net {
        Net::new(self.conn.clone())
    }

    /// A TCP connection to the guest address `addr` (`HOST:PORT`,
    /// `[ADDR]:PORT`), as [`Net::connect_tcp`].
    pub fn connect_tcp(&self, addr: &str) -> Result<NetStream> {
        self.net().connect_tcp(addr)
    }

    /// Measures a round trip (PING → PONG).
    pub fn ping(&self) -> Result<Duration> {
        self.conn.shared.ping()
    }

    /// Asks the agent to end every session (SIGTERM, then SIGKILL after
    /// `grace`) and stop, and waits for SHUTDOWN_DONE. Every session
    /// receives its EXITED first. A spawned agent is then waited for.
    pub fn shutdown(&self, grace: Duration) -> Result<()> {
        let ms = grace.as_millis().min(u128::from(u32::MAX)) as u32;
        self.conn.shared.shutdown(ms)?;
        if self.conn.has_child() {
            self.conn.shared.wait_closed(Duration::from_secs(5));
            self.conn.wait_child(Duration::from_secs(5));
        }
        Ok(())
    }

    /// Closes the connection now, whatever other clones, sessions and
    /// handles still exist (they see [`Error::TransportClosed`]): the
    /// transport's write side is closed, which makes an agent in stdio or
    /// socket mode kill every session and exit; a spawned agent is waited
    /// for (and killed if it does not exit within a few seconds). Dropping
    /// the last handle does the same.
    pub fn close(&self) {
        self.conn.close();
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.conn.shared.is_closed()
    }

    /// Connection-level ERRORs the agent sent (id 0, not answering a call
    /// that returned it), and frames from the agent that could not be
    /// decoded, oldest first. Each is also logged with `tracing`. The list
    /// keeps the latest 64 and is emptied by this call.
    pub fn take_errors(&self) -> Vec<ErrorMsg> {
        self.conn.shared.take_errors()
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("ready", &self.conn.shared.ready())
            .field("closed", &self.is_closed())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_pair_naming() {
        assert_eq!(
            with_suffix(Path::new("/tmp/vm.port"), ".in"),
            PathBuf::from("/tmp/vm.port.in")
        );
    }
}
