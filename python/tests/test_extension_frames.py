"""The extension point and the extension message classes against a real agent, where its READY serves them.

These tests drive the extensions' frames through the generic
:class:`agentd._core.Stream` (one id space per connection), below the
extension APIs (``client.fs``, ``client.connect_tcp``, ``client.sessions``;
see test_fs.py, test_net.py, test_sessions_clock.py), and check that the
codec decodes what the agent actually sends.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, List, Optional, Tuple, Type

import pytest

import agentd
from agentd import messages as m
from agentd._core import Stream, Waiters

FINAL: Tuple[Type[Any], ...] = (m.FsDone, m.FsError, m.NetFailed, m.NetClosed, m.AttachFailed, m.Detached)


class Recorder(Stream):
    """A stream that keeps every frame of its id, released at its final frame."""

    def __init__(self, client: agentd.Client) -> None:
        self.client = client
        self.waiters: Waiters = client._core.new_waiters()
        self.items: List[Any] = []
        self.done = False

    def _final(self) -> None:
        self.done = True
        self.client._core.release(self)

    def on_message(self, msg: m.Message) -> None:
        self.items.append(msg)
        if isinstance(msg, FINAL) or (isinstance(msg, m.Sessions) and not msg.more):
            self._final()
        self.waiters.wake()

    def on_raw(self, kind: int, payload: memoryview) -> None:
        self.items.append((kind, bytes(payload)))
        self.waiters.wake()

    def on_error(self, err: agentd.ProtocolError) -> None:
        self.items.append(err)
        self._final()
        self.waiters.wake()

    def send(self, msg: m.Message) -> None:
        with self.client._lock:
            self.client._core.send(self.id, msg)
        self.client._flush_now()

    def wait_for(self, cond: Any, timeout: float = 10.0) -> None:
        self.client._wait(self.waiters, lambda: True if cond() else None, time.monotonic() + timeout)


def open_stream(client: agentd.Client, first: m.Message) -> Recorder:
    rec = Recorder(client)
    with client._lock:
        client._core.register(rec)
        client._core.send(rec.id, first)
    client._flush_now()
    return rec


def need(client: agentd.Client, feature: str) -> None:
    if not client.has_feature(feature):
        pytest.skip(f"the agent does not serve {feature!r}")


def test_fs_stat_read_list_and_errors(client: agentd.Client, tmp_path: Any) -> None:
    need(client, "fs")
    rec = open_stream(client, m.FsRequest(op="stat", path="/"))
    rec.wait_for(lambda: rec.done)
    (done,) = rec.items
    assert isinstance(done, m.FsDone) and done.stat is not None and done.stat.type == "dir"

    path = os.path.join(os.fspath(tmp_path), "f.txt")
    with open(path, "wb") as f:
        f.write(b"hello")
    rec = open_stream(client, m.FsRequest(op="read", path=path))
    rec.wait_for(lambda: rec.done)
    opened, data, done = rec.items
    assert isinstance(opened, m.FsOpened) and opened.stat is not None and opened.stat.size == 5
    assert data == (int(agentd.Kind.FS_DATA), b"hello")
    assert isinstance(done, m.FsDone) and done.bytes == 5

    rec = open_stream(client, m.FsRequest(op="list", path=os.fspath(tmp_path), stat=True))
    rec.wait_for(lambda: rec.done)
    entries = [e for it in rec.items if isinstance(it, m.FsEntries) for e in it.entries]
    assert [(e.name, e.type, e.stat.size if e.stat else None) for e in entries] == [("f.txt", "file", 5)]
    assert isinstance(rec.items[-1], m.FsDone) and rec.items[-1].entries == 1

    rec = open_stream(client, m.FsRequest(op="stat", path="/no/such/file"))
    rec.wait_for(lambda: rec.done)
    (err,) = rec.items
    assert isinstance(err, m.FsError) and err.kind == "not_found"
    assert not client._core.streams


def test_fs_write_within_the_window(client: agentd.Client, tmp_path: Any) -> None:
    need(client, "fs")
    path = os.path.join(os.fspath(tmp_path), "w.bin")
    data = os.urandom(client.ready.stdin_window // 2)
    rec = open_stream(client, m.FsRequest(op="write", path=path, atomic=True))
    rec.send(m.FsWrite(data))
    rec.send(m.FsEnd())
    rec.wait_for(lambda: rec.done)
    # docs/PROTOCOL.md lists FS_OPENED before the FS_WRITE_ACKs of a write; this agent may
    # acknowledge data queued behind FS_REQUEST first, so only membership is checked here.
    assert any(isinstance(i, m.FsOpened) for i in rec.items), [type(i).__name__ for i in rec.items]
    assert sum(a.bytes for a in rec.items if isinstance(a, m.FsWriteAck)) == len(data)
    assert isinstance(rec.items[-1], m.FsDone) and rec.items[-1].bytes == len(data)
    with open(path, "rb") as f:
        assert f.read() == data


def test_sessions_list(client: agentd.Client) -> None:
    need(client, "sessions")
    p = client.popen(["sleep", "30"], stdin=agentd.DEVNULL)
    assert p._s.started is not None and p._s.started.session is not None  # STARTED carries the number
    rec = open_stream(client, m.ListSessions())
    rec.wait_for(lambda: rec.done)
    infos = [i for it in rec.items if isinstance(it, m.Sessions) for i in it.sessions]
    (mine,) = [i for i in infos if i.pid == p.pid]
    assert (mine.cmd, mine.args, mine.id, mine.state, mine.attached) == ("sleep", ["30"], p.id, "running", True)
    assert mine.session == p._s.started.session
    p.kill()
    p.wait()


def test_net_tcp_round_trip(client: agentd.Client) -> None:
    need(client, "net")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    got: List[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        got.append(conn.recv(100))
        conn.sendall(b"pong")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    rec = open_stream(client, m.NetConnect(host="127.0.0.1", port=port))
    rec.wait_for(lambda: any(isinstance(i, m.NetConnected) for i in rec.items))
    rec.send(m.NetSend(b"ping"))
    rec.wait_for(lambda: any(isinstance(i, m.NetEof) for i in rec.items))
    assert b"".join(d for k, d in (i for i in rec.items if isinstance(i, tuple))) == b"pong"
    rec.send(m.NetClose(reset=False))
    rec.wait_for(lambda: rec.done)
    assert isinstance(rec.items[-1], m.NetClosed)
    t.join(5)
    srv.close()
    assert got == [b"ping"]
    connected: Optional[m.NetConnected] = next(i for i in rec.items if isinstance(i, m.NetConnected))
    assert connected is not None and connected.peer == f"127.0.0.1:{port}"
