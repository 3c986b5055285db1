//! Replays the seed corpus of the `agent_dispatch` fuzz target
//! (fuzz/corpus/agent_dispatch/) through `agentd::fuzzing::agent_dispatch`,
//! so `cargo test` on stable runs the agent's whole input path over every
//! seed, and a crash input saved into the corpus stays a regression test.
//!
//! It has a test binary of its own: the body runs an agent in this process
//! that reaps any child of the process and checks the process's fd count,
//! so no other test may run beside it.

mod support;

use std::time::Instant;

use agentd::fuzzing::dispatch::{self, Summary};
use support::util::corpus_files;

/// One test only (see above): the seeds, and the vetting.
#[test]
fn agent_dispatch_corpus() {
    let files = corpus_files("agent_dispatch");
    assert!(files.len() >= 20, "only {} seeds", files.len());
    harmful_exec_is_skipped();
    machine_touching_extensions_are_skipped();
    let mut total = Summary::default();
    for path in &files {
        let data = std::fs::read(path).unwrap();
        let t = Instant::now();
        let result = std::panic::catch_unwind(|| dispatch::run(&data));
        let name = path.file_name().unwrap().to_string_lossy();
        let s = result.unwrap_or_else(|_| panic!("agent_dispatch: {name} fails"));
        println!("{name}: {:?} {s:?}", t.elapsed());
        // Every seed reaches the agent: none is skipped by the vetting.
        assert!(!s.skipped && s.frames > 0, "{name} is skipped");
        total.started += s.started;
        total.exec_failed += s.exec_failed;
        total.exited += s.exited;
        total.output_frames += s.output_frames;
        total.stdin_acks += s.stdin_acks;
        total.errors += s.errors;
        total.pongs += s.pongs;
        total.extension_replies += s.extension_replies;
        total.shutdown_done |= s.shutdown_done;
    }
    // Together the seeds cover every kind of answer.
    println!("{total:?}");
    assert!(total.started >= 30 && total.exited >= 20, "{total:?}");
    assert!(total.exec_failed >= 10 && total.errors >= 10, "{total:?}");
    assert!(
        total.output_frames >= 10 && total.stdin_acks >= 5,
        "{total:?}"
    );
    assert!(total.pongs >= 20 && total.shutdown_done, "{total:?}");
    // The list-sessions seed (a crash input of CI's fuzzing, once: the
    // model did not know SESSIONS) gets its answer.
    assert!(total.extension_replies >= 1, "{total:?}");
}

/// A raw-frame operation (tag 8) carrying EXEC `exec` for session 1.
fn raw_exec_input(exec: &str) -> Vec<u8> {
    let exec = agentd::messages::Exec::new(exec);
    let frame = agentd::messages::Message::Exec(Box::new(exec)).to_bytes(1);
    let payload = &frame[agentd::codec::HEADER_LEN..];
    let mut input = vec![0x1f, 8, 0x10, 1, payload.len() as u8];
    input.extend_from_slice(payload);
    input
}

/// A raw-frame operation (tag 8) carrying `msg` for session 1.
fn raw_input(msg: agentd::messages::Message) -> Vec<u8> {
    let frame = msg.to_bytes(1);
    let payload = &frame[agentd::codec::HEADER_LEN..];
    let mut input = vec![0x1f, 8, frame[4], 1, payload.len() as u8];
    input.extend_from_slice(payload);
    input
}

/// Requests that would touch the machine's files or network, or move a
/// session between hosts, skip the input; LIST does not.
fn machine_touching_extensions_are_skipped() {
    use agentd::messages::{
        Attach, FsMsg, FsOp, FsRequest, List, Message, NetConnect, NetMsg, SessionsMsg,
    };
    let mut remove = FsRequest::new(FsOp::Remove, "/tmp/agentd-fuzz-x");
    remove.recursive = Some(true);
    let remove = Message::Fs(FsMsg::Request(Box::new(remove)));
    assert!(dispatch::run(&raw_input(remove)).skipped);
    let connect = NetConnect {
        host: Some("127.0.0.1".into()),
        port: Some(1),
        ..Default::default()
    };
    let connect = Message::Net(NetMsg::Connect(Box::new(connect)));
    assert!(dispatch::run(&raw_input(connect)).skipped);
    let attach = Attach {
        session: Some(1),
        ..Default::default()
    };
    let attach = Message::Sessions(SessionsMsg::Attach(Box::new(attach)));
    assert!(dispatch::run(&raw_input(attach)).skipped);
    let list = Message::Sessions(SessionsMsg::List(List::default()));
    let s = dispatch::run(&raw_input(list));
    assert!(!s.skipped && s.extension_replies == 1, "{s:?}");
}

/// The harness itself refuses what it must not run: an EXEC of anything
/// but the harmless programs, even as a raw frame, skips the input.
fn harmful_exec_is_skipped() {
    assert!(dispatch::run(&raw_exec_input("/bin/sh")).skipped);
    let s = dispatch::run(&raw_exec_input("true"));
    assert!(!s.skipped && s.started == 1 && s.exited == 1, "{s:?}");
}
