//! Tests of the client library, `agentd::client`.
//!
//! The first part drives the client against a scripted fake agent over a
//! socketpair, which makes flow control observable and deterministic: the
//! fake checks every frame the client sends against the contract. The
//! second part runs the real `agentd --stdio`.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use agentd::client::{Client, Command, Error, Event, ExecFailedKind};
use agentd::codec::{Decoder, OwnedFrame};
use agentd::messages::{
    Ack, ErrorKind, ErrorMsg, Exec, ExecFailed, Exited, Kind, Message, Ready, Started,
};
use support::proc::alive;
use support::AGENTD;

// ---------------------------------------------------------------------------
// A fake agent.

struct Fake {
    sock: UnixStream,
    dec: Decoder,
}

fn ready(stdin_window: u32) -> Ready {
    Ready {
        protocol: 1,
        agent: "fake/0".into(),
        pid: 4242,
        pid1: false,
        max_payload: 1 << 20,
        stdin_window,
        max_sessions: 1024,
        uptime_ms: None,
        features: Vec::new(),
        realtime_ns: None,
        restores: None,
        clock_set: None,
        replay_bytes: None,
        cgroups: None,
        mounts: Vec::new(),
    }
}

impl Fake {
    /// A connected client and fake, the fake having sent READY.
    fn start(stdin_window: u32) -> (Client, Fake) {
        let (a, b) = UnixStream::pair().unwrap();
        let mut fake = Fake::new(b);
        fake.send(0, &Message::Ready(ready(stdin_window)));
        let client = Client::from_stream(a).expect("client connects");
        (client, fake)
    }

    fn new(sock: UnixStream) -> Fake {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Fake {
            sock,
            dec: Decoder::new(),
        }
    }

    fn send(&mut self, id: u32, msg: &Message<'_>) {
        self.sock.write_all(&msg.to_bytes(id)).unwrap();
    }

    /// The next frame from the client, or None if none arrives within
    /// `timeout` (or the client closed the connection).
    fn recv_within(&mut self, timeout: Duration) -> Option<OwnedFrame> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(item) = self.dec.next_frame() {
                let frame = item.expect("client sends well-formed frames");
                let owned = frame.to_owned();
                // Every frame the client sends must decode as host → agent.
                Message::decode_from_host(owned.as_frame()).expect("frame decodes");
                return Some(owned);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            match self.dec.read_from(&mut self.sock) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return None
                }
                Err(e) => panic!("fake agent read failed: {e}"),
            }
        }
    }

    fn recv(&mut self) -> OwnedFrame {
        self.recv_within(Duration::from_secs(10))
            .expect("a frame from the client")
    }

    /// Receives an EXEC and answers STARTED; returns the session id.
    fn accept_exec(&mut self) -> (u32, Exec) {
        let f = self.recv();
        assert_eq!(f.kind, Kind::Exec as u8, "expected EXEC, got {f:?}");
        assert_ne!(f.id, 0, "EXEC with id 0");
        let Ok(Message::Exec(exec)) = Message::decode_from_host(f.as_frame()) else {
            panic!("EXEC does not decode")
        };
        self.send(
            f.id,
            &Message::Started(Started {
                pid: 1000 + f.id,
                session: None,
            }),
        );
        (f.id, *exec)
    }

    fn exited(&mut self, id: u32, code: i32) {
        self.send(id, &Message::Exited(Exited::from_code(code)));
    }
}

fn ack_bytes(f: &OwnedFrame) -> u32 {
    match Message::decode_from_host(f.as_frame()) {
        Ok(Message::OutputAck(Ack { bytes })) | Ok(Message::StdinAck(Ack { bytes })) => bytes,
        other => panic!("not an ack: {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Handshake.

#[test]
fn ready_is_read_and_exposed() {
    let (client, _fake) = Fake::start(4096);
    let r = client.ready();
    assert_eq!(r.protocol, 1);
    assert_eq!(r.agent, "fake/0");
    assert_eq!(r.stdin_window, 4096);
}

#[test]
fn other_protocol_version_is_refused() {
    let (a, b) = UnixStream::pair().unwrap();
    let mut fake = Fake::new(b);
    let mut r = ready(10);
    r.protocol = 2;
    fake.send(0, &Message::Ready(r));
    match Client::from_stream(a) {
        Err(Error::UnsupportedProtocol(2)) => {}
        other => panic!("expected UnsupportedProtocol(2), got {other:?}"),
    }
}

#[test]
fn frames_before_ready_are_skipped() {
    let (a, b) = UnixStream::pair().unwrap();
    let mut fake = Fake::new(b);
    // Left over from an earlier host on a device port.
    fake.send(7, &Message::Stdout(b"stale"));
    fake.send(7, &Message::Exited(Exited::from_code(0)));
    fake.send(0, &Message::Ready(ready(10)));
    let client = Client::from_stream(a).unwrap();
    assert_eq!(client.ready().stdin_window, 10);
}

#[test]
fn end_of_file_before_ready() {
    let (a, b) = UnixStream::pair().unwrap();
    drop(b);
    match Client::from_stream(a) {
        Err(Error::TransportClosed(_)) => {}
        other => panic!("expected TransportClosed, got {other:?}"),
    }
}

#[test]
fn ready_timeout() {
    let (a, _b) = UnixStream::pair().unwrap();
    let start = Instant::now();
    let r = Client::builder()
        .ready_timeout(Some(Duration::from_millis(200)))
        .from_stream(a);
    assert!(matches!(r, Err(Error::ReadyTimeout(_))), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

// ---------------------------------------------------------------------------
// EXEC.

#[test]
fn exec_sends_the_request_and_returns_a_session() {
    let (client, mut fake) = Fake::start(100);
    let t = thread::spawn(move || {
        let (id, exec) = fake.accept_exec();
        assert_eq!(exec.cmd, "ls");
        assert_eq!(exec.args, ["-l", "/"]);
        assert_eq!(exec.env, ["A=1"]);
        assert_eq!(exec.cwd.as_deref(), Some("/tmp"));
        assert_eq!(exec.user.as_deref(), Some("nobody"));
        assert!(exec.tty);
        assert_eq!((exec.rows, exec.cols), (30, 100));
        assert_eq!(exec.rlimits.len(), 1);
        assert_eq!(exec.rlimits[0].resource, "nofile");
        assert_eq!((exec.rlimits[0].soft, exec.rlimits[0].hard), (64, 128));
        fake.send(id, &Message::Stdout(b"hello"));
        fake.exited(id, 0);
        (id, fake)
    });
    let mut cmd = Command::new("ls");
    cmd.args(["-l", "/"])
        .env("A", "1")
        .cwd("/tmp")
        .user("nobody")
        .tty(30, 100)
        .rlimit("nofile", 64, 128);
    let mut s = client.exec(&cmd).unwrap();
    let (id, _fake) = t.join().unwrap();
    assert_eq!(s.id(), id);
    assert_eq!(s.pid(), 1000 + id);
    assert!(s.is_tty());
    assert_eq!(
        s.next_event().unwrap(),
        Some(Event::Stdout(b"hello".to_vec()))
    );
    let Some(Event::Exited(x)) = s.next_event().unwrap() else {
        panic!("expected EXITED")
    };
    assert!(x.success());
    assert_eq!(s.next_event().unwrap(), None);
}

#[test]
fn exec_failed_carries_kind_errno_and_stage() {
    let (client, mut fake) = Fake::start(100);
    let t = thread::spawn(move || {
        let f = fake.recv();
        assert_eq!(f.kind, Kind::Exec as u8);
        fake.send(
            f.id,
            &Message::ExecFailed(ExecFailed {
                kind: "not_found".into(),
                message: "nope: No such file or directory".into(),
                errno: Some(2),
                stage: Some("execve".into()),
            }),
        );
        fake
    });
    let err = client.exec(Command::new("nope")).unwrap_err();
    let _fake = t.join().unwrap();
    assert_eq!(err.exec_failed_kind(), Some(ExecFailedKind::NotFound));
    let Error::ExecFailed(f) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(f.errno, Some(2));
    assert_eq!(f.stage.as_deref(), Some("execve"));
    let text = err.to_string();
    assert!(
        text.contains("not_found") && text.contains("execve"),
        "{text}"
    );
}

#[test]
fn duplicate_id_is_retried_with_another_id() {
    let (client, mut fake) = Fake::start(100);
    let t = thread::spawn(move || {
        let first = fake.recv();
        fake.send(
            first.id,
            &Message::ExecFailed(ExecFailed {
                kind: "duplicate_id".into(),
                message: "live".into(),
                errno: None,
                stage: None,
            }),
        );
        let (second, _) = fake.accept_exec();
        assert_ne!(first.id, second);
        fake.exited(second, 0);
        fake
    });
    let mut s = client.exec(Command::new("true")).unwrap();
    assert!(s.wait().unwrap().success());
    drop(t.join().unwrap());
}

#[test]
fn error_answering_exec_fails_the_exec() {
    let (client, mut fake) = Fake::start(100);
    let t = thread::spawn(move || {
        let f = fake.recv();
        fake.send(
            f.id,
            &Message::Error(ErrorMsg::new(
                ErrorKind::BadPayload,
                "cmd missing",
                Some(Kind::Exec as u8),
            )),
        );
        fake
    });
    let err = client.exec(Command::new("x")).unwrap_err();
    assert_eq!(err.error_kind(), Some(ErrorKind::BadPayload), "{err:?}");
    drop(t.join().unwrap());
}

#[test]
fn session_ids_are_distinct_and_never_zero() {
    let (client, mut fake) = Fake::start(100);
    let n = 50;
    let agent = thread::spawn(move || {
        let mut ids = Vec::new();
        for _ in 0..n {
            let (id, exec) = fake.accept_exec();
            // Each session echoes its own command name, so crossed routes
            // would show.
            fake.send(id, &Message::Stdout(exec.cmd.as_bytes()));
            fake.exited(id, 0);
            ids.push(id);
        }
        (ids, fake)
    });
    let workers: Vec<_> = (0..n)
        .map(|i| {
            let client = client.clone();
            thread::spawn(move || {
                let name = format!("prog{i}");
                let out = client.output(Command::new(&name)).unwrap();
                assert_eq!(out.stdout, name.as_bytes());
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let (mut ids, _fake) = agent.join().unwrap();
    assert!(!ids.contains(&0));
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n);
}

// ---------------------------------------------------------------------------
// Flow control.

#[test]
fn stdin_never_exceeds_the_window_and_waits_for_acks() {
    const WINDOW: u32 = 1000;
    let (client, mut fake) = Fake::start(WINDOW);
    let payload: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let expected = payload.clone();
    let agent = thread::spawn(move || {
        let (id, _) = fake.accept_exec();
        let mut got = Vec::new();
        let mut unacked: u64 = 0;
        let mut stalls = 0;
        loop {
            // Acknowledge nothing until the window is full: the client must
            // then stop and wait.
            if unacked == u64::from(WINDOW) {
                // The first few times, check that the client really waits.
                if stalls < 5 {
                    if let Some(f) = fake.recv_within(Duration::from_millis(100)) {
                        assert_eq!(f.kind, Kind::StdinClose as u8, "STDIN beyond a full window");
                        break;
                    }
                }
                stalls += 1;
                // Return the window in uneven pieces.
                for part in [1u32, 399, 600] {
                    fake.send(id, &Message::StdinAck(Ack { bytes: part }));
                }
                unacked = 0;
            }
            let f = fake.recv();
            assert_eq!(f.id, id);
            match Kind::from_u8(f.kind) {
                Some(Kind::Stdin) => {
                    assert!(!f.payload.is_empty());
                    unacked += f.payload.len() as u64;
                    assert!(unacked <= u64::from(WINDOW), "window breached");
                    got.extend_from_slice(&f.payload);
                }
                Some(Kind::StdinClose) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        fake.exited(id, 0);
        (got, stalls, fake)
    });
    let mut s = client.exec(Command::new("cat")).unwrap();
    s.write_stdin(&payload).unwrap();
    s.close_stdin().unwrap();
    assert!(s.wait().unwrap().success());
    let (got, stalls, _fake) = agent.join().unwrap();
    assert_eq!(got, expected);
    assert!(stalls >= 40, "only {stalls} stalls");
}

#[test]
fn output_is_acknowledged_as_consumed() {
    const WINDOW: u32 = 4096;
    let (client, mut fake) = Fake::start(100);
    let (consumed_tx, consumed_rx) = mpsc::channel::<()>();
    let agent = thread::spawn(move || {
        let (id, exec) = fake.accept_exec();
        assert_eq!(exec.output_window, WINDOW);
        // Fill the window exactly.
        for _ in 0..4 {
            fake.send(id, &Message::Stdout(&[b'x'; 1024]));
        }
        // Nothing may be acknowledged before the consumer reads.
        assert!(
            fake.recv_within(Duration::from_millis(150)).is_none(),
            "acknowledged output nobody consumed"
        );
        consumed_tx.send(()).unwrap();
        let mut acked = 0;
        while acked < WINDOW {
            let f = fake.recv();
            assert_eq!(f.kind, Kind::OutputAck as u8);
            assert_eq!(f.id, id);
            acked += ack_bytes(&f);
            assert!(acked <= WINDOW, "acknowledged more than was sent");
        }
        fake.send(id, &Message::Stderr(b"done"));
        fake.exited(id, 0);
        fake
    });
    let mut cmd = Command::new("yes");
    cmd.output_window(WINDOW);
    let mut s = client.exec(&cmd).unwrap();
    // Let the fake observe that nothing is acknowledged before we read.
    consumed_rx.recv().unwrap_or(());
    let mut out = 0;
    let mut err = Vec::new();
    for ev in s.events() {
        match ev.unwrap() {
            Event::Stdout(d) => out += d.len(),
            Event::Stderr(d) => err.extend(d),
            Event::Error(e) => panic!("{e:?}"),
            Event::Exited(x) => assert!(x.success()),
            Event::Detached(d) => panic!("{d:?}"),
        }
    }
    assert_eq!(out, WINDOW as usize);
    assert_eq!(err, b"done");
    drop(agent.join().unwrap());
}

#[test]
fn no_output_acks_without_a_window() {
    let (client, mut fake) = Fake::start(100);
    let agent = thread::spawn(move || {
        let (id, exec) = fake.accept_exec();
        assert_eq!(exec.output_window, 0);
        fake.send(id, &Message::Stdout(&[0; 5000]));
        fake.exited(id, 0);
        // The next frame must be the PING the test sends afterwards.
        let f = fake.recv();
        assert_eq!(f.kind, Kind::Ping as u8, "unexpected frame {f:?}");
        fake.send(f.id, &Message::Pong(&f.payload));
        fake
    });
    let out = client.output(Command::new("head")).unwrap();
    assert_eq!(out.stdout.len(), 5000);
    client.ping().unwrap();
    drop(agent.join().unwrap());
}

#[test]
fn dropped_session_acks_output_and_closes_stdin() {
    let (client, mut fake) = Fake::start(100);
    let s = {
        let t = thread::spawn(move || {
            let (id, _) = fake.accept_exec();
            (id, fake)
        });
        let mut cmd = Command::new("noisy");
        cmd.output_window(1000);
        let s = client.exec(&cmd).unwrap();
        let (id, fake) = t.join().unwrap();
        fake_after_drop(s, id, fake)
    };
    drop(s);
}

fn fake_after_drop(s: agentd::client::Session, id: u32, mut fake: Fake) -> Fake {
    // 300 bytes reach the session's channel before the drop...
    fake.send(id, &Message::Stdout(&[1; 300]));
    thread::sleep(Duration::from_millis(100));
    drop(s);
    // ...and 700 after: all 1000 must come back as OUTPUT_ACK.
    fake.send(id, &Message::Stdout(&[2; 700]));
    let mut acked = 0;
    let mut closed = false;
    while acked < 1000 || !closed {
        let f = fake.recv();
        assert_eq!(f.id, id);
        match Kind::from_u8(f.kind) {
            Some(Kind::OutputAck) => acked += ack_bytes(&f),
            Some(Kind::StdinClose) => closed = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acked, 1000);
    fake
}

// ---------------------------------------------------------------------------
// Control, errors, ping, shutdown, end of transport.

#[test]
fn resize_signal_and_session_errors() {
    let (client, mut fake) = Fake::start(100);
    let agent = thread::spawn(move || {
        let (id, _) = fake.accept_exec();
        let f = fake.recv();
        assert_eq!(f.kind, Kind::Resize as u8);
        let Ok(Message::Resize(r)) = Message::decode_from_host(f.as_frame()) else {
            panic!()
        };
        assert_eq!((r.rows, r.cols), (50, 132));
        fake.send(
            id,
            &Message::Error(ErrorMsg::new(
                ErrorKind::NotATty,
                "pipe session",
                Some(Kind::Resize as u8),
            )),
        );
        let f = fake.recv();
        let Ok(Message::Signal(sig)) = Message::decode_from_host(f.as_frame()) else {
            panic!("expected SIGNAL, got {f:?}")
        };
        assert_eq!((sig.signal, sig.group), (15, true));
        let f = fake.recv();
        let Ok(Message::Signal(sig)) = Message::decode_from_host(f.as_frame()) else {
            panic!("expected SIGNAL, got {f:?}")
        };
        assert_eq!((sig.signal, sig.group), (9, false));
        fake.send(id, &Message::Exited(Exited::from_signal(9, true)));
        fake
    });
    let mut s = client.exec(Command::new("sleep")).unwrap();
    s.resize(50, 132).unwrap();
    match s.next_event().unwrap() {
        Some(Event::Error(e)) => assert_eq!(e.error_kind(), Some(ErrorKind::NotATty)),
        other => panic!("expected not_a_tty, got {other:?}"),
    }
    s.signal(15).unwrap();
    s.signal_process(9).unwrap();
    let x = s.wait().unwrap();
    assert_eq!(
        (x.code, x.signal, x.core_dumped, x.status),
        (None, Some(9), true, 137)
    );
    assert!(!x.success());
    // After EXITED, nothing more may be sent for the id.
    assert!(matches!(s.signal(9), Err(Error::SessionEnded)));
    assert!(matches!(s.write_stdin(b"x"), Err(Error::SessionEnded)));
    drop(agent.join().unwrap());
}

#[test]
fn stdin_false_means_no_stdin_frames() {
    let (client, mut fake) = Fake::start(100);
    let agent = thread::spawn(move || {
        let (id, exec) = fake.accept_exec();
        assert!(!exec.stdin);
        // No STDIN_CLOSE either, even when the session is dropped.
        assert!(fake.recv_within(Duration::from_millis(200)).is_none());
        fake.exited(id, 0);
        fake
    });
    let mut cmd = Command::new("true");
    cmd.stdin(false);
    let s = client.exec(&cmd).unwrap();
    assert!(matches!(s.write_stdin(b"x"), Err(Error::StdinClosed)));
    s.close_stdin().unwrap();
    drop(s);
    drop(agent.join().unwrap());
}

#[test]
fn connection_level_errors_are_kept() {
    let (client, mut fake) = Fake::start(100);
    fake.send(
        0,
        &Message::Error(ErrorMsg::new(ErrorKind::UnknownKind, "0x7f", Some(0x7f))),
    );
    // A frame the client cannot decode is recorded too.
    agentd::codec::append_raw(&mut Vec::new(), 0, 0, b"").expect("the test's frames fit");
    fake.sock
        .write_all(&agentd::codec::header(0x7e, 0, 0))
        .unwrap();
    let f_thread = thread::spawn(move || {
        let f = fake.recv();
        fake.send(f.id, &Message::Pong(&f.payload));
        fake
    });
    client.ping().unwrap();
    let errors = client.take_errors();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0].error_kind(), Some(ErrorKind::UnknownKind));
    assert_eq!(errors[1].error_kind(), Some(ErrorKind::UnknownKind));
    assert!(client.take_errors().is_empty());
    drop(f_thread.join().unwrap());
}

#[test]
fn ping_measures_a_round_trip() {
    let (client, mut fake) = Fake::start(100);
    let agent = thread::spawn(move || {
        for _ in 0..3 {
            let f = fake.recv();
            assert_eq!(f.kind, Kind::Ping as u8);
            assert!(f.payload.len() <= 4096);
            thread::sleep(Duration::from_millis(30));
            fake.send(f.id, &Message::Pong(&f.payload));
        }
        fake
    });
    for _ in 0..3 {
        let rtt = client.ping().unwrap();
        assert!(rtt >= Duration::from_millis(30), "{rtt:?}");
        assert!(rtt < Duration::from_secs(5), "{rtt:?}");
    }
    drop(agent.join().unwrap());
}

#[test]
fn shutdown_waits_for_shutdown_done() {
    let (client, mut fake) = Fake::start(100);
    let agent = thread::spawn(move || {
        let (id, _) = fake.accept_exec();
        let f = fake.recv();
        let Ok(Message::Shutdown(s)) = Message::decode_from_host(f.as_frame()) else {
            panic!("expected SHUTDOWN, got {f:?}")
        };
        assert_eq!(s.grace_ms, 250);
        assert_eq!(f.id, 0);
        fake.send(id, &Message::Exited(Exited::from_signal(15, false)));
        fake.send(0, &Message::ShutdownDone);
        fake
    });
    let mut s = client.exec(Command::new("sleep")).unwrap();
    client.shutdown(Duration::from_millis(250)).unwrap();
    let Some(Event::Exited(x)) = s.next_event().unwrap() else {
        panic!()
    };
    assert_eq!(x.status, 143);
    drop(agent.join().unwrap());
}

#[test]
fn shutdown_refused_with_an_error() {
    let (client, mut fake) = Fake::start(100);
    let agent = thread::spawn(move || {
        let f = fake.recv();
        assert_eq!(f.kind, Kind::Shutdown as u8);
        fake.send(
            0,
            &Message::Error(ErrorMsg::new(
                ErrorKind::BadPayload,
                "grace_ms",
                Some(Kind::Shutdown as u8),
            )),
        );
        fake
    });
    let err = client.shutdown(Duration::from_secs(1)).unwrap_err();
    assert_eq!(err.error_kind(), Some(ErrorKind::BadPayload));
    drop(agent.join().unwrap());
}

#[test]
fn end_of_transport_wakes_every_waiter() {
    const WINDOW: u32 = 10;
    let (client, mut fake) = Fake::start(WINDOW);
    let (a, b) = {
        let t = thread::spawn(move || {
            let (a, _) = fake.accept_exec();
            let (b, _) = fake.accept_exec();
            (a, b, fake)
        });
        let s1 = client.exec(Command::new("one")).unwrap();
        let s2 = client.exec(Command::new("two")).unwrap();
        let (_, _, fake) = t.join().unwrap();
        ((s1, s2), fake)
    };
    let (mut s1, s2) = a;
    let mut fake = b;
    // s2 fills its stdin window, then a writer blocks on it.
    let h2 = s2.handle();
    let writer = thread::spawn(move || h2.write_stdin(&[0; 100]));
    let reader = thread::spawn(move || s1.next_event());
    let c2 = client.clone();
    let pinger = thread::spawn(move || c2.ping());
    let c3 = client.clone();
    let execer = thread::spawn(move || c3.exec(Command::new("three")));
    // Wait until the writer has used its window, the PING and the EXEC
    // arrived: every waiter is then blocked.
    let mut seen = (0, false, false);
    while seen.0 < WINDOW as usize || !seen.1 || !seen.2 {
        let f = fake.recv();
        match Kind::from_u8(f.kind) {
            Some(Kind::Stdin) => seen.0 += f.payload.len(),
            Some(Kind::Ping) => seen.1 = true,
            Some(Kind::Exec) => seen.2 = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    thread::sleep(Duration::from_millis(50));
    drop(fake);
    let closed = |r: &dyn std::fmt::Debug, is: bool| assert!(is, "expected TransportClosed: {r:?}");
    let w = writer.join().unwrap();
    closed(&w, matches!(w, Err(Error::TransportClosed(_))));
    let r = reader.join().unwrap();
    closed(&r, matches!(r, Err(Error::TransportClosed(_))));
    let p = pinger.join().unwrap();
    closed(&p, matches!(p, Err(Error::TransportClosed(_))));
    let e = execer.join().unwrap();
    closed(&e, matches!(e, Err(Error::TransportClosed(_))));
    assert!(client.is_closed());
    assert!(matches!(client.ping(), Err(Error::TransportClosed(_))));
    assert!(matches!(
        client.exec(Command::new("x")),
        Err(Error::TransportClosed(_))
    ));
    drop(s2);
}

#[test]
fn dropping_the_client_closes_the_transport() {
    let (client, mut fake) = Fake::start(100);
    drop(client);
    assert!(fake.recv_within(Duration::from_secs(5)).is_none());
    let mut rest = Vec::new();
    fake.sock.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn stdin_through_io_write() {
    let (client, mut fake) = Fake::start(64);
    let agent = thread::spawn(move || {
        let (id, _) = fake.accept_exec();
        let mut got = Vec::new();
        loop {
            let f = fake.recv();
            match Kind::from_u8(f.kind) {
                Some(Kind::Stdin) => {
                    got.extend_from_slice(&f.payload);
                    let bytes = f.payload.len() as u32;
                    fake.send(id, &Message::StdinAck(Ack { bytes }));
                }
                Some(Kind::StdinClose) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        fake.exited(id, 0);
        (got, fake)
    });
    let mut s = client.exec(Command::new("cat")).unwrap();
    let mut h = s.handle();
    let text = "line\n".repeat(1000);
    std::io::copy(&mut text.as_bytes(), &mut h).unwrap();
    drop(h);
    assert!(s.wait().unwrap().success());
    let (got, _fake) = agent.join().unwrap();
    assert_eq!(got, text.as_bytes());
}

// ---------------------------------------------------------------------------
// The output path allocates nothing per frame.

/// Counts the allocations of the whole process. Only
/// `output_path_allocates_nothing_per_frame` reads the count, in a process
/// of its own where nothing else runs.
struct CountingAlloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call goes to the system allocator unchanged (same layout,
// same pointer); the count is a relaxed atomic add, which neither
// allocates nor blocks.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator, i.e. from System.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from System.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING_ALLOC: CountingAlloc = CountingAlloc;

/// Set in the child process that runs the measurement.
const ALLOC_CHILD: &str = "AGENTD_CLIENT_TEST_ALLOC_CHILD";

/// STDIN frames sent as fast as they can be, and one at a time.
const ALLOC_FRAMES: u64 = 20_000;
const ALLOC_LOCKSTEP_FRAMES: u64 = 2_000;

/// STDIN frames of every size from 1 to 300 bytes, with a RESIZE and a
/// SIGNAL every 50 frames, cost no allocation per frame on the client's
/// side: not in the session (which encodes into the outbox's buffer), not
/// in the writer thread (which swaps that buffer with its own and writes
/// it), whether the writer batches many frames per write or writes each
/// one alone. Allocations are counted in the whole process while nothing
/// else runs in it: the fake agent only reads into a buffer on its stack.
#[test]
fn output_path_allocates_nothing_per_frame() {
    if std::env::var_os(ALLOC_CHILD).is_none() {
        // The other tests of this binary allocate on their own threads at
        // the same time: measure in a process that runs this test alone.
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new(exe)
            .args([
                "output_path_allocates_nothing_per_frame",
                "--exact",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(ALLOC_CHILD, "1")
            .output()
            .expect("test binary runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stdout}{stderr}");
        assert!(stdout.contains("allocations for"), "{stdout}{stderr}");
        print!("{stdout}");
        return;
    }

    let (client, mut fake) = Fake::start(1 << 30);
    let received = std::sync::Arc::new(AtomicU64::new(0));
    let counted = received.clone();
    let (id_tx, id_rx) = mpsc::channel();
    let agent = thread::spawn(move || {
        let (id, _) = fake.accept_exec();
        assert_eq!(fake.dec.buffered(), 0, "the client sent more than EXEC");
        id_tx.send(id).unwrap();
        fake.sock.set_read_timeout(None).unwrap();
        let mut buf = [0u8; 64 * 1024];
        while let Ok(n @ 1..) = fake.sock.read(&mut buf) {
            counted.fetch_add(n as u64, Ordering::SeqCst);
        }
    });
    let session = client.exec(Command::new("cat")).unwrap();
    let id = id_rx.recv().unwrap();
    let h = session.handle();
    // Frame sizes, worked out before anything is counted.
    let resize_len = Message::Resize(agentd::messages::Resize {
        rows: 50,
        cols: 132,
    })
    .to_bytes(id)
    .len() as u64;
    let signal_len = Message::Signal(agentd::messages::Signal {
        signal: libc::SIGWINCH,
        group: true,
        tree: false,
    })
    .to_bytes(id)
    .len() as u64;
    let payload = [b'x'; 300];
    let mut sent = 0u64;
    let wait_received = |sent: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while received.load(Ordering::SeqCst) < sent {
            assert!(Instant::now() < deadline, "frames did not arrive");
            thread::yield_now();
        }
        assert_eq!(received.load(Ordering::SeqCst), sent);
    };
    // `frames` frames; in lockstep each one reaches the agent before the
    // next is sent, so each is a write of its own; otherwise they are sent
    // as fast as they can be and the writer batches them.
    let mut round = |frames: u64, lockstep: bool| {
        for i in 0..frames {
            let n = 1 + (i % 300) as usize;
            h.write_stdin(&payload[..n]).unwrap();
            sent += 9 + n as u64;
            if i % 50 == 0 {
                h.resize(50, 132).unwrap();
                h.signal(libc::SIGWINCH).unwrap();
                sent += resize_len + signal_len;
            }
            if lockstep {
                wait_received(sent);
            }
        }
        wait_received(sent);
    };
    let frames = |n: u64| n + n.div_ceil(50) * 2;
    // The first rounds let the two buffers grow to what they need.
    round(ALLOC_FRAMES, false);
    round(ALLOC_LOCKSTEP_FRAMES, true);
    for (n, lockstep) in [(ALLOC_FRAMES, false), (ALLOC_LOCKSTEP_FRAMES, true)] {
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        round(n, lockstep);
        let allocations = ALLOCATIONS.load(Ordering::SeqCst) - before;
        let frames = frames(n);
        let how = if lockstep {
            "one write each"
        } else {
            "batched"
        };
        println!("{allocations} allocations for {frames} frames ({how})");
        // A buffer per frame, or per write, would be at least one
        // allocation per frame here.
        assert!(
            allocations <= frames / 100,
            "{allocations} allocations for {frames} frames ({how})"
        );
    }
    drop(h);
    drop(session);
    client.close();
    agent.join().unwrap();
}

// ---------------------------------------------------------------------------
// Against the real agent (`agentd --stdio`).

fn agent() -> Client {
    Client::spawn_agent(AGENTD).expect("agentd --stdio starts")
}

fn agent_with(args: &[&str]) -> Client {
    let mut cmd = std::process::Command::new(AGENTD);
    cmd.arg("--stdio").args(args);
    Client::spawn(cmd).expect("agentd --stdio starts")
}

#[test]
fn real_ready() {
    let client = agent();
    let r = client.ready();
    assert_eq!(r.protocol, 1);
    assert!(r.agent.starts_with("agentd/"), "{}", r.agent);
    assert!(!r.pid1);
    assert!(r.stdin_window > 0);
    assert!(r.max_sessions >= 50);
}

#[test]
fn real_output_and_exit_status() {
    let client = agent();
    let out = client
        .output(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]))
        .unwrap();
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!((out.status.code, out.status.status), (Some(3), 3));
    let out = client
        .output(Command::new("sh").args(["-c", "kill -KILL $$"]))
        .unwrap();
    assert_eq!((out.status.signal, out.status.status), (Some(9), 137));
}

#[test]
fn real_many_sessions_at_once() {
    const N: usize = 50;
    let client = agent();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(N));
    let workers: Vec<_> = (0..N)
        .map(|i| {
            let client = client.clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut s = client
                    .exec(Command::new("sh").args([
                        "-c",
                        "read x; echo \"$x-$0\"; echo e$0 >&2",
                        &i.to_string(),
                    ]))
                    .unwrap();
                // Every session is live at this point.
                barrier.wait();
                s.write_stdin(format!("hello{i}\n").as_bytes()).unwrap();
                let mut out = Vec::new();
                let mut err = Vec::new();
                let mut status = None;
                for ev in s.events() {
                    match ev.unwrap() {
                        Event::Stdout(d) => out.extend(d),
                        Event::Stderr(d) => err.extend(d),
                        Event::Error(e) => panic!("{e:?}"),
                        Event::Exited(x) => status = Some(x),
                        Event::Detached(d) => panic!("{d:?}"),
                    }
                }
                assert_eq!(String::from_utf8(out).unwrap(), format!("hello{i}-{i}\n"));
                assert_eq!(String::from_utf8(err).unwrap(), format!("e{i}\n"));
                assert!(status.unwrap().success());
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert!(client.take_errors().is_empty());
}

/// Pipes `data` through `cat` on `client`, writing and reading at once.
fn cat_through(client: &Client, data: &[u8], output_window: u32) -> Vec<u8> {
    let mut cmd = Command::new("cat");
    cmd.output_window(output_window);
    let mut s = client.exec(&cmd).unwrap();
    let h = s.handle();
    let input = data.to_vec();
    let writer = thread::spawn(move || {
        h.write_stdin(&input).unwrap();
        h.close_stdin().unwrap();
    });
    let mut out = Vec::with_capacity(data.len());
    for ev in s.events() {
        match ev.unwrap() {
            Event::Stdout(d) => out.extend(d),
            Event::Stderr(d) => panic!("stderr: {}", String::from_utf8_lossy(&d)),
            // window_exceeded would show here.
            Event::Error(e) => panic!("agent error {}: {}", e.kind, e.message),
            Event::Exited(x) => assert!(x.success()),
            Event::Detached(d) => panic!("{d:?}"),
        }
    }
    writer.join().unwrap();
    out
}

#[test]
fn real_stdin_window_respected_with_a_large_payload() {
    let data: Vec<u8> = (0..8_000_000u32).map(|i| (i % 253) as u8).collect();
    // The default window, and a tiny one that forces thousands of waits.
    let client = agent();
    assert!(cat_through(&client, &data, 0) == data);
    let client = agent_with(&["--stdin-window", "4096"]);
    assert_eq!(client.ready().stdin_window, 4096);
    assert!(cat_through(&client, &data[..2_000_000], 0) == data[..2_000_000]);
    assert!(client.take_errors().is_empty());
}

#[test]
fn real_output_window_holds_the_writer_until_consumed() {
    const TOTAL: usize = 3_000_000;
    let client = agent();
    let script = format!("head -c {TOTAL} /dev/zero");

    // Without a window the agent forwards everything at once; the process
    // finishes without anyone reading.
    let s = client
        .exec(Command::new("sh").args(["-c", &script]))
        .unwrap();
    let pid = s.pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid as i32) {
        assert!(
            Instant::now() < deadline,
            "unwindowed writer never finished"
        );
        thread::sleep(Duration::from_millis(20));
    }

    // With a 64 KiB window nothing is consumed, so the writer must block.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script]).output_window(64 * 1024);
    let mut s = client.exec(&cmd).unwrap();
    thread::sleep(Duration::from_millis(500));
    assert!(alive(s.pid() as i32), "writer finished without acks");
    // Consuming sends OUTPUT_ACKs, and everything arrives.
    let mut total = 0;
    for ev in s.events() {
        match ev.unwrap() {
            Event::Stdout(d) => total += d.len(),
            Event::Exited(x) => assert!(x.success()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(total, TOTAL);
    // And the big output through cat, with a small window.
    let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    assert!(cat_through(&client, &data, 16 * 1024) == data);
    drop(s);
}

#[test]
fn real_exec_failure_kinds() {
    let client = agent();
    let kind = |cmd: &Command| client.exec(cmd).unwrap_err().exec_failed_kind();
    assert_eq!(
        kind(&Command::new("no-such-program-anywhere")),
        Some(ExecFailedKind::NotFound)
    );
    assert_eq!(
        kind(&Command::new("/etc/passwd")),
        Some(ExecFailedKind::PermissionDenied)
    );
    let mut c = Command::new("true");
    c.cwd("/no/such/dir");
    assert_eq!(kind(&c), Some(ExecFailedKind::BadCwd));
    let mut c = Command::new("true");
    c.user("no-such-user-anywhere");
    assert_eq!(kind(&c), Some(ExecFailedKind::BadUser));
    let mut c = Command::new("true");
    c.rlimit("bogus", 1, 1);
    assert_eq!(kind(&c), Some(ExecFailedKind::InvalidRequest));
    assert_eq!(
        kind(&Command::new("")),
        Some(ExecFailedKind::InvalidRequest)
    );
    // The connection is fine afterwards.
    assert!(client
        .output(Command::new("true"))
        .unwrap()
        .status
        .success());
}

#[test]
fn real_ping() {
    let client = agent();
    for _ in 0..10 {
        let rtt = client.ping().unwrap();
        assert!(rtt < Duration::from_secs(5));
    }
}

#[test]
fn real_resize_signal_and_tty() {
    let client = agent();
    let mut s = client.exec(Command::new("sleep").arg("100")).unwrap();
    s.resize(10, 10).unwrap();
    match s.next_event().unwrap() {
        Some(Event::Error(e)) => assert_eq!(e.error_kind(), Some(ErrorKind::NotATty)),
        other => panic!("expected not_a_tty, got {other:?}"),
    }
    s.signal(libc::SIGTERM).unwrap();
    let x = s.wait().unwrap();
    assert_eq!((x.signal, x.status), (Some(libc::SIGTERM), 143));

    let mut c = Command::new("sh");
    c.args(["-c", "stty size; read x; stty size"]).tty(30, 90);
    let mut s = client.exec(&c).unwrap();
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("30 90\r\n") {
        match s.next_event().unwrap() {
            Some(Event::Stdout(d)) => out.extend(d),
            other => panic!("{other:?}"),
        }
    }
    s.resize(44, 144).unwrap();
    s.write_stdin(b"\n").unwrap();
    let out = {
        let mut rest = Vec::new();
        while let Some(ev) = s.next_event().unwrap() {
            match ev {
                Event::Stdout(d) => rest.extend(d),
                Event::Exited(x) => assert!(x.success()),
                other => panic!("{other:?}"),
            }
        }
        String::from_utf8_lossy(&rest).into_owned()
    };
    assert!(out.contains("44 144\r\n"), "{out:?}");
}

#[test]
fn real_shutdown_ends_sessions() {
    let client = agent();
    let mut s = client.exec(Command::new("sleep").arg("100")).unwrap();
    let start = Instant::now();
    client.shutdown(Duration::from_millis(200)).unwrap();
    assert!(start.elapsed() < Duration::from_secs(10));
    let x = s.wait().unwrap();
    assert_eq!(x.signal, Some(libc::SIGTERM));
    assert!(client.is_closed());
    assert!(matches!(client.ping(), Err(Error::TransportClosed(_))));
}

#[test]
fn real_dropping_the_client_ends_the_agent() {
    let client = agent();
    let s = client.exec(Command::new("sleep").arg("100")).unwrap();
    let pid = s.pid();
    drop(s);
    drop(client);
    // End of file on stdio kills every session's process group.
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid as i32) {
        assert!(Instant::now() < deadline, "session outlived the connection");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Client>();
    send_sync::<agentd::client::SessionHandle>();
    send::<agentd::client::Session>();
    send_sync::<Error>();
}

/// The "library in ten lines" of docs/CLIENT.md, run for real (with
/// assertions added).
#[test]
fn ten_line_example() -> Result<(), agentd::client::Error> {
    let client = Client::spawn_agent(AGENTD)?; // or Client::connect_unix("/run/vm0/agent.sock")
    let out = client.output(Command::new("uname").arg("-a"))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.stdout.starts_with(b"Linux"));
    let cat = client.exec(Command::new("cat"))?;
    cat.write_stdin(b"hello from the host\n")?;
    let out = cat.wait_with_output()?;
    assert_eq!(out.stdout, b"hello from the host\n");
    println!("{} in a {:?} round trip", out.status, client.ping()?);
    assert!(out.status.success());
    Ok(())
}

/// The agent raises its own soft fd limit to the hard one (sessions cost
/// fds), and gives children the soft limit it was started with.
#[test]
fn agent_raises_its_fd_limit_and_children_keep_the_original() {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(AGENTD);
    cmd.arg("--stdio");
    // SAFETY: setrlimit is async-signal-safe; only the soft limit drops.
    unsafe {
        cmd.pre_exec(|| {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = 256;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let client = Client::spawn(cmd).expect("agent");
    let pid = client.ready().pid;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3], fields[4], "agent soft limit not raised: {line}");
    let out = client
        .output(Command::new("sh").args(["-c", "ulimit -n"]))
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "256");
    // The request's own limit still wins.
    let out = client
        .output(
            Command::new("sh")
                .args(["-c", "ulimit -n"])
                .rlimit("nofile", 64, 64),
        )
        .expect("exec");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "64");
}
