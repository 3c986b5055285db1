//! Golden vectors (tests/vectors/*.hex, format in tests/vectors/README.md):
//! each round-trip file decodes to the typed message built here, and
//! re-encodes to exactly the same bytes; each decode-only file (optional
//! keys left out) decodes to the message with every default written out
//! here as a literal, and re-encodes to the full form.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use agentd::codec::OwnedFrame;
use agentd::codec::MAX_PAYLOAD;
use agentd::messages::{
    Ack, Attach, AttachFailed, Attached, Clock, ClockMsg, ClockSet, ClockSetDone, Detached,
    Direction, EntropyDone, ErrorKind, ErrorMsg, Exec, ExecFailed, Exited, FsDone, FsEntries,
    FsEntry, FsError, FsEvent, FsEvents, FsMsg, FsOpened, FsRequest, FsStat, Kind, List, Message,
    MountStatus, NetClose, NetClosed, NetConnect, NetConnected, NetFailed, NetMsg, Ready, Resize,
    SessionInfo, Sessions, SessionsMsg, Shutdown, Signal, Started,
};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

/// Parses the hex format: pairs of hex digits, whitespace ignored, `#` to
/// the end of the line a comment.
pub fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let data = line.split('#').next().unwrap();
        for word in data.split_whitespace() {
            if word.len() % 2 != 0 {
                return Err(format!(
                    "line {}: odd number of hex digits in {word:?}",
                    n + 1
                ));
            }
            for pair in word.as_bytes().chunks(2) {
                let s = std::str::from_utf8(pair).map_err(|e| e.to_string())?;
                let b = u8::from_str_radix(s, 16)
                    .map_err(|_| format!("line {}: {s:?} is not a hex byte", n + 1))?;
                out.push(b);
            }
        }
    }
    Ok(out)
}

fn ready(pid: u32, pid1: bool, uptime_ms: Option<u64>) -> Ready {
    Ready {
        protocol: 1,
        agent: "agentd/0.1.0".into(),
        pid,
        pid1,
        max_payload: MAX_PAYLOAD as u32,
        stdin_window: 262_144,
        max_sessions: 1024,
        uptime_ms,
        features: Vec::new(),
        realtime_ns: None,
        restores: None,
        clock_set: None,
        replay_bytes: None,
        cgroups: None,
        mounts: Vec::new(),
    }
}

/// A stat record with every field set (a regular file of 5 bytes).
fn file_stat() -> FsStat {
    FsStat {
        kind: "file".into(),
        size: 5,
        mode: 0o644,
        uid: 1000,
        gid: 1000,
        mtime_ns: 1_700_000_000_123_456_789,
        atime_ns: 1_700_000_000_000_000_000,
        ctime_ns: 1_700_000_000_123_456_789,
        nlink: 1,
        ino: 131_074,
        target: None,
    }
}

fn exited_session(code: i32) -> Exited {
    Exited::from_code(code)
}

fn session_info(session: u64, state: &str, exit: Option<Exited>) -> SessionInfo {
    SessionInfo {
        session,
        tag: None,
        pid: 4242,
        cmd: "/bin/sh".into(),
        args: vec!["-c".into(), "make test".into()],
        user: None,
        tty: false,
        state: state.into(),
        attached: false,
        id: None,
        started_ms: 1_700_000_000_000,
        stdout_bytes: 1200,
        stderr_bytes: 0,
        exit,
    }
}

/// Every vector: file stem, frame id, the message it holds.
fn expected() -> Vec<(&'static str, u32, Message<'static>)> {
    let mut all = core_vectors();
    all.extend(extension_key_vectors());
    all.extend(fs_vectors());
    all.extend(net_vectors());
    all.extend(sessions_vectors());
    all.extend(clock_vectors());
    all
}

/// The keys the extensions add to the contract's messages.
fn extension_key_vectors() -> Vec<(&'static str, u32, Message<'static>)> {
    let mut booted = ready(1, true, Some(1234));
    let mut ready = ready(1, true, Some(1234));
    ready.features = vec!["fs".into(), "net".into(), "sessions".into(), "clock".into()];
    ready.realtime_ns = Some(1_700_000_000_000_000_000);
    ready.restores = Some(0);
    ready.clock_set = Some(true);
    ready.replay_bytes = Some(65536);
    ready.cgroups = Some(true);
    let mut exec = Exec::new("make");
    exec.args = vec!["test".into()];
    exec.tag = Some("ci-42".into());
    exec.replay_bytes = Some(1_048_576);
    exec.timeout_ms = Some(600_000);
    exec.kill_grace_ms = Some(5000);
    exec.detach = true;
    exec.memory_max = Some(536_870_912);
    exec.pids_max = Some(256);
    exec.cpu_max = Some("50000 100000".into());
    let timed_out = Exited {
        timed_out: true,
        ..Exited::from_signal(15, false)
    };
    let oom = Exited {
        oom_killed: true,
        ..Exited::from_signal(9, false)
    };
    let dropped = Exited {
        output_dropped: Some(70_000),
        ..Exited::from_code(0)
    };
    let mount = |source: &str, path: &str, fstype: &str, ro: bool| MountStatus {
        source: source.into(),
        path: path.into(),
        fstype: fstype.into(),
        ro,
        error: None,
        errno: None,
    };
    booted.mounts = vec![
        mount("/dev/vda", "/", "ext4", true),
        mount("overlay", "/", "overlay", false),
        MountStatus {
            error: Some("mount -t virtiofs work /srv/work: No such file or directory".into()),
            errno: Some(2),
            ..mount("work", "/srv/work", "virtiofs", false)
        },
    ];
    vec![
        ("ready-features", 0, Message::Ready(ready)),
        ("ready-mounts", 0, Message::Ready(booted)),
        ("exec-sessions-keys", 5, Message::Exec(Box::new(exec))),
        (
            "started-session",
            5,
            Message::Started(Started {
                pid: 4242,
                session: Some(17),
            }),
        ),
        (
            "signal-tree",
            5,
            Message::Signal(Signal {
                signal: 9,
                group: true,
                tree: true,
            }),
        ),
        ("exited-timed-out", 5, Message::Exited(timed_out)),
        ("exited-oom-killed", 5, Message::Exited(oom)),
        ("exited-output-dropped", 1, Message::Exited(dropped)),
    ]
}

fn fs_vectors() -> Vec<(&'static str, u32, Message<'static>)> {
    let read = FsRequest {
        window: Some(262_144),
        offset: Some(4096),
        length: Some(65536),
        ..FsRequest::new(agentd::messages::FsOp::Read, "/var/log/app.log")
    };
    let write = FsRequest {
        user: Some("1000:1000".into()),
        mode: Some(0o600),
        atomic: Some(true),
        parents: Some(true),
        ..FsRequest::new(agentd::messages::FsOp::Write, "/home/user/.config/app.toml")
    };
    let rename = FsRequest {
        to: Some("b.txt".into()),
        replace: Some(false),
        ..FsRequest::new(agentd::messages::FsOp::Rename, "a.txt")
    };
    let entries = FsEntries {
        entries: vec![
            FsEntry {
                name: "notes.txt".into(),
                name_bin: None,
                kind: "file".into(),
                stat: Some(file_stat()),
            },
            FsEntry {
                name: "caf\u{fffd}".into(),
                name_bin: Some(b"caf\xe9".to_vec()),
                kind: "dir".into(),
                stat: None,
            },
        ],
    };
    let events = FsEvents {
        events: vec![
            FsEvent {
                kind: "moved_from".into(),
                path: "src/old.rs".into(),
                dir: false,
                cookie: Some(77),
            },
            FsEvent {
                kind: "moved_to".into(),
                path: "src/new.rs".into(),
                dir: false,
                cookie: Some(77),
            },
            FsEvent {
                kind: "created".into(),
                path: "build".into(),
                dir: true,
                cookie: None,
            },
        ],
        overflow: true,
    };
    let link = FsStat {
        kind: "symlink".into(),
        size: 9,
        mode: 0o777,
        target: Some("notes.txt".into()),
        ..file_stat()
    };
    vec![
        ("fs-request-read", 3, fs(FsMsg::Request(Box::new(read)))),
        ("fs-request-write", 4, fs(FsMsg::Request(Box::new(write)))),
        ("fs-request-rename", 6, fs(FsMsg::Request(Box::new(rename)))),
        (
            "fs-opened",
            3,
            fs(FsMsg::Opened(FsOpened {
                stat: Some(file_stat()),
            })),
        ),
        ("fs-data", 3, fs(FsMsg::Data(b"hello"))),
        ("fs-data-ack", 3, fs(FsMsg::DataAck(Ack { bytes: 5 }))),
        ("fs-write", 4, fs(FsMsg::Write(b"x = 1\n"))),
        ("fs-write-ack", 4, fs(FsMsg::WriteAck(Ack { bytes: 6 }))),
        ("fs-end", 4, fs(FsMsg::End)),
        ("fs-entries", 8, fs(FsMsg::Entries(entries))),
        ("fs-events", 9, fs(FsMsg::Events(events))),
        (
            "fs-done-bytes",
            4,
            fs(FsMsg::Done(Box::new(FsDone {
                bytes: Some(6),
                ..FsDone::default()
            }))),
        ),
        (
            "fs-done-stat",
            10,
            fs(FsMsg::Done(Box::new(FsDone {
                stat: Some(link),
                ..FsDone::default()
            }))),
        ),
        (
            "fs-done-tar",
            11,
            fs(FsMsg::Done(Box::new(FsDone {
                bytes: Some(10240),
                entries: Some(3),
                ..FsDone::default()
            }))),
        ),
        ("fs-done-empty", 6, fs(FsMsg::Done(Box::default()))),
        (
            "fs-error",
            3,
            fs(FsMsg::Error(FsError {
                kind: "permission_denied".into(),
                message: "open /root/secret: Permission denied".into(),
                errno: Some(13),
                path: Some("/root/secret".into()),
            })),
        ),
        ("fs-cancel", 9, fs(FsMsg::Cancel)),
    ]
}

fn fs(m: FsMsg<'static>) -> Message<'static> {
    Message::Fs(m)
}

fn net(m: NetMsg<'static>) -> Message<'static> {
    Message::Net(m)
}

fn net_vectors() -> Vec<(&'static str, u32, Message<'static>)> {
    let tcp = NetConnect {
        timeout_ms: Some(5000),
        window: Some(262_144),
        ..NetConnect::tcp("127.0.0.1", 8080)
    };
    let unix = NetConnect {
        user: Some("app".into()),
        ..NetConnect::unix("/run/app.sock")
    };
    vec![
        ("net-connect-tcp", 12, net(NetMsg::Connect(Box::new(tcp)))),
        ("net-connect-unix", 13, net(NetMsg::Connect(Box::new(unix)))),
        (
            "net-connected",
            12,
            net(NetMsg::Connected(NetConnected {
                peer: "127.0.0.1:8080".into(),
                local: "127.0.0.1:41234".into(),
            })),
        ),
        (
            "net-failed",
            13,
            net(NetMsg::Failed(NetFailed {
                kind: "refused".into(),
                message: "connect to 127.0.0.1:9: Connection refused".into(),
                errno: Some(111),
            })),
        ),
        ("net-send", 12, net(NetMsg::Send(b"GET / HTTP/1.0\r\n\r\n"))),
        ("net-send-ack", 12, net(NetMsg::SendAck(Ack { bytes: 18 }))),
        ("net-recv", 12, net(NetMsg::Recv(b"HTTP/1.0 200 OK\r\n"))),
        ("net-recv-ack", 12, net(NetMsg::RecvAck(Ack { bytes: 17 }))),
        ("net-shutdown", 12, net(NetMsg::Shutdown)),
        ("net-eof", 12, net(NetMsg::Eof)),
        (
            "net-close-reset",
            12,
            net(NetMsg::Close(NetClose { reset: true })),
        ),
        ("net-closed", 12, net(NetMsg::Closed(NetClosed::default()))),
        (
            "net-closed-error",
            12,
            net(NetMsg::Closed(NetClosed {
                error: Some("reset".into()),
                message: Some("read: Connection reset by peer".into()),
                errno: Some(104),
            })),
        ),
    ]
}

fn sessions_vectors() -> Vec<(&'static str, u32, Message<'static>)> {
    let live = SessionInfo {
        tag: Some("ci-42".into()),
        attached: true,
        id: Some(5),
        ..session_info(17, "running", None)
    };
    let ended = SessionInfo {
        pid: 4300,
        stdout_bytes: 80,
        stderr_bytes: 12,
        ..session_info(18, "exited", Some(exited_session(2)))
    };
    let attach = Attach {
        tag: Some("ci-42".into()),
        tail: Some(4096),
        output_window: 65536,
        ..Attach::default()
    };
    let by_number = Attach {
        session: Some(17),
        stdout_from: Some(1000),
        stderr_from: Some(0),
        ..Attach::default()
    };
    vec![
        (
            "list-all",
            20,
            Message::Sessions(SessionsMsg::List(List { all: true })),
        ),
        (
            "sessions",
            20,
            Message::Sessions(SessionsMsg::Sessions(Sessions {
                sessions: vec![live, ended],
                more: false,
            })),
        ),
        (
            "attach-tag",
            21,
            Message::Sessions(SessionsMsg::Attach(Box::new(attach))),
        ),
        (
            "attach-session",
            22,
            Message::Sessions(SessionsMsg::Attach(Box::new(by_number))),
        ),
        (
            "attached",
            21,
            Message::Sessions(SessionsMsg::Attached(Attached {
                session: 17,
                pid: 4242,
                tty: false,
                stdout_from: 1000,
                stderr_from: 0,
                stdout_lost: 200,
                stderr_lost: 0,
                stdin: true,
            })),
        ),
        (
            "attach-failed",
            23,
            Message::Sessions(SessionsMsg::AttachFailed(AttachFailed {
                kind: "not_found".into(),
                message: "no session 99".into(),
            })),
        ),
        ("detach", 21, Message::Sessions(SessionsMsg::Detach)),
        (
            "detached",
            5,
            Message::Sessions(SessionsMsg::Detached(Detached {
                session: 17,
                reason: "attached_elsewhere".into(),
            })),
        ),
    ]
}

fn clock_vectors() -> Vec<(&'static str, u32, Message<'static>)> {
    vec![
        ("clock-get", 30, Message::Clock(ClockMsg::Get)),
        (
            "clock",
            30,
            Message::Clock(ClockMsg::Clock(Clock {
                realtime_ns: 1_700_000_000_000_000_000,
                boottime_ns: 12_345_678_901,
                restores: 1,
            })),
        ),
        (
            "clock-set",
            31,
            Message::Clock(ClockMsg::Set(ClockSet {
                realtime_ns: 1_764_662_400_000_000_000,
            })),
        ),
        (
            "clock-set-done",
            31,
            Message::Clock(ClockMsg::SetDone(ClockSetDone {
                old_ns: 1_700_000_000_000_000_000,
                new_ns: 1_764_662_400_000_000_123,
            })),
        ),
        (
            "entropy",
            32,
            Message::Clock(ClockMsg::Entropy(
                b"\x8f\x1e\x02\xc4\x77\x10\x9a\xbb\x00\x31\xfe\x5d\x64\x2a\xd0\x13",
            )),
        ),
        (
            "entropy-done",
            32,
            Message::Clock(ClockMsg::EntropyDone(EntropyDone { bytes: 16 })),
        ),
    ]
}

/// The contract's own vectors.
fn core_vectors() -> Vec<(&'static str, u32, Message<'static>)> {
    vec![
        ("ready", 0, Message::Ready(ready(1, true, Some(1234)))),
        (
            "ready-no-uptime",
            0,
            Message::Ready(ready(312, false, None)),
        ),
        ("ping", 0, Message::Ping(b"hello")),
        ("ping-empty", 7, Message::Ping(b"")),
        ("pong", 0, Message::Pong(b"hello")),
        ("pong-empty", 7, Message::Pong(b"")),
        (
            "shutdown",
            0,
            Message::Shutdown(Shutdown { grace_ms: 5000 }),
        ),
        ("shutdown-done", 0, Message::ShutdownDone),
        (
            "error-bad-payload",
            1,
            Message::Error(ErrorMsg::new(
                ErrorKind::BadPayload,
                "missing field `cmd`",
                Some(Kind::Exec as u8),
            )),
        ),
        (
            "error-malformed-frame",
            0,
            Message::Error(ErrorMsg::new(
                ErrorKind::MalformedFrame,
                "frame length 3 is shorter than the 5 bytes of kind and id",
                None,
            )),
        ),
        (
            "error-frame-too-large",
            9,
            Message::Error(ErrorMsg::new(
                ErrorKind::FrameTooLarge,
                "frame of 104857600 bytes exceeds the limit",
                Some(Kind::Stdin as u8),
            )),
        ),
        (
            "exec-minimal",
            1,
            Message::Exec(Box::new(Exec::new("true"))),
        ),
        (
            "exec-full",
            0x0102_0304,
            Message::Exec(Box::new(support::wire::full_exec())),
        ),
        (
            "started",
            1,
            Message::Started(Started {
                pid: 4242,
                session: None,
            }),
        ),
        (
            "exec-failed",
            2,
            Message::ExecFailed(ExecFailed {
                kind: "not_found".into(),
                message: "nosuchcmd: No such file or directory".into(),
                errno: Some(2),
                stage: Some("execve".into()),
            }),
        ),
        (
            "exec-failed-id-0",
            0,
            Message::ExecFailed(ExecFailed {
                kind: "invalid_request".into(),
                message: "session id 0 is reserved".into(),
                errno: None,
                stage: None,
            }),
        ),
        ("stdin", 1, Message::Stdin(b"echo hi\n")),
        ("stdin-empty", 1, Message::Stdin(b"")),
        ("stdin-close", 1, Message::StdinClose),
        ("stdin-ack", 1, Message::StdinAck(Ack { bytes: 8 })),
        (
            "resize",
            1,
            Message::Resize(Resize {
                rows: 50,
                cols: 132,
            }),
        ),
        (
            "signal",
            1,
            Message::Signal(Signal {
                signal: 15,
                group: true,
                tree: false,
            }),
        ),
        (
            "signal-process",
            1,
            Message::Signal(Signal {
                signal: 9,
                group: false,
                tree: false,
            }),
        ),
        ("output-ack", 1, Message::OutputAck(Ack { bytes: 65536 })),
        ("stdout", 1, Message::Stdout(b"hi\n")),
        (
            "stderr",
            1,
            Message::Stderr(b"\x00\xff\x1b[31merror\x1b[0m\n"),
        ),
        ("exited-code", 1, Message::Exited(Exited::from_code(3))),
        (
            "exited-signal",
            1,
            Message::Exited(Exited::from_signal(11, true)),
        ),
    ]
}

/// Every decode-only vector: file stem, frame id, the message it must
/// decode to, and the round-trip vector whose bytes re-encoding it gives
/// (if there is one). Defaults are spelled out as the contract's literal
/// values, not taken from the crate (`Exec::new`, `Default`), so a changed
/// default in the code fails here.
fn decode_only() -> Vec<(&'static str, u32, Message<'static>, Option<&'static str>)> {
    vec![
        (
            "exec-cmd-only",
            1,
            Message::Exec(Box::new(Exec {
                cmd: "true".into(),
                args: vec![],
                env: vec![],
                clear_env: false,
                cwd: None,
                user: None,
                tty: false,
                rows: 24,
                cols: 80,
                rlimits: vec![],
                stdin: true,
                output_window: 0,
                linger_ms: 100,
                no_new_privs: false,
                tag: None,
                replay_bytes: None,
                timeout_ms: None,
                kill_grace_ms: None,
                detach: false,
                memory_max: None,
                pids_max: None,
                cpu_max: None,
            })),
            Some("exec-minimal"),
        ),
        (
            "signal-no-group",
            1,
            Message::Signal(Signal {
                signal: 15,
                group: true,
                tree: false,
            }),
            Some("signal"),
        ),
        (
            "shutdown-empty-map",
            0,
            Message::Shutdown(Shutdown { grace_ms: 1000 }),
            None,
        ),
        (
            "shutdown-empty-payload",
            0,
            Message::Shutdown(Shutdown { grace_ms: 1000 }),
            None,
        ),
        (
            "net-close-empty",
            12,
            net(NetMsg::Close(NetClose { reset: false })),
            None,
        ),
        (
            "list-empty-payload",
            20,
            Message::Sessions(SessionsMsg::List(List { all: false })),
            None,
        ),
        (
            "attach-session-only",
            22,
            Message::Sessions(SessionsMsg::Attach(Box::new(Attach {
                session: Some(17),
                tag: None,
                stdout_from: None,
                stderr_from: None,
                tail: None,
                output_window: 0,
            }))),
            None,
        ),
        (
            "fs-event-no-dir",
            9,
            fs(FsMsg::Events(FsEvents {
                events: vec![FsEvent {
                    kind: "modified".into(),
                    path: "a.txt".into(),
                    dir: false,
                    cookie: None,
                }],
                overflow: false,
            })),
            None,
        ),
        (
            "exited-no-core-dumped",
            1,
            Message::Exited(Exited {
                code: Some(3),
                signal: None,
                core_dumped: false,
                status: 3,
                output_dropped: None,
                timed_out: false,
                oom_killed: false,
            }),
            Some("exited-code"),
        ),
    ]
}

/// The bytes of vector `name` and the one frame they hold.
fn load(name: &str) -> (Vec<u8>, OwnedFrame) {
    let path = dir().join(format!("{name}.hex"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    let bytes = parse_hex(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    let frame = support::wire::single_frame(&bytes);
    (bytes, frame)
}

/// Decodes `f` both undirected and as its direction's receiver would,
/// checks both give `msg`, and returns what was decoded.
fn check_decodes_to<'f>(name: &str, f: &'f OwnedFrame, id: u32, msg: &Message<'_>) -> Message<'f> {
    assert_eq!(f.kind, msg.kind() as u8, "{name}: kind");
    assert_eq!(f.id, id, "{name}: id");
    let decoded = Message::decode(f.as_frame()).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(&decoded, msg, "{name}: content");
    let directed = match msg.kind().direction() {
        Direction::HostToAgent => Message::decode_from_host(f.as_frame()),
        Direction::AgentToHost => Message::decode_from_agent(f.as_frame()),
    };
    assert_eq!(directed.as_ref(), Ok(msg), "{name}: directed decode");
    decoded
}

fn hex_files() -> BTreeSet<String> {
    std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".hex"))
        .map(|n| n.trim_end_matches(".hex").to_owned())
        .collect()
}

#[test]
fn every_vector_decodes_and_reencodes_exactly() {
    for (name, id, msg) in expected() {
        let (bytes, f) = load(name);
        let decoded = check_decodes_to(name, &f, id, &msg);

        let reencoded = decoded.to_bytes(f.id);
        assert_eq!(
            reencoded,
            bytes,
            "{name}: re-encoding differs\n ours: {}\n file: {}",
            hex(&reencoded),
            hex(&bytes)
        );
        assert_eq!(
            msg.to_bytes(id),
            bytes,
            "{name}: encoding the expected message"
        );
    }
}

/// Decode-only vectors decode to their defaults; re-encoding gives the full
/// form (the named round-trip vector where there is one), never the file's
/// own bytes: a file in canonical form would belong to the other class.
#[test]
fn decode_only_vectors_decode_to_the_defaults() {
    for (name, id, msg, full) in decode_only() {
        let (bytes, f) = load(name);
        let decoded = check_decodes_to(name, &f, id, &msg);

        let reencoded = decoded.to_bytes(f.id);
        assert_ne!(reencoded, bytes, "{name}: canonical, not decode-only");
        assert_eq!(reencoded, msg.to_bytes(id), "{name}: re-encoding");
        if let Some(full) = full {
            let (full_bytes, _) = load(full);
            assert_eq!(
                reencoded,
                full_bytes,
                "{name}: re-encoding is not {full}.hex\n ours: {}\n file: {}",
                hex(&reencoded),
                hex(&full_bytes)
            );
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn the_vector_set_is_complete() {
    let round_trip: BTreeSet<String> = expected().iter().map(|e| e.0.to_owned()).collect();
    assert_eq!(round_trip.len(), expected().len(), "a name listed twice");
    let only: BTreeSet<String> = decode_only().iter().map(|e| e.0.to_owned()).collect();
    assert_eq!(only.len(), decode_only().len(), "a name listed twice");
    assert!(round_trip.is_disjoint(&only), "a vector in both classes");
    let listed: BTreeSet<String> = round_trip.union(&only).cloned().collect();
    assert_eq!(hex_files(), listed, "files on disk vs vectors listed here");

    // Every kind has at least one round-trip vector.
    let kinds: BTreeSet<u8> = expected().iter().map(|e| e.2.kind() as u8).collect();
    let all: BTreeSet<u8> = Kind::ALL.iter().map(|&k| k as u8).collect();
    assert_eq!(kinds, all);

    // The README has exactly one line per file, and says "decode-only" in
    // exactly the lines of decode-only files.
    let readme = std::fs::read_to_string(dir().join("README.md")).unwrap();
    for name in &listed {
        let needle = format!("- `{name}.hex`:");
        let lines: Vec<&str> = readme.lines().filter(|l| l.starts_with(&needle)).collect();
        assert_eq!(lines.len(), 1, "README lines for {name}.hex");
        assert_eq!(
            lines[0].contains("decode-only"),
            only.contains(name),
            "README line of {name}.hex: decode-only or not"
        );
    }
    let described = readme
        .lines()
        .filter(|l| l.starts_with("- `") && l.contains(".hex`:"))
        .count();
    assert_eq!(
        described,
        listed.len(),
        "README describes files that do not exist"
    );
}

#[test]
fn hex_format() {
    assert_eq!(
        parse_hex("# comment\n00 0A\tff  # trailing\n\n  # indented comment\nAb01\n"),
        Ok(vec![0x00, 0x0a, 0xff, 0xab, 0x01])
    );
    assert!(parse_hex("0").is_err());
    assert!(parse_hex("0 0").is_err());
    assert!(parse_hex("zz").is_err());
    assert!(parse_hex("00 éé").is_err());
    assert_eq!(parse_hex("# only comments\n"), Ok(vec![]));
}
