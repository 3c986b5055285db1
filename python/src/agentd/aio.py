"""The asyncio client: :class:`AsyncClient` and :class:`AsyncProcess`, the same operations as the sync API.

The transport's fds are watched with ``loop.add_reader``/``add_writer``
and read straight into the frame decoder; nothing blocks the loop. Every
object belongs to the loop that created the client.

Cancellation never leaves a session stuck: a cancelled :meth:`AsyncClient.run`
kills the session's process group and drops (acknowledging) the rest of its
output; a cancelled :meth:`AsyncClient.popen` kills the process as soon as it
has started; a cancelled :meth:`AsyncProcess.communicate` closes stdin and
drops further output (the process runs on); cancelling a read or a wait
loses nothing.
"""

from __future__ import annotations

import asyncio
import os
import signal as _signal
import socket
import time
import weakref
from typing import (
    IO,
    TYPE_CHECKING,
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
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
from ._core import DEVNULL, PIPE, STDOUT, AttachState, Communicator, Core, SessionState, Waiters, try_pending
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
from .errors import FeatureNotServed, TimeoutExpired, TransportClosed
from .protocol import ENTROPY_MAX

if TYPE_CHECKING:
    from .aio_ext import AsyncConnection, AsyncFileSystem, AsyncForwarder, AsyncNet
    from .net import Address

__all__ = ["AsyncClient", "AsyncProcess", "AsyncStdin", "AsyncOutputStream", "PIPE", "DEVNULL", "STDOUT"]

T = TypeVar("T")
StrPath = Union[str, "os.PathLike[str]"]
_Sink = Union[int, None, IO[bytes]]


class _Timeout(Exception):
    pass


class _FutureWaiters(Waiters):
    __slots__ = ("futs", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.futs: List["asyncio.Future[None]"] = []

    def wake(self) -> None:
        self.gen += 1
        if self.futs:
            futs, self.futs = self.futs, []
            for f in futs:
                if not f.done():
                    f.set_result(None)

    async def wait(self, timeout: Optional[float]) -> None:
        fut: "asyncio.Future[None]" = self.loop.create_future()
        self.futs.append(fut)
        try:
            if timeout is None:
                await fut
            else:
                await asyncio.wait_for(fut, timeout)
        finally:
            if fut in self.futs:
                self.futs.remove(fut)


def _deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + timeout


def _sink(mode: _Sink, name: str) -> Tuple[int, Any]:
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


class _AsyncConnectUnix:
    """``await AsyncClient.connect_unix(path)`` opens a client over a Unix socket; ``await
    client.connect_unix(path)`` on a client connects to the guest Unix socket ``path`` (extension ``net``)."""

    @overload
    def __get__(self, obj: None, owner: "Type[AsyncClient]") -> "Callable[..., Awaitable[AsyncClient]]": ...

    @overload
    def __get__(self, obj: "AsyncClient", owner: Optional[type] = None
                ) -> "Callable[..., Awaitable[AsyncConnection]]": ...

    def __get__(self, obj: Optional["AsyncClient"], owner: Optional[type] = None) -> Any:
        if obj is None:
            assert owner is not None
            return owner._open_unix  # type: ignore[attr-defined]
        return obj.net.connect_unix


class AsyncClient:
    """A connection to one agent, for asyncio. Create it with ``await AsyncClient.spawn(...)`` (or another opener).

    ``async with await AsyncClient.spawn("agentd") as client: ...`` closes it at the end.
    """

    def __init__(
        self,
        transport: _t.Transport,
        *,
        output_window: int = DEFAULT_OUTPUT_WINDOW,
        on_ready: Optional[Callable[[m.Ready], None]] = None,
        loop: Optional[asyncio.AbstractEventLoop] = None,
    ) -> None:
        """Use an open transport; call :meth:`wait_ready` (the openers do) before anything else."""
        self._loop = loop or asyncio.get_running_loop()
        self._transport = transport
        self._core = Core(lambda: _FutureWaiters(self._loop))
        self._decoder = FrameDecoder()
        self.output_window = output_window
        self._wbuf: Optional[memoryview] = None
        self._wdata: Optional[bytearray] = None
        self._writing = False
        self._closed = False
        if on_ready is not None:
            self._core.on_ready.append(on_ready)
        self._loop.add_reader(transport.read_fd, self._on_readable)

    # --- opening ---------------------------------------------------------------

    @classmethod
    async def _open(cls, transport: _t.Transport, ready_timeout: Optional[float], **kwargs: Any) -> "AsyncClient":
        client = cls(transport, **kwargs)
        try:
            await client.wait_ready(ready_timeout)
        except BaseException:
            await client.aclose()
            raise
        return client

    @classmethod
    async def spawn(
        cls,
        path: StrPath = "agentd",
        args: Sequence[str] = (),
        *,
        env: Optional[Any] = None,
        stderr: Union[None, int, IO[Any]] = None,
        ready_timeout: Optional[float] = 30.0,
        **kwargs: Any,
    ) -> "AsyncClient":
        """Start ``path --stdio ARGS`` locally and connect to it."""
        return await cls._open(_t.spawn_agent(path, args, env=env, stderr=stderr), ready_timeout, **kwargs)

    @classmethod
    async def spawn_command(
        cls, argv: Sequence[StrPath], *, ready_timeout: Optional[float] = 30.0, **kwargs: Any
    ) -> "AsyncClient":
        """Start any command that speaks the protocol on stdin/stdout."""
        return await cls._open(_t.spawn_command(argv), ready_timeout, **kwargs)

    @classmethod
    async def _open_unix(
        cls, path: StrPath, *, timeout: Optional[float] = 10.0, ready_timeout: Optional[float] = 30.0, **kwargs: Any
    ) -> "AsyncClient":
        """Connect to a Unix socket (the connect itself is quick and done in a thread)."""
        tr = await asyncio.get_running_loop().run_in_executor(None, lambda: _t.connect_unix(path, timeout=timeout))
        return await cls._open(tr, ready_timeout, **kwargs)

    connect_unix = _AsyncConnectUnix()

    @classmethod
    async def open_port(
        cls, path: StrPath, *, timeout: Optional[float] = 10.0, ready_timeout: Optional[float] = 30.0, **kwargs: Any
    ) -> "AsyncClient":
        """Open a device, a Unix socket or a FIFO pair (see :func:`agentd.transport.open_port`)."""
        tr = await asyncio.get_running_loop().run_in_executor(None, lambda: _t.open_port(path, timeout=timeout))
        return await cls._open(tr, ready_timeout, **kwargs)

    @classmethod
    async def connect_hybrid_vsock(
        cls,
        uds_path: StrPath,
        port: int,
        *,
        timeout: Optional[float] = 10.0,
        ready_timeout: Optional[float] = 30.0,
        **kwargs: Any,
    ) -> "AsyncClient":
        """Connect through a hybrid vsock socket (``CONNECT <port>``, then the protocol)."""
        tr = await asyncio.get_running_loop().run_in_executor(
            None, lambda: _t.connect_hybrid_vsock(uds_path, port, timeout=timeout)
        )
        return await cls._open(tr, ready_timeout, **kwargs)

    @classmethod
    async def connect_vsock(
        cls, cid: int, port: int, *, timeout: Optional[float] = 10.0, ready_timeout: Optional[float] = 30.0,
        **kwargs: Any,
    ) -> "AsyncClient":
        """Connect with ``AF_VSOCK``."""
        tr = await asyncio.get_running_loop().run_in_executor(
            None, lambda: _t.connect_vsock(cid, port, timeout=timeout)
        )
        return await cls._open(tr, ready_timeout, **kwargs)

    @classmethod
    async def from_socket(cls, sock: socket.socket, *, ready_timeout: Optional[float] = 30.0, **kwargs: Any) -> "AsyncClient":
        """Use a connected stream socket (owned from now on)."""
        return await cls._open(_t.from_socket(sock), ready_timeout, **kwargs)

    async def wait_ready(self, timeout: Optional[float] = 30.0) -> m.Ready:
        """Wait for READY (checking protocol 1)."""
        try:
            return await self._wait(self._core.waiters, self._core.try_ready, _deadline(timeout))
        except _Timeout:
            raise TimeoutError(
                f"no READY from the agent on {self._transport.description} within {timeout} s; is it running?"
            ) from None

    # --- the connection --------------------------------------------------------

    @property
    def ready(self) -> m.Ready:
        """The latest READY."""
        r = self._core.ready
        if r is None:
            raise RuntimeError("READY has not come yet: await wait_ready() first")
        return r

    @property
    def features(self) -> frozenset:  # type: ignore[type-arg]
        """The extensions the agent serves."""
        return self._core.features

    def has_feature(self, name: str) -> bool:
        """Whether READY lists extension ``name``."""
        return name in self._core.features

    def require_feature(self, name: str) -> None:
        """Raise :class:`~agentd.FeatureNotServed` unless READY lists ``name``."""
        if name not in self._core.features:
            raise FeatureNotServed(name, sorted(self._core.features))

    @property
    def transport(self) -> _t.Transport:
        """The transport this client owns."""
        return self._transport

    @property
    def closed(self) -> bool:
        """Whether the connection is closed."""
        return self._core.closed is not None

    def take_errors(self) -> List[Any]:
        """Connection-level ERRORs, refused frames, and errors nobody waited for."""
        return self._core.take_errors()

    async def ping(self, payload: Optional[bytes] = None, *, timeout: Optional[float] = 10.0) -> float:
        """Round-trip time of a PING, in seconds."""
        p = self._core.ping(payload)
        t0 = time.perf_counter()
        self._flush()
        try:
            await self._wait(self._core.waiters, lambda: try_pending(p), _deadline(timeout))
        except _Timeout:
            raise TimeoutError(f"no PONG within {timeout} s") from None
        return time.perf_counter() - t0

    async def shutdown(self, grace: float = 1.0, *, timeout: Optional[float] = None) -> None:
        """SHUTDOWN and wait for SHUTDOWN_DONE; the client is closed afterwards."""
        p = self._core.shutdown(max(0, int(grace * 1000)))
        self._flush()
        try:
            await self._wait(self._core.waiters, lambda: try_pending(p), _deadline(timeout))
        except _Timeout:
            raise TimeoutError(f"no SHUTDOWN_DONE within {timeout} s") from None
        finally:
            await self.aclose()

    def send_frame(self, kind: int, id: int, payload: m.Buffer = b"") -> None:
        """Send one frame as given (low level)."""
        self._core.send_raw(kind, id, payload)
        self._flush()

    def send_bytes(self, data: m.Buffer) -> None:
        """Write bytes to the transport as they are (fault injection)."""
        if self._core.closed is not None:
            raise self._core.closed
        self._core.out += data
        self._flush()

    async def aclose(self) -> None:
        """Close the transport (an agent in stdio or socket mode then ends every session and exits)."""
        if self._closed:
            return
        self._closed = True
        self._stop_io()
        self._core.close("closed by this host")
        tr = self._transport
        if tr.process is not None:
            await self._loop.run_in_executor(None, tr.close)
        else:
            tr.close()

    def _stop_io(self) -> None:
        try:
            self._loop.remove_reader(self._transport.read_fd)
        except (ValueError, OSError):
            pass
        if self._writing:
            try:
                self._loop.remove_writer(self._transport.write_fd)
            except (ValueError, OSError):
                pass
            self._writing = False

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<agentd.aio.AsyncClient {self._transport.description}{' closed' if self.closed else ''}>"

    # --- sessions ---------------------------------------------------------------------

    async def popen(
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
        start_timeout: Optional[float] = None,
        tag: Optional[str] = None,
        replay_bytes: Optional[int] = None,
        deadline: Optional[float] = None,
        kill_grace: float = 1.0,
        memory_max: Optional[int] = None,
        pids_max: Optional[int] = None,
        cpu_max: Optional[str] = None,
    ) -> "AsyncProcess":
        """Start a process and return once it runs; the arguments are those of :meth:`agentd.Client.popen`."""
        if stdin not in (PIPE, DEVNULL, None):
            raise ValueError("stdin must be PIPE or DEVNULL (write to AsyncProcess.stdin)")
        out_mode, out_sink = _sink(stdout, "stdout")
        err_mode, err_sink = _sink(stderr, "stderr")
        if out_sink is not None or err_sink is not None:
            raise ValueError("popen() streams are PIPE, DEVNULL or STDOUT; run() also takes files")
        if tty:
            err_mode = DEVNULL
        return await self._popen(
            args, stdin=stdin != DEVNULL, out_mode=out_mode, err_mode=err_mode, start_at=_deadline(start_timeout),
            output_window=output_window, shell=shell, env=env, clear_env=clear_env, cwd=cwd, user=user, tty=tty,
            rows=rows, cols=cols, rlimits=rlimits, linger_ms=linger_ms, no_new_privs=no_new_privs,
            tag=tag, replay_bytes=replay_bytes, deadline=deadline, kill_grace=kill_grace, memory_max=memory_max,
            pids_max=pids_max, cpu_max=cpu_max,
        )

    async def _popen(
        self,
        args: Args,
        *,
        stdin: bool,
        out_mode: int,
        err_mode: int,
        start_at: Optional[float],
        output_window: Optional[int],
        **opts: Any,
    ) -> "AsyncProcess":
        window = self.output_window if output_window is None else output_window
        argv, msg = build_exec(args, stdin=stdin, output_window=window, **opts)
        s = SessionState(self._core, msg, argv, stdout=out_mode, stderr=err_mode)
        s.start()
        self._flush()
        try:
            await self._wait(s.waiters, s.try_started, start_at)
        except _Timeout:
            self._abandon(s)
            raise TimeoutError(f"{argv[0]!r} did not start in time; the session will be killed when it does") from None
        except BaseException:
            self._abandon(s)
            raise
        return AsyncProcess(self, s, argv)

    async def run(
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
        """Run a command to completion; the arguments are those of :meth:`agentd.Client.run`.

        Cancelled, it kills the session's process group and drops the rest of its output.
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
            proc = await self._popen(
                args, stdin=data is not None, out_mode=out_mode, err_mode=err_mode, start_at=until,
                output_window=output_window, shell=shell, env=env, clear_env=clear_env, cwd=cwd, user=user,
                tty=tty, rows=rows, cols=cols, rlimits=rlimits, linger_ms=linger_ms, no_new_privs=no_new_privs,
                tag=tag, deadline=deadline, kill_grace=kill_grace, memory_max=memory_max, pids_max=pids_max,
                cpu_max=cpu_max,
            )
        except TimeoutError:
            assert timeout is not None
            raise TimeoutExpired(args, timeout) from None
        s = proc._s
        comm = Communicator(s, data, (out_sink, err_sink))
        try:
            exited = await self._wait(s.waiters, comm.step, until, after=comm.write_sinks)
        except _Timeout:
            assert timeout is not None
            await self._kill_and_reap(s, comm)
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

    async def _kill_and_reap(self, s: SessionState, comm: Communicator, grace: float = 10.0) -> None:
        if s.state == "running":
            s._send_signal(int(_signal.SIGKILL), True)
            self._flush()
        try:
            await self._wait(s.waiters, comm.step, _deadline(grace), after=comm.write_sinks)
        except (_Timeout, TransportClosed):
            self._abandon(s)
        except BaseException:
            self._abandon(s)
            raise

    def _abandon(self, s: SessionState, kill: bool = False) -> None:
        try:
            if kill and s.state == "running":
                s._send_signal(int(_signal.SIGKILL), True)
            s.abandon()
            self._flush()
        except TransportClosed:
            pass

    # --- extensions -------------------------------------------------------------------

    async def _drive(self, op: "Generator[_ext.Step, Any, T]", timeout: Optional[float] = None) -> T:
        """Run an extension operation (see ``agentd._ext``); cancelled or failed, it cancels its stream."""
        deadline = _deadline(timeout)
        value: Any = None
        try:
            while True:
                try:
                    w, fn = op.send(value)
                except StopIteration as stop:
                    result: T = stop.value
                    break
                self._flush()
                value = await self._wait(w, fn, deadline)
        except BaseException as e:
            try:
                op.close()
                self._flush()
            except TransportClosed:
                pass
            if isinstance(e, _Timeout):
                raise TimeoutError(f"the agent did not answer within {timeout} s") from None
            raise
        self._flush()
        return result

    @property
    def fs(self) -> "AsyncFileSystem":
        """The guest's files (extension ``fs``): see :class:`agentd.aio_ext.AsyncFileSystem`."""
        from .aio_ext import AsyncFileSystem

        fs = self.__dict__.get("_fs")
        if fs is None:
            fs = self.__dict__["_fs"] = AsyncFileSystem(self)
        assert isinstance(fs, AsyncFileSystem)
        return fs

    @property
    def net(self) -> "AsyncNet":
        """Connections to guest sockets (extension ``net``)."""
        from .aio_ext import AsyncNet

        net = self.__dict__.get("_net")
        if net is None:
            net = self.__dict__["_net"] = AsyncNet(self)
        assert isinstance(net, AsyncNet)
        return net

    async def connect_tcp(self, address: "Address", *, timeout: Optional[float] = 10.0,
                          user: Union[str, int, None] = None, window: Optional[int] = None) -> "AsyncConnection":
        """A connection to guest TCP ``address`` (a port, or ``(host, port)``); cancelled, nothing stays open."""
        return await self.net.connect_tcp(address, timeout=timeout, user=user, window=window)

    async def forward(self, local_port: int, remote: "Address", *, local_host: str = "127.0.0.1") -> "AsyncForwarder":
        """Forward ``local_host:local_port`` to a guest port; ``await fw.stop()`` ends it."""
        return await self.net.forward(local_port, remote, local_host=local_host)

    async def sessions(self, all: bool = False, *, timeout: Optional[float] = 30.0) -> List[m.SessionInfo]:
        """The agent's sessions (paged LIST), as :meth:`agentd.Client.sessions`."""
        self.require_feature("sessions")
        return await self._drive(_ext.list_sessions(self._core, all), timeout)

    async def spawn_detached(self, args: Args, *, tag: Optional[str] = None,
                             start_timeout: Optional[float] = 30.0, **kwargs: Any) -> m.Started:
        """Start a session detached from the start, as :meth:`agentd.Client.spawn_detached`."""
        self.require_feature("sessions")
        argv, msg = build_exec(args, stdin=False, output_window=0, tag=tag, detach=True, **kwargs)
        s = SessionState(self._core, msg, argv)
        s.start()
        self._flush()
        try:
            await self._wait(s.waiters, s.try_started, _deadline(start_timeout))
        except _Timeout:
            raise TimeoutError(f"{argv[0]!r} did not start within {start_timeout} s") from None
        assert s.started is not None
        return s.started

    async def attach(self, session: Union[int, str], *, stdout_from: Optional[int] = None,
                     stderr_from: Optional[int] = None, tail: Optional[int] = None,
                     output_window: Optional[int] = None, timeout: Optional[float] = 30.0) -> "AsyncProcess":
        """Take a session over (by number or tag), as :meth:`agentd.Client.attach`."""
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
        s = AttachState(self._core, msg, label)
        s.start()
        self._flush()
        try:
            await self._wait(s.waiters, s.try_started, _deadline(timeout))
        except _Timeout:
            self._abandon(s)
            raise TimeoutError(f"no ATTACHED for {label} within {timeout} s") from None
        except BaseException:
            self._abandon(s)
            raise
        return AsyncProcess(self, s, [label])

    async def clock(self, *, timeout: Optional[float] = 10.0) -> "_ext.ClockReading":
        """The guest's clock now (CLOCK_GET)."""
        self.require_feature("clock")
        c = await self._drive(_ext.clock_request(self._core, m.ClockGet(), m.Clock), timeout)
        assert isinstance(c, m.Clock)
        return _ext.ClockReading(c.realtime_ns, c.boottime_ns, c.restores)

    async def sync_clock(self, realtime_ns: Optional[int] = None, *, timeout: Optional[float] = 10.0
                         ) -> "_ext.ClockSet":
        """Step the guest's clock to this host's time (or ``realtime_ns``); :class:`~agentd.NotPermitted` if refused."""
        self.require_feature("clock")
        ns = time.time_ns() if realtime_ns is None else realtime_ns
        d = await self._drive(_ext.clock_request(self._core, m.ClockSet(realtime_ns=ns), m.ClockSetDone), timeout)
        assert isinstance(d, m.ClockSetDone)
        return _ext.ClockSet(d.old_ns, d.new_ns)

    async def add_entropy(self, data: Optional[bytes] = None, *, timeout: Optional[float] = 10.0) -> int:
        """Add entropy to the guest's pool (as :meth:`agentd.Client.add_entropy`)."""
        self.require_feature("clock")
        payload = os.urandom(256) if data is None else bytes(data)
        if not 1 <= len(payload) <= ENTROPY_MAX:
            raise ValueError(f"entropy is 1 to {ENTROPY_MAX} bytes, not {len(payload)}")
        d = await self._drive(_ext.clock_request(self._core, m.Entropy(payload), m.EntropyDone), timeout)
        assert isinstance(d, m.EntropyDone)
        return d.bytes

    # --- I/O -------------------------------------------------------------------------

    async def _wait(
        self,
        w: Waiters,
        try_fn: Callable[[], Optional[T]],
        deadline: Optional[float] = None,
        *,
        after: Optional[Callable[[], None]] = None,
    ) -> T:
        assert isinstance(w, _FutureWaiters)
        while True:
            g0 = w.gen
            v = try_fn()
            if self._core.out:
                self._flush()
            if after is not None:
                after()
            if v is not None:
                return v
            if w.gen == g0:
                if deadline is None:
                    await w.wait(None)
                else:
                    rem = deadline - time.monotonic()
                    if rem <= 0:
                        raise _Timeout()
                    try:
                        await w.wait(rem)
                    except asyncio.TimeoutError:
                        raise _Timeout() from None

    def _on_readable(self) -> None:
        dec = self._decoder
        fd = self._transport.read_fd
        core = self._core
        for _ in range(64):
            try:
                n = os.readv(fd, [dec.read_buffer()])
            except BlockingIOError:
                break
            except OSError as e:
                self._lost(f"read error: {e.strerror}")
                return
            if n == 0:
                self._lost("end of file on the transport")
                return
            dec.advance(n)
            items = dec.frames()
            if items:
                core.receive(items)
        if core.out:
            self._flush()

    def _lost(self, reason: str) -> None:
        self._stop_io()
        self._core.close(reason)

    def _flush(self) -> None:
        """Write what is queued now, without blocking; the rest goes when the fd is writable."""
        if self._writing or self._core.closed is not None:
            if self._core.closed is not None:
                self._core.out.clear()
            return
        self._write_some()

    def _write_some(self) -> None:
        fd = self._transport.write_fd
        while True:
            if self._wbuf is None or not len(self._wbuf):
                if not self._core.out:
                    self._wbuf = self._wdata = None
                    if self._writing:
                        self._loop.remove_writer(fd)
                        self._writing = False
                    return
                self._wdata = self._core.take_out()
                self._wbuf = memoryview(self._wdata)
            try:
                n = os.write(fd, self._wbuf)
            except BlockingIOError:
                if not self._writing:
                    self._loop.add_writer(fd, self._write_some)
                    self._writing = True
                return
            except OSError as e:
                self._lost(f"write error: {e.strerror}")
                return
            self._wbuf = self._wbuf[n:]


def _finalize_session(client_ref: "weakref.ReferenceType[AsyncClient]", s: SessionState) -> None:
    client = client_ref()
    if client is None or client.closed:
        return

    def job() -> None:
        if s.state in ("pending", "running"):
            try:
                s.discard_output()
                s.close_stdin()
                client._flush()
            except TransportClosed:
                pass

    try:
        client._loop.call_soon_threadsafe(job)
    except RuntimeError:
        pass


class AsyncProcess:
    """A session started by :meth:`AsyncClient.popen` (the asyncio twin of :class:`agentd.Process`)."""

    def __init__(self, client: AsyncClient, s: SessionState, args: List[str]) -> None:
        self._client = client
        self._s = s
        self.args = args
        self._comm: Optional[Communicator] = None
        self.stdin = AsyncStdin(self) if s.has_stdin else None
        self.stdout = AsyncOutputStream(self, 1) if not s.discard[1] else None
        self.stderr = AsyncOutputStream(self, 2) if not (s.discard[2] or s.merge_stderr) else None
        weakref.finalize(self, _finalize_session, weakref.ref(client), s)

    @property
    def id(self) -> int:
        """The session id on the connection."""
        return self._s.id

    @property
    def session(self) -> Optional[int]:
        """The agent-wide session number (extension ``sessions``)."""
        return self._s.number

    @property
    def attached(self) -> Optional[m.Attached]:
        """ATTACHED, for a process from :meth:`AsyncClient.attach`."""
        return self._s.attached if isinstance(self._s, AttachState) else None

    @property
    def detached(self) -> Optional[m.Detached]:
        """DETACHED, once the session left this connection."""
        return self._s.detached

    async def detach(self, timeout: Optional[float] = 10.0) -> m.Detached:
        """DETACH: the session goes on without this connection."""
        s = self._s
        s.detach()
        self._client._flush()
        try:
            return await self._client._wait(s.waiters, s.try_detached, _deadline(timeout))
        except _Timeout:
            raise TimeoutError(f"no DETACHED within {timeout} s") from None

    @property
    def pid(self) -> Optional[int]:
        """The process id in the guest."""
        return self._s.pid

    @property
    def exited(self) -> Optional[m.Exited]:
        """The EXITED message, once it came."""
        return self._s.exited

    @property
    def returncode(self) -> Optional[int]:
        """None while running; the exit code, or minus the signal."""
        e = self._s.exited
        return None if e is None else returncode_of(e)

    @property
    def signal(self) -> Optional[int]:
        """The signal that killed it."""
        e = self._s.exited
        return None if e is None else e.signal

    @property
    def errors(self) -> List[Any]:
        """ERRORs about this session that no call was waiting for."""
        return list(self._s.errors)

    async def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the exit; returns the returncode (cancelling the wait leaves the process alone)."""
        try:
            e = await self._client._wait(self._s.waiters, self._s.try_exited, _deadline(timeout))
        except _Timeout:
            assert timeout is not None
            raise TimeoutExpired(self.args, timeout) from None
        return returncode_of(e)

    async def communicate(self, input: Optional[m.Buffer] = None, timeout: Optional[float] = None) -> Tuple[Any, Any]:
        """Feed ``input``, read both streams to the end, wait; ``(stdout, stderr)``.

        On timeout :class:`~agentd.TimeoutExpired` is raised (call again to
        resume); cancelled, stdin is closed and further output dropped.
        """
        s = self._s
        if self._comm is None:
            if input is None and s.has_stdin and not s.stdin_closed:
                s.close_stdin()
            self._comm = Communicator(s, input, (None, None))
        comm = self._comm
        try:
            await self._client._wait(s.waiters, comm.step, _deadline(timeout))
        except _Timeout:
            assert timeout is not None
            raise TimeoutExpired(self.args, timeout, comm.collected(1), comm.collected(2)) from None
        except asyncio.CancelledError:
            self._drop()
            raise
        out = comm.collected(1) if self.stdout is not None else None
        err = comm.collected(2) if self.stderr is not None else None
        return out, err

    def _drop(self) -> None:
        try:
            self._s.discard_output()
            self._s.close_stdin()
            self._client._flush()
        except TransportClosed:
            pass

    async def send_signal(self, sig: int, *, group: bool = True, tree: bool = False) -> None:
        """Signal the process group (``group=False``: the process; ``tree``: the session's cgroup);
        ProtocolError ``invalid_signal`` if unknown, :class:`~agentd.Unsupported` for ``tree`` without cgroups."""
        p = self._s.signal(int(sig), group, tree)
        if p is not None:
            self._client._flush()
            await self._client._wait(self._s.waiters, lambda: try_pending(p))

    async def terminate(self) -> None:
        """SIGTERM to the process group."""
        await self.send_signal(int(_signal.SIGTERM))

    async def kill(self) -> None:
        """SIGKILL to the process group."""
        await self.send_signal(int(_signal.SIGKILL))

    async def resize(self, rows: int, cols: int) -> None:
        """Set a tty session's terminal size; ProtocolError ``not_a_tty`` on a pipe session."""
        p = self._s.resize(rows, cols)
        if p is not None:
            self._client._flush()
            await self._client._wait(self._s.waiters, lambda: try_pending(p))

    async def iter_output(self) -> AsyncIterator[OutputChunk]:
        """Chunks of both streams in arrival order, until the end."""
        s = self._s
        while True:
            fd, data = await self._client._wait(s.waiters, s.try_next)
            if not fd:
                return
            yield OutputChunk(fd, data)

    def __aiter__(self) -> AsyncIterator[OutputChunk]:
        return self.iter_output()

    def close(self) -> None:
        """Stop caring: close stdin and drop (acknowledging) all further output; the process runs on."""
        self._drop()

    async def __aenter__(self) -> "AsyncProcess":
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Drop unread output and wait; on an exception (or cancellation) SIGKILL the group first.

        A process from :meth:`AsyncClient.attach` is detached instead (it goes on in the guest).
        """
        if self._s.state not in ("running", "pending"):
            return
        if isinstance(self._s, AttachState) and self._s.state == "running":
            try:
                self._s.detach()
                self._s.discard_output()
                self._client._flush()
            except TransportClosed:
                pass
            return
        if exc_type is not None:
            self._client._abandon(self._s, kill=True)
            return
        self._drop()
        try:
            await self.wait()
        except TransportClosed:
            pass

    def __repr__(self) -> str:
        return f"<agentd.aio.AsyncProcess id={self.id} pid={self.pid} args={self.args!r} returncode={self.returncode}>"


class AsyncStdin:
    """The stdin of an :class:`AsyncProcess`: ``await write(data)`` returns once all of it is sent within the window."""

    def __init__(self, proc: AsyncProcess) -> None:
        self._proc = proc
        self._closed = False

    async def write(self, data: m.Buffer) -> int:
        """Send all of ``data``, waiting for window as needed; its length."""
        if self._closed:
            raise ValueError("write to closed stdin")
        mv = memoryview(data).cast("B")
        s = self._proc._s
        off = 0

        def push() -> Optional[bool]:
            nonlocal off
            off = s.push_stdin(mv, off)
            return True if off >= len(mv) else None

        await self._proc._client._wait(s.waiters, push)
        return len(mv)

    async def drain(self) -> None:
        """Wait until every byte sent so far was acknowledged (written to the process)."""
        s = self._proc._s
        await self._proc._client._wait(s.waiters, s.try_drained_stdin)

    def close(self) -> None:
        """STDIN_CLOSE (the process reads end of file once what was sent is written)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._proc._s.close_stdin()
            self._proc._client._flush()
        except TransportClosed:
            pass

    async def aclose(self) -> None:
        """:meth:`close`, as a coroutine."""
        self.close()

    def is_closing(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed


class AsyncOutputStream:
    """A readable output stream of an :class:`AsyncProcess`; reading acknowledges output."""

    def __init__(self, proc: AsyncProcess, fd: int) -> None:
        self._proc = proc
        self._fd = fd

    async def read1(self, n: int = -1) -> bytes:
        """What is there (at most ``n`` bytes), waiting only if nothing is; ``b""`` at the end."""
        s = self._proc._s
        fd = self._fd
        return await self._proc._client._wait(s.waiters, lambda: s.try_read(fd, n))

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes as soon as some are there (``asyncio.StreamReader`` semantics); all when ``n`` < 0."""
        if n >= 0:
            return await self.read1(n) if n else b""
        parts: List[bytes] = []
        while True:
            b = await self.read1(-1)
            if not b:
                return b"".join(parts)
            parts.append(b)

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; :class:`asyncio.IncompleteReadError` at an early end."""
        parts: List[bytes] = []
        want = n
        while want:
            b = await self.read1(want)
            if not b:
                data = b"".join(parts)
                raise asyncio.IncompleteReadError(data, n)
            parts.append(b)
            want -= len(b)
        return b"".join(parts)

    async def readline(self) -> bytes:
        """One line with its newline (the last may lack it); ``b""`` at the end."""
        s = self._proc._s
        fd = self._fd
        parts: List[bytes] = []
        while True:
            b = await self._proc._client._wait(s.waiters, lambda: s.try_line(fd, -1))
            if not b:
                break
            parts.append(b)
            if b.endswith(b"\n"):
                break
        return b"".join(parts)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The stream's chunks as they arrive."""
        while True:
            b = await self.read1(-1)
            if not b:
                return
            yield b

    def __aiter__(self) -> "AsyncOutputStream":
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line

    def at_eof(self) -> bool:
        """Whether the stream has ended and everything was read."""
        return self._proc._s.stream_done(self._fd)

    def close(self) -> None:
        """Drop (and acknowledge) everything this stream would still receive."""
        try:
            self._proc._s.discard_output(self._fd)
            self._proc._client._flush()
        except TransportClosed:
            pass
