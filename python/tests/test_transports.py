"""Every transport: spawn, Unix socket, FIFO pair, device (a pty), hybrid vsock (a fake server), AF_VSOCK."""

from __future__ import annotations

import errno
import os
import pty
import tty
import socket
import subprocess
import threading
from typing import List, Optional, Tuple

import pytest

import agentd
from agentd import transport


def check_works(c: agentd.Client) -> None:
    assert c.ready.protocol == 1
    data = bytes(range(256)) * 64  # every byte value crosses unchanged
    assert c.run(["cat"], input=data).stdout == data
    assert c.run(["echo", "hi"]).stdout == b"hi\n"
    assert c.ping() > 0


def test_spawn(agentd_bin: str) -> None:
    with agentd.Client.spawn(agentd_bin) as c:
        check_works(c)
        proc = c.transport.process
    assert proc is not None and proc.returncode == 0  # end of file: the agent exits 0


def test_spawn_command(agentd_bin: str) -> None:
    with agentd.Client.spawn_command([agentd_bin, "--stdio", "--max-sessions", "7"]) as c:
        assert c.ready.max_sessions == 7


def test_spawn_missing_binary() -> None:
    with pytest.raises(agentd.ConnectError, match="cannot start"):
        agentd.Client.spawn("/no/such/agentd")


class AgentServer:
    """A Unix socket server that runs ``agentd --stdio`` on each accepted connection.

    ``handshake``: None (plain), or the hybrid vsock reply to send after reading the CONNECT line
    (``close_after`` closes the connection right after that reply instead of starting the agent).
    """

    def __init__(self, path: str, agentd_bin: str, handshake: Optional[bytes] = None, close_after: bool = False):
        self.path = path
        self.agentd_bin = agentd_bin
        self.handshake = handshake
        self.close_after = close_after
        self.lines: List[bytes] = []
        self.procs: List["subprocess.Popen[bytes]"] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.handshake is not None:
                line = b""
                while not line.endswith(b"\n") and len(line) < 100:
                    b = conn.recv(1)
                    if not b:
                        break
                    line += b
                self.lines.append(line)
                if self.handshake:
                    conn.sendall(self.handshake)
                if self.close_after:
                    conn.close()
                    continue
            self.procs.append(subprocess.Popen([self.agentd_bin, "--stdio"], stdin=conn, stdout=conn))
            conn.close()

    def close(self) -> None:
        self.sock.close()
        for p in self.procs:
            p.wait(5)


@pytest.fixture
def sock_path(tmp_path: "os.PathLike[str]") -> str:
    return os.path.join(os.fspath(tmp_path), "agent.sock")


def test_unix_socket(sock_path: str, agentd_bin: str) -> None:
    srv = AgentServer(sock_path, agentd_bin)
    try:
        with agentd.Client.connect_unix(sock_path) as c:
            check_works(c)
        with agentd.Client.open_port(sock_path) as c:  # open_port takes a socket too
            check_works(c)
    finally:
        srv.close()


def test_unix_socket_missing(sock_path: str) -> None:
    with pytest.raises(agentd.ConnectError, match="is the VM"):
        agentd.Client.connect_unix(sock_path)


def test_fifo_pair(tmp_path: "os.PathLike[str]", agentd_bin: str) -> None:
    base = os.path.join(os.fspath(tmp_path), "port")
    os.mkfifo(base + ".in")
    os.mkfifo(base + ".out")
    agent = subprocess.Popen([agentd_bin, "--port", base])
    try:
        with agentd.Client.open_port(base) as c:
            check_works(c)
        assert agent.wait(5) == 0  # end of file on PATH.in: as in stdio mode
    finally:
        if agent.poll() is None:
            agent.kill()


def test_fifo_pair_without_agent(tmp_path: "os.PathLike[str]") -> None:
    base = os.path.join(os.fspath(tmp_path), "port")
    os.mkfifo(base + ".in")
    os.mkfifo(base + ".out")
    with pytest.raises(agentd.ConnectError, match="no agent opened"):
        agentd.Client.open_port(base, timeout=0.2)


def test_port_errors(tmp_path: "os.PathLike[str]") -> None:
    base = os.path.join(os.fspath(tmp_path), "x")
    with pytest.raises(agentd.ConnectError, match="does not exist"):
        agentd.Client.open_port(base)
    os.mkfifo(base)
    with pytest.raises(agentd.ConnectError, match="single FIFO"):
        agentd.Client.open_port(base)
    regular = os.path.join(os.fspath(tmp_path), "file")
    open(regular, "w").close()
    with pytest.raises(agentd.ConnectError, match="not a character device"):
        agentd.Client.open_port(regular)


def test_device_pty(agentd_bin: str) -> None:
    # The agent's end is a pty master (what QEMU holds for `-chardev pty`); the
    # host opens the slave device by path, which open_port puts in raw mode.
    master, slave = pty.openpty()
    path = os.ttyname(slave)
    # Raw before the agent writes anything: a cooked slave would echo the agent's
    # READY back to it and hold bytes in its line buffer (any host of a pty has
    # this race until it has set raw mode; open_port sets it again).
    tty.setraw(slave)
    agent = subprocess.Popen([agentd_bin, "--stdio"], stdin=master, stdout=master)
    os.close(master)
    try:
        with agentd.Client.open_port(path) as c:
            check_works(c)
            assert c.run(["head", "-c", "1000000", "/dev/zero"]).stdout == b"\x00" * 1_000_000
    finally:
        os.close(slave)
        try:
            agent.wait(5)
        except subprocess.TimeoutExpired:
            agent.kill()


# --- hybrid vsock ----------------------------------------------------------------------------


def test_hybrid_vsock(sock_path: str, agentd_bin: str) -> None:
    srv = AgentServer(sock_path, agentd_bin, handshake=b"OK 1073741824\n")
    try:
        with agentd.Client.connect_hybrid_vsock(sock_path, 1024) as c:
            check_works(c)
        assert srv.lines == [b"CONNECT 1024\n"]
    finally:
        srv.close()


@pytest.mark.parametrize(
    "reply,shown",
    [
        (b"FAILURE\n", "answered b'FAILURE\\n' instead of 'OK ...'"),
        (b"\x00\xffgarbage\n", "answered b'\\x00\\xffgarbage\\n'"),
        (b"OK-ish without newline", "answered b'OK-ish without newline' and closed the connection"),
        (b"", "closed the connection without answering"),
    ],
    ids=["failure", "garbage", "no-newline", "eof"],
)
def test_hybrid_vsock_refused(sock_path: str, agentd_bin: str, reply: bytes, shown: str) -> None:
    srv = AgentServer(sock_path, agentd_bin, handshake=reply, close_after=True)
    try:
        with pytest.raises(agentd.HandshakeError) as e:
            agentd.Client.connect_hybrid_vsock(sock_path, 52, timeout=5)
        assert e.value.answer == reply
        assert e.value.eof == (not reply.endswith(b"\n"))  # a line ends the read: nothing after it is taken
        assert shown in str(e.value) and "vsock port 52" in str(e.value)
        assert isinstance(e.value, agentd.ConnectError)
        assert srv.lines == [b"CONNECT 52\n"]
    finally:
        srv.close()


def test_hybrid_vsock_long_garbage(sock_path: str, agentd_bin: str) -> None:
    srv = AgentServer(sock_path, agentd_bin, handshake=b"x" * 1000, close_after=True)
    try:
        with pytest.raises(agentd.HandshakeError) as e:
            agentd.Client.connect_hybrid_vsock(sock_path, 52)
        assert len(e.value.answer) == 256  # it stops reading at 256 bytes without a newline
    finally:
        srv.close()


def test_hybrid_vsock_no_answer(sock_path: str) -> None:
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # accepts (backlog) and never answers
    lsock.bind(sock_path)
    lsock.listen(1)
    try:
        with pytest.raises(agentd.ConnectError, match="no answer to CONNECT 52"):
            agentd.Client.connect_hybrid_vsock(sock_path, 52, timeout=0.3)
    finally:
        lsock.close()


# --- AF_VSOCK -----------------------------------------------------------------------------------


def vsock_loopback() -> Optional[Tuple[socket.socket, int]]:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        return None
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind((1, socket.VMADDR_PORT_ANY))  # VMADDR_CID_LOCAL (vsock_loopback)
        s.listen(1)
    except OSError:
        return None
    return s, s.getsockname()[1]


def test_vsock_loopback_or_typed_failure(agentd_bin: str) -> None:
    lb = vsock_loopback()
    if lb is None:
        with pytest.raises(agentd.ConnectError) as e:
            agentd.Client.connect_vsock(1, 5005, timeout=2)
        assert e.value.errno in (
            errno.ENODEV, errno.EADDRNOTAVAIL, errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT,
            errno.EAFNOSUPPORT, errno.ENETUNREACH, errno.EHOSTUNREACH,
        ), e.value
        pytest.skip("no vsock loopback on this host: only the typed failure was checked")
    srv, port = lb

    def serve() -> None:
        conn, _ = srv.accept()
        subprocess.Popen([agentd_bin, "--stdio"], stdin=conn, stdout=conn)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        with agentd.Client.connect_vsock(1, port) as c:
            check_works(c)
    finally:
        srv.close()


def test_from_socket_and_fds(agentd_bin: str) -> None:
    a, b = socket.socketpair()
    agent = subprocess.Popen([agentd_bin, "--stdio"], stdin=b, stdout=b)
    b.close()
    with agentd.Client.from_socket(a) as c:
        check_works(c)
    assert agent.wait(5) == 0
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    agent = subprocess.Popen([agentd_bin, "--stdio"], stdin=r1, stdout=w2)
    os.close(r1)
    os.close(w2)
    with agentd.Client(transport.from_fds(r2, w1)) as c:
        check_works(c)
    assert agent.wait(5) == 0
