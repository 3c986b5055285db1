"""Byte-stream transports to an agent, and the ways to open them.

A :class:`Transport` is a pair of file descriptors (often one fd used both
ways) that the clients read and write without blocking; it owns them and
closes them once. The ``open_*`` functions set one up:

- :func:`spawn_agent` / :func:`spawn_command`: a local ``agentd --stdio`` (or
  any command that speaks the protocol on its stdin/stdout) on a pair of pipes;
- :func:`connect_unix`: a Unix socket, e.g. QEMU's ``-chardev socket,path=...,server=on``;
- :func:`open_port`: a character device (a serial line or pty, put in raw
  mode), a Unix socket, or a FIFO pair ``PATH.in`` (host to agent) and
  ``PATH.out`` (agent to host) as QEMU's ``-chardev pipe,path=PATH`` names them;
- :func:`connect_hybrid_vsock`: a Firecracker-style hybrid vsock: connect
  to the Unix socket, send ``CONNECT <port>\\n``, expect a line starting
  with ``OK``;
- :func:`connect_vsock`: ``AF_VSOCK`` (cid, port), where the host has it.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os
import select
import socket
import stat
import subprocess
import termios
import time
import tty
from typing import IO, Any, Mapping, Optional, Sequence, Union

from .errors import ConnectError, HandshakeError

__all__ = [
    "Transport",
    "spawn_agent",
    "spawn_command",
    "connect_unix",
    "open_port",
    "connect_hybrid_vsock",
    "connect_vsock",
    "from_socket",
    "from_fds",
]

_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

StrPath = Union[str, "os.PathLike[str]"]


def _set_nonblocking(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


def _grow_pipe(fd: int) -> None:
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
    except OSError:
        pass  # pipe-max-size may be lower; the default size works too


class Transport:
    """An open byte stream to an agent: ``read_fd`` and ``write_fd`` (possibly the same fd).

    Both fds are non-blocking. :meth:`close` closes them once; for a spawned
    agent it then waits for the process (killing it if it does not exit).
    """

    def __init__(
        self,
        read_fd: int,
        write_fd: int,
        *,
        description: str,
        keep: Sequence[Any] = (),
        process: Optional["subprocess.Popen[bytes]"] = None,
    ) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.description = description
        #: The spawned agent process, for :func:`spawn_agent` and :func:`spawn_command`.
        self.process = process
        self._keep = list(keep)
        self._closed = False
        _set_nonblocking(read_fd)
        if write_fd != read_fd:
            _set_nonblocking(write_fd)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def close_write(self) -> None:
        """Half-close: the agent reads end of file (sockets: shutdown; pipes: close the write end)."""
        if self._closed:
            return
        for obj in self._keep:
            if isinstance(obj, socket.socket):
                try:
                    obj.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
        if self.write_fd != self.read_fd and self.write_fd >= 0:
            try:
                os.close(self.write_fd)
            except OSError:
                pass
            self.write_fd = -1

    def close(self, wait: float = 5.0) -> None:
        """Close the fds; reap a spawned agent (waiting up to ``wait`` seconds, then SIGKILL)."""
        if self._closed:
            return
        self._closed = True
        socks = [o for o in self._keep if isinstance(o, socket.socket)]
        if socks:
            for s in socks:
                s.close()
        else:
            for fd in {self.read_fd, self.write_fd}:
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
        for obj in self._keep:
            if not isinstance(obj, socket.socket) and hasattr(obj, "close"):
                try:
                    obj.close()
                except OSError:
                    pass
        if self.process is not None:
            try:
                self.process.wait(wait)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __repr__(self) -> str:
        return f"<Transport {self.description}{' closed' if self._closed else ''}>"


def spawn_command(
    argv: Sequence[StrPath],
    *,
    env: Optional[Mapping[str, str]] = None,
    stderr: Union[None, int, IO[Any]] = None,
    cwd: Optional[StrPath] = None,
) -> Transport:
    """Start ``argv`` with its stdin and stdout as the transport (pipes grown to 1 MiB).

    ``stderr`` is where its stderr goes (default: this process's stderr).
    The command runs in a session of its own, so a Ctrl-C meant for Python
    does not reach it; closing the transport is what ends it.
    """
    to_agent_r, to_agent_w = os.pipe()
    from_agent_r, from_agent_w = os.pipe()
    for fd in (to_agent_w, from_agent_r):
        _grow_pipe(fd)
    try:
        proc = subprocess.Popen(
            [os.fspath(a) for a in argv],
            stdin=to_agent_r,
            stdout=from_agent_w,
            stderr=stderr,
            env=None if env is None else dict(env),
            cwd=cwd,
            close_fds=True,
            start_new_session=True,
        )
    except OSError as e:
        for fd in (to_agent_r, to_agent_w, from_agent_r, from_agent_w):
            os.close(fd)
        raise ConnectError(e.errno, f"cannot start {os.fspath(argv[0])!r}: {e.strerror}; check the path") from e
    os.close(to_agent_r)
    os.close(from_agent_w)
    os.set_inheritable(to_agent_w, False)
    os.set_inheritable(from_agent_r, False)
    return Transport(
        from_agent_r,
        to_agent_w,
        description=f"spawn:{os.fspath(argv[0])} (pid {proc.pid})",
        process=proc,
    )


def spawn_agent(
    path: StrPath = "agentd",
    args: Sequence[str] = (),
    *,
    env: Optional[Mapping[str, str]] = None,
    stderr: Union[None, int, IO[Any]] = None,
) -> Transport:
    """Start ``path --stdio ARGS`` (e.g. ``args=["--max-sessions", "8"]``) as the transport."""
    return spawn_command([path, "--stdio", *args], env=env, stderr=stderr)


def from_socket(sock: socket.socket, description: Optional[str] = None) -> Transport:
    """A connected stream socket as the transport (the transport owns it from now on)."""
    fd = sock.fileno()
    return Transport(fd, fd, description=description or f"socket fd {fd}", keep=[sock])


def from_fds(read_fd: int, write_fd: int, description: Optional[str] = None) -> Transport:
    """Two fds (or one fd twice) as the transport; they are set non-blocking and owned from now on."""
    return Transport(read_fd, write_fd, description=description or f"fds {read_fd}/{write_fd}")


def _connect_unix_socket(path: str, timeout: Optional[float]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        code = e.errno if e.errno is not None else _errno.EIO
        if isinstance(e, socket.timeout):
            code = _errno.ETIMEDOUT
        raise ConnectError(
            code, f"cannot connect to the Unix socket {path}: {e.strerror or e}; is the VM (or agent) running?"
        ) from e
    sock.settimeout(None)
    return sock


def connect_unix(path: StrPath, *, timeout: Optional[float] = 10.0) -> Transport:
    """Connect to a Unix socket at ``path`` (QEMU's chardev socket, or an agent behind one)."""
    p = os.fspath(path)
    return from_socket(_connect_unix_socket(p, timeout), f"unix:{p}")


def _open_fifo_pair(path: str, timeout: Optional[float]) -> Transport:
    # PATH.out (agent -> host) is opened first without blocking: poll reports
    # nothing until the agent's write end appears, so the reader never
    # mistakes "no writer yet" for end of file.
    out_fd = os.open(path + ".out", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            in_fd = os.open(path + ".in", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            break
        except OSError as e:
            if e.errno != _errno.ENXIO:
                os.close(out_fd)
                raise ConnectError(e.errno, f"cannot open {path}.in: {e.strerror}") from e
            if deadline is not None and time.monotonic() > deadline:
                os.close(out_fd)
                raise ConnectError(
                    _errno.ETIMEDOUT,
                    f"no agent opened {path}.in within {timeout} s; start `agentd --port {path}` (or the VM)",
                ) from None
            time.sleep(0.005)
    # The agent opens PATH.out for writing only after PATH.in: until it has,
    # a read of PATH.out is end of file. Wait for its first bytes (READY).
    poller = select.poll()
    poller.register(out_fd, select.POLLIN)
    while True:
        rem = None if deadline is None else max(0.0, deadline - time.monotonic())
        if poller.poll(None if rem is None else int(rem * 1000) + 1):
            break
        if rem is not None and rem <= 0:
            os.close(out_fd)
            os.close(in_fd)
            raise ConnectError(_errno.ETIMEDOUT, f"the agent did not open {path}.out within {timeout} s")
    return Transport(out_fd, in_fd, description=f"fifo:{path}.in/{path}.out")


def _open_device(path: str) -> Transport:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConnectError(e.errno, f"cannot open the device {path}: {e.strerror}") from e
    if os.isatty(fd):
        # Raw mode: every byte value crosses unchanged (no echo, no line
        # discipline, no CR/LF translation, no flow-control characters).
        try:
            tty.setraw(fd, termios.TCSANOW)
        except termios.error as e:
            os.close(fd)
            raise ConnectError(_errno.EIO, f"cannot put {path} in raw mode: {e}") from None
    return Transport(fd, fd, description=f"device:{path}")


def open_port(path: StrPath, *, timeout: Optional[float] = 10.0) -> Transport:
    """Open ``path`` as the agent's port: a character device, a Unix socket, or a FIFO pair.

    A FIFO pair is ``PATH.in`` and ``PATH.out`` with ``PATH`` itself absent
    (QEMU's ``-chardev pipe`` convention); ``timeout`` bounds the wait for
    the agent's end to open. A single FIFO is refused: it cannot carry both directions.
    """
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.exists(p + ".in") and os.path.exists(p + ".out"):
            return _open_fifo_pair(p, timeout)
        raise ConnectError(
            _errno.ENOENT, f"{p} does not exist, nor do {p}.in and {p}.out; give a device, a socket or a FIFO pair"
        ) from None
    if stat.S_ISSOCK(st.st_mode):
        return from_socket(_connect_unix_socket(p, timeout), f"unix:{p}")
    if stat.S_ISCHR(st.st_mode):
        return _open_device(p)
    if stat.S_ISFIFO(st.st_mode):
        raise ConnectError(
            _errno.EINVAL, f"{p} is a single FIFO, which cannot carry both directions; use {p}.in and {p}.out"
        )
    raise ConnectError(_errno.EINVAL, f"{p} is not a character device, a Unix socket or a FIFO pair")


def connect_hybrid_vsock(
    uds_path: StrPath, port: int, *, timeout: Optional[float] = 10.0
) -> Transport:
    """Connect through a hybrid vsock Unix socket (Firecracker, Cloud Hypervisor).

    Sends ``CONNECT <port>\\n`` and reads one line; a line starting with
    ``OK`` opens the stream, anything else (or end of file, or no newline
    within 256 bytes) raises :class:`HandshakeError` naming what came back.
    """
    if not 0 <= port <= 0xFFFF_FFFF:
        raise ValueError(f"vsock port {port} does not fit u32")
    p = os.fspath(uds_path)
    sock = _connect_unix_socket(p, timeout)
    try:
        sock.settimeout(timeout)
        sock.sendall(b"CONNECT %d\n" % port)
        line = bytearray()
        eof = False
        while True:
            try:
                b = sock.recv(1)  # byte by byte: nothing after the line is consumed
            except socket.timeout:
                raise ConnectError(
                    _errno.ETIMEDOUT,
                    f"hybrid vsock handshake on {p}: no answer to CONNECT {port} within {timeout} s "
                    f"(got {bytes(line)!r}); check that the VM is running",
                ) from None
            if not b:
                eof = True
                break
            line += b
            if b == b"\n" or len(line) >= 256:
                break
        if eof or not line.startswith(b"OK") or not line.endswith(b"\n"):
            raise HandshakeError(p, port, bytes(line), eof)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return from_socket(sock, f"hvsock:{p}:{port}")


def connect_vsock(cid: int, port: int, *, timeout: Optional[float] = 10.0) -> Transport:
    """Connect with ``AF_VSOCK`` to ``cid``:``port`` (Linux hosts with vhost-vsock)."""
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise ConnectError(_errno.EAFNOSUPPORT, "AF_VSOCK is not available on this host; use a Unix socket instead")
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise ConnectError(e.errno, f"cannot create an AF_VSOCK socket: {e.strerror}; load vhost_vsock") from e
    sock.settimeout(timeout)
    try:
        sock.connect((cid, port))
    except OSError as e:
        sock.close()
        raise ConnectError(
            e.errno if e.errno is not None else _errno.ETIMEDOUT,
            f"cannot connect to vsock {cid}:{port}: {e.strerror or e}; is the VM running with agentd on that port?",
        ) from e
    sock.settimeout(None)
    return from_socket(sock, f"vsock:{cid}:{port}")
