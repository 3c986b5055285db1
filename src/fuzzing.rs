//! Bodies of the fuzz targets in `fuzz/`.
//!
//! They live in the library so that `cargo test` (tests/fuzz_corpus.rs) can
//! replay the checked-in seed corpus on stable without cargo-fuzz. Each one
//! panics when an invariant is broken; any input that does not panic passes.

use std::io;

use crate::codec::{
    self, Decoded, Decoder, FrameError, HEADER_LEN, LEN_OVERHEAD, MAX_PAYLOAD, READ_CHUNK,
};
use crate::messages::{Direction, Kind, Message, ProtocolError};

/// `frame_decoder`: the first two bytes seed the chunk sizes, the rest is
/// the stream. The stream is decoded whole, fed in chunks, and read in the
/// same chunks through [`Decoder::read_from`]; all three must agree, and
/// the decoder must stay within one maximal frame plus one chunk. What was
/// decoded is then walked along the stream (`check_against_stream`):
/// every frame must re-encode to exactly the bytes it came from, at the
/// offset it came from, framing errors or not, and the decoder must hold
/// exactly the incomplete rest.
pub fn frame_decoder(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let seed = u16::from_be_bytes([data[0], data[1]]);
    let stream = &data[2..];

    let (whole, whole_dec) = codec::decode_chunks([stream]);
    check_against_stream(stream, &whole, &whole_dec);

    // Chunk sizes from a small xorshift seeded by the input.
    let mut state = u32::from(seed) | 1;
    let mut chunks = Vec::new();
    let mut rest = stream;
    let mut max_chunk = 0;
    while !rest.is_empty() {
        let n = chunk_len(&mut state, rest.len());
        max_chunk = max_chunk.max(n);
        chunks.push(&rest[..n]);
        rest = &rest[n..];
    }
    let mut dec = Decoder::new();
    let mut chunked = Vec::new();
    for &chunk in &chunks {
        dec.feed(chunk);
        assert!(
            dec.capacity() <= HEADER_LEN + MAX_PAYLOAD + max_chunk,
            "decoder holds {} bytes",
            dec.capacity()
        );
        drain(&mut dec, &mut chunked);
    }
    assert_eq!(whole, chunked, "chunking changed what was decoded");
    assert_eq!(dec.buffered(), whole_dec.buffered(), "chunked: bytes held");
    assert_eq!(dec.is_at_boundary(), whole_dec.is_at_boundary());

    let mut reader = ChunkReader {
        chunks: chunks.iter(),
        current: &[],
    };
    let mut dec = Decoder::new();
    let mut read = Vec::new();
    while dec.read_from(&mut reader).expect("reading a slice fails") > 0 {
        assert!(
            dec.capacity() <= HEADER_LEN + MAX_PAYLOAD + READ_CHUNK,
            "decoder holds {} bytes",
            dec.capacity()
        );
        drain(&mut dec, &mut read);
    }
    assert_eq!(whole, read, "read_from changed what was decoded");
    assert_eq!(
        dec.buffered(),
        whole_dec.buffered(),
        "read_from: bytes held"
    );
    assert_eq!(dec.is_at_boundary(), whole_dec.is_at_boundary());
}

/// The next chunk length (at most `left`, at least 1): mostly small ones,
/// which cut headers and payloads anywhere, but also up to a read chunk, up
/// to a maximal frame, and the whole rest of the stream.
fn chunk_len(state: &mut u32, left: usize) -> usize {
    *state ^= *state << 13;
    *state ^= *state >> 17;
    *state ^= *state << 5;
    let r = *state as usize;
    let n = match *state >> 28 {
        0..=9 => r % 97 + 1,
        10..=12 => r % READ_CHUNK + 1,
        13..=14 => r % (HEADER_LEN + MAX_PAYLOAD) + 1,
        _ => left,
    };
    n.min(left)
}

/// Walks `stream` along `items`, what a decoder made of it, from offset 0:
/// a frame must be exactly the bytes at the offset (its re-encoding, byte
/// for byte), a framing error must be the `len` (and for an oversized frame
/// `kind` and `id`) at the offset, and each moves the offset past its
/// `4 + len` bytes (an error's skipped bytes included). What is left after
/// the last item must be what `dec` holds: an incomplete item, or the part
/// of a skipped frame that the stream did not reach.
fn check_against_stream(stream: &[u8], items: &[Decoded], dec: &Decoder) {
    let mut off: u64 = 0;
    let mut encoded = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = usize::try_from(off).unwrap_or(usize::MAX);
        let here = stream.get(at..).unwrap_or(&[]);
        let len = match *item {
            Decoded::Frame(ref f) => {
                encoded.clear();
                f.as_frame()
                    .encode(&mut encoded)
                    .expect("a decoded frame fits");
                assert_eq!(
                    here.get(..encoded.len()),
                    Some(&encoded[..]),
                    "item {i}: frame at offset {off} re-encodes to other bytes than it came from"
                );
                encoded.len() as u64 - 4
            }
            Decoded::Error(FrameError::Malformed { len }) => {
                assert!(len < LEN_OVERHEAD, "item {i}: malformed with len {len}");
                assert_eq!(
                    here.get(..4),
                    Some(&len.to_be_bytes()[..]),
                    "item {i}: malformed frame at offset {off} is not there"
                );
                u64::from(len)
            }
            Decoded::Error(FrameError::TooLarge { kind, id, len }) => {
                assert!(
                    len as usize > LEN_OVERHEAD as usize + MAX_PAYLOAD,
                    "item {i}: too large with len {len}"
                );
                let mut header = len.to_be_bytes().to_vec();
                header.push(kind);
                header.extend_from_slice(&id.to_be_bytes());
                assert_eq!(
                    here.get(..HEADER_LEN),
                    Some(&header[..]),
                    "item {i}: oversized frame at offset {off} is not there"
                );
                u64::from(len)
            }
        };
        off += 4 + len;
    }
    let total = stream.len() as u64;
    if off >= total {
        // The stream ended inside a skipped frame, or exactly after an item.
        assert_eq!(dec.buffered(), 0, "bytes held after the last item");
        assert_eq!(dec.is_at_boundary(), off == total, "skipping state");
    } else {
        let tail = &stream[off as usize..];
        assert_eq!(dec.buffered(), tail.len(), "bytes held after offset {off}");
        assert!(
            !holds_an_item(tail),
            "a whole item at offset {off} was not decoded"
        );
    }
}

/// Whether `bytes` begin with enough for the decoder to yield an item.
fn holds_an_item(bytes: &[u8]) -> bool {
    let Some(len) = bytes.get(..4) else {
        return false;
    };
    let len = u64::from(u32::from_be_bytes([len[0], len[1], len[2], len[3]]));
    let have = bytes.len() as u64;
    len < u64::from(LEN_OVERHEAD)
        || (have >= HEADER_LEN as u64
            && (len > u64::from(LEN_OVERHEAD) + MAX_PAYLOAD as u64 || have >= 4 + len))
}

fn drain(dec: &mut Decoder, out: &mut Vec<Decoded>) {
    while let Some(item) = dec.next_frame() {
        out.push(match item {
            Ok(f) => Decoded::Frame(f.to_owned()),
            Err(e) => Decoded::Error(e),
        });
    }
}

/// A reader that returns the given chunks, one (or the part of one that
/// fits) per `read`.
struct ChunkReader<'a> {
    chunks: std::slice::Iter<'a, &'a [u8]>,
    current: &'a [u8],
}

impl io::Read for ChunkReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.next() {
                Some(c) => self.current = c,
                None => return Ok(0),
            }
        }
        let n = self.current.len().min(buf.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = &self.current[n..];
        Ok(n)
    }
}

/// `message_decode`: the first byte picks a kind, the rest is its payload.
/// Decoding must not panic; the directed decoders must agree with it (and
/// refuse the other direction's kinds); whatever decodes must survive
/// encode → decode unchanged.
pub fn message_decode(data: &[u8]) {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    let kind = Kind::ALL[usize::from(selector) % Kind::ALL.len()];
    let frame = codec::Frame {
        kind: kind as u8,
        id: 1,
        payload,
    };
    let decoded = Message::decode(frame);
    let (same, other) = match kind.direction() {
        Direction::HostToAgent => (
            Message::decode_from_host(frame),
            Message::decode_from_agent(frame),
        ),
        Direction::AgentToHost => (
            Message::decode_from_agent(frame),
            Message::decode_from_host(frame),
        ),
    };
    assert_eq!(same, decoded);
    assert_eq!(other, Err(ProtocolError::WrongDirection(kind)));
    let Ok(msg) = decoded else {
        return;
    };
    let bytes = msg.to_bytes(1);
    let (items, _) = codec::decode_chunks([&bytes[..]]);
    let [Decoded::Frame(f)] = &items[..] else {
        panic!("a message did not encode to exactly one frame: {items:?}");
    };
    let again = Message::decode(f.as_frame()).expect("re-encoded message does not decode");
    assert_eq!(msg, again);
}

/// `agent_dispatch`: the agent's whole input path, in process. The input
/// is a script (see [`dispatch`] for its byte format) of frames — EXECs of
/// harmless programs, STDIN, STDIN_CLOSE, SIGNAL, RESIZE, OUTPUT_ACK,
/// PING, SHUTDOWN, raw frames of any kind and raw garbage — with barriers
/// and pauses between them. A real [`EventLoop`](crate::agent::EventLoop)
/// runs on one end of a socketpair, or of two pipes as `agentd --stdio`
/// has (where output and large STDIN payloads are spliced), in a thread of
/// its own and spawns real children; this thread is the host. Every frame the agent sends must
/// decode with [`Message::decode_from_agent`] and keep the contract:
/// READY first and once; exactly one STARTED or EXEC_FAILED per EXEC;
/// output, STDIN_ACK and EXITED only between STARTED and EXITED (nothing
/// for a session after its EXITED); EXEC_FAILED `duplicate_id` only for an
/// id in use; every PING answered in order with its payload; nothing after
/// SHUTDOWN_DONE. After the script, the host ends every session (SIGCONT,
/// OUTPUT_ACK, for a terminal ^Q ^Q in case the script stopped its output
/// with ^S, and SIGKILL if its input held ^S, since the script may have
/// closed its stdin before any ^Q; STDIN_CLOSE), which must then all end,
/// and closes the
/// connection; the agent must return, with no child process and no fd
/// left behind.
///
/// The script is vetted before anything runs: the whole byte stream is
/// decoded the way the agent will decode it, and an input is skipped if
/// any EXEC in it (structured or hidden in garbage) could run something
/// other than `/bin/true`, `cat`, `echo`, `sleep 0` or a missing program,
/// if a SIGNAL would make a child dump core, or a SHUTDOWN has a grace
/// over 2 s.
pub fn agent_dispatch(data: &[u8]) {
    let _ = dispatch::run(data);
}

/// The `agent_dispatch` harness.
///
/// Input format: byte 0 configures the agent (`max_sessions` = 1 + bits
/// 0-2; `stdin_window` from bits 3-4: 16, 1024, 65536, 262144 bytes;
/// bit 5: the transport is two pipes, not a socketpair); then
/// operations until the input ends (at most 64), each a tag byte (mod 12)
/// and its fields; a missing byte reads as 0. An id is one byte: below
/// 0xf0, `byte % 6` (so 0 is sometimes used); otherwise a big-endian u32
/// follows.
///
/// | tag | operation | fields |
/// |---|---|---|
/// | 0 | EXEC | id, program (mod 8: `/bin/true`, `true`, `cat`, `/bin/cat`, `echo`, `/bin/echo`, `sleep 0`, a missing program), flags (tty, no stdin, clear_env, no_new_privs, output_window + byte, linger_ms + byte, user + byte, cwd + byte), extras (rlimit nofile, unknown rlimit, soft > hard, env `FUZZ=1`, env without `=`, env with empty key, NUL in an argument, rows + cols bytes); `echo` then takes a count and that many length-prefixed arguments |
/// | 1 | STDIN | id, length byte (255: 70,000 bytes), bytes |
/// | 2 | STDIN_CLOSE | id |
/// | 3 | SIGNAL | id, signal (index into a table without core-dumping signals, with invalid numbers), group flag |
/// | 4 | RESIZE | id, rows, cols (bytes) |
/// | 5 | OUTPUT_ACK | id, amount selector |
/// | 6 | PING | id, length byte (255: 4097 bytes, over the limit), bytes |
/// | 7 | SHUTDOWN | grace byte (× 4 ms) |
/// | 8 | raw frame | kind byte, id, length byte, payload bytes |
/// | 9 | raw bytes | length byte (mod 64), bytes |
/// | 10 | barrier | the host sends a PING and waits for its PONG |
/// | 11 | pause | the host waits byte mod 16 ms, reading |
pub mod dispatch {
    use std::collections::{HashMap, HashSet};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use crate::agent::{Config, EventLoop, Exit, SpawnDefaults, Transport, TransportKind};
    use crate::codec::{self, Decoded, Decoder, MAX_OUTPUT_PAYLOAD, MAX_PAYLOAD};
    use crate::messages::{
        Ack, Exec, ExecFailedKind, Kind, Message, Resize, Rlimit, Shutdown, Signal,
    };

    /// Ids 0..IDS come from one byte.
    const IDS: u32 = 6;
    const MAX_OPS: usize = 64;
    /// EXECs per input at most (more is skipped: each costs a fork).
    const MAX_EXECS: usize = 24;
    /// Signals SIGNAL may carry: none that dumps core; some invalid ones.
    const SIGNALS: [i32; 22] = [
        0, 1, 2, 9, 10, 12, 13, 14, 15, 17, 18, 19, 20, 21, 22, 23, 28, 34, 64, 65, -1, 1000,
    ];
    const CORE_SIGNALS: [i32; 10] = [3, 4, 5, 6, 7, 8, 11, 24, 25, 31];
    /// How long the host waits for anything the agent owes it.
    const WAIT: Duration = Duration::from_secs(5);

    struct Input<'a>(&'a [u8]);

    impl<'a> Input<'a> {
        fn u8(&mut self) -> u8 {
            match self.0.split_first() {
                Some((&b, rest)) => {
                    self.0 = rest;
                    b
                }
                None => 0,
            }
        }

        fn bytes(&mut self, n: usize) -> &'a [u8] {
            let n = n.min(self.0.len());
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            head
        }

        fn id(&mut self) -> u32 {
            let v = self.u8();
            if v >= 0xf0 {
                u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
            } else {
                u32::from(v) % IDS
            }
        }

        fn string(&mut self, max: usize) -> String {
            let n = usize::from(self.u8()) % (max + 1);
            String::from_utf8_lossy(self.bytes(n)).into_owned()
        }
    }

    fn exec(inp: &mut Input<'_>) -> Exec {
        let prog = inp.u8() % 8;
        let mut e = Exec::new(match prog {
            0 => "/bin/true",
            1 => "true",
            2 => "cat",
            3 => "/bin/cat",
            4 => "echo",
            5 => "/bin/echo",
            6 => "sleep",
            _ => "agentd-fuzz-no-such-program",
        });
        if prog == 6 {
            e.args.push("0".into());
        }
        let flags = inp.u8();
        e.tty = flags & 1 != 0;
        e.stdin = flags & 2 == 0;
        e.clear_env = flags & 4 != 0;
        e.no_new_privs = flags & 8 != 0;
        if flags & 16 != 0 {
            e.output_window = 1 + u32::from(inp.u8()) * 64;
        }
        if flags & 32 != 0 {
            e.linger_ms = u32::from(inp.u8());
        }
        if flags & 64 != 0 {
            let users = [
                "nobody",
                "0",
                "65534:65534",
                "agentd-fuzz-no-user",
                "root:nogroup-x",
            ];
            e.user = Some(users[usize::from(inp.u8()) % users.len()].into());
        }
        if flags & 128 != 0 {
            let dirs = ["/", "/nonexistent-agentd-fuzz", "/tmp", ""];
            e.cwd = Some(dirs[usize::from(inp.u8()) % dirs.len()].into());
        }
        let extra = inp.u8();
        let rlimit = |resource: &str, soft, hard| Rlimit {
            resource: resource.into(),
            soft,
            hard,
        };
        if extra & 1 != 0 {
            e.rlimits.push(rlimit("nofile", 64, 64));
        }
        if extra & 2 != 0 {
            e.rlimits.push(rlimit("bogus", 1, 1));
        }
        if extra & 4 != 0 {
            e.rlimits.push(rlimit("nproc", 10, 5));
        }
        if extra & 8 != 0 {
            e.env.push("FUZZ=1".into());
        }
        if extra & 16 != 0 {
            e.env.push("NOEQUALS".into());
        }
        if extra & 32 != 0 {
            e.env.push("=empty".into());
        }
        if extra & 64 != 0 {
            e.args.push("nul\0byte".into());
        }
        if extra & 128 != 0 {
            e.rows = u16::from(inp.u8()) * 3;
            e.cols = u16::from(inp.u8()) * 3;
        }
        if prog == 4 || prog == 5 {
            for _ in 0..inp.u8() % 4 {
                e.args.push(inp.string(16));
            }
        }
        e
    }

    /// Where the host stops writing for a while.
    enum Stop {
        /// Wait for the PONG of this barrier PING.
        Barrier(Vec<u8>),
        Pause(Duration),
    }

    struct Script {
        config: Config,
        /// Two pipes as the transport (as `agentd --stdio`), not a
        /// socketpair.
        pipes: bool,
        stream: Vec<u8>,
        /// (offset in `stream`, what to do once that much is written)
        stops: Vec<(usize, Stop)>,
    }

    fn parse(data: &[u8]) -> Script {
        let mut inp = Input(data);
        let c = inp.u8();
        let config = Config {
            max_sessions: 1 + usize::from(c & 7),
            stdin_window: [16, 1024, 65536, 262144][usize::from((c >> 3) & 3)],
            pid1: false,
            defaults: SpawnDefaults {
                env: vec![("PATH".into(), "/usr/bin:/bin".into())],
                child_nofile: None,
            },
            // Sometimes with replay rings (output read, not spliced).
            replay_bytes: [0, 4096][usize::from((c >> 5) & 1)],
            cgroups: None,
            allow_clock: false,
            watch_restores: false,
            mounts: Vec::new(),
        };
        let mut stream = Vec::new();
        let mut stops = Vec::new();
        let mut barriers = 0u32;
        for _ in 0..MAX_OPS {
            if inp.0.is_empty() {
                break;
            }
            let tag = inp.u8() % 12;
            let out = &mut stream;
            match tag {
                0 => {
                    let id = inp.id();
                    Message::Exec(Box::new(exec(&mut inp)))
                        .encode(id, out)
                        .expect("a fuzz frame fits");
                }
                1 => {
                    let id = inp.id();
                    let n = inp.u8();
                    let big;
                    let payload = if n == 255 {
                        big = vec![b'x'; 70_000];
                        &big[..]
                    } else {
                        inp.bytes(usize::from(n))
                    };
                    Message::Stdin(payload)
                        .encode(id, out)
                        .expect("a fuzz frame fits");
                }
                2 => Message::StdinClose
                    .encode(inp.id(), out)
                    .expect("a fuzz frame fits"),
                3 => {
                    let id = inp.id();
                    let signal = SIGNALS[usize::from(inp.u8()) % SIGNALS.len()];
                    let group = inp.u8() & 1 == 0;
                    Message::Signal(Signal {
                        signal,
                        group,
                        tree: false,
                    })
                    .encode(id, out)
                    .expect("a fuzz frame fits");
                }
                4 => {
                    let id = inp.id();
                    let (rows, cols) = (u16::from(inp.u8()), u16::from(inp.u8()));
                    Message::Resize(Resize { rows, cols })
                        .encode(id, out)
                        .expect("a fuzz frame fits");
                }
                5 => {
                    let id = inp.id();
                    let bytes = match inp.u8() % 4 {
                        0 => 0,
                        1 => 100,
                        2 => 65536,
                        _ => u32::MAX,
                    };
                    Message::OutputAck(Ack { bytes })
                        .encode(id, out)
                        .expect("a fuzz frame fits");
                }
                6 => {
                    let id = inp.id();
                    let n = inp.u8();
                    let payload = if n == 255 {
                        vec![0; 4097]
                    } else {
                        inp.bytes(usize::from(n)).to_vec()
                    };
                    codec::append_raw(out, Kind::Ping as u8, id, &payload)
                        .expect("a fuzz frame fits");
                }
                7 => {
                    let grace_ms = u32::from(inp.u8()) * 4;
                    Message::Shutdown(Shutdown { grace_ms })
                        .encode(0, out)
                        .expect("a fuzz frame fits");
                }
                8 => {
                    let kind = inp.u8();
                    let id = inp.id();
                    let n = usize::from(inp.u8());
                    codec::append_raw(out, kind, id, inp.bytes(n)).expect("a fuzz frame fits");
                }
                9 => {
                    let n = usize::from(inp.u8() % 64);
                    out.extend_from_slice(inp.bytes(n));
                }
                10 => {
                    let payload = barrier_payload(barriers);
                    barriers += 1;
                    codec::append_raw(out, Kind::Ping as u8, 0, &payload)
                        .expect("a fuzz frame fits");
                    stops.push((out.len(), Stop::Barrier(payload)));
                }
                _ => {
                    let ms = u64::from(inp.u8() % 16);
                    stops.push((out.len(), Stop::Pause(Duration::from_millis(ms))));
                }
            }
        }
        Script {
            config,
            pipes: c & 0x20 != 0,
            stream,
            stops,
        }
    }

    fn barrier_payload(n: u32) -> Vec<u8> {
        let mut p = b"\xfe\xfeagentd-fuzz-barrier-".to_vec();
        p.extend_from_slice(&n.to_be_bytes());
        p
    }

    /// An item the stream stops in the middle of.
    struct Tail {
        start: usize,
        /// Where it would end; `None` while its length field is cut short.
        end: Option<u64>,
    }

    /// Where each item (frame or framing error) a decoder yields for
    /// `stream` is complete — a frame with its last byte, an error with
    /// its header — computed from the lengths alone; and the item the
    /// stream ends inside, if any.
    fn item_ends(stream: &[u8]) -> (Vec<usize>, Option<Tail>) {
        let mut ends = Vec::new();
        let mut pos = 0usize;
        while pos < stream.len() {
            if pos + 4 > stream.len() {
                return (
                    ends,
                    Some(Tail {
                        start: pos,
                        end: None,
                    }),
                );
            }
            let len = u32::from_be_bytes([
                stream[pos],
                stream[pos + 1],
                stream[pos + 2],
                stream[pos + 3],
            ]);
            let end = pos as u64 + 4 + u64::from(len);
            let yielded_at = if len < 5 {
                pos as u64 + 4
            } else if len as usize - 5 > MAX_PAYLOAD {
                pos as u64 + 9
            } else {
                end
            };
            if yielded_at <= stream.len() as u64 {
                ends.push(yielded_at as usize);
            }
            if end > stream.len() as u64 {
                return (
                    ends,
                    Some(Tail {
                        start: pos,
                        end: Some(end),
                    }),
                );
            }
            pos = end as usize;
        }
        (ends, None)
    }

    /// Pads `stream` with zeros to a frame boundary. False when that would
    /// take more than a maximal frame (an oversized frame being skipped).
    fn pad_to_boundary(stream: &mut Vec<u8>) -> bool {
        loop {
            match item_ends(stream).1 {
                None => return true,
                Some(Tail { start, end: None }) => stream.resize(start + 4, 0),
                Some(Tail { end: Some(end), .. }) => {
                    if end - stream.len() as u64 > (MAX_PAYLOAD + 64) as u64 {
                        return false;
                    }
                    stream.resize(end as usize, 0);
                }
            }
        }
    }

    /// Whether every frame of the decoded stream is safe to let the agent
    /// act on.
    fn vet(items: &[Decoded]) -> bool {
        let mut execs = 0;
        for item in items {
            let Decoded::Frame(f) = item else { continue };
            match Message::decode_from_host(f.as_frame()) {
                Ok(Message::Exec(e)) => {
                    execs += 1;
                    if execs > MAX_EXECS || !harmless(&e) {
                        return false;
                    }
                }
                Ok(Message::Signal(s)) if CORE_SIGNALS.contains(&s.signal) => return false,
                Ok(Message::Shutdown(s)) if s.grace_ms > 2000 => return false,
                // Extension requests that touch the machine's files or
                // network (the fuzzer runs as root), or that move a session
                // to or from this host (which the model does not follow),
                // are left out; LIST and the clock's requests (refused
                // here: no --allow-clock) are kept.
                Ok(m) if UNVETTED_KINDS.contains(&m.kind()) => return false,
                _ => {}
            }
        }
        true
    }

    /// The extension kinds no fuzz input may send.
    const UNVETTED_KINDS: &[Kind] = &[
        Kind::FsRequest,
        Kind::NetConnect,
        Kind::Attach,
        Kind::Detach,
    ];

    fn harmless(e: &Exec) -> bool {
        let args_ok = match e.cmd.as_str() {
            "/bin/true" | "true" | "/bin/echo" | "echo" | "agentd-fuzz-no-such-program" => true,
            "/bin/cat" | "cat" => e.args.iter().all(|a| a == "nul\0byte"),
            "/bin/sleep" | "sleep" => e.args.iter().all(|a| a == "0" || a == "nul\0byte"),
            _ => false,
        };
        let env_ok = e
            .env
            .iter()
            .all(|v| ["FUZZ=1", "NOEQUALS", "=empty"].contains(&v.as_str()));
        // Limits that would make a child dump core or be killed by the
        // kernel are left out.
        let rlimits_ok = e
            .rlimits
            .iter()
            .all(|r| !["core", "cpu", "fsize"].contains(&r.resource.as_str()));
        args_ok && env_ok && rlimits_ok
    }

    /// What the host knows of one session id.
    #[derive(Default)]
    struct IdState {
        /// EXECs sent and not yet answered with STARTED or EXEC_FAILED.
        outstanding: u32,
        /// Between STARTED and EXITED.
        live: bool,
    }

    #[derive(Default)]
    struct Model {
        ready: bool,
        shutdown_done: bool,
        ids: HashMap<u32, IdState>,
        /// Payloads and ids of the PINGs the agent will answer, in order.
        pings: Vec<(u32, Vec<u8>)>,
        pongs: usize,
        /// Barrier payloads already answered.
        barriers_seen: HashSet<Vec<u8>>,
        frames: usize,
        /// Output bytes received and not yet acknowledged, per session.
        unacked: HashMap<u32, u64>,
        /// The script's stream holds a framing error (as the vetting
        /// decodes it): only then may the agent report one. Otherwise an
        /// ERROR `malformed_frame` or `frame_too_large` means the agent
        /// lost its place in the stream (for example a STDIN payload that
        /// streams read as a header).
        framing_errors_possible: bool,
        summary: Summary,
    }

    /// What one run saw (for the corpus replay test to check that the
    /// seeds reach the agent).
    #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
    pub struct Summary {
        /// The input was skipped by the vetting.
        pub skipped: bool,
        pub frames: usize,
        pub started: usize,
        pub exec_failed: usize,
        pub exited: usize,
        pub output_frames: usize,
        pub stdin_acks: usize,
        pub errors: usize,
        pub pongs: usize,
        /// SESSIONS and the clock's replies.
        pub extension_replies: usize,
        pub shutdown_done: bool,
    }

    impl Model {
        fn on_frame(&mut self, kind: u8, id: u32, payload: &[u8]) {
            let frame = codec::Frame { kind, id, payload };
            let msg = Message::decode_from_agent(frame).unwrap_or_else(|e| {
                panic!("the agent sent a frame that does not decode: kind {kind:#x} id {id}: {e}")
            });
            assert!(!self.shutdown_done, "{msg:?} after SHUTDOWN_DONE");
            self.frames += 1;
            if self.frames == 1 {
                assert!(matches!(msg, Message::Ready(_)), "first frame {msg:?}");
            }
            match msg {
                Message::Ready(r) => {
                    assert!(!self.ready, "a second READY");
                    assert_eq!((id, r.protocol), (0, 1));
                    self.ready = true;
                }
                Message::Pong(p) => {
                    let (ping_id, expected) = self
                        .pings
                        .get(self.pongs)
                        .unwrap_or_else(|| panic!("a PONG for no PING: {p:?}"));
                    assert_eq!((id, p), (*ping_id, &expected[..]), "PONG out of order");
                    if p.starts_with(b"\xfe\xfeagentd-fuzz-barrier-") {
                        self.barriers_seen.insert(p.to_vec());
                    }
                    self.pongs += 1;
                }
                Message::ShutdownDone => {
                    assert_eq!(id, 0);
                    for (id, s) in &self.ids {
                        assert!(!s.live, "SHUTDOWN_DONE while session {id} runs");
                    }
                    self.shutdown_done = true;
                }
                Message::Error(e) => {
                    assert!(e.error_kind().is_some(), "unknown ERROR kind {:?}", e.kind);
                    assert!(
                        self.framing_errors_possible
                            || !matches!(e.kind.as_str(), "malformed_frame" | "frame_too_large"),
                        "ERROR {} for a stream without framing errors: {}",
                        e.kind,
                        e.message
                    );
                    self.summary.errors += 1;
                }
                Message::Started(_) => {
                    let s = self.ids.entry(id).or_default();
                    assert!(s.outstanding > 0, "STARTED for {id} without an EXEC");
                    assert!(!s.live, "STARTED for {id}, which is running");
                    s.outstanding -= 1;
                    s.live = true;
                    self.summary.started += 1;
                }
                Message::ExecFailed(x) => {
                    let s = self.ids.entry(id).or_default();
                    assert!(
                        s.outstanding > 0,
                        "EXEC_FAILED for {id} without an EXEC: {x:?}"
                    );
                    let kind = x
                        .failed_kind()
                        .unwrap_or_else(|| panic!("unknown EXEC_FAILED kind {:?}", x.kind));
                    if kind == ExecFailedKind::DuplicateId {
                        assert!(
                            s.live || s.outstanding >= 2,
                            "duplicate_id for {id}, which is free"
                        );
                    } else {
                        assert!(!s.live, "{x:?} for {id}, which is running");
                    }
                    s.outstanding -= 1;
                    self.summary.exec_failed += 1;
                }
                Message::Stdout(p) | Message::Stderr(p) => {
                    let live = self.ids.get(&id).is_some_and(|s| s.live);
                    assert!(live, "output for session {id}, which is not running");
                    assert!(!p.is_empty() && p.len() <= MAX_OUTPUT_PAYLOAD);
                    *self.unacked.entry(id).or_default() += p.len() as u64;
                    self.summary.output_frames += 1;
                }
                Message::StdinAck(_) => {
                    let live = self.ids.get(&id).is_some_and(|s| s.live);
                    assert!(live, "STDIN_ACK for session {id}, which is not running");
                    self.summary.stdin_acks += 1;
                }
                Message::Exited(x) => {
                    let s = self.ids.entry(id).or_default();
                    assert!(s.live, "EXITED for session {id}, which is not running");
                    assert!(x.code.is_some() != x.signal.is_some(), "{x:?}");
                    s.live = false;
                    self.summary.exited += 1;
                }
                // The answers to LIST and the clock's requests: the agent's
                // own, well formed as the decoding checked.
                Message::Sessions(_) | Message::Clock(_) => self.summary.extension_replies += 1,
                other => unreachable!("decode_from_agent let {other:?} through"),
            }
        }

        fn settled(&self) -> bool {
            self.ids.values().all(|s| s.outstanding == 0 && !s.live)
        }
    }

    /// The agent's children as the kernel lists them.
    fn children() -> Vec<i32> {
        let mut pids = Vec::new();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
                    pids.extend(
                        text.split_whitespace()
                            .filter_map(|p| p.parse::<i32>().ok()),
                    );
                }
            }
        }
        pids
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
    }

    struct Host {
        /// The agent's output.
        rx: OwnedFd,
        /// The agent's input; `None` once closed (the agent's end of file).
        tx: Option<OwnedFd>,
        /// `rx` and `tx` are the same socket.
        socket: bool,
        dec: Decoder,
        model: Model,
        eof: bool,
        /// The agent's thread, nudged with SIGCHLD while the host waits:
        /// other threads of this process (libFuzzer's, the test
        /// harness's) do not block SIGCHLD, so the kernel may hand a
        /// child's SIGCHLD to one of them, where it is discarded, and the
        /// agent's signalfd never sees it.
        agent_tid: libc::pid_t,
        /// Stream items (frames and errors) and where each ends.
        items: Vec<Decoded>,
        ends: Vec<usize>,
        /// Items accounted as sent.
        sent_items: usize,
        written: usize,
        write_failed: bool,
        /// Acknowledge output as it arrives (at the end, like a host that
        /// consumes it): OUTPUT_ACKs queued here once the stream is out.
        auto_ack: bool,
        acks: Vec<u8>,
    }

    impl Host {
        /// Accounts the items whose last byte has been written.
        fn account(&mut self) {
            while self.sent_items < self.items.len() && self.ends[self.sent_items] <= self.written {
                if let Decoded::Frame(f) = &self.items[self.sent_items] {
                    match Message::decode_from_host(f.as_frame()) {
                        Ok(Message::Exec(_)) => {
                            self.model.ids.entry(f.id).or_default().outstanding += 1;
                        }
                        Ok(Message::Ping(p)) => self.model.pings.push((f.id, p.to_vec())),
                        _ => {}
                    }
                }
                self.sent_items += 1;
            }
        }

        fn read(&mut self) {
            loop {
                let mut reader = FdReader(self.rx.as_raw_fd());
                match self.dec.read_from(&mut reader) {
                    Ok(0) => {
                        assert!(
                            self.dec.is_at_boundary(),
                            "the agent's stream ended inside a frame"
                        );
                        self.eof = true;
                        return;
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                    // The agent closed its end with input unread, which
                    // only an agent that finished a SHUTDOWN may do: the
                    // kernel reports that after the last byte it sent.
                    Err(e)
                        if e.raw_os_error() == Some(libc::ECONNRESET)
                            && self.model.shutdown_done =>
                    {
                        assert!(
                            self.dec.is_at_boundary(),
                            "the agent's stream ended inside a frame"
                        );
                        self.eof = true;
                        return;
                    }
                    Err(e) => panic!("reading from the agent: {e}"),
                }
                while let Some(item) = self.dec.next_frame() {
                    let f = item.expect("the agent sends well-formed frames");
                    self.model.on_frame(f.kind, f.id, f.payload);
                }
            }
        }

        /// Writes `stream[written..upto]`, reading meanwhile (that must
        /// not take longer than [`WAIT`]: the agent reads its transport),
        /// then waits until `done` holds or `limit` passes. Returns whether
        /// `done` held.
        fn run_until(
            &mut self,
            stream: &[u8],
            upto: usize,
            limit: Duration,
            done: impl Fn(&Model) -> bool,
        ) -> bool {
            let write_deadline = Instant::now() + WAIT;
            let mut wait_deadline = None;
            loop {
                let now = Instant::now();
                if self.auto_ack && self.written >= upto {
                    for (id, n) in self.model.unacked.drain() {
                        let bytes = n.min(u64::from(u32::MAX)) as u32;
                        Message::OutputAck(Ack { bytes })
                            .encode(id, &mut self.acks)
                            .expect("a fuzz frame fits");
                    }
                }
                let acking = self.written >= upto && !self.acks.is_empty();
                let writing = (self.written < upto || acking)
                    && !self.write_failed
                    && !self.eof
                    && self.tx.is_some();
                let mut timeout = Duration::from_millis(2);
                if writing {
                    assert!(
                        now < write_deadline,
                        "the agent stopped reading its transport"
                    );
                } else {
                    if done(&self.model) {
                        return true;
                    }
                    let deadline = *wait_deadline.get_or_insert(now + limit);
                    if now >= deadline || self.eof {
                        return false;
                    }
                    timeout = timeout.min(deadline - now);
                }
                let tx = self.tx.as_ref().map_or(-1, |fd| fd.as_raw_fd());
                let mut pfds = [
                    libc::pollfd {
                        fd: self.rx.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        // A negative fd is ignored by poll.
                        fd: if writing { tx } else { -1 },
                        events: libc::POLLOUT,
                        revents: 0,
                    },
                ];
                // SAFETY: two valid pollfds.
                let n =
                    unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout.as_millis().max(1) as i32) };
                if n <= 0 {
                    // SAFETY: signalling a thread of this process that is
                    // alive (it holds the other end of the transport, and
                    // no end of file has been read).
                    unsafe {
                        libc::syscall(
                            libc::SYS_tgkill,
                            libc::getpid(),
                            self.agent_tid,
                            libc::SIGCHLD,
                        )
                    };
                    continue;
                }
                if pfds[0].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                    self.read();
                }
                if writing && pfds[1].revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0
                {
                    let rest = if acking {
                        &self.acks[..]
                    } else {
                        &stream[self.written..upto]
                    };
                    // SAFETY: writing from a valid slice to our nonblocking
                    // fd (SIGPIPE is ignored: see `ignore_sigpipe`).
                    let n = unsafe { libc::write(tx, rest.as_ptr().cast(), rest.len()) };
                    if n > 0 && acking {
                        self.acks.drain(..n as usize);
                    } else if n > 0 {
                        self.written += n as usize;
                        self.account();
                    } else if n < 0 {
                        match std::io::Error::last_os_error().raw_os_error() {
                            Some(libc::EAGAIN | libc::EINTR) => {}
                            // The agent has gone (SHUTDOWN): it reads no more.
                            _ => self.write_failed = true,
                        }
                    }
                }
            }
        }
    }

    /// Reads a nonblocking fd (a socket or a pipe).
    struct FdReader(RawFd);

    impl std::io::Read for FdReader {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            // SAFETY: reading into a valid buffer.
            let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }
    }

    fn socketpair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
        // SAFETY: both fds were just created and are owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Two pipes, both ends nonblocking and close-on-exec: (read, write).
    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
        // SAFETY: both fds were just created and are owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// Once per process: a write to a pipe the agent has closed is EPIPE,
    /// not a SIGPIPE that ends the process (libFuzzer's main does not
    /// ignore SIGPIPE as Rust's does). Children get default dispositions
    /// from the agent whatever this process has.
    fn ignore_sigpipe() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: setting a signal disposition to SIG_IGN.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        });
    }

    /// Once per process: no core files from children, whatever happens.
    fn no_core_dumps() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let zero = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: a valid rlimit.
            unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
        });
    }

    /// Runs one input; see [`super::agent_dispatch`].
    pub fn run(data: &[u8]) -> Summary {
        no_core_dumps();
        ignore_sigpipe();
        let Script {
            config,
            pipes,
            mut stream,
            stops,
        } = parse(data);
        let shutdown_sent = |items: &[Decoded]| {
            items.iter().any(|i| {
                matches!(i, Decoded::Frame(f)
                    if matches!(Message::decode_from_host(f.as_frame()), Ok(Message::Shutdown(_))))
            })
        };

        // Bring the stream to a frame boundary (zero padding) so that the
        // epilogue is read as frames, unless that takes more than a
        // maximal frame (an oversized one being skipped).
        let boundary = pad_to_boundary(&mut stream);
        let (pre_items, _) = codec::decode_chunks([&stream[..]]);
        let shutdown = shutdown_sent(&pre_items);
        let mut exec_ids: Vec<u32> = pre_items
            .iter()
            .filter_map(|i| match i {
                Decoded::Frame(f) if f.kind == Kind::Exec as u8 => Some(f.id),
                _ => None,
            })
            .collect();
        exec_ids.sort_unstable();
        exec_ids.dedup();
        // Ids that ran (or may run) on a terminal: the script's bytes may
        // have stopped its output (^S, with IXON on), which only ^Q
        // restarts, as on any terminal.
        let tty_ids: Vec<u32> = pre_items
            .iter()
            .filter_map(|i| match i {
                Decoded::Frame(f) if f.kind == Kind::Exec as u8 => {
                    match Message::decode_from_host(f.as_frame()) {
                        Ok(Message::Exec(e)) if e.tty => Some(f.id),
                        _ => None,
                    }
                }
                _ => None,
            })
            .collect();
        // Of those, the ids whose input held ^S and whose stdin the script
        // itself may have closed: once closed, no ^Q can reach the
        // terminal, and its child stays blocked writing to the stopped
        // terminal (as on any terminal). Those are SIGKILLed at the end.
        let stopped_ids: Vec<u32> = pre_items
            .iter()
            .filter_map(|i| match i {
                Decoded::Frame(f)
                    if f.kind == Kind::Stdin as u8
                        && f.payload.contains(&0x13)
                        && tty_ids.contains(&f.id) =>
                {
                    Some(f.id)
                }
                _ => None,
            })
            .collect();
        let epilogue = boundary && !shutdown;
        let final_barrier = barrier_payload(u32::MAX);
        if epilogue {
            for &id in &exec_ids {
                Message::Signal(Signal {
                    signal: libc::SIGCONT,
                    group: true,
                    tree: false,
                })
                .encode(id, &mut stream)
                .expect("a fuzz frame fits");
                Message::OutputAck(Ack { bytes: u32::MAX })
                    .encode(id, &mut stream)
                    .expect("a fuzz frame fits");
                if tty_ids.contains(&id) {
                    // Twice: a pending ^V (literal next) takes the first.
                    Message::Stdin(b"\x11\x11")
                        .encode(id, &mut stream)
                        .expect("a fuzz frame fits");
                }
                if stopped_ids.contains(&id) {
                    Message::Signal(Signal {
                        signal: libc::SIGKILL,
                        group: true,
                        tree: false,
                    })
                    .encode(id, &mut stream)
                    .expect("a fuzz frame fits");
                }
                Message::StdinClose
                    .encode(id, &mut stream)
                    .expect("a fuzz frame fits");
            }
            codec::append_raw(&mut stream, Kind::Ping as u8, 0, &final_barrier)
                .expect("a fuzz frame fits");
        }

        let (items, _) = codec::decode_chunks([&stream[..]]);
        let (ends, _) = item_ends(&stream);
        assert_eq!(
            ends.len(),
            items.len(),
            "item_ends disagrees with the decoder"
        );
        if !vet(&items) {
            return Summary {
                skipped: true,
                ..Summary::default()
            };
        }

        let fds_before = open_fds();
        assert!(children().is_empty(), "children before the run");
        let (rx, tx, agent_in, agent_out) = if pipes {
            let (agent_in, tx) = pipe();
            let (rx, agent_out) = pipe();
            (rx, tx, agent_in, Some(agent_out))
        } else {
            let (host_sock, agent_sock) = socketpair();
            let tx = host_sock.try_clone().expect("dup");
            (host_sock, tx, agent_sock, None)
        };
        let (tid_tx, tid_rx) = mpsc::channel();
        let agent = std::thread::spawn(move || {
            crate::agent::setup_signals().expect("blocking signals");
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let transport = match agent_out {
                Some(out) => Transport::from_pipes(agent_in, out),
                None => Transport::from_fd(agent_in, TransportKind::Socket),
            };
            let mut event_loop = EventLoop::new(config, transport).expect("the event loop");
            event_loop.run()
        });
        let agent_tid = tid_rx.recv().expect("the agent thread started");
        let mut host = Host {
            rx,
            tx: Some(tx),
            socket: !pipes,
            dec: Decoder::new(),
            model: Model {
                framing_errors_possible: items.iter().any(|i| matches!(i, Decoded::Error(_))),
                ..Model::default()
            },
            eof: false,
            agent_tid,
            items,
            ends,
            sent_items: 0,
            written: 0,
            write_failed: false,
            auto_ack: false,
            acks: Vec::new(),
        };
        host.run_until(&stream, 0, WAIT, |m| m.ready);
        assert!(host.model.ready || host.eof, "no READY");

        // The script, stop by stop.
        for (offset, stop) in &stops {
            let offset = (*offset).min(stream.len());
            match stop {
                Stop::Barrier(payload) => {
                    // Wait only for a barrier the agent decodes as a PING.
                    let decoded = host.items.iter().any(|i| {
                        matches!(i, Decoded::Frame(f)
                            if f.kind == Kind::Ping as u8 && f.payload == *payload)
                    });
                    host.run_until(&stream, offset, WAIT, |m| {
                        !decoded || m.barriers_seen.contains(payload) || m.shutdown_done
                    });
                }
                Stop::Pause(d) => {
                    host.run_until(&stream, offset, *d, |_| false);
                }
            }
        }
        let all = stream.len();
        if epilogue {
            let answered = host.run_until(&stream, all, WAIT, |m| {
                m.barriers_seen.contains(&final_barrier)
            });
            assert!(answered || host.eof, "the final PING was not answered");
            host.auto_ack = true;
            let settled = host.run_until(&stream, all, WAIT, Model::settled);
            assert!(
                settled,
                "sessions did not end after SIGCONT, OUTPUT_ACK and STDIN_CLOSE"
            );
        } else {
            // SHUTDOWN ends the agent by itself; otherwise give sessions a
            // moment before the end of file kills them.
            let limit = if shutdown {
                WAIT
            } else {
                Duration::from_millis(20)
            };
            host.run_until(&stream, all, limit, |m| m.shutdown_done);
        }
        // End of file for the agent.
        if host.socket {
            // SAFETY: shutting down the write side of our own socket.
            unsafe { libc::shutdown(host.rx.as_raw_fd(), libc::SHUT_WR) };
        }
        host.tx = None;
        let deadline = Instant::now() + WAIT + WAIT;
        while !host.eof {
            assert!(
                Instant::now() < deadline,
                "the agent did not close the connection"
            );
            let mut pfd = libc::pollfd {
                fd: host.rx.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 10) };
            host.read();
        }
        let exit = agent.join().expect("the agent thread panicked");
        if host.model.shutdown_done {
            assert_eq!(exit, Exit::Shutdown);
        } else {
            assert_eq!(exit, Exit::TransportClosed);
        }
        if !shutdown {
            assert_eq!(
                host.model.pongs,
                host.model.pings.len(),
                "PINGs left unanswered"
            );
        }
        let summary = Summary {
            frames: host.model.frames,
            pongs: host.model.pongs,
            shutdown_done: host.model.shutdown_done,
            ..host.model.summary
        };
        drop(host);
        let left = children();
        assert!(left.is_empty(), "children left behind: {left:?}");
        assert_eq!(open_fds(), fds_before, "fds leaked");
        summary
    }
}
