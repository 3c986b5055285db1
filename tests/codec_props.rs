//! Property tests of the frame decoder: any stream of frames, cut into any
//! chunks, decodes to the same frames; malformed and oversized frames with
//! honest lengths, interleaved at frame boundaries, are reported as the
//! matching `FrameError` and the decoder stays in step.

use std::io;

use agentd::codec::{
    self, Decoded, Decoder, FrameError, OwnedFrame, HEADER_LEN, LEN_OVERHEAD, MAX_PAYLOAD,
    READ_CHUNK,
};
use proptest::prelude::*;

/// One item of a generated stream.
#[derive(Debug, Clone)]
enum Item {
    Frame(OwnedFrame),
    /// `len` < 5, then exactly `len` bytes.
    Malformed {
        len: u32,
        bytes: Vec<u8>,
    },
    /// `len` > 5 + MAX_PAYLOAD, then the whole `len` bytes (kind, id and
    /// `len - 5` bytes of `fill`).
    Oversized {
        kind: u8,
        id: u32,
        len: u32,
        fill: u8,
    },
}

impl Item {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Item::Frame(f) => f.as_frame().encode(out),
            Item::Malformed { len, bytes } => {
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(bytes);
            }
            Item::Oversized {
                kind,
                id,
                len,
                fill,
            } => {
                out.extend_from_slice(&len.to_be_bytes());
                out.push(*kind);
                out.extend_from_slice(&id.to_be_bytes());
                out.resize(out.len() + (*len - LEN_OVERHEAD) as usize, *fill);
            }
        }
    }

    fn expected(&self) -> Decoded {
        match self {
            Item::Frame(f) => Decoded::Frame(f.clone()),
            Item::Malformed { len, .. } => Decoded::Error(FrameError::Malformed { len: *len }),
            Item::Oversized { kind, id, len, .. } => Decoded::Error(FrameError::TooLarge {
                kind: *kind,
                id: *id,
                len: *len,
            }),
        }
    }
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..16),
        2 => prop::collection::vec(any::<u8>(), 0..600),
        1 => prop::collection::vec(any::<u8>(), 0..4096),
    ]
}

fn frame() -> impl Strategy<Value = OwnedFrame> {
    (any::<u8>(), any::<u32>(), payload()).prop_map(|(kind, id, payload)| OwnedFrame {
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

fn oversized() -> impl Strategy<Value = Item> {
    let min = LEN_OVERHEAD + MAX_PAYLOAD as u32 + 1;
    (any::<u8>(), any::<u32>(), min..min + 70_000, any::<u8>()).prop_map(|(kind, id, len, fill)| {
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

fn build(items: &[Item]) -> (Vec<u8>, Vec<Decoded>) {
    let mut stream = Vec::new();
    for i in items {
        i.write(&mut stream);
    }
    (stream, items.iter().map(Item::expected).collect())
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
fn feed_all(chunks: &[&[u8]]) -> (Vec<Decoded>, Decoder) {
    let max_chunk = chunks.iter().map(|c| c.len()).max().unwrap_or(0);
    let mut dec = Decoder::new();
    let mut out = Vec::new();
    for c in chunks {
        dec.feed(c);
        assert!(dec.capacity() <= HEADER_LEN + MAX_PAYLOAD + max_chunk);
        drain(&mut dec, &mut out);
    }
    (out, dec)
}

/// Reads the chunks through `Decoder::read_from`, one chunk (or the part
/// the decoder asks for) per read.
fn read_all(chunks: &[&[u8]]) -> (Vec<Decoded>, Decoder) {
    struct Chunks<'a>(std::collections::VecDeque<&'a [u8]>);
    impl io::Read for Chunks<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            while let Some(c) = self.0.front_mut() {
                if c.is_empty() {
                    self.0.pop_front();
                    continue;
                }
                let n = c.len().min(buf.len());
                buf[..n].copy_from_slice(&c[..n]);
                *c = &c[n..];
                return Ok(n);
            }
            Ok(0)
        }
    }
    let mut src = Chunks(chunks.iter().copied().collect());
    let mut dec = Decoder::new();
    let mut out = Vec::new();
    while dec.read_from(&mut src).unwrap() > 0 {
        assert!(dec.capacity() <= HEADER_LEN + MAX_PAYLOAD + READ_CHUNK);
        drain(&mut dec, &mut out);
    }
    (out, dec)
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

        let (fed, dec) = feed_all(&chunks);
        prop_assert_eq!(&fed, &expected);
        prop_assert!(dec.is_at_boundary());

        let (read, dec) = read_all(&chunks);
        prop_assert_eq!(&read, &expected);
        prop_assert!(dec.is_at_boundary());

        // Re-encoding the decoded frames gives the stream back.
        let mut again = Vec::new();
        for d in &fed {
            let Decoded::Frame(f) = d else { unreachable!() };
            f.as_frame().encode(&mut again);
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
        let (got, dec) = feed_all(&cut(&stream[..end], &sizes));
        prop_assert_eq!(&got[..], &expected[..got.len()]);
        // At a boundary exactly when the cut falls between two items.
        let mut boundaries = vec![0];
        let mut pos = 0;
        for i in &items {
            let mut b = Vec::new();
            i.write(&mut b);
            pos += b.len();
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
    // Each case streams up to a few MiB of oversized frames: fewer cases.
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn garbage_at_frame_boundaries_keeps_the_decoder_in_step(
        items in prop::collection::vec(
            prop_oneof![6 => frame().prop_map(Item::Frame), 3 => malformed()],
            0..24,
        ),
        big in prop::collection::vec((any::<prop::sample::Index>(), oversized()), 0..3),
        sizes in chunk_sizes(),
    ) {
        let mut items = items;
        for (at, o) in big {
            let i = at.index(items.len() + 1);
            items.insert(i, o);
        }
        let (stream, expected) = build(&items);
        let chunks = cut(&stream, &sizes);

        let (fed, dec) = feed_all(&chunks);
        prop_assert_eq!(&fed, &expected);
        prop_assert!(dec.is_at_boundary());

        let (read, dec) = read_all(&chunks);
        prop_assert_eq!(&read, &expected);
        prop_assert!(dec.is_at_boundary());

        // Every error is reported exactly once, with the id the ERROR
        // answering it carries.
        for (d, i) in fed.iter().zip(&items) {
            if let (Decoded::Error(e), Item::Oversized { id, kind, .. }) = (d, i) {
                prop_assert_eq!(e.id(), *id);
                prop_assert_eq!(e.frame_kind(), Some(*kind));
            }
            if let Decoded::Error(e @ FrameError::Malformed { .. }) = d {
                prop_assert_eq!(e.id(), 0);
            }
        }
    }
}

#[test]
fn the_frame_size_limit_is_exact() {
    // A payload of exactly MAX_PAYLOAD is a frame; one byte more is not.
    let payload = vec![7u8; MAX_PAYLOAD + 1];
    let mut wire = Vec::new();
    codec::append_raw(&mut wire, 0x30, 1, &payload[..MAX_PAYLOAD]);
    let (items, dec) = codec::decode_chunks(wire.chunks(100_000));
    assert!(dec.is_at_boundary());
    assert!(matches!(&items[..], [Decoded::Frame(f)] if f.payload.len() == MAX_PAYLOAD));

    let len = LEN_OVERHEAD + MAX_PAYLOAD as u32 + 1;
    let mut wire = len.to_be_bytes().to_vec();
    wire.push(0x30);
    wire.extend_from_slice(&1u32.to_be_bytes());
    wire.extend_from_slice(&payload);
    codec::append_raw(&mut wire, 0x02, 2, b"after");
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
        codec::append_raw(&mut wire, 0x21, 4, b"");
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
    codec::append_raw(&mut out, 0x02, 1, b"keep");
    let before = out.clone();

    // append_with: the payload writer fails after writing some bytes.
    let r: Result<(), &str> = codec::append_with(&mut out, 0x10, 2, |buf| {
        buf.extend_from_slice(b"partial");
        Err("no")
    });
    assert_eq!(r, Err("no"));
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
