"""The synchronous client: :class:`Client`, :class:`Process` and their streams.

One reader thread per client reads the transport into the frame decoder and
routes frames to sessions; writes are made by the calling thread when the
transport is free, and by a writer thread for what the reader queues (it
never blocks on a write, so a slow agent and a slow host cannot deadlock).
Sessions may be used from many threads at once.

Memory is bounded by windows: each session's output window (default
4 MiB) bounds what waits in Python, so a consumer that does not read makes
the remote process block in ``write()``; stdin never exceeds READY's
``stdin_window`` unacknowledged.
"""

from __future__ import annotations

import io
import os
import select
import signal as _signal
import socket
import threading
import time
import weakref
from collections import deque
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    Callable,
    Deque,
    Generator,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
    overload,
)

from . import messages as m
from . import transport as _t
from . import _ext
from ._core import DEVNULL, PIPE, STDOUT, AttachState, Core, Communicator, Pending, SessionState, Waiters, try_pending
from ._options import (
    DEFAULT_OUTPUT_WINDOW,
    Args,
    CompletedProcess,
    Env,
    OutputChunk,
    Rlimits,
    build_exec,
    decode_text,
    encode_text,
    returncode_of,
)
from .codec import FrameDecoder
from .errors import CalledProcessError, FeatureNotServed, TimeoutExpired, TransportClosed
from .protocol import ENTROPY_MAX, Kind

if TYPE_CHECKING:
    from .fs import FileSystem
    from .net import Address, Connection, Forwarder, Net

__all__ = ["Client", "Process", "StdinStream", "OutputStream", "PIPE", "DEVNULL", "STDOUT"]

T = TypeVar("T")
StrPath = Union[str, "os.PathLike[str]"]
_Sink = Union[int, None, IO[bytes]]


class _Timeout(Exception):
    """A deadline passed (mapped to the API's own timeout exception)."""


class _CondWaiters(Waiters):
    __slots__ = ("cond",)

    def __init__(self, lock: threading.Lock) -> None:
        super().__init__()
        self.cond = threading.Condition(lock)

    def wake(self) -> None:
        self.gen += 1
        self.cond.notify_all()


def _deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + timeout


def _sink(mode: _Sink, name: str) -> Tuple[int, Any]:
    """(stream mode for the session, file-like sink or None)."""
    if mode is None or mode == PIPE:
        return PIPE, None
    if mode == DEVNULL:
        return DEVNULL, None
    if mode == STDOUT:
        if name != "stderr":
            raise ValueError("STDOUT is only valid for stderr")
        return STDOUT, None
    if hasattr(mode, "write"):
        return PIPE, mode
    raise ValueError(f"{name} must be PIPE, DEVNULL{', STDOUT' if name == 'stderr' else ''} or a binary file")


class _ConnectUnix:
    """``Client.connect_unix(path)`` opens a client over a Unix socket (QEMU's ``-chardev socket,...,server=on``);
    ``client.connect_unix(path)`` on a client connects to the guest Unix socket ``path`` (extension
    ``net``: :meth:`agentd.net.Net.connect_unix`, a socket-like :class:`~agentd.net.Connection`)."""

    @overload
    def __get__(self, obj: None, owner: "Type[Client]") -> "Callable[..., Client]": ...

    @overload
    def __get__(self, obj: "Client", owner: Optional[type] = None) -> "Callable[..., Connection]": ...

    def __get__(self, obj: Optional["Client"], owner: Optional[type] = None) -> Any:
        if obj is None:
            assert owner is not None
            return owner._open_unix  # type: ignore[attr-defined]
        return obj.net.connect_unix


class Client:
    """A connection to one agent (protocol v1).

    Open one with :meth:`spawn` (a local ``agentd --stdio``), :meth:`connect_unix`,
    :meth:`open_port`, :meth:`connect_hybrid_vsock`, :meth:`connect_vsock`, or
    from an open :class:`~agentd.transport.Transport`. The constructor waits
    for READY (``ready_timeout``) and checks its protocol is 1.

    ``output_window`` is the default window of sessions (0: unlimited, output
    then waits in Python until read). ``on_ready`` is called (in the reader
    thread) for every READY after the first, e.g. when a host reconnects to
    a device port. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        transport: _t.Transport,
        *,
        ready_timeout: Optional[float] = 30.0,
        output_window: int = DEFAULT_OUTPUT_WINDOW,
        on_ready: Optional[Callable[[m.Ready], None]] = None,
    ) -> None:
        self._transport = transport
        self._lock = threading.Lock()
        self._core = Core(lambda: _CondWaiters(self._lock))
        self._decoder = FrameDecoder()
        self.output_window = output_window
        self._flushing = False
        self._closing = False
        self._writer_cond = threading.Condition(self._lock)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._deferred: Deque[Callable[[], None]] = deque()
        self._reader = threading.Thread(target=self._read_loop, name="agentd-reader", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name="agentd-writer", daemon=True)
        self._reader.start()
        self._writer.start()
        try:
            self._ready = self._wait(self._core.waiters, self._core.try_ready, _deadline(ready_timeout))
        except _Timeout:
            self.close()
            raise TimeoutError(
                f"no READY from the agent on {transport.description} within {ready_timeout} s; "
                "is it running (a booting VM may need a longer ready_timeout)?"
            ) from None
        except BaseException:
            self.close()
            raise
        if on_ready is not None:
            with self._lock:
                self._core.on_ready.append(on_ready)

    # --- opening ---------------------------------------------------------------

    @classmethod
    def spawn(
        cls,
        path: StrPath = "agentd",
        args: Sequence[str] = (),
        *,
        env: Optional[Any] = None,
        stderr: Union[None, int, IO[Any]] = None,
        **kwargs: Any,
    ) -> "Client":
        """Start ``path --stdio ARGS`` locally and connect to it (no VM needed)."""
        return cls(_t.spawn_agent(path, args, env=env, stderr=stderr), **kwargs)

    @classmethod
    def spawn_command(cls, argv: Sequence[StrPath], **kwargs: Any) -> "Client":
        """Start any command that speaks the protocol on stdin/stdout, e.g. ``["ssh", "box", "agentd", "--stdio"]``."""
        return cls(_t.spawn_command(argv), **kwargs)

    @classmethod
    def _open_unix(cls, path: StrPath, *, timeout: Optional[float] = 10.0, **kwargs: Any) -> "Client":
        return cls(_t.connect_unix(path, timeout=timeout), **kwargs)

    connect_unix = _ConnectUnix()

    @classmethod
    def open_port(cls, path: StrPath, *, timeout: Optional[float] = 10.0, **kwargs: Any) -> "Client":
        """Open a device (raw mode), a Unix socket, or the FIFO pair ``PATH.in``/``PATH.out``."""
        return cls(_t.open_port(path, timeout=timeout), **kwargs)

    @classmethod
    def connect_hybrid_vsock(
        cls, uds_path: StrPath, port: int, *, timeout: Optional[float] = 10.0, **kwargs: Any
    ) -> "Client":
        """Connect through a hybrid vsock socket: ``CONNECT <port>``, then the protocol."""
        return cls(_t.connect_hybrid_vsock(uds_path, port, timeout=timeout), **kwargs)

    @classmethod
    def connect_vsock(cls, cid: int, port: int, *, timeout: Optional[float] = 10.0, **kwargs: Any) -> "Client":
        """Connect with ``AF_VSOCK`` to the guest ``cid`` on ``port``."""
        return cls(_t.connect_vsock(cid, port, timeout=timeout), **kwargs)

    @classmethod
    def from_socket(cls, sock: socket.socket, **kwargs: Any) -> "Client":
        """Use a connected stream socket (the client owns it from now on)."""
        return cls(_t.from_socket(sock), **kwargs)

    # --- the connection --------------------------------------------------------

    @property
    def ready(self) -> m.Ready:
        """The latest READY."""
        with self._lock:
            return self._core.ready or self._ready

    @property
    def features(self) -> frozenset:  # type: ignore[type-arg]
        """The extensions the agent serves (READY ``features``)."""
        return self._core.features

    def has_feature(self, name: str) -> bool:
        """Whether READY lists extension ``name`` (``fs``, ``net``, ``sessions``, ``clock``)."""
        return name in self._core.features

    def require_feature(self, name: str) -> None:
        """Raise :class:`~agentd.FeatureNotServed` unless READY lists ``name``.

        The extension APIs (``client.fs``, ``client.connect_tcp``,
        ``client.sessions``, ``client.sync_clock``) start with this check.
        """
        if name not in self._core.features:
            raise FeatureNotServed(name, sorted(self._core.features))

    @property
    def transport(self) -> _t.Transport:
        """The transport this client owns."""
        return self._transport

    @property
    def closed(self) -> bool:
        """Whether the connection is closed (by :meth:`close`, or because the transport ended)."""
        return self._core.closed is not None

    def take_errors(self) -> List[Any]:
        """Connection-level ERRORs, frames refused by the decoder, and errors nobody waited for."""
        with self._lock:
            return self._core.take_errors()

    def ping(self, payload: Optional[bytes] = None, *, timeout: Optional[float] = 10.0) -> float:
        """Round-trip time of a PING in seconds (``payload``: at most 4096 bytes echoed)."""
        with self._lock:
            p = self._core.ping(payload)
            t0 = time.perf_counter()
        try:
            self._wait(self._core.waiters, lambda: try_pending(p), _deadline(timeout))
        except _Timeout:
            raise TimeoutError(f"no PONG within {timeout} s; the agent is stuck or the transport stalled") from None
        return time.perf_counter() - t0

    def shutdown(self, grace: float = 1.0, *, timeout: Optional[float] = None) -> None:
        """SHUTDOWN: SIGTERM every session, SIGKILL after ``grace`` seconds, wait for SHUTDOWN_DONE.

        The agent then exits (as PID 1 of a VM: powers off), so the
        connection closes; this client is closed afterwards.
        """
        with self._lock:
            p = self._core.shutdown(max(0, int(grace * 1000)))
        try:
            self._wait(self._core.waiters, lambda: try_pending(p), _deadline(timeout))
        except _Timeout:
            raise TimeoutError(f"no SHUTDOWN_DONE within {timeout} s") from None
        finally:
            self.close()

    def send_frame(self, kind: int, id: int, payload: m.Buffer = b"") -> None:
        """Send one frame as given (low level: extensions, tests). Answers land in :meth:`take_errors`."""
        with self._lock:
            self._core.send_raw(kind, id, payload)
        self._flush_now()

    def send_bytes(self, data: m.Buffer) -> None:
        """Write bytes to the transport as they are (fault injection: malformed or oversized frames)."""
        with self._lock:
            if self._core.closed is not None:
                raise self._core.closed
            self._core.out += data
        self._flush_now()

    def close(self) -> None:
        """Close the transport (an agent in stdio or socket mode then ends every session and exits)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._writer_cond.notify_all()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        me = threading.current_thread()
        for t in (self._reader, self._writer):
            if t is not me and t.is_alive():
                t.join(10)
        with self._lock:
            self._core.close("closed by this host")
        self._transport.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<agentd.Client {self._transport.description}{' closed' if self.closed else ''}>"

    # --- sessions -----------------------------------------------------------------

    def popen(
        self,
        args: Args,
        *,
        stdin: _Sink = PIPE,
        stdout: _Sink = PIPE,
        stderr: _Sink = PIPE,
        shell: bool = False,
        env: Optional[Env] = None,
        clear_env: bool = False,
        cwd: Optional[StrPath] = None,
        user: Union[str, int, None] = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        rlimits: Optional[Rlimits] = None,
        output_window: Optional[int] = None,
        linger_ms: int = 100,
        no_new_privs: bool = False,
        text: bool = False,
        encoding: Optional[str] = None,
        errors: Optional[str] = None,
        start_timeout: Optional[float] = None,
        tag: Optional[str] = None,
        replay_bytes: Optional[int] = None,
        deadline: Optional[float] = None,
        kill_grace: float = 1.0,
        memory_max: Optional[int] = None,
        pids_max: Optional[int] = None,
        cpu_max: Optional[str] = None,
    ) -> "Process":
        """Start a process in a new session and return once it runs (STARTED).

        ``stdin``: PIPE (a writable :attr:`Process.stdin`) or DEVNULL.
        ``stdout``/``stderr``: PIPE (readable streams), DEVNULL (dropped,
        still acknowledged), STDOUT for stderr (merged into stdout). ``env``
        adds to (or replaces in) the agent's base environment unless
        ``clear_env``. ``tty`` runs it on a pseudo-terminal of ``rows`` x
        ``cols`` (no stderr). ``rlimits``: ``{"nofile": 1024, "core": (0, RLIM_INFINITY)}``.
        Raises :class:`~agentd.ExecFailed` if the program could not start.
        With the ``sessions`` extension, ``tag`` names the session for
        :meth:`sessions` and :meth:`attach`, ``replay_bytes`` sets how much
        of each stream the agent keeps for a later attach, ``deadline``
        (seconds, enforced by the agent even when no host is connected)
        ends it with SIGTERM and, ``kill_grace`` later, SIGKILL to its whole
        tree (``exited.timed_out``), and ``memory_max``/``pids_max``/``cpu_max``
        (``"QUOTA PERIOD"`` in µs) limit its cgroup, where the agent has
        cgroups (READY ``cgroups``; otherwise ExecFailed ``invalid_request``,
        stage ``cgroup``).
        """
        if stdin not in (PIPE, DEVNULL, None):
            raise ValueError("stdin must be PIPE or DEVNULL (write to Process.stdin)")
        out_mode, out_sink = _sink(stdout, "stdout")
        err_mode, err_sink = _sink(stderr, "stderr")
        if out_sink is not None or err_sink is not None:
            raise ValueError("popen() streams are PIPE, DEVNULL or STDOUT; run() also takes files")
        if tty:
            err_mode = DEVNULL
        return self._popen(
            args,
            stdin=stdin != DEVNULL,
            out_mode=out_mode,
            err_mode=err_mode,
            shell=shell,
            env=env,
            clear_env=clear_env,
            cwd=cwd,
            user=user,
            tty=tty,
            rows=rows,
            cols=cols,
            rlimits=rlimits,
            output_window=output_window,
            linger_ms=linger_ms,
            no_new_privs=no_new_privs,
            text=text,
            encoding=encoding,
            errors=errors,
            start_at=_deadline(start_timeout),
            tag=tag,
            replay_bytes=replay_bytes,
            deadline=deadline,
            kill_grace=kill_grace,
            memory_max=memory_max,
            pids_max=pids_max,
            cpu_max=cpu_max,
        )

    def _popen(
        self,
        args: Args,
        *,
        stdin: bool,
        out_mode: int,
        err_mode: int,
        text: bool,
        encoding: Optional[str],
        errors: Optional[str],
        start_at: Optional[float],
        output_window: Optional[int],
        **opts: Any,
    ) -> "Process":
        window = self.output_window if output_window is None else output_window
        argv, msg = build_exec(args, stdin=stdin, output_window=window, **opts)
        with self._lock:
            s = SessionState(self._core, msg, argv, stdout=out_mode, stderr=err_mode)
            s.start()
        self._flush_now()
        try:
            self._wait(s.waiters, s.try_started, start_at)
        except _Timeout:
            self._abandon(s)
            raise TimeoutError(f"{argv[0]!r} did not start in time; the session will be killed when it does") from None
        except BaseException:
            self._abandon(s)
            raise
        return Process(self, s, argv, text=text, encoding=encoding, errors=errors)

    def run(
        self,
        args: Args,
        *,
        input: Union[bytes, bytearray, memoryview, str, None] = None,
        stdout: _Sink = PIPE,
        stderr: _Sink = PIPE,
        timeout: Optional[float] = None,
        check: bool = False,
        text: bool = False,
        encoding: Optional[str] = None,
        errors: Optional[str] = None,
        shell: bool = False,
        env: Optional[Env] = None,
        clear_env: bool = False,
        cwd: Optional[StrPath] = None,
        user: Union[str, int, None] = None,
        tty: bool = False,
        rows: int = 24,
        cols: int = 80,
        rlimits: Optional[Rlimits] = None,
        output_window: Optional[int] = None,
        linger_ms: int = 100,
        no_new_privs: bool = False,
        tag: Optional[str] = None,
        deadline: Optional[float] = None,
        kill_grace: float = 1.0,
        memory_max: Optional[int] = None,
        pids_max: Optional[int] = None,
        cpu_max: Optional[str] = None,
    ) -> CompletedProcess:
        """Run a command to completion, like :func:`subprocess.run`; output is captured by default.

        ``input`` is fed to its stdin (then closed; without it stdin is
        /dev/null, or with ``tty`` the terminal at end of file). ``stdout``/``stderr``: PIPE (captured, the default),
        DEVNULL, STDOUT (stderr merged), or a binary file (written as output
        arrives). ``timeout``: seconds, after which the session's process
        group gets SIGKILL and :class:`~agentd.TimeoutExpired` is raised with
        what was captured. ``check``: raise :class:`~agentd.CalledProcessError`
        on a non-zero status. Returns a :class:`~agentd.CompletedProcess`.
        """
        data = encode_text(input, text, encoding, errors)
        out_mode, out_sink = _sink(stdout, "stdout")
        err_mode, err_sink = _sink(stderr, "stderr")
        if tty:
            err_mode, err_sink = DEVNULL, None
            if data is None:
                data = b""  # the terminal is its stdin: end of file right away
        until = _deadline(timeout)
        try:
            proc = self._popen(
                args,
                stdin=data is not None,
                out_mode=out_mode,
                err_mode=err_mode,
                shell=shell,
                env=env,
                clear_env=clear_env,
                cwd=cwd,
                user=user,
                tty=tty,
                rows=rows,
                cols=cols,
                rlimits=rlimits,
                output_window=output_window,
                linger_ms=linger_ms,
                no_new_privs=no_new_privs,
                text=False,
                encoding=None,
                errors=None,
                start_at=until,
                tag=tag,
                deadline=deadline,
                kill_grace=kill_grace,
                memory_max=memory_max,
                pids_max=pids_max,
                cpu_max=cpu_max,
            )
        except TimeoutError:
            assert timeout is not None
            raise TimeoutExpired(args, timeout) from None
        s = proc._s
        comm = Communicator(s, data, (out_sink, err_sink))
        try:
            exited = self._wait(s.waiters, comm.step, until, after=comm.write_sinks)
        except _Timeout:
            assert timeout is not None
            self._kill_and_reap(s, comm)
            out = decode_text(comm.collected(1), text, encoding, errors)
            err = decode_text(comm.collected(2), text, encoding, errors)
            raise TimeoutExpired(proc.args, timeout, out, err) from None
        except BaseException:
            self._abandon(s, kill=True)
            raise
        out = decode_text(comm.collected(1), text, encoding, errors)
        err = decode_text(comm.collected(2), text, encoding, errors)
        result = CompletedProcess(proc.args, exited, out, err, pid=s.pid)
        if check:
            result.check_returncode()
        return result

    def _kill_and_reap(self, s: SessionState, comm: Optional[Communicator], grace: float = 10.0) -> Optional[m.Exited]:
        """SIGKILL the session's process group and wait (bounded) for EXITED, collecting output."""
        with self._lock:
            if s.state == "running":
                s._send_signal(int(_signal.SIGKILL), True)
        self._flush_now()
        try:
            if comm is not None:
                return self._wait(s.waiters, comm.step, _deadline(grace), after=comm.write_sinks)
            return self._wait(s.waiters, s.try_exited, _deadline(grace))
        except (_Timeout, TransportClosed):
            self._abandon(s)
            return None

    def _abandon(self, s: SessionState, kill: bool = False) -> None:
        try:
            with self._lock:
                if kill and s.state == "running":
                    s._send_signal(int(_signal.SIGKILL), True)
                s.abandon()
            self._flush_now()
        except TransportClosed:
            pass

    def _defer(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` under the lock in the reader thread (safe from finalizers: takes no lock here)."""
        self._deferred.append(fn)
        try:
            os.write(self._wake_w, b"d")
        except OSError:
            pass

    # --- extensions ---------------------------------------------------------------

    def _drive(self, op: "Generator[_ext.Step, Any, T]", timeout: Optional[float] = None) -> T:
        """Run an extension operation (see ``agentd._ext``): its steps under the lock, waits in between.

        If it fails, times out or is interrupted, the generator is closed,
        which cancels the stream it owns (FS_CANCEL, NET_CLOSE).
        """
        deadline = _deadline(timeout)
        value: Any = None
        try:
            while True:
                with self._lock:
                    try:
                        w, fn = op.send(value)
                    except StopIteration as stop:
                        result: T = stop.value
                        break
                self._flush_now()
                value = self._wait(w, fn, deadline)
        except BaseException as e:
            try:
                with self._lock:
                    op.close()
                self._flush_now()
            except TransportClosed:
                pass
            if isinstance(e, _Timeout):
                raise TimeoutError(f"the agent did not answer within {timeout} s") from None
            raise
        self._flush_now()
        return result

    def _locked(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` under the lock, then flush what it queued."""
        with self._lock:
            v = fn()
        self._flush_now()
        return v

    @property
    def fs(self) -> "FileSystem":
        """The guest's files (extension ``fs``): see :class:`agentd.fs.FileSystem`."""
        from .fs import FileSystem

        fs = self.__dict__.get("_fs")
        if fs is None:
            fs = self.__dict__["_fs"] = FileSystem(self)
        assert isinstance(fs, FileSystem)
        return fs

    @property
    def net(self) -> "Net":
        """Connections to guest sockets (extension ``net``): see :class:`agentd.net.Net`."""
        from .net import Net

        net = self.__dict__.get("_net")
        if net is None:
            net = self.__dict__["_net"] = Net(self)
        assert isinstance(net, Net)
        return net

    def connect_tcp(self, address: "Address", *, timeout: Optional[float] = 10.0,
                    user: Union[str, int, None] = None, window: Optional[int] = None) -> "Connection":
        """A socket-like connection to guest TCP ``address`` (a port on the guest's 127.0.0.1, or ``(host, port)``).

        See :meth:`agentd.net.Net.connect_tcp`; ``client.connect_unix(path)`` for guest Unix sockets.
        """
        return self.net.connect_tcp(address, timeout=timeout, user=user, window=window)

    def forward(self, local_port: int, remote: "Address", *, local_host: str = "127.0.0.1") -> "Forwarder":
        """Forward ``local_host:local_port`` on this host to a guest port (``kubectl port-forward``); stoppable."""
        return self.net.forward(local_port, remote, local_host=local_host)

    def sessions(self, all: bool = False, *, timeout: Optional[float] = 30.0) -> List[m.SessionInfo]:
        """Every live session of the agent and ended ones no host has seen the end of (``all``: kept ones too).

        Paged LIST: the SESSIONS frames are gathered until ``more`` is false.
        """
        self.require_feature("sessions")
        return self._drive(_ext.list_sessions(self._core, all), timeout)

    def spawn_detached(self, args: Args, *, tag: Optional[str] = None, start_timeout: Optional[float] = 30.0,
                       **kwargs: Any) -> m.Started:
        """Start a session detached from the start (EXEC ``detach``): STARTED is its id's last frame here.

        It runs on without a host; find it with :meth:`sessions` and take it
        over with :meth:`attach` (by ``tag`` or STARTED's ``session``).
        Keyword arguments as :meth:`popen` (``deadline``, ``replay_bytes``,
        ``env``, ``cwd``, ``user``, ...; its stdin is /dev/null unless ``tty``).
        """
        self.require_feature("sessions")
        argv, msg = build_exec(args, stdin=False, output_window=0, tag=tag, detach=True, **kwargs)
        with self._lock:
            s = SessionState(self._core, msg, argv)
            s.start()
        self._flush_now()
        try:
            self._wait(s.waiters, s.try_started, _deadline(start_timeout))
        except _Timeout:
            raise TimeoutError(f"{argv[0]!r} did not start within {start_timeout} s") from None
        assert s.started is not None
        return s.started

    def attach(
        self,
        session: Union[int, str],
        *,
        stdout_from: Optional[int] = None,
        stderr_from: Optional[int] = None,
        tail: Optional[int] = None,
        output_window: Optional[int] = None,
        text: bool = False,
        encoding: Optional[str] = None,
        errors: Optional[str] = None,
        timeout: Optional[float] = 30.0,
    ) -> "Process":
        """Take a session over on this connection: by number (an ``int``) or by tag (a ``str``).

        Output is replayed from ``stdout_from``/``stderr_from`` (byte offsets
        of each stream; default: the oldest byte the agent kept), or the last
        ``tail`` bytes, then it goes on live; the returned :class:`Process`
        is the one :meth:`popen` would have given (``stdin`` when it is
        open, ``wait``, ``send_signal``, ...; ``attached`` holds ATTACHED,
        with ``stdout_lost``/``stderr_lost``). Another connection that had
        it gets DETACHED. Raises :class:`~agentd.AttachFailed`
        (``not_found``, ``ambiguous``, ...).
        """
        self.require_feature("sessions")
        window = self.output_window if output_window is None else output_window
        if isinstance(session, bool) or not isinstance(session, (int, str)):
            raise TypeError("attach() takes a session number (int) or a tag (str)")
        number = session if isinstance(session, int) else None
        tag = session if isinstance(session, str) else None
        msg = m.Attach(session=number, tag=tag, stdout_from=stdout_from, stderr_from=stderr_from, tail=tail,
                       output_window=window)
        msg.encode_payload()
        label = f"session {number}" if number is not None else f"tag {tag!r}"
        with self._lock:
            s = AttachState(self._core, msg, label)
            s.start()
        self._flush_now()
        try:
            self._wait(s.waiters, s.try_started, _deadline(timeout))
        except _Timeout:
            self._abandon(s)
            raise TimeoutError(f"no ATTACHED for {label} within {timeout} s") from None
        except BaseException:
            self._abandon(s)
            raise
        return Process(self, s, [label], text=text, encoding=encoding, errors=errors)

    def clock(self, *, timeout: Optional[float] = 10.0) -> "_ext.ClockReading":
        """The guest's clock now (CLOCK_GET): ``realtime_ns``, ``boottime_ns``, ``restores``."""
        self.require_feature("clock")
        c = self._drive(_ext.clock_request(self._core, m.ClockGet(), m.Clock), timeout)
        assert isinstance(c, m.Clock)
        return _ext.ClockReading(c.realtime_ns, c.boottime_ns, c.restores)

    def sync_clock(self, realtime_ns: Optional[int] = None, *, timeout: Optional[float] = 10.0) -> "_ext.ClockSet":
        """Step the guest's clock to this host's time (or ``realtime_ns``), e.g. after a snapshot restore.

        Served only by an agent that is a VM's init (or runs with
        ``--allow-clock``): otherwise :class:`~agentd.NotPermitted` (a
        :class:`PermissionError`). Returns the clock just before and after.
        """
        self.require_feature("clock")
        import time as _time

        ns = _time.time_ns() if realtime_ns is None else realtime_ns
        d = self._drive(_ext.clock_request(self._core, m.ClockSet(realtime_ns=ns), m.ClockSetDone), timeout)
        assert isinstance(d, m.ClockSetDone)
        return _ext.ClockSet(d.old_ns, d.new_ns)

    def add_entropy(self, data: Optional[bytes] = None, *, timeout: Optional[float] = 10.0) -> int:
        """Add ``data`` (default: 256 bytes of ``os.urandom``) to the guest's entropy pool, credited; the bytes taken.

        Served as :meth:`sync_clock` is (else :class:`~agentd.NotPermitted`); 1 to 4096 bytes.
        """
        self.require_feature("clock")
        payload = os.urandom(256) if data is None else bytes(data)
        if not 1 <= len(payload) <= ENTROPY_MAX:
            raise ValueError(f"entropy is 1 to {ENTROPY_MAX} bytes, not {len(payload)}")
        d = self._drive(_ext.clock_request(self._core, m.Entropy(payload), m.EntropyDone), timeout)
        assert isinstance(d, m.EntropyDone)
        return d.bytes

    # --- I/O ------------------------------------------------------------------------

    def _wait(
        self,
        w: Waiters,
        try_fn: Callable[[], Optional[T]],
        deadline: Optional[float] = None,
        *,
        after: Optional[Callable[[], None]] = None,
    ) -> T:
        """Call ``try_fn`` under the lock until it gives a value; flush and sleep between tries."""
        assert isinstance(w, _CondWaiters)
        lock = self._lock
        while True:
            with lock:
                g0 = w.gen
                v = try_fn()
            if self._core.out:
                self._flush_now()
            if after is not None:
                after()
            if v is not None:
                return v
            with lock:
                if w.gen == g0:
                    if deadline is None:
                        w.cond.wait()
                    else:
                        rem = deadline - time.monotonic()
                        if rem <= 0:
                            raise _Timeout()
                        w.cond.wait(rem)

    def _flush_now(self) -> None:
        """Write what is queued, in this thread, unless another thread is writing it already."""
        with self._lock:
            if self._flushing or not self._core.out:
                return
            self._flushing = True
        self._flush_owned()

    def _flush_owned(self) -> None:
        try:
            while True:
                with self._lock:
                    if not self._core.out or self._core.closed is not None:
                        self._core.out.clear()
                        self._flushing = False
                        return
                    data = self._core.take_out()
                self._write_all(data)
        except BaseException:
            with self._lock:
                self._flushing = False
                self._writer_cond.notify_all()
            raise

    def _write_all(self, data: bytearray) -> None:
        fd = self._transport.write_fd
        mv = memoryview(data)
        poller: Optional[select.poll] = None
        while mv:
            try:
                n = os.write(fd, mv)
            except BlockingIOError:
                if poller is None:
                    poller = select.poll()
                    poller.register(fd, select.POLLOUT)
                    poller.register(self._wake_r, select.POLLIN)
                poller.poll()
                if self._closing:
                    raise TransportClosed("closed by this host") from None
                continue
            except OSError as e:
                reason = f"write error: {e.strerror}"
                with self._lock:
                    self._core.close(reason)
                raise self._core.closed or TransportClosed(reason) from None
            mv = mv[n:]

    def _write_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._closing and (self._flushing or not self._core.out):
                        self._writer_cond.wait()
                    if self._closing:
                        return
                    self._flushing = True
                try:
                    self._flush_owned()
                except TransportClosed:
                    return
        except BaseException:  # pragma: no cover - defensive: never die silently
            import logging

            logging.getLogger("agentd").exception("agentd: writer thread failed")

    def _read_loop(self) -> None:
        fd = self._transport.read_fd
        dec = self._decoder
        core = self._core
        lock = self._lock
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        reason = "end of file on the transport"
        readv = os.readv
        try:
            while not self._closing:
                try:
                    n = readv(fd, [dec.read_buffer()])
                except BlockingIOError:
                    for f, _ in poller.poll():
                        if f == self._wake_r:
                            self._drain_wake()
                    if self._deferred and not self._closing:
                        self._run_deferred()
                    continue
                except OSError as e:
                    reason = f"read error: {e.strerror}"
                    break
                if n == 0:
                    break
                dec.advance(n)
                items = dec.frames()
                if not items:
                    continue
                with lock:
                    core.receive(items)
                    if core.out and not self._flushing:
                        self._writer_cond.notify()
                if self._deferred:
                    self._run_deferred()
            else:
                reason = "closed by this host"
        except BaseException as e:  # pragma: no cover - defensive
            reason = f"reader failed: {e!r}"
            import logging

            logging.getLogger("agentd").exception("agentd: reader thread failed")
        finally:
            with lock:
                core.close(reason)
                self._writer_cond.notify_all()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except OSError:
            pass

    def _run_deferred(self) -> None:
        with self._lock:
            while self._deferred:
                fn = self._deferred.popleft()
                try:
                    fn()
                except Exception:  # noqa: BLE001
                    pass
            if self._core.out and not self._flushing:
                self._writer_cond.notify()


def _finalize_session(client_ref: "weakref.ReferenceType[Client]", s: SessionState) -> None:
    """A Process was garbage-collected while its session lives: close stdin, drop (and ack) its output."""
    client = client_ref()
    if client is None or client.closed:
        return

    def job() -> None:
        if s.state in ("pending", "running"):
            s.discard_output()
            s.close_stdin()

    client._defer(job)


class Process:
    """A session started by :meth:`Client.popen`, shaped like :class:`subprocess.Popen`.

    ``stdin`` (a :class:`StdinStream`, None with DEVNULL), ``stdout`` and
    ``stderr`` (:class:`OutputStream`, None when dropped or merged; text
    wrappers with ``text=True``), ``pid`` (in the guest), ``returncode``
    (None until it exits; minus the signal when killed), :meth:`wait`,
    :meth:`communicate`, :meth:`send_signal`, :meth:`terminate`,
    :meth:`kill`, :meth:`resize`, and :meth:`iter_output` for chunks of
    both streams in arrival order.

    Output is acknowledged as it is read. Like pipes, unread output blocks
    the process once the window is full: read both streams (or use
    :meth:`communicate`), or drop them with DEVNULL. :meth:`wait` never
    deadlocks on unread output: while it waits, output is acknowledged and
    kept for reading afterwards (so a process that writes without end grows
    memory while you wait). Closing a stream (or leaving a ``with`` block)
    drops what it would still receive.
    """

    def __init__(
        self,
        client: Client,
        s: SessionState,
        args: List[str],
        *,
        text: bool = False,
        encoding: Optional[str] = None,
        errors: Optional[str] = None,
    ) -> None:
        self._client = client
        self._s = s
        self.args = args
        self._text = (text, encoding, errors)
        self._comm: Optional[Communicator] = None
        textual = bool(text or encoding or errors)
        self.stdin: Optional[Any] = None
        self.stdout: Optional[Any] = None
        self.stderr: Optional[Any] = None
        if s.has_stdin:
            w = StdinStream(self)
            self.stdin = (
                io.TextIOWrapper(w, encoding=encoding, errors=errors, write_through=True) if textual else w
            )
        if not s.discard[1]:
            r = OutputStream(self, 1)
            self.stdout = io.TextIOWrapper(r, encoding=encoding, errors=errors) if textual else r
        if not s.discard[2] and not s.merge_stderr:
            r = OutputStream(self, 2)
            self.stderr = io.TextIOWrapper(r, encoding=encoding, errors=errors) if textual else r
        weakref.finalize(self, _finalize_session, weakref.ref(client), s)

    @property
    def id(self) -> int:
        """The session id on the connection."""
        return self._s.id

    @property
    def pid(self) -> Optional[int]:
        """The process id in the guest (STARTED's ``pid``)."""
        return self._s.pid

    @property
    def tty(self) -> bool:
        """Whether it runs on a pseudo-terminal."""
        return self._s.tty

    @property
    def session(self) -> Optional[int]:
        """The agent-wide session number (extension ``sessions``: STARTED's or ATTACHED's ``session``)."""
        return self._s.number

    @property
    def attached(self) -> Optional[m.Attached]:
        """ATTACHED, for a process from :meth:`Client.attach` (replay offsets, bytes lost)."""
        return self._s.attached if isinstance(self._s, AttachState) else None

    @property
    def detached(self) -> Optional[m.Detached]:
        """DETACHED, once the session left this connection (:meth:`detach`, or attached elsewhere)."""
        return self._s.detached

    def detach(self, timeout: Optional[float] = 10.0) -> m.Detached:
        """Let the session go on without this connection (DETACH); unread output stays in the agent's replay.

        Raises :class:`~agentd.SessionEnded` if it has exited already.
        """
        s = self._s
        with self._client._lock:
            s.detach()
        self._client._flush_now()
        try:
            return self._client._wait(s.waiters, s.try_detached, _deadline(timeout))
        except _Timeout:
            raise TimeoutError(f"no DETACHED within {timeout} s") from None

    @property
    def exited(self) -> Optional[m.Exited]:
        """The EXITED message, once it came."""
        return self._s.exited

    @property
    def returncode(self) -> Optional[int]:
        """None while running; the exit code, or minus the signal that killed it."""
        e = self._s.exited
        return None if e is None else returncode_of(e)

    @property
    def signal(self) -> Optional[int]:
        """The signal that killed it (None while running or if it exited)."""
        e = self._s.exited
        return None if e is None else e.signal

    @property
    def status(self) -> Optional[int]:
        """The shell's view of the exit: the code, or 128 + the signal."""
        e = self._s.exited
        return None if e is None else e.status

    @property
    def errors(self) -> List[Any]:
        """ERRORs the agent sent about this session that no call was waiting for."""
        return list(self._s.errors)

    def poll(self) -> Optional[int]:
        """The returncode if it has exited, else None (never blocks)."""
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the exit and return the returncode; raises :class:`~agentd.TimeoutExpired` (it keeps running).

        Unread output is acknowledged and kept while waiting, so the wait
        cannot stall on a full output window.
        """
        try:
            e = self._client._wait(self._s.waiters, self._s.try_exited, _deadline(timeout))
        except _Timeout:
            assert timeout is not None
            raise TimeoutExpired(self.args, timeout) from None
        return returncode_of(e)

    def communicate(
        self, input: Union[bytes, str, None] = None, timeout: Optional[float] = None
    ) -> Tuple[Any, Any]:
        """Send ``input`` (then close stdin), read both streams to the end, wait; return ``(stdout, stderr)``.

        On timeout :class:`~agentd.TimeoutExpired` is raised and the process
        keeps running; calling again resumes.
        """
        text, encoding, errors = self._text
        s = self._s
        if self._comm is None:
            data = encode_text(input, text, encoding, errors)
            if data is None and s.has_stdin and not s.stdin_closed:
                with self._client._lock:
                    s.close_stdin()
            self._comm = Communicator(s, data, (None, None))
        comm = self._comm
        try:
            self._client._wait(s.waiters, comm.step, _deadline(timeout))
        except _Timeout:
            assert timeout is not None
            raise TimeoutExpired(self.args, timeout, comm.collected(1), comm.collected(2)) from None
        out = decode_text(comm.collected(1), text, encoding, errors) if self.stdout is not None else None
        err = decode_text(comm.collected(2), text, encoding, errors) if self.stderr is not None else None
        return out, err

    def send_signal(self, sig: int, *, group: bool = True, tree: bool = False) -> None:
        """Send signal ``sig`` to the session's process group (``group=False``: the process alone).

        Waits for the agent to take it; raises :class:`~agentd.ProtocolError`
        ``invalid_signal`` for a number Linux does not have. Nothing happens
        once the process has exited. ``tree=True`` (extension ``sessions``):
        every process of the session's cgroup, also those that left its
        process group; :class:`~agentd.Unsupported` where the agent has no cgroups.
        """
        with self._client._lock:
            p = self._s.signal(int(sig), group, tree)
        if p is not None:
            self._client._wait(self._s.waiters, lambda: try_pending(p))

    def terminate(self) -> None:
        """SIGTERM to the process group."""
        self.send_signal(int(_signal.SIGTERM))

    def kill(self) -> None:
        """SIGKILL to the process group."""
        self.send_signal(int(_signal.SIGKILL))

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal size of a tty session; raises ProtocolError ``not_a_tty`` on a pipe session."""
        with self._client._lock:
            p = self._s.resize(rows, cols)
        if p is not None:
            self._client._wait(self._s.waiters, lambda: try_pending(p))

    def iter_output(self) -> Iterator[OutputChunk]:
        """Chunks of stdout and stderr in arrival order, until the process has exited and all is read."""
        s = self._s
        while True:
            fd, data = self._client._wait(s.waiters, s.try_next)
            if not fd:
                return
            yield OutputChunk(fd, data)

    def __iter__(self) -> Iterator[OutputChunk]:
        return self.iter_output()

    def close(self) -> None:
        """Stop caring: close stdin, drop (and acknowledge) all further output. The process runs on."""
        try:
            with self._client._lock:
                self._s.discard_output()
                self._s.close_stdin()
            self._client._flush_now()
        except TransportClosed:
            pass

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Close stdin and drop unread output; then wait (on an exception: SIGKILL the group first).

        A process from :meth:`Client.attach` is detached instead: the session goes on in the guest
        (it had outlived a host before; an exception in the code that follows it must not kill it).
        """
        if self._s.state not in ("running", "pending"):
            return
        if isinstance(self._s, AttachState) and self._s.state == "running":
            s = self._s

            def detach() -> None:
                s.detach()
                s.discard_output()

            try:
                self._client._locked(detach)
            except TransportClosed:
                pass
            return
        if exc_type is not None:
            self._client._abandon(self._s, kill=True)
            return
        self.close()
        try:
            self.wait()
        except TransportClosed:
            pass

    def __repr__(self) -> str:
        return f"<agentd.Process id={self.id} pid={self.pid} args={self.args!r} returncode={self.returncode}>"


class StdinStream(io.BufferedIOBase):
    """The writable stdin of a :class:`Process`: writes block while READY's stdin window is used up."""

    def __init__(self, proc: Process) -> None:
        super().__init__()
        self._proc = proc

    def __del__(self) -> None:  # no close() from the garbage collector: the Process finalizer handles it
        pass

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        """Send all of ``data`` (waiting for window as needed); returns its length."""
        if self.closed:
            raise ValueError("write to closed stdin")
        mv = memoryview(data).cast("B")
        s = self._proc._s
        client = self._proc._client
        off = 0

        def push() -> Optional[bool]:
            nonlocal off
            off = s.push_stdin(mv, off)
            return True if off >= len(mv) else None

        client._wait(s.waiters, push)
        return len(mv)

    def flush(self) -> None:
        """Queued frames are written as they are queued: nothing to do beyond that."""
        if not self.closed:
            self._proc._client._flush_now()

    def wait_acknowledged(self, timeout: Optional[float] = None) -> None:
        """Wait until the agent has written every byte sent so far to the process (STDIN_ACK)."""
        s = self._proc._s
        try:
            self._proc._client._wait(s.waiters, s.try_drained_stdin, _deadline(timeout))
        except _Timeout:
            raise TimeoutError("stdin was not acknowledged in time: the process does not read it") from None

    def close(self) -> None:
        """STDIN_CLOSE: the process reads end of file once what was sent is written."""
        if self.closed:
            return
        try:
            with self._proc._client._lock:
                self._proc._s.close_stdin()
            self._proc._client._flush_now()
        except TransportClosed:
            pass
        finally:
            super().close()


class OutputStream(io.BufferedIOBase):
    """A readable output stream (stdout or stderr) of a :class:`Process`; reading acknowledges output."""

    def __init__(self, proc: Process, fd: int) -> None:
        super().__init__()
        self._proc = proc
        self._fd = fd

    def __del__(self) -> None:  # no close() from the garbage collector: the Process finalizer handles it
        pass

    def readable(self) -> bool:
        return True

    def _read(self, n: int) -> bytes:
        if self.closed:
            raise ValueError("read from a closed stream")
        s = self._proc._s
        fd = self._fd
        return self._proc._client._wait(s.waiters, lambda: s.try_read(fd, n))

    def read1(self, size: int = -1) -> bytes:
        """What is there (at most ``size`` bytes), waiting only if nothing is; ``b""`` at the end."""
        return self._read(size if size is not None and size >= 0 else -1)

    def read(self, size: Optional[int] = -1) -> bytes:
        """``size`` bytes (fewer only at the end); all of the stream when ``size`` is negative."""
        parts: List[bytes] = []
        if size is None or size < 0:
            while True:
                b = self._read(-1)
                if not b:
                    return b"".join(parts)
                parts.append(b)
        want = size
        while want > 0:
            b = self._read(want)
            if not b:
                break
            parts.append(b)
            want -= len(b)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto(self, b: Any) -> int:
        data = self.read(len(memoryview(b)))
        memoryview(b).cast("B")[: len(data)] = data
        return len(data)

    def readinto1(self, b: Any) -> int:
        data = self.read1(len(memoryview(b)))
        memoryview(b).cast("B")[: len(data)] = data
        return len(data)

    def readline(self, size: Optional[int] = -1) -> bytes:
        """One line, with its newline (the last one may lack it); ``b""`` at the end."""
        if self.closed:
            raise ValueError("read from a closed stream")
        s = self._proc._s
        fd = self._fd
        limit = -1 if size is None or size < 0 else size
        parts: List[bytes] = []
        wait = self._proc._client._wait
        while limit != 0:
            lim = limit
            b = wait(s.waiters, lambda: s.try_line(fd, lim))
            if not b:
                break
            parts.append(b)
            if limit > 0:
                limit -= len(b)
            if b.endswith(b"\n"):
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def iter_chunks(self) -> Iterator[bytes]:
        """The stream's chunks as they arrive, until its end."""
        while True:
            b = self._read(-1)
            if not b:
                return
            yield b

    def close(self) -> None:
        """Drop (and acknowledge) everything this stream would still receive."""
        if self.closed:
            return
        try:
            with self._proc._client._lock:
                self._proc._s.discard_output(self._fd)
            self._proc._client._flush_now()
        except TransportClosed:
            pass
        finally:
            super().close()


_ = (CalledProcessError, Kind, Pending)
