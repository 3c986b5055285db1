"""Every EXEC_FAILED kind and every ERROR kind a host can provoke, and the host's own receiving rules."""

from __future__ import annotations

import struct
import time
from typing import List

import pytest

import agentd
from agentd import messages as m
from agentd._core import Core, Waiters
from agentd.codec import Frame, FrameDecoder, frame_header
from agentd.protocol import MAX_PAYLOAD, Kind

from conftest import wait_until


def exec_failed(client: agentd.Client, args: object, **kw: object) -> agentd.ExecFailed:
    with pytest.raises(agentd.ExecFailed) as e:
        client.run(args, **kw)  # type: ignore[arg-type]
    assert str(e.value).count("\n") == 0
    return e.value


# --- EXEC_FAILED ------------------------------------------------------------------------


def test_not_found(client: agentd.Client) -> None:
    e = exec_failed(client, ["no-such-program-xyz"])
    assert (e.kind, e.stage, e.errno) == ("not_found", "lookup", 2)
    assert "check the program name" in str(e)
    e = exec_failed(client, ["/no/such/path"])
    assert e.kind == "not_found"


def test_permission_denied(client: agentd.Client) -> None:
    e = exec_failed(client, ["/etc/passwd"])
    assert (e.kind, e.errno) == ("permission_denied", 13)


def test_bad_cwd(client: agentd.Client) -> None:
    e = exec_failed(client, ["true"], cwd="/no/such/dir")
    assert (e.kind, e.stage) == ("bad_cwd", "chdir")


def test_bad_user(client: agentd.Client) -> None:
    e = exec_failed(client, ["true"], user="no-such-user-xyz")
    assert e.kind == "bad_user"


@pytest.mark.parametrize(
    "args,kw",
    [
        ([""], {}),
        (["echo", "nul\x00byte"], {}),
        (["true"], {"rlimits": [m.Rlimit("bogus", 1, 1)]}),
        (["true"], {"rlimits": [m.Rlimit("nofile", 10, 5)]}),
        (["true"], {"env": ["NO_EQUALS_SIGN"]}),
    ],
    ids=["empty-cmd", "nul", "unknown-rlimit", "soft-above-hard", "env-without-equals"],
)
def test_invalid_request(client: agentd.Client, args: List[str], kw: dict) -> None:  # type: ignore[type-arg]
    e = exec_failed(client, args, **kw)
    assert e.kind == "invalid_request"


def test_invalid_request_for_id_0(client: agentd.Client) -> None:
    client.send_frame(int(Kind.EXEC), 0, m.Exec(cmd="true").encode_payload())
    assert wait_until(lambda: bool(client._core.errors))
    (err,) = client.take_errors()
    assert (err.kind, err.session_id, err.frame_kind) == ("invalid_request", 0, 0x10)


def test_duplicate_id_for_a_live_session(client: agentd.Client) -> None:
    p = client.popen(["sleep", "300"], stdin=agentd.DEVNULL)
    client.send_frame(int(Kind.EXEC), p.id, m.Exec(cmd="true").encode_payload())
    assert wait_until(lambda: bool(p.errors))
    assert p.errors[0].kind == "duplicate_id"
    assert p.poll() is None  # the live session is unaffected
    p.kill()
    assert p.wait() == -9


def test_resource_at_max_sessions(spawn) -> None:  # type: ignore[no-untyped-def]
    c = spawn("--max-sessions", "2")
    a = c.popen(["sleep", "300"], stdin=agentd.DEVNULL)
    b = c.popen(["sleep", "300"], stdin=agentd.DEVNULL)
    e = exec_failed(c, ["true"])
    assert e.kind == "resource"
    a.kill()
    b.kill()
    a.wait()
    b.wait()
    assert c.run(["true"]).returncode == 0


def test_other_while_shutting_down(client: agentd.Client) -> None:
    p = client.popen(["sh", "-c", "trap '' TERM; sleep 300"], stdin=agentd.DEVNULL)
    time.sleep(0.1)
    with client._lock:
        client._core.shutdown(3000)
    client._flush_now()
    e = exec_failed(client, ["true"])
    assert e.kind == "other"
    p.kill()
    assert p.wait() == -9


# --- ERROR -----------------------------------------------------------------------------------


def one_error(client: agentd.Client) -> agentd.ProtocolError:
    assert wait_until(lambda: bool(client._core.errors)), "no ERROR came"
    time.sleep(0.05)
    errs = client.take_errors()
    assert len(errs) == 1, errs
    assert errs[0].remote
    return errs[0]  # type: ignore[no-any-return]


def test_malformed_frame(client: agentd.Client) -> None:
    client.send_bytes(b"\x00\x00\x00\x03abc")
    e = one_error(client)
    assert (e.kind, e.session_id, e.frame_kind) == ("malformed_frame", 0, None)
    assert client.ping() > 0  # the stream goes on right after the skipped bytes


def test_frame_too_large(client: agentd.Client) -> None:
    length = 5 + MAX_PAYLOAD + 1
    client.send_bytes(struct.pack(">IBI", length, int(Kind.STDIN), 9) + b"\x00" * (length - 5))
    e = one_error(client)
    assert (e.kind, e.session_id, e.frame_kind) == ("frame_too_large", 9, 0x20)
    assert client.ping() > 0


def test_unknown_kind(client: agentd.Client) -> None:
    client.send_frame(0x7F, 3, b"")
    e = one_error(client)
    assert (e.kind, e.session_id, e.frame_kind) == ("unknown_kind", 3, 0x7F)


def test_extension_kinds_are_unknown_while_not_served(client: agentd.Client) -> None:
    requests = {
        "clock": (Kind.CLOCK_GET, m.ClockGet()),
        "fs": (Kind.FS_REQUEST, m.FsRequest(op="stat", path="/")),
        "net": (Kind.NET_CONNECT, m.NetConnect(host="127.0.0.1", port=9)),
        "sessions": (Kind.LIST, m.ListSessions()),
    }
    missing = [f for f in requests if not client.has_feature(f)]
    if not missing:
        pytest.skip("the agent serves every extension")
    kind, msg = requests[missing[0]]
    client.send_frame(int(kind), 11, msg.encode_payload())
    e = one_error(client)
    assert (e.kind, e.frame_kind) == ("unknown_kind", int(kind))


def test_wrong_direction(client: agentd.Client) -> None:
    client.send_frame(int(Kind.STDOUT), 1, b"not from a host")
    e = one_error(client)
    assert (e.kind, e.frame_kind) == ("wrong_direction", 0x30)


def test_bad_payload(client: agentd.Client) -> None:
    client.send_frame(int(Kind.SHUTDOWN), 0, b"\x91\x01")  # an array: refused, and no shutdown
    e = one_error(client)
    assert (e.kind, e.frame_kind) == ("bad_payload", 0x04)
    assert client.run(["true"]).returncode == 0
    client.send_frame(int(Kind.EXEC), 5, b"\x81\xa4args\x90")  # EXEC without cmd: ERROR, not EXEC_FAILED
    e = one_error(client)
    assert (e.kind, e.session_id, e.frame_kind) == ("bad_payload", 5, 0x10)
    client.send_frame(int(Kind.PING), 0, b"x" * 4097)
    e = one_error(client)
    assert (e.kind, e.frame_kind) == ("bad_payload", 0x02)


def test_bad_payload_fails_the_waiting_call(client: agentd.Client) -> None:
    # An EXEC the agent cannot decode fails the popen() that sent it with ProtocolError.
    s = agentd._core.SessionState(client._core, m.Exec(cmd="true"), ["true"])
    with client._lock:
        client._core.register(s)
        client._core.send_raw(int(Kind.EXEC), s.id, b"\x81\xa3cmd\x01")  # cmd: an integer
    client._flush_now()
    with pytest.raises(agentd.ProtocolError) as e:
        client._wait(s.waiters, s.try_started)
    assert (e.value.kind, e.value.frame_kind, e.value.remote) == ("bad_payload", 0x10, True)


def test_unknown_session(client: agentd.Client) -> None:
    client.send_frame(int(Kind.SIGNAL), 987654, m.Signal(9).encode_payload())
    e = one_error(client)
    assert (e.kind, e.session_id, e.frame_kind) == ("unknown_session", 987654, 0x24)


def test_not_a_tty(client: agentd.Client) -> None:
    with client.popen(["sleep", "5"], stdin=agentd.DEVNULL) as p:
        with pytest.raises(agentd.ProtocolError) as e:
            p.resize(10, 10)
        assert (e.value.kind, e.value.frame_kind, e.value.session_id) == ("not_a_tty", 0x23, p.id)
        assert "tty=True" in str(e.value)
        p.kill()


def test_invalid_signal(client: agentd.Client) -> None:
    with client.popen(["sleep", "5"], stdin=agentd.DEVNULL) as p:
        with pytest.raises(agentd.ProtocolError) as e:
            p.send_signal(99)
        assert (e.value.kind, e.value.frame_kind) == ("invalid_signal", 0x24)
        assert p.poll() is None
        p.kill()


def test_window_exceeded(spawn) -> None:  # type: ignore[no-untyped-def]
    c = spawn("--stdin-window", "100")
    with c.popen(["sleep", "5"]) as p:  # never reads its stdin
        # Far more than the child's stdin pipe holds, without waiting for STDIN_ACK:
        # once the pipe is full, the window of 100 bytes is used up and the rest is refused.
        frame = frame_header(int(Kind.STDIN), p.id, 100) + b"a" * 100
        c.send_bytes(frame * 6000)
        assert wait_until(lambda: bool(p.errors))
        assert (p.errors[0].kind, p.errors[0].frame_kind) == ("window_exceeded", 0x20)
        p.kill()


def test_stdin_closed(client: agentd.Client) -> None:
    with client.popen(["sleep", "5"]) as p:
        p.stdin.close()
        with pytest.raises(ValueError):
            p.stdin.write(b"x")  # refused locally
        c = client
        c.send_frame(int(Kind.STDIN), p.id, b"late")
        assert wait_until(lambda: bool(p.errors))
        assert p.errors[0].kind == "stdin_closed"
        p.kill()


def test_stdin_on_a_session_without_stdin(client: agentd.Client) -> None:
    with client.popen(["sleep", "5"], stdin=agentd.DEVNULL) as p:
        client.send_frame(int(Kind.STDIN), p.id, b"x")
        assert wait_until(lambda: bool(p.errors))
        assert p.errors[0].kind == "stdin_closed"
        p.kill()


# --- the host's receiving rules (frames from an agent that misbehaves) ------------------------


def core_with_ready() -> Core:
    core = Core(Waiters)
    ready = m.Ready(protocol=1, agent="a", pid=1, pid1=False, max_payload=MAX_PAYLOAD, stdin_window=10,
                    max_sessions=1)
    core.receive([Frame(1, 0, ready.encode_payload())])
    assert core.ready == ready
    return core


def test_host_skips_bad_frames_and_carries_on() -> None:
    core = core_with_ready()
    dec = FrameDecoder()
    stream = (
        frame_header(0x7E, 1, 0)  # unknown kind
        + frame_header(int(Kind.EXEC), 1, 0)  # a host-to-agent kind
        + frame_header(int(Kind.STDIN_ACK), 1, 2) + b"\x91\x01"  # bad payload
        + b"\x00\x00\x00\x02\xff\xff"  # malformed
        + struct.pack(">IBI", 5 + MAX_PAYLOAD + 1, 0x30, 4) + b"\x00" * (MAX_PAYLOAD + 1)  # too large
        + frame_header(int(Kind.PONG), 0, 0)
    )
    core.receive(dec.feed(stream))
    kinds = [(e.kind, e.remote) for e in core.take_errors()]
    assert kinds == [("unknown_kind", False), ("wrong_direction", False), ("bad_payload", False),
                     ("malformed_frame", False), ("frame_too_large", False)]
    assert core.out == b""  # a host answers nothing


def test_frames_before_ready_are_ignored_and_protocol_is_checked() -> None:
    core = Core(Waiters)
    core.receive([Frame(int(Kind.STDOUT), 5, b"stale"), Frame(int(Kind.EXITED), 5, m.Exited(status=0).encode_payload())])
    assert core.ready is None and not core.errors
    bad = m.Ready(protocol=2, agent="a", pid=1, pid1=False, max_payload=1, stdin_window=1, max_sessions=1)
    core.receive([Frame(1, 0, bad.encode_payload())])
    with pytest.raises(agentd.ProtocolVersionError, match="protocol 2"):
        core.try_ready()
