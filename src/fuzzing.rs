//! Bodies of the fuzz targets in `fuzz/`.
//!
//! They live in the library so that `cargo test` (tests/fuzz_corpus.rs) can
//! replay the checked-in seed corpus on stable without cargo-fuzz. Each one
//! panics when an invariant is broken; any input that does not panic passes.

use std::io;

use crate::codec::{self, Decoded, Decoder, HEADER_LEN, MAX_PAYLOAD, READ_CHUNK};
use crate::messages::{Direction, Kind, Message, ProtocolError};

/// `frame_decoder`: the first two bytes seed the chunk sizes, the rest is
/// the stream. The stream is decoded whole, fed in chunks, and read in the
/// same chunks through [`Decoder::read_from`]; all three must agree, the
/// decoder must stay within one maximal frame plus one chunk, and every
/// frame must re-encode to the bytes it was decoded from.
pub fn frame_decoder(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let seed = u16::from_be_bytes([data[0], data[1]]);
    let stream = &data[2..];

    let (whole, _) = codec::decode_chunks([stream]);

    // Chunk sizes from a small xorshift seeded by the input.
    let mut state = u32::from(seed) | 1;
    let mut chunks = Vec::new();
    let mut rest = stream;
    let mut max_chunk = 0;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (state as usize % 97 + 1).min(rest.len());
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

    // Re-encode every frame; decoding the re-encoding gives it back, and
    // when the stream held no framing errors, the re-encoding is the
    // stream's own prefix, byte for byte.
    let mut reencoded = Vec::new();
    for item in &whole {
        if let Decoded::Frame(f) = item {
            f.as_frame().encode(&mut reencoded);
        }
    }
    let (again, _) = codec::decode_chunks([&reencoded[..]]);
    let frames: Vec<_> = whole
        .iter()
        .filter(|d| matches!(d, Decoded::Frame(_)))
        .cloned()
        .collect();
    assert_eq!(again, frames);
    if frames.len() == whole.len() {
        assert_eq!(&stream[..reencoded.len()], &reencoded[..]);
    }
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
