"""Sans-I/O state and operations of the extensions (fs, net, sessions, clock), shared by both clients.

:class:`ExtStream` is one extension stream on the connection (a file
operation, a connection, a LIST, a clock request): an id taken from its
request until its final frame, the agent → host window it grants (payload
bytes acknowledged as they are consumed, in batches of half the window and
always before a reader sleeps) and the host → agent credit (READY's
``stdin_window``, returned by the stream's ACK kind).

Operations are generators ("sans-I/O coroutines"): each ``yield`` hands the
I/O layer a ``(waiters, try_fn)`` pair, the layer waits as it does for
sessions (``Client._wait`` or ``AsyncClient._wait``) and sends the value
back; the generator's return value is the operation's result. The sync and
the asyncio layer drive the same generators (``Client._drive``,
``AsyncClient._drive``), under the lock or in the loop's thread, so every
protocol rule lives here once. Closing a generator that owns its stream
(an exception, a timeout, an asyncio cancellation) cancels that stream
(FS_CANCEL, NET_CLOSE), so nothing is left running in the guest.
"""

from __future__ import annotations

import collections
import posixpath
import stat as _stat
from dataclasses import dataclass
from typing import Any, Callable, Deque, Generator, List, Optional, Tuple, Type, TypeVar

from . import messages as m
from ._core import Core, Stream, Waiters
from .errors import (
    AttachFailed,
    FsError,
    ProtocolError,
    SessionEnded,
    TransportClosed,
    fs_error,
    net_error,
    remote_error,
)
from .protocol import STDIN_FRAME_MAX, Kind

T = TypeVar("T")
#: What an operation yields: the waiters to sleep on and the function to try again.
Step = Tuple[Waiters, Callable[[], Optional[Any]]]
Op = Generator[Step, Any, T]

DEFAULT_WINDOW = 1_048_576

_TYPE_BITS = {
    "file": _stat.S_IFREG,
    "dir": _stat.S_IFDIR,
    "symlink": _stat.S_IFLNK,
    "fifo": _stat.S_IFIFO,
    "socket": _stat.S_IFSOCK,
    "char": _stat.S_IFCHR,
    "block": _stat.S_IFBLK,
}


# --- results ---------------------------------------------------------------------


@dataclass(frozen=True)
class FileStat:
    """A stat record of the guest (``type``, permission ``mode`` bits, times in ns), also shaped like ``os.stat_result``."""

    type: str
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    atime_ns: int
    ctime_ns: int
    nlink: int
    ino: int
    target: Optional[str] = None

    @classmethod
    def of(cls, s: m.FsStat) -> "FileStat":
        return cls(s.type, s.size, s.mode, s.uid, s.gid, s.mtime_ns, s.atime_ns, s.ctime_ns, s.nlink, s.ino, s.target)

    @property
    def st_mode(self) -> int:
        """Type and permission bits, as ``os.stat_result.st_mode``."""
        return _TYPE_BITS.get(self.type, 0) | self.mode

    @property
    def st_size(self) -> int:
        return self.size

    @property
    def st_uid(self) -> int:
        return self.uid

    @property
    def st_gid(self) -> int:
        return self.gid

    @property
    def st_nlink(self) -> int:
        return self.nlink

    @property
    def st_ino(self) -> int:
        return self.ino

    @property
    def st_mtime(self) -> float:
        return self.mtime_ns / 1e9

    @property
    def st_atime(self) -> float:
        return self.atime_ns / 1e9

    @property
    def st_ctime(self) -> float:
        return self.ctime_ns / 1e9

    @property
    def st_mtime_ns(self) -> int:
        return self.mtime_ns

    @property
    def st_atime_ns(self) -> int:
        return self.atime_ns

    def is_dir(self) -> bool:
        return self.type == "dir"

    def is_file(self) -> bool:
        return self.type == "file"

    def is_symlink(self) -> bool:
        return self.type == "symlink"


@dataclass(frozen=True)
class DirEntry:
    """A directory entry (as ``os.DirEntry``): ``name``, ``path`` (joined), ``type``, ``stat`` with ``stat=True``.

    ``name_bytes`` is the exact name (the agent sends ``name_bin`` when it
    is not valid UTF-8; ``name`` is then its lossy form).
    """

    name: str
    path: str
    type: str
    name_bytes: bytes
    entry_stat: Optional[FileStat] = None

    def is_dir(self) -> bool:
        return self.type == "dir"

    def is_file(self) -> bool:
        return self.type == "file"

    def is_symlink(self) -> bool:
        return self.type == "symlink"

    def stat(self) -> Optional[FileStat]:
        """The entry's metadata (listed with ``stat=True``; None otherwise)."""
        return self.entry_stat


@dataclass(frozen=True)
class WatchEvent:
    """A change under a watched path: ``type`` (``created``, ``modified``, ``removed``, ``moved_from``,
    ``moved_to``, ``attrib``), ``path`` relative to the watched one, ``is_dir``, ``cookie`` pairing moves.

    ``overflow`` is true on the first event after the kernel's queue
    overflowed: events were lost in between, rescan to know the state.
    """

    type: str
    path: str
    is_dir: bool
    cookie: Optional[int] = None
    overflow: bool = False


@dataclass(frozen=True)
class ClockReading:
    """CLOCK: the guest's CLOCK_REALTIME and CLOCK_BOOTTIME (ns) and how often the VM was restored."""

    realtime_ns: int
    boottime_ns: int
    restores: int

    @property
    def realtime(self) -> float:
        """CLOCK_REALTIME in seconds since the epoch (as ``time.time()``)."""
        return self.realtime_ns / 1e9


@dataclass(frozen=True)
class ClockSet:
    """CLOCK_SET_DONE: the guest's clock just before and just after it was stepped (ns)."""

    old_ns: int
    new_ns: int

    @property
    def step_ns(self) -> int:
        """How far the clock was moved."""
        return self.new_ns - self.old_ns


# --- the stream ---------------------------------------------------------------------

_FINAL_FS = (m.FsDone, m.FsError)
_FINAL_NET = (m.NetFailed, m.NetClosed)


class ExtStream(Stream):
    """One extension stream: a request's id until its final frame, windows both ways.

    ``recv_kind`` is the raw kind carrying bytes to us (FS_DATA, NET_RECV;
    0 for none), ``ack`` builds the acknowledgement that returns window,
    ``send_kind`` the raw kind carrying bytes to the agent (FS_WRITE,
    NET_SEND), ``credit_ack`` the message type returning credit.
    ``counted`` are the map types whose payload bytes count against the
    window (FS_ENTRIES, FS_EVENTS). ``is_final`` tells the final frame,
    ``failure`` turns a final frame into an exception (None: success).
    """

    def __init__(
        self,
        core: Core,
        request: m.Message,
        *,
        is_final: Callable[[m.Message], bool],
        failure: Callable[[m.Message], Optional[BaseException]],
        window: int = 0,
        recv_kind: int = 0,
        ack: Optional[Callable[[int], m.Message]] = None,
        send_kind: int = 0,
        credit_ack: Optional[Type[m.Message]] = None,
        counted: Tuple[Type[m.Message], ...] = (),
        cancel: Optional[Callable[[], m.Message]] = None,
        eof_kind: Optional[Type[m.Message]] = None,
    ) -> None:
        self.core = core
        self.request = request
        self.request_kind = int(request.KIND)
        self.is_final = is_final
        self.failure_of = failure
        self.window = window
        self.ack_threshold = max(1, (window + 1) // 2) if window else 0
        self.recv_kind = recv_kind
        self.ack = ack
        self.send_kind = send_kind
        self.credit_ack = credit_ack
        self.counted = counted
        self.cancel_msg = cancel
        self.eof_kind = eof_kind
        self.waiters = core.new_waiters()
        self.items: Deque[Tuple[m.Message, int]] = collections.deque()
        self.data: Deque[bytes] = collections.deque()
        self.data_off = 0
        self.buffered = 0
        self.eof = False
        self.final: Optional[m.Message] = None
        self.error: Optional[BaseException] = None
        self.errors: List[ProtocolError] = []
        self.closed: Optional[TransportClosed] = None
        self.pending_ack = 0
        self.credit = 0
        self.credit_max = 0
        self.discard = False
        self.cancelled = False
        self.send_closed = False

    # --- life -----------------------------------------------------------------------

    def start(self) -> None:
        """Take a fresh id and queue the request."""
        ready = self.core.ready
        self.credit = self.credit_max = ready.stdin_window if ready is not None else 0
        self.core.register(self)
        self.core.send(self.id, self.request)

    @property
    def ended(self) -> bool:
        """Whether the final frame (or a refusal of the request, or the transport's end) came."""
        return self.final is not None or self.error is not None or self.closed is not None

    def cancel(self) -> None:
        """Queue the stream's cancel frame once (FS_CANCEL, NET_CLOSE); further data is dropped."""
        self.discard = True
        self.data.clear()
        self.data_off = 0
        self.buffered = 0
        if self.ended or self.cancelled or self.cancel_msg is None:
            return
        self.cancelled = True
        self.core.send(self.id, self.cancel_msg())

    # --- frames from the agent -----------------------------------------------------------

    def on_raw(self, kind: int, payload: memoryview) -> None:
        if kind != self.recv_kind or self.ended:
            return
        n = len(payload)
        if not n:
            return
        if self.discard:
            self._consumed(n)
            return
        self.data.append(bytes(payload))  # the one copy of the payload
        self.buffered += n
        self.waiters.wake()

    def on_message(self, msg: m.Message) -> None:
        if self.ended:
            return
        if self.credit_ack is not None and type(msg) is self.credit_ack:
            self.credit = min(self.credit + msg.bytes, self.credit_max)  # type: ignore[attr-defined]
        elif self.is_final(msg):
            self.final = msg
            self.core.release(self)
        elif self.eof_kind is not None and type(msg) is self.eof_kind:
            self.eof = True
        else:
            size = self.core.last_len if isinstance(msg, self.counted) else 0
            if self.discard:
                self._consumed(size)
            else:
                self.items.append((msg, size))
        self.waiters.wake()

    def on_error(self, err: ProtocolError) -> None:
        err = remote_error(err)
        if err.frame_kind == self.request_kind and not self.ended:
            # The request itself was refused (not served, bad payload): the id is free again.
            self.error = err
            self.core.release(self)
        elif err.frame_kind == int(Kind.FS_CANCEL) and err.kind == "unknown_session":
            pass  # the cancel crossed the final frame
        else:
            self.errors.append(err)
        self.waiters.wake()

    def on_close(self, exc: TransportClosed) -> None:
        self.closed = exc
        self.waiters.wake()

    # --- window to us --------------------------------------------------------------------

    def _consumed(self, n: int) -> None:
        if not n or not self.window or self.ended or self.ack is None:
            return
        self.pending_ack += n
        if self.pending_ack >= self.ack_threshold:
            self._send_ack()

    def _send_ack(self) -> None:
        n, self.pending_ack = self.pending_ack, 0
        if self.ack is not None and self.closed is None:
            self.core.send(self.id, self.ack(n))

    def before_wait(self) -> None:
        """Acknowledge what was consumed before a reader sleeps (the agent never waits for us)."""
        if self.pending_ack and not self.ended:
            self._send_ack()

    # --- raising ---------------------------------------------------------------------------

    def raise_failure(self) -> None:
        """Raise how the stream failed, if it did (a failing final frame, a refused request, the end)."""
        if self.error is not None:
            raise self.error
        if self.final is not None:
            exc = self.failure_of(self.final)
            if exc is not None:
                raise exc
        if self.closed is not None:
            raise self.closed

    def _raise_send_error(self) -> None:
        for e in self.errors:
            if e.frame_kind == self.send_kind:
                self.errors.remove(e)
                raise e

    # --- tries ---------------------------------------------------------------------------------

    def try_final(self) -> Optional[m.Message]:
        """The final frame once it came (after every item and byte was consumed); raises a failure."""
        if self.final is not None and not self.items and not self.data:
            self.raise_failure()
            return self.final
        if self.error is not None or self.closed is not None:
            self.raise_failure()
        if self.items or self.data:
            self.items.clear()
            n = self.buffered
            self.data.clear()
            self.data_off = self.buffered = 0
            self._consumed(n)
        self.before_wait()
        return None

    def try_item(self) -> Optional[Tuple[Optional[m.Message]]]:
        """``(msg,)`` for the next map frame, ``(None,)`` once the stream ended well; None to wait."""
        if self.items:
            msg, size = self.items.popleft()
            self._consumed(size)
            return (msg,)
        if self.final is not None or self.error is not None or self.closed is not None:
            self.raise_failure()
            return (None,)
        self.before_wait()
        return None

    def try_read(self, n: int) -> Optional[bytes]:
        """Up to ``n`` bytes (n < 0: the oldest chunk); ``b""`` at the end; None to wait; raises a failure."""
        q = self.data
        if q:
            chunk = q[0]
            off = self.data_off
            if n < 0 or off + n >= len(chunk):
                q.popleft()
                self.data_off = 0
                out = chunk if off == 0 else chunk[off:]
            else:
                out = chunk[off : off + n]
                self.data_off = off + n
            self.buffered -= len(out)
            self._consumed(len(out))
            return out
        if self.eof:
            return b""
        if self.final is not None or self.error is not None or self.closed is not None:
            self.raise_failure()
            return b""
        self.before_wait()
        return None

    def try_credit(self) -> Optional[bool]:
        """True once some send credit is there; raises once the stream ended (or a send was refused)."""
        self._raise_send_error()
        if self.ended:
            self.raise_failure()
            raise SessionEnded(self.id, "send more: the stream has ended")
        if self.credit > 0:
            return True
        self.before_wait()
        return None

    def try_drained(self) -> Optional[bool]:
        """True once everything sent was acknowledged (or the stream ended)."""
        if self.ended or self.credit >= self.credit_max:
            return True
        self.before_wait()
        return None

    # --- sending -------------------------------------------------------------------------------

    def push(self, data: memoryview, off: int) -> int:
        """Queue raw frames of ``send_kind`` from ``data[off:]`` within the credit; the new offset."""
        self._raise_send_error()
        if self.ended:
            self.raise_failure()
            raise SessionEnded(self.id, "send more: the stream has ended")
        if self.send_closed:
            raise ValueError("the sending side is closed already")
        end = len(data)
        while off < end and self.credit > 0:
            n = min(self.credit, end - off, STDIN_FRAME_MAX)
            self.core.send_raw(self.send_kind, self.id, data[off : off + n])
            self.credit -= n
            off += n
        return off

    def close_send(self, msg: m.Message) -> None:
        """Queue the end of our data (FS_END, NET_SHUTDOWN) once."""
        if self.send_closed or self.ended:
            return
        self.send_closed = True
        self.core.send(self.id, msg)


def wait_for(st: ExtStream, fn: Callable[[], Optional[T]]) -> Op[T]:
    """An operation of one step."""
    v: T = yield st.waiters, fn
    return v


def push_all(st: ExtStream, data: m.Buffer) -> Op[int]:
    """Send all of ``data`` on ``st`` within its credit; cancels the stream if abandoned."""
    mv = memoryview(data).cast("B")
    off = 0
    try:
        while True:
            off = st.push(mv, off)
            if off >= len(mv):
                return len(mv)
            yield st.waiters, st.try_credit
    except GeneratorExit:
        st.cancel()
        raise


# --- fs ------------------------------------------------------------------------------------------


def _fs_failure(op: str, path: str) -> Callable[[m.Message], Optional[BaseException]]:
    def failure(msg: m.Message) -> Optional[BaseException]:
        if isinstance(msg, m.FsError):
            return fs_error(msg.kind, msg.message, errno=msg.errno, path=msg.path or path, op=op)
        return None

    return failure


def fs_stream(core: Core, req: m.FsRequest) -> ExtStream:
    """The stream of one FS_REQUEST (not started)."""
    return ExtStream(
        core,
        req,
        is_final=lambda msg: isinstance(msg, _FINAL_FS),
        failure=_fs_failure(req.op, req.path),
        window=req.window,
        recv_kind=int(Kind.FS_DATA),
        ack=lambda n: m.FsDataAck(bytes=n),
        send_kind=int(Kind.FS_WRITE),
        credit_ack=m.FsWriteAck,
        counted=(m.FsEntries, m.FsEvents),
        cancel=m.FsCancel,
    )


def _owned(st: ExtStream, body: Op[T]) -> Op[T]:
    """Run ``body``; if it is abandoned (exception, cancellation), cancel ``st``."""
    try:
        return (yield from body)
    except BaseException:
        st.cancel()
        raise


def fs_simple(core: Core, req: m.FsRequest) -> Op[m.FsDone]:
    """An operation answered by FS_DONE alone (stat, mkdir, rename, ...)."""
    st = fs_stream(core, req)
    st.start()
    done = yield from _owned(st, wait_for(st, st.try_final))
    assert isinstance(done, m.FsDone)
    return done


def fs_open_read(core: Core, req: m.FsRequest) -> Op[Tuple[ExtStream, Optional[FileStat]]]:
    """Start a read or tar_get; returns the stream and FS_OPENED's stat once the file is open.

    A read whose open fails gets its FS_ERROR instead of FS_OPENED, raised here.
    """
    st = fs_stream(core, req)
    st.start()
    item = yield from _owned(st, wait_for(st, st.try_item))
    msg = item[0]
    if not isinstance(msg, m.FsOpened):
        st.cancel()
        raise fs_error("other", f"expected FS_OPENED, the agent sent {type(msg).__name__}", path=req.path, op=req.op)
    return st, FileStat.of(msg.stat) if msg.stat is not None else None


def read_to_end(st: ExtStream) -> Op[bytes]:
    """Every byte of an open read stream, then its FS_DONE."""
    parts: List[bytes] = []

    def body() -> Op[bytes]:
        while True:
            b = yield st.waiters, lambda: st.try_read(-1)
            if not b:
                break
            parts.append(b)
        yield st.waiters, st.try_final
        return b"".join(parts)

    return (yield from _owned(st, body()))


def fs_read_all(core: Core, req: m.FsRequest) -> Op[bytes]:
    st, _ = yield from fs_open_read(core, req)
    return (yield from read_to_end(st))


def fs_open_write(core: Core, req: m.FsRequest) -> Op[ExtStream]:
    """Start a write or tar_put and wait for FS_OPENED (so open errors come from the call that opens)."""
    st = fs_stream(core, req)
    st.start()
    item = yield from _owned(st, wait_for(st, st.try_item))
    msg = item[0]
    if not isinstance(msg, m.FsOpened):
        st.cancel()
        raise fs_error("other", f"expected FS_OPENED, the agent sent {type(msg).__name__}", path=req.path, op=req.op)
    return st


def finish_write(st: ExtStream) -> Op[m.FsDone]:
    """FS_END, then FS_DONE (the bytes the worker wrote)."""
    st.close_send(m.FsEnd())
    done = yield from _owned(st, wait_for(st, st.try_final))
    assert isinstance(done, m.FsDone)
    return done


def fs_write_all(core: Core, req: m.FsRequest, data: m.Buffer) -> Op[m.FsDone]:
    st = yield from fs_open_write(core, req)
    yield from push_all(st, data)
    return (yield from finish_write(st))


def entry_of(parent: str, e: m.FsEntry) -> DirEntry:
    raw = e.name_bin if e.name_bin is not None else e.name.encode()
    return DirEntry(
        name=e.name,
        path=posixpath.join(parent, e.name),
        type=e.type,
        name_bytes=bytes(raw),
        entry_stat=FileStat.of(e.stat) if e.stat is not None else None,
    )


def next_entries(st: ExtStream, parent: str) -> Op[Optional[List[DirEntry]]]:
    """The next batch of a list stream (None at its end)."""
    while True:
        item = yield from _owned(st, wait_for(st, st.try_item))
        msg = item[0]
        if msg is None:
            return None
        if isinstance(msg, m.FsEntries):
            return [entry_of(parent, e) for e in msg.entries]


def fs_list_all(core: Core, req: m.FsRequest) -> Op[List[DirEntry]]:
    st = fs_stream(core, req)
    st.start()
    out: List[DirEntry] = []
    while True:
        batch = yield from next_entries(st, req.path)
        if batch is None:
            return out
        out.extend(batch)


def next_events(st: ExtStream) -> Op[Optional[List[WatchEvent]]]:
    """The next batch of a watch (None once it ended: FS_DONE after FS_CANCEL)."""
    while True:
        item = yield from wait_for(st, st.try_item)  # abandoned (a timeout): the watch goes on
        msg = item[0]
        if msg is None:
            return None
        if isinstance(msg, m.FsEvents):
            evs = [WatchEvent(e.type, e.path, e.dir, e.cookie) for e in msg.events]
            if msg.overflow:
                if evs:
                    e0 = evs[0]
                    evs[0] = WatchEvent(e0.type, e0.path, e0.is_dir, e0.cookie, overflow=True)
                else:
                    evs = [WatchEvent("overflow", "", False, None, overflow=True)]
            return evs


def fs_open_watch(core: Core, req: m.FsRequest) -> Op[ExtStream]:
    """Start a watch and wait for FS_OPENED (the watches are set)."""
    return (yield from fs_open_write(core, req))


def stop_watch(st: ExtStream) -> Op[None]:
    """FS_CANCEL, then FS_DONE (events still queued are dropped)."""
    st.cancel()
    if not st.ended:
        yield st.waiters, lambda: True if st.ended else None
    if st.error is not None:
        raise st.error
    return None


# --- net -----------------------------------------------------------------------------------------


def net_stream(core: Core, req: m.NetConnect, target: str) -> ExtStream:
    def failure(msg: m.Message) -> Optional[BaseException]:
        if isinstance(msg, m.NetFailed):
            return net_error(msg.kind, msg.message, errno=msg.errno, target=target)
        if isinstance(msg, m.NetClosed) and msg.error is not None:
            return net_error(msg.error, msg.message or msg.error, errno=msg.errno, target=target)
        return None

    return ExtStream(
        core,
        req,
        is_final=lambda msg: isinstance(msg, _FINAL_NET),
        failure=failure,
        window=req.window,
        recv_kind=int(Kind.NET_RECV),
        ack=lambda n: m.NetRecvAck(bytes=n),
        send_kind=int(Kind.NET_SEND),
        credit_ack=m.NetSendAck,
        cancel=lambda: m.NetClose(reset=False),
        eof_kind=m.NetEof,
    )


def net_connect(core: Core, req: m.NetConnect, target: str) -> Op[Tuple[ExtStream, m.NetConnected]]:
    """NET_CONNECT, then NET_CONNECTED (or the typed NET_FAILED)."""
    st = net_stream(core, req, target)
    st.start()
    item = yield from _owned(st, wait_for(st, st.try_item))
    msg = item[0]
    if not isinstance(msg, m.NetConnected):
        st.raise_failure()
        st.cancel()
        raise net_error("other", f"expected NET_CONNECTED, the agent sent {type(msg).__name__}", target=target)
    return st, msg


def net_close(st: ExtStream, reset: bool) -> None:
    """NET_CLOSE now (what is queued for the guest is dropped); NET_CLOSED comes later."""
    st.discard = True
    st.data.clear()
    st.data_off = st.buffered = 0
    if st.ended or st.cancelled:
        return
    st.cancelled = True
    st.core.send(st.id, m.NetClose(reset=reset))


# --- sessions and clock ------------------------------------------------------------------------


def _request_stream(core: Core, req: m.Message, final: Callable[[m.Message], bool]) -> ExtStream:
    return ExtStream(core, req, is_final=final, failure=lambda msg: None)


def list_sessions(core: Core, all: bool) -> Op[List[m.SessionInfo]]:
    """LIST, then SESSIONS frames until ``more`` is false."""
    st = _request_stream(core, m.ListSessions(all=all), lambda msg: isinstance(msg, m.Sessions) and not msg.more)
    st.start()
    out: List[m.SessionInfo] = []
    while True:
        item = yield st.waiters, st.try_item
        msg = item[0]
        if msg is None:
            assert isinstance(st.final, m.Sessions)
            out.extend(st.final.sessions)
            return out
        if isinstance(msg, m.Sessions):
            out.extend(msg.sessions)


def clock_request(core: Core, req: m.Message, answer: Type[m.Message]) -> Op[m.Message]:
    """A clock request (ids are not taken by the agent; this SDK still uses a fresh one) and its answer."""
    st = _request_stream(core, req, lambda msg: isinstance(msg, answer))
    st.start()
    try:
        v = yield st.waiters, st.try_final
    finally:
        if not st.ended:
            core.release(st)
    assert isinstance(v, answer)
    return v


def attach_failure(msg: m.AttachFailed, target: str) -> AttachFailed:
    return AttachFailed(msg.kind, msg.message, target=target)
