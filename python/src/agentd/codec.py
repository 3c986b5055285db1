"""The frame layer: an incremental decoder and frame encoders.

A frame is ``len`` (u32 BE, the bytes after it: 5 + payload), ``kind`` (u8),
``id`` (u32 BE) and the payload. :class:`FrameDecoder` reads frames from a
stream without ever holding more than one maximal frame plus one read:

- bytes are read straight into its buffer (:meth:`FrameDecoder.read_buffer`
  gives the writable region for ``readinto``/``recv_into``/``os.readv``), and
  a frame's payload is handed out as a ``memoryview`` of that buffer; the
  caller makes the single copy it needs (``bytes(view)``) or decodes the map
  in place;
- no payload byte is ever moved inside the buffer: reads near its end stop
  at the end of the frame being read, so the buffer wraps at a frame boundary;
- a frame whose ``len`` is above ``5 + MAX_PAYLOAD`` is reported once
  (:class:`FrameError` ``frame_too_large``, with its kind and id) and its
  bytes are skipped as they arrive, never buffered; a ``len`` below 5 is
  ``malformed_frame`` (id 0) and the 0 to 4 bytes after it are skipped.
"""

from __future__ import annotations

import struct
from typing import List, NamedTuple, Optional, Union

from .errors import EncodeError, ProtocolError
from .messages import Buffer, Message
from .protocol import HEADER_SIZE, LEN_SIZE, MAX_PAYLOAD, ErrorKind, Kind

__all__ = [
    "Frame",
    "FrameError",
    "FrameDecoder",
    "frame_header",
    "encode_frame",
    "append_frame",
    "append_raw",
]

_HEADER = struct.Struct(">IBI")
_U32 = struct.Struct(">I")


class Frame(NamedTuple):
    """One decoded frame. ``payload`` is a view into the decoder's buffer, valid until its next read."""

    kind: int
    id: int
    payload: Union[memoryview, bytes]


class FrameError:
    """A framing error the decoder met (and recovered from): ``frame_too_large`` or ``malformed_frame``."""

    __slots__ = ("kind", "length", "frame_kind", "id")

    def __init__(self, kind: str, length: int, frame_kind: Optional[int], id: int) -> None:
        self.kind = kind
        self.length = length
        self.frame_kind = frame_kind
        self.id = id

    @property
    def message(self) -> str:
        """What went wrong, for people."""
        if self.kind == ErrorKind.FRAME_TOO_LARGE:
            return f"frame of {self.length} bytes exceeds the limit"
        return f"frame length {self.length} is shorter than the 5 bytes of kind and id"

    def to_exception(self) -> ProtocolError:
        """This error as a (local) :class:`ProtocolError`."""
        return ProtocolError(
            self.kind, self.message, frame_kind=self.frame_kind, session_id=self.id, remote=False
        )

    def __repr__(self) -> str:
        return f"FrameError({self.kind!r}, length={self.length}, frame_kind={self.frame_kind}, id={self.id})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FrameError) and (self.kind, self.length, self.frame_kind, self.id) == (
            other.kind,
            other.length,
            other.frame_kind,
            other.id,
        )


class FrameDecoder:
    """An incremental frame decoder over a fixed buffer (see the module's docstring).

    Reading loop::

        dec = FrameDecoder()
        while True:
            n = sock.recv_into(dec.read_buffer())
            if n == 0: break
            dec.advance(n)
            for item in dec.frames():   # Frame or FrameError
                ...                     # use item.payload before the next read_buffer()

    :meth:`feed` is the convenience form for bytes already in hand (it copies
    them in, and returns frames whose payloads are ``bytes``).
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._max_frame = HEADER_SIZE + max_payload
        # Two maximal frames: frames start only in the first half (below
        # ``_limit``), so every frame that starts fits without moving it.
        self._cap = 2 * self._max_frame
        self._limit = self._cap - self._max_frame
        self._buf = bytearray(self._cap)
        self._mv = memoryview(self._buf)
        self._r = 0
        self._w = 0
        self._skip = 0

    @property
    def buffered(self) -> int:
        """Bytes read but not yet returned as frames (at most one frame's worth)."""
        return self._w - self._r

    @property
    def skipping(self) -> int:
        """Bytes of an oversized or malformed frame still to be skipped."""
        return self._skip

    @property
    def capacity(self) -> int:
        """The size of the fixed buffer (never grows)."""
        return self._cap

    def read_buffer(self) -> memoryview:
        """The writable region the next read goes into; call :meth:`advance` with the count read."""
        r, w = self._r, self._w
        if r == w:
            r = w = self._r = self._w = 0
        limit = self._limit
        if self._skip == 0 and w > r:
            have = w - r
            if have < LEN_SIZE:
                need = r + LEN_SIZE
            else:
                length = _U32.unpack_from(self._buf, r)[0]
                if length < 5:
                    need = r + LEN_SIZE + length
                elif length > 5 + self.max_payload:
                    need = r + HEADER_SIZE
                else:
                    need = r + LEN_SIZE + length
            if need > limit:
                limit = need
        return self._mv[w:limit]

    def advance(self, n: int) -> None:
        """Account for ``n`` bytes read into :meth:`read_buffer`."""
        if n < 0 or self._w + n > self._cap:
            raise ValueError("advance beyond the read buffer")
        self._w += n

    def frames(self) -> List[Union[Frame, FrameError]]:
        """The frames (and framing errors) completed by the bytes read so far.

        Payloads are views of the buffer: use or copy them before the next
        :meth:`read_buffer`.
        """
        out: List[Union[Frame, FrameError]] = []
        buf, mv = self._buf, self._mv
        r, w = self._r, self._w
        max_len = 5 + self.max_payload
        unpack_u32 = _U32.unpack_from
        unpack_header = _HEADER.unpack_from
        append = out.append
        while True:
            if self._skip:
                n = min(self._skip, w - r)
                r += n
                self._skip -= n
                if self._skip:
                    break
            have = w - r
            if have < LEN_SIZE:
                break
            length = unpack_u32(buf, r)[0]
            if length < 5:
                append(FrameError(ErrorKind.MALFORMED_FRAME, length, None, 0))
                r += LEN_SIZE
                self._skip = length
                continue
            if length > max_len:
                if have < HEADER_SIZE:
                    break
                _, kind, fid = unpack_header(buf, r)
                append(FrameError(ErrorKind.FRAME_TOO_LARGE, length, kind, fid))
                r += HEADER_SIZE
                self._skip = length - 5
                continue
            end = r + LEN_SIZE + length
            if end > w:
                break
            _, kind, fid = unpack_header(buf, r)
            append(Frame(kind, fid, mv[r + HEADER_SIZE : end]))
            r = end
        self._r = r
        return out

    def feed(self, data: Buffer) -> List[Union[Frame, FrameError]]:
        """Decode ``data`` (copied in); returned payloads are ``bytes`` of their own."""
        src = memoryview(data).cast("B")
        out: List[Union[Frame, FrameError]] = []
        while True:
            dst = self.read_buffer()
            n = min(len(dst), len(src))
            dst[:n] = src[:n]
            src = src[n:]
            self.advance(n)
            for item in self.frames():
                if isinstance(item, Frame):
                    item = Frame(item.kind, item.id, bytes(item.payload))
                out.append(item)
            if not src:
                return out


def frame_header(kind: int, id: int, payload_len: int) -> bytes:
    """The 9 header bytes of a frame; refuses a payload over MAX_PAYLOAD."""
    if payload_len > MAX_PAYLOAD:
        raise EncodeError(f"a payload of {payload_len} bytes exceeds MAX_PAYLOAD ({MAX_PAYLOAD}); split it")
    if not 0 <= id <= 0xFFFF_FFFF:
        raise EncodeError(f"id {id} does not fit u32")
    if not 0 <= kind <= 0xFF:
        raise EncodeError(f"kind {kind} does not fit u8")
    return _HEADER.pack(5 + payload_len, kind, id)


def append_raw(out: bytearray, kind: int, id: int, payload: Buffer) -> None:
    """Append one frame with ``payload`` (copied once, into ``out``)."""
    out += frame_header(kind, id, len(payload))
    out += payload


def append_frame(out: bytearray, id: int, msg: Message) -> None:
    """Append ``msg`` as one frame with ``id``; nothing is appended when it cannot be encoded."""
    append_raw(out, int(msg.KIND), id, msg.encode_payload())


def encode_frame(id: int, msg: Message) -> bytes:
    """``msg`` as the bytes of one frame with ``id``."""
    out = bytearray()
    append_frame(out, id, msg)
    return bytes(out)


# The kind numbers as ints for the hot paths of the clients.
STDOUT = int(Kind.STDOUT)
STDERR = int(Kind.STDERR)
