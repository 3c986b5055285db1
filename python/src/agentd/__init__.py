"""agentd: the Python SDK of agentd, the guest agent of a microVM (protocol v1).

Run programs in a guest over one byte stream, shaped like :mod:`subprocess`::

    import agentd

    with agentd.Client.spawn("target/release/agentd") as client:
        out = client.run(["uname", "-a"], check=True, timeout=10)
        print(out.stdout.decode())

- :class:`Client` (sync, threads) and :class:`agentd.aio.AsyncClient` (asyncio)
  have the same operations: ``run``, ``popen``, ``ping``, ``shutdown``.
- Extensions, where READY lists them: ``client.fs`` (:mod:`agentd.fs`: files,
  trees, watches), ``client.connect_tcp``/``client.net`` (:mod:`agentd.net`:
  guest sockets, port forwarding), ``client.sessions()``/``client.attach()``,
  ``client.clock()``/``client.sync_clock()``.
- :mod:`agentd.transport` opens the byte stream: a spawned ``agentd --stdio``,
  a Unix socket, a device or FIFO pair, hybrid vsock, AF_VSOCK.
- :mod:`agentd.messages` and :mod:`agentd.codec` are the protocol itself:
  typed messages of every kind and the frame decoder, usable on their own.
"""

from ._core import DEVNULL, PIPE, STDOUT
from ._options import DEFAULT_OUTPUT_WINDOW, CompletedProcess, OutputChunk
from .client import Client, OutputStream, Process, StdinStream
from ._ext import ClockReading, ClockSet, DirEntry, FileStat, WatchEvent
from .errors import (
    AgentdError,
    AttachFailed,
    FsBadUser,
    FsCancelled,
    FsDuplicateId,
    FsError,
    FsExists,
    FsInvalidRequest,
    FsIsADirectory,
    FsNoSpace,
    FsNotADirectory,
    FsNotEmpty,
    FsNotFound,
    FsOther,
    FsPermissionDenied,
    FsReadOnly,
    FsResource,
    NetBadUser,
    NetBrokenPipe,
    NetError,
    NetInvalidRequest,
    NetNotFound,
    NetPermissionDenied,
    NetRefused,
    NetReset,
    NetResource,
    NetTimedOut,
    NetUnreachable,
    NotPermitted,
    SessionDetached,
    Unsupported,
    CalledProcessError,
    ConnectError,
    EncodeError,
    ExecFailed,
    FeatureNotServed,
    HandshakeError,
    ProtocolError,
    ProtocolVersionError,
    SessionEnded,
    TimeoutExpired,
    TransportClosed,
)
from .protocol import RLIM_INFINITY, ErrorKind, ExecFailedKind, Feature, Kind
from . import fs, net  # noqa: E402  (client.fs, client.net)

__version__ = "0.1.0"

__all__ = [
    "fs",
    "net",
    "Client",
    "Process",
    "StdinStream",
    "OutputStream",
    "CompletedProcess",
    "OutputChunk",
    "PIPE",
    "DEVNULL",
    "STDOUT",
    "DEFAULT_OUTPUT_WINDOW",
    "RLIM_INFINITY",
    "Kind",
    "Feature",
    "ErrorKind",
    "ExecFailedKind",
    "AgentdError",
    "ConnectError",
    "HandshakeError",
    "TransportClosed",
    "ProtocolError",
    "ProtocolVersionError",
    "EncodeError",
    "ExecFailed",
    "SessionEnded",
    "FeatureNotServed",
    "TimeoutExpired",
    "CalledProcessError",
    "FileStat",
    "DirEntry",
    "WatchEvent",
    "ClockReading",
    "ClockSet",
    "AttachFailed",
    "SessionDetached",
    "NotPermitted",
    "Unsupported",
    "FsError",
    "FsNotFound",
    "FsPermissionDenied",
    "FsExists",
    "FsNotADirectory",
    "FsIsADirectory",
    "FsNotEmpty",
    "FsNoSpace",
    "FsReadOnly",
    "FsInvalidRequest",
    "FsBadUser",
    "FsResource",
    "FsCancelled",
    "FsDuplicateId",
    "FsOther",
    "NetError",
    "NetRefused",
    "NetUnreachable",
    "NetTimedOut",
    "NetNotFound",
    "NetPermissionDenied",
    "NetReset",
    "NetBrokenPipe",
    "NetInvalidRequest",
    "NetBadUser",
    "NetResource",
    "__version__",
]
