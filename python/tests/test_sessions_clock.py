"""client.sessions() / attach() / detach (against ``agentd --listen unix:PATH``) and client.clock()/sync_clock()."""

from __future__ import annotations

import time

import pytest

import agentd
from agentd import messages as m

from conftest import Listening, wait_until


def test_list_is_paged(client: agentd.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each SESSIONS frame is under 64 KiB: 600 sessions with long arguments take several.
    from agentd import _ext

    pages = []
    orig = _ext.ExtStream.on_message

    def spy(self: _ext.ExtStream, msg: m.Message) -> None:
        if isinstance(msg, m.Sessions):
            pages.append((len(msg.sessions), msg.more))
        orig(self, msg)

    monkeypatch.setattr(_ext.ExtStream, "on_message", spy)
    procs = []
    for i in range(600):
        procs.append(client.popen(["sh", "-c", "exec sleep 60", "x" * 150], stdin=agentd.DEVNULL,
                                  tag=f"pager-{i:03d}-{'t' * 60}"))
    infos = client.sessions()
    assert len(pages) >= 2 and [more for _, more in pages] == [True] * (len(pages) - 1) + [False]
    assert sum(n for n, _ in pages) == len(infos)
    mine = {i.tag: i for i in infos if i.tag and i.tag.startswith("pager-")}
    assert len(mine) == 600
    first = mine[f"pager-000-{'t' * 60}"]
    assert (first.cmd, first.args, first.attached, first.tty) == ("sh", ["-c", "exec sleep 60", "x" * 150], True, False)
    assert first.state in ("starting", "running")
    assert first.id == procs[0].id and first.pid == procs[0].pid and first.session == procs[0].session
    assert first.started_ms > 0 and first.stdout_bytes == 0
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()
    assert not client._core.streams


def test_attach_by_tag_with_replay_after_the_host_left(listening: Listening) -> None:
    a = listening.connect()
    p = a.popen(["sh", "-c", "echo first; echo err >&2; read line; echo got:$line; sleep 30"], tag="job-1")
    assert p.stdout is not None and p.stdout.readline() == b"first\n"
    assert p.stderr is not None and p.stderr.readline() == b"err\n"
    number = p.session
    assert number is not None
    a.close()  # the session is detached: it goes on
    b = listening.connect()
    (info,) = [i for i in b.sessions() if i.tag == "job-1"]
    assert (info.session, info.attached, info.state, info.id) == (number, False, "running", None)
    assert info.stdout_bytes == 6 and info.stderr_bytes == 4
    q = b.attach("job-1")
    assert q.session == number and q.pid == info.pid and q.attached is not None
    assert (q.attached.stdout_from, q.attached.stdout_lost, q.attached.stdin) == (0, 0, True)
    assert q.stdout is not None and q.stdout.readline() == b"first\n"  # replayed
    assert q.stderr is not None and q.stderr.readline() == b"err\n"
    assert q.stdin is not None
    q.stdin.write(b"hello\n")
    assert q.stdout.readline() == b"got:hello\n"  # live
    q.send_signal(9)
    assert q.wait() == -9
    b.close()


def test_attach_by_number_with_offsets_and_tail(listening: Listening) -> None:
    a = listening.connect()
    p = a.popen(["sh", "-c", "printf 0123456789; sleep 30"], stdin=agentd.DEVNULL)
    assert p.stdout is not None and p.stdout.read(10) == b"0123456789"
    number = p.session
    assert number is not None
    b = listening.connect()
    q = b.attach(number, stdout_from=4)
    assert q.attached is not None and q.attached.stdout_from == 4
    assert q.stdout is not None and q.stdout.read(6) == b"456789"
    # The first host's id was taken over: it got DETACHED attached_elsewhere.
    with pytest.raises(agentd.SessionDetached) as ei:
        p.wait(timeout=10)
    assert ei.value.reason == "attached_elsewhere" and p.detached is not None
    c = listening.connect()
    r = c.attach(number, tail=3)
    assert r.stdout is not None and r.stdout.read(3) == b"789"
    d = r.detach()
    assert d.reason == "detach" and d.session == number
    with pytest.raises(agentd.SessionDetached):
        r.wait(timeout=5)
    (info,) = [i for i in c.sessions() if i.session == number]
    assert info.attached is False
    q.stdout.close()
    for cl in (a, b, c):
        cl.close()
    e = listening.connect()
    s = e.attach(number)
    s.kill()
    s.wait()
    e.close()


def test_ended_sessions_are_kept_for_the_next_host(listening: Listening) -> None:
    a = listening.connect()
    p = a.popen(["sh", "-c", "read x; echo bye; exit 7"], tag="ends-later")
    a.close()
    b = listening.connect()
    q = b.attach("ends-later")
    assert q.stdin is not None
    q.stdin.write(b"go\n")
    q.stdin.close()
    assert q.wait() == 7
    assert q.stdout is not None and q.stdout.read() == b"bye\n"
    assert not [i for i in b.sessions() if i.tag == "ends-later"]
    (kept,) = [i for i in b.sessions(all=True) if i.tag == "ends-later"]
    assert kept.state == "exited" and kept.exit is not None and kept.exit.code == 7
    b.close()
    _ = p


def test_leaving_an_attached_with_block_detaches(listening: Listening) -> None:
    a = listening.connect()
    p = a.popen(["sleep", "30"], stdin=agentd.DEVNULL, tag="keep-me")
    a.close()
    b = listening.connect()
    with pytest.raises(RuntimeError):
        with b.attach("keep-me") as q:
            raise RuntimeError("the monitoring code failed")
    assert wait_until(lambda: q.detached is not None)
    (info,) = [i for i in b.sessions() if i.tag == "keep-me"]
    assert info.state == "running" and not info.attached  # not killed
    r = b.attach("keep-me")
    r.kill()
    assert r.wait() == -9
    b.close()
    _ = p


def test_attach_failures(listening: Listening) -> None:
    a = listening.connect()
    with pytest.raises(agentd.AttachFailed) as ei:
        a.attach("no-such-tag")
    assert ei.value.kind == "not_found"
    with pytest.raises(agentd.AttachFailed) as ei:
        a.attach(987654321)
    assert ei.value.kind == "not_found"
    p1 = a.popen(["sleep", "30"], stdin=agentd.DEVNULL, tag="twin")
    p2 = a.popen(["sleep", "30"], stdin=agentd.DEVNULL, tag="twin")
    with pytest.raises(agentd.AttachFailed) as ei:
        a.attach("twin")
    assert ei.value.kind == "ambiguous" and "session number" in str(ei.value)
    with pytest.raises(TypeError):
        a.attach(True)
    p1.kill()
    p2.kill()
    p1.wait()
    p2.wait()
    with pytest.raises(agentd.SessionEnded):
        p1.detach()
    a.close()


def test_clock(client: agentd.Client) -> None:
    before = time.time_ns()
    c = client.clock()
    after = time.time_ns()
    assert before - 10**9 <= c.realtime_ns <= after + 10**9  # the agent runs on this machine
    assert c.boottime_ns > 0 and c.restores == 0 and abs(c.realtime - before / 1e9) < 2
    assert client.ready.clock_set is False and client.ready.restores == 0


def test_sync_clock_and_entropy_are_refused_off_a_vm(client: agentd.Client) -> None:
    # Never changes this machine's clock: the agent is not PID 1 and has no --allow-clock.
    with pytest.raises(agentd.NotPermitted) as ei:
        client.sync_clock()
    e = ei.value
    assert isinstance(e, PermissionError) and isinstance(e, agentd.ProtocolError)
    assert e.kind == "not_permitted" and e.frame_kind == int(agentd.Kind.CLOCK_SET)
    with pytest.raises(agentd.NotPermitted):
        client.add_entropy(b"\x01" * 32)
    with pytest.raises(ValueError):
        client.add_entropy(b"")
    with pytest.raises(ValueError):
        client.add_entropy(b"x" * 4097)
    assert not client._core.streams and client.take_errors() == []


def test_extensions_not_served_raise_before_sending(client: agentd.Client) -> None:
    client._core.features = frozenset()
    for call in (client.clock, client.sessions, lambda: client.attach(1), lambda: client.connect_tcp(1)):
        with pytest.raises(agentd.FeatureNotServed):
            call()
    assert wait_until(lambda: True) and isinstance(m.ClockGet(), m.ClockGet)


def test_deadline_ends_the_session_tree(client: agentd.Client) -> None:
    t0 = time.monotonic()
    r = client.run(["sh", "-c", "trap '' TERM; sleep 30"], deadline=0.3, kill_grace=0.2)
    assert r.timed_out and r.signal == 9 and r.returncode == -9 and time.monotonic() - t0 < 20
    r = client.run(["sleep", "30"], deadline=0.2)
    assert r.timed_out and r.signal == 15
    assert client.run(["true"], deadline=10).timed_out is False
    p = client.popen(["sleep", "30"], stdin=agentd.DEVNULL, deadline=0.2)
    assert p.wait() == -15 and p.exited is not None and p.exited.timed_out


def test_cgroup_limits_and_tree_signal_without_cgroups(client: agentd.Client) -> None:
    if client.ready.cgroups:
        pytest.skip("this agent has cgroups: the refusals are not what it answers")
    for kw in ({"memory_max": 64 << 20}, {"pids_max": 10}, {"cpu_max": "50000 100000"}):
        with pytest.raises(agentd.ExecFailed) as ei:
            client.run(["true"], **kw)  # type: ignore[arg-type]
        assert ei.value.kind == "invalid_request" and ei.value.stage == "cgroup"
    p = client.popen(["sleep", "30"], stdin=agentd.DEVNULL)
    with pytest.raises(agentd.Unsupported) as eu:
        p.send_signal(9, tree=True)
    assert eu.value.kind == "unsupported" and isinstance(eu.value, agentd.ProtocolError)
    p.kill()
    assert p.wait() == -9


def test_spawn_detached_then_attach(listening: Listening) -> None:
    a = listening.connect()
    started = a.spawn_detached(["sh", "-c", "echo detached-out; sleep 30"], tag="bg", deadline=20)
    assert started.session is not None and started.pid > 0
    assert not a._core.streams  # STARTED was the id's last frame
    assert wait_until(lambda: any(i.stdout_bytes == 13 for i in a.sessions() if i.tag == "bg"))
    (info,) = [i for i in a.sessions() if i.tag == "bg"]
    assert (info.session, info.attached, info.pid) == (started.session, False, started.pid)
    q = a.attach(started.session)
    assert q.stdout is not None and q.stdout.readline() == b"detached-out\n"
    q.kill()
    assert q.wait() == -9
    a.close()
