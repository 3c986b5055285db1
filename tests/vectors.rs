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
    Ack, Direction, ErrorKind, ErrorMsg, Exec, ExecFailed, Exited, Kind, Message, Ready, Resize,
    Shutdown, Signal, Started,
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
    }
}

/// Every vector: file stem, frame id, the message it holds.
fn expected() -> Vec<(&'static str, u32, Message<'static>)> {
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
