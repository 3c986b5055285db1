//! `agentd --port PATH` on each kind of path it accepts: a Unix socket, a
//! FIFO pair (`PATH.in`, `PATH.out`), a terminal (put in raw mode), and
//! the one it refuses (a single FIFO). The harness drives `--stdio`; these
//! tests speak the protocol over the path themselves, with the support's
//! [`Conn`], a host on any pair of fds.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use agentd::messages::{Kind, Message, Shutdown};

use crate::support::host::{cmd, set_nonblocking, AgentProcess, Conn, Opts};
use crate::support::util::{cloexec_pty, mkfifo, TempDir};
use crate::support::{timeout, wait_until};

/// `agentd --port PATH`, killed (with its sessions' groups gone with it or
/// reaped by it) if a test fails before it exits. Never in a pid
/// namespace: the tests follow the pids its sessions report.
fn start_agent(port: &Path) -> AgentProcess {
    AgentProcess::spawn_port(&Opts::default().pidns(false), port)
}

/// Waits for the agent to exit; its status and stderr.
fn wait(agent: &mut AgentProcess) -> (ExitStatus, String) {
    let status = agent.wait_exit(timeout());
    (status, agent.log())
}

fn exec(conn: &mut Conn, id: u32, program: &str, args: &[&str]) {
    let mut exec = cmd(program, args);
    exec.stdin = false;
    conn.send(&Message::Exec(Box::new(exec)), id);
}

/// Runs `cmd args` in session `id`; its stdout and exit status.
fn run(conn: &mut Conn, id: u32, cmd: &str, args: &[&str]) -> (Vec<u8>, i32) {
    exec(conn, id, cmd, args);
    let mut out = Vec::new();
    loop {
        let f = conn
            .next_frame(timeout())
            .expect("end of file from the agent");
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
fn start_sleeper(conn: &mut Conn, id: u32) -> i32 {
    exec(conn, id, "sleep", &["1000"]);
    let f = conn.expect(Kind::Started, id);
    let Ok(Message::Started(s)) = Message::decode(f.as_frame()) else {
        panic!("bad STARTED")
    };
    s.pid as i32
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

#[test]
fn a_single_fifo_is_refused_with_a_message() {
    let dir = TempDir::new("fifo");
    let fifo = dir.0.join("port");
    mkfifo(&fifo);
    let mut agent = start_agent(&fifo);
    let (status, err) = wait(&mut agent);
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
    let mut agent = start_agent(&port);
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
    let (out, status) = run(&mut conn, 1, "echo", &["over a FIFO pair"]);
    assert_eq!((out.as_slice(), status), (&b"over a FIFO pair\n"[..], 0));
    let sleeper = start_sleeper(&mut conn, 2);
    // The host goes away: end of file on PATH.in.
    drop(conn);
    let (status, err) = wait(&mut agent);
    assert!(status.success(), "agentd: {status}: {err}");
    wait_gone(sleeper);
}

#[test]
fn end_of_file_on_a_socket_kills_the_sessions_and_the_agent_exits_0() {
    let dir = TempDir::new("sock");
    let path = dir.0.join("agent.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let mut agent = start_agent(&path);
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
    let (out, status) = run(&mut conn, 1, "sh", &["-c", "echo on a socket; exit 3"]);
    assert_eq!((out.as_slice(), status), (&b"on a socket\n"[..], 3));
    let sleepers = [start_sleeper(&mut conn, 2), start_sleeper(&mut conn, 3)];
    drop(conn);
    let (status, err) = wait(&mut agent);
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
    let mut agent = start_agent(&slave_path);
    set_nonblocking(master.as_raw_fd());
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
    let (out, status) = run(&mut conn, 1, "printf", &[r"a\nb\r\n\003\004\021\023\377"]);
    assert_eq!(
        (out.as_slice(), status),
        (&b"a\nb\r\n\x03\x04\x11\x13\xff"[..], 0)
    );
    conn.send(&Message::Shutdown(Shutdown { grace_ms: 100 }), 0);
    conn.expect(Kind::ShutdownDone, 0);
    let (status, err) = wait(&mut agent);
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
    let mut agent = start_agent(&port);
    // Give it time to reach the open that waits (nothing shows it).
    std::thread::sleep(Duration::from_millis(200));
    agent.assert_running("the test signalled it");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.host_pid, libc::SIGTERM) };
    let (status, err) = wait(&mut agent);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}: {err}");
}
