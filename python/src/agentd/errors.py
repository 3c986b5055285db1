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
