"""The sync client against the real agentd: every operation."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import agentd
from agentd import messages as m

from conftest import is_root, pid_alive, wait_until


def test_ready(client: agentd.Client) -> None:
    r = client.ready
    assert r.protocol == 1
    assert r.agent.startswith("agentd/")
    assert r.max_payload == 1_048_576
    assert r.stdin_window > 0 and r.max_sessions > 0
    assert r.pid == client.transport.process.pid  # type: ignore[union-attr]
    assert r.pid1 is False
    assert client.features == frozenset(r.features)
    assert client.features <= {"fs", "net", "sessions", "clock"}
    for f in ("fs", "net", "sessions", "clock"):
        assert client.has_feature(f) == (f in r.features)
    with pytest.raises(agentd.FeatureNotServed, match="'no-such-extension'"):
        client.require_feature("no-such-extension")


def test_run_captures_and_reports(client: agentd.Client) -> None:
    r = client.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.returncode, r.stdout, r.stderr, r.signal, r.status) == (3, b"out\n", b"err\n", None, 3)
    assert isinstance(r, subprocess.CompletedProcess)
    r = client.run(["uname", "-a"], check=True, timeout=10)
    assert r.returncode == 0 and r.stdout.startswith(b"Linux")


def test_run_signal_death(client: agentd.Client) -> None:
    r = client.run(["sh", "-c", "kill -KILL $$"])
    assert (r.returncode, r.signal, r.status, r.core_dumped) == (-9, 9, 137, False)


def test_check_raises_called_process_error(client: agentd.Client) -> None:
    with pytest.raises(agentd.CalledProcessError) as e:
        client.run(["sh", "-c", "echo partial; exit 7"], check=True)
    assert isinstance(e.value, subprocess.CalledProcessError)
    assert (e.value.returncode, e.value.stdout, e.value.status) == (7, b"partial\n", 7)
    assert "exited with status 7" in str(e.value)
    with pytest.raises(agentd.CalledProcessError, match="signal 15"):
        client.run(["sh", "-c", "kill $$"], check=True)


def test_timeout_kills_the_process_group(client: agentd.Client) -> None:
    t0 = time.monotonic()
    with pytest.raises(agentd.TimeoutExpired) as e:
        client.run(["sh", "-c", "sleep 300 & echo $!; sleep 300"], timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert isinstance(e.value, subprocess.TimeoutExpired)
    assert e.value.timeout == 0.5
    assert e.value.stdout is not None
    bg = int(e.value.stdout.split()[0])
    assert wait_until(lambda: not pid_alive(bg)), "the background sleep of the group survived"
    assert client.run(["true"]).returncode == 0  # the connection goes on
    assert not client._core.streams


def test_input_text_env_cwd(client: agentd.Client) -> None:
    assert client.run(["cat"], input=b"abc").stdout == b"abc"
    r = client.run(["cat"], input="héllo", text=True)
    assert r.stdout == "héllo" and r.stderr == ""
    r = client.run(["sh", "-c", "echo $FOO-$HOME"], env={"FOO": "bar"})
    assert r.stdout.startswith(b"bar-")
    r = client.run(["/usr/bin/env"], clear_env=True, env=["ONLY=1"])
    assert r.stdout == b"ONLY=1\n"
    assert client.run(["pwd"], cwd="/tmp").stdout == b"/tmp\n"
    assert client.run("echo $((6*7))", shell=True).stdout == b"42\n"
    assert client.run("true").returncode == 0  # a str is the program


def test_rlimits_and_no_new_privs(client: agentd.Client) -> None:
    r = client.run(["sh", "-c", "ulimit -n; ulimit -c"], rlimits={"nofile": 64, "core": (0, agentd.RLIM_INFINITY)})
    assert r.stdout.split() == [b"64", b"0"]
    r = client.run(["grep", "NoNewPrivs", "/proc/self/status"], no_new_privs=True)
    assert r.stdout.split()[-1] == b"1"
    with pytest.raises(ValueError, match="unknown rlimit"):
        client.run(["true"], rlimits={"bogus": 1})


@pytest.mark.skipif(not is_root(), reason="switching users needs root")
def test_user(client: agentd.Client) -> None:
    assert client.run(["id", "-u"], user="nobody").stdout.strip() == b"65534"
    assert client.run(["id", "-u"], user=1234).stdout.strip() == b"1234"
    assert client.run(["id", "-g"], user="1234:4321").stdout.strip() == b"4321"


def test_stdout_to_file_devnull_and_merge(client: agentd.Client, tmp_path: "os.PathLike[str]") -> None:
    buf = io.BytesIO()
    r = client.run(["sh", "-c", "echo a; echo b >&2"], stdout=buf, stderr=agentd.DEVNULL)
    assert (r.stdout, r.stderr, buf.getvalue()) == (None, None, b"a\n")
    r = client.run(["sh", "-c", "echo a; sleep 0.05; echo b >&2; sleep 0.05; echo c"], stderr=agentd.STDOUT)
    assert r.stdout == b"a\nb\nc\n" and r.stderr is None
    path = os.path.join(os.fspath(tmp_path), "out")
    with open(path, "wb") as f:
        client.run(["head", "-c", "3000000", "/dev/zero"], stdout=f)
    assert os.path.getsize(path) == 3_000_000


def test_large_output_and_input_checked_by_hash(client: agentd.Client) -> None:
    data = os.urandom(20 << 20)
    r = client.run(["sha256sum"], input=data)
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    r = client.run(["cat"], input=data)
    assert r.stdout == data
    assert client.take_errors() == []


def test_stdin_window_is_respected(spawn) -> None:  # type: ignore[no-untyped-def]
    c = spawn("--stdin-window", "1000")
    assert c.ready.stdin_window == 1000
    data = os.urandom(1 << 20)
    with c.popen(["cat"]) as p:
        got = []
        t = threading.Thread(target=lambda: got.append(p.stdout.read()))
        t.start()
        p.stdin.write(data)
        p.stdin.close()
        t.join()
        assert got[0] == data
        assert p.wait() == 0
        assert p.errors == []
    assert c.take_errors() == []


def test_popen_streams(client: agentd.Client) -> None:
    p = client.popen(["cat"])
    assert p.pid is not None and pid_alive(p.pid)
    assert p.returncode is None and p.poll() is None
    p.stdin.write(b"one\ntwo\n")
    assert p.stdout.readline() == b"one\n"
    p.stdin.write(b"three")
    p.stdin.close()
    assert list(p.stdout) == [b"two\n", b"three"]
    assert p.wait() == 0 and p.returncode == 0
    assert p.stdout.read() == b""
    with pytest.raises(agentd.SessionEnded):
        p.stdin._proc._s.push_stdin(memoryview(b"x"), 0)


def test_popen_text_mode(client: agentd.Client) -> None:
    with client.popen(["cat"], text=True) as p:
        p.stdin.write("héllo\nwörld\n")
        p.stdin.close()
        assert p.stdout.readline() == "héllo\n"
        assert p.stdout.read() == "wörld\n"
    assert p.returncode == 0


def test_iter_output_keeps_arrival_order(client: agentd.Client) -> None:
    p = client.popen(["sh", "-c", "echo 1; sleep 0.05; echo 2 >&2; sleep 0.05; echo 3"], stdin=agentd.DEVNULL)
    chunks = [(c.stream, c.data) for c in p]
    assert chunks == [("stdout", b"1\n"), ("stderr", b"2\n"), ("stdout", b"3\n")]
    assert p.returncode == 0


def test_communicate(client: agentd.Client) -> None:
    p = client.popen(["sh", "-c", "cat; echo done >&2"])
    out, err = p.communicate(b"x" * 1_000_000)
    assert (len(out), err, p.returncode) == (1_000_000, b"done\n", 0)
    p = client.popen(["sleep", "10"])
    with pytest.raises(agentd.TimeoutExpired):
        p.communicate(timeout=0.2)
    p.kill()
    assert p.communicate() == (b"", b"") and p.returncode == -9


def test_wait_timeout_leaves_it_running(client: agentd.Client) -> None:
    p = client.popen(["sleep", "10"], stdin=agentd.DEVNULL)
    with pytest.raises(agentd.TimeoutExpired):
        p.wait(timeout=0.1)
    assert p.poll() is None
    p.terminate()
    assert p.wait() == -15 and p.signal == 15 and p.status == 143


def test_signal_group_or_process(client: agentd.Client) -> None:
    p = client.popen(["sh", "-c", "sleep 300 & echo $!; wait"], stdin=agentd.DEVNULL)
    bg = int(p.stdout.readline())
    p.send_signal(signal.SIGKILL, group=False)  # the shell alone
    assert p.wait() == -9
    time.sleep(0.1)
    assert pid_alive(bg), "group=False must spare the rest of the group"
    os.kill(bg, signal.SIGKILL)
    p = client.popen(["sh", "-c", "sleep 300 & echo $!; wait"], stdin=agentd.DEVNULL)
    bg = int(p.stdout.readline())
    p.kill()
    assert p.wait() == -9
    assert wait_until(lambda: not pid_alive(bg))
    p.send_signal(signal.SIGTERM)  # after the exit: nothing happens, like subprocess


def test_signal_zero_probe(client: agentd.Client) -> None:
    with client.popen(["sleep", "5"], stdin=agentd.DEVNULL) as p:
        p.send_signal(0)
        assert p.poll() is None
        p.kill()


def test_tty_session(client: agentd.Client) -> None:
    r = client.run(["sh", "-c", "tty; stty size; echo $TERM; echo err >&2"], tty=True, rows=50, cols=132)
    lines = r.stdout.replace(b"\r", b"").split(b"\n")
    assert lines[0].startswith(b"/dev/pts/")
    assert lines[1] == b"50 132"
    assert lines[2] == os.environ.get("TERM", "xterm-256color").encode()  # the agent's base env has ours
    assert lines[3] == b"err"  # a tty has no separate stderr
    assert r.stderr is None


def test_tty_resize_and_input(client: agentd.Client) -> None:
    p = client.popen(["sh"], tty=True, rows=24, cols=80)
    assert p.stderr is None and p.tty
    p.resize(30, 100)
    p.stdin.write(b"stty size; exit 4\n")
    out = b""
    for chunk in p.stdout.iter_chunks():
        out += chunk
    assert b"30 100" in out
    assert p.wait() == 4


def test_tty_stdin_close_is_end_of_file(client: agentd.Client) -> None:
    p = client.popen(["cat"], tty=True)
    p.stdin.write(b"abc")
    p.stdin.close()  # the EOF character (twice, as the last byte is not a newline)
    assert p.wait(timeout=5) == 0


def test_ping(client: agentd.Client) -> None:
    rtt = client.ping()
    assert 0 < rtt < 5
    assert client.ping(b"x" * 4096) > 0
    with pytest.raises(ValueError):
        client.ping(b"x" * 4097)
    results = []
    threads = [threading.Thread(target=lambda: results.append(client.ping())) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20


def test_shutdown(client: agentd.Client) -> None:
    p = client.popen(["sleep", "300"], stdin=agentd.DEVNULL)
    t = client.popen(["sh", "-c", "trap '' TERM; sleep 300"], stdin=agentd.DEVNULL)
    time.sleep(0.1)
    client.shutdown(grace=0.3)
    assert p.returncode == -15
    assert t.returncode == -9  # ignored SIGTERM, got SIGKILL after the grace
    assert client.closed
    assert client.transport.process.wait(5) == 0  # type: ignore[union-attr]
    with pytest.raises(agentd.TransportClosed):
        client.run(["true"])


def test_transport_closed_wakes_every_waiter(client: agentd.Client) -> None:
    p = client.popen(["sleep", "300"])
    errors = []

    def waiter(fn):  # type: ignore[no-untyped-def]
        try:
            fn()
        except agentd.TransportClosed as e:
            errors.append(e)

    threads = [threading.Thread(target=waiter, args=(f,)) for f in (p.wait, p.stdout.read, p.stderr.read)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    client.transport.process.kill()  # type: ignore[union-attr]
    for t in threads:
        t.join(5)
    assert len(errors) == 3
    assert "connect a new Client" in str(errors[0])
    with pytest.raises(agentd.TransportClosed):
        client.ping()
    with pytest.raises(agentd.TransportClosed):
        p.stdin.write(b"x")


def test_close_kills_sessions(agentd_bin: str) -> None:
    c = agentd.Client.spawn(agentd_bin)
    p = c.popen(["sleep", "300"], stdin=agentd.DEVNULL)
    pid = p.pid
    assert pid is not None
    c.close()
    assert wait_until(lambda: not pid_alive(pid))
    assert c.closed


def test_duplicate_id_is_retried(client: agentd.Client) -> None:
    # A session that is live on the agent but not this client's (as an earlier
    # host's on a device port would be): EXEC on its id gets duplicate_id.
    foreign = 4242
    client.send_frame(int(agentd.Kind.EXEC), foreign, m.Exec(cmd="sleep", args=["300"]).encode_payload())
    time.sleep(0.1)
    client._core.ids._next = foreign  # the next id the client picks is the live one
    p = client.popen(["echo", "retried"], stdin=agentd.DEVNULL)
    assert p.id != foreign
    assert p.stdout.read() == b"retried\n" and p.wait() == 0
    assert foreign in client._core.foreign
    client.send_frame(int(agentd.Kind.SIGNAL), foreign, m.Signal(9).encode_payload())
    assert wait_until(lambda: foreign not in client._core.foreign)


def test_many_concurrent_sessions_threads(client: agentd.Client) -> None:
    def one(i: int) -> bytes:
        return client.run(["sh", "-c", f"sleep 0.2; echo {i}"], check=True).stdout  # type: ignore[no-any-return]

    with ThreadPoolExecutor(100) as ex:
        outs = list(ex.map(one, range(100)))
    assert outs == [f"{i}\n".encode() for i in range(100)]


def test_many_concurrent_sessions_one_thread(client: agentd.Client) -> None:
    procs = [client.popen(["sh", "-c", f"head -c 100000 /dev/zero; sleep 0.2; echo {i}"]) for i in range(100)]
    assert len({p.id for p in procs}) == 100
    for i, p in enumerate(procs):
        out, err = p.communicate()
        assert len(out) == 100003 + len(str(i)) - 2 and out.endswith(f"{i}\n".encode())
        assert p.returncode == 0
    assert not client._core.streams


def test_process_context_manager(client: agentd.Client) -> None:
    with client.popen(["sh", "-c", "head -c 20000000 /dev/zero; exit 5"]) as p:
        pass  # output never read: dropped, acknowledged, the process finishes
    assert p.returncode == 5
    with pytest.raises(RuntimeError):
        with client.popen(["sleep", "300"]) as p:
            raise RuntimeError("boom")
    assert wait_until(lambda: p.returncode is not None)
    assert p.returncode == -9


def test_garbage_collected_process_does_not_stall(client: agentd.Client) -> None:
    p = client.popen(["sh", "-c", "head -c 30000000 /dev/zero; exit 3"])
    s = p._s
    del p
    import gc

    gc.collect()
    assert wait_until(lambda: s.state == "exited", 10)
    assert s.exited is not None and s.exited.code == 3


def test_stdin_devnull(client: agentd.Client) -> None:
    p = client.popen(["cat"], stdin=agentd.DEVNULL)
    assert p.stdin is None
    assert p.wait() == 0
