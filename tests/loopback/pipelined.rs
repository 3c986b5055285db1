//! A host need not wait for STARTED: frames for a session may follow its
//! EXEC at once (in the same write), including for an EXEC that then
//! fails. Whatever the agent does with them, the contract's order holds
//! (the checker) and nothing hangs.

use std::time::Duration;

use agentd::messages::{Exec, Message};

use crate::support::agent::*;
use crate::support::checker::*;
use crate::support::host::*;
use crate::support::proc::*;
use crate::support::*;

/// Encodes `msgs` as one byte string (one write).
fn batch(msgs: &[(Message<'_>, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (m, id) in msgs {
        m.encode(*id, &mut out).expect("the test's frames fit");
    }
    out
}

fn exec_msg(e: Exec) -> Message<'static> {
    Message::Exec(Box::new(e))
}

#[test]
fn exec_stdin_and_close_in_one_write() {
    let mut agent = Agent::start();
    let n = 50u32;
    let mut msgs = Vec::new();
    let lines: Vec<String> = (1..=n).map(|i| format!("line {i}\n")).collect();
    for id in 1..=n {
        msgs.push((exec_msg(cmd("cat", &[])), id));
        msgs.push((Message::Stdin(lines[id as usize - 1].as_bytes()), id));
        msgs.push((Message::StdinClose, id));
    }
    agent.send_raw(&batch(&msgs));
    for id in 1..=n {
        agent
            .exec_reply(id)
            .unwrap_or_else(|e| panic!("{id}: {e:?}"));
        let out = agent.collect(id);
        out.assert_success();
        assert_eq!(out.stdout_str(), lines[id as usize - 1]);
        assert_eq!(out.acked, lines[id as usize - 1].len() as u64);
    }
    agent.assert_no_errors();
}

#[test]
fn exec_resize_in_one_write_on_a_tty() {
    let mut agent = Agent::start();
    let id = 1;
    let mut e = sh("stty -echo; read x; stty size");
    e.tty = true;
    let bytes = batch(&[
        (exec_msg(e), id),
        (
            Message::Resize(agentd::messages::Resize { rows: 30, cols: 90 }),
            id,
        ),
        (Message::Stdin(b"\n"), id),
    ]);
    agent.send_raw(&bytes);
    agent.exec_reply(id).unwrap();
    let out = agent.collect(id);
    out.assert_success();
    assert!(
        out.stdout_str().ends_with("30 90\r\n"),
        "{:?}",
        out.stdout_str()
    );
    agent.assert_no_errors();
}

/// EXEC that fails, followed at once by frames for its id: the reply is
/// EXEC_FAILED and nothing of a session follows it (no STDIN_ACK, no
/// EXITED); the other frames get an ERROR or nothing.
#[test]
fn frames_after_an_exec_that_fails() {
    let mut agent = Agent::start();
    for id in 1..=20u32 {
        let mut e = cmd("true", &[]);
        e.cwd = Some("/nonexistent-agentd-dir".into());
        e.tty = id % 2 == 0;
        let bytes = batch(&[
            (exec_msg(e), id),
            (Message::Stdin(b"data"), id),
            (Message::StdinClose, id),
            (Message::OutputAck(agentd::messages::Ack { bytes: 10 }), id),
            (
                Message::Resize(agentd::messages::Resize { rows: 5, cols: 5 }),
                id,
            ),
        ]);
        agent.send_raw(&bytes);
    }
    for id in 1..=20u32 {
        let f = agent
            .exec_reply(id)
            .expect_err("EXEC with a bad cwd started");
        assert_eq!(f.kind, "bad_cwd");
    }
    agent.ping();
    std::thread::sleep(Duration::from_millis(100));
    agent.drain_into_stash(Duration::from_millis(50));
    for e in agent.take_stashed(|f| f.kind == ERROR) {
        let e = error_info(&e);
        assert!(
            matches!(
                e.kind.as_str(),
                "unknown_session" | "stdin_closed" | "not_a_tty"
            ),
            "unexpected ERROR {e:?}"
        );
    }
    // The ids are free.
    agent.exec(1, &cmd("true", &[]));
    agent.collect(1).assert_success();
}

/// A SIGNAL sent right behind its EXEC must not decide the EXEC's reply: a
/// program that cannot start (bad cwd) is EXEC_FAILED, not STARTED and
/// EXITED by the signal (the program never ran, so STARTED would be
/// false).
#[test]
fn a_signal_right_behind_exec_does_not_change_its_reply() {
    let mut agent = Agent::start();
    let mut wrong = Vec::new();
    for id in 1..=10u32 {
        let mut e = cmd("true", &[]);
        e.cwd = Some("/nonexistent-agentd-dir".into());
        let bytes = batch(&[
            (exec_msg(e), id),
            (
                Message::Signal(agentd::messages::Signal {
                    signal: 15,
                    group: true,
                    tree: false,
                }),
                id,
            ),
        ]);
        agent.send_raw(&bytes);
        match agent.exec_reply(id) {
            Err(f) => assert_eq!(f.kind, "bad_cwd"),
            Ok(pid) => {
                let out = agent.collect(id);
                wrong.push(format!("id {id}: STARTED pid {pid}, EXITED {:?}", out.exit));
            }
        }
    }
    agent.ping();
    // ERROR unknown_session for the SIGNAL is fine; anything else is not.
    for e in agent.take_stashed(|f| f.kind == ERROR) {
        assert_eq!(error_info(&e).kind, "unknown_session");
    }
    assert!(
        wrong.is_empty(),
        "EXEC with a bad cwd followed by SIGTERM in the same write was answered with STARTED \
         in {} of 10 tries, e.g. {}",
        wrong.len(),
        wrong.first().map_or("", String::as_str)
    );
}

/// EXEC and SIGKILL in one write: either EXEC_FAILED, or STARTED and then
/// EXITED with signal 9; never a hang.
#[test]
fn exec_and_kill_in_one_write() {
    let mut agent = Agent::start();
    for id in 1..=20u32 {
        let bytes = batch(&[
            (exec_msg(cmd("sleep", &["100"])), id),
            (
                Message::Signal(agentd::messages::Signal {
                    signal: 9,
                    group: id % 2 == 0,
                    tree: false,
                }),
                id,
            ),
        ]);
        agent.send_raw(&bytes);
    }
    for id in 1..=20u32 {
        match agent.exec_reply(id) {
            Ok(_) => {
                let out = agent
                    .collect_within(id, Duration::from_secs(5))
                    .unwrap_or_else(|| panic!("session {id}: no EXITED after SIGKILL"));
                assert_eq!(out.exit, ExitInfo::signal(9), "session {id}");
            }
            Err(f) => eprintln!("session {id}: EXEC_FAILED {f:?}"),
        }
    }
    agent.assert_no_errors();
    agent.wait_no_children(Duration::from_secs(5));
}

/// EXEC, SIGSTOP, SIGCONT in one write: the session runs to its end.
#[test]
fn exec_stop_and_continue_in_one_write() {
    let mut agent = Agent::start();
    for id in 1..=10u32 {
        let mut e = sh("echo ran");
        e.stdin = false;
        let sig = |signal| {
            Message::Signal(agentd::messages::Signal {
                signal,
                group: true,
                tree: false,
            })
        };
        let bytes = batch(&[(exec_msg(e), id), (sig(19), id), (sig(18), id)]);
        agent.send_raw(&bytes);
    }
    for id in 1..=10u32 {
        agent
            .exec_reply(id)
            .unwrap_or_else(|e| panic!("{id}: {e:?}"));
        let out = agent
            .collect_within(id, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("session {id} hung after SIGSTOP + SIGCONT"));
        out.assert_success();
        assert_eq!(out.stdout_str(), "ran\n");
    }
}

/// EXEC and SHUTDOWN in one write: the starting session ends, is
/// reported (STARTED and EXITED, or EXEC_FAILED), then SHUTDOWN_DONE.
#[test]
fn exec_and_shutdown_in_one_write() {
    let mut agent = Agent::start();
    let mut msgs = Vec::new();
    for id in 1..=5u32 {
        msgs.push((exec_msg(cmd("sleep", &["100"])), id));
    }
    msgs.push((
        Message::Shutdown(agentd::messages::Shutdown { grace_ms: 300 }),
        0,
    ));
    agent.note_shutdown();
    agent.send_raw(&batch(&msgs));
    for id in 1..=5u32 {
        if agent.exec_reply(id).is_ok() {
            agent.collect(id);
        }
    }
    agent.recv_where(|f| f.kind == SHUTDOWN_DONE, "SHUTDOWN_DONE");
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// EXEC and end of file in one go: the agent exits 0 and leaves no
/// process behind.
#[test]
fn exec_then_eof_at_once() {
    let mut agent = Agent::start();
    let mut msgs = Vec::new();
    for id in 1..=5u32 {
        let mut e = sh("trap '' TERM HUP; sleep 100");
        e.tty = id % 2 == 0;
        msgs.push((exec_msg(e), id));
    }
    agent.send_raw(&batch(&msgs));
    agent.close();
    let procs = agent.descendants();
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(wait_until(Duration::from_secs(5), || procs
        .iter()
        .all(|&p| !alive(p))));
}

/// Many children between fork and exec at once: each still ends up with
/// only fds 0, 1 and 2.
#[test]
fn concurrent_starts_leak_no_fds() {
    let mut agent = Agent::start();
    let mut msgs = Vec::new();
    for id in 1..=30u32 {
        let mut e = sh("ls /proc/$$/fd");
        e.tty = id % 3 == 0;
        if e.tty {
            e.args[1] = "ls -1 /proc/$$/fd".into();
        }
        msgs.push((exec_msg(e), id));
    }
    agent.send_raw(&batch(&msgs));
    for id in 1..=30u32 {
        agent.exec_reply(id).unwrap();
        let out = agent.collect(id);
        out.assert_success();
        let want = if id % 3 == 0 {
            "0\r\n1\r\n2\r\n"
        } else {
            "0\n1\n2\n"
        };
        assert_eq!(out.stdout_str(), want, "session {id}");
    }
}
