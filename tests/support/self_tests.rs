//! Tests of the test support itself: the checker must catch what it is
//! there to catch, and the MessagePack reader must read what the writer
//! wrote. Only tests/loopback.rs includes this file, so they run once.

/// The checker itself must catch what it is there to catch.
mod checker_tests {
    use agentd::codec::OwnedFrame;
    use agentd::messages::{Exec, Message};

    use crate::support::checker::{Checker, Sent};
    use crate::support::host::*;
    use crate::support::msgpack::Value;
    use crate::support::wire::raw_frame;

    fn frame(kind: u8, id: u32, payload: Vec<u8>) -> OwnedFrame {
        OwnedFrame { kind, id, payload }
    }

    fn ready() -> OwnedFrame {
        frame(
            READY,
            0,
            Value::map([
                ("protocol", Value::int(1)),
                ("agent", Value::str("agentd/x")),
                ("pid", Value::int(10)),
                ("pid1", Value::Bool(false)),
                ("max_payload", Value::int(1 << 20)),
                ("stdin_window", Value::int(1000)),
                ("max_sessions", Value::int(5)),
            ])
            .encode(),
        )
    }

    fn exited(pairs: Vec<(&str, Value)>) -> Vec<u8> {
        Value::map(pairs).encode()
    }

    /// What the host sent in these tests: one EXEC for id 1 and 10 STDIN
    /// bytes for it.
    fn sent() -> Sent {
        let mut sent = Sent::default();
        sent.note_bytes(&Message::Exec(Box::new(Exec::new("true"))).to_bytes(1));
        sent.note_bytes(&Message::Stdin(&[0; 10]).to_bytes(1));
        sent
    }

    /// Runs `frames` through a fresh checker (after [`sent`]); returns the
    /// first violation.
    fn run(frames: Vec<OwnedFrame>) -> Result<(), String> {
        run_after(sent(), frames)
    }

    fn run_after(mut sent: Sent, frames: Vec<OwnedFrame>) -> Result<(), String> {
        let mut c = Checker::new(Some(10));
        for f in std::iter::once(ready()).chain(frames) {
            c.check(&f.as_frame(), &mut sent)?;
        }
        Ok(())
    }

    fn started() -> OwnedFrame {
        frame(STARTED, 1, Value::map([("pid", Value::int(5))]).encode())
    }

    fn good_exit() -> OwnedFrame {
        frame(
            EXITED,
            1,
            exited(vec![
                ("code", Value::int(0)),
                ("core_dumped", Value::Bool(false)),
                ("status", Value::int(0)),
            ]),
        )
    }

    fn error(id: u32) -> OwnedFrame {
        frame(
            ERROR,
            id,
            Value::map([
                ("kind", Value::str("unknown_session")),
                ("message", Value::str("m")),
            ])
            .encode(),
        )
    }

    #[test]
    fn accepts_a_proper_session() {
        run(vec![
            started(),
            frame(STDOUT, 1, b"x".to_vec()),
            frame(
                STDIN_ACK,
                1,
                Value::map([("bytes", Value::int(10))]).encode(),
            ),
            good_exit(),
            error(0),
            error(1),
        ])
        .expect("the checker refused a proper session");
    }

    #[test]
    fn rejects_violations() {
        let bad: Vec<(&str, Vec<OwnedFrame>)> = vec![
            (
                "output before STARTED",
                vec![frame(STDOUT, 1, b"x".to_vec())],
            ),
            (
                "output after EXITED",
                vec![started(), good_exit(), frame(STDOUT, 1, b"x".to_vec())],
            ),
            ("two EXITED", vec![started(), good_exit(), good_exit()]),
            (
                "STARTED without EXEC",
                vec![frame(
                    STARTED,
                    2,
                    Value::map([("pid", Value::int(5))]).encode(),
                )],
            ),
            ("second READY", vec![ready()]),
            ("unknown kind", vec![frame(0x7f, 0, Vec::new())]),
            ("host kind", vec![frame(STDIN, 1, Vec::new())]),
            (
                "oversized STDOUT",
                vec![started(), frame(STDOUT, 1, vec![0; 65537])],
            ),
            (
                "empty STDOUT",
                vec![started(), frame(STDOUT, 1, Vec::new())],
            ),
            (
                "acks above sent",
                vec![
                    started(),
                    frame(
                        STDIN_ACK,
                        1,
                        Value::map([("bytes", Value::int(11))]).encode(),
                    ),
                ],
            ),
            (
                "EXITED without core_dumped",
                vec![
                    started(),
                    frame(
                        EXITED,
                        1,
                        exited(vec![("code", Value::int(0)), ("status", Value::int(0))]),
                    ),
                ],
            ),
            (
                "EXITED with both",
                vec![
                    started(),
                    frame(
                        EXITED,
                        1,
                        exited(vec![
                            ("code", Value::int(0)),
                            ("signal", Value::int(9)),
                            ("core_dumped", Value::Bool(false)),
                            ("status", Value::int(0)),
                        ]),
                    ),
                ],
            ),
            (
                "EXITED wrong status",
                vec![
                    started(),
                    frame(
                        EXITED,
                        1,
                        exited(vec![
                            ("signal", Value::int(9)),
                            ("core_dumped", Value::Bool(false)),
                            ("status", Value::int(9)),
                        ]),
                    ),
                ],
            ),
            (
                "EXITED core_dumped not bool",
                vec![
                    started(),
                    frame(
                        EXITED,
                        1,
                        exited(vec![
                            ("code", Value::int(0)),
                            ("core_dumped", Value::int(0)),
                            ("status", Value::int(0)),
                        ]),
                    ),
                ],
            ),
            (
                "ERROR kind outside the contract",
                vec![frame(
                    ERROR,
                    0,
                    Value::map([("kind", Value::str("oops")), ("message", Value::str("m"))])
                        .encode(),
                )],
            ),
            ("ERROR for an id the host never sent", vec![error(7)]),
            (
                "ERROR with a key twice (the crate's decoder refuses it)",
                vec![frame(
                    ERROR,
                    0,
                    Value::Map(vec![
                        (Value::str("kind"), Value::str("unknown_session")),
                        (Value::str("message"), Value::str("m")),
                        (Value::str("kind"), Value::str("unknown_session")),
                    ])
                    .encode(),
                )],
            ),
            (
                "EXEC_FAILED for a running id",
                vec![
                    started(),
                    frame(
                        EXEC_FAILED,
                        1,
                        Value::map([("kind", Value::str("other")), ("message", Value::str("m"))])
                            .encode(),
                    ),
                ],
            ),
            (
                "SHUTDOWN_DONE without SHUTDOWN",
                vec![frame(SHUTDOWN_DONE, 0, Vec::new())],
            ),
            (
                "map payload that is an array",
                vec![frame(STARTED, 1, vec![0x91, 0x01])],
            ),
        ];
        for (what, frames) in bad {
            assert!(run(frames).is_err(), "checker accepted: {what}");
        }
        // READY with another pid than the agent's.
        let mut c = Checker::new(Some(11));
        assert!(
            c.check(&ready().as_frame(), &mut sent()).is_err(),
            "checker accepted: READY with the wrong pid"
        );
        // The stream ending inside a frame.
        assert!(Checker::default().check_eof(false).is_err());
        assert!(Checker::default().check_eof(true).is_ok());
    }

    /// What the host sent is read as the agent's decoder reads it: frames
    /// split anywhere, lengths below 5 skipped with their bytes, oversized
    /// frames' payloads skipped.
    #[test]
    fn sent_follows_the_agents_framing() {
        let mut sent = Sent::default();
        let exec = Message::Exec(Box::new(Exec::new("cat"))).to_bytes(2);
        for b in &exec {
            sent.note_bytes(std::slice::from_ref(b));
        }
        // A length of 3 and its 3 bytes (which look like a header).
        sent.note_bytes(&[0, 0, 0, 3, STDIN, 0, 0]);
        // An oversized PING for id 9, whose payload holds a bait EXEC for id 3.
        let big = 5 + (1 << 20) + 1;
        sent.note_bytes(&raw_frame(big, PING, 9, &[]));
        let mut payload = raw_frame(5 + 4, EXEC, 3, b"bait");
        payload.resize((1 << 20) + 1, 0);
        sent.note_bytes(&payload);
        sent.note_bytes(&Message::Stdin(b"abcd").to_bytes(2));
        let frames = vec![
            frame(STARTED, 2, Value::map([("pid", Value::int(5))]).encode()),
            frame(
                STDIN_ACK,
                2,
                Value::map([("bytes", Value::int(4))]).encode(),
            ),
            error(9),
        ];
        let mut c = Checker::new(Some(10));
        for f in std::iter::once(ready()).chain(frames) {
            c.check(&f.as_frame(), &mut sent)
                .expect("the checker refused a frame answering what was sent");
        }
        // Nothing of the skipped bytes counts as a frame.
        let bait = frame(STARTED, 3, Value::map([("pid", Value::int(6))]).encode());
        assert!(c.check(&bait.as_frame(), &mut sent).is_err());
        assert!(c.check(&error(3).as_frame(), &mut sent).is_err());
    }

    /// A shutdown asked for by a signal makes SHUTDOWN_DONE expected.
    #[test]
    fn shutdown_done_after_a_noted_shutdown() {
        let mut sent = sent();
        sent.note_shutdown();
        run_after(sent, vec![frame(SHUTDOWN_DONE, 0, Vec::new())])
            .expect("SHUTDOWN_DONE refused after a noted shutdown");
        let mut sent = Sent::default();
        sent.note_bytes(&Message::Shutdown(agentd::messages::Shutdown { grace_ms: 1 }).to_bytes(0));
        run_after(sent, vec![frame(SHUTDOWN_DONE, 0, Vec::new())])
            .expect("SHUTDOWN_DONE refused after a SHUTDOWN");
    }
}

mod msgpack_tests {
    use crate::support::msgpack::{decode, mp, Value};

    #[test]
    fn round_trip() {
        let v = Value::map([
            ("a", Value::int(-1)),
            ("b", Value::int(300)),
            ("c", Value::int(-40000)),
            ("d", Value::int(u64::MAX)),
            ("e", Value::str(&"x".repeat(40))),
            ("f", Value::Array(vec![Value::Nil, Value::Bool(true)])),
            ("g", Value::Bin(vec![1, 2, 3])),
        ]);
        assert_eq!(decode(&v.encode()), Ok(v));
    }

    /// The byte builder and the value writer agree where both have a
    /// smallest form.
    #[test]
    fn mp_and_value_agree() {
        for s in [
            "",
            "cmd",
            &"y".repeat(31),
            &"y".repeat(32),
            &"z".repeat(300),
        ] {
            assert_eq!(mp::str(s), Value::str(s).encode(), "{} bytes", s.len());
        }
        let items: Vec<Vec<u8>> = (0..20).map(|i| mp::fix(i as u8)).collect();
        let values = Value::Array((0..20).map(Value::int).collect());
        assert_eq!(mp::arr(&items), values.encode());
        assert_eq!(
            mp::map(&[("a", mp::nil()), ("b", mp::bool(true))]),
            Value::map([("a", Value::Nil), ("b", Value::Bool(true))]).encode()
        );
        assert_eq!(mp::bin(&[7; 300]), Value::Bin(vec![7; 300]).encode());
    }
}

/// The hybrid vsock handshake (`CONNECT PORT\n`, `OK N\n`) against a fake
/// monitor on a socket pair: the success path and each way it fails.
mod hvsock_tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::time::Duration;

    use crate::support::hvsock::{connect, handshake, HvsockError};

    const LIMIT: Duration = Duration::from_secs(5);

    /// Runs the handshake against a monitor that reads the request and
    /// then does `monitor` with its end; returns the result and the
    /// request the monitor got.
    fn against(
        monitor: impl FnOnce(&mut UnixStream) + Send + 'static,
        limit: Duration,
    ) -> (Result<(UnixStream, u32), HvsockError>, String) {
        let (host, mut fake) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut req = Vec::new();
            let mut b = [0u8; 1];
            while fake.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                req.push(b[0]);
            }
            monitor(&mut fake);
            (String::from_utf8(req).unwrap(), fake)
        });
        let r = handshake(host, Path::new("/fake/vsock.sock"), 1024, limit);
        let (req, _fake) = t.join().unwrap();
        (r, req)
    }

    #[test]
    fn ok_and_the_bytes_after_it_stay_in_the_stream() {
        let (r, req) = against(
            |m| m.write_all(b"OK 1073741824\n\x01READY-bytes").unwrap(),
            LIMIT,
        );
        assert_eq!(req, "CONNECT 1024");
        let (mut s, port) = r.unwrap();
        assert_eq!(port, 1_073_741_824);
        let mut rest = [0u8; 12];
        s.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"\x01READY-bytes");
    }

    #[test]
    fn closed_without_a_reply_is_closed() {
        let (r, _) = against(|m| m.shutdown(std::net::Shutdown::Both).unwrap(), LIMIT);
        let e = r.unwrap_err();
        assert!(matches!(e, HvsockError::Closed { port: 1024, .. }), "{e:?}");
        assert!(
            e.to_string().contains("nothing listens on vsock port 1024"),
            "{e}"
        );
    }

    #[test]
    fn closed_in_the_middle_of_the_reply_is_closed() {
        let (r, _) = against(
            |m| {
                m.write_all(b"OK 12").unwrap();
                m.shutdown(std::net::Shutdown::Both).unwrap();
            },
            LIMIT,
        );
        match r.unwrap_err() {
            HvsockError::Closed { got, .. } => assert_eq!(got, "OK 12"),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn closed_before_the_request_is_closed() {
        let (host, fake) = UnixStream::pair().unwrap();
        drop(fake);
        let e = handshake(host, Path::new("/fake/vsock.sock"), 7, LIMIT).unwrap_err();
        assert!(matches!(e, HvsockError::Closed { port: 7, .. }), "{e:?}");
    }

    #[test]
    fn another_reply_is_refused() {
        for reply in [&b"ERR no listener\n"[..], b"OK\n", b"OK abc\n", b"ok 5\n"] {
            let (r, _) = against(move |m| m.write_all(reply).unwrap(), LIMIT);
            match r.unwrap_err() {
                HvsockError::Refused { line, .. } => {
                    assert_eq!(line.as_bytes(), &reply[..reply.len() - 1])
                }
                e => panic!("{reply:?}: {e:?}"),
            }
        }
    }

    #[test]
    fn a_reply_without_newline_is_too_long() {
        let (r, _) = against(|m| m.write_all(&[b'O'; 200]).unwrap(), LIMIT);
        assert!(matches!(r.unwrap_err(), HvsockError::TooLong { .. }));
    }

    #[test]
    fn no_reply_times_out() {
        let (r, _) = against(
            |_| std::thread::sleep(Duration::from_millis(600)),
            Duration::from_millis(200),
        );
        assert!(matches!(r.unwrap_err(), HvsockError::Timeout { .. }));
    }

    #[test]
    fn no_socket_is_a_connect_error() {
        let dir = crate::support::util::TempDir::new("hvsock");
        let path = dir.join("missing.sock");
        let e = connect(&path, 1024, LIMIT).unwrap_err();
        assert!(matches!(e, HvsockError::Connect { .. }), "{e:?}");
        assert!(e.to_string().contains("missing.sock"), "{e}");
    }
}
