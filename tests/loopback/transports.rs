//! `agentd --port PATH` on each kind of path it accepts: a Unix socket, a
//! FIFO pair (`PATH.in`, `PATH.out`), a terminal (put in raw mode), and
//! the one it refuses (a single FIFO). The harness drives `--stdio`; these
//! tests speak the protocol over the path themselves, with a small host
//! ([`Conn`]) on the crate's codec.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentd::codec::{Decoder, OwnedFrame};
use agentd::messages::{Exec, Kind, Message, Shutdown};

use crate::harness::{cloexec_pty, timeout, wait_until, TempDir};

/// The agent process, killed (with its sessions' groups gone with it or
/// reaped by it) if a test fails before it exits.
struct AgentProc(Child);

impl AgentProc {
    /// Fails the test if the agent has exited (it would never open or
    /// connect to what the test waits on).
    fn assert_running(&mut self, what: &str) {
        if let Some(status) = self.0.try_wait().expect("try_wait") {
            let mut err = String::new();
            if let Some(mut e) = self.0.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("agentd exited ({status}) before {what}: {err}");
        }
    }

    fn start(port: &Path) -> AgentProc {
        AgentProc(
            Command::new(env!("CARGO_BIN_EXE_agentd"))
                .arg("--port")
                .arg(port)
                .env_remove("AGENTD_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start agentd"),
        )
    }

    /// Waits for the agent to exit; its status and stderr.
    fn wait(&mut self) -> (std::process::ExitStatus, String) {
        let end = Instant::now() + timeout();
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                let mut err = String::new();
                if let Some(mut e) = self.0.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return (status, err);
            }
            assert!(Instant::now() < end, "agentd did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A host on any pair of fds: frames out, frames in with a timeout.
struct Conn {
    read: OwnedFd,
    write: OwnedFd,
    dec: Decoder,
}

impl Conn {
    fn new(read: OwnedFd, write: OwnedFd) -> Conn {
        Conn {
            read,
            write,
            dec: Decoder::new(),
        }
    }

    fn send(&mut self, msg: &Message<'_>, id: u32) {
        let mut buf = Vec::new();
        msg.encode(id, &mut buf).expect("the test's frames fit");
        File::from(self.write.try_clone().expect("dup"))
            .write_all(&buf)
            .expect("write to agent");
    }

    fn exec(&mut self, id: u32, cmd: &str, args: &[&str]) {
        let mut exec = Exec::new(cmd);
        exec.args = args.iter().map(|a| a.to_string()).collect();
        exec.stdin = false;
        self.send(&Message::Exec(Box::new(exec)), id);
    }

    /// The next frame, or `None` at end of file.
    fn next(&mut self) -> Option<OwnedFrame> {
        let end = Instant::now() + timeout();
        loop {
            if let Some(item) = self.dec.next_frame() {
                return Some(item.expect("the agent sent a bad frame").to_owned());
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no frame from the agent in time");
            let mut pfd = libc::pollfd {
                fd: self.read.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
            if pfd.revents == 0 {
                continue;
            }
            match self.dec.read_fd(self.read.as_raw_fd()) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.raw_os_error() == Some(libc::EIO) => return None,
                Err(e) => panic!("reading from the agent: {e}"),
            }
        }
    }

    fn expect(&mut self, kind: Kind, id: u32) -> OwnedFrame {
        loop {
            let f = self.next().expect("end of file from the agent");
            if f.kind == kind as u8 && f.id == id {
                return f;
            }
            assert_ne!(f.kind, Kind::Error as u8, "ERROR from the agent");
        }
    }

    /// Runs `cmd args` in session `id`; its stdout and exit status.
    fn run(&mut self, id: u32, cmd: &str, args: &[&str]) -> (Vec<u8>, i32) {
        self.exec(id, cmd, args);
        let mut out = Vec::new();
        loop {
            let f = self.next().expect("end of file from the agent");
            if f.id != id {
                continue;
            }
            match Kind::from_u8(f.kind) {
                Some(Kind::Stdout) => out.extend_from_slice(&f.payload),
                Some(Kind::Exited) => {
                    let Ok(Message::Exited(e)) = Message::decode(f.as_frame()) else {
                        panic!("bad EXITED")
                    };
                    return (out, e.status);
                }
                Some(Kind::ExecFailed) | Some(Kind::Error) => panic!("{cmd} failed to run"),
                _ => {}
            }
        }
    }

    /// Starts `sleep 1000` as session `id`; its pid.
    fn start_sleeper(&mut self, id: u32) -> i32 {
        self.exec(id, "sleep", &["1000"]);
        let f = self.expect(Kind::Started, id);
        let Ok(Message::Started(s)) = Message::decode(f.as_frame()) else {
            panic!("bad STARTED")
        };
        s.pid as i32
    }
}

/// Waits until `pid` is gone, reaped included: signal 0 reaches a zombie
/// too, so this also proves the agent reaped its session.
fn wait_gone(pid: i32) {
    // SAFETY: signal 0 only checks that the process exists.
    let exists = || unsafe { libc::kill(pid, 0) == 0 };
    assert!(
        wait_until(timeout(), || !exists()),
        "session process {pid} outlived the agent"
    );
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

#[test]
fn a_single_fifo_is_refused_with_a_message() {
    let dir = TempDir::new("fifo");
    let fifo = dir.0.join("port");
    mkfifo(&fifo);
    let mut agent = AgentProc::start(&fifo);
    let (status, err) = agent.wait();
    assert!(!status.success(), "agentd accepted a single FIFO");
    assert!(
        err.contains("single FIFO") && err.contains("port.in"),
        "stderr does not say what to do: {err}"
    );
}

#[test]
fn a_fifo_pair_carries_the_protocol_and_its_end_of_file_ends_the_agent() {
    let dir = TempDir::new("pair");
    let port = dir.0.join("port");
    let (to_agent, from_agent) = (dir.0.join("port.in"), dir.0.join("port.out"));
    mkfifo(&to_agent);
    mkfifo(&from_agent);
    let mut agent = AgentProc::start(&port);
    // Read-write, as agentctl opens them: an open that never waits for the
    // agent (a test that cannot hang), and closing `.in` is still end of
    // file for the agent, whose only other writer it is.
    let open = |p: &Path| {
        File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(p)
            .expect("open a FIFO of the pair")
    };
    let write = open(&to_agent);
    let read = open(&from_agent);
    agent.assert_running("opening the FIFO pair");
    let mut conn = Conn::new(read.into(), write.into());
    conn.expect(Kind::Ready, 0);
    let (out, status) = conn.run(1, "echo", &["over a FIFO pair"]);
    assert_eq!((out.as_slice(), status), (&b"over a FIFO pair\n"[..], 0));
    let sleeper = conn.start_sleeper(2);
    // The host goes away: end of file on PATH.in.
    drop(conn);
    let (status, err) = agent.wait();
    assert!(status.success(), "agentd: {status}: {err}");
    wait_gone(sleeper);
}

#[test]
fn end_of_file_on_a_socket_kills_the_sessions_and_the_agent_exits_0() {
    let dir = TempDir::new("sock");
    let path = dir.0.join("agent.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let mut agent = AgentProc::start(&path);
    let mut accepted = None;
    assert!(
        wait_until(timeout(), || {
            agent.assert_running("connecting");
            accepted = listener.accept().ok();
            accepted.is_some()
        }),
        "agentd did not connect"
    );
    let (stream, _) = accepted.expect("accepted");
    stream.set_nonblocking(false).expect("blocking");
    let write = stream.try_clone().expect("dup");
    let mut conn = Conn::new(stream.into(), write.into());
    conn.expect(Kind::Ready, 0);
    let (out, status) = conn.run(1, "sh", &["-c", "echo on a socket; exit 3"]);
    assert_eq!((out.as_slice(), status), (&b"on a socket\n"[..], 3));
    let sleepers = [conn.start_sleeper(2), conn.start_sleeper(3)];
    drop(conn);
    let (status, err) = agent.wait();
    assert!(status.success(), "agentd: {status}: {err}");
    for pid in sleepers {
        wait_gone(pid);
    }
}

/// A terminal as the port (what `/dev/hvc1` is): the agent puts it in raw
/// mode, so every byte value crosses unchanged both ways — no echo, no
/// CR/LF rewriting, no ^C turned into a signal, no ^S stopping output.
#[test]
fn a_terminal_port_is_put_in_raw_mode_and_is_8_bit_clean() {
    // Close-on-exec from the start: the agent must open the slave itself,
    // and agents other tests start meanwhile must not inherit either end.
    let (master, slave, slave_path) = cloexec_pty();
    let mut agent = AgentProc::start(&slave_path);
    // SAFETY: fcntl on the master fd we own.
    unsafe {
        let flags = libc::fcntl(master.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(master.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
    let write = master.as_fd().try_clone_to_owned().expect("dup");
    let mut conn = Conn::new(master, write);
    // The slave stays open here until the agent has it open too: with no
    // slave open, a read of the master is EIO (end of file).
    conn.expect(Kind::Ready, 0);
    drop(slave);
    // Every byte value, twice, in a PING: the PONG must be identical.
    let all: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
    conn.send(&Message::Ping(&all), 0);
    let pong = conn.expect(Kind::Pong, 0);
    assert_eq!(pong.payload, all, "the terminal changed the bytes");
    // And output with line ends and control bytes.
    let (out, status) = conn.run(1, "printf", &[r"a\nb\r\n\003\004\021\023\377"]);
    assert_eq!(
        (out.as_slice(), status),
        (&b"a\nb\r\n\x03\x04\x11\x13\xff"[..], 0)
    );
    conn.send(&Message::Shutdown(Shutdown { grace_ms: 100 }), 0);
    conn.expect(Kind::ShutdownDone, 0);
    let (status, err) = agent.wait();
    assert!(status.success(), "agentd: {status}: {err}");
}

/// An agent waiting for the host of a FIFO pair has no session yet and
/// nothing to lose: SIGTERM ends it (its signals are not yet blocked for
/// the loop's signalfd).
#[test]
fn sigterm_ends_an_agent_still_waiting_for_its_fifo_host() {
    let dir = TempDir::new("pair-wait");
    let port = dir.0.join("port");
    mkfifo(&dir.0.join("port.in"));
    mkfifo(&dir.0.join("port.out"));
    let mut agent = AgentProc::start(&port);
    // Give it time to reach the open that waits (nothing shows it).
    std::thread::sleep(Duration::from_millis(200));
    agent.assert_running("the test signalled it");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    let (status, err) = agent.wait();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}: {err}");
}
