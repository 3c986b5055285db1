"""The exceptions of the SDK.

Every exception derives from :class:`AgentdError`. The ones that mirror the
protocol carry its fields: :class:`ProtocolError` the ERROR ``kind``,
``message`` and ``frame_kind``; :class:`ExecFailed` the EXEC_FAILED ``kind``,
``errno``, ``stage`` and ``message``. Messages are one line and say what to do.
:class:`TimeoutExpired` and :class:`CalledProcessError` are also the
standard library's ``subprocess`` exceptions, so code written for
``subprocess.run`` catches them unchanged.
"""

from __future__ import annotations

import subprocess
from typing import Optional, Sequence, Union

from .protocol import ErrorKind, ExecFailedKind, Kind

__all__ = [
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
]


def _kind_name(kind: Optional[int]) -> str:
    if kind is None:
        return "a frame"
    try:
        return Kind(kind).name
    except ValueError:
        return f"kind 0x{kind:02x}"


class AgentdError(Exception):
    """Base class of every error the SDK raises."""


class ConnectError(AgentdError, OSError):
    """The transport to the agent could not be set up (spawn, socket, port, vsock)."""


class HandshakeError(ConnectError):
    """The hybrid vsock ``CONNECT <port>`` handshake was not answered with ``OK``.

    ``answer`` holds what came back (empty for an end of file).
    """

    def __init__(self, path: str, port: int, answer: bytes, eof: bool) -> None:
        self.path = path
        self.port = port
        self.answer = answer
        self.eof = eof
        if eof and not answer:
            what = "closed the connection without answering"
        elif eof:
            what = f"answered {answer!r} and closed the connection"
        else:
            what = f"answered {answer!r}"
        super().__init__(
            f"hybrid vsock handshake on {path} failed: CONNECT {port} {what} instead of 'OK ...'; "
            f"check that the VM is running and that agentd listens on vsock port {port}"
        )


class TransportClosed(AgentdError):
    """The connection to the agent ended (end of file or an I/O error).

    Every waiter (exec, output readers, stdin writers, ping, shutdown) wakes
    with this error. A closed client cannot be reused: connect again.
    """

    def __init__(self, reason: str = "end of file on the transport") -> None:
        self.reason = reason
        super().__init__(
            f"the connection to the agent is closed ({reason}); "
            "the agent exited or the VM stopped: connect a new Client"
        )


_ERROR_HINTS = {
    ErrorKind.MALFORMED_FRAME: "a frame's length was below 5: check the encoder",
    ErrorKind.FRAME_TOO_LARGE: "keep payloads at or below 1 MiB",
    ErrorKind.UNKNOWN_KIND: "send an extension's kinds only when READY lists its feature",
    ErrorKind.WRONG_DIRECTION: "that kind is sent by the agent, never by a host",
    ErrorKind.BAD_PAYLOAD: "fix the payload (a MessagePack map with the documented keys and types)",
    ErrorKind.UNKNOWN_SESSION: "the session has already ended (or never existed)",
    ErrorKind.NOT_A_TTY: "resize only sessions started with tty=True",
    ErrorKind.INVALID_SIGNAL: "use a signal number Linux has (see `kill -l`)",
    ErrorKind.WINDOW_EXCEEDED: "wait for STDIN_ACK before sending more than READY's stdin_window",
    ErrorKind.STDIN_CLOSED: "stdin was closed already; start a new session to send more",
    ErrorKind.UNSUPPORTED: "this guest cannot do it",
    ErrorKind.NOT_PERMITTED: "the agent does not allow it here",
}


class ProtocolError(AgentdError):
    """A protocol error: an ERROR frame from the agent, or a frame from the agent that did not decode.

    ``kind`` is the ERROR kind string (``bad_payload``, ``not_a_tty``, ... or
    one this SDK does not know); ``remote`` is true for an ERROR the agent
    sent and false for a frame this SDK's decoder refused (which the host
    skips without answering). ``frame_kind`` is the kind byte of the frame
    the error is about and ``session_id`` its id, when known.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        frame_kind: Optional[int] = None,
        session_id: Optional[int] = None,
        remote: bool = True,
    ) -> None:
        self.kind = kind
        self.message = message
        self.frame_kind = frame_kind
        self.session_id = session_id
        self.remote = remote
        where = _kind_name(frame_kind)
        if session_id:
            where += f" of id {session_id}"
        hint = _ERROR_HINTS.get(kind, "see the message")
        if remote:
            text = f"agent answered {where} with ERROR {kind}: {message}; {hint}"
        else:
            text = f"cannot decode {where} ({kind}): {message}; the frame was skipped"
        super().__init__(text)


class ProtocolVersionError(ProtocolError):
    """READY announced a protocol version this SDK does not speak."""

    def __init__(self, version: object) -> None:
        super().__init__(
            "bad_payload",
            f"READY announced protocol {version!r}; this SDK speaks protocol 1: use an agentd of protocol 1",
            frame_kind=int(Kind.READY),
            remote=False,
        )


class EncodeError(AgentdError, ValueError):
    """A message could not be encoded: a value out of its type's range, or a frame over the limit."""


_EXEC_HINTS = {
    ExecFailedKind.NOT_FOUND: "check the program name, or give its absolute path",
    ExecFailedKind.PERMISSION_DENIED: "check the file's execute permission for that user",
    ExecFailedKind.BAD_CWD: "give a cwd that exists in the guest and is a directory",
    ExecFailedKind.BAD_USER: "give a user that exists in the guest (name, uid, name:group or uid:gid)",
    ExecFailedKind.INVALID_REQUEST: (
        "fix the request (empty command, NUL byte, unknown rlimit, env entry without '=')"
    ),
    ExecFailedKind.DUPLICATE_ID: "the session id is in use by another session; retry",
    ExecFailedKind.RESOURCE: "the guest is out of processes, memory or descriptors, or at max_sessions",
    ExecFailedKind.OTHER: "see the message (an agent that is shutting down refuses new sessions)",
}


class ExecFailed(AgentdError):
    """EXEC_FAILED: the program never ran.

    ``kind`` is the EXEC_FAILED kind (``not_found``, ``permission_denied``,
    ``bad_cwd``, ``bad_user``, ``invalid_request``, ``duplicate_id``,
    ``resource``, ``other`` or a kind this SDK does not know), ``errno``
    and ``stage`` the failed step when the agent names one.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        errno: Optional[int] = None,
        stage: Optional[str] = None,
        cmd: Union[str, Sequence[str], None] = None,
    ) -> None:
        self.kind = kind
        self.message = message
        self.errno = errno
        self.stage = stage
        self.cmd = cmd
        detail = kind
        if stage:
            detail += f" at {stage}"
        if errno is not None:
            detail += f", errno {errno}"
        prog = cmd[0] if isinstance(cmd, (list, tuple)) and cmd else cmd
        head = f"cannot run {prog!r}" if prog else "cannot run the program"
        hint = _EXEC_HINTS.get(kind, "see the message")
        super().__init__(f"{head}: {message} ({detail}); {hint}")


class SessionEnded(AgentdError, BrokenPipeError):
    """The session has ended (EXITED came): nothing more can be sent to it."""

    def __init__(self, session_id: int, what: str = "write to stdin") -> None:
        self.session_id = session_id
        super().__init__(f"cannot {what}: session {session_id} has exited")


class FeatureNotServed(AgentdError):
    """The agent's READY does not list the extension an operation needs."""

    def __init__(self, feature: str, features: Sequence[str]) -> None:
        self.feature = feature
        super().__init__(
            f"the agent does not serve the {feature!r} extension (READY features: {list(features)}); "
            "use an agentd that serves it"
        )


def _fmt_cmd(cmd: object) -> str:
    if isinstance(cmd, (list, tuple)):
        return " ".join(str(c) for c in cmd)
    return str(cmd)


class TimeoutExpired(AgentdError, subprocess.TimeoutExpired):
    """``run(..., timeout=...)`` ran out of time; the session's process group got SIGKILL.

    ``output``/``stdout`` and ``stderr`` hold what was captured before the
    timeout, as with :class:`subprocess.TimeoutExpired`.
    """

    def __init__(
        self,
        cmd: object,
        timeout: float,
        output: Union[bytes, str, None] = None,
        stderr: Union[bytes, str, None] = None,
    ) -> None:
        subprocess.TimeoutExpired.__init__(self, cmd, timeout, output, stderr)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return (
            f"command {_fmt_cmd(self.cmd)!r} timed out after {self.timeout} seconds "
            "and its process group was killed; raise the timeout or make it finish sooner"
        )


class CalledProcessError(AgentdError, subprocess.CalledProcessError):
    """``run(..., check=True)`` saw a non-zero exit status.

    ``returncode`` follows :mod:`subprocess` (negative for a signal), and
    ``signal`` and ``status`` (the shell's view: code, or 128 + signal) come from EXITED.
    """

    def __init__(
        self,
        returncode: int,
        cmd: object,
        output: Union[bytes, str, None] = None,
        stderr: Union[bytes, str, None] = None,
        *,
        signal: Optional[int] = None,
        status: Optional[int] = None,
    ) -> None:
        subprocess.CalledProcessError.__init__(self, returncode, cmd, output, stderr)  # type: ignore[arg-type]
        self.signal = signal
        self.status = status if status is not None else returncode

    def __str__(self) -> str:
        if self.signal is not None:
            return f"command {_fmt_cmd(self.cmd)!r} was killed by signal {self.signal}"
        return f"command {_fmt_cmd(self.cmd)!r} exited with status {self.returncode}"


# --- extensions -------------------------------------------------------------------

import errno as _errno  # noqa: E402


class FsError(AgentdError, OSError):
    """FS_ERROR: a file operation in the guest failed (an :class:`OSError` with ``errno`` and ``filename``).

    ``kind`` is the wire kind (``not_found``, ``permission_denied``, ``exists``,
    ...; a kind this SDK does not know stays a plain :class:`FsError`),
    ``message`` the agent's text, ``errno`` the failed call's errno (or the
    kind's usual one when the agent names none), ``path`` (also
    ``filename``) the path the failing call was about, ``op`` the operation.
    The kinds that have a builtin twin are also that builtin:
    ``not_found`` is a :class:`FileNotFoundError`, ``permission_denied`` a
    :class:`PermissionError`, ``exists`` a :class:`FileExistsError`,
    ``not_a_directory`` a :class:`NotADirectoryError`, ``is_a_directory`` an
    :class:`IsADirectoryError`.
    """

    default_errno: Optional[int] = None

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        errno: Optional[int] = None,
        path: Optional[str] = None,
        op: Optional[str] = None,
    ) -> None:
        self.kind = kind
        self.message = message
        self.path = path
        self.op = op
        code = errno if errno is not None else self.default_errno
        super().__init__(code, message, path)

    def __str__(self) -> str:
        where = f" {self.path!r}" if self.path else ""
        num = f" (errno {self.errno})" if self.errno is not None else ""
        what = f"{self.op}{where}" if self.op else f"file operation{where}"
        return f"guest {what} failed: {self.kind}: {self.message}{num}"


class FsNotFound(FsError, FileNotFoundError):
    """FS_ERROR ``not_found`` (ENOENT)."""

    default_errno = _errno.ENOENT


class FsPermissionDenied(FsError, PermissionError):
    """FS_ERROR ``permission_denied`` (EACCES, EPERM)."""

    default_errno = _errno.EACCES


class FsExists(FsError, FileExistsError):
    """FS_ERROR ``exists`` (EEXIST)."""

    default_errno = _errno.EEXIST


class FsNotADirectory(FsError, NotADirectoryError):
    """FS_ERROR ``not_a_directory`` (ENOTDIR)."""

    default_errno = _errno.ENOTDIR


class FsIsADirectory(FsError, IsADirectoryError):
    """FS_ERROR ``is_a_directory`` (EISDIR)."""

    default_errno = _errno.EISDIR


class FsNotEmpty(FsError):
    """FS_ERROR ``not_empty`` (ENOTEMPTY): use ``rmtree`` for a whole tree."""

    default_errno = _errno.ENOTEMPTY


class FsNoSpace(FsError):
    """FS_ERROR ``no_space`` (ENOSPC, EDQUOT)."""

    default_errno = _errno.ENOSPC


class FsReadOnly(FsError):
    """FS_ERROR ``read_only`` (EROFS)."""

    default_errno = _errno.EROFS


class FsInvalidRequest(FsError):
    """FS_ERROR ``invalid_request``: a key out of range, an unsafe tar entry, EINVAL, ENAMETOOLONG."""

    default_errno = _errno.EINVAL


class FsBadUser(FsError):
    """FS_ERROR ``bad_user``: the ``user`` does not exist in the guest."""


class FsResource(FsError):
    """FS_ERROR ``resource``: no process, fd or memory for the worker, or too many operations at once."""

    default_errno = _errno.EAGAIN


class FsCancelled(FsError):
    """FS_ERROR ``cancelled``: the operation was cancelled (FS_CANCEL)."""

    default_errno = _errno.ECANCELED


class FsDuplicateId(FsError):
    """FS_ERROR ``duplicate_id``: the id was live (never sent by this SDK, which picks free ids)."""


class FsOther(FsError):
    """FS_ERROR ``other``: ELOOP, EXDEV, EIO, a worker that died, ..."""


_FS_CLASSES = {
    "not_found": FsNotFound,
    "permission_denied": FsPermissionDenied,
    "exists": FsExists,
    "not_a_directory": FsNotADirectory,
    "is_a_directory": FsIsADirectory,
    "not_empty": FsNotEmpty,
    "no_space": FsNoSpace,
    "read_only": FsReadOnly,
    "invalid_request": FsInvalidRequest,
    "bad_user": FsBadUser,
    "resource": FsResource,
    "cancelled": FsCancelled,
    "duplicate_id": FsDuplicateId,
    "other": FsOther,
}


def fs_error(
    kind: str, message: str, *, errno: Optional[int] = None, path: Optional[str] = None, op: Optional[str] = None
) -> FsError:
    """The exception for an FS_ERROR of ``kind``."""
    cls = _FS_CLASSES.get(kind, FsError)
    return cls(kind, message, errno=errno, path=path, op=op)


class NetError(AgentdError, OSError):
    """NET_FAILED or a NET_CLOSED with ``error``: a guest connection failed or broke.

    ``kind`` is the wire kind; ``errno`` the failed call's (or the kind's usual
    one). ``refused`` is also a :class:`ConnectionRefusedError`,
    ``timed_out`` a :class:`TimeoutError`, ``not_found`` a
    :class:`FileNotFoundError`, ``permission_denied`` a
    :class:`PermissionError`, ``reset`` a :class:`ConnectionResetError`,
    ``broken_pipe`` a :class:`BrokenPipeError`.
    """

    default_errno: Optional[int] = None

    def __init__(self, kind: str, message: str, *, errno: Optional[int] = None, target: str = "") -> None:
        self.kind = kind
        self.message = message
        self.target = target
        code = errno if errno is not None else self.default_errno
        super().__init__(code, message)

    def __str__(self) -> str:
        num = f" (errno {self.errno})" if self.errno is not None else ""
        to = f" to {self.target}" if self.target else ""
        return f"guest connection{to} failed: {self.kind}: {self.message}{num}"


class NetRefused(NetError, ConnectionRefusedError):
    """NET_FAILED ``refused`` (ECONNREFUSED): nothing listens there in the guest."""

    default_errno = _errno.ECONNREFUSED


class NetUnreachable(NetError):
    """NET_FAILED ``unreachable`` (ENETUNREACH, EHOSTUNREACH)."""

    default_errno = _errno.ENETUNREACH


class NetTimedOut(NetError, TimeoutError):
    """NET_FAILED ``timed_out``: the connect took longer than ``timeout``."""

    default_errno = _errno.ETIMEDOUT


class NetNotFound(NetError, FileNotFoundError):
    """NET_FAILED ``not_found``: no such socket path, or a name that does not resolve."""

    default_errno = _errno.ENOENT


class NetPermissionDenied(NetError, PermissionError):
    """NET_FAILED ``permission_denied``."""

    default_errno = _errno.EACCES


class NetReset(NetError, ConnectionResetError):
    """NET_CLOSED ``reset``: the guest side reset the connection."""

    default_errno = _errno.ECONNRESET


class NetBrokenPipe(NetError, BrokenPipeError):
    """NET_CLOSED ``broken_pipe``/EPIPE: the guest side is gone."""

    default_errno = _errno.EPIPE


class NetInvalidRequest(NetError):
    """NET_FAILED ``invalid_request`` (port 0, neither or both of host/port and path)."""

    default_errno = _errno.EINVAL


class NetBadUser(NetError):
    """NET_FAILED ``bad_user``."""


class NetResource(NetError):
    """NET_FAILED ``resource``."""

    default_errno = _errno.EMFILE


_NET_CLASSES = {
    "refused": NetRefused,
    "unreachable": NetUnreachable,
    "timed_out": NetTimedOut,
    "not_found": NetNotFound,
    "permission_denied": NetPermissionDenied,
    "reset": NetReset,
    "broken_pipe": NetBrokenPipe,
    "invalid_request": NetInvalidRequest,
    "bad_user": NetBadUser,
    "resource": NetResource,
}


def net_error(kind: str, message: str, *, errno: Optional[int] = None, target: str = "") -> NetError:
    """The exception for a NET_FAILED (or NET_CLOSED ``error``) of ``kind``."""
    if kind not in _NET_CLASSES and errno == _errno.EPIPE:
        kind_cls: type = NetBrokenPipe
    else:
        kind_cls = _NET_CLASSES.get(kind, NetError)
    e: NetError = kind_cls(kind, message, errno=errno, target=target)
    return e


class AttachFailed(AgentdError):
    """ATTACH_FAILED: ``kind`` ``not_found``, ``ambiguous`` (the tag names several live sessions), ... ."""

    def __init__(self, kind: str, message: str, *, target: str = "") -> None:
        self.kind = kind
        self.message = message
        self.target = target
        hint = {
            "not_found": "list them with client.sessions(all=True)",
            "ambiguous": "attach by session number instead of tag",
        }.get(kind, "see the message")
        super().__init__(f"cannot attach {target or 'the session'}: {kind}: {message}; {hint}")


class SessionDetached(AgentdError):
    """The session was detached from this connection (DETACHED): it goes on in the guest without us."""

    def __init__(self, session_id: int, number: Optional[int], reason: str) -> None:
        self.session_id = session_id
        self.number = number
        self.reason = reason
        super().__init__(
            f"session {number if number is not None else '?'} (id {session_id}) was detached ({reason}); "
            "attach it again with client.attach() to follow it"
        )


class NotPermitted(ProtocolError, PermissionError):
    """ERROR ``not_permitted``: the agent does not serve this here (CLOCK_SET, ENTROPY when not PID 1).

    An agent outside a VM refuses to change its machine's clock unless it
    was started with ``--allow-clock``.
    """


class Unsupported(ProtocolError):
    """ERROR ``unsupported``: this guest cannot do what was asked (e.g. SIGNAL ``tree`` without cgroups)."""


def remote_error(err: ProtocolError) -> ProtocolError:
    """``err`` as its typed subclass where one exists (not_permitted, unsupported)."""
    if err.kind == ErrorKind.NOT_PERMITTED and not isinstance(err, NotPermitted):
        return NotPermitted(err.kind, err.message, frame_kind=err.frame_kind, session_id=err.session_id,
                            remote=err.remote)
    if err.kind == ErrorKind.UNSUPPORTED and not isinstance(err, Unsupported):
        return Unsupported(err.kind, err.message, frame_kind=err.frame_kind, session_id=err.session_id,
                           remote=err.remote)
    return err
