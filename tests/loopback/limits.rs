//! Limits the agent keeps whatever a host asks: no frame it sends exceeds
//! the frame limit, however much of a request a reply would quote; and a
//! shutdown always ends, whatever the output windows and the host do
//! (docs/PROTOCOL.md, "SHUTDOWN" and "EXITED").

use std::time::{Duration, Instant};

use agentd::codec::MAX_PAYLOAD;
use agentd::messages::{Exec, Message, Rlimit, MAX_MESSAGE};

use crate::support::agent::*;
use crate::support::checker::*;
use crate::support::host::*;
use crate::support::msgpack::*;

/// An EXEC whose payload is exactly `MAX_PAYLOAD` bytes, one string of it
/// (set by `fill`) as long as that allows.
fn exec_of_max_payload(fill: impl Fn(&mut Exec, String)) -> Exec {
    let size = |n: usize| {
        let mut e = Exec::new("true");
        fill(&mut e, "x".repeat(n));
        Message::Exec(Box::new(e)).to_bytes(1).len() - 9
    };
    // Long strings all have the same 5-byte str32 header.
    let probe = 900_000;
    let n = probe + (MAX_PAYLOAD - size(probe));
    let mut e = Exec::new("true");
    fill(&mut e, "x".repeat(n));
    assert_eq!(size(n), MAX_PAYLOAD, "the EXEC is exactly the limit");
    e
}

/// Every EXEC_FAILED that quotes a part of the request fits in a frame
/// (the harness's decoder fails the test on a frame over the limit) and
/// its message is capped, ending in an ellipsis.
#[test]
fn exec_failed_quoting_a_megabyte_string_stays_under_the_frame_limit() {
    let mut agent = Agent::start();
    let cases: Vec<(&str, Exec)> = vec![
        ("bad_user", exec_of_max_payload(|e, s| e.user = Some(s))),
        (
            "bad_user",
            exec_of_max_payload(|e, s| e.user = Some(format!("root:{s}"))),
        ),
        ("not_found", exec_of_max_payload(|e, s| e.cmd = s)),
        (
            "invalid_request",
            exec_of_max_payload(|e, s| e.env = vec![s]),
        ),
        (
            "invalid_request",
            exec_of_max_payload(|e, s| {
                e.rlimits = vec![Rlimit {
                    resource: s,
                    soft: 1,
                    hard: 1,
                }]
            }),
        ),
        (
            "bad_cwd",
            exec_of_max_payload(|e, s| e.cwd = Some(format!("/{s}"))),
        ),
    ];
    for (i, (kind, exec)) in cases.iter().enumerate() {
        let id = 100 + i as u32;
        let f = agent.exec_fail(id, exec, kind);
        assert!(
            f.message.len() <= MAX_MESSAGE,
            "{kind}: a {}-byte message",
            f.message.len()
        );
        assert!(f.message.contains('…'), "{kind}: not marked as cut: {f:?}");
    }
    agent.ping();
}

/// An ERROR whose reason would quote a huge value of the wrong type (a
/// MessagePack decoder's "invalid type: string ..., expected u16") is
/// capped too.
#[test]
fn bad_payload_quoting_a_megabyte_string_stays_under_the_frame_limit() {
    let mut agent = Agent::start();
    let huge = "y".repeat(MAX_PAYLOAD - 64);
    let payload = Value::map([("cmd", Value::str("true")), ("rows", Value::str(&huge))]).encode();
    assert!(payload.len() <= MAX_PAYLOAD);
    agent.send_exec_payload(7, &payload);
    let e = agent.expect_error_kind(7, "bad_payload", Some(EXEC));
    assert!(e.message.len() <= MAX_MESSAGE, "{} bytes", e.message.len());
    agent.ping();
}

/// A session whose output window is used up when a SHUTDOWN's grace ends:
/// what it still holds is dropped and counted in EXITED's
/// `output_dropped`, then EXITED and SHUTDOWN_DONE come and the agent
/// exits (it used to wait for an OUTPUT_ACK that never came, forever).
#[test]
fn shutdown_completes_while_a_session_window_is_used_up() {
    let mut agent = Agent::start();
    let mut yes = cmd("yes", &[]);
    yes.output_window = 4096;
    yes.stdin = false;
    agent.exec(1, &yes);
    // Take the whole window and acknowledge nothing.
    let mut got = 0;
    while got < 4096 {
        let f = agent.recv_where(|f| f.id == 1 && f.kind == STDOUT, "STDOUT");
        got += f.payload.len();
    }
    assert_eq!(got, 4096, "the agent kept to the window");
    let t0 = Instant::now();
    agent.send_shutdown(200);
    let out = agent
        .collect_within(1, Duration::from_secs(10))
        .unwrap_or_else(|| {
            panic!(
                "no EXITED {:?} after SHUTDOWN with the window used up",
                t0.elapsed()
            )
        });
    assert_eq!(out.exit, ExitInfo::signal(libc::SIGTERM));
    let dropped = out.exited_map.get("output_dropped").and_then(Value::as_int);
    assert!(
        dropped.is_some_and(|n| n > 0),
        "EXITED says what was dropped: {:?}",
        out.exited_map
    );
    agent.recv_where(|f| f.kind == SHUTDOWN_DONE, "SHUTDOWN_DONE");
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

/// SIGTERM to the agent takes the same path (as PID 1 a power-off would
/// hang the VM for good otherwise).
#[test]
fn sigterm_completes_while_a_session_window_is_used_up() {
    let mut agent = Agent::start();
    let mut yes = cmd("yes", &[]);
    yes.output_window = 4096;
    agent.exec(1, &yes);
    agent.recv_where(|f| f.id == 1 && f.kind == STDOUT, "STDOUT");
    agent.note_shutdown();
    // SAFETY: kill with a pid and a signal number.
    unsafe { libc::kill(agent.host_pid, libc::SIGTERM) };
    let out = agent
        .collect_within(1, Duration::from_secs(10))
        .expect("EXITED after SIGTERM with the window used up");
    assert_eq!(out.exit, ExitInfo::signal(libc::SIGTERM));
    agent.recv_where(|f| f.kind == SHUTDOWN_DONE, "SHUTDOWN_DONE");
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// A host that stops reading altogether while a session floods: the
/// shutdown still ends (grace, then a bounded drain, then a bounded final
/// write) and the agent exits 0.
#[test]
fn shutdown_completes_while_the_host_reads_nothing() {
    let mut agent = Agent::start();
    let mut yes = cmd("yes", &[]);
    yes.stdin = false;
    agent.exec(1, &yes);
    agent.recv_where(|f| f.id == 1 && f.kind == STDOUT, "STDOUT");
    agent.pause_reading();
    // Let the transport and the agent's queue fill up.
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    agent.send_shutdown(200);
    // grace 0.2 s + drain 1 s + at most 5 s writing to a host that reads
    // nothing, and slack for a loaded machine.
    let status = agent.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        t0.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t0.elapsed()
    );
}
