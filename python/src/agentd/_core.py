"""Sans-I/O connection state, shared by the sync client and the asyncio client.

Nothing here reads, writes, blocks or sleeps. :class:`Core` takes decoded
frames (:meth:`Core.receive`), keeps the state of the connection and of its
streams, and queues the frames to send in :attr:`Core.out`; the I/O layers
(``client.py`` with threads, ``aio.py`` with an event loop) move bytes and
wait. Every method must be called under the I/O layer's lock (sync) or in
the loop's thread (asyncio).

Waiting follows one pattern in both layers: call a ``try_*`` method; it
returns a value, or ``None`` for "not yet" (having queued what must go out
before the caller sleeps, e.g. the output acknowledgements it holds), or
raises. Between tries the I/O layer flushes :attr:`Core.out` and sleeps
until the relevant :class:`Waiters` object is woken (its ``gen`` counter
tells a wake-up that came in between).

Extension point: every id on a connection belongs to a :class:`Stream`
(sessions, and the extension streams of ``agentd._ext``: file operations, connections, LIST, clock requests), registered with
:meth:`Core.register` and released with its final frame.
"""

from __future__ import annotations

import collections
import logging
import random
import struct
import subprocess
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple, Union

from . import messages as m
from .codec import Frame, FrameError, append_raw
from .errors import (
    AttachFailed,
    ExecFailed,
    ProtocolError,
    ProtocolVersionError,
    SessionDetached,
    SessionEnded,
    TransportClosed,
    remote_error,
)
from .protocol import KINDS, PING_MAX, PROTOCOL_VERSION, STDIN_FRAME_MAX, Direction, Encoding, ErrorKind, Kind

log = logging.getLogger("agentd")

PIPE = subprocess.PIPE
STDOUT = subprocess.STDOUT
DEVNULL = subprocess.DEVNULL

_K_STDOUT = int(Kind.STDOUT)
_K_STDERR = int(Kind.STDERR)
_K_PONG = int(Kind.PONG)
_K_READY = int(Kind.READY)
_K_ERROR = int(Kind.ERROR)
_K_SHUTDOWN_DONE = int(Kind.SHUTDOWN_DONE)
_K_EXEC = int(Kind.EXEC)
_K_PING = int(Kind.PING)
_K_SHUTDOWN = int(Kind.SHUTDOWN)
_K_STDIN = int(Kind.STDIN)
_K_STDIN_CLOSE = int(Kind.STDIN_CLOSE)
_K_OUTPUT_ACK = int(Kind.OUTPUT_ACK)
_A2H = Direction.AGENT_TO_HOST
_TOKEN = struct.Struct(">Q")

#: How many ended ids are remembered (late ERRORs about them are not news).
_RECENT = 4096
#: How often an EXEC answered with duplicate_id is retried under a new id.
_DUPLICATE_RETRIES = 16


class Waiters:
    """Something the I/O layer sleeps on. ``gen`` counts wake-ups; :meth:`wake` also notifies sleepers."""

    __slots__ = ("gen",)

    def __init__(self) -> None:
        self.gen = 0

    def wake(self) -> None:
        """Record a change and wake whoever sleeps on this object."""
        self.gen += 1


class Pending:
    """A request waiting for its one answer (PING, a barrier, SHUTDOWN)."""

    __slots__ = ("waiters", "done", "error", "value", "frame_kind")

    def __init__(self, waiters: Waiters, frame_kind: int = 0) -> None:
        self.waiters = waiters
        self.done = False
        self.error: Optional[BaseException] = None
        self.value: Any = None
        self.frame_kind = frame_kind

    def finish(self, value: Any = None, error: Optional[BaseException] = None) -> None:
        """Complete the request (the first completion wins) and wake its waiter."""
        if self.done:
            return
        self.done = True
        self.value = value
        if error is not None:
            self.error = error
        self.waiters.wake()


class Stream:
    """An id on the connection, held until the stream's final frame (one id space per connection)."""

    id: int = 0

    def on_message(self, msg: m.Message) -> None:
        """A decoded map or empty frame for this id."""

    def on_raw(self, kind: int, payload: memoryview) -> None:
        """A raw frame for this id; ``payload`` is valid only during the call (copy what you keep)."""

    def on_error(self, err: ProtocolError) -> None:
        """An ERROR the agent sent about a frame of this id."""

    def on_close(self, exc: TransportClosed) -> None:
        """The transport closed: no more frames will come."""


class IdAllocator:
    """Session ids: never 0, never one in use, not reused soon (a counter from a random start)."""

    def __init__(self) -> None:
        self._next = random.randrange(1, 0xFFFF_FFFF)

    def take(self, busy: Callable[[int], bool]) -> int:
        """The next free id."""
        for _ in range(1 << 20):
            i = self._next
            self._next = i + 1 if i < 0xFFFF_FFFF else 1
            if not busy(i):
                return i
        raise RuntimeError("no free session id")  # pragma: no cover - 2**32 ids


class Core:
    """The state of one connection: READY, streams by id, pings, shutdown, errors, and the output queue."""

    def __init__(self, new_waiters: Callable[[], Waiters]) -> None:
        self.new_waiters = new_waiters
        #: Woken on READY, PONG, SHUTDOWN_DONE and close.
        self.waiters = new_waiters()
        #: Frames to send, in order; the I/O layer takes and writes them.
        self.out = bytearray()
        self.ready: Optional[m.Ready] = None
        self.ready_count = 0
        self.features: frozenset = frozenset()  # type: ignore[type-arg]
        self.closed: Optional[TransportClosed] = None
        self.fatal: Optional[BaseException] = None
        self.streams: Dict[int, Stream] = {}
        #: Ids live on the agent but not ours (an earlier host's sessions on a device port).
        self.foreign: Set[int] = set()
        self._recent: Deque[int] = collections.deque(maxlen=_RECENT)
        self._recent_set: Set[int] = set()
        self.ids = IdAllocator()
        self._pings: Dict[Tuple[int, bytes], Deque[Pending]] = {}
        self._barriers: Dict[int, List[Pending]] = {}
        self._token = random.randrange(1 << 62)
        self.shutdown_pending: Optional[Pending] = None
        #: Connection-level ERRORs, refused frames, errors nobody waited for (see take_errors()).
        self.errors: List[ProtocolError] = []
        self.on_ready: List[Callable[[m.Ready], None]] = []
        #: The payload length of the map frame being delivered (extension windows count FS_ENTRIES bytes).
        self.last_len = 0

    # --- sending -----------------------------------------------------------

    def send(self, id: int, msg: m.Message) -> None:
        """Queue ``msg`` with ``id``; raises TransportClosed once closed."""
        if self.closed is not None:
            raise self.closed
        append_raw(self.out, int(msg.KIND), id, msg.encode_payload())

    def send_raw(self, kind: int, id: int, payload: m.Buffer) -> None:
        """Queue a frame of any kind (payload copied once, into the queue)."""
        if self.closed is not None:
            raise self.closed
        append_raw(self.out, kind, id, payload)

    def take_out(self) -> bytearray:
        """Hand the queued bytes to the writer (the queue starts empty again)."""
        data = self.out
        self.out = bytearray()
        return data

    # --- ids ----------------------------------------------------------------

    def _busy(self, i: int) -> bool:
        return i in self.streams or i in self.foreign or i in self._recent_set or i in self._barriers

    def register(self, stream: Stream) -> int:
        """Give ``stream`` a fresh id and route that id's frames to it."""
        i = self.ids.take(self._busy)
        stream.id = i
        self.streams[i] = stream
        return i

    def release(self, stream: Stream) -> None:
        """The stream's final frame came: its id is free (it is not reused soon)."""
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            if len(self._recent) == self._recent.maxlen:
                self._recent_set.discard(self._recent[0])
            self._recent.append(stream.id)
            self._recent_set.add(stream.id)

    def reassign(self, stream: Stream) -> int:
        """Move ``stream`` to a new id; the old one is left to the agent's other holder."""
        old = stream.id
        if self.streams.get(old) is stream:
            del self.streams[old]
        self.foreign.add(old)
        return self.register(stream)

    # --- requests on the connection ------------------------------------------

    def ping(self, payload: Optional[bytes] = None) -> Pending:
        """Queue a PING on id 0; the Pending's value is set when its PONG comes."""
        if payload is None:
            self._token += 1
            payload = _TOKEN.pack(self._token)
        if len(payload) > PING_MAX:
            raise ValueError(f"a PING payload is at most {PING_MAX} bytes, not {len(payload)}")
        p = Pending(self.waiters, _K_PING)
        self.send_raw(_K_PING, 0, payload)
        self._pings.setdefault((0, bytes(payload)), collections.deque()).append(p)
        return p

    def barrier(self, stream: Stream, frame_kind: int, waiters: Waiters) -> Pending:
        """Queue a PING on ``stream``'s id behind a frame of ``frame_kind`` just queued.

        The agent answers frames in order, so an ERROR about that frame comes
        before the PONG: the Pending then holds it as ``error``.
        """
        self._token += 1
        token = _TOKEN.pack(self._token)
        p = Pending(waiters, frame_kind)
        self.send_raw(_K_PING, stream.id, token)
        self._pings.setdefault((stream.id, token), collections.deque()).append(p)
        self._barriers.setdefault(stream.id, []).append(p)
        return p

    def shutdown(self, grace_ms: int) -> Pending:
        """Queue SHUTDOWN; the Pending completes with SHUTDOWN_DONE."""
        if self.shutdown_pending is None or self.shutdown_pending.done:
            self.shutdown_pending = Pending(self.waiters, _K_SHUTDOWN)
        self.send(0, m.Shutdown(grace_ms=grace_ms))
        return self.shutdown_pending

    def take_errors(self) -> List[ProtocolError]:
        """The errors kept so far (and forget them)."""
        errors, self.errors = self.errors, []
        return errors

    # --- receiving -------------------------------------------------------------

    def _refused(self, err: ProtocolError) -> None:
        log.warning("agentd: %s", err)
        self.errors.append(err)

    def receive(self, items: Sequence[Union[Frame, FrameError]]) -> None:
        """Handle frames from the decoder (payload views are used before this returns)."""
        streams = self.streams
        for item in items:
            if type(item) is not Frame:
                assert isinstance(item, FrameError)
                self._refused(item.to_exception())
                continue
            kind, fid, payload = item
            if kind == _K_STDOUT or kind == _K_STDERR:
                if self.ready is not None:
                    st = streams.get(fid)
                    if st is not None:
                        st.on_raw(kind, payload)  # type: ignore[arg-type]
                continue
            info = KINDS.get(kind)
            if info is None:
                self._refused(
                    ProtocolError(ErrorKind.UNKNOWN_KIND, f"unknown kind 0x{kind:02x}", frame_kind=kind,
                                  session_id=fid, remote=False)
                )
                continue
            if info.direction is not _A2H:
                self._refused(
                    ProtocolError(ErrorKind.WRONG_DIRECTION, f"{info.kind.name} is a host-to-agent kind",
                                  frame_kind=kind, session_id=fid, remote=False)
                )
                continue
            if info.encoding is Encoding.RAW:
                if kind == _K_PONG:
                    self._on_pong(fid, payload)  # type: ignore[arg-type]
                elif self.ready is not None:
                    st = streams.get(fid)
                    if st is not None:
                        st.on_raw(kind, payload)  # type: ignore[arg-type]
                continue
            try:
                msg = m.MESSAGE_CLASSES[kind].decode_payload(payload)
            except ProtocolError as e:
                e.session_id = fid
                self._refused(e)
                continue
            if kind == _K_READY:
                self._on_ready(msg)  # type: ignore[arg-type]
                continue
            if self.ready is None:
                log.debug("agentd: ignoring %s for id %d before READY", info.kind.name, fid)
                continue
            if kind == _K_ERROR:
                self._on_error(fid, msg)  # type: ignore[arg-type]
            elif kind == _K_SHUTDOWN_DONE:
                if self.shutdown_pending is not None:
                    self.shutdown_pending.finish(True)
            else:
                st = streams.get(fid)
                if st is not None:
                    self.last_len = len(payload)
                    st.on_message(msg)
                elif fid in self.foreign:
                    if kind == int(Kind.EXITED) or kind == int(Kind.EXEC_FAILED):
                        self.foreign.discard(fid)
                elif kind == int(Kind.EXEC_FAILED) and fid == 0:
                    # The answer to an EXEC with id 0 (which this SDK never sends itself).
                    f: m.ExecFailed = msg  # type: ignore[assignment]
                    self._refused(ProtocolError(f.kind, f.message, frame_kind=_K_EXEC, session_id=0, remote=True))
                else:
                    log.debug("agentd: %s for id %d, which is not ours", info.kind.name, fid)

    def _on_ready(self, ready: m.Ready) -> None:
        if ready.protocol != PROTOCOL_VERSION:
            self.fatal = ProtocolVersionError(ready.protocol)
            self.waiters.wake()
            return
        self.ready = ready
        self.ready_count += 1
        self.features = frozenset(ready.features)
        self.waiters.wake()
        for cb in list(self.on_ready):
            try:
                cb(ready)
            except Exception:  # noqa: BLE001 - a user callback must not break the reader
                log.exception("agentd: on_ready callback failed")

    def _on_pong(self, fid: int, payload: memoryview) -> None:
        key = (fid, bytes(payload))
        q = self._pings.get(key)
        if not q:
            log.debug("agentd: PONG for id %d that no PING waits for", fid)
            return
        p = q.popleft()
        if not q:
            del self._pings[key]
        if fid:
            bs = self._barriers.get(fid)
            if bs is not None and p in bs:
                bs.remove(p)
                if not bs:
                    del self._barriers[fid]
        p.finish(True)

    def _on_error(self, fid: int, msg: m.Error) -> None:
        err = remote_error(ProtocolError(msg.kind, msg.message, frame_kind=msg.frame_kind, session_id=fid,
                                         remote=True))
        if fid == 0:
            if msg.frame_kind == _K_SHUTDOWN and self.shutdown_pending and not self.shutdown_pending.done:
                self.shutdown_pending.finish(error=err)
                return
            if msg.frame_kind == _K_PING:
                for key, q in list(self._pings.items()):
                    if key[0] == 0 and q:
                        q.popleft().finish(error=err)
                        if not q:
                            del self._pings[key]
                        return
            self._refused(err)
            return
        for p in self._barriers.get(fid, ()):
            if p.frame_kind == msg.frame_kind and p.error is None:
                p.error = err
                return
        st = self.streams.get(fid)
        if st is not None:
            st.on_error(err)
            return
        if msg.kind == ErrorKind.UNKNOWN_SESSION and fid in self._recent_set:
            # An acknowledgement or stdin frame that crossed the session's EXITED.
            log.debug("agentd: %s", err)
            return
        self._refused(err)

    def close(self, reason: str) -> None:
        """The transport is gone: fail every waiter and stream."""
        if self.closed is not None:
            return
        exc = TransportClosed(reason)
        self.closed = exc
        for st in list(self.streams.values()):
            st.on_close(exc)
        for q in self._pings.values():
            for p in q:
                p.finish(error=exc)
        self._pings.clear()
        self._barriers.clear()
        if self.shutdown_pending is not None and not self.shutdown_pending.done:
            self.shutdown_pending.finish(error=exc)
        self.waiters.wake()

    def try_ready(self) -> Optional[m.Ready]:
        """READY once it has come; raises on a bad READY or a closed transport."""
        if self.fatal is not None:
            raise self.fatal
        if self.ready is not None:
            return self.ready
        if self.closed is not None:
            raise self.closed
        return None


def try_pending(p: Pending) -> Optional[Any]:
    """The value of a completed request, None while it waits; raises its error."""
    if not p.done:
        return None
    if p.error is not None:
        raise p.error
    return p.value if p.value is not None else True


# --- sessions ------------------------------------------------------------------

PENDING, RUNNING, EXITED, FAILED = "pending", "running", "exited", "failed"


class SessionState(Stream):
    """One session: EXEC in flight, then running, then exited (or failed).

    Output is kept per stream in arrival order (a sequence number orders the
    two streams for merged iteration); consumed bytes are acknowledged with
    OUTPUT_ACK in batches of half the window, and before any consumer sleeps.
    """

    def __init__(
        self,
        core: Core,
        exec_msg: m.Exec,
        argv: Sequence[str],
        *,
        stdout: int = PIPE,
        stderr: int = PIPE,
    ) -> None:
        self.core = core
        self.exec_msg = exec_msg
        self.argv = list(argv)
        self.waiters = core.new_waiters()
        self.state = PENDING
        self.pid: Optional[int] = None
        self.started: Optional[m.Started] = None
        self.exited: Optional[m.Exited] = None
        self.failure: Optional[BaseException] = None
        self.closed: Optional[TransportClosed] = None
        self.tty = exec_msg.tty
        self.has_stdin = exec_msg.stdin
        self.window = exec_msg.output_window
        self.ack_threshold = max(1, (self.window + 1) // 2)
        self.stdin_credit = 0
        self.stdin_window = 0
        self.stdin_closed = not exec_msg.stdin
        self.retries = 0
        self.abandoned = False
        self.merge_stderr = stderr == STDOUT
        self.discard = [False, stdout == DEVNULL, stderr == DEVNULL]
        self.chunks: List[Deque[Tuple[int, bytes]]] = [collections.deque(), collections.deque(), collections.deque()]
        self.offsets = [0, 0, 0]
        self.seq = 0
        self.buffered = 0
        self.pending_ack = 0
        #: Buffered bytes already acknowledged (by wait(), which must not stall on unread output).
        self.prepaid = 0
        self.errors: List[ProtocolError] = []
        #: DETACHED, when the session left this connection (it goes on in the guest).
        self.detached: Optional[m.Detached] = None
        #: The agent-wide session number (STARTED's or ATTACHED's ``session``).
        self.number: Optional[int] = None

    # --- starting ------------------------------------------------------------

    def start(self) -> None:
        """Register under a fresh id and queue the EXEC."""
        self.core.register(self)
        self.core.send(self.id, self.exec_msg)

    def try_started(self) -> Optional[bool]:
        """True once STARTED came (or the session already ended); raises ExecFailed or a ProtocolError."""
        if self.state == RUNNING or self.state == EXITED:
            return True
        if self.state == FAILED:
            assert self.failure is not None
            raise self.failure
        if self.closed is not None:
            raise self.closed
        return None

    def abandon(self) -> None:
        """Nobody will use this session: kill it once started and swallow its output (acknowledged)."""
        self.abandoned = True
        self.discard = [False, True, True]
        for fd in (1, 2):
            self._discard_buffered(fd)
        if self.state == RUNNING:
            self._send_signal(9, True)
            self._flush_ack_if_any()

    def discard_output(self, fd: Optional[int] = None) -> None:
        """From now on, drop (and acknowledge) output of ``fd`` (1, 2, or both when None)."""
        for f in (1, 2) if fd is None else (fd,):
            self.discard[f] = True
            self._discard_buffered(f)
        self._flush_ack_if_any()

    def _discard_buffered(self, fd: int) -> None:
        q = self.chunks[fd]
        n = sum(len(b) for _, b in q) - self.offsets[fd]
        q.clear()
        self.offsets[fd] = 0
        if n:
            self.buffered -= n
            self._consumed(n)

    # --- frames from the agent ---------------------------------------------------

    def on_raw(self, kind: int, payload: memoryview) -> None:
        if self.state != RUNNING:
            return
        n = len(payload)
        if not n:
            return
        fd = 1 if kind == _K_STDOUT else 2
        if fd == 2 and self.merge_stderr:
            fd = 1
        if self.discard[fd]:
            self._consumed(n)
            return
        self.seq += 1
        self.chunks[fd].append((self.seq, bytes(payload)))  # the one copy of the payload
        self.buffered += n
        self.waiters.wake()

    def on_message(self, msg: m.Message) -> None:
        t = type(msg)
        if t is m.StdinAck:
            self.stdin_credit = min(self.stdin_credit + msg.bytes, self.stdin_window)  # type: ignore[attr-defined]
            self.waiters.wake()
        elif t is m.Exited:
            self.state = EXITED
            self.exited = msg  # type: ignore[assignment]
            self.core.release(self)
            self.waiters.wake()
        elif t is m.Started:
            if self.state != PENDING:
                return
            self.state = RUNNING
            self.started = msg  # type: ignore[assignment]
            self.pid = msg.pid  # type: ignore[attr-defined]
            self.number = msg.session  # type: ignore[attr-defined]
            ready = self.core.ready
            self.stdin_window = ready.stdin_window if ready is not None else 0
            self.stdin_credit = self.stdin_window
            if self.abandoned:
                self._send_signal(9, True)
            if self.exec_msg.detach:
                # Started detached: STARTED is the id's last frame.
                self.detached = m.Detached(session=self.number or 0, reason="detach")
                self.state = EXITED
                self.core.release(self)
            self.waiters.wake()
        elif t is m.ExecFailed:
            self._on_exec_failed(msg)  # type: ignore[arg-type]
        elif t is m.Detached:
            # The id's last frame: DETACH, or another connection attached the session.
            self.detached = msg  # type: ignore[assignment]
            self.state = EXITED
            self.core.release(self)
            self.waiters.wake()

    def _on_exec_failed(self, msg: m.ExecFailed) -> None:
        if self.state != PENDING:
            # duplicate_id about a raw EXEC on our live id: our session is unaffected.
            self.errors.append(
                ProtocolError(msg.kind, msg.message, frame_kind=_K_EXEC, session_id=self.id, remote=True)
            )
            return
        if msg.kind == "duplicate_id" and self.retries < _DUPLICATE_RETRIES:
            # The id is live on the agent for someone else (an earlier host's
            # session on a device port): retry under another id.
            self.retries += 1
            self.core.reassign(self)
            self.core.send(self.id, self.exec_msg)
            return
        self.state = FAILED
        self.failure = ExecFailed(msg.kind, msg.message, errno=msg.errno, stage=msg.stage, cmd=self.argv)
        self.core.release(self)
        self.waiters.wake()

    def on_error(self, err: ProtocolError) -> None:
        if err.frame_kind == _K_EXEC and self.state == PENDING:
            self.state = FAILED
            self.failure = err
            self.core.release(self)
            self.waiters.wake()
            return
        log.warning("agentd: session %d: %s", self.id, err)
        self.errors.append(err)
        self.waiters.wake()

    def on_close(self, exc: TransportClosed) -> None:
        self.closed = exc
        self.waiters.wake()

    # --- output ------------------------------------------------------------------

    def _consumed(self, n: int) -> None:
        if not self.window or self.state != RUNNING:
            return
        if self.prepaid:
            k = min(self.prepaid, n)
            self.prepaid -= k
            n -= k
            if not n:
                return
        self.pending_ack += n
        if self.pending_ack >= self.ack_threshold:
            self._send_ack()

    def _send_ack(self) -> None:
        n, self.pending_ack = self.pending_ack, 0
        if self.closed is None:
            self.core.send(self.id, m.OutputAck(bytes=n))

    def _flush_ack_if_any(self) -> None:
        if self.pending_ack and self.state == RUNNING:
            self._send_ack()

    def before_wait(self) -> None:
        """Acknowledge consumed output before a consumer sleeps (the agent never waits for us)."""
        if self.pending_ack and self.state == RUNNING:
            self._send_ack()

    def _check_live(self) -> None:
        if self.closed is not None:
            raise self.closed
        if self.state == FAILED:
            assert self.failure is not None
            raise self.failure

    def stream_done(self, fd: int) -> bool:
        """Whether stream ``fd`` has ended (EXITED came) and nothing of it is buffered."""
        return self.state == EXITED and not self.chunks[fd]

    def _take_head(self, fd: int, n: int) -> bytes:
        q = self.chunks[fd]
        off = self.offsets[fd]
        chunk = q[0][1]
        if off + n >= len(chunk):
            q.popleft()
            self.offsets[fd] = 0
            data = chunk if off == 0 else chunk[off:]
        else:
            data = chunk[off : off + n]
            self.offsets[fd] = off + n
        self.buffered -= len(data)
        self._consumed(len(data))
        return data

    def _nothing(self) -> Optional[bytes]:
        if self.state == EXITED:
            return b""
        self._check_live()
        self.before_wait()
        return None

    def try_read(self, fd: int, n: int) -> Optional[bytes]:
        """Up to ``n`` bytes of ``fd`` from its oldest chunk (n < 0: all of it); ``b""`` at its end; None to wait."""
        q = self.chunks[fd]
        if q:
            if n < 0:
                n = len(q[0][1])
            return self._take_head(fd, n)
        return self._nothing()

    def try_line(self, fd: int, limit: int) -> Optional[bytes]:
        """Bytes of ``fd`` up to and including the next newline within its oldest chunk (at most ``limit``)."""
        q = self.chunks[fd]
        if q:
            chunk = q[0][1]
            off = self.offsets[fd]
            i = chunk.find(b"\n", off)
            end = len(chunk) if i < 0 else i + 1
            if limit >= 0:
                end = min(end, off + limit)
            return self._take_head(fd, end - off)
        return self._nothing()

    def try_next(self) -> Optional[Tuple[int, bytes]]:
        """The next output chunk of either stream, in arrival order: ``(fd, data)``; ``(0, b"")`` at the end."""
        q1, q2 = self.chunks[1], self.chunks[2]
        if q1 or q2:
            if q1 and (not q2 or q1[0][0] < q2[0][0]):
                fd = 1
            else:
                fd = 2
            q = self.chunks[fd]
            _, chunk = q.popleft()
            off = self.offsets[fd]
            if off:
                chunk = chunk[off:]
                self.offsets[fd] = 0
            self.buffered -= len(chunk)
            self._consumed(len(chunk))
            return fd, chunk
        if self.state == EXITED:
            return 0, b""
        self._check_live()
        self.before_wait()
        return None

    def drain(self) -> List[Tuple[int, bytes]]:
        """Everything buffered, in arrival order (consumed)."""
        out: List[Tuple[int, bytes]] = []
        while self.chunks[1] or self.chunks[2]:
            item = self.try_next()
            assert item is not None
            out.append(item)
        return out

    # --- stdin ---------------------------------------------------------------------

    def _check_stdin(self) -> None:
        if self.state == EXITED:
            raise SessionEnded(self.id)
        self._check_live()
        if not self.has_stdin:
            raise ValueError("the session was started without stdin (stdin=DEVNULL)")
        if self.stdin_closed:
            raise ValueError("write to closed stdin")

    def push_stdin(self, data: memoryview, off: int) -> int:
        """Queue STDIN frames from ``data[off:]`` within the window; the new offset."""
        self._check_stdin()
        end = len(data)
        while off < end and self.stdin_credit > 0:
            n = min(self.stdin_credit, end - off, STDIN_FRAME_MAX)
            self.core.send_raw(_K_STDIN, self.id, data[off : off + n])
            self.stdin_credit -= n
            off += n
        if off < end:
            self.before_wait()
        return off

    def close_stdin(self) -> None:
        """Queue STDIN_CLOSE (once; nothing after EXITED)."""
        if self.stdin_closed or not self.has_stdin:
            return
        self.stdin_closed = True
        if self.state in (PENDING, RUNNING) and self.closed is None:
            self.core.send(self.id, m.StdinClose())

    def try_drained_stdin(self) -> Optional[bool]:
        """True once every STDIN byte sent was acknowledged (or the session ended)."""
        if self.state != RUNNING or self.stdin_credit >= self.stdin_window:
            return True
        self._check_live()
        return None

    # --- control ---------------------------------------------------------------

    def _send_signal(self, sig: int, group: bool) -> None:
        if self.closed is None:
            self.core.send(self.id, m.Signal(signal=sig, group=group))

    def signal(self, sig: int, group: bool = True, tree: bool = False) -> Optional[Pending]:
        """Queue SIGNAL and a barrier (its Pending holds an ERROR such as invalid_signal); None once ended."""
        if self.state != RUNNING:
            self._check_live()
            return None
        self.core.send(self.id, m.Signal(signal=sig, group=group, tree=tree))
        return self.core.barrier(self, int(Kind.SIGNAL), self.waiters)

    def resize(self, rows: int, cols: int) -> Optional[Pending]:
        """Queue RESIZE and a barrier (its Pending holds ERROR not_a_tty for a pipe session); None once ended."""
        if self.state != RUNNING:
            self._check_live()
            return None
        self.core.send(self.id, m.Resize(rows=rows, cols=cols))
        return self.core.barrier(self, int(Kind.RESIZE), self.waiters)

    def _raise_detached(self) -> None:
        d = self.detached
        raise SessionDetached(self.id, self.number, d.reason if d is not None else "detach")

    def detach(self) -> Optional[Pending]:
        """Queue DETACH (the session goes on without this connection); None once it ended here."""
        if self.state != RUNNING:
            self._check_live()
            return None
        self.core.send(self.id, m.Detach())
        return None

    def try_detached(self) -> Optional[m.Detached]:
        """DETACHED once it came; raises SessionEnded if EXITED came first."""
        if self.detached is not None:
            return self.detached
        if self.state == EXITED:
            raise SessionEnded(self.id, "detach")
        self._check_live()
        self.discard_output()
        return None

    def try_exited(self) -> Optional[m.Exited]:
        """EXITED once it came, None to wait.

        Waiting for the exit must not depend on someone reading: output that
        waits unread is acknowledged (and kept), so the agent can send the
        rest and EXITED (all output comes before EXITED).
        """
        if self.state == EXITED:
            if self.exited is None:
                self._raise_detached()
            return self.exited
        self._check_live()
        extra = self.buffered - self.prepaid
        if extra > 0 and self.window:
            self.prepaid += extra
            self.pending_ack += extra
        self.before_wait()
        return None


class Communicator:
    """The state of ``communicate()``/``run()``: feed stdin within the window, collect both streams."""

    def __init__(
        self,
        s: SessionState,
        input: Optional[m.Buffer],
        sinks: Tuple[Any, Any],
    ) -> None:
        self.s = s
        self.input = None if input is None else memoryview(input).cast("B")
        self.off = 0
        self.out: List[List[bytes]] = [[], [], []]
        #: File-like sinks per fd (None: collect); written by the I/O layer outside its lock.
        self.sinks = [None, sinks[0], sinks[1]]
        self.emit: List[Tuple[int, bytes]] = []

    def step(self) -> Optional[m.Exited]:
        """Make progress; EXITED when everything is in, None to wait."""
        s = self.s
        for fd, data in s.drain():
            if self.sinks[fd] is not None:
                self.emit.append((fd, data))
            else:
                self.out[fd].append(data)
        if self.input is not None and s.state == RUNNING and not s.stdin_closed:
            try:
                self.off = s.push_stdin(self.input, self.off)
            except SessionEnded:  # pragma: no cover - state checked above
                self.input = None
            else:
                if self.off >= len(self.input):
                    s.close_stdin()
                    self.input = None
        if s.state == EXITED:
            return s.exited
        s._check_live()
        s.before_wait()
        return None

    def write_sinks(self) -> None:
        """Write chunks meant for file-like sinks (call without holding the I/O layer's lock)."""
        emit, self.emit = self.emit, []
        for fd, data in emit:
            self.sinks[fd].write(data)

    def collected(self, fd: int) -> Optional[bytes]:
        """What was collected of ``fd`` (None when it went elsewhere)."""
        s = self.s
        if self.sinks[fd] is not None or s.discard[fd] or (fd == 2 and s.merge_stderr):
            return None
        return b"".join(self.out[fd])


class AttachState(SessionState):
    """A session taken over with ATTACH: ATTACHED stands for STARTED, ATTACH_FAILED for EXEC_FAILED.

    Replayed output arrives as STDOUT/STDERR after ATTACHED, then live output
    and EXITED, exactly as for a session this connection started.
    """

    def __init__(self, core: Core, attach: m.Attach, label: str) -> None:
        super().__init__(core, m.Exec(cmd=label, output_window=attach.output_window), [label])
        self.attach_msg = attach
        self.attached: Optional[m.Attached] = None
        self.label = label

    def start(self) -> None:
        self.core.register(self)
        self.core.send(self.id, self.attach_msg)

    def on_message(self, msg: m.Message) -> None:
        t = type(msg)
        if t is m.Attached:
            if self.state != PENDING:
                return
            a: m.Attached = msg  # type: ignore[assignment]
            self.attached = a
            self.state = RUNNING
            self.pid = a.pid
            self.number = a.session
            self.tty = a.tty
            self.has_stdin = a.stdin
            self.stdin_closed = not a.stdin
            ready = self.core.ready
            self.stdin_window = ready.stdin_window if ready is not None else 0
            self.stdin_credit = self.stdin_window
            if self.abandoned:
                self._send_signal(9, True)
            self.waiters.wake()
        elif t is m.AttachFailed:
            if self.state != PENDING:
                return
            f: m.AttachFailed = msg  # type: ignore[assignment]
            self.state = FAILED
            self.failure = AttachFailed(f.kind, f.message, target=self.label)
            self.core.release(self)
            self.waiters.wake()
        elif t is m.Started or t is m.ExecFailed:
            return
        else:
            super().on_message(msg)

    def on_error(self, err: ProtocolError) -> None:
        if err.frame_kind == int(Kind.ATTACH) and self.state == PENDING:
            self.state = FAILED
            self.failure = err
            self.core.release(self)
            self.waiters.wake()
            return
        super().on_error(err)
