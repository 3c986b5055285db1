"""Shared fixtures: the agentd binary (AGENTD_BIN overrides the path), clients, helpers."""

from __future__ import annotations

import os
import pathlib
import threading
import time
from typing import Callable, Iterator, List, Optional

import pytest

import agentd

REPO = pathlib.Path(__file__).resolve().parents[2]
VECTORS = REPO / "tests" / "vectors"
PROTOCOL_MD = REPO / "docs" / "PROTOCOL.md"


def agentd_path() -> str:
    path = os.environ.get("AGENTD_BIN") or str(REPO / "target" / "release" / "agentd")
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"no agentd binary at {path}: run `cargo build --release --bin agentd` in {REPO}, or set AGENTD_BIN",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def agentd_bin() -> str:
    return agentd_path()


@pytest.fixture
def client(agentd_bin: str) -> Iterator[agentd.Client]:
    with agentd.Client.spawn(agentd_bin) as c:
        yield c


@pytest.fixture
def spawn(agentd_bin: str) -> Iterator[Callable[..., agentd.Client]]:
    """spawn(*agent_args, **client_kwargs): more clients, closed at the end of the test."""
    made: List[agentd.Client] = []

    def make(*args: str, **kwargs: object) -> agentd.Client:
        c = agentd.Client.spawn(agentd_bin, list(args), **kwargs)  # type: ignore[arg-type]
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def wait_until(cond: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (the agent runs on this machine)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def proc_wchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise AssertionError("no wchar")


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RssSampler:
    """Samples this process's RSS in a thread; ``peak_growth`` is the largest growth over the baseline."""

    def __init__(self, interval: float = 0.02) -> None:
        self.baseline = rss_bytes()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "RssSampler":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def peak_growth(self) -> int:
        return self.peak - self.baseline


def read_hex(path: pathlib.Path) -> bytes:
    """A golden vector file: hex pairs, whitespace ignored, '#' comments to the end of the line."""
    out = bytearray()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0]
        for word in line.split():
            assert len(word) % 2 == 0, f"{path.name}: odd hex word {word!r}"
            out += bytes.fromhex(word)
    return bytes(out)


def is_root() -> bool:
    return os.geteuid() == 0


def optional_int(v: Optional[str]) -> Optional[int]:
    return None if v is None else int(v)


@pytest.fixture(autouse=True)
def _watchdog() -> Iterator[None]:
    """No test may hang the suite: after 120 s it fails with a traceback of where it waited."""
    import signal

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError("the test ran for more than 120 s (watchdog)")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class Listening:
    """``agentd --listen unix:PATH`` in a scratch directory (as tests/support/listen.rs starts it)."""

    def __init__(self, binary: str, tmp: pathlib.Path, *args: str) -> None:
        import socket
        import subprocess

        self.path = str(tmp / "agent.sock")
        self.proc = subprocess.Popen(
            [binary, "--listen", f"unix:{self.path}", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        end = time.monotonic() + 10
        while True:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(self.path)
                s.close()
                break
            except OSError:
                s.close()
                assert self.proc.poll() is None, "agentd --listen exited"
                assert time.monotonic() < end, f"{self.path} never accepted"
                time.sleep(0.005)

    def connect(self, **kwargs: object) -> agentd.Client:
        return agentd.Client.connect_unix(self.path, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def listening(agentd_bin: str, tmp_path: pathlib.Path) -> Iterator[Listening]:
    la = Listening(agentd_bin, tmp_path)
    yield la
    la.stop()


class EchoServer:
    """A TCP echo server on 127.0.0.1 of this machine (where the agent runs); ``port``; one thread per client."""

    def __init__(self, family: int = 0, path: Optional[str] = None) -> None:
        import socket

        if path is not None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.bind(path)
            self.port = 0
        else:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.port = self.sock.getsockname()[1]
        self.sock.listen(64)
        self.received = 0
        self.clients = 0
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.clients += 1
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    def _echo(self, c: "object") -> None:
        import socket

        assert isinstance(c, socket.socket)
        with c:
            while True:
                try:
                    b = c.recv(65536)
                except OSError:
                    return
                if not b:
                    break
                self.received += len(b)
                try:
                    c.sendall(b)
                except OSError:  # the other side reset (a test's abort())
                    return
            try:
                c.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        import socket

        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    srv = EchoServer()
    yield srv
    srv.close()
