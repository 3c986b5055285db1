//! The frame layer of protocol v1: `len`(u32 BE) `kind`(u8) `id`(u32 BE) payload.
//!
//! Both ends of the protocol use this module. It knows nothing of what a
//! payload means (that is [`crate::messages`]); it only cuts a byte stream
//! into frames and writes frames into a byte buffer.
//!
//! The decoder is incremental and bounded: `len` is checked before anything
//! is allocated, an oversized frame is reported once and its bytes are
//! skipped as they stream past (never buffered), and the decoder never holds
//! more than one maximal frame plus one chunk of input.
//!
//! The encoder appends frames to a caller-owned `Vec<u8>` (the transport's
//! output queue), so the output path allocates nothing per frame once the
//! queue has grown; output read from a child can be read straight into the
//! queue behind a reserved header ([`append_raw_from`]).

use std::io;

/// Bytes in a frame header: `len` (4), `kind` (1), `id` (4).
pub const HEADER_LEN: usize = 9;
/// Bytes of `kind` + `id`, the part of the header that `len` counts.
pub const LEN_OVERHEAD: u32 = 5;
/// The largest payload a valid frame carries (1 MiB).
pub const MAX_PAYLOAD: usize = 1 << 20;
/// The largest payload the agent puts in one STDOUT or STDERR frame (64 KiB).
pub const MAX_OUTPUT_PAYLOAD: usize = 64 * 1024;
/// The largest PING payload (4 KiB).
pub const MAX_PING_PAYLOAD: usize = 4 * 1024;

/// A frame whose payload borrows from the decoder's buffer (or any slice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: u8,
    pub id: u32,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Copies the frame into an owned one.
    pub fn to_owned(&self) -> OwnedFrame {
        OwnedFrame {
            kind: self.kind,
            id: self.id,
            payload: self.payload.to_vec(),
        }
    }

    /// Appends this frame, exactly as it would appear on the wire, to `out`
    /// (nothing when its payload is over the limit, which a decoded frame's
    /// never is).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), TooLarge> {
        append_raw(out, self.kind, self.id, self.payload)
    }
}

/// A frame that owns its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedFrame {
    pub kind: u8,
    pub id: u32,
    pub payload: Vec<u8>,
}

impl OwnedFrame {
    pub fn as_frame(&self) -> Frame<'_> {
        Frame {
            kind: self.kind,
            id: self.id,
            payload: &self.payload,
        }
    }
}

/// A framing error found in the stream. Each one is reported exactly once,
/// and the decoder has already resynchronised past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// `len` announced more than `5 + MAX_PAYLOAD`. The frame's `kind` and
    /// `id` were read; the remaining `len - 5` bytes are skipped.
    #[error("frame of {len} bytes (kind {kind:#04x}, id {id}) exceeds the {max} byte limit", max = LEN_OVERHEAD as usize + MAX_PAYLOAD)]
    TooLarge { kind: u8, id: u32, len: u32 },
    /// `len` was below 5, so the frame has no room for `kind` and `id`; the
    /// `len` bytes that follow are skipped.
    #[error("frame length {len} is shorter than the 5 bytes of kind and id")]
    Malformed { len: u32 },
}

impl FrameError {
    /// The session id an ERROR answering this should carry.
    pub fn id(&self) -> u32 {
        match *self {
            FrameError::TooLarge { id, .. } => id,
            FrameError::Malformed { .. } => 0,
        }
    }

    /// The kind of the offending frame, where it could be read.
    pub fn frame_kind(&self) -> Option<u8> {
        match *self {
            FrameError::TooLarge { kind, .. } => Some(kind),
            FrameError::Malformed { .. } => None,
        }
    }
}

/// A frame that would break the frame limit (`len` > 5 + [`MAX_PAYLOAD`]):
/// the encoder refuses to build it, so no frame anyone sends with this
/// crate can be one a conforming receiver must discard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a frame of kind {kind:#04x} with {payload_len} bytes of payload is over the {MAX_PAYLOAD}-byte payload limit")]
pub struct TooLarge {
    pub kind: u8,
    pub payload_len: usize,
}

/// Why [`append_with`] appended nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AppendError<E> {
    /// The payload writer failed.
    #[error(transparent)]
    Payload(E),
    /// The payload it wrote is over the limit: the frame was taken back.
    #[error(transparent)]
    TooLarge(TooLarge),
}

/// Writes a header for a payload of `payload_len` bytes. The caller
/// guarantees `payload_len <= MAX_PAYLOAD` (every caller in this crate
/// passes a length it has bounded); [`append_raw`] and [`append_with`]
/// check it.
pub fn header(kind: u8, id: u32, payload_len: usize) -> [u8; HEADER_LEN] {
    debug_assert!(payload_len <= MAX_PAYLOAD);
    let len = LEN_OVERHEAD + payload_len as u32;
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&len.to_be_bytes());
    h[4] = kind;
    h[5..9].copy_from_slice(&id.to_be_bytes());
    h
}

/// Appends a frame with a raw payload to `out`, or nothing when the
/// payload is over [`MAX_PAYLOAD`].
pub fn append_raw(out: &mut Vec<u8>, kind: u8, id: u32, payload: &[u8]) -> Result<(), TooLarge> {
    if payload.len() > MAX_PAYLOAD {
        return Err(TooLarge {
            kind,
            payload_len: payload.len(),
        });
    }
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&header(kind, id, payload.len()));
    out.extend_from_slice(payload);
    Ok(())
}

/// Appends a frame whose payload is produced by `write_payload`, which
/// appends the payload bytes to the vector it is given. The header's `len`
/// is patched afterwards, so the payload is written once, in place.
///
/// If `write_payload` fails, or what it wrote is over [`MAX_PAYLOAD`],
/// `out` is left as it was and the frame is not sent: the size is checked
/// here, whatever the caller put in the payload, not assumed.
pub fn append_with<E>(
    out: &mut Vec<u8>,
    kind: u8,
    id: u32,
    write_payload: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
) -> Result<(), AppendError<E>> {
    let start = out.len();
    out.extend_from_slice(&header(kind, id, 0));
    if let Err(e) = write_payload(out) {
        out.truncate(start);
        return Err(AppendError::Payload(e));
    }
    let payload_len = out.len() - start - HEADER_LEN;
    if payload_len > MAX_PAYLOAD {
        out.truncate(start);
        return Err(AppendError::TooLarge(TooLarge { kind, payload_len }));
    }
    let len = LEN_OVERHEAD + payload_len as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Reads at most `max` bytes from `src` straight into a new raw frame at the
/// end of `out` (header reserved in front, payload never copied). On
/// `Ok(0)` (end of file) or an error, `out` is left as it was; on `Ok(n)` a
/// complete frame with an `n`-byte payload has been appended.
pub fn append_raw_from<R: io::Read + ?Sized>(
    out: &mut Vec<u8>,
    kind: u8,
    id: u32,
    src: &mut R,
    max: usize,
) -> io::Result<usize> {
    let max = max.min(MAX_PAYLOAD);
    let start = out.len();
    out.reserve(HEADER_LEN + max);
    out.extend_from_slice(&header(kind, id, 0));
    let payload_start = out.len();
    // Zero-filling costs a memset of `max` bytes; the buffer is reused, so
    // resize only touches bytes past the old length.
    out.resize(payload_start + max, 0);
    let result = src.read(&mut out[payload_start..]);
    match result {
        Ok(n) if n > 0 => {
            out.truncate(payload_start + n);
            let len = LEN_OVERHEAD + n as u32;
            out[start..start + 4].copy_from_slice(&len.to_be_bytes());
            Ok(n)
        }
        other => {
            out.truncate(start);
            other
        }
    }
}

/// What the decoder is doing with the bytes it is fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a header and then a payload in `buf`.
    Frames,
    /// Throwing away this many more bytes of a frame already reported.
    Skipping(u64),
}

impl State {
    fn skipping(left: u64) -> State {
        if left == 0 {
            State::Frames
        } else {
            State::Skipping(left)
        }
    }
}

/// Incremental frame decoder.
///
/// Feed it chunks with [`Decoder::feed`] (or read into it with
/// [`Decoder::read_from`]), then call [`Decoder::next_frame`] until it
/// returns `None`.
#[derive(Debug)]
pub struct Decoder {
    /// `buf[start..end]` are the bytes received and not yet consumed.
    /// `buf[end..]` is initialised space for the next read: it is zeroed
    /// once when the buffer grows and then reused, so that a read does not
    /// pay for zeroing a whole chunk each time. ([`Decoder::read_fd`] reads
    /// into the capacity beyond `end` instead, and zeroes nothing.)
    buf: Vec<u8>,
    start: usize,
    end: usize,
    state: State,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

/// How much [`Decoder::read_from`] asks for at most per call.
pub const READ_CHUNK: usize = 64 * 1024;

/// Above this capacity an empty decoder gives its buffer back, so one large
/// frame does not pin a megabyte for the life of the connection.
const RETAIN_CAPACITY: usize = 2 * READ_CHUNK;

impl Decoder {
    pub fn new() -> Self {
        Decoder {
            buf: Vec::new(),
            start: 0,
            end: 0,
            state: State::Frames,
        }
    }

    /// Bytes held that do not yet form a whole frame.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The capacity of the internal buffer (for memory tests).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// True when the decoder holds no partial frame and is not skipping:
    /// end of stream here is a clean end.
    pub fn is_at_boundary(&self) -> bool {
        self.buffered() == 0 && self.state == State::Frames
    }

    /// Drops consumed bytes from the front of the buffer.
    fn compact(&mut self) {
        if self.start == self.end {
            if self.buf.capacity() > RETAIN_CAPACITY {
                self.buf = Vec::new();
            }
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
        }
        self.end -= self.start;
        self.start = 0;
    }

    /// Makes `buf[end..end + extra]` available: grows the buffer
    /// geometrically, but never past one maximal frame plus this chunk,
    /// which is all it ever holds.
    fn make_room(&mut self, extra: usize) {
        let needed = self.end + extra;
        if needed <= self.buf.len() {
            return;
        }
        let cap = self.buf.capacity();
        if needed > cap {
            let limit = HEADER_LEN + MAX_PAYLOAD + extra;
            let target = needed.max((cap * 2).min(limit));
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.resize(needed, 0);
    }

    /// Throws away buffered bytes of a frame being skipped.
    fn skip_buffered(&mut self) {
        if let State::Skipping(left) = self.state {
            let avail = (self.end - self.start) as u64;
            let n = left.min(avail);
            self.start += n as usize;
            self.state = State::skipping(left - n);
        }
    }

    /// Consumes bytes that belong to a frame being skipped (after any that
    /// are buffered). Returns what is left of `data` after the skip.
    fn skip_from<'d>(&mut self, data: &'d [u8]) -> &'d [u8] {
        self.skip_buffered();
        if let State::Skipping(left) = self.state {
            let n = (left.min(data.len() as u64)) as usize;
            self.state = State::skipping(left - n as u64);
            &data[n..]
        } else {
            data
        }
    }

    /// Feeds a chunk of the stream. Bytes of a frame being skipped are
    /// dropped here and never buffered.
    pub fn feed(&mut self, data: &[u8]) {
        let data = self.skip_from(data);
        if data.is_empty() {
            return;
        }
        self.compact();
        self.make_room(data.len());
        self.buf[self.end..self.end + data.len()].copy_from_slice(data);
        self.end += data.len();
    }

    /// Reads once from `src` into the decoder (at most [`READ_CHUNK`]
    /// bytes) and returns what `read` returned. `Ok(0)` is end of file.
    ///
    /// A partial frame is moved to the front only when the next read would
    /// not fit behind it: with 64 KiB output frames every read ends inside
    /// a frame, and compacting after each would copy each frame twice.
    /// (Reads stay at one chunk: larger ones measured slower, the chunk no
    /// longer staying in cache.)
    pub fn read_from<R: io::Read + ?Sized>(&mut self, src: &mut R) -> io::Result<usize> {
        self.skip_buffered();
        let want = match self.state {
            // Never read more than the rest of the skipped frame into the
            // buffer, so skipped bytes cost at most one chunk.
            State::Skipping(left) => (left.min(READ_CHUNK as u64)) as usize,
            State::Frames => READ_CHUNK,
        };
        if self.start == self.end || self.end + want > self.buf.capacity() {
            self.compact();
        }
        self.make_room(want);
        let result = src.read(&mut self.buf[self.end..self.end + want]);
        // A reader that claims more than it was given is not believed.
        let n = result.as_ref().map_or(0, |&n| n.min(want));
        match self.state {
            // The buffer was empty (skipping only starts once every
            // buffered byte is consumed), so all n bytes are skip bytes:
            // they are left where they are, as free space.
            State::Skipping(left) => {
                debug_assert_eq!(self.end, 0);
                self.state = State::skipping(left - n as u64);
            }
            State::Frames => self.end += n,
        }
        result
    }

    /// Like [`Decoder::read_from`], from a raw fd, into uninitialised
    /// space: nothing is zeroed first, so a read of a few bytes touches one
    /// page of the buffer, not a whole chunk's worth (the agent reads its
    /// transport this way; its idle memory is what a host pays per VM).
    ///
    /// It also moves a partial frame to the front only when the next read
    /// would not fit behind it, and reads as much as the buffer already
    /// has room for: with 64 KiB STDIN payloads every read ends inside a
    /// frame, and compacting after each would copy each frame twice.
    pub fn read_fd(&mut self, fd: std::os::fd::RawFd) -> io::Result<usize> {
        self.read_fd_upto(fd, usize::MAX)
    }

    /// Like [`Decoder::read_fd`], reading at most `limit` bytes (at least
    /// one). The agent reads just a header this way when it expects
    /// another large STDIN frame, whose payload it then moves without
    /// reading it (see [`Decoder::partial_frame`]).
    pub fn read_fd_upto(&mut self, fd: std::os::fd::RawFd, limit: usize) -> io::Result<usize> {
        self.skip_buffered();
        let mut want = match self.state {
            State::Skipping(left) => (left.min(READ_CHUNK as u64)) as usize,
            State::Frames => READ_CHUNK,
        };
        if self.start == self.end || self.end + want > self.buf.capacity() {
            self.compact();
        }
        if self.state == State::Frames {
            want = want.max(self.buf.capacity() - self.end);
        }
        want = want.min(limit.max(1));
        // `buf[end..]` need not be initialised for this path.
        self.buf.truncate(self.end);
        let cap = self.buf.capacity();
        if self.end + want > cap {
            let limit = HEADER_LEN + MAX_PAYLOAD + want;
            let target = (self.end + want).max((cap * 2).min(limit));
            self.buf.reserve_exact(target - self.buf.len());
        }
        let spare = self.buf.spare_capacity_mut();
        // SAFETY: `spare` has room for at least `want` bytes; read writes at
        // most that many, and only what it reports written is used.
        let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), want) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = (n as usize).min(want);
        match self.state {
            // Skipped bytes are left where they are, as free space.
            State::Skipping(left) => {
                debug_assert_eq!(self.end, 0);
                self.state = State::skipping(left - n as u64);
            }
            State::Frames => {
                // SAFETY: read initialised the first n spare bytes.
                unsafe { self.buf.set_len(self.end + n) };
                self.end += n;
            }
        }
        Ok(n)
    }

    /// The frame at the front of the buffer when its header is there but
    /// not all of its payload (`None` otherwise, and while skipping).
    pub fn partial_frame(&self) -> Option<PartialFrame> {
        if self.state != State::Frames {
            return None;
        }
        let avail = &self.buf[self.start..self.end];
        if avail.len() < HEADER_LEN {
            return None;
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]);
        let payload_len = len.checked_sub(LEN_OVERHEAD)? as usize;
        let buffered = avail.len() - HEADER_LEN;
        if payload_len > MAX_PAYLOAD || buffered >= payload_len {
            return None;
        }
        Some(PartialFrame {
            kind: avail[4],
            id: u32::from_be_bytes([avail[5], avail[6], avail[7], avail[8]]),
            len: payload_len,
            buffered,
        })
    }

    /// Takes the frame [`Decoder::partial_frame`] describes out of the
    /// decoder and returns the payload bytes it held. The other
    /// `len - buffered` payload bytes are still in the stream: the caller
    /// consumes them from the source itself (or has the decoder skip them
    /// with [`Decoder::skip`]) before it reads through the decoder again.
    ///
    /// # Panics
    /// When there is no partial frame (a caller's bug).
    pub fn take_partial(&mut self) -> &[u8] {
        let p = self
            .partial_frame()
            .expect("take_partial without a partial frame");
        let begin = self.start + HEADER_LEN;
        self.start = self.end;
        &self.buf[begin..begin + p.buffered]
    }

    /// Skips the next `n` bytes of the stream (the rest of a payload taken
    /// with [`Decoder::take_partial`] that its consumer no longer wants).
    /// Only at a frame boundary with nothing buffered.
    pub fn skip(&mut self, n: usize) {
        debug_assert!(self.is_at_boundary());
        self.state = State::skipping(n as u64);
    }

    /// Returns the next whole frame or framing error, or `None` when more
    /// input is needed.
    pub fn next_frame(&mut self) -> Option<Result<Frame<'_>, FrameError>> {
        self.skip_buffered();
        if self.state != State::Frames {
            return None;
        }
        let avail = &self.buf[self.start..self.end];
        if avail.len() < 4 {
            return None;
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]);
        if len < LEN_OVERHEAD {
            self.start += 4;
            self.state = State::skipping(u64::from(len));
            return Some(Err(FrameError::Malformed { len }));
        }
        if avail.len() < HEADER_LEN {
            return None;
        }
        let kind = avail[4];
        let id = u32::from_be_bytes([avail[5], avail[6], avail[7], avail[8]]);
        let payload_len = (len - LEN_OVERHEAD) as usize;
        if payload_len > MAX_PAYLOAD {
            self.start += HEADER_LEN;
            self.state = State::skipping(u64::from(len - LEN_OVERHEAD));
            return Some(Err(FrameError::TooLarge { kind, id, len }));
        }
        if avail.len() < HEADER_LEN + payload_len {
            return None;
        }
        let begin = self.start + HEADER_LEN;
        self.start = begin + payload_len;
        Some(Ok(Frame {
            kind,
            id,
            payload: &self.buf[begin..begin + payload_len],
        }))
    }
}

/// A frame whose header a decoder holds, without all of its payload: see
/// [`Decoder::partial_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialFrame {
    pub kind: u8,
    pub id: u32,
    /// The whole payload's length.
    pub len: usize,
    /// How much of the payload the decoder holds.
    pub buffered: usize,
}

/// One item a decoder yields, owned (for tests, fuzzing and simple callers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Frame(OwnedFrame),
    Error(FrameError),
}

/// Decodes a whole byte stream, fed in the given chunks, into owned items.
pub fn decode_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Decoded>, Decoder) {
    let mut dec = Decoder::new();
    let mut out = Vec::new();
    for chunk in chunks {
        dec.feed(chunk);
        while let Some(item) = dec.next_frame() {
            out.push(match item {
                Ok(f) => Decoded::Frame(f.to_owned()),
                Err(e) => Decoded::Error(e),
            });
        }
    }
    (out, dec)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The encoder refuses a frame over the limit and leaves the buffer as
    /// it was; a payload of exactly the limit is a valid frame.
    #[test]
    fn oversized_frames_are_refused_not_built() {
        let mut out = b"queued".to_vec();
        let big = vec![7u8; MAX_PAYLOAD + 1];
        assert_eq!(
            append_raw(&mut out, 0x30, 1, &big),
            Err(TooLarge {
                kind: 0x30,
                payload_len: MAX_PAYLOAD + 1
            })
        );
        assert_eq!(out, b"queued");
        let r = append_with(&mut out, 0x12, 2, |buf| {
            buf.extend_from_slice(&big);
            Ok::<(), ()>(())
        });
        assert_eq!(
            r,
            Err(AppendError::TooLarge(TooLarge {
                kind: 0x12,
                payload_len: MAX_PAYLOAD + 1
            }))
        );
        assert_eq!(out, b"queued", "a refused frame leaves nothing behind");
        append_with(&mut out, 0x12, 2, |buf| {
            buf.extend_from_slice(&big[..MAX_PAYLOAD]);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(out.len(), 6 + HEADER_LEN + MAX_PAYLOAD);
        assert_eq!(
            &out[6..10],
            &(LEN_OVERHEAD + MAX_PAYLOAD as u32).to_be_bytes()
        );
    }

    #[test]
    fn header_layout() {
        assert_eq!(header(0x10, 0x01020304, 3), [0, 0, 0, 8, 0x10, 1, 2, 3, 4]);
    }

    #[test]
    fn one_byte_at_a_time() {
        let mut wire = Vec::new();
        append_raw(&mut wire, 0x02, 7, b"hello").unwrap();
        append_raw(&mut wire, 0x21, 9, b"").unwrap();
        let (items, dec) = decode_chunks(wire.chunks(1));
        assert_eq!(
            items,
            vec![
                Decoded::Frame(OwnedFrame {
                    kind: 2,
                    id: 7,
                    payload: b"hello".to_vec()
                }),
                Decoded::Frame(OwnedFrame {
                    kind: 0x21,
                    id: 9,
                    payload: vec![]
                }),
            ]
        );
        assert!(dec.is_at_boundary());
    }

    #[test]
    fn short_len_is_reported_and_skipped() {
        let mut wire = vec![0, 0, 0, 3, 0xaa, 0xbb, 0xcc];
        append_raw(&mut wire, 0x02, 1, b"x").unwrap();
        let (items, _) = decode_chunks([&wire[..]]);
        assert_eq!(items[0], Decoded::Error(FrameError::Malformed { len: 3 }));
        assert_eq!(
            items[1],
            Decoded::Frame(OwnedFrame {
                kind: 2,
                id: 1,
                payload: b"x".to_vec()
            })
        );
    }

    #[test]
    fn oversized_is_skipped_without_buffering() {
        let len = LEN_OVERHEAD + MAX_PAYLOAD as u32 + 1;
        let mut wire = len.to_be_bytes().to_vec();
        wire.push(0x20);
        wire.extend_from_slice(&5u32.to_be_bytes());
        let mut dec = Decoder::new();
        dec.feed(&wire);
        assert_eq!(
            dec.next_frame(),
            Some(Err(FrameError::TooLarge {
                kind: 0x20,
                id: 5,
                len
            }))
        );
        let chunk = vec![0u8; 4096];
        let mut left = MAX_PAYLOAD + 1;
        while left > 0 {
            let n = left.min(chunk.len());
            dec.feed(&chunk[..n]);
            assert!(dec.next_frame().is_none());
            left -= n;
        }
        assert!(dec.capacity() < 64 * 1024);
        let mut next = Vec::new();
        append_raw(&mut next, 0x02, 3, b"ok").unwrap();
        dec.feed(&next);
        assert_eq!(
            dec.next_frame(),
            Some(Ok(Frame {
                kind: 2,
                id: 3,
                payload: b"ok"
            }))
        );
    }

    #[test]
    fn read_from_skips_oversized() {
        let len = u32::MAX;
        let mut wire = len.to_be_bytes().to_vec();
        wire.extend_from_slice(&[0x20, 0, 0, 0, 1]);
        wire.extend(std::iter::repeat_n(0u8, 300_000));
        let mut src = &wire[..];
        let mut dec = Decoder::new();
        dec.read_from(&mut src).unwrap();
        assert!(matches!(
            dec.next_frame(),
            Some(Err(FrameError::TooLarge { .. }))
        ));
        while dec.read_from(&mut src).unwrap() > 0 {
            assert!(dec.next_frame().is_none());
            assert!(dec.buffered() == 0);
        }
    }

    /// read_fd yields what decoding the same bytes in one piece yields:
    /// frames of every size (a maximal one among them), an oversized
    /// frame skipped without being buffered, and the frame after it.
    #[test]
    fn read_fd_matches_decoding_the_stream() {
        let mut wire = Vec::new();
        for (i, len) in [0usize, 1, 100, 70_000, MAX_PAYLOAD, 3, 300_000]
            .into_iter()
            .enumerate()
        {
            let payload: Vec<u8> = (0..len).map(|b| (b * 31 + i) as u8).collect();
            append_raw(&mut wire, 0x30, i as u32, &payload).unwrap();
        }
        wire.extend_from_slice(&(LEN_OVERHEAD + MAX_PAYLOAD as u32 + 1_000_000).to_be_bytes());
        wire.extend_from_slice(&[0x20, 0, 0, 0, 9]);
        wire.extend(std::iter::repeat_n(0xeeu8, MAX_PAYLOAD + 1_000_000));
        append_raw(&mut wire, 0x10, 10, b"after").unwrap();
        let (expect, _) = decode_chunks([&wire[..]]);

        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds, which this test owns and closes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let [r, w] = fds;
        let writer = std::thread::spawn(move || {
            // Uneven pieces, so reads end anywhere in a frame.
            for piece in wire.chunks(77_777) {
                let mut done = 0;
                while done < piece.len() {
                    // SAFETY: writing from a valid slice to our pipe.
                    let n = unsafe {
                        libc::write(w, piece[done..].as_ptr().cast(), piece.len() - done)
                    };
                    assert!(n > 0);
                    done += n as usize;
                }
            }
            // SAFETY: closing our own fd: the reader's end of file.
            unsafe { libc::close(w) };
        });
        let mut dec = Decoder::new();
        let mut got = Vec::new();
        while dec.read_fd(r).unwrap() > 0 {
            assert!(dec.capacity() <= HEADER_LEN + MAX_PAYLOAD + READ_CHUNK);
            while let Some(item) = dec.next_frame() {
                got.push(match item {
                    Ok(f) => Decoded::Frame(f.to_owned()),
                    Err(e) => Decoded::Error(e),
                });
            }
        }
        writer.join().unwrap();
        // SAFETY: closing our own fd.
        unsafe { libc::close(r) };
        assert!(dec.is_at_boundary());
        assert_eq!(got, expect);
    }

    /// A frame with its header buffered and its payload not: described,
    /// taken out with the payload bytes held, the rest skipped or consumed
    /// by the caller, and the next frame decodes. Nothing is described for
    /// a whole frame, a short header, or a frame too large or malformed.
    #[test]
    fn partial_frames_are_taken_out_of_the_stream() {
        let mut wire = Vec::new();
        append_raw(&mut wire, 0x20, 7, &[5u8; 1000]).expect("the test's frames fit");
        append_raw(&mut wire, 0x02, 0, b"ping").unwrap();
        let mut dec = Decoder::new();
        dec.feed(&wire[..8]);
        assert_eq!(dec.partial_frame(), None, "no whole header yet");
        dec.feed(&wire[8..109]);
        assert!(dec.next_frame().is_none());
        let p = dec.partial_frame().expect("a partial frame");
        assert_eq!((p.kind, p.id, p.len, p.buffered), (0x20, 7, 1000, 100));
        assert_eq!(dec.take_partial(), &[5u8; 100][..]);
        assert!(dec.is_at_boundary());
        // The caller does not want the rest: it is skipped as it arrives.
        dec.skip(900);
        dec.feed(&wire[109..]);
        match dec.next_frame() {
            Some(Ok(f)) => assert_eq!((f.kind, f.payload), (0x02, &b"ping"[..])),
            other => panic!("{other:?}"),
        }
        // A whole frame is no partial one.
        let mut dec = Decoder::new();
        dec.feed(&wire);
        assert_eq!(dec.partial_frame(), None);
        // Nor is an oversized or malformed one.
        for len in [LEN_OVERHEAD + MAX_PAYLOAD as u32 + 1, 2] {
            let mut dec = Decoder::new();
            dec.feed(&len.to_be_bytes());
            dec.feed(&[0x20, 0, 0, 0, 1, 9, 9]);
            assert_eq!(dec.partial_frame(), None);
        }
    }

    /// read_fd_upto never reads more than asked.
    #[test]
    fn read_fd_upto_reads_at_most_the_limit() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds, which this test owns and closes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let [r, w] = fds;
        let mut wire = Vec::new();
        append_raw(&mut wire, 0x20, 3, &[1u8; 50_000]).expect("the test's frames fit");
        assert_eq!(
            // SAFETY: writing from a valid slice to our pipe (it has room).
            unsafe { libc::write(w, wire.as_ptr().cast(), wire.len()) },
            wire.len() as isize
        );
        let mut dec = Decoder::new();
        assert_eq!(dec.read_fd_upto(r, HEADER_LEN).unwrap(), HEADER_LEN);
        let p = dec.partial_frame().expect("a header");
        assert_eq!((p.id, p.len, p.buffered), (3, 50_000, 0));
        assert!(dec.take_partial().is_empty());
        assert_eq!(
            dec.read_fd_upto(r, 0).unwrap(),
            1,
            "a limit of 0 reads one byte"
        );
        // SAFETY: closing our own fds.
        unsafe {
            libc::close(r);
            libc::close(w);
        }
    }

    #[test]
    fn append_raw_from_reads_in_place() {
        let mut out = Vec::new();
        let mut src: &[u8] = b"abcdef";
        let n = append_raw_from(&mut out, 0x30, 4, &mut src, 4).unwrap();
        assert_eq!(n, 4);
        assert_eq!(out, [0, 0, 0, 9, 0x30, 0, 0, 0, 4, b'a', b'b', b'c', b'd']);
        let mut empty: &[u8] = b"";
        assert_eq!(
            append_raw_from(&mut out, 0x30, 4, &mut empty, 4).unwrap(),
            0
        );
        assert_eq!(out.len(), 13);
    }
}
