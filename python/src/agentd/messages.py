"""Typed messages of protocol v1: one dataclass per kind, strict decoding, canonical encoding.

Every kind of docs/PROTOCOL.md has a class here, the extensions' kinds
(0x40-0x75) included, so that extension APIs can be added without touching
the codec. A class's fields are the payload keys; ``KIND`` is its kind.

**Decoding** (:func:`decode`) follows the receiving rules of
docs/PROTOCOL.md "Payloads": a map payload is exactly one MessagePack map
(an empty payload is an empty map) with ``str`` keys of valid UTF-8, each key
at most once, containers nested at most 32 deep, values of exactly the
key's type (integers of any width that fit, ``bin`` is not ``str``, ``0``/``1``
are not booleans, ``nil`` is no value), unknown keys ignored whatever their
well-formed value, absent optional keys at their defaults. Anything else
raises :class:`~agentd.errors.ProtocolError` of kind ``bad_payload``.

**Encoding** (:meth:`Message.encode_payload`) is the canonical form of
docs/PROTOCOL.md "Canonical encoding": keys in the order of the
document's tables, integers and strings in their smallest MessagePack
form, optional keys without a value left out, keys with defaults written.
Keys that an extension adds to a message of the contract (READY
``features``, EXEC ``detach``/``timeout_ms``/``kill_grace_ms``, SIGNAL
``tree``, EXITED ``timed_out``/``oom_killed``) are left out at their default,
so a message that uses no extension is byte for byte what a host that knows
no extension sends (and what the golden vectors hold).

Raw payloads are kept as the buffer they were given (no copy on encoding);
decoding a raw payload makes the one copy that hands the bytes to the user.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterable, Optional, Tuple, Type, TypeVar, Union

import msgpack

from .errors import EncodeError, ProtocolError
from .protocol import KINDS, MAX_DEPTH, Direction, Encoding, ErrorKind, Kind

__all__ = [
    "Buffer",
    "Record",
    "Message",
    "MapMessage",
    "RawMessage",
    "EmptyMessage",
    "decode",
    "message_class",
    "MESSAGE_CLASSES",
    # core
    "Ready",
    "Ping",
    "Pong",
    "Shutdown",
    "ShutdownDone",
    "Error",
    "Rlimit",
    "Exec",
    "Started",
    "ExecFailed",
    "Stdin",
    "StdinClose",
    "StdinAck",
    "Resize",
    "Signal",
    "OutputAck",
    "Stdout",
    "Stderr",
    "Exited",
    # fs
    "FsStat",
    "FsEntry",
    "FsEvent",
    "FsRequest",
    "FsOpened",
    "FsData",
    "FsDataAck",
    "FsWrite",
    "FsWriteAck",
    "FsEnd",
    "FsEntries",
    "FsEvents",
    "FsDone",
    "FsError",
    "FsCancel",
    # net
    "NetConnect",
    "NetConnected",
    "NetFailed",
    "NetSend",
    "NetSendAck",
    "NetRecv",
    "NetRecvAck",
    "NetShutdown",
    "NetEof",
    "NetClose",
    "NetClosed",
    # sessions
    "SessionInfo",
    "ListSessions",
    "Sessions",
    "Attach",
    "Attached",
    "AttachFailed",
    "Detach",
    "Detached",
    # clock
    "ClockGet",
    "Clock",
    "ClockSet",
    "ClockSetDone",
    "Entropy",
    "EntropyDone",
]

#: What a raw payload may be given as (kept as is on encoding, never copied).
Buffer = Union[bytes, bytearray, memoryview]

R = TypeVar("R", bound="Record")
M = TypeVar("M", bound="Message")


def _bad(message: str, kind: Optional[int] = None) -> ProtocolError:
    return ProtocolError(ErrorKind.BAD_PAYLOAD, message, frame_kind=kind, remote=False)


def _utf8_ok(s: str) -> bool:
    # msgpack decodes str with surrogateescape: invalid UTF-8 shows as lone
    # surrogates, which valid UTF-8 can never produce.
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Pairs(list):  # type: ignore[type-arg]
    """A decoded MessagePack map: its (key, value) pairs in order, duplicates kept."""

    __slots__ = ()


def _describe(v: object) -> str:
    if v is None:
        return "nil"
    t = type(v)
    if t is bool:
        return "a boolean"
    if t is int:
        return "an integer"
    if t is float:
        return "a float"
    if t is str:
        return "a string"
    if t is bytes:
        return "bin"
    if t is _Pairs:
        return "a map"
    if t is list:
        return "an array"
    return "an ext value"


# --- wire types -----------------------------------------------------------


class _Type:
    name: str = "?"

    def decode(self, v: Any, where: str) -> Any:
        raise NotImplementedError

    def encode(self, v: Any, where: str) -> Any:
        raise NotImplementedError


class _Int(_Type):
    def __init__(self, name: str, lo: int, hi: int) -> None:
        self.name, self.lo, self.hi = name, lo, hi

    def decode(self, v: Any, where: str) -> int:
        if type(v) is not int:
            raise _bad(f"`{where}` is {_describe(v)}, not an integer ({self.name})")
        i: int = v
        if not self.lo <= i <= self.hi:
            raise _bad(f"`{where}` = {i} does not fit {self.name}")
        return i

    def encode(self, v: Any, where: str) -> int:
        if type(v) is not int and not (isinstance(v, int) and not isinstance(v, bool)):
            raise EncodeError(f"`{where}` must be an integer ({self.name}), not {type(v).__name__}")
        i = int(v)
        if not self.lo <= i <= self.hi:
            raise EncodeError(f"`{where}` = {i} does not fit {self.name}")
        return i


class _Bool(_Type):
    name = "bool"

    def decode(self, v: Any, where: str) -> bool:
        if type(v) is not bool:
            raise _bad(f"`{where}` is {_describe(v)}, not a boolean")
        return v

    def encode(self, v: Any, where: str) -> bool:
        if type(v) is not bool:
            raise EncodeError(f"`{where}` must be a bool, not {type(v).__name__}")
        return v


class _Str(_Type):
    name = "str"

    def decode(self, v: Any, where: str) -> str:
        if type(v) is not str:
            raise _bad(f"`{where}` is {_describe(v)}, not a string")
        if not _utf8_ok(v):
            raise _bad(f"`{where}` is not valid UTF-8")
        return v

    def encode(self, v: Any, where: str) -> str:
        if not isinstance(v, str):
            raise EncodeError(f"`{where}` must be a str, not {type(v).__name__}")
        if not _utf8_ok(v):
            raise EncodeError(f"`{where}` cannot be encoded as UTF-8")
        return v


class _Bin(_Type):
    name = "bin"

    def decode(self, v: Any, where: str) -> bytes:
        if type(v) is not bytes:
            raise _bad(f"`{where}` is {_describe(v)}, not bin")
        return v

    def encode(self, v: Any, where: str) -> bytes:
        if not isinstance(v, (bytes, bytearray, memoryview)):
            raise EncodeError(f"`{where}` must be bytes, not {type(v).__name__}")
        return bytes(v)


class _List(_Type):
    def __init__(self, item: _Type) -> None:
        self.item = item
        self.name = f"[{item.name}]"

    def decode(self, v: Any, where: str) -> list:  # type: ignore[type-arg]
        if type(v) is not list:
            raise _bad(f"`{where}` is {_describe(v)}, not an array")
        item = self.item
        return [item.decode(x, f"{where}[{i}]") for i, x in enumerate(v)]

    def encode(self, v: Any, where: str) -> list:  # type: ignore[type-arg]
        if not isinstance(v, (list, tuple)):
            raise EncodeError(f"`{where}` must be a list, not {type(v).__name__}")
        item = self.item
        return [item.encode(x, f"{where}[{i}]") for i, x in enumerate(v)]


class _Rec(_Type):
    def __init__(self, cls: Callable[[], Type["Record"]]) -> None:
        self._cls = cls
        self.name = "map"

    def decode(self, v: Any, where: str) -> "Record":
        if type(v) is not _Pairs:
            raise _bad(f"`{where}` is {_describe(v)}, not a map")
        return self._cls()._from_pairs(v, where, top=False)

    def encode(self, v: Any, where: str) -> Dict[str, Any]:
        cls = self._cls()
        if not isinstance(v, cls):
            raise EncodeError(f"`{where}` must be a {cls.__name__}, not {type(v).__name__}")
        return v._to_wire()


U8 = _Int("u8", 0, 0xFF)
U16 = _Int("u16", 0, 0xFFFF)
U32 = _Int("u32", 0, 0xFFFF_FFFF)
U64 = _Int("u64", 0, 0xFFFF_FFFF_FFFF_FFFF)
I32 = _Int("i32", -(2**31), 2**31 - 1)
I64 = _Int("i64", -(2**63), 2**63 - 1)
BOOL = _Bool()
STR = _Str()
BIN = _Bin()
STRS = _List(STR)


class _Key:
    """One payload key: its wire type, whether it is required, whether its default is left out."""

    __slots__ = ("name", "type", "required", "omit_default", "default")

    def __init__(self, name: str, type_: _Type, *, required: bool = False, omit_default: bool = False) -> None:
        self.name = name
        self.type = type_
        self.required = required
        self.omit_default = omit_default
        self.default: Any = None


def K(name: str, type_: _Type, *, req: bool = False, ext: bool = False) -> _Key:
    """A key of a schema: ``req`` for required keys, ``ext`` for an extension's key left out at its default."""
    return _Key(name, type_, required=req, omit_default=ext)


# --- records and messages -------------------------------------------------


class Record:
    """A map with a fixed schema: a payload, or a map nested in one (an rlimit, a stat record, ...)."""

    _WIRE: ClassVar[Tuple[_Key, ...]] = ()
    _INDEX: ClassVar[Dict[str, _Key]] = {}
    _REQUIRED: ClassVar[Tuple[str, ...]] = ()

    @classmethod
    def _from_pairs(cls: Type[R], pairs: Iterable[Tuple[Any, Any]], where: str, *, top: bool) -> R:
        index = cls._INDEX
        kw: Dict[str, Any] = {}
        seen: set = set()  # type: ignore[type-arg]
        for k, v in pairs:
            if type(k) is not str:
                raise _bad(f"{where}: a key is {_describe(k)}, not a string")
            if not _utf8_ok(k):
                raise _bad(f"{where}: a key is not valid UTF-8")
            if top:
                # Rule 3: a key appears at most once, known or not.
                if k in seen:
                    raise _bad(f"{where}: key `{k}` appears twice")
                seen.add(k)
            spec = index.get(k)
            if spec is None:
                continue
            if k in kw:
                raise _bad(f"{where}: key `{k}` appears twice")
            kw[k] = spec.type.decode(v, k)
        for name in cls._REQUIRED:
            if name not in kw:
                raise _bad(f"{where}: missing field `{name}`")
        return cls(**kw)

    def _to_wire(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for key in self._WIRE:
            v = getattr(self, key.name)
            if v is None:
                if key.required:
                    raise EncodeError(f"{type(self).__name__}: `{key.name}` is required")
                continue
            if key.omit_default and v == key.default:
                continue
            out[key.name] = key.type.encode(v, key.name)
        return out


class Message:
    """Base class of every message. ``KIND`` is the kind it encodes as."""

    KIND: ClassVar[Kind]

    def encode_payload(self) -> Buffer:
        """The payload bytes of this message (canonical form; a raw payload as given)."""
        raise NotImplementedError

    @classmethod
    def decode_payload(cls: Type[M], payload: Buffer) -> M:
        """Decode a payload of this kind; raises ProtocolError ``bad_payload``."""
        raise NotImplementedError


class MapMessage(Message, Record):
    """A message whose payload is a MessagePack map."""

    def encode_payload(self) -> bytes:
        try:
            return msgpack.packb(self._to_wire(), use_bin_type=True)  # type: ignore[no-any-return]
        except (ValueError, TypeError, OverflowError) as e:
            raise EncodeError(f"{type(self).__name__}: {e}") from e

    @classmethod
    def decode_payload(cls: Type[M], payload: Buffer) -> M:
        pairs = _unpack_map(payload, int(cls.KIND))
        try:
            return cls._from_pairs(pairs, cls.KIND.name, top=True)  # type: ignore[attr-defined,no-any-return]
        except ProtocolError as e:
            raise _bad(e.message, int(cls.KIND)) from None


class RawMessage(Message):
    """A message whose payload is the bytes themselves."""

    data: Buffer

    def encode_payload(self) -> Buffer:
        return self.data

    @classmethod
    def decode_payload(cls: Type[M], payload: Buffer) -> M:
        return cls(bytes(payload))  # type: ignore[call-arg]


class EmptyMessage(Message):
    """A message without payload. Received, an empty payload or any valid map is accepted."""

    def encode_payload(self) -> bytes:
        return b""

    @classmethod
    def decode_payload(cls: Type[M], payload: Buffer) -> M:
        if len(payload):
            pairs = _unpack_map(payload, int(cls.KIND))
            try:
                _Empty._from_pairs(pairs, cls.KIND.name, top=True)
            except ProtocolError as e:
                raise _bad(e.message, int(cls.KIND)) from None
        return cls()


class _Empty(Record):
    pass


_UNPACK_OPTS: Dict[str, Any] = dict(
    object_pairs_hook=_Pairs,
    strict_map_key=False,
    raw=False,
    unicode_errors="surrogateescape",
    use_list=True,
)


def _check_depth(obj: Any, level: int) -> None:
    if level > MAX_DEPTH:
        raise _bad(f"containers nest deeper than {MAX_DEPTH} levels")
    if type(obj) is _Pairs:
        for k, v in obj:
            tk, tv = type(k), type(v)
            if tk is _Pairs or tk is list:
                _check_depth(k, level + 1)
            if tv is _Pairs or tv is list:
                _check_depth(v, level + 1)
    else:
        for v in obj:
            tv = type(v)
            if tv is _Pairs or tv is list:
                _check_depth(v, level + 1)


def _unpack_map(payload: Buffer, kind: int) -> _Pairs:
    if not len(payload):
        return _Pairs()
    first = payload[0]
    if not (0x80 <= first <= 0x8F or first in (0xDE, 0xDF)):
        raise _bad("the payload is not a MessagePack map", kind)
    try:
        obj = msgpack.unpackb(payload, **_UNPACK_OPTS)
    except msgpack.ExtraData:
        raise _bad("bytes follow the payload's map", kind) from None
    except Exception as e:  # noqa: BLE001 - any failure of the MessagePack decoder is bad_payload
        raise _bad(f"the payload is not valid MessagePack ({e or type(e).__name__})", kind) from None
    if type(obj) is not _Pairs:  # pragma: no cover - the first byte was a map header
        raise _bad("the payload is not a MessagePack map", kind)
    try:
        _check_depth(obj, 1)
    except ProtocolError as e:
        raise _bad(e.message, kind) from None
    return obj


MESSAGE_CLASSES: Dict[int, Type[Message]] = {}
_RecordT = TypeVar("_RecordT", bound=type)


def _schema(*keys: _Key, kind: Optional[Kind] = None) -> Callable[[_RecordT], _RecordT]:
    """Attach a wire schema (keys in canonical order) to a dataclass, and register its kind."""

    def deco(cls: _RecordT) -> _RecordT:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if issubclass(cls, Record):
            names = [k.name for k in keys]
            if sorted(names) != sorted(fields):
                raise AssertionError(f"{cls.__name__}: schema {names} != fields {sorted(fields)}")
            for k in keys:
                f = fields[k.name]
                if f.default is not dataclasses.MISSING:
                    k.default = f.default
                elif f.default_factory is not dataclasses.MISSING:
                    k.default = f.default_factory()
                elif not k.required:
                    raise AssertionError(f"{cls.__name__}.{k.name}: optional key without default")
            cls._WIRE = tuple(keys)
            cls._INDEX = {k.name: k for k in keys}
            cls._REQUIRED = tuple(k.name for k in keys if k.required)
        if kind is not None:
            cls.KIND = kind  # type: ignore[attr-defined]
            expected = {Encoding.MAP: MapMessage, Encoding.RAW: RawMessage, Encoding.EMPTY: EmptyMessage}
            if not issubclass(cls, expected[KINDS[kind].encoding]):
                raise AssertionError(f"{cls.__name__}: wrong base for {kind.name}")
            MESSAGE_CLASSES[int(kind)] = cls
        return cls

    return deco


def message_class(kind: int) -> Optional[Type[Message]]:
    """The message class of a kind number, or None for a kind this SDK does not know."""
    return MESSAGE_CLASSES.get(kind)


def decode(kind: int, payload: Buffer, *, direction: Optional[Direction] = None) -> Message:
    """Decode one frame's payload into its message.

    Checks in the protocol's order: the kind (``unknown_kind``), then, when
    ``direction`` is given, that the kind travels that way
    (``wrong_direction``), then the payload (``bad_payload``). Raises
    :class:`~agentd.errors.ProtocolError` with ``remote=False``.
    """
    cls = MESSAGE_CLASSES.get(kind)
    if cls is None:
        raise ProtocolError(ErrorKind.UNKNOWN_KIND, f"unknown kind 0x{kind:02x}", frame_kind=kind, remote=False)
    if direction is not None and KINDS[kind].direction is not direction:
        raise ProtocolError(
            ErrorKind.WRONG_DIRECTION,
            f"{KINDS[kind].kind.name} travels {KINDS[kind].direction.value}",
            frame_kind=kind,
            remote=False,
        )
    return cls.decode_payload(payload)


# === core kinds =============================================================


@_schema(
    K("protocol", U32, req=True),
    K("agent", STR, req=True),
    K("pid", U32, req=True),
    K("pid1", BOOL, req=True),
    K("max_payload", U32, req=True),
    K("stdin_window", U32, req=True),
    K("max_sessions", U32, req=True),
    K("uptime_ms", U64),
    K("features", STRS, ext=True),
    K("realtime_ns", I64),
    K("restores", U32),
    K("clock_set", BOOL),
    K("replay_bytes", U32),
    K("cgroups", BOOL),
    K("mounts", _List(_Rec(lambda: MountStatus)), ext=True),
    kind=Kind.READY,
)
@dataclass
class Ready(MapMessage):
    """READY: the agent's greeting, sent first and after each reconnect to a device port."""

    protocol: int
    agent: str
    pid: int
    pid1: bool
    max_payload: int
    stdin_window: int
    max_sessions: int
    uptime_ms: Optional[int] = None
    features: list[str] = field(default_factory=list)
    #: Extension sessions: the default of EXEC's replay_bytes.
    replay_bytes: Optional[int] = None
    #: Extension sessions: whether sessions get cgroups.
    cgroups: Optional[bool] = None
    #: Extension clock: the guest's CLOCK_REALTIME when READY was built.
    realtime_ns: Optional[int] = None
    #: Extension clock: the restore counter.
    restores: Optional[int] = None
    #: Extension clock: whether CLOCK_SET and ENTROPY are served.
    clock_set: Optional[bool] = None
    #: Extension (boot): the root and shared folders the init path mounted.
    mounts: "list[MountStatus]" = field(default_factory=list)


@_schema(
    K("source", STR, req=True),
    K("path", STR, req=True),
    K("fstype", STR, req=True),
    K("ro", BOOL),
    K("error", STR),
    K("errno", I32),
)
@dataclass
class MountStatus(Record):
    """One entry of READY's ``mounts``: ``error`` (and ``errno``) set when that mount was not done."""

    source: str
    path: str
    fstype: str
    ro: bool = False
    error: Optional[str] = None
    errno: Optional[int] = None


@_schema(kind=Kind.PING)
@dataclass
class Ping(RawMessage):
    """PING: any id; the PONG echoes id and payload (at most 4096 bytes)."""

    data: Buffer = b""


@_schema(kind=Kind.PONG)
@dataclass
class Pong(RawMessage):
    """PONG: the PING's id and payload."""

    data: Buffer = b""


@_schema(K("grace_ms", U32), kind=Kind.SHUTDOWN)
@dataclass
class Shutdown(MapMessage):
    """SHUTDOWN: SIGTERM every session, SIGKILL after ``grace_ms``, then SHUTDOWN_DONE."""

    grace_ms: int = 1000


@_schema(kind=Kind.SHUTDOWN_DONE)
@dataclass
class ShutdownDone(EmptyMessage):
    """SHUTDOWN_DONE: every session has had its EXITED."""


@_schema(K("kind", STR, req=True), K("message", STR, req=True), K("frame_kind", U8), kind=Kind.ERROR)
@dataclass
class Error(MapMessage):
    """ERROR: the agent refused a frame (its id is the frame's, or 0)."""

    kind: str
    message: str
    frame_kind: Optional[int] = None


@_schema(K("resource", STR, req=True), K("soft", U64, req=True), K("hard", U64, req=True))
@dataclass
class Rlimit(Record):
    """One item of EXEC's ``rlimits``. 2**64 - 1 is RLIM_INFINITY."""

    resource: str
    soft: int
    hard: int


@_schema(
    K("cmd", STR, req=True),
    K("args", STRS),
    K("env", STRS),
    K("clear_env", BOOL),
    K("cwd", STR),
    K("user", STR),
    K("tty", BOOL),
    K("rows", U16),
    K("cols", U16),
    K("rlimits", _List(_Rec(lambda: Rlimit))),
    K("stdin", BOOL),
    K("output_window", U32),
    K("linger_ms", U32),
    K("no_new_privs", BOOL),
    K("tag", STR),
    K("replay_bytes", U32),
    K("timeout_ms", U32, ext=True),
    K("kill_grace_ms", U32, ext=True),
    K("detach", BOOL, ext=True),
    K("memory_max", U64),
    K("pids_max", U32),
    K("cpu_max", STR),
    kind=Kind.EXEC,
)
@dataclass
class Exec(MapMessage):
    """EXEC: start ``cmd`` as a new session under the frame's id (not 0)."""

    cmd: str
    args: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    clear_env: bool = False
    cwd: Optional[str] = None
    user: Optional[str] = None
    tty: bool = False
    rows: int = 24
    cols: int = 80
    rlimits: list[Rlimit] = field(default_factory=list)
    stdin: bool = True
    output_window: int = 0
    linger_ms: int = 100
    no_new_privs: bool = False
    #: Extension sessions keys (sent only when READY lists ``sessions``).
    tag: Optional[str] = None
    replay_bytes: Optional[int] = None
    detach: bool = False
    timeout_ms: int = 0
    kill_grace_ms: int = 1000
    memory_max: Optional[int] = None
    pids_max: Optional[int] = None
    cpu_max: Optional[str] = None


@_schema(K("pid", U32, req=True), K("session", U64), kind=Kind.STARTED)
@dataclass
class Started(MapMessage):
    """STARTED: the process runs; ``pid`` in the guest (``session``: extension sessions)."""

    pid: int
    session: Optional[int] = None


@_schema(
    K("kind", STR, req=True),
    K("message", STR, req=True),
    K("errno", I32),
    K("stage", STR),
    kind=Kind.EXEC_FAILED,
)
@dataclass
class ExecFailed(MapMessage):
    """EXEC_FAILED: the program never ran; the id is free again (not for ``duplicate_id``)."""

    kind: str
    message: str
    errno: Optional[int] = None
    stage: Optional[str] = None


@_schema(kind=Kind.STDIN)
@dataclass
class Stdin(RawMessage):
    """STDIN: bytes for the child's stdin, within READY's ``stdin_window``."""

    data: Buffer = b""


@_schema(kind=Kind.STDIN_CLOSE)
@dataclass
class StdinClose(EmptyMessage):
    """STDIN_CLOSE: close the child's stdin once the queued bytes are written."""


@_schema(K("bytes", U32, req=True), kind=Kind.STDIN_ACK)
@dataclass
class StdinAck(MapMessage):
    """STDIN_ACK: that many STDIN bytes were written (or discarded): window returned."""

    bytes: int


@_schema(K("rows", U16, req=True), K("cols", U16, req=True), kind=Kind.RESIZE)
@dataclass
class Resize(MapMessage):
    """RESIZE: set a tty session's terminal size."""

    rows: int
    cols: int


@_schema(K("signal", I32, req=True), K("group", BOOL), K("tree", BOOL, ext=True), kind=Kind.SIGNAL)
@dataclass
class Signal(MapMessage):
    """SIGNAL: a Linux signal to the session's process group (``group``) or its process."""

    signal: int
    group: bool = True
    #: Extension sessions: every process of the session's cgroup.
    tree: bool = False


@_schema(K("bytes", U32, req=True), kind=Kind.OUTPUT_ACK)
@dataclass
class OutputAck(MapMessage):
    """OUTPUT_ACK: the host consumed that many STDOUT+STDERR bytes."""

    bytes: int


@_schema(kind=Kind.STDOUT)
@dataclass
class Stdout(RawMessage):
    """STDOUT: the child's output (a tty session's terminal output)."""

    data: Buffer = b""


@_schema(kind=Kind.STDERR)
@dataclass
class Stderr(RawMessage):
    """STDERR: the child's error output (none for a tty session)."""

    data: Buffer = b""


@_schema(
    K("code", I32),
    K("signal", I32),
    K("core_dumped", BOOL),
    K("status", I32, req=True),
    K("output_dropped", U64),
    K("timed_out", BOOL, ext=True),
    K("oom_killed", BOOL, ext=True),
    kind=Kind.EXITED,
)
@dataclass
class Exited(MapMessage):
    """EXITED: the session's last frame: ``code`` or ``signal``, and the shell's ``status``."""

    status: int
    code: Optional[int] = None
    signal: Optional[int] = None
    core_dumped: bool = False
    output_dropped: Optional[int] = None
    #: Extension sessions: the deadline ended it.
    timed_out: bool = False
    #: Extension sessions: the OOM killer killed a process of the session.
    oom_killed: bool = False


# === extension fs (0x40-0x4B) =================================================


@_schema(
    K("type", STR, req=True),
    K("size", U64, req=True),
    K("mode", U32, req=True),
    K("uid", U32, req=True),
    K("gid", U32, req=True),
    K("mtime_ns", I64, req=True),
    K("atime_ns", I64, req=True),
    K("ctime_ns", I64, req=True),
    K("nlink", U64, req=True),
    K("ino", U64, req=True),
    K("target", STR),
)
@dataclass
class FsStat(Record):
    """A stat record: ``type`` is file, dir, symlink, fifo, socket, char or block."""

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


@_schema(K("name", STR, req=True), K("name_bin", BIN), K("type", STR, req=True), K("stat", _Rec(lambda: FsStat)))
@dataclass
class FsEntry(Record):
    """A directory entry of FS_ENTRIES (``name_bin``: the exact bytes of a non-UTF-8 name)."""

    name: str
    type: str
    name_bin: Optional[bytes] = None
    stat: Optional[FsStat] = None


@_schema(K("type", STR, req=True), K("path", STR, req=True), K("dir", BOOL), K("cookie", U32))
@dataclass
class FsEvent(Record):
    """A change of FS_EVENTS: created, modified, removed, moved_from, moved_to or attrib."""

    type: str
    path: str
    dir: bool = False
    cookie: Optional[int] = None


@_schema(
    K("op", STR, req=True),
    K("path", STR, req=True),
    K("user", STR),
    K("window", U32, ext=True),
    K("offset", U64, ext=True),
    K("length", U64),
    K("mode", U32),
    K("create", BOOL, ext=True),
    K("exclusive", BOOL, ext=True),
    K("append", BOOL, ext=True),
    K("atomic", BOOL, ext=True),
    K("parents", BOOL, ext=True),
    K("recursive", BOOL, ext=True),
    K("to", STR),
    K("replace", BOOL, ext=True),
    K("target", STR),
    K("uid", U32),
    K("gid", U32),
    K("atime_ns", I64),
    K("mtime_ns", I64),
    K("follow", BOOL, ext=True),
    K("stat", BOOL, ext=True),
    K("owners", BOOL, ext=True),
    kind=Kind.FS_REQUEST,
)
@dataclass
class FsRequest(MapMessage):
    """FS_REQUEST: open file operation ``op`` on ``path`` under the frame's id."""

    op: str
    path: str
    user: Optional[str] = None
    window: int = 1_048_576
    offset: int = 0
    #: None: to the end.
    length: Optional[int] = None
    #: None: the operation's default (write 0o644, mkdir 0o755); chmod requires it.
    mode: Optional[int] = None
    create: bool = True
    exclusive: bool = False
    append: bool = False
    atomic: bool = False
    parents: bool = False
    recursive: bool = False
    to: Optional[str] = None
    replace: bool = True
    target: Optional[str] = None
    uid: Optional[int] = None
    gid: Optional[int] = None
    atime_ns: Optional[int] = None
    mtime_ns: Optional[int] = None
    follow: bool = True
    stat: bool = False
    owners: bool = False


@_schema(K("stat", _Rec(lambda: FsStat)), kind=Kind.FS_OPENED)
@dataclass
class FsOpened(MapMessage):
    """FS_OPENED: the file is open, the archive started or the watches set."""

    stat: Optional[FsStat] = None


@_schema(kind=Kind.FS_DATA)
@dataclass
class FsData(RawMessage):
    """FS_DATA: file or archive bytes (at most 64 KiB, never empty), within the request's window."""

    data: Buffer = b""


@_schema(K("bytes", U32, req=True), kind=Kind.FS_DATA_ACK)
@dataclass
class FsDataAck(MapMessage):
    """FS_DATA_ACK: returns window of FS_DATA, FS_ENTRIES and FS_EVENTS payload bytes."""

    bytes: int


@_schema(kind=Kind.FS_WRITE)
@dataclass
class FsWrite(RawMessage):
    """FS_WRITE: file or archive bytes, within READY's stdin_window."""

    data: Buffer = b""


@_schema(K("bytes", U32, req=True), kind=Kind.FS_WRITE_ACK)
@dataclass
class FsWriteAck(MapMessage):
    """FS_WRITE_ACK: that many FS_WRITE bytes reached the worker."""

    bytes: int


@_schema(kind=Kind.FS_END)
@dataclass
class FsEnd(EmptyMessage):
    """FS_END: the host's data is complete."""


@_schema(K("entries", _List(_Rec(lambda: FsEntry)), req=True), kind=Kind.FS_ENTRIES)
@dataclass
class FsEntries(MapMessage):
    """FS_ENTRIES: a batch of a directory's entries."""

    entries: list[FsEntry]


@_schema(K("events", _List(_Rec(lambda: FsEvent)), req=True), K("overflow", BOOL, ext=True), kind=Kind.FS_EVENTS)
@dataclass
class FsEvents(MapMessage):
    """FS_EVENTS: changes under a watched path (``overflow``: events were lost, rescan)."""

    events: list[FsEvent]
    overflow: bool = False


@_schema(K("bytes", U64), K("entries", U64), K("stat", _Rec(lambda: FsStat)), K("path", STR), kind=Kind.FS_DONE)
@dataclass
class FsDone(MapMessage):
    """FS_DONE: the operation succeeded (final frame)."""

    bytes: Optional[int] = None
    entries: Optional[int] = None
    stat: Optional[FsStat] = None
    path: Optional[str] = None


@_schema(K("kind", STR, req=True), K("message", STR, req=True), K("errno", I32), K("path", STR), kind=Kind.FS_ERROR)
@dataclass
class FsError(MapMessage):
    """FS_ERROR: the operation failed (final frame)."""

    kind: str
    message: str
    errno: Optional[int] = None
    path: Optional[str] = None


@_schema(kind=Kind.FS_CANCEL)
@dataclass
class FsCancel(EmptyMessage):
    """FS_CANCEL: end the operation now."""


# === extension net (0x50-0x5A) ================================================


@_schema(
    K("host", STR),
    K("port", U16),
    K("path", STR),
    K("user", STR),
    K("timeout_ms", U32, ext=True),
    K("window", U32, ext=True),
    kind=Kind.NET_CONNECT,
)
@dataclass
class NetConnect(MapMessage):
    """NET_CONNECT: connect to TCP ``host``:``port`` or the Unix socket ``path`` in the guest."""

    host: Optional[str] = None
    port: Optional[int] = None
    path: Optional[str] = None
    user: Optional[str] = None
    timeout_ms: int = 10_000
    window: int = 1_048_576


@_schema(K("peer", STR, req=True), K("local", STR, req=True), kind=Kind.NET_CONNECTED)
@dataclass
class NetConnected(MapMessage):
    """NET_CONNECTED: the connection is up."""

    peer: str
    local: str


@_schema(K("kind", STR, req=True), K("message", STR, req=True), K("errno", I32), kind=Kind.NET_FAILED)
@dataclass
class NetFailed(MapMessage):
    """NET_FAILED: the connect failed (final frame)."""

    kind: str
    message: str
    errno: Optional[int] = None


@_schema(kind=Kind.NET_SEND)
@dataclass
class NetSend(RawMessage):
    """NET_SEND: bytes for the guest socket, within READY's stdin_window."""

    data: Buffer = b""


@_schema(K("bytes", U32, req=True), kind=Kind.NET_SEND_ACK)
@dataclass
class NetSendAck(MapMessage):
    """NET_SEND_ACK: the socket took that many bytes."""

    bytes: int


@_schema(kind=Kind.NET_RECV)
@dataclass
class NetRecv(RawMessage):
    """NET_RECV: bytes the guest side sent, within the connect's window."""

    data: Buffer = b""


@_schema(K("bytes", U32, req=True), kind=Kind.NET_RECV_ACK)
@dataclass
class NetRecvAck(MapMessage):
    """NET_RECV_ACK: returns NET_RECV window."""

    bytes: int


@_schema(kind=Kind.NET_SHUTDOWN)
@dataclass
class NetShutdown(EmptyMessage):
    """NET_SHUTDOWN: the host's end of file."""


@_schema(kind=Kind.NET_EOF)
@dataclass
class NetEof(EmptyMessage):
    """NET_EOF: the guest's end of file."""


@_schema(K("reset", BOOL), kind=Kind.NET_CLOSE)
@dataclass
class NetClose(MapMessage):
    """NET_CLOSE: end the connection now (``reset``: with a TCP RST)."""

    reset: bool = False


@_schema(K("error", STR), K("message", STR), K("errno", I32), kind=Kind.NET_CLOSED)
@dataclass
class NetClosed(MapMessage):
    """NET_CLOSED: the connection's last frame; ``error`` when it broke."""

    error: Optional[str] = None
    message: Optional[str] = None
    errno: Optional[int] = None


# === extension sessions (0x60-0x66) ===========================================


@_schema(
    K("session", U64, req=True),
    K("tag", STR),
    K("pid", U32, req=True),
    K("cmd", STR, req=True),
    K("args", STRS, req=True),
    K("user", STR),
    K("tty", BOOL, req=True),
    K("state", STR, req=True),
    K("attached", BOOL, req=True),
    K("id", U32),
    K("started_ms", U64, req=True),
    K("stdout_bytes", U64, req=True),
    K("stderr_bytes", U64, req=True),
    K("exit", _Rec(lambda: Exited)),
)
@dataclass
class SessionInfo(Record):
    """An entry of SESSIONS."""

    session: int
    pid: int
    cmd: str
    args: list[str]
    tty: bool
    state: str
    attached: bool
    started_ms: int
    stdout_bytes: int
    stderr_bytes: int
    tag: Optional[str] = None
    user: Optional[str] = None
    id: Optional[int] = None
    exit: Optional[Exited] = None


@_schema(K("all", BOOL), kind=Kind.LIST)
@dataclass
class ListSessions(MapMessage):
    """LIST: list the agent's sessions (``all``: also ended ones already seen)."""

    all: bool = False


@_schema(K("sessions", _List(_Rec(lambda: SessionInfo)), req=True), K("more", BOOL, req=True), kind=Kind.SESSIONS)
@dataclass
class Sessions(MapMessage):
    """SESSIONS: a batch of LIST's answer; the last has ``more`` false."""

    sessions: list[SessionInfo]
    more: bool


@_schema(
    K("session", U64),
    K("tag", STR),
    K("stdout_from", U64),
    K("stderr_from", U64),
    K("tail", U64),
    K("output_window", U32),
    kind=Kind.ATTACH,
)
@dataclass
class Attach(MapMessage):
    """ATTACH: take a session over (by ``session`` number or ``tag``) under the frame's id."""

    session: Optional[int] = None
    tag: Optional[str] = None
    stdout_from: Optional[int] = None
    stderr_from: Optional[int] = None
    tail: Optional[int] = None
    output_window: int = 0


@_schema(
    K("session", U64, req=True),
    K("pid", U32, req=True),
    K("tty", BOOL, req=True),
    K("stdout_from", U64, req=True),
    K("stderr_from", U64, req=True),
    K("stdout_lost", U64, req=True),
    K("stderr_lost", U64, req=True),
    K("stdin", BOOL, req=True),
    kind=Kind.ATTACHED,
)
@dataclass
class Attached(MapMessage):
    """ATTACHED: the session is this connection's; replay follows."""

    session: int
    pid: int
    tty: bool
    stdout_from: int
    stderr_from: int
    stdout_lost: int
    stderr_lost: int
    stdin: bool


@_schema(K("kind", STR, req=True), K("message", STR, req=True), kind=Kind.ATTACH_FAILED)
@dataclass
class AttachFailed(MapMessage):
    """ATTACH_FAILED: not_found, ambiguous, duplicate_id or invalid_request (final frame)."""

    kind: str
    message: str


@_schema(kind=Kind.DETACH)
@dataclass
class Detach(EmptyMessage):
    """DETACH: the session goes on without this connection."""


@_schema(K("session", U64, req=True), K("reason", STR, req=True), kind=Kind.DETACHED)
@dataclass
class Detached(MapMessage):
    """DETACHED: the id's last frame (``reason``: detach or attached_elsewhere)."""

    session: int
    reason: str


# === extension clock (0x70-0x75) ==============================================


@_schema(kind=Kind.CLOCK_GET)
@dataclass
class ClockGet(EmptyMessage):
    """CLOCK_GET: ask for the guest's clocks."""


@_schema(
    K("realtime_ns", I64, req=True),
    K("boottime_ns", U64, req=True),
    K("restores", U32, req=True),
    kind=Kind.CLOCK,
)
@dataclass
class Clock(MapMessage):
    """CLOCK: the guest's CLOCK_REALTIME and CLOCK_BOOTTIME, and the restore counter."""

    realtime_ns: int
    boottime_ns: int
    restores: int


@_schema(K("realtime_ns", I64, req=True), kind=Kind.CLOCK_SET)
@dataclass
class ClockSet(MapMessage):
    """CLOCK_SET: step the guest's clock."""

    realtime_ns: int


@_schema(K("old_ns", I64, req=True), K("new_ns", I64, req=True), kind=Kind.CLOCK_SET_DONE)
@dataclass
class ClockSetDone(MapMessage):
    """CLOCK_SET_DONE: the clock just before and just after the step."""

    old_ns: int
    new_ns: int


@_schema(kind=Kind.ENTROPY)
@dataclass
class Entropy(RawMessage):
    """ENTROPY: 1 to 4096 bytes for the guest's entropy pool."""

    data: Buffer = b""


@_schema(K("bytes", U32, req=True), kind=Kind.ENTROPY_DONE)
@dataclass
class EntropyDone(MapMessage):
    """ENTROPY_DONE: that many bytes were added and credited."""

    bytes: int


def _check_registry() -> None:
    missing = [KINDS[k].kind.name for k in KINDS if k not in MESSAGE_CLASSES]
    if missing:  # pragma: no cover - a programming error caught at import
        raise AssertionError(f"kinds without a message class: {missing}")


_check_registry()
