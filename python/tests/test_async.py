"""The asyncio client: the same operations, concurrency, and cancellation that leaves no stuck session."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any, Awaitable, Callable, TypeVar

import pytest

import agentd
from agentd.aio import AsyncClient

from conftest import RssSampler, pid_alive, proc_wchar, wait_until

T = TypeVar("T")


def arun(fn: Callable[[AsyncClient], Awaitable[T]], agentd_bin: str, *args: str) -> T:
    async def main() -> T:
        async with await AsyncClient.spawn(agentd_bin, list(args)) as c:
            return await fn(c)

    return asyncio.run(main())


def test_async_run_and_ready(agentd_bin: str) -> None:
    async def go(c: AsyncClient) -> None:
        assert c.ready.protocol == 1 and c.features == frozenset(c.ready.features)
        r = await c.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
        r = await c.run(["cat"], input=b"x" * 3_000_000)
        assert len(r.stdout) == 3_000_000
        assert (await c.run(["cat"], input="é", text=True)).stdout == "é"
        with pytest.raises(agentd.CalledProcessError):
            await c.run(["false"], check=True)
        with pytest.raises(agentd.ExecFailed) as e:
            await c.run(["no-such-program-xyz"])
        assert e.value.kind == "not_found"
        assert 0 < await c.ping() < 5

    arun(go, agentd_bin)


def test_async_popen_streams_and_signals(agentd_bin: str) -> None:
    async def go(c: AsyncClient) -> None:
        p = await c.popen(["cat"])
        assert p.stdin is not None and p.stdout is not None
        await p.stdin.write(b"line1\nline2\npartial")
        p.stdin.close()
        assert await p.stdout.readline() == b"line1\n"
        assert [line async for line in p.stdout] == [b"line2\n", b"partial"]
        assert await p.wait() == 0
        assert p.stdout.at_eof()

        p = await c.popen(["sh", "-c", "echo 1; sleep 0.05; echo 2 >&2"], stdin=agentd.DEVNULL)
        assert [(x.stream, x.data) async for x in p] == [("stdout", b"1\n"), ("stderr", b"2\n")]

        p = await c.popen(["sleep", "30"], stdin=agentd.DEVNULL)
        with pytest.raises(agentd.ProtocolError) as e:
            await p.resize(1, 1)
        assert e.value.kind == "not_a_tty"
        with pytest.raises(agentd.ProtocolError) as e:
            await p.send_signal(99)
        assert e.value.kind == "invalid_signal"
        await p.send_signal(signal.SIGTERM)
        assert await p.wait() == -15

        p = await c.popen(["sh"], tty=True, rows=20, cols=70)
        await p.resize(33, 99)
        assert p.stdin is not None and p.stdout is not None
        await p.stdin.write(b"stty size; exit\n")
        out = b"".join([ch async for ch in p.stdout.iter_chunks()])
        assert b"33 99" in out and await p.wait() == 0

        p = await c.popen(["sh", "-c", "cat; echo done >&2"])
        assert await p.communicate(b"abc") == (b"abc", b"done\n")

    arun(go, agentd_bin)


def test_async_timeout_kills_the_group(agentd_bin: str) -> None:
    async def go(c: AsyncClient) -> None:
        with pytest.raises(agentd.TimeoutExpired) as e:
            await c.run(["sh", "-c", "sleep 300 & echo $!; sleep 300"], timeout=0.5)
        bg = int(e.value.stdout.split()[0])
        assert wait_until(lambda: not pid_alive(bg))
        p = await c.popen(["sleep", "300"], stdin=agentd.DEVNULL)
        with pytest.raises(agentd.TimeoutExpired):
            await p.wait(timeout=0.1)
        await p.kill()
        assert await p.wait() == -9

    arun(go, agentd_bin)


def test_async_100_concurrent_sessions(agentd_bin: str) -> None:
    async def go(c: AsyncClient) -> None:
        rs = await asyncio.gather(*[c.run(["sh", "-c", f"sleep 0.2; echo {i}"]) for i in range(100)])
        assert [r.stdout for r in rs] == [f"{i}\n".encode() for i in range(100)]
        assert not c._core.streams

    t0 = time.monotonic()
    arun(go, agentd_bin)
    assert time.monotonic() - t0 < 20


def test_cancelled_run_kills_and_leaves_nothing_stuck(agentd_bin: str) -> None:
    async def go(c: AsyncClient) -> None:
        # A flood behind a small window: the cancelled task no longer reads it.
        task = asyncio.ensure_future(c.run(["sh", "-c", "echo $$ >&2; exec yes"], output_window=65536))
        await asyncio.sleep(0.3)
        (s,) = list(c._core.streams.values())
        pid = s.pid  # type: ignore[attr-defined]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):  # EXITED comes: the session was killed and its output acknowledged
            if not c._core.streams:
                break
            await asyncio.sleep(0.02)
        assert not c._core.streams, "the cancelled session is stuck"
        assert s.state == "exited" and s.exited.signal == 9  # type: ignore[attr-defined]
        assert not pid_alive(pid)
        assert (await c.run(["echo", "still fine"])).stdout == b"still fine\n"

    arun(go, agentd_bin)


def test_cancelled_popen_is_killed_once_started(agentd_bin: str) -> None:
    async def go(c: AsyncClient) -> None:
        task = asyncio.ensure_future(c.popen(["sleep", "300"]))
        await asyncio.sleep(0)  # EXEC is out, STARTED not yet in
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if not c._core.streams:
                break
            await asyncio.sleep(0.02)
        assert not c._core.streams

    arun(go, agentd_bin)


def test_cancelled_communicate_keeps_the_window_moving(agentd_bin: str) -> None:
    async def go(c: AsyncClient) -> None:
        p = await c.popen(["yes"], output_window=65536)
        task = asyncio.ensure_future(p.communicate())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert p.pid is not None
        a = proc_wchar(p.pid)
        await asyncio.sleep(0.3)
        assert proc_wchar(p.pid) > a, "output is no longer acknowledged: the process stalls"
        await p.kill()
        assert await p.wait() == -9

    arun(go, agentd_bin)


def test_cancelled_wait_and_read_lose_nothing(agentd_bin: str) -> None:
    async def go(c: AsyncClient) -> None:
        p = await c.popen(["sh", "-c", "sleep 0.3; echo late"], stdin=agentd.DEVNULL)
        assert p.stdout is not None
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(p.stdout.read(), 0.05)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(p.wait(), 0.05)
        assert await p.stdout.read() == b"late\n"
        assert await p.wait() == 0

    arun(go, agentd_bin)


def test_async_exception_in_process_context_kills(agentd_bin: str) -> None:
    async def go(c: AsyncClient) -> None:
        with pytest.raises(RuntimeError):
            async with await c.popen(["sleep", "300"]) as p:
                raise RuntimeError("boom")
        assert await p.wait() == -9

    arun(go, agentd_bin)


def test_async_one_gib_bounded(agentd_bin: str) -> None:
    async def go(c: AsyncClient) -> int:
        p = await c.popen(["head", "-c", str(1 << 30), "/dev/zero"], stdin=agentd.DEVNULL)
        assert p.stdout is not None
        n = 0
        async for chunk in p.stdout.iter_chunks():
            n += len(chunk)
        assert await p.wait() == 0
        return n

    with RssSampler() as rss:
        assert arun(go, agentd_bin) == 1 << 30
    assert rss.peak_growth < 64 << 20


def test_async_shutdown_and_transport_closed(agentd_bin: str) -> None:
    async def go(c: AsyncClient) -> None:
        p = await c.popen(["sleep", "300"], stdin=agentd.DEVNULL)
        await c.shutdown(grace=0.2)
        assert p.returncode == -15 and c.closed
        with pytest.raises(agentd.TransportClosed):
            await c.ping()

    arun(go, agentd_bin)

    async def go2(c: AsyncClient) -> None:
        p = await c.popen(["sleep", "300"], stdin=agentd.DEVNULL)
        c.transport.process.kill()  # type: ignore[union-attr]
        with pytest.raises(agentd.TransportClosed):
            await p.wait()

    arun(go2, agentd_bin)


def test_async_errors_and_raw_frames(agentd_bin: str) -> None:
    async def go(c: AsyncClient) -> None:
        c.send_frame(0x7F, 1, b"")
        c.send_bytes(b"\x00\x00\x00\x01x")
        await c.ping()
        assert [e.kind for e in c.take_errors()] == ["unknown_kind", "malformed_frame"]

    arun(go, agentd_bin)


def test_async_other_transports(agentd_bin: str, tmp_path: Any) -> None:
    import subprocess

    base = os.path.join(os.fspath(tmp_path), "port")
    os.mkfifo(base + ".in")
    os.mkfifo(base + ".out")
    agent = subprocess.Popen([agentd_bin, "--port", base])

    async def main() -> None:
        async with await AsyncClient.open_port(base) as c:
            assert (await c.run(["echo", "fifo"])).stdout == b"fifo\n"

    asyncio.run(main())
    assert agent.wait(5) == 0
