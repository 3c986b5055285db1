"""Constants of agentd's wire protocol, version 1 (docs/PROTOCOL.md).

Everything here is a fact of the protocol: frame limits, the kind numbers
with their direction and payload encoding, and the names of features,
ERROR kinds and EXEC_FAILED kinds. Kind strings are plain ``str`` values:
a host must accept kinds it does not know (a later agent may add some), so
the SDK never turns them into a closed enumeration.
"""

from __future__ import annotations

import enum
from typing import Dict, FrozenSet, NamedTuple

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_PAYLOAD",
    "HEADER_SIZE",
    "LEN_SIZE",
    "MAX_FRAME",
    "PING_MAX",
    "ENTROPY_MAX",
    "OUTPUT_FRAME_MAX",
    "STDIN_FRAME_MAX",
    "MAX_DEPTH",
    "RLIM_INFINITY",
    "Kind",
    "Direction",
    "Encoding",
    "KindInfo",
    "KINDS",
    "Feature",
    "ErrorKind",
    "ExecFailedKind",
    "RLIMIT_RESOURCES",
]

#: READY's ``protocol``: the only version this SDK speaks.
PROTOCOL_VERSION = 1
#: The largest payload of a valid frame (1 MiB).
MAX_PAYLOAD = 1_048_576
#: Bytes of ``len`` (u32, big-endian) at the start of every frame.
LEN_SIZE = 4
#: Bytes of ``len`` + ``kind`` + ``id``: the smallest frame.
HEADER_SIZE = 9
#: The largest frame on the wire: 4 + 5 + MAX_PAYLOAD bytes.
MAX_FRAME = HEADER_SIZE + MAX_PAYLOAD
#: The largest PING payload the agent accepts.
PING_MAX = 4096
#: The largest ENTROPY payload (extension clock).
ENTROPY_MAX = 4096
#: The agent's STDOUT/STDERR frames carry at most this much payload.
OUTPUT_FRAME_MAX = 65536
#: This SDK's STDIN frames carry at most this much payload.
STDIN_FRAME_MAX = 65536
#: Containers nest at most this many levels in a map payload (the payload is level 1).
MAX_DEPTH = 32
#: An rlimit ``soft``/``hard`` of 2**64 - 1 is RLIM_INFINITY.
RLIM_INFINITY = 2**64 - 1

#: EXEC's ``rlimits`` resource names.
RLIMIT_RESOURCES: FrozenSet[str] = frozenset(
    "cpu fsize data stack core rss nproc nofile memlock as locks sigpending "
    "msgqueue nice rtprio rttime".split()
)


class Kind(enum.IntEnum):
    """Every message kind of protocol v1, including the extensions' blocks."""

    READY = 0x01
    PING = 0x02
    PONG = 0x03
    SHUTDOWN = 0x04
    SHUTDOWN_DONE = 0x05
    ERROR = 0x06
    EXEC = 0x10
    STARTED = 0x11
    EXEC_FAILED = 0x12
    STDIN = 0x20
    STDIN_CLOSE = 0x21
    STDIN_ACK = 0x22
    RESIZE = 0x23
    SIGNAL = 0x24
    OUTPUT_ACK = 0x25
    STDOUT = 0x30
    STDERR = 0x31
    EXITED = 0x32
    # Extension fs (0x40-0x4F)
    FS_REQUEST = 0x40
    FS_OPENED = 0x41
    FS_DATA = 0x42
    FS_DATA_ACK = 0x43
    FS_WRITE = 0x44
    FS_WRITE_ACK = 0x45
    FS_END = 0x46
    FS_ENTRIES = 0x47
    FS_EVENTS = 0x48
    FS_DONE = 0x49
    FS_ERROR = 0x4A
    FS_CANCEL = 0x4B
    # Extension net (0x50-0x5F)
    NET_CONNECT = 0x50
    NET_CONNECTED = 0x51
    NET_FAILED = 0x52
    NET_SEND = 0x53
    NET_SEND_ACK = 0x54
    NET_RECV = 0x55
    NET_RECV_ACK = 0x56
    NET_SHUTDOWN = 0x57
    NET_EOF = 0x58
    NET_CLOSE = 0x59
    NET_CLOSED = 0x5A
    # Extension sessions (0x60-0x6F)
    LIST = 0x60
    SESSIONS = 0x61
    ATTACH = 0x62
    ATTACHED = 0x63
    ATTACH_FAILED = 0x64
    DETACH = 0x65
    DETACHED = 0x66
    # Extension clock (0x70-0x7F)
    CLOCK_GET = 0x70
    CLOCK = 0x71
    CLOCK_SET = 0x72
    CLOCK_SET_DONE = 0x73
    ENTROPY = 0x74
    ENTROPY_DONE = 0x75


class Direction(enum.Enum):
    """Which peer sends a kind."""

    AGENT_TO_HOST = "agent_to_host"
    HOST_TO_AGENT = "host_to_agent"


class Encoding(enum.Enum):
    """How a kind's payload is encoded."""

    RAW = "raw"
    MAP = "map"
    EMPTY = "empty"


class KindInfo(NamedTuple):
    """The protocol's facts about one kind."""

    kind: Kind
    direction: Direction
    encoding: Encoding
    #: The extension (READY ``features`` name) the kind belongs to; None for the core kinds.
    feature: "str | None"


_A = Direction.AGENT_TO_HOST
_H = Direction.HOST_TO_AGENT
_R, _M, _E = Encoding.RAW, Encoding.MAP, Encoding.EMPTY


def _table() -> Dict[int, KindInfo]:
    rows = [
        (Kind.READY, _A, _M, None),
        (Kind.PING, _H, _R, None),
        (Kind.PONG, _A, _R, None),
        (Kind.SHUTDOWN, _H, _M, None),
        (Kind.SHUTDOWN_DONE, _A, _E, None),
        (Kind.ERROR, _A, _M, None),
        (Kind.EXEC, _H, _M, None),
        (Kind.STARTED, _A, _M, None),
        (Kind.EXEC_FAILED, _A, _M, None),
        (Kind.STDIN, _H, _R, None),
        (Kind.STDIN_CLOSE, _H, _E, None),
        (Kind.STDIN_ACK, _A, _M, None),
        (Kind.RESIZE, _H, _M, None),
        (Kind.SIGNAL, _H, _M, None),
        (Kind.OUTPUT_ACK, _H, _M, None),
        (Kind.STDOUT, _A, _R, None),
        (Kind.STDERR, _A, _R, None),
        (Kind.EXITED, _A, _M, None),
        (Kind.FS_REQUEST, _H, _M, "fs"),
        (Kind.FS_OPENED, _A, _M, "fs"),
        (Kind.FS_DATA, _A, _R, "fs"),
        (Kind.FS_DATA_ACK, _H, _M, "fs"),
        (Kind.FS_WRITE, _H, _R, "fs"),
        (Kind.FS_WRITE_ACK, _A, _M, "fs"),
        (Kind.FS_END, _H, _E, "fs"),
        (Kind.FS_ENTRIES, _A, _M, "fs"),
        (Kind.FS_EVENTS, _A, _M, "fs"),
        (Kind.FS_DONE, _A, _M, "fs"),
        (Kind.FS_ERROR, _A, _M, "fs"),
        (Kind.FS_CANCEL, _H, _E, "fs"),
        (Kind.NET_CONNECT, _H, _M, "net"),
        (Kind.NET_CONNECTED, _A, _M, "net"),
        (Kind.NET_FAILED, _A, _M, "net"),
        (Kind.NET_SEND, _H, _R, "net"),
        (Kind.NET_SEND_ACK, _A, _M, "net"),
        (Kind.NET_RECV, _A, _R, "net"),
        (Kind.NET_RECV_ACK, _H, _M, "net"),
        (Kind.NET_SHUTDOWN, _H, _E, "net"),
        (Kind.NET_EOF, _A, _E, "net"),
        (Kind.NET_CLOSE, _H, _M, "net"),
        (Kind.NET_CLOSED, _A, _M, "net"),
        (Kind.LIST, _H, _M, "sessions"),
        (Kind.SESSIONS, _A, _M, "sessions"),
        (Kind.ATTACH, _H, _M, "sessions"),
        (Kind.ATTACHED, _A, _M, "sessions"),
        (Kind.ATTACH_FAILED, _A, _M, "sessions"),
        (Kind.DETACH, _H, _E, "sessions"),
        (Kind.DETACHED, _A, _M, "sessions"),
        (Kind.CLOCK_GET, _H, _E, "clock"),
        (Kind.CLOCK, _A, _M, "clock"),
        (Kind.CLOCK_SET, _H, _M, "clock"),
        (Kind.CLOCK_SET_DONE, _A, _M, "clock"),
        (Kind.ENTROPY, _H, _R, "clock"),
        (Kind.ENTROPY_DONE, _A, _M, "clock"),
    ]
    return {int(k): KindInfo(k, d, e, f) for k, d, e, f in rows}


#: Every kind this SDK knows, by number.
KINDS: Dict[int, KindInfo] = _table()


class Feature:
    """READY ``features`` names of the extensions (docs/PROTOCOL.md, "Extensions and versions")."""

    FS = "fs"
    NET = "net"
    SESSIONS = "sessions"
    CLOCK = "clock"


class ErrorKind:
    """ERROR ``kind`` strings. A host must accept kinds that are not listed here."""

    MALFORMED_FRAME = "malformed_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    UNKNOWN_KIND = "unknown_kind"
    WRONG_DIRECTION = "wrong_direction"
    BAD_PAYLOAD = "bad_payload"
    UNKNOWN_SESSION = "unknown_session"
    NOT_A_TTY = "not_a_tty"
    INVALID_SIGNAL = "invalid_signal"
    WINDOW_EXCEEDED = "window_exceeded"
    STDIN_CLOSED = "stdin_closed"
    #: Extension frames: the agent cannot do it on this guest.
    UNSUPPORTED = "unsupported"
    #: Extension frames: the agent does not serve it here.
    NOT_PERMITTED = "not_permitted"

    #: The kinds a decoder produces (the others are the agent's session-state errors).
    DECODING: FrozenSet[str] = frozenset(
        {MALFORMED_FRAME, FRAME_TOO_LARGE, UNKNOWN_KIND, WRONG_DIRECTION, BAD_PAYLOAD}
    )


class ExecFailedKind:
    """EXEC_FAILED ``kind`` strings. A host must accept kinds that are not listed here."""

    NOT_FOUND = "not_found"
    PERMISSION_DENIED = "permission_denied"
    BAD_CWD = "bad_cwd"
    BAD_USER = "bad_user"
    INVALID_REQUEST = "invalid_request"
    DUPLICATE_ID = "duplicate_id"
    RESOURCE = "resource"
    OTHER = "other"
