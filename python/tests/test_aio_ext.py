"""The asyncio twins of the extensions: fs, net, forwarder, sessions, clock, and cancellation that leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import pathlib
import socket
import stat
import time
from typing import List

import pytest

import agentd
import agentd._ext
import agentd.aio_ext
from agentd import messages as m
from agentd.aio import AsyncClient

from conftest import EchoServer, Listening

from test_async import arun


def test_async_fs_operations(agentd_bin: str, tmp_path: pathlib.Path) -> None:
    async def go(c: AsyncClient) -> None:
        fs = c.fs
        p = tmp_path / "a"
        data = os.urandom(2_500_000)
        assert await fs.write_bytes(p, data, mode=0o600) == len(data)
        assert await fs.read_bytes(p) == data and await fs.read_bytes(p, offset=5, length=3) == data[5:8]
        st = await fs.stat(p)
        assert (st.size, st.mode, st.type) == (len(data), 0o600, "file")
        await fs.write_text(tmp_path / "t", "héllo")
        assert await fs.read_text(tmp_path / "t") == "héllo"
        await fs.mkdir(tmp_path / "d" / "e", parents=True)
        await fs.mkdir(tmp_path / "d" / "e", parents=True, exist_ok=True)
        assert await fs.is_dir(tmp_path / "d") and await fs.exists(p)
        assert sorted(await fs.listdir(tmp_path)) == ["a", "d", "t"]
        assert sorted([e.name async for e in fs.scandir(tmp_path, stat=True)]) == ["a", "d", "t"]
        await fs.rename(tmp_path / "t", tmp_path / "u")
        await fs.symlink("u", tmp_path / "l")
        assert await fs.readlink(tmp_path / "l") == "u"
        assert await fs.realpath(tmp_path / "l") == str(tmp_path / "u")
        assert (await fs.lstat(tmp_path / "l")).target == "u"
        await fs.chmod(tmp_path / "u", 0o640)
        await fs.utime(tmp_path / "u", ns=(3, 4))
        assert (tmp_path / "u").stat().st_mtime_ns == 4 and stat.S_IMODE((tmp_path / "u").stat().st_mode) == 0o640
        await fs.chown(tmp_path / "u", uid=os.getuid())
        await fs.remove(tmp_path / "l")
        await fs.rmtree(tmp_path / "d")
        assert sorted(os.listdir(tmp_path)) == ["a", "u"]
        with pytest.raises(FileNotFoundError):
            await fs.read_bytes(tmp_path / "missing")
        with pytest.raises(IsADirectoryError):
            await fs.read_bytes(tmp_path)
        with pytest.raises(FileExistsError):
            await fs.mkdir(tmp_path / "u")
        with pytest.raises(agentd.FsNotADirectory):
            await fs.listdir(tmp_path / "u")
        for _ in range(500):  # a read refused by its stat probe is cancelled: its FS_ERROR comes later
            if not c._core.streams:
                break
            await asyncio.sleep(0.01)
        assert not c._core.streams

    arun(go, agentd_bin)


def test_async_open_streams_and_abort(agentd_bin: str, tmp_path: pathlib.Path) -> None:
    async def go(c: AsyncClient) -> None:
        p = tmp_path / "s"
        w = await c.fs.open(p, "wb")
        assert isinstance(w, agentd.aio_ext.AsyncWriter)
        for _ in range(30):
            await w.write(b"y" * 100_000)
        await w.drain()
        done = await w.finish()
        assert done.bytes == 3_000_000 and p.stat().st_size == 3_000_000
        r = await c.fs.open(p, "rb")
        assert isinstance(r, agentd.aio_ext.AsyncReader)
        got = b"".join([chunk async for chunk in r])
        assert got == b"y" * 3_000_000
        with pytest.raises(RuntimeError):
            async with await c.fs.open(tmp_path / "atomic", "wb", atomic=True) as w2:
                assert isinstance(w2, agentd.aio_ext.AsyncWriter)
                await w2.write(b"partial")
                raise RuntimeError("stop")
        while c._core.streams:
            await asyncio.sleep(0.01)
        assert sorted(os.listdir(tmp_path)) == ["s"]
        with pytest.raises(ValueError):
            await c.fs.open(p, "r")

    arun(go, agentd_bin)


def test_async_cancellation_cancels_in_the_guest(agentd_bin: str, tmp_path: pathlib.Path) -> None:
    big = tmp_path / "big"  # a FIFO whose writer never ends: the read cannot finish before it is cancelled
    os.mkfifo(big)
    writer_fd = os.open(big, os.O_RDWR)
    os.write(writer_fd, b"some bytes, then nothing")

    async def go(c: AsyncClient) -> None:
        fs = agentd.aio_ext.AsyncFileSystem(c, window=65536)
        task = asyncio.ensure_future(fs.read_bytes(big))

        def reads() -> List[agentd._ext.ExtStream]:
            return [s for s in c._core.streams.values()  # type: ignore[misc]
                    if isinstance(s, agentd._ext.ExtStream) and getattr(s.request, "op", "") == "read"]

        while not reads():
            await asyncio.sleep(0)
        (st,) = reads()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        while not st.ended:  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)
        assert isinstance(st.final, m.FsError) and st.final.kind == "cancelled"  # type: ignore[attr-defined]
        # A write cancelled in the middle (the guest's reader does not read: the window stalls) is
        # cancelled in the guest: FS_CANCEL stops the worker, FS_ERROR cancelled ends the stream.
        fifo = str(tmp_path / "fifo")
        os.mkfifo(fifo)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            task2 = asyncio.ensure_future(c.fs.write_bytes(fifo, os.urandom(8 * 1024 * 1024)))

            def writes() -> List[agentd._ext.ExtStream]:
                return [s for s in c._core.streams.values()  # type: ignore[misc]
                        if isinstance(s, agentd._ext.ExtStream) and getattr(s.request, "op", "") == "write"]

            while not writes() or writes()[0].credit == writes()[0].credit_max:
                await asyncio.sleep(0.01)
            (wst,) = writes()
            await asyncio.sleep(0.2)
            assert not task2.done()  # stalled: the guest side does not read
            task2.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task2
            while not wst.ended:
                await asyncio.sleep(0.01)
            assert isinstance(wst.final, m.FsError) and wst.final.kind == "cancelled"
        finally:
            os.close(reader)
        while c._core.streams:
            await asyncio.sleep(0.01)
        assert sorted(os.listdir(tmp_path)) == ["big", "fifo"]
        os.unlink(fifo)
        os.unlink(big)
        # A cancelled wait for a watch event loses nothing; the watch goes on.
        async with await c.fs.watch(tmp_path) as watch:
            t3 = asyncio.ensure_future(watch.next_event())
            await asyncio.sleep(0.05)
            t3.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t3
            (tmp_path / "after").touch()
            ev = await watch.next_event(timeout=10)
            assert ev is not None and ev.path == "after" and ev.type == "created"

    try:
        arun(go, agentd_bin)
    finally:
        os.close(writer_fd)


def test_async_upload_download(agentd_bin: str, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "src" / "t"
    (src / "empty").mkdir(parents=True)
    (src / "f").write_bytes(os.urandom(300_000))
    os.chmod(src / "f", 0o751)
    os.symlink("f", src / "l")

    async def go(c: AsyncClient) -> None:
        n, entries = await c.fs.upload(src, tmp_path / "remote")
        assert entries == 4 and n > 300_000
        n2, entries2 = await c.fs.download(tmp_path / "remote" / "t", tmp_path / "back")
        assert entries2 == 4 and n2 > 300_000

    arun(go, agentd_bin)
    for root in (tmp_path / "remote" / "t", tmp_path / "back" / "t"):
        assert sorted(os.listdir(root)) == ["empty", "f", "l"]
        assert (root / "f").read_bytes() == (src / "f").read_bytes()
        assert stat.S_IMODE((root / "f").stat().st_mode) == 0o751 and os.readlink(root / "l") == "f"


def test_async_net_echo_cancel_and_failures(agentd_bin: str) -> None:
    srv = EchoServer()

    async def go(c: AsyncClient) -> None:
        async with await c.connect_tcp(srv.port) as conn:
            assert conn.peer == f"127.0.0.1:{srv.port}"
            pending = asyncio.ensure_future(conn.recv(100))
            await asyncio.sleep(0.05)
            pending.cancel()  # a cancelled recv loses nothing
            with pytest.raises(asyncio.CancelledError):
                await pending
            data = os.urandom(3_000_000)
            sender = asyncio.ensure_future(conn.sendall(data))
            got = await conn.read(len(data))
            await sender
            assert got == data
            conn.shutdown(socket.SHUT_WR)
            assert await conn.read() == b""
            closed = await conn.wait_closed()
            assert closed.error is None
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()
        with pytest.raises(ConnectionRefusedError):
            await c.connect_tcp(port)
        with pytest.raises(TimeoutError):
            full = socket.socket()
            full.bind(("127.0.0.1", 0))
            full.listen(0)
            held = [socket.socket() for _ in range(4)]
            for s in held:
                s.setblocking(False)
                try:
                    s.connect(full.getsockname())
                except BlockingIOError:
                    pass
            try:
                await c.connect_tcp(full.getsockname()[1], timeout=0.3)
            finally:
                for s in held:
                    s.close()
                full.close()
        # A cancelled connect leaves no connection behind.
        full = socket.socket()
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        held = [socket.socket() for _ in range(4)]
        for s in held:
            s.setblocking(False)
            try:
                s.connect(full.getsockname())
            except BlockingIOError:
                pass
        t = asyncio.ensure_future(c.connect_tcp(full.getsockname()[1], timeout=30))
        await asyncio.sleep(0.2)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        while c._core.streams:
            await asyncio.sleep(0.01)
        for s in held:
            s.close()
        full.close()
        with pytest.raises(FileNotFoundError):
            await c.net.connect_unix("/no/such/agentd-test.sock")
        with pytest.raises(FileNotFoundError):
            await c.connect_unix("/no/such/agentd-test.sock")  # on a client: the guest's socket

    try:
        arun(go, agentd_bin)
    finally:
        srv.close()


def test_async_forwarder(agentd_bin: str) -> None:
    srv = EchoServer()

    async def go(c: AsyncClient) -> None:
        fw = await c.forward(0, srv.port)

        async def one(i: int) -> bytes:
            r, w = await asyncio.open_connection("127.0.0.1", fw.port)
            data = (b"%d;" % i) * 30000
            w.write(data)
            await w.drain()
            w.write_eof()
            got = await r.read()
            w.close()
            return got if got == data else b"MISMATCH"

        results = await asyncio.gather(*(one(i) for i in range(6)))
        assert b"MISMATCH" not in results and fw.accepted == 6
        r, w = await asyncio.open_connection("127.0.0.1", fw.port)
        w.write(b"x")
        assert await r.read(1) == b"x"
        await fw.stop()
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", fw.port)
        while c._core.streams:
            await asyncio.sleep(0.01)

    try:
        arun(go, agentd_bin)
    finally:
        srv.close()


def test_async_sessions_and_clock(agentd_bin: str, tmp_path: pathlib.Path) -> None:
    la = Listening(agentd_bin, tmp_path)

    async def go() -> None:
        a = await AsyncClient.connect_unix(la.path)
        p = await a.popen(["sh", "-c", "echo hi; sleep 30"], stdin=agentd.DEVNULL, tag="aio-job")
        assert p.stdout is not None and await p.stdout.readline() == b"hi\n"
        number = p.session
        await a.aclose()
        b = await AsyncClient.connect_unix(la.path)
        infos = await b.sessions()
        (info,) = [i for i in infos if i.tag == "aio-job"]
        assert info.session == number and not info.attached
        q = await b.attach("aio-job")
        assert q.session == number and q.attached is not None
        assert q.stdout is not None and await q.stdout.readline() == b"hi\n"
        d = await q.detach()
        assert d.reason == "detach"
        with pytest.raises(agentd.AttachFailed):
            await b.attach("no-such-aio-tag")
        r = await b.attach(number)  # type: ignore[arg-type]
        await r.kill()
        assert await r.wait() == -9
        before = time.time_ns()
        clk = await b.clock()
        assert abs(clk.realtime_ns - before) < 2 * 10**9 and clk.restores == 0
        with pytest.raises(agentd.NotPermitted):
            await b.sync_clock()
        with pytest.raises(agentd.NotPermitted):
            await b.add_entropy()
        await b.aclose()

    try:
        asyncio.run(go())
    finally:
        la.stop()


def test_async_watch_iteration(agentd_bin: str, tmp_path: pathlib.Path) -> None:
    async def go(c: AsyncClient) -> List[str]:
        seen: List[str] = []
        async with await c.fs.watch(tmp_path, recursive=True) as w:
            (tmp_path / "one").touch()
            async for ev in w:
                seen.append(f"{ev.type}:{ev.path}")
                if ev.type == "created":
                    break
        return seen

    assert arun(go, agentd_bin)[0] == "created:one"


def test_async_deadline_tree_and_detached(agentd_bin: str, tmp_path: pathlib.Path) -> None:
    la = Listening(agentd_bin, tmp_path)

    async def go() -> None:
        c = await AsyncClient.connect_unix(la.path)
        r = await c.run(["sleep", "30"], deadline=0.2)
        assert r.timed_out and r.returncode == -15
        st = await c.spawn_detached(["sleep", "30"], tag="aio-bg")
        assert st.session is not None and not c._core.streams
        q = await c.attach("aio-bg")
        if not c.ready.cgroups:
            with pytest.raises(agentd.Unsupported):
                await q.send_signal(9, tree=True)
        await q.kill()
        assert await q.wait() == -9
        await c.aclose()

    try:
        asyncio.run(go())
    finally:
        la.stop()
