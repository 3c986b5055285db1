//! Property tests of the frame decoder: any stream of frames, cut into any
//! chunks, decodes to the same frames; garbage interleaved at frame
//! boundaries (short lengths, oversized lengths up to `u32::MAX`, and
//! honest-length frames of any kind byte with any payload) is reported in
//! order, each item as the matching `FrameError` or message-level
//! `ProtocolError`, and the decoder stays in step: every valid message
//! after the garbage decodes exactly.

use std::io;

use agentd::codec::{
    self, Decoded, Decoder, FrameError, OwnedFrame, HEADER_LEN, LEN_OVERHEAD, MAX_PAYLOAD,
    MAX_PING_PAYLOAD, READ_CHUNK,
};
use agentd::messages::{
    Ack, Direction, Encoding, ErrorKind, ErrorMsg, Exec, ExecFailed, Exited, Kind, Message,
    ProtocolError, Ready, Resize, Rlimit, Shutdown, Signal, Started,
};
use proptest::prelude::*;

/// One item of a generated stream.
#[derive(Debug, Clone)]
enum Item {
    /// A frame with an honest length: any kind byte (most of them unknown
    /// kinds), any id, any payload bytes.
    Frame(OwnedFrame),
    /// A valid message of protocol v1, as this crate encodes it.
    Message { id: u32, msg: Msg },
    /// `len` < 5, then exactly `len` bytes.
    Malformed { len: u32, bytes: Vec<u8> },
    /// `len` > 5 + MAX_PAYLOAD, then the whole `len` bytes (kind, id and
    /// `len - 5` bytes of `fill`), streamed without being materialised.
    Oversized {
        kind: u8,
        id: u32,
        len: u32,
        fill: u8,
    },
}

impl Item {
    fn write(&self, out: &mut Stream) {
        match self {
            Item::Frame(f) => {
                let mut b = Vec::new();
                f.as_frame().encode(&mut b).expect("the test's frames fit");
                out.bytes(&b);
            }
            Item::Message { id, msg } => out.bytes(&msg.message().to_bytes(*id)),
            Item::Malformed { len, bytes } => {
                out.bytes(&len.to_be_bytes());
                out.bytes(bytes);
            }
            Item::Oversized {
                kind,
                id,
                len,
                fill,
            } => {
                out.bytes(&len.to_be_bytes());
                out.bytes(&[*kind]);
                out.bytes(&id.to_be_bytes());
                out.fill(u64::from(*len - LEN_OVERHEAD), *fill);
            }
        }
    }

    fn expected(&self) -> Decoded {
        match self {
            Item::Frame(f) => Decoded::Frame(f.clone()),
            Item::Message { id, msg } => {
                let wire = msg.message().to_bytes(*id);
                Decoded::Frame(OwnedFrame {
                    kind: wire[4],
                    id: *id,
                    payload: wire[HEADER_LEN..].to_vec(),
                })
            }
            Item::Malformed { len, .. } => Decoded::Error(FrameError::Malformed { len: *len }),
            Item::Oversized { kind, id, len, .. } => Decoded::Error(FrameError::TooLarge {
                kind: *kind,
                id: *id,
                len: *len,
            }),
        }
    }
}

/// A byte stream as segments, so that the `len - 5` bytes of an oversized
/// frame (up to 4 GiB) are produced as they are fed, never held.
#[derive(Debug, Default)]
struct Stream {
    segments: Vec<Segment>,
}

#[derive(Debug)]
enum Segment {
    Bytes(Vec<u8>),
    Fill { len: u64, byte: u8 },
}

impl Segment {
    fn len(&self) -> u64 {
        match self {
            Segment::Bytes(b) => b.len() as u64,
            Segment::Fill { len, .. } => *len,
        }
    }
}

/// Inside a fill segment, until this many of its bytes are left, chunks are
/// [`BIG_CHUNK`] long whatever the chunk sizes say (cutting 4 GiB into the
/// small sizes would take hours); the last bytes, and everything else, are
/// cut by the chunk sizes, so the end of a skipped frame falls anywhere in a
/// chunk.
const FILL_TAIL: u64 = 70_000;
const BIG_CHUNK: usize = 1 << 20;

/// One chunk of a [`Stream`].
enum Chunk {
    Bytes(Vec<u8>),
    /// `len` bytes, all `byte`, inside one fill segment.
    Fill {
        len: usize,
        byte: u8,
    },
}

impl Stream {
    fn bytes(&mut self, b: &[u8]) {
        if let Some(Segment::Bytes(last)) = self.segments.last_mut() {
            last.extend_from_slice(b);
        } else {
            self.segments.push(Segment::Bytes(b.to_vec()));
        }
    }

    fn fill(&mut self, len: u64, byte: u8) {
        self.segments.push(Segment::Fill { len, byte });
    }

    /// The whole stream, for streams known to be small.
    fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for s in &self.segments {
            match s {
                Segment::Bytes(b) => out.extend_from_slice(b),
                Segment::Fill { len, byte } => {
                    assert!(*len < 1 << 24, "a stream too large to materialise");
                    out.resize(out.len() + *len as usize, *byte);
                }
            }
        }
        out
    }

    /// The stream cut by `sizes` (cycled), as a lazy sequence of chunks.
    fn chunks<'a>(&'a self, sizes: &'a [usize]) -> Chunks<'a> {
        Chunks {
            stream: self,
            sizes,
            next_size: 0,
            segment: 0,
            offset: 0,
        }
    }
}

struct Chunks<'a> {
    stream: &'a Stream,
    sizes: &'a [usize],
    next_size: usize,
    segment: usize,
    /// Bytes of `segment` already produced.
    offset: u64,
}

impl Iterator for Chunks<'_> {
    type Item = Chunk;

    fn next(&mut self) -> Option<Chunk> {
        let segments = &self.stream.segments;
        while self.segment < segments.len() && self.offset == segments[self.segment].len() {
            self.segment += 1;
            self.offset = 0;
        }
        let first = segments.get(self.segment)?;
        let size = self.sizes[self.next_size % self.sizes.len()];
        self.next_size += 1;
        if let Segment::Fill { len, byte } = *first {
            let left = len - self.offset;
            if left > FILL_TAIL {
                let n = (left - FILL_TAIL).min(BIG_CHUNK as u64);
                self.offset += n;
                return Some(Chunk::Fill {
                    len: n as usize,
                    byte,
                });
            }
        }
        // `size` bytes, across segments where the chunk reaches past one.
        let mut out = Vec::with_capacity(size);
        while out.len() < size && self.segment < segments.len() {
            let seg = &segments[self.segment];
            let n = (seg.len() - self.offset).min((size - out.len()) as u64) as usize;
            match seg {
                Segment::Bytes(b) => {
                    let at = self.offset as usize;
                    out.extend_from_slice(&b[at..at + n]);
                }
                Segment::Fill { byte, .. } => out.resize(out.len() + n, *byte),
            }
            self.offset += n as u64;
            if self.offset == seg.len() {
                self.segment += 1;
                self.offset = 0;
            }
        }
        Some(Chunk::Bytes(out))
    }
}

/// A valid message of protocol v1, owning its raw payload.
#[derive(Debug, Clone)]
enum Msg {
    /// PING (at most 4 KiB), PONG, STDIN, STDOUT or STDERR.
    Raw(Kind, Vec<u8>),
    /// A map or empty kind (nothing borrowed).
    Typed(Message<'static>),
}

impl Msg {
    fn message(&self) -> Message<'_> {
        match self {
            Msg::Raw(kind, p) => match kind {
                Kind::Ping => Message::Ping(p),
                Kind::Pong => Message::Pong(p),
                Kind::Stdin => Message::Stdin(p),
                Kind::Stdout => Message::Stdout(p),
                Kind::Stderr => Message::Stderr(p),
                other => unreachable!("{other:?} is not raw"),
            },
            Msg::Typed(m) => m.clone(),
        }
    }
}

fn text() -> impl Strategy<Value = String> {
    ".{0,12}"
}

fn texts() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(text(), 0..4)
}

fn exec() -> impl Strategy<Value = Exec> {
    let rlimit = (text(), any::<u64>(), any::<u64>()).prop_map(|(resource, soft, hard)| Rlimit {
        resource,
        soft,
        hard,
    });
    (
        (text(), texts(), texts(), any::<bool>()),
        (
            prop::option::of(text()),
            prop::option::of(text()),
            any::<bool>(),
            any::<u16>(),
            any::<u16>(),
        ),
        (
            prop::collection::vec(rlimit, 0..3),
            any::<bool>(),
            any::<u32>(),
            any::<u32>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (cmd, args, env, clear_env),
                (cwd, user, tty, rows, cols),
                (rlimits, stdin, output_window, linger_ms, no_new_privs),
            )| Exec {
                cmd,
                args,
                env,
                clear_env,
                cwd,
                user,
                tty,
                rows,
                cols,
                rlimits,
                stdin,
                output_window,
                linger_ms,
                no_new_privs,
                tag: None,
                replay_bytes: None,
                timeout_ms: None,
                kill_grace_ms: None,
                detach: false,
                memory_max: None,
                pids_max: None,
                cpu_max: None,
            },
        )
}

/// Any valid message of any kind, with any values.
fn message() -> impl Strategy<Value = Msg> {
    let raw = (
        prop::sample::select(vec![
            Kind::Ping,
            Kind::Pong,
            Kind::Stdin,
            Kind::Stdout,
            Kind::Stderr,
        ]),
        payload(),
    )
        .prop_map(|(kind, mut p)| {
            if kind == Kind::Ping {
                p.truncate(MAX_PING_PAYLOAD);
            }
            Msg::Raw(kind, p)
        });
    let ready = (
        (any::<u32>(), text(), any::<u32>(), any::<bool>()),
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            prop::option::of(any::<u64>()),
        ),
    )
        .prop_map(
            |(
                (protocol, agent, pid, pid1),
                (max_payload, stdin_window, max_sessions, uptime_ms),
            )| {
                Message::Ready(Ready {
                    protocol,
                    agent,
                    pid,
                    pid1,
                    max_payload,
                    stdin_window,
                    max_sessions,
                    uptime_ms,
                    features: Vec::new(),
                    realtime_ns: None,
                    restores: None,
                    clock_set: None,
                    replay_bytes: None,
                    cgroups: None,
                    mounts: Vec::new(),
                })
            },
        );
    let error = (
        prop::sample::select(ErrorKind::ALL),
        text(),
        prop::option::of(any::<u8>()),
    )
        .prop_map(|(kind, message, frame_kind)| {
            Message::Error(ErrorMsg::new(kind, message, frame_kind))
        });
    let exec_failed = (
        text(),
        text(),
        prop::option::of(any::<i32>()),
        prop::option::of(text()),
    )
        .prop_map(|(kind, message, errno, stage)| {
            Message::ExecFailed(ExecFailed {
                kind,
                message,
                errno,
                stage,
            })
        });
    let exited = (
        prop::option::of(any::<i32>()),
        prop::option::of(any::<i32>()),
        any::<bool>(),
        any::<i32>(),
    )
        .prop_map(|(code, signal, core_dumped, status)| {
            Message::Exited(Exited {
                code,
                signal,
                core_dumped,
                status,
                output_dropped: None,
                timed_out: false,
                oom_killed: false,
            })
        });
    let typed = prop_oneof![
        ready,
        any::<u32>().prop_map(|grace_ms| Message::Shutdown(Shutdown { grace_ms })),
        Just(Message::ShutdownDone),
        error,
        exec().prop_map(|e| Message::Exec(Box::new(e))),
        any::<u32>().prop_map(|pid| Message::Started(Started { pid, session: None })),
        exec_failed,
        Just(Message::StdinClose),
        any::<u32>().prop_map(|bytes| Message::StdinAck(Ack { bytes })),
        (any::<u16>(), any::<u16>())
            .prop_map(|(rows, cols)| Message::Resize(Resize { rows, cols })),
        (any::<i32>(), any::<bool>()).prop_map(|(signal, group)| Message::Signal(Signal {
            signal,
            group,
            tree: false
        })),
        any::<u32>().prop_map(|bytes| Message::OutputAck(Ack { bytes })),
        exited,
    ]
    .prop_map(Msg::Typed);
    prop_oneof![raw, typed]
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..16),
        2 => prop::collection::vec(any::<u8>(), 0..600),
        1 => prop::collection::vec(any::<u8>(), 0..4096),
    ]
}

/// Any kind byte, a known kind (with a payload that need not suit it) a
/// third of the time.
fn kind_byte() -> impl Strategy<Value = u8> {
    let known: Vec<u8> = Kind::ALL.iter().map(|&k| k as u8).collect();
    prop_oneof![2 => any::<u8>(), 1 => prop::sample::select(known)]
}

fn frame() -> impl Strategy<Value = OwnedFrame> {
    (kind_byte(), any::<u32>(), payload()).prop_map(|(kind, id, payload)| OwnedFrame {
        kind,
        id,
        payload,
    })
}

fn malformed() -> impl Strategy<Value = Item> {
    (0u32..LEN_OVERHEAD)
        .prop_flat_map(|len| {
            prop::collection::vec(any::<u8>(), len as usize)
                .prop_map(move |bytes| Item::Malformed { len, bytes })
        })
        .boxed()
}

/// An oversized frame: `len` anywhere from one byte over the limit to
/// `u32::MAX`, with both ends and lengths just over the limit favoured.
fn oversized() -> impl Strategy<Value = Item> {
    let min = LEN_OVERHEAD + MAX_PAYLOAD as u32 + 1;
    let len = prop_oneof![
        3 => min..min + 70_000,
        2 => min..=u32::MAX,
        1 => Just(min),
        1 => Just(u32::MAX),
    ];
    (kind_byte(), any::<u32>(), len, any::<u8>()).prop_map(|(kind, id, len, fill)| {
        Item::Oversized {
            kind,
            id,
            len,
            fill,
        }
    })
}

/// Chunk sizes, cycled over the stream: tiny ones (down to single bytes)
/// and large ones.
fn chunk_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(
        prop_oneof![3 => 1usize..20, 2 => 1usize..5000, 1 => 1usize..300_000],
        1..12,
    )
}

fn cut<'a>(stream: &'a [u8], sizes: &[usize]) -> Vec<&'a [u8]> {
    let mut chunks = Vec::new();
    let mut rest = stream;
    for &n in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (a, b) = rest.split_at(n.min(rest.len()));
        chunks.push(a);
        rest = b;
    }
    chunks
}

fn stream_of(items: &[Item]) -> (Stream, Vec<Decoded>) {
    let mut stream = Stream::default();
    for i in items {
        i.write(&mut stream);
    }
    (stream, items.iter().map(Item::expected).collect())
}

/// A small stream, materialised.
fn build(items: &[Item]) -> (Vec<u8>, Vec<Decoded>) {
    let (stream, expected) = stream_of(items);
    (stream.to_vec(), expected)
}

fn drain(dec: &mut Decoder, out: &mut Vec<Decoded>) {
    while let Some(item) = dec.next_frame() {
        out.push(match item {
            Ok(f) => Decoded::Frame(f.to_owned()),
            Err(e) => Decoded::Error(e),
        });
    }
}

/// Feeds the chunks one by one, checking the memory bound after each.
fn feed_all<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Decoded>, Decoder) {
    let mut max_chunk = 0;
    let mut dec = Decoder::new();
    let mut out = Vec::new();
    for c in chunks {
        max_chunk = max_chunk.max(c.len());
        dec.feed(c);
        assert!(dec.capacity() <= HEADER_LEN + MAX_PAYLOAD + max_chunk);
        drain(&mut dec, &mut out);
    }
    (out, dec)
}

/// Feeds a lazy stream's chunks (fill chunks from one reused buffer).
fn feed_stream(stream: &Stream, sizes: &[usize]) -> (Vec<Decoded>, Decoder) {
    let mut fill = Vec::new();
    let mut max_chunk = 0;
    let mut dec = Decoder::new();
    let mut out = Vec::new();
    for chunk in stream.chunks(sizes) {
        let c = match &chunk {
            Chunk::Bytes(b) => &b[..],
            Chunk::Fill { len, byte } => {
                if fill.first() != Some(byte) {
                    fill = vec![*byte; BIG_CHUNK];
                }
                &fill[..*len]
            }
        };
        max_chunk = max_chunk.max(c.len());
        dec.feed(c);
        assert!(dec.capacity() <= HEADER_LEN + MAX_PAYLOAD + max_chunk);
        drain(&mut dec, &mut out);
    }
    (out, dec)
}

/// A reader over chunks: one chunk (or the part the caller asks for) per
/// read.
struct ChunkReader<I: Iterator<Item = Chunk>> {
    chunks: I,
    current: Chunk,
    /// Bytes of `current` already read.
    at: usize,
}

impl<I: Iterator<Item = Chunk>> io::Read for ChunkReader<I> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let left = match &self.current {
                Chunk::Bytes(b) => b.len(),
                Chunk::Fill { len, .. } => *len,
            } - self.at;
            if left > 0 {
                let n = left.min(buf.len());
                match &self.current {
                    Chunk::Bytes(b) => buf[..n].copy_from_slice(&b[self.at..self.at + n]),
                    Chunk::Fill { byte, .. } => buf[..n].fill(*byte),
                }
                self.at += n;
                return Ok(n);
            }
            match self.chunks.next() {
                Some(c) => {
                    self.current = c;
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
    }
}

/// Reads chunks through `Decoder::read_from`.
fn read_chunks(chunks: impl Iterator<Item = Chunk>) -> (Vec<Decoded>, Decoder) {
    let mut src = ChunkReader {
        chunks,
        current: Chunk::Bytes(Vec::new()),
        at: 0,
    };
    let mut dec = Decoder::new();
    let mut out = Vec::new();
    while dec.read_from(&mut src).unwrap() > 0 {
        assert!(dec.capacity() <= HEADER_LEN + MAX_PAYLOAD + READ_CHUNK);
        drain(&mut dec, &mut out);
    }
    (out, dec)
}

fn read_all(chunks: &[&[u8]]) -> (Vec<Decoded>, Decoder) {
    read_chunks(chunks.iter().map(|c| Chunk::Bytes(c.to_vec())))
}

/// Checks that `decoded`, the decoder's item for `item`, is reported as
/// what `item` is: a framing error as its `FrameError` (and the ERROR kind,
/// id and `frame_kind` an answer carries); a valid message as exactly that
/// message, by either decoder and by its direction's receiver; a garbage
/// frame as `unknown_kind` (any receiver), `wrong_direction` (the other
/// direction's receiver), `bad_payload` where its payload cannot be one
/// (not a map for a map kind, a PING over 4 KiB), else a message of its kind
/// or `bad_payload`.
fn check_report(item: &Item, decoded: &Decoded) -> Result<(), TestCaseError> {
    match (item, decoded) {
        (Item::Message { id, msg }, Decoded::Frame(f)) => {
            // A valid message after any garbage decodes exactly.
            let want = msg.message();
            prop_assert_eq!(f.id, *id);
            let any = Message::decode(f.as_frame());
            prop_assert_eq!(any.as_ref(), Ok(&want));
            let (right, wrong) = directed(f);
            prop_assert_eq!(right.as_ref(), Ok(&want));
            prop_assert_eq!(wrong, Err(ProtocolError::WrongDirection(want.kind())));
        }
        (Item::Frame(g), Decoded::Frame(f)) => {
            prop_assert_eq!(g, f);
            let any = Message::decode(f.as_frame());
            let Some(kind) = Kind::from_u8(f.kind) else {
                // Unknown kind: reported as such by every receiver.
                let unknown = Err(ProtocolError::UnknownKind(f.kind));
                prop_assert_eq!(&any, &unknown);
                prop_assert_eq!(&Message::decode_from_host(f.as_frame()), &unknown);
                prop_assert_eq!(&Message::decode_from_agent(f.as_frame()), &unknown);
                return Ok(());
            };
            let (right, wrong) = directed(f);
            prop_assert_eq!(&right, &any);
            prop_assert_eq!(wrong, Err(ProtocolError::WrongDirection(kind)));
            let p = &f.payload;
            let map_header = p
                .first()
                .is_some_and(|b| matches!(b, 0x80..=0x8f | 0xde | 0xdf));
            match kind.encoding() {
                Encoding::Raw if kind == Kind::Ping && p.len() > MAX_PING_PAYLOAD => {
                    prop_assert!(is_bad_payload(&any, kind), "{:?}", any);
                }
                // Any bytes are a raw payload, taken as they are.
                Encoding::Raw => match &any {
                    Ok(m) => {
                        prop_assert_eq!(m.kind(), kind);
                        prop_assert_eq!(m.to_bytes(f.id), wire(f));
                    }
                    Err(e) => prop_assert!(false, "raw {:?}: {}", kind, e),
                },
                // Not a map: bad_payload.
                _ if !p.is_empty() && !map_header => {
                    prop_assert!(
                        is_bad_payload(&any, kind),
                        "{:?} {:02x?}: {:?}",
                        kind,
                        p,
                        any
                    );
                }
                // A map (or nothing): a message of the kind, or bad_payload.
                _ => prop_assert!(
                    any.as_ref()
                        .map_or_else(|_| is_bad_payload(&any, kind), |m| m.kind() == kind),
                    "{:?}: {:?}",
                    kind,
                    any
                ),
            }
        }
        (Item::Malformed { len, .. }, Decoded::Error(e)) => {
            prop_assert_eq!(*e, FrameError::Malformed { len: *len });
            prop_assert_eq!(ProtocolError::from(*e).kind(), ErrorKind::MalformedFrame);
            prop_assert_eq!((e.id(), e.frame_kind()), (0, None));
        }
        (Item::Oversized { kind, id, len, .. }, Decoded::Error(e)) => {
            prop_assert_eq!(
                *e,
                FrameError::TooLarge {
                    kind: *kind,
                    id: *id,
                    len: *len
                }
            );
            prop_assert_eq!(ProtocolError::from(*e).kind(), ErrorKind::FrameTooLarge);
            prop_assert_eq!((e.id(), e.frame_kind()), (*id, Some(*kind)));
        }
        (item, decoded) => prop_assert!(false, "{item:?} decoded as {decoded:?}"),
    }
    Ok(())
}

type Decodes<'a> = Result<Message<'a>, ProtocolError>;

/// Whether `result` is `bad_payload` for `kind`.
fn is_bad_payload(result: &Decodes<'_>, kind: Kind) -> bool {
    matches!(result, Err(ProtocolError::BadPayload { kind: k, .. }) if *k == kind)
}

/// The frame decoded by the receiver of its kind's direction, and by the
/// other end.
fn directed(f: &OwnedFrame) -> (Decodes<'_>, Decodes<'_>) {
    let (host, agent) = (
        Message::decode_from_host(f.as_frame()),
        Message::decode_from_agent(f.as_frame()),
    );
    match Kind::from_u8(f.kind).map(Kind::direction) {
        Some(Direction::AgentToHost) => (agent, host),
        _ => (host, agent),
    }
}

fn wire(f: &OwnedFrame) -> Vec<u8> {
    let mut out = Vec::new();
    f.as_frame()
        .encode(&mut out)
        .expect("the test's frames fit");
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn valid_frames_in_any_chunks(
        frames in prop::collection::vec(frame(), 0..24),
        sizes in chunk_sizes(),
    ) {
        let items: Vec<Item> = frames.into_iter().map(Item::Frame).collect();
        let (stream, expected) = build(&items);
        let chunks = cut(&stream, &sizes);

        let (fed, dec) = feed_all(chunks.iter().copied());
        prop_assert_eq!(&fed, &expected);
        prop_assert!(dec.is_at_boundary());

        let (read, dec) = read_all(&chunks);
        prop_assert_eq!(&read, &expected);
        prop_assert!(dec.is_at_boundary());

        // Re-encoding the decoded frames gives the stream back.
        let mut again = Vec::new();
        for d in &fed {
            let Decoded::Frame(f) = d else { unreachable!() };
            f.as_frame().encode(&mut again).expect("the test's frames fit");
        }
        prop_assert_eq!(again, stream);
    }

    #[test]
    fn a_cut_stream_yields_a_prefix(
        frames in prop::collection::vec(frame(), 1..12),
        garbage in prop::collection::vec(malformed(), 0..4),
        at in any::<prop::sample::Index>(),
        sizes in chunk_sizes(),
    ) {
        let mut items: Vec<Item> = frames.into_iter().map(Item::Frame).collect();
        items.extend(garbage);
        let (stream, expected) = build(&items);
        let end = at.index(stream.len() + 1);
        let (got, dec) = feed_all(cut(&stream[..end], &sizes));
        prop_assert_eq!(&got[..], &expected[..got.len()]);
        // At a boundary exactly when the cut falls between two items.
        let mut boundaries = vec![0];
        let mut pos = 0;
        for i in &items {
            let mut b = Stream::default();
            i.write(&mut b);
            pos += b.to_vec().len();
            boundaries.push(pos);
        }
        prop_assert_eq!(dec.is_at_boundary(), boundaries.contains(&end));
        if dec.is_at_boundary() {
            let n = boundaries.iter().position(|&b| b == end).unwrap();
            prop_assert_eq!(got.len(), n);
        }
    }
}

proptest! {
    // An oversized frame may stream up to 4 GiB through the decoder (as a
    // fill, never held): fewer cases.
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn garbage_at_frame_boundaries_keeps_the_decoder_in_step(
        items in prop::collection::vec(
            prop_oneof![
                4 => (any::<u32>(), message()).prop_map(|(id, msg)| Item::Message { id, msg }),
                3 => frame().prop_map(Item::Frame),
                2 => malformed(),
            ],
            0..24,
        ),
        big in prop::collection::vec((any::<prop::sample::Index>(), oversized()), 0..4),
        sizes in chunk_sizes(),
    ) {
        let mut items = items;
        for (at, o) in big {
            let i = at.index(items.len() + 1);
            items.insert(i, o);
        }
        let (stream, expected) = stream_of(&items);

        let (fed, dec) = feed_stream(&stream, &sizes);
        prop_assert_eq!(&fed, &expected);
        prop_assert!(dec.is_at_boundary());

        let (read, dec) = read_chunks(stream.chunks(&sizes));
        prop_assert_eq!(&read, &expected);
        prop_assert!(dec.is_at_boundary());

        // Every item reported, in order, as what it is.
        for (item, decoded) in items.iter().zip(&fed) {
            check_report(item, decoded)?;
        }
    }
}

#[test]
fn the_frame_size_limit_is_exact() {
    // A payload of exactly MAX_PAYLOAD is a frame; one byte more is not.
    let payload = vec![7u8; MAX_PAYLOAD + 1];
    let mut wire = Vec::new();
    codec::append_raw(&mut wire, 0x30, 1, &payload[..MAX_PAYLOAD]).expect("the test's frames fit");
    let (items, dec) = codec::decode_chunks(wire.chunks(100_000));
    assert!(dec.is_at_boundary());
    assert!(matches!(&items[..], [Decoded::Frame(f)] if f.payload.len() == MAX_PAYLOAD));

    let len = LEN_OVERHEAD + MAX_PAYLOAD as u32 + 1;
    let mut wire = len.to_be_bytes().to_vec();
    wire.push(0x30);
    wire.extend_from_slice(&1u32.to_be_bytes());
    wire.extend_from_slice(&payload);
    codec::append_raw(&mut wire, 0x02, 2, b"after").expect("the test's frames fit");
    let (items, dec) = codec::decode_chunks(wire.chunks(100_000));
    assert!(dec.is_at_boundary());
    assert_eq!(
        items,
        [
            Decoded::Error(FrameError::TooLarge {
                kind: 0x30,
                id: 1,
                len
            }),
            Decoded::Frame(OwnedFrame {
                kind: 2,
                id: 2,
                payload: b"after".to_vec()
            })
        ]
    );
}

#[test]
fn every_short_length_is_malformed_and_skipped() {
    for len in 0..LEN_OVERHEAD {
        let mut wire = len.to_be_bytes().to_vec();
        // `len` bytes that look like a frame header, to be skipped.
        wire.extend(std::iter::repeat_n(0xffu8, len as usize));
        codec::append_raw(&mut wire, 0x21, 4, b"").expect("the test's frames fit");
        for chunk in [1, 2, 3, wire.len()] {
            let (items, dec) = codec::decode_chunks(wire.chunks(chunk));
            assert!(dec.is_at_boundary());
            assert_eq!(
                items,
                [
                    Decoded::Error(FrameError::Malformed { len }),
                    Decoded::Frame(OwnedFrame {
                        kind: 0x21,
                        id: 4,
                        payload: vec![]
                    })
                ],
                "len {len}, chunks of {chunk}"
            );
        }
    }
}

#[test]
fn encoder_helpers_leave_the_buffer_as_it_was_on_failure() {
    let mut out = Vec::new();
    codec::append_raw(&mut out, 0x02, 1, b"keep").expect("the test's frames fit");
    let before = out.clone();

    // append_with: the payload writer fails after writing some bytes.
    let r = codec::append_with(&mut out, 0x10, 2, |buf| {
        buf.extend_from_slice(b"partial");
        Err("no")
    });
    assert_eq!(r, Err(codec::AppendError::Payload("no")));
    assert_eq!(out, before);
    // ... and succeeds: the header's len is patched in place.
    codec::append_with(&mut out, 0x10, 2, |buf| {
        buf.extend_from_slice(b"\x80");
        Ok::<(), ()>(())
    })
    .unwrap();
    assert_eq!(&out[before.len()..], [0, 0, 0, 6, 0x10, 0, 0, 0, 2, 0x80]);

    // append_raw_from: an error or end of file appends nothing.
    let before = out.clone();
    struct Failing;
    impl io::Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::WouldBlock))
        }
    }
    let e = codec::append_raw_from(&mut out, 0x30, 3, &mut Failing, 100).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    assert_eq!(out, before);
    assert_eq!(
        codec::append_raw_from(&mut out, 0x30, 3, &mut io::empty(), 100).unwrap(),
        0
    );
    assert_eq!(out, before);
    // A read is capped at MAX_PAYLOAD whatever `max` says.
    let big = vec![1u8; MAX_PAYLOAD + 10];
    let n = codec::append_raw_from(&mut out, 0x30, 3, &mut &big[..], usize::MAX).unwrap();
    assert_eq!(n, MAX_PAYLOAD);
    let (items, dec) = codec::decode_chunks([&out[..]]);
    assert!(dec.is_at_boundary());
    assert_eq!(items.len(), 3);
    assert!(matches!(&items[2], Decoded::Frame(f) if f.payload.len() == MAX_PAYLOAD));
}
