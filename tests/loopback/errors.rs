//! Every ERROR kind of the contract, framing errors, and host garbage that
//! must neither stop the agent nor disturb other sessions (guarantee 6).

use std::time::Duration;

use agentd::codec::MAX_PAYLOAD;
use agentd::messages::{Kind, Message};

use crate::support::agent::*;
use crate::support::checker::*;
use crate::support::host::*;
use crate::support::msgpack::mp::{raw_map, str as s};
use crate::support::msgpack::*;
use crate::support::util::*;
use crate::support::wire::*;

/// A `cat` session that must come through everything untouched: returns
/// its id after checking it echoes.
fn start_witness(agent: &mut Agent) -> u32 {
    let id = agent.new_id();
    agent.exec(id, &cmd("cat", &[]));
    check_witness(agent, id, "first");
    id
}

/// The witness still echoes exactly what it is sent.
#[track_caller]
fn check_witness(agent: &mut Agent, id: u32, tag: &str) {
    let line = format!("witness {tag}\n");
    agent.send_stdin(id, line.as_bytes());
    let mut got = Vec::new();
    while got.len() < line.len() {
        let f = agent.recv_where(|f| f.id == id && f.kind == STDOUT, "witness echo");
        got.extend_from_slice(&f.payload);
    }
    assert_eq!(String::from_utf8_lossy(&got), line);
}

#[track_caller]
fn finish_witness(agent: &mut Agent, id: u32) {
    agent.send_stdin_close(id);
    let out = agent.collect(id);
    out.assert_success();
    assert!(out.stderr.is_empty());
}

#[test]
fn malformed_frame_len_below_5_is_skipped_and_the_stream_stays_in_step() {
    let mut agent = Agent::start();
    let w = start_witness(&mut agent);
    for len in 0u32..5 {
        // `len` bytes follow the length field and must be discarded. Make
        // them look like the start of a PING, so a decoder that does not
        // skip exactly `len` bytes goes out of step.
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(PING, len as usize));
        agent.send_raw(&bytes);
        agent.expect_error_kind(0, "malformed_frame", None);
        agent.ping();
    }
    check_witness(&mut agent, w, "after malformed");
    finish_witness(&mut agent, w);
    agent.assert_no_errors();
}

#[test]
fn frame_too_large_answers_with_the_frames_id_then_skips_exactly_len() {
    let mut agent = Agent::start();
    let w = start_witness(&mut agent);
    let payload_len = MAX_PAYLOAD + 1;
    let len = 5 + payload_len as u32;
    agent.send_raw(&raw_frame(len, STDIN, 42, &[]));
    // The agent answers on the header alone (the payload is streamed and
    // never buffered, so it cannot wait for it).
    let e = agent.expect_error_kind(42, "frame_too_large", Some(STDIN));
    assert_eq!(e.id, 42);
    // The skipped bytes are full of PING frames: if the agent took any of
    // them as frames, it would answer with a PONG.
    let mut inner = Vec::new();
    while inner.len() < payload_len {
        append_bait_ping(&mut inner);
    }
    inner.truncate(payload_len);
    for chunk in inner.chunks(64 * 1024) {
        agent.send_raw(chunk);
    }
    agent.ping();
    let pongs = agent.take_stashed(|f| f.kind == PONG);
    assert!(
        pongs.is_empty(),
        "bytes inside the oversized frame were parsed as frames"
    );
    check_witness(&mut agent, w, "after oversized");

    // An oversized frame addressed to a live session does not end it.
    agent.send_raw(&raw_frame(len, STDIN, w, &[]));
    agent.expect_error_kind(w, "frame_too_large", Some(STDIN));
    agent.send_raw(&vec![b'x'; payload_len]);
    check_witness(&mut agent, w, "after oversized to it");
    finish_witness(&mut agent, w);

    // u32::MAX length: the reply comes from the header alone.
    agent.send_raw(&raw_frame(u32::MAX, PING, 77, &[]));
    agent.expect_error_kind(77, "frame_too_large", Some(PING));
}

/// Appends a small PING frame (bait inside bytes that must be skipped).
fn append_bait_ping(out: &mut Vec<u8>) {
    agentd::codec::append_raw(out, PING, 1, b"inside").expect("the test's frames fit");
}

#[test]
fn a_frame_of_exactly_max_payload_is_valid() {
    let mut agent = Agent::start();
    // len = 5 + MAX_PAYLOAD is valid: the frame is decoded and, being a
    // STDIN for no session, answered with unknown_session, not
    // frame_too_large.
    agent.send_frame(STDIN, 31337, &vec![0u8; MAX_PAYLOAD]);
    agent.expect_error_kind(31337, "unknown_session", Some(STDIN));
    // PING with a 1 MiB payload: a valid frame, but over PING's 4 KiB.
    agent.send_frame(PING, 5, &vec![1u8; MAX_PAYLOAD]);
    agent.expect_error_kind(5, "bad_payload", Some(PING));
    agent.assert_no_errors();
}

#[test]
fn oversized_frames_are_not_buffered() {
    let mut agent = Agent::start();
    agent.ping();
    let before = agent.rss_kib();
    let payload_len: usize = 64 << 20;
    agent.send_raw(&raw_frame(5 + payload_len as u32, STDOUT, 3, &[]));
    agent.expect_error_kind(3, "frame_too_large", Some(STDOUT));
    let chunk = vec![0xabu8; 1 << 20];
    let mut peak = before;
    for i in 0..payload_len / chunk.len() {
        agent.send_raw(&chunk);
        if i % 8 == 0 {
            peak = peak.max(agent.rss_kib());
        }
    }
    agent.ping();
    peak = peak.max(agent.rss_kib());
    assert!(
        peak < before + 8 * 1024,
        "agent RSS grew from {before} KiB to {peak} KiB while skipping a 64 MiB frame"
    );
}

#[test]
fn unknown_kind() {
    let mut agent = Agent::start();
    let w = start_witness(&mut agent);
    // Gaps in the contract's table and in the served extensions' blocks.
    for (i, kind) in [0x00u8, 0x07, 0x13, 0x26, 0x33, 0x4f, 0x5f, 0x7f, 0xff]
        .into_iter()
        .enumerate()
    {
        let id = 500 + i as u32;
        agent.send_frame(kind, id, b"\x80");
        let e = agent.expect_error_kind(id, "unknown_kind", Some(kind));
        assert_eq!(e.id, id);
    }
    // Unknown kind addressed to the live session.
    agent.send_frame(0x3f, w, b"junk");
    agent.expect_error_kind(w, "unknown_kind", Some(0x3f));
    check_witness(&mut agent, w, "after unknown kinds");
    finish_witness(&mut agent, w);
}

#[test]
fn wrong_direction_for_every_agent_to_host_kind() {
    let mut agent = Agent::start();
    let w = start_witness(&mut agent);
    let agent_kinds: Vec<Kind> = Kind::ALL
        .iter()
        .copied()
        .filter(|k| k.direction() == agentd::messages::Direction::AgentToHost)
        // The contract's own kinds: an extension's are unknown until served.
        .filter(|k| k.feature().is_none())
        .collect();
    assert_eq!(agent_kinds.len(), 10);
    for k in &agent_kinds {
        // A plausible payload of that kind, so only the direction is wrong.
        let payload: Vec<u8> = match k {
            Kind::Stdout | Kind::Stderr | Kind::Pong => b"data".to_vec(),
            Kind::ShutdownDone => Vec::new(),
            Kind::StdinAck => Value::map([("bytes", Value::int(1))]).encode(),
            Kind::Started => Value::map([("pid", Value::int(1))]).encode(),
            Kind::Exited => Value::map([
                ("code", Value::int(0)),
                ("core_dumped", Value::Bool(false)),
                ("status", Value::int(0)),
            ])
            .encode(),
            _ => Value::map([("kind", Value::str("other")), ("message", Value::str("x"))]).encode(),
        };
        agent.send_frame(*k as u8, 3, &payload);
        agent.expect_error_kind(3, "wrong_direction", Some(*k as u8));
        // Addressed to the live session: nothing reaches it.
        agent.send_frame(*k as u8, w, &payload);
        agent.expect_error_kind(w, "wrong_direction", Some(*k as u8));
    }
    // STDOUT sent by the host to a live session is not echoed as output.
    check_witness(&mut agent, w, "after wrong directions");
    finish_witness(&mut agent, w);
}

/// Map payloads that are not what their kind needs.
fn bad_payloads() -> Vec<(u8, &'static str, Vec<u8>)> {
    let m = |pairs: Vec<(&'static str, Value)>| Value::map(pairs).encode();
    vec![
        (EXEC, "empty map (cmd missing)", Vec::new()),
        (EXEC, "cmd missing", m(vec![("args", Value::Array(vec![]))])),
        (EXEC, "cmd an integer", m(vec![("cmd", Value::int(5))])),
        (
            EXEC,
            "args a string",
            m(vec![("cmd", Value::str("sh")), ("args", Value::str("-c"))]),
        ),
        (
            EXEC,
            "args of integers",
            m(vec![
                ("cmd", Value::str("sh")),
                ("args", Value::Array(vec![Value::int(1)])),
            ]),
        ),
        (
            EXEC,
            "env a map",
            m(vec![
                ("cmd", Value::str("sh")),
                ("env", Value::map([("A", Value::str("1"))])),
            ]),
        ),
        (
            EXEC,
            "tty a string",
            m(vec![("cmd", Value::str("sh")), ("tty", Value::str("yes"))]),
        ),
        (
            EXEC,
            "rows negative",
            m(vec![("cmd", Value::str("sh")), ("rows", Value::int(-1))]),
        ),
        (
            EXEC,
            "rows over u16",
            m(vec![("cmd", Value::str("sh")), ("rows", Value::int(70000))]),
        ),
        (
            EXEC,
            "rlimits entry missing hard",
            m(vec![
                ("cmd", Value::str("sh")),
                (
                    "rlimits",
                    Value::Array(vec![Value::map([
                        ("resource", Value::str("nofile")),
                        ("soft", Value::int(1)),
                    ])]),
                ),
            ]),
        ),
        (
            EXEC,
            "an array, not a map",
            Value::Array(vec![Value::str("sh")]).encode(),
        ),
        (EXEC, "a string, not a map", Value::str("sh").encode()),
        (EXEC, "integer key", vec![0x81, 0x00, 0xa2, b's', b'h']),
        (EXEC, "truncated map", vec![0x82, 0xa3, b'c', b'm', b'd']),
        (EXEC, "bytes after the map", {
            let mut v = m(vec![("cmd", Value::str("true"))]);
            v.push(0xc0);
            v
        }),
        (EXEC, "reserved byte 0xc1", vec![0xc1]),
        (
            EXEC,
            "not MessagePack at all",
            b"{\"cmd\": \"sh\"}".to_vec(),
        ),
        (SIGNAL, "signal missing", Vec::new()),
        (
            SIGNAL,
            "signal a string",
            m(vec![("signal", Value::str("TERM"))]),
        ),
        (
            SIGNAL,
            "group an integer",
            m(vec![("signal", Value::int(15)), ("group", Value::int(1))]),
        ),
        (RESIZE, "cols missing", m(vec![("rows", Value::int(24))])),
        (
            RESIZE,
            "rows a string",
            m(vec![("rows", Value::str("24")), ("cols", Value::int(80))]),
        ),
        (OUTPUT_ACK, "bytes missing", Vec::new()),
        (
            OUTPUT_ACK,
            "bytes negative",
            m(vec![("bytes", Value::int(-5))]),
        ),
        (
            SHUTDOWN,
            "grace_ms a string",
            m(vec![("grace_ms", Value::str("soon"))]),
        ),
        (SHUTDOWN, "not a map", vec![0x91, 0x00]),
    ]
}

#[test]
fn bad_payload() {
    let mut agent = Agent::start();
    let w = start_witness(&mut agent);
    for (i, (kind, what, payload)) in bad_payloads().into_iter().enumerate() {
        // Session frames go to the live witness (a bad payload must not
        // touch it); EXEC and SHUTDOWN to ids of their own.
        let id = match kind {
            SHUTDOWN => 0,
            EXEC => 600 + i as u32,
            _ => w,
        };
        agent.send_frame(kind, id, &payload);
        let e = agent.expect_error(id);
        assert_eq!(e.kind, "bad_payload", "{what}: {e:?}");
        if let Some(fk) = e.frame_kind {
            assert_eq!(fk, kind, "{what}: {e:?}");
        }
    }
    // PING over 4 KiB.
    agent.send_frame(PING, 9, &vec![7u8; 4097]);
    agent.expect_error_kind(9, "bad_payload", Some(PING));
    // None of the bad EXECs started anything or took its id, and the bad
    // SHUTDOWNs shut nothing down.
    agent.ping();
    let replies = agent.take_stashed(|f| f.kind == STARTED || f.kind == EXEC_FAILED);
    assert!(
        replies.is_empty(),
        "a bad EXEC got a STARTED or EXEC_FAILED"
    );
    let id = 600;
    agent.exec(id, &cmd("true", &[]));
    agent.collect(id).assert_success();
    check_witness(&mut agent, w, "after bad payloads");
    finish_witness(&mut agent, w);
    agent.assert_no_errors();
}

/// Strings of EXEC are MessagePack str; a bin in their place is a value
/// of the wrong type (the contract keeps bin for byte strings).
#[test]
fn bad_payload_bin_where_str_is_required() {
    let mut agent = Agent::start();
    let bin = |s: &str| Value::Bin(s.as_bytes().to_vec());
    let cases: Vec<(&str, Vec<(&str, Value)>)> = vec![
        ("cmd", vec![("cmd", bin("true"))]),
        (
            "args",
            vec![
                ("cmd", Value::str("true")),
                ("args", Value::Array(vec![bin("x")])),
            ],
        ),
        (
            "env",
            vec![
                ("cmd", Value::str("true")),
                ("env", Value::Array(vec![bin("A=1")])),
            ],
        ),
        ("cwd", vec![("cmd", Value::str("true")), ("cwd", bin("/"))]),
        (
            "user",
            vec![("cmd", Value::str("true")), ("user", bin("nobody"))],
        ),
        (
            "rlimits resource",
            vec![
                ("cmd", Value::str("true")),
                (
                    "rlimits",
                    Value::Array(vec![Value::map([
                        ("resource", bin("core")),
                        ("soft", Value::int(0)),
                        ("hard", Value::int(0)),
                    ])]),
                ),
            ],
        ),
    ];
    let mut accepted = Vec::new();
    for (i, (field, mut pairs)) in cases.into_iter().enumerate() {
        let id = 700 + i as u32;
        pairs.push(("stdin", Value::Bool(false)));
        // Tracked as an EXEC, so a STARTED is a wrong answer rather than a
        // protocol violation of its own.
        agent.send_exec_payload(id, &Value::map(pairs).encode());
        let f = agent.recv_where(
            |f| f.id == id && matches!(f.kind, ERROR | STARTED | EXEC_FAILED),
            "the reply to EXEC",
        );
        match f.kind {
            ERROR => assert_eq!(error_info(&f).kind, "bad_payload", "{field}"),
            STARTED => {
                agent.collect(id);
                accepted.push(format!("{field} (STARTED)"));
            }
            _ => accepted.push(format!("{field} (EXEC_FAILED)")),
        }
    }
    assert!(
        accepted.is_empty(),
        "EXEC with a bin where a str is required was not answered with ERROR bad_payload: {accepted:?}"
    );
}

#[test]
fn unknown_session() {
    let mut agent = Agent::start();
    let w = start_witness(&mut agent);
    let frames: Vec<(u8, Vec<u8>)> = vec![
        (STDIN, b"data".to_vec()),
        (STDIN_CLOSE, Vec::new()),
        (
            RESIZE,
            Message::Resize(agentd::messages::Resize { rows: 1, cols: 1 }).to_bytes(0)[9..]
                .to_vec(),
        ),
        (SIGNAL, Value::map([("signal", Value::int(9))]).encode()),
        (OUTPUT_ACK, Value::map([("bytes", Value::int(1))]).encode()),
    ];
    for id in [999u32, 0, u32::MAX] {
        for (kind, payload) in &frames {
            agent.send_frame(*kind, id, payload);
            let e = agent.expect_error_kind(id, "unknown_session", Some(*kind));
            assert_eq!(e.id, id);
        }
    }
    // A finished session's id is unknown again.
    let id = agent.new_id();
    agent.exec(id, &cmd("true", &[]));
    agent.collect(id);
    agent.send_signal(id, 9, true);
    agent.expect_error_kind(id, "unknown_session", Some(SIGNAL));
    agent.send_stdin(id, b"late");
    agent.expect_error_kind(id, "unknown_session", Some(STDIN));
    check_witness(&mut agent, w, "after unknown sessions");
    finish_witness(&mut agent, w);
}

#[test]
fn not_a_tty() {
    let mut agent = Agent::start();
    let w = start_witness(&mut agent);
    agent.send_resize(w, 50, 132);
    let e = agent.expect_error_kind(w, "not_a_tty", Some(RESIZE));
    assert_eq!(e.id, w);
    check_witness(&mut agent, w, "after RESIZE");
    finish_witness(&mut agent, w);
}

#[test]
fn invalid_signal() {
    let mut agent = Agent::start();
    let w = start_witness(&mut agent);
    for sig in [65, -1, 1000, i32::MIN, i32::MAX] {
        agent.send_signal(w, sig, true);
        agent.expect_error_kind(w, "invalid_signal", Some(SIGNAL));
        agent.send_signal(w, sig, false);
        agent.expect_error_kind(w, "invalid_signal", Some(SIGNAL));
    }
    check_witness(&mut agent, w, "after invalid signals");
    agent.send_signal(w, 9, true);
    assert_eq!(agent.collect(w).exit, ExitInfo::signal(9));
}

#[test]
fn window_exceeded_drops_the_frame() {
    let mut agent = Agent::start_args(&["--stdin-window", "4096"]);
    assert_eq!(
        agent.stdin_window(),
        4096,
        "READY stdin_window: {:?}",
        agent.ready
    );
    let id = agent.new_id();
    agent.exec(id, &cmd("cat", &[]));
    agent.send_stdin(id, &[b'A'; 4097]);
    agent.expect_error_kind(id, "window_exceeded", Some(STDIN));
    // Exactly the window is fine.
    agent.send_stdin(id, &[b'B'; 4096]);
    agent.send_stdin_close(id);
    let out = agent.collect(id);
    out.assert_success();
    // The dropped frame never reached the child.
    assert_eq!(out.stdout, vec![b'B'; 4096]);
    assert_eq!(out.acked, 4096);
    agent.assert_no_errors();
}

#[test]
fn window_exceeded_counts_unacknowledged_bytes() {
    let mut agent = Agent::start_args(&["--stdin-window", "4096"]);
    let id = agent.new_id();
    // A child that never reads: the pipe fills, then acks stop.
    agent.exec(id, &cmd("sleep", &["100"]));
    let mut sent = 0u64;
    let mut acked = 0u64;
    loop {
        if sent - acked + 4096 <= 4096 {
            agent.send_stdin(id, &[0u8; 4096]);
            sent += 4096;
        }
        match agent.recv_where_within(
            &|f| f.id == id && f.kind == STDIN_ACK,
            Duration::from_millis(1000),
        ) {
            Some(f) => acked += ack_bytes(&f),
            None => break,
        }
        assert!(
            sent < 16 << 20,
            "acks never stopped for a child that does not read"
        );
    }
    // Now `sent - acked` bytes are outstanding; one byte more than the
    // window allows is refused.
    let outstanding = sent - acked;
    assert!(outstanding <= 4096);
    let room = 4096 - outstanding;
    agent.send_stdin(id, &vec![1u8; room as usize + 1]);
    agent.expect_error_kind(id, "window_exceeded", Some(STDIN));
    if room > 0 {
        agent.send_stdin(id, &vec![1u8; room as usize]);
        agent.assert_no_errors();
    }
    agent.send_signal(id, 9, true);
    assert_eq!(agent.collect(id).exit, ExitInfo::signal(9));
}

#[test]
fn window_exceeded_with_the_default_window() {
    let mut agent = Agent::start();
    let window = agent.stdin_window() as usize;
    assert!(
        window < MAX_PAYLOAD,
        "window {window} too large to overrun in one frame"
    );
    let id = agent.new_id();
    agent.exec(id, &cmd("wc", &["-c"]));
    agent.send_stdin(id, &vec![b'x'; window + 1]);
    agent.expect_error_kind(id, "window_exceeded", Some(STDIN));
    agent.send_stdin_close(id);
    let out = agent.collect(id);
    assert_eq!(out.stdout_str().trim(), "0");
}

#[test]
fn stdin_closed() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    agent.exec(id, &sh("cat; echo closed; exec sleep 100"));
    agent.send_stdin(id, b"before\n");
    agent.send_stdin_close(id);
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("closed") {
        let f = agent.recv_where(|f| f.id == id && f.kind == STDOUT, "STDOUT");
        got.extend_from_slice(&f.payload);
    }
    assert_eq!(String::from_utf8_lossy(&got), "before\nclosed\n");
    agent.send_stdin(id, b"after\n");
    let e = agent.expect_error_kind(id, "stdin_closed", Some(STDIN));
    assert_eq!(e.id, id);
    // ERROR never ends a session by itself.
    agent.send_signal(id, 15, true);
    let out = agent.collect(id);
    assert_eq!(out.exit, ExitInfo::signal(15));
    assert!(out.stdout.is_empty());
}

#[test]
fn stdin_closed_even_before_the_close_is_carried_out() {
    // STDIN_CLOSE is queued behind bytes the child has not read yet; a
    // STDIN after it is refused all the same.
    let mut agent = Agent::start();
    let id = agent.new_id();
    agent.exec(id, &sh("sleep 0.3; wc -c"));
    agent.send_stdin(id, &[b'z'; 100_000]);
    agent.send_stdin_close(id);
    agent.send_stdin(id, b"more");
    agent.expect_error_kind(id, "stdin_closed", Some(STDIN));
    let out = agent.collect(id);
    out.assert_success();
    assert_eq!(out.stdout_str().trim(), "100000");
}

#[test]
fn garbage_never_stops_the_agent_or_disturbs_a_session() {
    let mut agent = Agent::start();
    let w = start_witness(&mut agent);
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut expected_replies = 0usize;
    let mut echo = Vec::new();
    for round in 0..2000u32 {
        let mut bytes = Vec::new();
        match rng.below(10) {
            // A length below 5, with its bytes.
            0 => {
                let len = rng.below(5) as u32;
                bytes.extend_from_slice(&len.to_be_bytes());
                for _ in 0..len {
                    bytes.push(rng.next() as u8);
                }
            }
            // Any kind but EXEC, SHUTDOWN and the extensions' requests
            // (which could legitimately start or stop something, and
            // answer with their own frames), random payload, never the
            // witness's id.
            _ => {
                let requests = [
                    Kind::FsRequest,
                    Kind::NetConnect,
                    Kind::List,
                    Kind::Attach,
                    Kind::ClockGet,
                    Kind::ClockSet,
                    Kind::Entropy,
                ];
                let kind = loop {
                    let k = rng.next() as u8;
                    if k != EXEC && k != SHUTDOWN && !requests.iter().any(|r| *r as u8 == k) {
                        break k;
                    }
                };
                let id = loop {
                    let i = match rng.below(3) {
                        0 => 0,
                        1 => rng.below(2000) as u32,
                        _ => rng.next() as u32,
                    };
                    if i != w {
                        break i;
                    }
                };
                let n = match rng.below(4) {
                    0 => 0,
                    1 => rng.below(16),
                    2 => rng.below(300),
                    _ => rng.below(5000),
                } as usize;
                let mut payload: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                if rng.below(3) == 0 && !payload.is_empty() {
                    // A map header in front, to get past the first check.
                    payload[0] = 0x80 | (rng.below(4) as u8);
                }
                agentd::codec::append_raw(&mut bytes, kind, id, &payload)
                    .expect("the test's frames fit");
            }
        }
        // Every garbage frame gets exactly one answer: an ERROR, or a PONG
        // for a PING of at most 4 KiB.
        expected_replies += 1;
        agent.send_raw(&bytes);
        if round % 100 == 0 {
            let line = format!("round {round}\n");
            agent.send_stdin(w, line.as_bytes());
            echo.extend_from_slice(line.as_bytes());
        }
    }
    agent.send_stdin_close(w);
    let out = agent.collect(w);
    out.assert_success();
    assert_eq!(out.stdout_str(), String::from_utf8_lossy(&echo));
    agent.ping();
    let replies =
        agent.take_stashed(|f| f.kind == ERROR || (f.kind == PONG && f.payload.len() <= 4096));
    // The barrier PING's own PONG was consumed by ping().
    assert_eq!(
        replies.len(),
        expected_replies,
        "one reply per garbage frame"
    );
    agent.assert_no_errors();
}

/// `depth` nested arrays around an integer.
fn nested(depth: usize) -> Vec<u8> {
    let mut v = vec![0x91; depth];
    v.push(0x00);
    v
}

/// The payload rules docs/PROTOCOL.md decides where the contract's one
/// sentence leaves room: duplicate keys, nesting depth, what an ignored
/// value may be, rlimit items, the order of checks.
#[test]
fn payload_rules_of_the_projects_protocol_document() {
    let mut agent = Agent::start();
    let cmd_true = (s("cmd"), s("true"));
    let no_stdin = (s("stdin"), vec![0xc2]);
    let rlimits = |item: Vec<u8>| (s("rlimits"), [vec![0x91], item].concat());
    let bad: Vec<(&str, Vec<u8>)> = vec![
        (
            "a known key twice",
            raw_map(&[cmd_true.clone(), (s("cmd"), s("false"))]),
        ),
        (
            "a key twice, fixstr and str 8",
            raw_map(&[
                cmd_true.clone(),
                (vec![0xd9, 3, b'c', b'm', b'd'], s("true")),
            ]),
        ),
        (
            "an unknown key twice",
            raw_map(&[cmd_true.clone(), (s("x"), vec![1]), (s("x"), vec![2])]),
        ),
        (
            "a key with invalid UTF-8",
            raw_map(&[cmd_true.clone(), (vec![0xa2, 0xff, 0xfe], vec![1])]),
        ),
        (
            "a bin key",
            raw_map(&[cmd_true.clone(), (vec![0xc4, 1, b'x'], vec![1])]),
        ),
        (
            "a nil key",
            raw_map(&[cmd_true.clone(), (vec![0xc0], vec![1])]),
        ),
        // The payload map is level 1: an array at level 33 is too deep.
        (
            "level 33 inside an ignored value",
            raw_map(&[cmd_true.clone(), (s("x"), nested(32))]),
        ),
        (
            "rlimit item as an array",
            raw_map(&[
                cmd_true.clone(),
                rlimits(vec![0x93, 0xa4, b'c', b'o', b'r', b'e', 0, 0]),
            ]),
        ),
        (
            "rlimit item with integer keys",
            raw_map(&[
                cmd_true.clone(),
                rlimits(vec![0x83, 0, 0xa4, b'c', b'o', b'r', b'e', 1, 0, 2, 0]),
            ]),
        ),
        (
            "rlimit item with soft twice",
            raw_map(&[
                cmd_true.clone(),
                rlimits(raw_map(&[
                    (s("resource"), s("core")),
                    (s("soft"), vec![0]),
                    (s("soft"), vec![0]),
                    (s("hard"), vec![0]),
                ])),
            ]),
        ),
        (
            "cmd str with invalid UTF-8",
            raw_map(&[(s("cmd"), vec![0xa2, 0xc3, 0x28])]),
        ),
    ];
    for (i, (what, payload)) in bad.iter().enumerate() {
        let id = 800 + i as u32;
        agent.send_frame(EXEC, id, payload);
        let e = agent.expect_error(id);
        assert_eq!(e.kind, "bad_payload", "{what}: {e:?}");
    }
    let good: Vec<(&str, Vec<u8>)> = vec![
        (
            "level 32 inside an ignored value",
            raw_map(&[cmd_true.clone(), no_stdin.clone(), (s("x"), nested(31))]),
        ),
        (
            "ignored values of any type",
            raw_map(&[
                cmd_true.clone(),
                no_stdin.clone(),
                (s("a"), vec![0xc0]),
                (s("b"), Value::Float(0.5).encode()),
                (s("c"), vec![0xc4, 2, 0, 1]),
                (s("d"), vec![0xd4, 7, 9]),
                (s("e"), vec![0x81, 0x01, 0x02]),
                (s("f"), vec![0xa2, 0xff, 0xfe]),
            ]),
        ),
        (
            "rlimit item with an unknown key twice",
            raw_map(&[
                cmd_true.clone(),
                no_stdin.clone(),
                rlimits(raw_map(&[
                    (s("resource"), s("core")),
                    (s("soft"), vec![0]),
                    (s("hard"), vec![0]),
                    (s("z"), vec![1]),
                    (s("z"), vec![2]),
                ])),
            ]),
        ),
    ];
    for (i, (what, payload)) in good.iter().enumerate() {
        let id = 900 + i as u32;
        agent.send_exec_payload(id, payload);
        match agent.exec_reply(id) {
            Ok(_) => agent.collect(id).assert_success(),
            Err(f) => panic!("{what}: {f:?}"),
        };
    }
    agent.ping();
    let errs: Vec<ErrorInfo> = agent
        .take_stashed(|f| f.kind == ERROR)
        .iter()
        .map(error_info)
        .collect();
    assert!(errs.is_empty(), "{errs:?}");

    // Order of checks: kind, direction, payload, then session state.
    agent.send_frame(STDOUT, 12345, &[0xc1]);
    agent.expect_error_kind(12345, "wrong_direction", Some(STDOUT));
    agent.send_frame(SIGNAL, 12345, &[0xc1]);
    agent.expect_error_kind(12345, "bad_payload", Some(SIGNAL));
    agent.send_frame(
        RESIZE,
        12345,
        &Value::map([("rows", Value::int(1))]).encode(),
    );
    agent.expect_error_kind(12345, "bad_payload", Some(RESIZE));
    // signal = 2^31 does not fit i32.
    agent.send_frame(
        SIGNAL,
        12345,
        &Value::map([("signal", Value::int(1i64 << 31))]).encode(),
    );
    agent.expect_error_kind(12345, "bad_payload", Some(SIGNAL));
    // STDIN_CLOSE: empty, or a map (ignored); anything else is bad.
    agent.send_frame(STDIN_CLOSE, 12345, b"junk");
    agent.expect_error_kind(12345, "bad_payload", Some(STDIN_CLOSE));
    agent.send_frame(
        STDIN_CLOSE,
        12345,
        &Value::map([("later", Value::int(1))]).encode(),
    );
    agent.expect_error_kind(12345, "unknown_session", Some(STDIN_CLOSE));
    agent.assert_no_errors();
}

/// docs/PROTOCOL.md's agent decisions: an empty STDIN is a no-op (no ack)
/// but still checked; a second STDIN_CLOSE is `stdin_closed`; SIGNAL 0 is
/// valid; RESIZE with 0 rows is accepted.
#[test]
fn agent_decisions_of_the_projects_protocol_document() {
    let mut agent = Agent::start();
    let id = agent.new_id();
    agent.exec(id, &sh("cat; exec sleep 100"));
    agent.send_stdin(id, b"");
    agent.send_signal(id, 0, true);
    agent.send_stdin_close(id);
    agent.send_stdin_close(id);
    agent.expect_error_kind(id, "stdin_closed", Some(STDIN_CLOSE));
    agent.send_stdin(id, b"");
    agent.expect_error_kind(id, "stdin_closed", Some(STDIN));
    agent.send_stdin(99999, b"");
    agent.expect_error_kind(99999, "unknown_session", Some(STDIN));
    agent.assert_no_errors();
    assert!(
        agent.take_stashed(|f| f.kind == STDIN_ACK).is_empty(),
        "an ack for empty STDIN"
    );
    agent.send_signal(id, 9, true);
    let out = agent.collect(id);
    assert_eq!(out.exit, ExitInfo::signal(9));
    assert_eq!(out.acked, 0);

    let mut e = sh("stty -echo; read x; stty size");
    e.tty = true;
    let id = agent.new_id();
    agent.exec(id, &e);
    agent.send_resize(id, 0, 0);
    agent.send_stdin(id, b"\n");
    let out = agent.collect(id);
    out.assert_success();
    assert!(
        out.stdout_str().ends_with("0 0\r\n"),
        "{:?}",
        out.stdout_str()
    );
    agent.assert_no_errors();
}
