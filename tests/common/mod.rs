//! Shared helpers for the integration tests: a hand-rolled MessagePack
//! writer, so that tests choose every byte (integer widths, key types)
//! instead of trusting the encoder under test.

#![allow(dead_code)] // each test crate uses a different subset

use agentd::codec::{self, Decoded, Frame};
use agentd::messages::{Exec, Kind, Message, ProtocolError, Rlimit};

/// MessagePack values, built byte by byte.
pub mod mp {
    pub fn nil() -> Vec<u8> {
        vec![0xc0]
    }
    pub fn bool(b: bool) -> Vec<u8> {
        vec![if b { 0xc3 } else { 0xc2 }]
    }
    /// positive fixint (0..=127)
    pub fn fix(n: u8) -> Vec<u8> {
        assert!(n < 0x80);
        vec![n]
    }
    /// negative fixint (-32..=-1)
    pub fn nfix(n: i8) -> Vec<u8> {
        assert!((-32..0).contains(&n));
        vec![n as u8]
    }
    pub fn u8(n: u8) -> Vec<u8> {
        vec![0xcc, n]
    }
    pub fn u16(n: u16) -> Vec<u8> {
        let mut v = vec![0xcd];
        v.extend_from_slice(&n.to_be_bytes());
        v
    }
    pub fn u32(n: u32) -> Vec<u8> {
        let mut v = vec![0xce];
        v.extend_from_slice(&n.to_be_bytes());
        v
    }
    pub fn u64(n: u64) -> Vec<u8> {
        let mut v = vec![0xcf];
        v.extend_from_slice(&n.to_be_bytes());
        v
    }
    pub fn i8(n: i8) -> Vec<u8> {
        vec![0xd0, n as u8]
    }
    pub fn i16(n: i16) -> Vec<u8> {
        let mut v = vec![0xd1];
        v.extend_from_slice(&n.to_be_bytes());
        v
    }
    pub fn i32(n: i32) -> Vec<u8> {
        let mut v = vec![0xd2];
        v.extend_from_slice(&n.to_be_bytes());
        v
    }
    pub fn i64(n: i64) -> Vec<u8> {
        let mut v = vec![0xd3];
        v.extend_from_slice(&n.to_be_bytes());
        v
    }
    pub fn f32(x: f32) -> Vec<u8> {
        let mut v = vec![0xca];
        v.extend_from_slice(&x.to_be_bytes());
        v
    }
    pub fn f64(x: f64) -> Vec<u8> {
        let mut v = vec![0xcb];
        v.extend_from_slice(&x.to_be_bytes());
        v
    }
    /// Every MessagePack encoding of the unsigned value `n` that fits it
    /// (fixint, u8, u16, u32, u64 and the signed forms i8..i64).
    pub fn uint_widths(n: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if n < 0x80 {
            out.push(fix(n as u8));
        }
        if let Ok(x) = u8::try_from(n) {
            out.push(u8(x));
        }
        if let Ok(x) = u16::try_from(n) {
            out.push(u16(x));
        }
        if let Ok(x) = u32::try_from(n) {
            out.push(u32(x));
        }
        out.push(u64(n));
        if let Ok(x) = i8::try_from(n) {
            out.push(i8(x));
        }
        if let Ok(x) = i16::try_from(n) {
            out.push(i16(x));
        }
        if let Ok(x) = i32::try_from(n) {
            out.push(i32(x));
        }
        if let Ok(x) = i64::try_from(n) {
            out.push(i64(x));
        }
        out
    }
    /// Every MessagePack encoding of the negative value `n` that fits it.
    pub fn nint_widths(n: i64) -> Vec<Vec<u8>> {
        assert!(n < 0);
        let mut out = Vec::new();
        if n >= -32 {
            out.push(nfix(n as i8));
        }
        if let Ok(x) = i8::try_from(n) {
            out.push(i8(x));
        }
        if let Ok(x) = i16::try_from(n) {
            out.push(i16(x));
        }
        if let Ok(x) = i32::try_from(n) {
            out.push(i32(x));
        }
        out.push(i64(n));
        out
    }
    /// A `str` in its smallest form.
    pub fn str(s: &str) -> Vec<u8> {
        let b = s.as_bytes();
        let mut v = match b.len() {
            n @ 0..=31 => vec![0xa0 | n as u8],
            n @ 32..=255 => vec![0xd9, n as u8],
            n @ 256..=65535 => {
                let mut v = vec![0xda];
                v.extend_from_slice(&(n as u16).to_be_bytes());
                v
            }
            n => {
                let mut v = vec![0xdb];
                v.extend_from_slice(&(n as u32).to_be_bytes());
                v
            }
        };
        v.extend_from_slice(b);
        v
    }
    /// A `str` in the given width: 0 fixstr, 8, 16 or 32.
    pub fn str_w(s: &str, width: u8) -> Vec<u8> {
        let b = s.as_bytes();
        let mut v = match width {
            0 => vec![0xa0 | u8::try_from(b.len()).unwrap()],
            8 => vec![0xd9, u8::try_from(b.len()).unwrap()],
            16 => {
                let mut v = vec![0xda];
                v.extend_from_slice(&u16::try_from(b.len()).unwrap().to_be_bytes());
                v
            }
            32 => {
                let mut v = vec![0xdb];
                v.extend_from_slice(&u32::try_from(b.len()).unwrap().to_be_bytes());
                v
            }
            _ => panic!("no str width {width}"),
        };
        v.extend_from_slice(b);
        v
    }
    /// A `str` header followed by arbitrary (possibly invalid UTF-8) bytes.
    pub fn str_bytes(b: &[u8]) -> Vec<u8> {
        let mut v = vec![0xd9, u8::try_from(b.len()).unwrap()];
        v.extend_from_slice(b);
        v
    }
    pub fn bin(b: &[u8]) -> Vec<u8> {
        let mut v = vec![0xc4, u8::try_from(b.len()).unwrap()];
        v.extend_from_slice(b);
        v
    }
    pub fn arr(items: &[Vec<u8>]) -> Vec<u8> {
        let mut v = if items.len() < 16 {
            vec![0x90 | items.len() as u8]
        } else {
            let mut v = vec![0xdc];
            v.extend_from_slice(&u16::try_from(items.len()).unwrap().to_be_bytes());
            v
        };
        for i in items {
            v.extend_from_slice(i);
        }
        v
    }
    /// A map with raw (already encoded) keys.
    pub fn raw_map(entries: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut v = if entries.len() < 16 {
            vec![0x80 | entries.len() as u8]
        } else {
            let mut v = vec![0xde];
            v.extend_from_slice(&u16::try_from(entries.len()).unwrap().to_be_bytes());
            v
        };
        for (k, val) in entries {
            v.extend_from_slice(k);
            v.extend_from_slice(val);
        }
        v
    }
    /// A map with `str` keys.
    pub fn map(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let raw: Vec<_> = entries.iter().map(|(k, v)| (str(k), v.clone())).collect();
        raw_map(&raw)
    }
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
