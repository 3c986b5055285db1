"""Connections to guest sockets (extension ``net``), shaped like :mod:`socket`, and a port forwarder.

``client.connect_tcp(8080)`` (or ``((host, port))``) and
``client.net.connect_unix(path)`` return a :class:`Connection`: ``sendall``,
``send``, ``recv``, ``recv_into``, ``shutdown(SHUT_WR)``, ``close``,
``makefile``, ``settimeout``, a context manager. The agent connects from
inside the guest (so ``127.0.0.1`` is the guest's loopback). Bytes flow with
windows both ways: at most ``window`` bytes from the guest wait in Python
(a reader that stops makes the guest sender block), and a writer waits for
the agent's acknowledgements beyond READY's ``stdin_window``. Connect
failures are typed: :class:`ConnectionRefusedError`, :class:`TimeoutError`,
:class:`FileNotFoundError`, ... (all :class:`~agentd.NetError`).

:class:`Forwarder` (``client.forward(local_port, remote_port)``) accepts
on ``127.0.0.1`` of the host and relays each connection to the guest port,
as ``kubectl port-forward`` does.
"""

from __future__ import annotations

import io
import os
import select
import socket
import threading
from typing import TYPE_CHECKING, Any, List, Optional, Set, Tuple, Union

from . import _ext
from . import messages as m
from ._ext import DEFAULT_WINDOW, ExtStream
from .errors import NetError, TransportClosed

if TYPE_CHECKING:
    from .client import Client

__all__ = ["Net", "Connection", "Forwarder", "Address"]

#: A guest TCP port, or (host, port) as the guest resolves it.
Address = Union[int, Tuple[str, int]]


def tcp_request(address: Address, *, timeout: Optional[float], user: Optional[str], window: int
                ) -> Tuple[m.NetConnect, str]:
    """NET_CONNECT for a TCP address, and how to name it in errors."""
    if isinstance(address, int):
        host, port = "127.0.0.1", address
    else:
        host, port = address
    req = m.NetConnect(host=host, port=port, user=user, timeout_ms=_ms(timeout), window=window)
    req.encode_payload()
    return req, f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"


def unix_request(path: str, *, timeout: Optional[float], user: Optional[str], window: int
                 ) -> Tuple[m.NetConnect, str]:
    req = m.NetConnect(path=path, user=user, timeout_ms=_ms(timeout), window=window)
    req.encode_payload()
    return req, path


def _ms(timeout: Optional[float]) -> int:
    if timeout is None:
        return 0xFFFF_FFFF
    return max(1, min(0xFFFF_FFFF, int(timeout * 1000)))


def host_wait(timeout: Optional[float]) -> Optional[float]:
    """How long the host waits for NET_CONNECTED: the agent's own timeout, plus a margin for the link."""
    return None if timeout is None else timeout + 10.0


class Net:
    """``client.net``: connections to the guest's TCP and Unix sockets, and port forwarding."""

    def __init__(self, client: "Client", *, user: Optional[str] = None, window: int = DEFAULT_WINDOW) -> None:
        self._c = client
        self.user = user
        self.window = window

    def _open(self, req: m.NetConnect, target: str, timeout: Optional[float]) -> "Connection":
        self._c.require_feature("net")
        st, connected = self._c._drive(_ext.net_connect(self._c._core, req, target), host_wait(timeout))
        return Connection(self._c, st, connected, target)

    def connect_tcp(self, address: Address, *, timeout: Optional[float] = 10.0, user: Union[str, int, None] = None,
                    window: Optional[int] = None) -> "Connection":
        """Connect to guest TCP ``address``: a port on the guest's 127.0.0.1, or ``(host, port)``.

        ``host`` is an IP literal, ``localhost``, or a name the guest
        resolves. ``timeout`` bounds the connect (the agent gives up with
        :class:`TimeoutError`); ``user`` connects with that guest user's
        credentials.
        """
        u = self.user if user is None else str(user)
        req, target = tcp_request(address, timeout=timeout, user=u, window=window or self.window)
        return self._open(req, target, timeout)

    def connect_unix(self, path: str, *, timeout: Optional[float] = 10.0, user: Union[str, int, None] = None,
                     window: Optional[int] = None) -> "Connection":
        """Connect to the guest Unix socket ``path`` (abstract names start with ``@``)."""
        u = self.user if user is None else str(user)
        req, target = unix_request(os.fspath(path), timeout=timeout, user=u, window=window or self.window)
        return self._open(req, target, timeout)

    def forward(self, local_port: int, remote: Address, *, local_host: str = "127.0.0.1",
                connect_timeout: Optional[float] = 10.0) -> "Forwarder":
        """Accept on ``local_host:local_port`` (0: any free port, see :attr:`Forwarder.port`) and relay each
        connection to the guest ``remote`` port (or ``(host, port)``). Stop it with :meth:`Forwarder.stop`."""
        self._c.require_feature("net")
        return Forwarder(self, local_port, remote, local_host=local_host, connect_timeout=connect_timeout)


class Connection:
    """A connection to a guest socket, shaped like :class:`socket.socket` (bytes, blocking, optional timeout)."""

    def __init__(self, client: "Client", st: ExtStream, connected: m.NetConnected, target: str) -> None:
        self._c = client
        self._st = st
        self.peer = connected.peer
        self.local = connected.local
        self.target = target
        self._timeout: Optional[float] = None
        self._closed = False

    def __del__(self) -> None:
        st = getattr(self, "_st", None)
        if st is not None and not st.ended and not getattr(self, "_closed", True):
            self._c._defer(lambda: _ext.net_close(st, False))

    # --- socket-like ----------------------------------------------------------------

    def getpeername(self) -> str:
        """NET_CONNECTED ``peer``: ``ADDR:PORT``, ``[ADDR]:PORT`` or the socket path."""
        return self.peer

    def getsockname(self) -> str:
        """NET_CONNECTED ``local`` (the guest side's own address; ``""`` for a Unix socket)."""
        return self.local

    def settimeout(self, timeout: Optional[float]) -> None:
        """Seconds a ``recv``/``send`` may wait (None: forever); past it :class:`TimeoutError` (socket.timeout)."""
        self._timeout = timeout

    def gettimeout(self) -> Optional[float]:
        return self._timeout

    def _check(self) -> None:
        if self._closed:
            raise OSError(9, "Bad file descriptor: the connection is closed")

    def sendall(self, data: m.Buffer) -> None:
        """Send all of ``data`` (waiting for the agent's window); raises if the connection broke."""
        self._check()
        self._c._drive(_ext.push_all(self._st, data), self._timeout)

    def send(self, data: m.Buffer) -> int:
        """Send what the window allows now (waiting only if it allows nothing); the number of bytes sent."""
        self._check()
        mv = memoryview(data).cast("B")
        st = self._st
        if not len(mv):
            return 0
        self._c._drive(_ext.wait_for(st, st.try_credit), self._timeout)
        return self._c._locked(lambda: st.push(mv, 0))

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Up to ``bufsize`` bytes, waiting for some; ``b""`` once the guest side shut down (NET_EOF)."""
        self._check()
        if flags:
            raise ValueError("recv flags are not supported on a guest connection")
        if bufsize <= 0:
            return b""
        st = self._st
        return self._c._drive(_ext.wait_for(st, lambda: st.try_read(bufsize)), self._timeout)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        mv = memoryview(buffer).cast("B")
        data = self.recv(nbytes or len(mv), flags)
        mv[: len(data)] = data
        return len(data)

    def shutdown(self, how: int) -> None:
        """``SHUT_WR``: our end of file (NET_SHUTDOWN; the guest reads EOF once what was sent is written).
        ``SHUT_RD``: drop what the guest still sends. ``SHUT_RDWR``: both."""
        self._check()
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._c._locked(lambda: self._st.close_send(m.NetShutdown()))
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            def drop() -> None:
                st = self._st
                st.discard = True
                n = st.buffered
                st.data.clear()
                st.data_off = st.buffered = 0
                st._consumed(n)
            self._c._locked(drop)

    def close(self) -> None:
        """Close now (NET_CLOSE): what is still queued for the guest is dropped."""
        self._close(False)

    def abort(self) -> None:
        """Close with a TCP RST (NET_CLOSE ``reset``)."""
        self._close(True)

    def _close(self, reset: bool) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._c._locked(lambda: _ext.net_close(self._st, reset))
        except TransportClosed:
            pass

    def wait_closed(self, timeout: Optional[float] = 10.0) -> m.NetClosed:
        """Wait for NET_CLOSED (the stream's last frame) and return it; raises the failure if it broke."""
        st = self._st

        def done() -> Optional[m.Message]:
            if st.final is not None or st.error is not None or st.closed is not None:
                if isinstance(st.final, m.NetClosed):
                    return st.final
                st.raise_failure()
            st.before_wait()
            return None

        v = self._c._drive(_ext.wait_for(st, done), timeout)
        assert isinstance(v, m.NetClosed)
        return v

    @property
    def closed(self) -> bool:
        return self._closed

    def makefile(self, mode: str = "r", buffering: Optional[int] = None, *, encoding: Optional[str] = None,
                 errors: Optional[str] = None, newline: Optional[str] = None) -> Any:
        """A file object over the connection, as :meth:`socket.socket.makefile` (``"rb"``, ``"wb"``, ``"rwb"``, text)."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only 'r', 'w', 'b')")
        reading, writing = "r" in mode, "w" in mode
        if not (reading or writing):
            raise ValueError("makefile: mode needs 'r' or 'w'")
        raw = _ConnIO(self, mode)
        size = io.DEFAULT_BUFFER_SIZE if buffering is None or buffering < 0 else buffering
        if buffering == 0:
            if "b" not in mode:
                raise ValueError("unbuffered streams must be binary")
            return raw
        buf: Any
        if reading and writing:
            buf = io.BufferedRWPair(raw, raw, size)
        elif reading:
            buf = io.BufferedReader(raw, size)
        else:
            buf = io.BufferedWriter(raw, size)
        if "b" in mode:
            return buf
        return io.TextIOWrapper(buf, encoding=encoding or "utf-8", errors=errors, newline=newline)

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<agentd.Connection {self.target} peer={self.peer!r}{' closed' if self._closed else ''}>"


class _ConnIO(io.RawIOBase):
    def __init__(self, conn: Connection, mode: str) -> None:
        super().__init__()
        self._conn = conn
        self._mode = mode

    def readable(self) -> bool:
        return "r" in self._mode

    def writable(self) -> bool:
        return "w" in self._mode

    def readinto(self, b: Any) -> int:
        return self._conn.recv_into(b)

    def write(self, b: Any) -> int:
        data = bytes(memoryview(b).cast("B"))
        self._conn.sendall(data)
        return len(data)


class Forwarder:
    """Relays connections accepted on the host to a guest port: one guest connection per accepted one.

    ``port`` is the local port (useful with ``local_port=0``), ``accepted``
    how many connections came, ``errors`` the connect failures (the local
    connection is then closed). Stop it with :meth:`stop` (or a ``with``
    block): the listening socket and every relayed connection are closed.
    """

    def __init__(self, net: Net, local_port: int, remote: Address, *, local_host: str = "127.0.0.1",
                 connect_timeout: Optional[float] = 10.0) -> None:
        self._net = net
        self.remote = remote
        self.connect_timeout = connect_timeout
        self._sock = socket.create_server((local_host, local_port))
        self._sock.setblocking(False)
        self.address: Tuple[str, int] = self._sock.getsockname()[:2]
        self.port = self.address[1]
        self.accepted = 0
        self.errors: List[BaseException] = []
        self._lock = threading.Lock()
        self._live: Set[Tuple[socket.socket, Optional[Connection]]] = set()
        self._threads: List[threading.Thread] = []
        self._stopped = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"agentd-forward-{self.port}", daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopped:
            poller.poll()
            if self._stopped:
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            conn.setblocking(True)
            with self._lock:
                self.accepted += 1
                t = threading.Thread(target=self._relay, args=(conn,), daemon=True)
                self._threads.append(t)
            t.start()

    def _relay(self, local: socket.socket) -> None:
        try:
            remote = self._net.connect_tcp(self.remote, timeout=self.connect_timeout)
        except (NetError, TransportClosed, OSError) as e:
            with self._lock:
                self.errors.append(e)
            local.close()
            return
        key = (local, remote)
        with self._lock:
            if self._stopped:
                remote.close()
                local.close()
                return
            self._live.add(key)
        up = threading.Thread(target=self._pump_up, args=(local, remote), daemon=True)
        up.start()
        try:
            while True:
                data = remote.recv(65536)
                if not data:
                    break
                local.sendall(data)
            local.shutdown(socket.SHUT_WR)
        except (OSError, TransportClosed):
            pass
        up.join()
        remote.close()
        local.close()
        with self._lock:
            self._live.discard(key)

    @staticmethod
    def _pump_up(local: socket.socket, remote: Connection) -> None:
        try:
            while True:
                data = local.recv(65536)
                if not data:
                    break
                remote.sendall(data)
            remote.shutdown(socket.SHUT_WR)
        except (OSError, TransportClosed):
            remote.close()

    @property
    def active(self) -> int:
        """Connections being relayed now."""
        with self._lock:
            return len(self._live)

    def stop(self) -> None:
        """Stop accepting and close every relayed connection (both ends)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            live = list(self._live)
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._acceptor.join(5)
        self._sock.close()
        for local, remote in live:
            try:
                local.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if remote is not None:
                remote.close()
        for t in list(self._threads):
            t.join(5)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "Forwarder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<agentd.Forwarder {self.address[0]}:{self.port} -> guest {self.remote!r}>"
