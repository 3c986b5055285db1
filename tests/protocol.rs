//! Typed messages against protocol v1 (`/docs/PROTOCOL.md`): round trips,
//! defaults, unknown keys, integer widths, wrong types, raw payload limits,
//! unknown kinds and directions. MessagePack payloads are built by hand
//! (tests/support/msgpack.rs) so that the bytes under test are the bytes a host in any
//! language might send.

mod support;

use agentd::codec::{self, Decoded, FrameError, OwnedFrame, MAX_PAYLOAD, MAX_PING_PAYLOAD};
use agentd::messages::{
    check_map, Ack, Attach, AttachFailed, AttachFailedKind, Attached, Clock, ClockMsg, ClockSet,
    ClockSetDone, Detached, Direction, Encoding, EntropyDone, ErrorKind, ErrorMsg, Exec,
    ExecFailed, ExecFailedKind, Exited, FsDone, FsEntries, FsEntry, FsError, FsErrorKind, FsEvent,
    FsEvents, FsMsg, FsOp, FsOpened, FsRequest, FsStat, Kind, List, Message, NetClose, NetClosed,
    NetConnect, NetConnected, NetErrorKind, NetFailed, NetMsg, ProtocolError, Ready, Resize,
    Rlimit, RlimitResource, SessionInfo, Sessions, SessionsMsg, Shutdown, Signal, Started,
    MAX_DEPTH, PROTOCOL_VERSION,
};
use support::msgpack::mp;
use support::wire::{decode, frame, full_exec, single_frame};

// ---------------------------------------------------------------------------
// The kind table of the contract, copied by hand.

#[test]
fn kind_table_matches_the_contract() {
    use Direction::{AgentToHost as A2H, HostToAgent as H2A};
    use Encoding::{Empty, Map, Raw};
    let table: &[(u8, &str, Direction, Encoding)] = &[
        (0x01, "READY", A2H, Map),
        (0x02, "PING", H2A, Raw),
        (0x03, "PONG", A2H, Raw),
        (0x04, "SHUTDOWN", H2A, Map),
        (0x05, "SHUTDOWN_DONE", A2H, Empty),
        (0x06, "ERROR", A2H, Map),
        (0x10, "EXEC", H2A, Map),
        (0x11, "STARTED", A2H, Map),
        (0x12, "EXEC_FAILED", A2H, Map),
        (0x20, "STDIN", H2A, Raw),
        (0x21, "STDIN_CLOSE", H2A, Empty),
        (0x22, "STDIN_ACK", A2H, Map),
        (0x23, "RESIZE", H2A, Map),
        (0x24, "SIGNAL", H2A, Map),
        (0x25, "OUTPUT_ACK", H2A, Map),
        (0x30, "STDOUT", A2H, Raw),
        (0x31, "STDERR", A2H, Raw),
        (0x32, "EXITED", A2H, Map),
        // Extensions (docs/PROTOCOL.md, "Extensions and versions").
        (0x40, "FS_REQUEST", H2A, Map),
        (0x41, "FS_OPENED", A2H, Map),
        (0x42, "FS_DATA", A2H, Raw),
        (0x43, "FS_DATA_ACK", H2A, Map),
        (0x44, "FS_WRITE", H2A, Raw),
        (0x45, "FS_WRITE_ACK", A2H, Map),
        (0x46, "FS_END", H2A, Empty),
        (0x47, "FS_ENTRIES", A2H, Map),
        (0x48, "FS_EVENTS", A2H, Map),
        (0x49, "FS_DONE", A2H, Map),
        (0x4a, "FS_ERROR", A2H, Map),
        (0x4b, "FS_CANCEL", H2A, Empty),
        (0x50, "NET_CONNECT", H2A, Map),
        (0x51, "NET_CONNECTED", A2H, Map),
        (0x52, "NET_FAILED", A2H, Map),
        (0x53, "NET_SEND", H2A, Raw),
        (0x54, "NET_SEND_ACK", A2H, Map),
        (0x55, "NET_RECV", A2H, Raw),
        (0x56, "NET_RECV_ACK", H2A, Map),
        (0x57, "NET_SHUTDOWN", H2A, Empty),
        (0x58, "NET_EOF", A2H, Empty),
        (0x59, "NET_CLOSE", H2A, Map),
        (0x5a, "NET_CLOSED", A2H, Map),
        (0x60, "LIST", H2A, Map),
        (0x61, "SESSIONS", A2H, Map),
        (0x62, "ATTACH", H2A, Map),
        (0x63, "ATTACHED", A2H, Map),
        (0x64, "ATTACH_FAILED", A2H, Map),
        (0x65, "DETACH", H2A, Empty),
        (0x66, "DETACHED", A2H, Map),
        (0x70, "CLOCK_GET", H2A, Empty),
        (0x71, "CLOCK", A2H, Map),
        (0x72, "CLOCK_SET", H2A, Map),
        (0x73, "CLOCK_SET_DONE", A2H, Map),
        (0x74, "ENTROPY", H2A, Raw),
        (0x75, "ENTROPY_DONE", A2H, Map),
    ];
    assert_eq!(Kind::ALL.len(), table.len());
    for (&kind, &(value, name, dir, enc)) in Kind::ALL.iter().zip(table) {
        assert_eq!(kind as u8, value, "{name}");
        assert_eq!(Kind::from_u8(value), Some(kind), "{name}");
        assert_eq!(kind.name(), name);
        assert_eq!(kind.direction(), dir, "{name}");
        assert_eq!(kind.encoding(), enc, "{name}");
    }
    for value in 0..=255u8 {
        let known = table.iter().any(|t| t.0 == value);
        assert_eq!(Kind::from_u8(value).is_some(), known, "{value:#04x}");
    }
}

#[test]
fn string_tables_match_the_contract() {
    let errors: Vec<_> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(
        errors,
        [
            "malformed_frame",
            "frame_too_large",
            "unknown_kind",
            "wrong_direction",
            "bad_payload",
            "unknown_session",
            "not_a_tty",
            "invalid_signal",
            "window_exceeded",
            "stdin_closed",
            // Extensions' (docs/PROTOCOL.md, "Rules every extension
            // follows").
            "unsupported",
            "not_permitted",
            "duplicate_id",
        ]
    );
    let fs: Vec<_> = FsErrorKind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(
        fs.join(" "),
        "not_found permission_denied exists not_a_directory is_a_directory not_empty no_space \
         read_only invalid_request bad_user duplicate_id resource cancelled other"
    );
    let net: Vec<_> = NetErrorKind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(
        net.join(" "),
        "refused unreachable timed_out not_found permission_denied resource invalid_request \
         bad_user duplicate_id reset other"
    );
    let attach: Vec<_> = AttachFailedKind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(
        attach.join(" "),
        "not_found ambiguous duplicate_id invalid_request"
    );
    let ops: Vec<_> = FsOp::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(
        ops.join(" "),
        "stat lstat list read write mkdir remove rename chmod chown utimes symlink readlink \
         realpath tar_get tar_put watch"
    );
    let failed: Vec<_> = ExecFailedKind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(
        failed,
        [
            "not_found",
            "permission_denied",
            "bad_cwd",
            "bad_user",
            "invalid_request",
            "duplicate_id",
            "resource",
            "other",
        ]
    );
    let names: Vec<_> = RlimitResource::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(
        names.join(" "),
        "cpu fsize data stack core rss nproc nofile memlock as locks sigpending msgqueue nice rtprio rttime"
    );
    for &r in RlimitResource::ALL {
        assert_eq!(RlimitResource::parse(r.as_str()), Some(r));
    }
    // The numbers of <asm-generic/resource.h>, as libc has them.
    let libc_numbers = [
        libc::RLIMIT_CPU,
        libc::RLIMIT_FSIZE,
        libc::RLIMIT_DATA,
        libc::RLIMIT_STACK,
        libc::RLIMIT_CORE,
        libc::RLIMIT_RSS,
        libc::RLIMIT_NPROC,
        libc::RLIMIT_NOFILE,
        libc::RLIMIT_MEMLOCK,
        libc::RLIMIT_AS,
        libc::RLIMIT_LOCKS,
        libc::RLIMIT_SIGPENDING,
        libc::RLIMIT_MSGQUEUE,
        libc::RLIMIT_NICE,
        libc::RLIMIT_RTPRIO,
        libc::RLIMIT_RTTIME,
    ];
    for (&r, n) in RlimitResource::ALL.iter().zip(libc_numbers) {
        assert_eq!(r.linux_resource() as u64, n as u64, "{r}");
    }
    for &k in ErrorKind::ALL {
        assert_eq!(ErrorKind::parse(k.as_str()), Some(k));
        assert_eq!(k.to_string(), k.as_str());
    }
    assert_eq!(ErrorKind::parse("no_such_kind"), None);
    assert_eq!(PROTOCOL_VERSION, 1);
    assert_eq!(MAX_PAYLOAD, 1_048_576);
    assert_eq!(MAX_PING_PAYLOAD, 4096);
}

// ---------------------------------------------------------------------------
// Round trips.

/// One message of every kind, most with non-default values.
fn samples() -> Vec<Message<'static>> {
    vec![
        Message::Ready(Ready {
            protocol: 1,
            agent: "agentd/0.1.0".into(),
            pid: 1,
            pid1: true,
            max_payload: 1 << 20,
            stdin_window: 262_144,
            max_sessions: 1024,
            uptime_ms: Some(1234),
            features: Vec::new(),
            realtime_ns: None,
            restores: None,
            clock_set: None,
            replay_bytes: None,
            cgroups: None,
            mounts: Vec::new(),
        }),
        Message::Ping(b"ping"),
        Message::Pong(b"pong"),
        Message::Shutdown(Shutdown { grace_ms: 5000 }),
        Message::ShutdownDone,
        Message::Error(ErrorMsg::new(ErrorKind::BadPayload, "no cmd", Some(0x10))),
        Message::Exec(Box::new(full_exec())),
        Message::Started(Started {
            pid: 4242,
            session: None,
        }),
        Message::ExecFailed(ExecFailed {
            kind: "not_found".into(),
            message: "no such file".into(),
            errno: Some(2),
            stage: Some("execve".into()),
        }),
        Message::Stdin(b"input\n"),
        Message::StdinClose,
        Message::StdinAck(Ack { bytes: 6 }),
        Message::Resize(Resize {
            rows: 40,
            cols: 100,
        }),
        Message::Signal(Signal {
            signal: 15,
            group: false,
            tree: false,
        }),
        Message::OutputAck(Ack { bytes: 70_000 }),
        Message::Stdout(b"out"),
        Message::Stderr(b"\xff\x00err"),
        Message::Exited(Exited::from_signal(9, true)),
    ]
    .into_iter()
    .chain(extension_samples())
    .collect()
}

fn stat() -> FsStat {
    FsStat {
        kind: "symlink".into(),
        size: 5,
        mode: 0o777,
        uid: 0,
        gid: 0,
        mtime_ns: -1,
        atime_ns: 1_700_000_000_000_000_000,
        ctime_ns: 2,
        nlink: 1,
        ino: 77,
        target: Some("/etc".into()),
    }
}

/// One message of every extension kind.
fn extension_samples() -> Vec<Message<'static>> {
    vec![
        Message::Fs(FsMsg::Request(Box::new(FsRequest {
            window: Some(65536),
            atomic: Some(true),
            ..FsRequest::new(FsOp::Write, "/tmp/x")
        }))),
        Message::Fs(FsMsg::Opened(FsOpened { stat: Some(stat()) })),
        Message::Fs(FsMsg::Data(b"file bytes")),
        Message::Fs(FsMsg::DataAck(Ack { bytes: 10 })),
        Message::Fs(FsMsg::Write(b"upload")),
        Message::Fs(FsMsg::WriteAck(Ack { bytes: 6 })),
        Message::Fs(FsMsg::End),
        Message::Fs(FsMsg::Entries(FsEntries {
            entries: vec![FsEntry {
                name: char::REPLACEMENT_CHARACTER.to_string(),
                name_bin: Some(vec![0xff]),
                kind: "file".into(),
                stat: None,
            }],
        })),
        Message::Fs(FsMsg::Events(FsEvents {
            events: vec![FsEvent {
                kind: "moved_to".into(),
                path: "a/b".into(),
                dir: false,
                cookie: Some(9),
            }],
            overflow: true,
        })),
        Message::Fs(FsMsg::Done(Box::new(FsDone {
            bytes: Some(6),
            ..FsDone::default()
        }))),
        Message::Fs(FsMsg::Error(FsError::new(
            FsErrorKind::NotFound,
            "no such file",
            Some(2),
            Some("/nope".into()),
        ))),
        Message::Fs(FsMsg::Cancel),
        Message::Net(NetMsg::Connect(Box::new(NetConnect {
            timeout_ms: Some(500),
            ..NetConnect::tcp("::1", 8080)
        }))),
        Message::Net(NetMsg::Connected(NetConnected {
            peer: "[::1]:8080".into(),
            local: "[::1]:40000".into(),
        })),
        Message::Net(NetMsg::Failed(NetFailed::new(
            NetErrorKind::Refused,
            "connection refused",
            Some(111),
        ))),
        Message::Net(NetMsg::Send(b"GET /")),
        Message::Net(NetMsg::SendAck(Ack { bytes: 5 })),
        Message::Net(NetMsg::Recv(b"HTTP/1.0 200")),
        Message::Net(NetMsg::RecvAck(Ack { bytes: 12 })),
        Message::Net(NetMsg::Shutdown),
        Message::Net(NetMsg::Eof),
        Message::Net(NetMsg::Close(NetClose { reset: true })),
        Message::Net(NetMsg::Closed(NetClosed {
            error: Some("reset".into()),
            message: Some("reset by peer".into()),
            errno: Some(104),
        })),
        Message::Sessions(SessionsMsg::List(List { all: true })),
        Message::Sessions(SessionsMsg::Sessions(Sessions {
            sessions: vec![SessionInfo {
                session: 3,
                tag: Some("build".into()),
                pid: 42,
                cmd: "make".into(),
                args: vec!["-j2".into()],
                user: None,
                tty: false,
                state: "exited".into(),
                attached: false,
                id: None,
                started_ms: 1_700_000_000_000,
                stdout_bytes: 10,
                stderr_bytes: 0,
                exit: Some(Exited::from_code(2)),
            }],
            more: false,
        })),
        Message::Sessions(SessionsMsg::Attach(Box::new(Attach {
            tag: Some("build".into()),
            tail: Some(4096),
            ..Attach::default()
        }))),
        Message::Sessions(SessionsMsg::Attached(Attached {
            session: 3,
            pid: 42,
            tty: false,
            stdout_from: 0,
            stderr_from: 0,
            stdout_lost: 0,
            stderr_lost: 0,
            stdin: true,
        })),
        Message::Sessions(SessionsMsg::AttachFailed(AttachFailed::new(
            AttachFailedKind::NotFound,
            "no session 9",
        ))),
        Message::Sessions(SessionsMsg::Detach),
        Message::Sessions(SessionsMsg::Detached(Detached {
            session: 3,
            reason: "detach".into(),
        })),
        Message::Clock(ClockMsg::Get),
        Message::Clock(ClockMsg::Clock(Clock {
            realtime_ns: 1_700_000_000_123_456_789,
            boottime_ns: 5_000_000,
            restores: 1,
        })),
        Message::Clock(ClockMsg::Set(ClockSet {
            realtime_ns: 1_700_000_001_000_000_000,
        })),
        Message::Clock(ClockMsg::SetDone(ClockSetDone {
            old_ns: 1,
            new_ns: 2,
        })),
        Message::Clock(ClockMsg::Entropy(b"random bytes")),
        Message::Clock(ClockMsg::EntropyDone(EntropyDone { bytes: 12 })),
    ]
}

#[test]
fn every_kind_round_trips() {
    let samples = samples();
    let kinds: Vec<Kind> = samples.iter().map(Message::kind).collect();
    assert_eq!(kinds, Kind::ALL, "one sample per kind, in wire order");

    let mut stream = Vec::new();
    for (i, msg) in samples.iter().enumerate() {
        let id = 0x0102_0300 + i as u32;
        let bytes = msg.to_bytes(id);
        let f = single_frame(&bytes);
        assert_eq!(f.kind, msg.kind() as u8);
        assert_eq!(f.id, id);
        assert_eq!(
            u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize,
            bytes.len() - 4
        );
        let back = Message::decode(f.as_frame()).unwrap();
        assert_eq!(&back, msg);
        let directed = match msg.kind().direction() {
            Direction::HostToAgent => Message::decode_from_host(f.as_frame()),
            Direction::AgentToHost => Message::decode_from_agent(f.as_frame()),
        };
        assert_eq!(directed.as_ref(), Ok(msg));
        // Re-encoding is byte for byte the same.
        assert_eq!(back.to_bytes(id), bytes);
        // encode appends behind what is already in the buffer.
        msg.encode(id, &mut stream).expect("the test's frames fit");
    }
    let (items, dec) = codec::decode_chunks([&stream[..]]);
    assert!(dec.is_at_boundary());
    assert_eq!(items.len(), samples.len());
    for (item, msg) in items.iter().zip(&samples) {
        let Decoded::Frame(f) = item else {
            panic!("{item:?}")
        };
        assert_eq!(&Message::decode(f.as_frame()).unwrap(), msg);
    }
}

#[test]
fn defaults_round_trip_too() {
    let msgs = [
        Message::Exec(Box::new(Exec::new("true"))),
        Message::Shutdown(Shutdown::default()),
        Message::Exited(Exited::from_code(0)),
        Message::Error(ErrorMsg::new(ErrorKind::UnknownSession, "", None)),
        Message::ExecFailed(ExecFailed {
            kind: "other".into(),
            message: String::new(),
            errno: None,
            stage: None,
        }),
        Message::Ping(b""),
        Message::Pong(b""),
        Message::Stdin(b""),
        Message::Stdout(b""),
        Message::Stderr(b""),
    ];
    for msg in msgs {
        let bytes = msg.to_bytes(7);
        assert_eq!(
            Message::decode(single_frame(&bytes).as_frame()).unwrap(),
            msg
        );
    }
}

#[test]
fn raw_payloads_are_the_bytes_themselves() {
    let payload: Vec<u8> = (0..=255).collect();
    for msg in [
        Message::Pong(&payload),
        Message::Stdin(&payload),
        Message::Stdout(&payload),
        Message::Stderr(&payload),
    ] {
        let bytes = msg.to_bytes(3);
        assert_eq!(&bytes[9..], &payload[..]);
    }
    // Empty-payload kinds are sent with an empty payload.
    assert_eq!(
        Message::ShutdownDone.to_bytes(0),
        [0, 0, 0, 5, 0x05, 0, 0, 0, 0]
    );
    assert_eq!(
        Message::StdinClose.to_bytes(9),
        [0, 0, 0, 5, 0x21, 0, 0, 0, 9]
    );
}

// ---------------------------------------------------------------------------
// Defaults.

fn exec_of(payload: &[u8]) -> Exec {
    match decode(Kind::Exec, payload) {
        Ok(Message::Exec(e)) => *e,
        other => panic!("{other:?}"),
    }
}

#[test]
fn exec_defaults() {
    let e = exec_of(&mp::map(&[("cmd", mp::str("true"))]));
    assert_eq!(e.cmd, "true");
    assert_eq!(e.args, Vec::<String>::new());
    assert_eq!(e.env, Vec::<String>::new());
    assert!(!e.clear_env);
    assert_eq!(e.cwd, None);
    assert_eq!(e.user, None);
    assert!(!e.tty);
    assert_eq!(e.rows, 24);
    assert_eq!(e.cols, 80);
    assert_eq!(e.rlimits, Vec::<Rlimit>::new());
    assert!(e.stdin);
    assert_eq!(e.output_window, 0);
    assert_eq!(e.linger_ms, 100);
    assert!(!e.no_new_privs);
    assert_eq!(e, Exec::new("true"));
}

#[test]
fn exec_with_every_key() {
    let rlimit = |r: &str, soft: u64, hard: u64| {
        mp::map(&[
            ("resource", mp::str(r)),
            ("soft", mp::u64(soft)),
            ("hard", mp::u64(hard)),
        ])
    };
    let p = mp::map(&[
        ("cmd", mp::str("/bin/sh")),
        ("args", mp::arr(&[mp::str("-c"), mp::str("echo hi")])),
        ("env", mp::arr(&[mp::str("A=1"), mp::str("B=")])),
        ("clear_env", mp::bool(true)),
        ("cwd", mp::str("/tmp")),
        ("user", mp::str("1000:1000")),
        ("tty", mp::bool(true)),
        ("rows", mp::fix(50)),
        ("cols", mp::u8(132)),
        (
            "rlimits",
            mp::arr(&[rlimit("nofile", 1024, 4096), rlimit("core", 0, u64::MAX)]),
        ),
        ("stdin", mp::bool(false)),
        ("output_window", mp::u32(65536)),
        ("linger_ms", mp::u16(250)),
        ("no_new_privs", mp::bool(true)),
    ]);
    assert_eq!(exec_of(&p), full_exec());
}

#[test]
fn other_defaults() {
    // SHUTDOWN: grace_ms 1000, whether the payload is empty or an empty map.
    for p in [vec![], mp::map(&[])] {
        assert_eq!(
            decode(Kind::Shutdown, &p),
            Ok(Message::Shutdown(Shutdown { grace_ms: 1000 }))
        );
    }
    assert_eq!(Shutdown::default().grace_ms, 1000);
    // SIGNAL: group true.
    assert_eq!(
        decode(Kind::Signal, &mp::map(&[("signal", mp::fix(9))])),
        Ok(Message::Signal(Signal {
            signal: 9,
            group: true,
            tree: false
        }))
    );
    // ERROR: frame_kind absent.
    assert_eq!(
        decode(
            Kind::Error,
            &mp::map(&[("kind", mp::str("x")), ("message", mp::str("y"))])
        ),
        Ok(Message::Error(ErrorMsg {
            kind: "x".into(),
            message: "y".into(),
            frame_kind: None
        }))
    );
    // EXEC_FAILED: errno and stage absent.
    assert_eq!(
        decode(
            Kind::ExecFailed,
            &mp::map(&[("kind", mp::str("bad_cwd")), ("message", mp::str("m"))])
        ),
        Ok(Message::ExecFailed(ExecFailed {
            kind: "bad_cwd".into(),
            message: "m".into(),
            errno: None,
            stage: None
        }))
    );
    // EXITED: code and signal absent, core_dumped false.
    assert_eq!(
        decode(Kind::Exited, &mp::map(&[("status", mp::fix(0))])),
        Ok(Message::Exited(Exited {
            code: None,
            signal: None,
            core_dumped: false,
            status: 0,
            output_dropped: None,
            timed_out: false,
            oom_killed: false
        }))
    );
    // READY: uptime_ms absent.
    let Ok(Message::Ready(r)) = decode(Kind::Ready, &ready_payload(&[])) else {
        panic!()
    };
    assert_eq!(r.uptime_ms, None);
}

#[test]
fn exited_constructors() {
    assert_eq!(
        Exited::from_code(3),
        Exited {
            code: Some(3),
            signal: None,
            core_dumped: false,
            status: 3,
            output_dropped: None,
            timed_out: false,
            oom_killed: false
        }
    );
    assert_eq!(
        Exited::from_signal(11, true),
        Exited {
            code: None,
            signal: Some(11),
            core_dumped: true,
            status: 139,
            output_dropped: None,
            timed_out: false,
            oom_killed: false
        }
    );
}

// ---------------------------------------------------------------------------
// Minimal valid payloads of every map kind, and what they decode to.

fn ready_payload(skip: &[&str]) -> Vec<u8> {
    let all = [
        ("protocol", mp::fix(1)),
        ("agent", mp::str("agentd/0.1.0")),
        ("pid", mp::fix(1)),
        ("pid1", mp::bool(true)),
        ("max_payload", mp::u32(1 << 20)),
        ("stdin_window", mp::u32(262_144)),
        ("max_sessions", mp::u16(1024)),
    ];
    let kept: Vec<_> = all.into_iter().filter(|(k, _)| !skip.contains(k)).collect();
    mp::map(&kept)
}

/// (kind, the required keys with valid values). Every other key has a
/// default.
/// Keys and their encoded values, in order.
type Entries = Vec<(&'static str, Vec<u8>)>;

fn required_keys() -> Vec<(Kind, Entries)> {
    vec![
        (
            Kind::Ready,
            vec![
                ("protocol", mp::fix(1)),
                ("agent", mp::str("agentd/0.1.0")),
                ("pid", mp::fix(1)),
                ("pid1", mp::bool(true)),
                ("max_payload", mp::u32(1 << 20)),
                ("stdin_window", mp::u32(262_144)),
                ("max_sessions", mp::u16(1024)),
            ],
        ),
        (Kind::Shutdown, vec![]),
        (
            Kind::Error,
            vec![("kind", mp::str("bad_payload")), ("message", mp::str("m"))],
        ),
        (Kind::Exec, vec![("cmd", mp::str("true"))]),
        (Kind::Started, vec![("pid", mp::fix(7))]),
        (
            Kind::ExecFailed,
            vec![("kind", mp::str("not_found")), ("message", mp::str("m"))],
        ),
        (Kind::StdinAck, vec![("bytes", mp::fix(1))]),
        (
            Kind::Resize,
            vec![("rows", mp::fix(1)), ("cols", mp::fix(2))],
        ),
        (Kind::Signal, vec![("signal", mp::fix(9))]),
        (Kind::OutputAck, vec![("bytes", mp::fix(1))]),
        (Kind::Exited, vec![("status", mp::fix(0))]),
        (
            Kind::FsRequest,
            vec![("op", mp::str("stat")), ("path", mp::str("/"))],
        ),
        (Kind::FsOpened, vec![]),
        (Kind::FsDataAck, vec![("bytes", mp::fix(1))]),
        (Kind::FsWriteAck, vec![("bytes", mp::fix(1))]),
        (Kind::FsEntries, vec![("entries", mp::arr(&[]))]),
        (Kind::FsEvents, vec![("events", mp::arr(&[]))]),
        (Kind::FsDone, vec![]),
        (
            Kind::FsError,
            vec![("kind", mp::str("other")), ("message", mp::str("m"))],
        ),
        (Kind::NetConnect, vec![]),
        (
            Kind::NetConnected,
            vec![("peer", mp::str("a")), ("local", mp::str("b"))],
        ),
        (
            Kind::NetFailed,
            vec![("kind", mp::str("refused")), ("message", mp::str("m"))],
        ),
        (Kind::NetSendAck, vec![("bytes", mp::fix(1))]),
        (Kind::NetRecvAck, vec![("bytes", mp::fix(1))]),
        (Kind::NetClose, vec![]),
        (Kind::NetClosed, vec![]),
        (Kind::List, vec![]),
        (Kind::Sessions, vec![("sessions", mp::arr(&[]))]),
        (Kind::Attach, vec![]),
        (
            Kind::Attached,
            vec![
                ("session", mp::fix(1)),
                ("pid", mp::fix(2)),
                ("stdout_from", mp::fix(0)),
                ("stderr_from", mp::fix(0)),
                ("stdout_lost", mp::fix(0)),
                ("stderr_lost", mp::fix(0)),
            ],
        ),
        (
            Kind::AttachFailed,
            vec![("kind", mp::str("not_found")), ("message", mp::str("m"))],
        ),
        (
            Kind::Detached,
            vec![("session", mp::fix(1)), ("reason", mp::str("detach"))],
        ),
        (
            Kind::Clock,
            vec![
                ("realtime_ns", mp::fix(1)),
                ("boottime_ns", mp::fix(2)),
                ("restores", mp::fix(0)),
            ],
        ),
        (Kind::ClockSet, vec![("realtime_ns", mp::fix(1))]),
        (
            Kind::ClockSetDone,
            vec![("old_ns", mp::fix(1)), ("new_ns", mp::fix(2))],
        ),
        (Kind::EntropyDone, vec![("bytes", mp::fix(1))]),
    ]
}

fn map_kinds() -> Vec<Kind> {
    Kind::ALL
        .iter()
        .copied()
        .filter(|k| k.encoding() == Encoding::Map)
        .collect()
}

#[test]
fn every_map_kind_is_covered() {
    let covered: Vec<Kind> = required_keys().iter().map(|r| r.0).collect();
    assert_eq!(covered, map_kinds());
}

#[track_caller]
fn assert_bad_payload(kind: Kind, payload: &[u8], what: &str) {
    match decode(kind, payload) {
        Err(e @ ProtocolError::BadPayload { kind: k, .. }) => {
            assert_eq!(k, kind, "{what}");
            assert_eq!(e.kind(), ErrorKind::BadPayload, "{what}");
            assert_eq!(e.kind().as_str(), "bad_payload");
        }
        other => panic!(
            "{} {what}: expected bad_payload, got {other:?}",
            kind.name()
        ),
    }
}

#[test]
fn required_keys_missing_are_bad_payload() {
    for (kind, keys) in required_keys() {
        // With all of them it decodes.
        decode(kind, &mp::map(&keys)).unwrap_or_else(|e| panic!("{}: {e}", kind.name()));
        for i in 0..keys.len() {
            let mut fewer = keys.clone();
            let (missing, _) = fewer.remove(i);
            assert_bad_payload(kind, &mp::map(&fewer), &format!("without {missing}"));
        }
        // An empty payload is an empty map: fine only if nothing is required.
        if keys.is_empty() {
            decode(kind, &[]).unwrap();
        } else {
            assert_bad_payload(kind, &[], "empty payload");
        }
    }
    // The named cases of the task, spelled out.
    assert_bad_payload(Kind::Exec, &mp::map(&[("args", mp::arr(&[]))]), "no cmd");
    assert_bad_payload(Kind::Resize, &mp::map(&[("cols", mp::fix(80))]), "no rows");
    assert_bad_payload(Kind::OutputAck, &mp::map(&[]), "no bytes");
}

// ---------------------------------------------------------------------------
// Unknown keys.

/// Values of every MessagePack family, for unknown keys.
fn exotic_values() -> Vec<Vec<u8>> {
    vec![
        mp::nil(),
        mp::bool(true),
        mp::fix(1),
        mp::nfix(-1),
        mp::u64(u64::MAX),
        mp::i64(i64::MIN),
        mp::f32(1.5),
        mp::f64(-0.25),
        mp::str("text"),
        mp::str_bytes(b"\xff\xfe"), // an ignored value is not inspected
        mp::bin(b"\x00\x01"),
        mp::arr(&[mp::nil(), mp::arr(&[])]),
        mp::raw_map(&[(mp::fix(1), mp::nil()), (mp::fix(1), mp::nil())]),
        vec![0xd4, 0x01, 0xaa], // fixext 1
        vec![0xd8, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], // fixext 16
        vec![0xc7, 0x03, 0x05, 1, 2, 3], // ext 8
        vec![0xc8, 0x00, 0x01, 0x05, 1], // ext 16
        vec![0xc9, 0, 0, 0, 0, 0x05], // ext 32, empty
        vec![0xd6, 0xff, 0, 0, 0, 0], // timestamp 32
    ]
}

#[test]
fn unknown_keys_are_ignored() {
    for (kind, keys) in required_keys() {
        let base = mp::map(&keys);
        let plain = decode(kind, &base).unwrap();
        for (i, value) in exotic_values().into_iter().enumerate() {
            let mut more = keys.clone();
            more.insert(0, ("zz_unknown", value.clone()));
            more.push(("", value.clone()));
            more.push(("x-future-extension", value));
            assert_eq!(
                decode(kind, &mp::map(&more)).as_ref(),
                Ok(&plain),
                "{} exotic value {i}",
                kind.name()
            );
        }
        // Many unknown keys, a map16 header.
        let mut many = keys.clone();
        let names: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
        for n in &names {
            many.push((n.as_str(), mp::fix(0)));
        }
        assert_eq!(decode(kind, &mp::map(&many)).as_ref(), Ok(&plain));
    }
}

#[test]
fn keys_in_any_str_width() {
    for width in [0, 8, 16, 32] {
        let p = mp::raw_map(&[(mp::str_w("cmd", width), mp::str_w("true", width))]);
        assert_eq!(exec_of(&p), Exec::new("true"), "str width {width}");
    }
    // The map header itself in every width.
    let entries = [(mp::str("cmd"), mp::str("true"))];
    let mut map16 = vec![0xde, 0, 1];
    let mut map32 = vec![0xdf, 0, 0, 0, 1];
    for (k, v) in &entries {
        map16.extend_from_slice(k);
        map16.extend_from_slice(v);
        map32.extend_from_slice(k);
        map32.extend_from_slice(v);
    }
    assert_eq!(exec_of(&map16), Exec::new("true"));
    assert_eq!(exec_of(&map32), Exec::new("true"));
    // Arrays too.
    let mut arr16 = vec![0xdc, 0, 1];
    arr16.extend(mp::str("a"));
    let mut arr32 = vec![0xdd, 0, 0, 0, 1];
    arr32.extend(mp::str("a"));
    for args in [arr16, arr32] {
        let e = exec_of(&mp::map(&[("cmd", mp::str("x")), ("args", args)]));
        assert_eq!(e.args, ["a"]);
    }
}

// ---------------------------------------------------------------------------
// Integers in every width.

type Getter = fn(&Message) -> Option<i128>;

/// (kind, key, lowest, highest, getter): every integer key of the contract.
fn integer_keys() -> Vec<(Kind, &'static str, i128, i128, Getter)> {
    const U8: (i128, i128) = (0, u8::MAX as i128);
    const U16: (i128, i128) = (0, u16::MAX as i128);
    const U32: (i128, i128) = (0, u32::MAX as i128);
    const U64: (i128, i128) = (0, u64::MAX as i128);
    const I32: (i128, i128) = (i32::MIN as i128, i32::MAX as i128);
    macro_rules! get {
        ($variant:ident, $m:ident => $e:expr) => {
            |msg: &Message| match msg {
                Message::$variant($m) => $e,
                _ => None,
            }
        };
    }
    let rows: Vec<(Kind, &str, (i128, i128), Getter)> = vec![
        (
            Kind::Ready,
            "protocol",
            U32,
            get!(Ready, m => Some(m.protocol.into())),
        ),
        (
            Kind::Ready,
            "pid",
            U32,
            get!(Ready, m => Some(m.pid.into())),
        ),
        (
            Kind::Ready,
            "max_payload",
            U32,
            get!(Ready, m => Some(m.max_payload.into())),
        ),
        (
            Kind::Ready,
            "stdin_window",
            U32,
            get!(Ready, m => Some(m.stdin_window.into())),
        ),
        (
            Kind::Ready,
            "max_sessions",
            U32,
            get!(Ready, m => Some(m.max_sessions.into())),
        ),
        (
            Kind::Ready,
            "uptime_ms",
            U64,
            get!(Ready, m => m.uptime_ms.map(Into::into)),
        ),
        (
            Kind::Shutdown,
            "grace_ms",
            U32,
            get!(Shutdown, m => Some(m.grace_ms.into())),
        ),
        (
            Kind::Error,
            "frame_kind",
            U8,
            get!(Error, m => m.frame_kind.map(Into::into)),
        ),
        (
            Kind::Exec,
            "rows",
            U16,
            get!(Exec, m => Some(m.rows.into())),
        ),
        (
            Kind::Exec,
            "cols",
            U16,
            get!(Exec, m => Some(m.cols.into())),
        ),
        (
            Kind::Exec,
            "output_window",
            U32,
            get!(Exec, m => Some(m.output_window.into())),
        ),
        (
            Kind::Exec,
            "linger_ms",
            U32,
            get!(Exec, m => Some(m.linger_ms.into())),
        ),
        (
            Kind::Started,
            "pid",
            U32,
            get!(Started, m => Some(m.pid.into())),
        ),
        (
            Kind::ExecFailed,
            "errno",
            I32,
            get!(ExecFailed, m => m.errno.map(Into::into)),
        ),
        (
            Kind::StdinAck,
            "bytes",
            U32,
            get!(StdinAck, m => Some(m.bytes.into())),
        ),
        (
            Kind::Resize,
            "rows",
            U16,
            get!(Resize, m => Some(m.rows.into())),
        ),
        (
            Kind::Resize,
            "cols",
            U16,
            get!(Resize, m => Some(m.cols.into())),
        ),
        (
            Kind::Signal,
            "signal",
            I32,
            get!(Signal, m => Some(m.signal.into())),
        ),
        (
            Kind::OutputAck,
            "bytes",
            U32,
            get!(OutputAck, m => Some(m.bytes.into())),
        ),
        (
            Kind::Exited,
            "code",
            I32,
            get!(Exited, m => m.code.map(Into::into)),
        ),
        (
            Kind::Exited,
            "signal",
            I32,
            get!(Exited, m => m.signal.map(Into::into)),
        ),
        (
            Kind::Exited,
            "status",
            I32,
            get!(Exited, m => Some(m.status.into())),
        ),
    ];
    rows.into_iter()
        .map(|(k, key, (lo, hi), g)| (k, key, lo, hi, g))
        .collect()
}

/// Every MessagePack encoding of `v` (empty if no integer form holds it).
fn int_widths(v: i128) -> Vec<Vec<u8>> {
    if v >= 0 {
        u64::try_from(v).map(mp::uint_widths).unwrap_or_default()
    } else {
        i64::try_from(v).map(mp::nint_widths).unwrap_or_default()
    }
}

/// The payload of `kind` with its required keys, `key` set to `value`.
fn with_key(kind: Kind, key: &str, value: Vec<u8>) -> Vec<u8> {
    let (_, mut keys) = required_keys()
        .into_iter()
        .find(|(k, _)| *k == kind)
        .unwrap();
    keys.retain(|(k, _)| *k != key);
    keys.push((key, value));
    mp::map(&keys)
}

#[test]
fn integers_in_every_width() {
    let mut checked = 0;
    for (kind, key, lo, hi, get) in integer_keys() {
        let mut values = vec![0, 1, 5, 24, 127, 128, 255, 256, 65535, 65536, hi, lo];
        values.extend([-1, -32, -33, -128, -129, -32768, -32769, lo + 1, hi - 1]);
        for v in values {
            let widths = int_widths(v);
            assert!(!widths.is_empty());
            for enc in widths {
                let p = with_key(kind, key, enc.clone());
                let got = decode(kind, &p);
                if (lo..=hi).contains(&v) {
                    let msg = got.unwrap_or_else(|e| {
                        panic!("{}.{key} = {v} as {enc:02x?}: {e}", kind.name())
                    });
                    assert_eq!(get(&msg), Some(v), "{}.{key} as {enc:02x?}", kind.name());
                } else {
                    assert_bad_payload(kind, &p, &format!("{key} = {v} as {enc:02x?}"));
                }
                checked += 1;
            }
        }
        // Just past each end of the range.
        for v in [lo - 1, hi + 1] {
            for enc in int_widths(v) {
                assert_bad_payload(kind, &with_key(kind, key, enc), &format!("{key} = {v}"));
            }
        }
    }
    assert!(checked > 1000);
}

#[test]
fn rlimit_values_in_every_width() {
    for v in [0u64, 1, 127, 255, 65536, u32::MAX as u64 + 1, u64::MAX] {
        for enc in mp::uint_widths(v) {
            let entry = mp::map(&[
                ("resource", mp::str("nofile")),
                ("soft", enc.clone()),
                ("hard", enc.clone()),
            ]);
            let e = exec_of(&mp::map(&[
                ("cmd", mp::str("x")),
                ("rlimits", mp::arr(&[entry])),
            ]));
            assert_eq!(
                e.rlimits,
                [Rlimit {
                    resource: "nofile".into(),
                    soft: v,
                    hard: v
                }]
            );
        }
    }
}

#[test]
fn named_integer_cases() {
    // rows 70000 does not fit a u16.
    assert_bad_payload(
        Kind::Exec,
        &with_key(Kind::Exec, "rows", mp::u32(70000)),
        "rows 70000",
    );
    assert_bad_payload(
        Kind::Resize,
        &with_key(Kind::Resize, "rows", mp::u32(70000)),
        "rows 70000",
    );
    // A negative value for a u32.
    assert_bad_payload(
        Kind::OutputAck,
        &mp::map(&[("bytes", mp::nfix(-1))]),
        "bytes -1",
    );
    assert_bad_payload(
        Kind::StdinAck,
        &mp::map(&[("bytes", mp::i32(-5))]),
        "bytes -5",
    );
    // u32::MAX + 1.
    assert_bad_payload(
        Kind::StdinAck,
        &mp::map(&[("bytes", mp::u64(1 << 32))]),
        "bytes 2^32",
    );
    // Negative signals are integers the decoder takes (the agent answers
    // invalid_signal).
    assert_eq!(
        decode(Kind::Signal, &mp::map(&[("signal", mp::nfix(-1))])),
        Ok(Message::Signal(Signal {
            signal: -1,
            group: true,
            tree: false
        }))
    );
}

// ---------------------------------------------------------------------------
// Wrong types.

#[test]
fn wrong_value_types_are_bad_payload() {
    let exec = |entries: &[(&str, Vec<u8>)]| {
        let mut all = vec![("cmd", mp::str("true"))];
        all.retain(|(k, _)| !entries.iter().any(|(e, _)| e == k));
        all.extend(entries.iter().cloned());
        mp::map(&all)
    };
    let entry = |resource: Vec<u8>, soft: Vec<u8>, hard: Vec<u8>| {
        mp::map(&[("resource", resource), ("soft", soft), ("hard", hard)])
    };
    let good_entry = || entry(mp::str("cpu"), mp::fix(1), mp::fix(2));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("cmd as integer", exec(&[("cmd", mp::fix(1))])),
        ("cmd as bin", exec(&[("cmd", mp::bin(b"true"))])),
        ("cmd as nil", exec(&[("cmd", mp::nil())])),
        (
            "cmd as array",
            exec(&[("cmd", mp::arr(&[mp::str("true")]))]),
        ),
        (
            "cmd invalid UTF-8",
            exec(&[("cmd", mp::str_bytes(b"tr\xffue"))]),
        ),
        ("rows as string", exec(&[("rows", mp::str("24"))])),
        ("rows as float", exec(&[("rows", mp::f32(24.0))])),
        ("rows as f64", exec(&[("rows", mp::f64(24.0))])),
        ("rows as bool", exec(&[("rows", mp::bool(true))])),
        ("rows as nil", exec(&[("rows", mp::nil())])),
        ("rows 70000", exec(&[("rows", mp::u32(70000))])),
        ("cols negative", exec(&[("cols", mp::nfix(-1))])),
        ("tty as integer", exec(&[("tty", mp::fix(1))])),
        ("tty as string", exec(&[("tty", mp::str("true"))])),
        ("stdin as nil", exec(&[("stdin", mp::nil())])),
        ("args as string", exec(&[("args", mp::str("-l"))])),
        (
            "args as map",
            exec(&[("args", mp::map(&[("0", mp::str("a"))]))]),
        ),
        ("args as nil", exec(&[("args", mp::nil())])),
        ("args as bin", exec(&[("args", mp::bin(b"ab"))])),
        (
            "args element integer",
            exec(&[("args", mp::arr(&[mp::fix(1)]))]),
        ),
        (
            "args element bin",
            exec(&[("args", mp::arr(&[mp::bin(b"a")]))]),
        ),
        ("args element nil", exec(&[("args", mp::arr(&[mp::nil()]))])),
        (
            "env element array",
            exec(&[("env", mp::arr(&[mp::arr(&[])]))]),
        ),
        ("cwd as nil", exec(&[("cwd", mp::nil())])),
        ("cwd as bin", exec(&[("cwd", mp::bin(b"/"))])),
        ("user as integer", exec(&[("user", mp::u16(1000))])),
        (
            "output_window float",
            exec(&[("output_window", mp::f64(1.0))]),
        ),
        ("linger_ms negative", exec(&[("linger_ms", mp::i8(-1))])),
        (
            "no_new_privs as integer",
            exec(&[("no_new_privs", mp::fix(0))]),
        ),
        ("rlimits as map", exec(&[("rlimits", good_entry())])),
        ("rlimits as nil", exec(&[("rlimits", mp::nil())])),
        (
            "rlimit entry as array",
            exec(&[(
                "rlimits",
                mp::arr(&[mp::arr(&[mp::str("cpu"), mp::fix(1), mp::fix(2)])]),
            )]),
        ),
        (
            "rlimit entry with integer keys",
            exec(&[(
                "rlimits",
                mp::arr(&[mp::raw_map(&[
                    (mp::fix(0), mp::str("cpu")),
                    (mp::fix(1), mp::fix(1)),
                    (mp::fix(2), mp::fix(2)),
                ])]),
            )]),
        ),
        (
            "rlimit entry with bin keys",
            exec(&[(
                "rlimits",
                mp::arr(&[mp::raw_map(&[
                    (mp::bin(b"resource"), mp::str("cpu")),
                    (mp::bin(b"soft"), mp::fix(1)),
                    (mp::bin(b"hard"), mp::fix(2)),
                ])]),
            )]),
        ),
        (
            "rlimit resource as bin",
            exec(&[(
                "rlimits",
                mp::arr(&[entry(mp::bin(b"cpu"), mp::fix(1), mp::fix(2))]),
            )]),
        ),
        (
            "rlimit soft negative",
            exec(&[(
                "rlimits",
                mp::arr(&[entry(mp::str("cpu"), mp::nfix(-1), mp::fix(2))]),
            )]),
        ),
        (
            "rlimit hard as string",
            exec(&[(
                "rlimits",
                mp::arr(&[entry(mp::str("cpu"), mp::fix(1), mp::str("2"))]),
            )]),
        ),
        (
            "rlimit without hard",
            exec(&[(
                "rlimits",
                mp::arr(&[mp::map(&[
                    ("resource", mp::str("cpu")),
                    ("soft", mp::fix(1)),
                ])]),
            )]),
        ),
        (
            "rlimit without resource",
            exec(&[(
                "rlimits",
                mp::arr(&[mp::map(&[("soft", mp::fix(1)), ("hard", mp::fix(1))])]),
            )]),
        ),
        (
            "rlimit soft twice",
            exec(&[(
                "rlimits",
                mp::arr(&[mp::map(&[
                    ("resource", mp::str("cpu")),
                    ("soft", mp::fix(1)),
                    ("soft", mp::fix(1)),
                    ("hard", mp::fix(1)),
                ])]),
            )]),
        ),
        (
            "rlimit entry nil",
            exec(&[("rlimits", mp::arr(&[mp::nil()]))]),
        ),
    ];
    for (what, p) in &cases {
        assert_bad_payload(Kind::Exec, p, what);
    }
    // The same rlimit entry is fine when well-formed, with unknown keys
    // (even repeated ones: unknown keys inside an entry are ignored).
    let ok = mp::map(&[
        ("resource", mp::str("cpu")),
        ("future", mp::nil()),
        ("soft", mp::fix(1)),
        ("future", mp::arr(&[])),
        ("hard", mp::fix(2)),
    ]);
    assert_eq!(
        exec_of(&exec(&[("rlimits", mp::arr(&[ok]))])).rlimits,
        [Rlimit {
            resource: "cpu".into(),
            soft: 1,
            hard: 2
        }]
    );
    // A resource name the contract does not list is still a string: the
    // agent, not the decoder, answers EXEC_FAILED invalid_request.
    let odd = entry(mp::str("bogus"), mp::fix(1), mp::fix(2));
    assert_eq!(
        exec_of(&exec(&[("rlimits", mp::arr(&[odd]))])).rlimits[0].resource,
        "bogus"
    );

    let others: Vec<(Kind, &str, Vec<u8>)> = vec![
        (
            Kind::Signal,
            "signal as string",
            mp::map(&[("signal", mp::str("TERM"))]),
        ),
        (
            Kind::Signal,
            "group as integer",
            mp::map(&[("signal", mp::fix(9)), ("group", mp::fix(1))]),
        ),
        (
            Kind::Signal,
            "signal 2^31",
            mp::map(&[("signal", mp::u32(1 << 31))]),
        ),
        (
            Kind::Shutdown,
            "grace_ms as string",
            mp::map(&[("grace_ms", mp::str("1"))]),
        ),
        (
            Kind::Shutdown,
            "grace_ms negative",
            mp::map(&[("grace_ms", mp::nfix(-1))]),
        ),
        (
            Kind::Resize,
            "cols as nil",
            with_key(Kind::Resize, "cols", mp::nil()),
        ),
        (
            Kind::StdinAck,
            "bytes as bool",
            mp::map(&[("bytes", mp::bool(false))]),
        ),
        (
            Kind::Started,
            "pid as string",
            mp::map(&[("pid", mp::str("1"))]),
        ),
        (
            Kind::Error,
            "frame_kind 256",
            with_key(Kind::Error, "frame_kind", mp::u16(256)),
        ),
        (
            Kind::Error,
            "frame_kind nil",
            with_key(Kind::Error, "frame_kind", mp::nil()),
        ),
        (
            Kind::Error,
            "kind as bin",
            with_key(Kind::Error, "kind", mp::bin(b"x")),
        ),
        (
            Kind::Error,
            "message as integer",
            with_key(Kind::Error, "message", mp::fix(0)),
        ),
        (
            Kind::ExecFailed,
            "errno as nil",
            with_key(Kind::ExecFailed, "errno", mp::nil()),
        ),
        (
            Kind::ExecFailed,
            "errno as string",
            with_key(Kind::ExecFailed, "errno", mp::str("2")),
        ),
        (
            Kind::ExecFailed,
            "stage as nil",
            with_key(Kind::ExecFailed, "stage", mp::nil()),
        ),
        (
            Kind::Exited,
            "code as nil",
            with_key(Kind::Exited, "code", mp::nil()),
        ),
        (
            Kind::Exited,
            "core_dumped as integer",
            with_key(Kind::Exited, "core_dumped", mp::fix(1)),
        ),
        (
            Kind::Exited,
            "status as float",
            with_key(Kind::Exited, "status", mp::f32(0.0)),
        ),
        (
            Kind::Ready,
            "agent as bin",
            with_key(Kind::Ready, "agent", mp::bin(b"a")),
        ),
        (
            Kind::Ready,
            "pid1 as integer",
            with_key(Kind::Ready, "pid1", mp::fix(1)),
        ),
        (
            Kind::Ready,
            "uptime_ms negative",
            with_key(Kind::Ready, "uptime_ms", mp::nfix(-1)),
        ),
        (
            Kind::Ready,
            "uptime_ms nil",
            with_key(Kind::Ready, "uptime_ms", mp::nil()),
        ),
    ];
    for (kind, what, p) in &others {
        assert_bad_payload(*kind, p, what);
    }
}

#[test]
fn malformed_maps_are_bad_payload_for_every_map_kind() {
    for (kind, keys) in required_keys() {
        let good = mp::map(&keys);
        decode(kind, &good).unwrap();
        let values: Vec<Vec<u8>> = keys.iter().map(|(_, v)| v.clone()).collect();
        let mut trailing = good.clone();
        trailing.push(0xc0);
        let mut second_map = good.clone();
        second_map.extend_from_slice(&good);
        let mut with_int_key: Vec<(Vec<u8>, Vec<u8>)> =
            keys.iter().map(|(k, v)| (mp::str(k), v.clone())).collect();
        with_int_key.push((mp::fix(0), mp::nil()));
        let mut with_bin_key: Vec<(Vec<u8>, Vec<u8>)> =
            keys.iter().map(|(k, v)| (mp::str(k), v.clone())).collect();
        with_bin_key.push((mp::bin(b"x"), mp::nil()));
        let mut with_nil_key = with_bin_key.clone();
        with_nil_key.last_mut().unwrap().0 = mp::nil();
        let mut with_map_key = with_bin_key.clone();
        with_map_key.last_mut().unwrap().0 = mp::map(&[]);
        let mut with_bad_utf8_key = with_bin_key.clone();
        with_bad_utf8_key.last_mut().unwrap().0 = mp::str_bytes(b"\xc3\x28");
        let mut duplicate_unknown = keys.clone();
        duplicate_unknown.push(("x", mp::nil()));
        duplicate_unknown.push(("x", mp::fix(1)));
        // The same key written once as fixstr and once as str8.
        let mut duplicate_widths: Vec<(Vec<u8>, Vec<u8>)> =
            keys.iter().map(|(k, v)| (mp::str(k), v.clone())).collect();
        duplicate_widths.push((mp::str_w("y", 0), mp::nil()));
        duplicate_widths.push((mp::str_w("y", 8), mp::nil()));
        let mut truncated = good.clone();
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("an array of the values", mp::arr(&values)),
            ("an empty array", mp::arr(&[])),
            ("nil", mp::nil()),
            ("an integer", mp::fix(0)),
            ("a string", mp::str("cmd")),
            ("bin", mp::bin(&good)),
            ("reserved byte 0xc1", vec![0xc1]),
            ("trailing nil", trailing),
            ("two maps", second_map),
            ("an integer key", mp::raw_map(&with_int_key)),
            ("a bin key", mp::raw_map(&with_bin_key)),
            ("a nil key", mp::raw_map(&with_nil_key)),
            ("a map key", mp::raw_map(&with_map_key)),
            ("an invalid UTF-8 key", mp::raw_map(&with_bad_utf8_key)),
            ("an unknown key twice", mp::map(&duplicate_unknown)),
            (
                "a key twice in two str widths",
                mp::raw_map(&duplicate_widths),
            ),
            ("a map announcing one entry more", {
                let mut v = good.clone();
                v[0] += 1;
                v
            }),
            ("a map16 announcing 65535 entries", {
                let mut v = vec![0xde, 0xff, 0xff];
                v.extend_from_slice(&good[1..]);
                v
            }),
            ("a map32 announcing 4G entries", {
                let mut v = vec![0xdf, 0xff, 0xff, 0xff, 0xff];
                v.extend_from_slice(&good[1..]);
                v
            }),
        ];
        if !keys.is_empty() {
            let (k, v) = &keys[0];
            let mut dup = keys.clone();
            dup.push((k, v.clone()));
            cases.push(("a known key twice", mp::map(&dup)));
        }
        // Every strict prefix of a non-empty map is truncated.
        while truncated.len() > 1 {
            truncated.pop();
            cases.push(("truncated", truncated.clone()));
        }
        for (what, p) in &cases {
            assert_bad_payload(kind, p, what);
        }
    }
}

#[test]
fn nesting_depth_is_bounded() {
    // The payload map is level 1; `levels` more arrays below it.
    let nested = |levels: usize, innermost: &[u8]| {
        let mut v = vec![0x91; levels - 1];
        if innermost.is_empty() {
            v.push(0x90);
        } else {
            v.push(0x91);
            v.extend_from_slice(innermost);
        }
        mp::map(&[("cmd", mp::str("x")), ("deep", v)])
    };
    assert_eq!(MAX_DEPTH, 32);
    // 31 arrays below the payload map: 32 levels, accepted.
    assert_eq!(exec_of(&nested(31, &[0x00])), Exec::new("x"));
    assert_eq!(exec_of(&nested(31, &[])), Exec::new("x"));
    // 32 arrays below it: 33 levels, refused, whether or not the deepest
    // container is empty.
    assert_bad_payload(Kind::Exec, &nested(32, &[0x00]), "33 levels");
    assert_bad_payload(Kind::Exec, &nested(32, &[]), "33 levels, empty");
    // Maps count as much as arrays.
    let mut maps = mp::map(&[]);
    for _ in 0..31 {
        maps = mp::map(&[("m", maps)]);
    }
    // `maps` is 32 maps deep: as a payload it is fine, one level more is not.
    assert!(check_map(&maps).is_ok());
    assert!(check_map(&mp::map(&[("m", maps.clone())])).is_err());
    // Far too deep, without exhausting the stack.
    let mut hostile = vec![0x81, 0xa1, b'x'];
    hostile.extend(std::iter::repeat_n(0x91, 500_000));
    hostile.push(0);
    assert_bad_payload(Kind::Exec, &hostile, "500000 levels");
}

#[test]
fn a_hostile_map_of_many_keys_is_checked_quickly() {
    // About 210,000 distinct 3-letter keys in 1 MiB, with one duplicate at
    // the end.
    const DIGITS: &[u8; 64] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_";
    let key = |n: u32| {
        [
            0xa3,
            DIGITS[(n >> 12) as usize % 64],
            DIGITS[(n >> 6) as usize % 64],
            DIGITS[n as usize % 64],
            0xc0,
        ]
    };
    let mut p = vec![0xdf, 0, 0, 0, 0];
    let mut n: u32 = 0;
    while p.len() + 10 < MAX_PAYLOAD {
        p.extend_from_slice(&key(n));
        n += 1;
    }
    assert!(n < 64 * 64 * 64);
    p.extend_from_slice(&key(0));
    n += 1;
    p[1..5].copy_from_slice(&n.to_be_bytes());
    assert!(p.len() <= MAX_PAYLOAD);
    let t = std::time::Instant::now();
    let err = check_map(&p).unwrap_err();
    assert!(err.contains("duplicate"), "{err}");
    // Without the duplicate it decodes (as an EXEC it lacks cmd).
    p.truncate(p.len() - 5);
    p[1..5].copy_from_slice(&(n - 1).to_be_bytes());
    assert!(check_map(&p).is_ok());
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
}

// ---------------------------------------------------------------------------
// Empty-payload kinds.

#[test]
fn empty_kinds_take_nothing_or_a_map() {
    for (kind, expect) in [
        (Kind::ShutdownDone, Message::ShutdownDone),
        (Kind::StdinClose, Message::StdinClose),
    ] {
        assert_eq!(kind.encoding(), Encoding::Empty);
        for p in [
            vec![],
            mp::map(&[]),
            mp::map(&[("anything", mp::fix(1)), ("else", mp::arr(&[mp::nil()]))]),
            vec![0xde, 0, 0],
        ] {
            assert_eq!(decode(kind, &p).as_ref(), Ok(&expect), "{p:02x?}");
        }
        for (what, p) in [
            ("an array", mp::arr(&[])),
            ("nil", mp::nil()),
            ("an integer", mp::fix(0)),
            ("raw bytes", b"hello".to_vec()),
            ("trailing bytes", vec![0x80, 0x00]),
            ("an integer key", mp::raw_map(&[(mp::fix(0), mp::nil())])),
            (
                "a key twice",
                mp::map(&[("a", mp::nil()), ("a", mp::nil())]),
            ),
            ("a truncated map", vec![0x81, 0xa1]),
        ] {
            assert_bad_payload(kind, &p, what);
        }
    }
}

// ---------------------------------------------------------------------------
// Raw payloads.

#[test]
fn ping_payload_limit() {
    let big = vec![0x55u8; MAX_PING_PAYLOAD + 1];
    for n in [0, 1, 100, MAX_PING_PAYLOAD] {
        let f = frame(Kind::Ping, 3, &big[..n]);
        assert_eq!(Message::decode_from_host(f), Ok(Message::Ping(&big[..n])));
    }
    let err = Message::decode_from_host(frame(Kind::Ping, 3, &big)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadPayload);
    assert!(matches!(
        err,
        ProtocolError::BadPayload {
            kind: Kind::Ping,
            ..
        }
    ));
    // Far over the limit, up to the frame limit.
    let huge = vec![0u8; MAX_PAYLOAD];
    assert_eq!(
        decode(Kind::Ping, &huge).unwrap_err().kind(),
        ErrorKind::BadPayload
    );
    // PONG, STDIN, STDOUT and STDERR take any raw payload up to the frame limit.
    for kind in [Kind::Pong, Kind::Stdin, Kind::Stdout, Kind::Stderr] {
        for n in [0, 1, MAX_PING_PAYLOAD + 1, MAX_PAYLOAD] {
            let m = decode(kind, &huge[..n]).unwrap();
            assert_eq!(m.kind(), kind);
        }
    }
}

#[test]
fn raw_payloads_are_borrowed_not_parsed() {
    // MessagePack-looking or invalid bytes are just bytes.
    let p = [0x81, 0xa3, b'c', b'm', b'd', 0xc1, 0xff];
    assert_eq!(decode(Kind::Stdin, &p), Ok(Message::Stdin(&p)));
    assert_eq!(decode(Kind::Stdout, &p), Ok(Message::Stdout(&p)));
    assert_eq!(decode(Kind::Stderr, &p), Ok(Message::Stderr(&p)));
    assert_eq!(decode(Kind::Ping, &p), Ok(Message::Ping(&p)));
    assert_eq!(decode(Kind::Pong, &p), Ok(Message::Pong(&p)));
    // Borrowed: the message points into the frame's payload.
    let Ok(Message::Stdin(b)) = decode(Kind::Stdin, &p) else {
        panic!()
    };
    assert_eq!(b.as_ptr(), p.as_ptr());
}

// ---------------------------------------------------------------------------
// Unknown kinds and directions.

#[test]
fn unknown_kinds() {
    for value in 0..=255u8 {
        if Kind::from_u8(value).is_some() {
            continue;
        }
        for payload in [&b""[..], &mp::map(&[])] {
            let f = codec::Frame {
                kind: value,
                id: 1,
                payload,
            };
            for result in [
                Message::decode(f),
                Message::decode_from_host(f),
                Message::decode_from_agent(f),
            ] {
                let err = result.unwrap_err();
                assert_eq!(err, ProtocolError::UnknownKind(value));
                assert_eq!(err.kind(), ErrorKind::UnknownKind);
                assert_eq!(err.kind().as_str(), "unknown_kind");
            }
        }
    }
}

#[test]
fn directions() {
    let samples = samples();
    for msg in &samples {
        let bytes = msg.to_bytes(5);
        let f: OwnedFrame = single_frame(&bytes);
        let kind = msg.kind();
        let (from_host, from_agent) = (
            Message::decode_from_host(f.as_frame()),
            Message::decode_from_agent(f.as_frame()),
        );
        match kind.direction() {
            Direction::HostToAgent => {
                assert_eq!(from_host.as_ref(), Ok(msg));
                assert_eq!(from_agent, Err(ProtocolError::WrongDirection(kind)));
            }
            Direction::AgentToHost => {
                assert_eq!(from_agent.as_ref(), Ok(msg));
                let err = from_host.unwrap_err();
                assert_eq!(err, ProtocolError::WrongDirection(kind));
                assert_eq!(err.kind().as_str(), "wrong_direction");
            }
        }
    }
    // The direction is checked before the payload: a STDOUT from the host
    // is wrong_direction, and so is an EXITED with a broken payload.
    assert_eq!(
        Message::decode_from_host(frame(Kind::Stdout, 1, b"x")),
        Err(ProtocolError::WrongDirection(Kind::Stdout))
    );
    assert_eq!(
        Message::decode_from_host(frame(Kind::Exited, 1, &[0xc1])),
        Err(ProtocolError::WrongDirection(Kind::Exited))
    );
    assert_eq!(
        Message::decode_from_agent(frame(Kind::Exec, 1, &[0xc1])),
        Err(ProtocolError::WrongDirection(Kind::Exec))
    );
    // And a PING over 4 KiB sent to the host is still wrong_direction.
    assert_eq!(
        Message::decode_from_agent(frame(Kind::Ping, 1, &[0; 5000])),
        Err(ProtocolError::WrongDirection(Kind::Ping))
    );
}

// ---------------------------------------------------------------------------
// Framing errors as ERROR kinds.

#[test]
fn frame_errors_map_onto_error_kinds() {
    let too_large = FrameError::TooLarge {
        kind: 0x20,
        id: 77,
        len: 5 + MAX_PAYLOAD as u32 + 1,
    };
    assert_eq!(too_large.id(), 77);
    assert_eq!(too_large.frame_kind(), Some(0x20));
    let e = ProtocolError::from(too_large);
    assert_eq!(e.kind(), ErrorKind::FrameTooLarge);
    assert_eq!(e.kind().as_str(), "frame_too_large");

    let malformed = FrameError::Malformed { len: 3 };
    assert_eq!(malformed.id(), 0);
    assert_eq!(malformed.frame_kind(), None);
    let e = ProtocolError::from(malformed);
    assert_eq!(e.kind(), ErrorKind::MalformedFrame);
    assert_eq!(e.kind().as_str(), "malformed_frame");

    // An ERROR answering a frame error, as the agent would build it.
    let answer = Message::Error(ErrorMsg::new(
        e.kind(),
        e.to_string(),
        malformed.frame_kind(),
    ));
    let f = single_frame(&answer.to_bytes(malformed.id()));
    assert_eq!(f.id, 0);
    let Message::Error(m) = Message::decode_from_agent(f.as_frame()).unwrap() else {
        panic!()
    };
    assert_eq!(m.error_kind(), Some(ErrorKind::MalformedFrame));
    assert_eq!(m.frame_kind, None);
}

#[test]
fn unknown_error_and_failure_kinds_still_decode() {
    // A newer agent's kinds reach the host as strings.
    let Ok(Message::Error(e)) = decode(
        Kind::Error,
        &mp::map(&[
            ("kind", mp::str("quota_exceeded")),
            ("message", mp::str("")),
        ]),
    ) else {
        panic!()
    };
    assert_eq!(e.kind, "quota_exceeded");
    assert_eq!(e.error_kind(), None);
    let Ok(Message::ExecFailed(f)) = decode(
        Kind::ExecFailed,
        &mp::map(&[("kind", mp::str("sandbox")), ("message", mp::str(""))]),
    ) else {
        panic!()
    };
    assert_eq!(f.failed_kind(), None);
    let Ok(Message::ExecFailed(f)) = decode(
        Kind::ExecFailed,
        &mp::map(&[("kind", mp::str("duplicate_id")), ("message", mp::str(""))]),
    ) else {
        panic!()
    };
    assert_eq!(f.failed_kind(), Some(ExecFailedKind::DuplicateId));
}

// ---------------------------------------------------------------------------
// What the encoder emits.

#[test]
fn encoder_is_canonical() {
    // Smallest integer widths, keys in declaration order, absent options
    // left out (never nil).
    let bytes = Message::Exited(Exited::from_code(300)).to_bytes(1);
    let expect = mp::map(&[
        ("code", mp::u16(300)),
        ("core_dumped", mp::bool(false)),
        ("status", mp::u16(300)),
    ]);
    assert_eq!(&bytes[9..], &expect[..]);
    let bytes = Message::Exited(Exited::from_code(-1)).to_bytes(1);
    let expect = mp::map(&[
        ("code", mp::nfix(-1)),
        ("core_dumped", mp::bool(false)),
        ("status", mp::nfix(-1)),
    ]);
    assert_eq!(&bytes[9..], &expect[..]);
    let bytes = Message::Signal(Signal {
        signal: -100,
        group: true,
        tree: false,
    })
    .to_bytes(1);
    let expect = mp::map(&[("signal", mp::i8(-100)), ("group", mp::bool(true))]);
    assert_eq!(&bytes[9..], &expect[..]);
    for (n, enc) in [
        (0u32, mp::fix(0)),
        (127, mp::fix(127)),
        (128, mp::u8(128)),
        (255, mp::u8(255)),
        (256, mp::u16(256)),
        (65535, mp::u16(65535)),
        (65536, mp::u32(65536)),
        (u32::MAX, mp::u32(u32::MAX)),
    ] {
        let bytes = Message::OutputAck(Ack { bytes: n }).to_bytes(1);
        assert_eq!(&bytes[9..], &mp::map(&[("bytes", enc)])[..], "{n}");
    }
    let bytes = Message::Ready(Ready {
        protocol: 1,
        agent: "a".repeat(40),
        pid: 1,
        pid1: false,
        max_payload: 0,
        stdin_window: 0,
        max_sessions: 0,
        uptime_ms: Some(u64::MAX),
        features: Vec::new(),
        realtime_ns: None,
        restores: None,
        clock_set: None,
        replay_bytes: None,
        cgroups: None,
        mounts: Vec::new(),
    })
    .to_bytes(0);
    assert!(bytes.ends_with(&[&mp::str("uptime_ms")[..], &mp::u64(u64::MAX)].concat()));
    assert!(bytes.windows(42).any(|w| w == mp::str(&"a".repeat(40))));
    assert_eq!(mp::str(&"a".repeat(40))[0], 0xd9);
}
