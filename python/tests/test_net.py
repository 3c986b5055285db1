"""client.connect_tcp / client.net / client.forward against the real agent (loopback only: the agent runs here)."""

from __future__ import annotations

import errno
import os
import pathlib
import socket
import struct
import threading
import time
from typing import List

import pytest

import agentd
from agentd import messages as m

from conftest import EchoServer, is_root, wait_until


def recv_all(conn: agentd.net.Connection) -> bytes:
    parts: List[bytes] = []
    while True:
        b = conn.recv(1 << 20)
        if not b:
            return b"".join(parts)
        parts.append(b)


def test_tcp_echo_both_ways(client: agentd.Client, echo: EchoServer) -> None:
    data = os.urandom(5 * 1024 * 1024)
    with client.connect_tcp(echo.port) as conn:
        assert conn.getpeername() == f"127.0.0.1:{echo.port}"
        assert conn.getsockname().startswith("127.0.0.1:")
        t = threading.Thread(target=lambda: (conn.sendall(data), conn.shutdown(socket.SHUT_WR)))
        t.start()
        got = recv_all(conn)
        t.join()
        assert got == data
        closed = conn.wait_closed()
        assert closed.error is None
    assert wait_until(lambda: not client._core.streams)


def test_host_port_pairs_and_send(client: agentd.Client, echo: EchoServer) -> None:
    for addr in [("127.0.0.1", echo.port), ("localhost", echo.port)]:
        with client.connect_tcp(addr) as conn:
            n = conn.send(b"partial")
            assert n == 7
            assert conn.recv(100) == b"partial"
            buf = bytearray(16)
            conn.sendall(b"into")
            k = conn.recv_into(buf)
            assert bytes(buf[:k]) == b"into"
            assert conn.send(b"") == 0 and conn.recv(0) == b""


def test_unix_socket(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "echo.sock")
    srv = EchoServer(path=path)
    try:
        with client.net.connect_unix(path) as conn:
            assert conn.getpeername() == path and conn.getsockname() == ""
            conn.sendall(b"over unix")
            conn.shutdown(socket.SHUT_WR)
            assert recv_all(conn) == b"over unix"
        # On a client, connect_unix is the guest's socket; on the class, it opens a client.
        with client.connect_unix(path) as conn2:
            assert isinstance(conn2, agentd.net.Connection)
            conn2.sendall(b"again")
            assert conn2.recv(10) == b"again"
        assert callable(agentd.Client.connect_unix) and "Unix socket" in (type(vars(agentd.Client)["connect_unix"]).__doc__ or "")
    finally:
        srv.close()


def test_makefile_and_timeout(client: agentd.Client, echo: EchoServer) -> None:
    with client.connect_tcp(echo.port) as conn:
        f = conn.makefile("rwb")
        f.write(b"line one\nline two\n")
        f.flush()
        assert f.readline() == b"line one\n" and f.readline() == b"line two\n"
        t = conn.makefile("rw", encoding="utf-8")
        t.write("héllo\n")
        t.flush()
        assert t.readline() == "héllo\n"
        conn.settimeout(0.2)
        assert conn.gettimeout() == 0.2
        with pytest.raises(TimeoutError):
            conn.recv(10)
        conn.settimeout(None)
        conn.sendall(b"still fine")  # a timed-out recv loses nothing and breaks nothing
        assert conn.recv(100) == b"still fine"
    with pytest.raises(OSError):
        conn.recv(1)


def test_connect_failures_are_typed(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with pytest.raises(ConnectionRefusedError) as ei:
        client.connect_tcp(port)
    e = ei.value
    assert isinstance(e, agentd.NetRefused) and e.kind == "refused" and e.errno == errno.ECONNREFUSED
    with pytest.raises(FileNotFoundError) as ei2:
        client.net.connect_unix(str(tmp_path / "no.sock"))
    assert isinstance(ei2.value, agentd.NetNotFound)
    with pytest.raises(agentd.NetInvalidRequest):
        client.connect_tcp(0)
    with pytest.raises(agentd.NetBadUser):
        client.connect_tcp(port, user="no-such-user-agentd")
    assert wait_until(lambda: not client._core.streams)


def test_connect_timeout(client: agentd.Client) -> None:
    # A listener whose accept queue is full drops further SYNs: the connect never completes.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    held = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(srv.getsockname())
        except BlockingIOError:
            pass
        held.append(s)
    time.sleep(0.1)
    try:
        with pytest.raises(TimeoutError) as ei:
            client.connect_tcp(srv.getsockname()[1], timeout=0.3)
        assert isinstance(ei.value, agentd.NetTimedOut) and ei.value.errno == errno.ETIMEDOUT
    finally:
        for s in held:
            s.close()
        srv.close()


@pytest.mark.skipif(not is_root(), reason="needs root (to connect as nobody)")
def test_connect_permission_denied(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "private.sock")
    srv = EchoServer(path=path)
    os.chmod(path, 0o700)
    try:
        with pytest.raises(PermissionError) as ei:
            client.net.connect_unix(path, user="nobody")
        assert isinstance(ei.value, agentd.NetPermissionDenied)
    finally:
        srv.close()


def test_reset_by_the_guest_side(client: agentd.Client) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        c, _ = srv.accept()
        c.recv(10)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # RST

    t = threading.Thread(target=serve)
    t.start()
    conn = client.connect_tcp(srv.getsockname()[1])
    conn.sendall(b"go")
    t.join()
    with pytest.raises(ConnectionResetError) as ei:
        while conn.recv(100):
            pass
    assert isinstance(ei.value, agentd.NetReset) and ei.value.kind == "reset"
    srv.close()


def test_a_host_that_does_not_read_stalls_the_guest_sender(client: agentd.Client) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    total = 16 * 1024 * 1024
    sent = [0]

    def serve() -> None:
        c, _ = srv.accept()
        chunk = b"z" * 65536
        while sent[0] < total:
            c.sendall(chunk)
            sent[0] += len(chunk)
        c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    window = 256 * 1024
    conn = client.connect_tcp(srv.getsockname()[1], window=window)
    time.sleep(0.5)
    st = conn._st
    assert st.buffered <= window
    assert sent[0] < total  # blocked in send(): the agent stopped reading once the window was used
    n = 0
    while True:
        b = conn.recv(1 << 20)
        if not b:
            break
        n += len(b)
        assert st.buffered <= window
    assert n == total
    t.join(10)
    conn.close()
    srv.close()


def test_shutdown_then_receive_and_close(client: agentd.Client, echo: EchoServer) -> None:
    conn = client.connect_tcp(echo.port)
    conn.sendall(b"abc")
    conn.shutdown(socket.SHUT_WR)
    with pytest.raises(ValueError):
        conn.sendall(b"after shutdown")
    assert recv_all(conn) == b"abc"
    closed = conn.wait_closed()
    assert isinstance(closed, m.NetClosed) and closed.error is None
    conn.close()
    conn2 = client.connect_tcp(echo.port)
    conn2.shutdown(socket.SHUT_RD)
    conn2.sendall(b"dropped on arrival")
    conn2.abort()
    assert wait_until(lambda: not client._core.streams)


def test_forwarder(client: agentd.Client, echo: EchoServer) -> None:
    with client.forward(0, echo.port) as fw:
        assert fw.port > 0 and fw.address[0] == "127.0.0.1"
        results: List[bytes] = []

        def one(i: int) -> None:
            with socket.create_connection(("127.0.0.1", fw.port)) as s:
                data = (b"%d:" % i) * 20000
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while True:
                    b = s.recv(65536)
                    if not b:
                        break
                    got += b
                results.append(got if got == data else b"MISMATCH")

        ts = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert len(results) == 8 and b"MISMATCH" not in results
        assert fw.accepted == 8 and echo.clients >= 8
        # A long-lived relayed connection is closed by stop().
        held = socket.create_connection(("127.0.0.1", fw.port))
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        assert wait_until(lambda: fw.active == 1)
    held.settimeout(5)
    assert held.recv(10) == b""
    held.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", fw.port), timeout=2)
    assert wait_until(lambda: not client._core.streams)


def test_forwarder_to_a_closed_port(client: agentd.Client) -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with client.forward(0, port) as fw:
        with socket.create_connection(("127.0.0.1", fw.port)) as s:
            s.settimeout(10)
            assert s.recv(10) == b""  # closed: the guest connect was refused
        assert wait_until(lambda: len(fw.errors) == 1)
        assert isinstance(fw.errors[0], ConnectionRefusedError)


def test_net_error_classes_for_kinds_not_provoked() -> None:
    from agentd.errors import net_error

    # unreachable would need a route off this machine; resource an exhausted guest.
    for kind, cls, builtin, eno in [("unreachable", agentd.NetUnreachable, OSError, errno.ENETUNREACH),
                                    ("resource", agentd.NetResource, OSError, errno.EMFILE),
                                    ("broken_pipe", agentd.NetBrokenPipe, BrokenPipeError, errno.EPIPE),
                                    ("reset", agentd.NetReset, ConnectionResetError, errno.ECONNRESET)]:
        e = net_error(kind, "m", target="127.0.0.1:1")
        assert type(e) is cls and isinstance(e, builtin) and e.errno == eno and "127.0.0.1:1" in str(e)
    e = net_error("a_later_kind", "m", errno=errno.EPIPE)
    assert isinstance(e, BrokenPipeError)
    e = net_error("other", "m", errno=5)
    assert type(e) is agentd.NetError and e.errno == 5
