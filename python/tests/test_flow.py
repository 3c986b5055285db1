"""Flow control both ways: output windows block the remote process, stdin never exceeds its window, memory stays bounded."""

from __future__ import annotations

import threading
import time

import pytest

import agentd

from conftest import RssSampler, pid_alive, proc_wchar, wait_until

GiB = 1 << 30


def stalled(pid: int, settle: float = 0.3) -> bool:
    """Whether the process wrote nothing for ``settle`` seconds (it is blocked in write())."""
    a = proc_wchar(pid)
    time.sleep(settle)
    return proc_wchar(pid) == a


def test_unread_output_blocks_the_remote_process(client: agentd.Client) -> None:
    window = 65536
    with RssSampler() as rss:
        p = client.popen(["yes"], output_window=window)
        assert p.pid is not None
        time.sleep(0.5)
        assert wait_until(lambda: stalled(p.pid), 5), "yes kept writing although nobody read"  # type: ignore[arg-type]
        assert p._s.buffered <= window
        assert pid_alive(p.pid)
        before = proc_wchar(p.pid)
        got = 0
        while got < 10 << 20:  # reading resumes it
            got += len(p.stdout.read1())
        assert proc_wchar(p.pid) > before
        assert wait_until(lambda: stalled(p.pid), 5)  # type: ignore[arg-type]
        p.kill()
        assert p.wait() == -9
    assert rss.peak_growth < 32 << 20, rss.peak_growth


def test_default_window_bounds_what_waits_in_python(client: agentd.Client) -> None:
    p = client.popen(["yes"])
    time.sleep(0.5)
    assert wait_until(lambda: stalled(p.pid), 5)  # type: ignore[arg-type]
    assert 0 < p._s.buffered <= agentd.DEFAULT_OUTPUT_WINDOW
    p.kill()
    p.wait()


def test_stderr_counts_against_the_same_window(client: agentd.Client) -> None:
    p = client.popen(["sh", "-c", "yes >&2"], output_window=100000)
    time.sleep(0.3)
    assert wait_until(lambda: p._s.buffered > 0)
    time.sleep(0.3)
    assert p._s.buffered <= 100000
    assert len(p.stderr.read(200000)) == 200000
    p.kill()
    p.wait()


def test_tiny_windows_still_complete(client: agentd.Client) -> None:
    r = client.run(["head", "-c", "3000000", "/dev/zero"], output_window=1000)
    assert len(r.stdout) == 3_000_000
    r = client.run(["head", "-c", "3000", "/dev/zero"], output_window=1)  # one byte per frame
    assert len(r.stdout) == 3000
    r = client.run(["head", "-c", "3000000", "/dev/zero"], output_window=0)  # unlimited
    assert len(r.stdout) == 3_000_000


def test_writer_blocks_on_the_stdin_window(client: agentd.Client) -> None:
    window = client.ready.stdin_window
    p = client.popen(["sleep", "300"])  # never reads stdin
    done = threading.Event()
    failure = []

    def write() -> None:
        try:
            p.stdin.write(b"x" * (20 << 20))
        except agentd.SessionEnded as e:
            failure.append(e)
        done.set()

    t = threading.Thread(target=write, daemon=True)
    t.start()
    assert not done.wait(1.0), "20 MiB went to a process that reads nothing"
    assert p._s.stdin_credit == 0  # all of the window is in flight, none beyond it
    assert p.errors == [] and client.take_errors() == []
    p.kill()
    assert done.wait(5)
    assert failure and isinstance(failure[0], BrokenPipeError)
    assert window > 0


def test_one_gib_of_stdout_with_bounded_memory(client: agentd.Client) -> None:
    with RssSampler() as rss:
        p = client.popen(["head", "-c", str(GiB), "/dev/zero"], stdin=agentd.DEVNULL, stderr=agentd.DEVNULL)
        total = 0
        for chunk in p.stdout.iter_chunks():
            total += len(chunk)
        assert p.wait() == 0
    assert total == GiB
    assert rss.peak_growth < 64 << 20, f"RSS grew by {rss.peak_growth >> 20} MiB"


@pytest.mark.parametrize("window", [65536, 4 << 20])
def test_large_streams_by_hash(client: agentd.Client, window: int) -> None:
    import hashlib

    # The same random bytes on both streams, interleaved as they arrive.
    p = client.popen(["sh", "-c", "head -c 20000000 /dev/urandom | tee /dev/stderr"],
                     output_window=window, stdin=agentd.DEVNULL)
    hashes = {1: hashlib.sha256(), 2: hashlib.sha256()}
    sizes = {1: 0, 2: 0}
    for chunk in p:
        hashes[chunk.fd].update(chunk.data)
        sizes[chunk.fd] += len(chunk.data)
    assert p.returncode == 0
    assert sizes == {1: 20_000_000, 2: 20_000_000}
    assert hashes[1].hexdigest() == hashes[2].hexdigest()
