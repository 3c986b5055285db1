//! Frames and messages built by hand: headers of any length (even invalid
//! ones), frames over payloads the test chose, and a fully populated EXEC.

use agentd::codec::{self, Decoded, Frame};
use agentd::messages::{Exec, Kind, Message, ProtocolError, Rlimit};

/// Encodes a frame header and payload (any `len`, even invalid ones).
pub fn raw_frame(len: u32, kind: u8, id: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = len.to_be_bytes().to_vec();
    v.push(kind);
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Builds a frame struct for `kind` over `payload`.
pub fn frame(kind: Kind, id: u32, payload: &[u8]) -> Frame<'_> {
    Frame {
        kind: kind as u8,
        id,
        payload,
    }
}

/// Decodes a payload of `kind` (any direction).
pub fn decode(kind: Kind, payload: &[u8]) -> Result<Message<'_>, ProtocolError> {
    Message::decode(frame(kind, 1, payload))
}

/// Decodes the wire bytes of exactly one frame.
pub fn single_frame(wire: &[u8]) -> codec::OwnedFrame {
    let (items, dec) = codec::decode_chunks([wire]);
    assert!(dec.is_at_boundary(), "bytes left after the frame");
    match &items[..] {
        [Decoded::Frame(f)] => f.clone(),
        other => panic!("expected one frame, got {other:?}"),
    }
}

/// An EXEC with every key set away from its default (the `exec-full`
/// golden vector).
pub fn full_exec() -> Exec {
    Exec {
        cmd: "/bin/sh".into(),
        args: vec!["-c".into(), "echo hi".into()],
        env: vec!["A=1".into(), "B=".into()],
        clear_env: true,
        cwd: Some("/tmp".into()),
        user: Some("1000:1000".into()),
        tty: true,
        rows: 50,
        cols: 132,
        rlimits: vec![
            Rlimit {
                resource: "nofile".into(),
                soft: 1024,
                hard: 4096,
            },
            Rlimit {
                resource: "core".into(),
                soft: 0,
                hard: u64::MAX,
            },
        ],
        stdin: false,
        output_window: 65536,
        linger_ms: 250,
        no_new_privs: true,
        tag: None,
        replay_bytes: None,
        timeout_ms: None,
        kill_grace_ms: None,
        detach: false,
        memory_max: None,
        pids_max: None,
        cpu_max: None,
    }
}
