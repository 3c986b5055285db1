//! Oversized frames: reported once, then skipped as they stream past,
//! never buffered. A 100 MiB frame streamed in 1 MiB chunks keeps the
//! decoder under 2 MiB; a 4 GiB length costs nothing at all.

mod support;

use std::io::{self, Read};

use agentd::codec::{
    self, Decoder, Frame, FrameError, HEADER_LEN, LEN_OVERHEAD, MAX_PAYLOAD, READ_CHUNK,
};
use support::wire::raw_frame;

const MIB: usize = 1 << 20;

/// A stream generated on the fly: `head`, then `fill` bytes of a pattern
/// that looks like valid frames (so a decoder that looked at skipped bytes
/// would see frames), then `tail`. Each read returns at most `chunk` bytes.
struct Stream {
    head: Vec<u8>,
    fill: u64,
    pattern: Vec<u8>,
    tail: Vec<u8>,
    pos: u64,
    chunk: usize,
}

impl Stream {
    fn new(len: u32, kind: u8, id: u32, tail: Vec<u8>, chunk: usize) -> Stream {
        let head = raw_frame(len, kind, id, &[]);
        let mut pattern = Vec::new();
        while pattern.len() < 4096 {
            codec::append_raw(&mut pattern, 0x30, 1, b"not a frame")
                .expect("the test's frames fit");
        }
        Stream {
            head,
            fill: u64::from(len - LEN_OVERHEAD),
            pattern,
            tail,
            pos: 0,
            chunk,
        }
    }

    fn total(&self) -> u64 {
        self.head.len() as u64 + self.fill + self.tail.len() as u64
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let max = buf.len().min(self.chunk);
        let mut n = 0;
        while n < max && self.pos < self.total() {
            let head = self.head.len() as u64;
            let got = if self.pos < head {
                let src = &self.head[self.pos as usize..];
                let k = src.len().min(max - n);
                buf[n..n + k].copy_from_slice(&src[..k]);
                k
            } else if self.pos < head + self.fill {
                let off = (self.pos - head) as usize % self.pattern.len();
                let left = (head + self.fill - self.pos) as usize;
                let k = (self.pattern.len() - off).min(max - n).min(left);
                buf[n..n + k].copy_from_slice(&self.pattern[off..off + k]);
                k
            } else {
                let src = &self.tail[(self.pos - head - self.fill) as usize..];
                let k = src.len().min(max - n);
                buf[n..n + k].copy_from_slice(&src[..k]);
                k
            };
            n += got;
            self.pos += got as u64;
        }
        Ok(n)
    }
}

fn next_frame_bytes() -> Vec<u8> {
    let mut v = Vec::new();
    codec::append_raw(&mut v, 0x02, 42, b"still in step").expect("the test's frames fit");
    v
}

#[track_caller]
fn assert_next_frame(dec: &mut Decoder) {
    assert_eq!(
        dec.next_frame(),
        Some(Ok(Frame {
            kind: 0x02,
            id: 42,
            payload: b"still in step"
        }))
    );
    assert_eq!(dec.next_frame(), None);
    assert!(dec.is_at_boundary());
}

const HUNDRED_MIB: u32 = 100 << 20;

#[test]
fn hundred_mib_fed_in_one_mib_chunks() {
    let mut src = Stream::new(HUNDRED_MIB, 0x20, 9, next_frame_bytes(), MIB);
    let mut dec = Decoder::new();
    let mut chunk = vec![0u8; MIB];
    let mut errors = Vec::new();
    let mut frames = 0;
    let mut fed = 0u64;
    loop {
        let n = src.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        fed += n as u64;
        dec.feed(&chunk[..n]);
        assert!(dec.capacity() < 2 * MIB, "capacity {}", dec.capacity());
        while let Some(item) = dec.next_frame() {
            match item {
                Ok(f) => {
                    assert_eq!((f.kind, f.id, f.payload), (0x02, 42, &b"still in step"[..]));
                    frames += 1;
                }
                Err(e) => errors.push(e),
            }
        }
        assert!(dec.capacity() < 2 * MIB, "capacity {}", dec.capacity());
    }
    assert_eq!(
        fed,
        4 + u64::from(HUNDRED_MIB) + next_frame_bytes().len() as u64
    );
    assert_eq!(
        errors,
        [FrameError::TooLarge {
            kind: 0x20,
            id: 9,
            len: HUNDRED_MIB
        }]
    );
    assert_eq!(frames, 1);
    assert!(dec.is_at_boundary());
}

#[test]
fn hundred_mib_through_read_from() {
    let mut src = Stream::new(HUNDRED_MIB, 0x10, 3, next_frame_bytes(), MIB);
    let mut dec = Decoder::new();
    let mut errors = Vec::new();
    let mut frames = 0;
    let mut reads = 0;
    while dec.read_from(&mut src).unwrap() > 0 {
        reads += 1;
        assert!(dec.capacity() < 2 * MIB, "capacity {}", dec.capacity());
        // Skipped bytes are never kept.
        assert!(dec.buffered() <= READ_CHUNK);
        while let Some(item) = dec.next_frame() {
            match item {
                Ok(f) => {
                    assert_eq!(f.id, 42);
                    frames += 1;
                }
                Err(e) => errors.push(e),
            }
        }
    }
    assert_eq!(src.pos, src.total());
    assert!(reads >= (HUNDRED_MIB as usize) / READ_CHUNK);
    assert_eq!(
        errors,
        [FrameError::TooLarge {
            kind: 0x10,
            id: 3,
            len: HUNDRED_MIB
        }]
    );
    assert_eq!(frames, 1);
    assert!(dec.is_at_boundary());
    // read_from never reads past the skipped frame into the buffer in big
    // pieces: the whole run stayed within one read chunk.
    assert!(dec.capacity() <= READ_CHUNK);
}

#[test]
fn a_four_gib_length_costs_no_memory() {
    let len = u32::MAX;
    let mut head = len.to_be_bytes().to_vec();
    head.extend_from_slice(&[0x20, 0, 0, 0, 7]);
    let mut dec = Decoder::new();
    dec.feed(&head);
    assert_eq!(
        dec.next_frame(),
        Some(Err(FrameError::TooLarge {
            kind: 0x20,
            id: 7,
            len
        }))
    );
    assert!(!dec.is_at_boundary());
    let start_capacity = dec.capacity();
    assert!(start_capacity <= 64, "capacity {start_capacity}");

    // All of it, through feed: 4 GiB - 1 bytes in 1 MiB pieces of one
    // reused buffer.
    let chunk = vec![0xffu8; MIB];
    let mut left = u64::from(len - LEN_OVERHEAD);
    // Part of it through read_from (the reader hands out zeros).
    let mut zeros = io::repeat(0).take(64 * MIB as u64);
    while dec.read_from(&mut zeros).unwrap() > 0 {
        assert_eq!(dec.next_frame(), None);
        assert_eq!(dec.buffered(), 0);
        assert!(dec.capacity() <= READ_CHUNK);
    }
    left -= 64 * MIB as u64;
    while left > 0 {
        let n = (left as usize).min(MIB);
        dec.feed(&chunk[..n]);
        assert_eq!(dec.next_frame(), None);
        left -= n as u64;
    }
    assert!(dec.capacity() <= READ_CHUNK);
    assert_eq!(dec.buffered(), 0);
    dec.feed(&next_frame_bytes());
    assert_next_frame(&mut dec);
}

#[test]
fn oversized_length_cut_anywhere_in_its_header() {
    // The length arrives a byte at a time: nothing is reported until kind
    // and id are there, and the frame is reported once.
    let len = LEN_OVERHEAD + MAX_PAYLOAD as u32 + 1;
    let mut wire = len.to_be_bytes().to_vec();
    wire.extend_from_slice(&[0x31, 0, 0, 1, 0]);
    wire.resize(wire.len() + MAX_PAYLOAD + 1, 0xee);
    wire.extend(next_frame_bytes());
    let mut dec = Decoder::new();
    let mut errors = 0;
    for (i, b) in wire.iter().enumerate() {
        dec.feed(std::slice::from_ref(b));
        if i + 1 < HEADER_LEN {
            assert_eq!(dec.next_frame(), None);
            continue;
        }
        if i + 1 == wire.len() {
            break;
        }
        match dec.next_frame() {
            None => {}
            Some(Err(FrameError::TooLarge {
                kind: 0x31,
                id: 256,
                len: l,
            })) if l == len => errors += 1,
            other => panic!("byte {i}: {other:?}"),
        }
        assert!(dec.capacity() <= 64);
    }
    assert_eq!(errors, 1);
    assert_next_frame(&mut dec);
}
