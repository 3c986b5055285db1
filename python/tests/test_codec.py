"""The codec against the documents: golden vectors, the kinds table, the receiving rules, framing."""

from __future__ import annotations

import json
import random
import re
import struct
from typing import Any, Dict, List, Tuple

import msgpack
import pytest

from agentd import messages as m
from agentd.codec import Frame, FrameDecoder, FrameError, encode_frame, frame_header
from agentd.errors import EncodeError, ProtocolError
from agentd.protocol import KINDS, MAX_PAYLOAD, Direction, Encoding, Kind

from conftest import PROTOCOL_MD, VECTORS, read_hex

# --- golden vectors ----------------------------------------------------------------

FULL_EXEC = m.Exec(
    cmd="/bin/sh",
    args=["-c", "echo hi"],
    env=["A=1", "B="],
    clear_env=True,
    cwd="/tmp",
    user="1000:1000",
    tty=True,
    rows=50,
    cols=132,
    rlimits=[m.Rlimit("nofile", 1024, 4096), m.Rlimit("core", 0, 2**64 - 1)],
    stdin=False,
    output_window=65536,
    linger_ms=250,
    no_new_privs=True,
)

READY_BASE = dict(protocol=1, agent="agentd/0.1.0", max_payload=1048576, stdin_window=262144, max_sessions=1024)

#: Round-trip vectors: file -> (id, message); decoding gives it, encoding it gives the file.
ROUND_TRIP: Dict[str, Tuple[int, m.Message]] = {
    "ready.hex": (0, m.Ready(pid=1, pid1=True, uptime_ms=1234, **READY_BASE)),  # type: ignore[arg-type]
    "ready-no-uptime.hex": (0, m.Ready(pid=312, pid1=False, **READY_BASE)),  # type: ignore[arg-type]
    "ping.hex": (0, m.Ping(b"hello")),
    "ping-empty.hex": (7, m.Ping(b"")),
    "pong.hex": (0, m.Pong(b"hello")),
    "pong-empty.hex": (7, m.Pong(b"")),
    "shutdown.hex": (0, m.Shutdown(grace_ms=5000)),
    "shutdown-done.hex": (0, m.ShutdownDone()),
    "error-bad-payload.hex": (1, m.Error("bad_payload", "missing field `cmd`", 16)),
    "error-malformed-frame.hex": (
        0,
        m.Error("malformed_frame", "frame length 3 is shorter than the 5 bytes of kind and id"),
    ),
    "error-frame-too-large.hex": (9, m.Error("frame_too_large", "frame of 104857600 bytes exceeds the limit", 32)),
    "exec-minimal.hex": (1, m.Exec(cmd="true")),
    "exec-full.hex": (0x01020304, FULL_EXEC),
    "started.hex": (1, m.Started(pid=4242)),
    "exec-failed.hex": (2, m.ExecFailed("not_found", "nosuchcmd: No such file or directory", 2, "execve")),
    "exec-failed-id-0.hex": (0, m.ExecFailed("invalid_request", "session id 0 is reserved")),
    "stdin.hex": (1, m.Stdin(b"echo hi\n")),
    "stdin-empty.hex": (1, m.Stdin(b"")),
    "stdin-close.hex": (1, m.StdinClose()),
    "stdin-ack.hex": (1, m.StdinAck(bytes=8)),
    "resize.hex": (1, m.Resize(rows=50, cols=132)),
    "signal.hex": (1, m.Signal(signal=15, group=True)),
    "signal-process.hex": (1, m.Signal(signal=9, group=False)),
    "output-ack.hex": (1, m.OutputAck(bytes=65536)),
    "stdout.hex": (1, m.Stdout(b"hi\n")),
    "stderr.hex": (1, m.Stderr(bytes.fromhex("00ff1b5b33316d6572726f721b5b306d0a"))),
    "exited-code.hex": (1, m.Exited(code=3, core_dumped=False, status=3)),
    "exited-signal.hex": (1, m.Exited(signal=11, core_dumped=True, status=139)),
}

#: Decode-only vectors: file -> (id, message with defaults, the round-trip file its encoding equals or None).
DECODE_ONLY: Dict[str, Tuple[int, m.Message, Any]] = {
    "exec-cmd-only.hex": (1, m.Exec(cmd="true"), "exec-minimal.hex"),
    "signal-no-group.hex": (1, m.Signal(signal=15), "signal.hex"),
    "shutdown-empty-map.hex": (0, m.Shutdown(grace_ms=1000), None),
    "shutdown-empty-payload.hex": (0, m.Shutdown(grace_ms=1000), None),
    "exited-no-core-dumped.hex": (1, m.Exited(code=3, status=3), "exited-code.hex"),
}


def decode_frame_bytes(data: bytes) -> Tuple[int, m.Message]:
    items = FrameDecoder().feed(data)
    assert len(items) == 1 and isinstance(items[0], Frame), items
    f = items[0]
    assert 4 + 5 + len(f.payload) == len(data)
    return f.id, m.decode(f.kind, f.payload)


def test_every_vector_file_is_listed() -> None:
    files = {p.name for p in VECTORS.glob("*.hex")}
    listed = README_ROUND_TRIP | README_DECODE_ONLY
    assert files == set(listed), files ^ set(listed)
    assert set(ROUND_TRIP) <= README_ROUND_TRIP and set(DECODE_ONLY) <= README_DECODE_ONLY


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_round_trip_vector(name: str) -> None:
    data = read_hex(VECTORS / name)
    fid, msg = ROUND_TRIP[name]
    got_id, got = decode_frame_bytes(data)
    assert (got_id, got) == (fid, msg)
    assert encode_frame(fid, got) == data
    assert encode_frame(fid, msg) == data


@pytest.mark.parametrize("name", sorted(DECODE_ONLY))
def test_decode_only_vector(name: str) -> None:
    data = read_hex(VECTORS / name)
    fid, msg, full = DECODE_ONLY[name]
    got_id, got = decode_frame_bytes(data)
    assert (got_id, got) == (fid, msg)
    if full is not None:
        assert encode_frame(fid, got) == read_hex(VECTORS / full)


def _readme() -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Every file the README lists: round-trip and decode-only, with the value it gives for each.

    A map is the JSON shown (``bin(..)`` as {"$bin": hex}); a raw payload is bytes; an empty one b"".
    For decode-only files the value is the one after '=>' (plus the file it re-encodes to, if named).
    """
    text = (VECTORS / "README.md").read_text()
    head, decode_only = text.split("## Decode-only files", 1)
    out: List[Dict[str, Any]] = []
    for part in (head, decode_only):
        found: Dict[str, Any] = {}
        for line in part.splitlines():
            mt = re.match(r"- `([^`]+\.hex)`: (.*)$", line)
            if not mt:
                continue
            name, rest = mt.groups()
            again = re.search(r"re-encoded = `([^`]+)`", rest)
            if "=>" in rest:
                rest = rest.split("=>", 1)[1]
            js = re.search(r"(\{.*\})", rest)
            if js:
                body = re.sub(r"bin\(([0-9a-f ]+)\)", lambda b: json.dumps({"$bin": b.group(1).replace(" ", "")}),
                              js.group(1))
                value: Any = json.loads(body)
            elif 'raw "' in rest:
                value = json.loads(rest[rest.index('raw "') + 4 :]).encode("latin-1")
            elif "raw bytes" in rest:
                value = bytes.fromhex(rest.split("raw bytes", 1)[1])
            else:
                assert "empty payload" in rest, line
                value = b""
            found[name] = (value, again.group(1) if again else None)
        out.append(found)
    return out[0], out[1]


README_RT, README_DO = _readme()
README_ROUND_TRIP = set(README_RT)
README_DECODE_ONLY = set(README_DO)


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return {"$bin": v.hex()}
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def _listed_form(msg: m.Message) -> Any:
    if isinstance(msg, m.MapMessage):
        return _jsonable(msg._to_wire())
    if isinstance(msg, m.RawMessage):
        return bytes(msg.data)
    return b""


@pytest.mark.parametrize("name", sorted(README_RT))
def test_readme_round_trip_vector(name: str) -> None:
    """Every round-trip file (the extensions' too): decodes to the README's value, re-encodes to its bytes."""
    data = read_hex(VECTORS / name)
    fid, msg = decode_frame_bytes(data)
    listed, _ = README_RT[name]
    got = _listed_form(msg)
    assert got == listed
    if isinstance(listed, dict):
        assert list(got) == list(listed), "canonical key order"
    assert encode_frame(fid, msg) == data


@pytest.mark.parametrize("name", sorted(README_DO))
def test_readme_decode_only_vector(name: str) -> None:
    """Every decode-only file: absent keys at their defaults, re-encoded to the named full form."""
    data = read_hex(VECTORS / name)
    fid, msg = decode_frame_bytes(data)
    listed, full = README_DO[name]
    if isinstance(msg, m.MapMessage):
        assert _listed_form(msg) == listed
    if full is not None:
        assert encode_frame(fid, msg) == read_hex(VECTORS / full)


# --- the kinds table of docs/PROTOCOL.md ----------------------------------------------


def _doc_kinds() -> Dict[int, Tuple[str, str, str]]:
    rows: Dict[int, Tuple[str, str, str]] = {}
    for line in PROTOCOL_MD.read_text().splitlines():
        mt = re.match(r"\|\s*0x([0-9A-Fa-f]{2})\s*\|\s*([A-Z_]+)\s*\|\s*(agent → host|host → agent)\s*\|(.*)", line)
        if not mt:
            continue
        kind = int(mt.group(1), 16)
        cells = [c.strip() for c in mt.group(4).split("|")]
        # The core table has an id column before the payload; the extensions' tables do not.
        payload = next(c for c in cells if c.split(" ")[0].rstrip(",:") in ("map", "raw", "empty"))
        enc = payload.split(" ")[0].rstrip(",:")
        rows[kind] = (mt.group(2), mt.group(3), enc)
    return rows


def test_kinds_match_protocol_md() -> None:
    doc = _doc_kinds()
    assert len(doc) == len(KINDS) == 54
    for kind, (name, direction, enc) in doc.items():
        info = KINDS[kind]
        assert info.kind.name == name
        assert info.direction is (Direction.AGENT_TO_HOST if direction == "agent → host" else Direction.HOST_TO_AGENT)
        assert info.encoding is Encoding(enc)
        cls = m.message_class(kind)
        assert cls is not None and cls.KIND == kind


# --- every class encodes and decodes (extensions included) ----------------------------


def _sample(t: Any, key: str) -> Any:
    if isinstance(t, m._Int):
        return t.hi if t.lo == 0 else t.lo
    if t is m.BOOL:
        return True
    if t is m.STR:
        return f"{key}-é"
    if t is m.BIN:
        return b"\x00\xff"
    if isinstance(t, m._List):
        return [_sample(t.item, key), _sample(t.item, key)]
    if isinstance(t, m._Rec):
        return _full(t._cls())
    raise AssertionError(t)


def _full(cls: Any) -> Any:
    """An instance of ``cls`` with every key set (bools true, integers at an edge of their range)."""
    return cls(**{k.name: _sample(k.type, k.name) for k in cls._WIRE})


@pytest.mark.parametrize("kind", sorted(KINDS), ids=lambda k: Kind(k).name)
def test_every_kind_round_trips(kind: int) -> None:
    cls = m.message_class(kind)
    assert cls is not None
    if issubclass(cls, m.RawMessage):
        msg: m.Message = cls(b"\x00payload\xff")  # type: ignore[call-arg]
    elif issubclass(cls, m.EmptyMessage):
        msg = cls()
        assert msg.encode_payload() == b""
    else:
        msg = _full(cls)
    data = encode_frame(77, msg)
    assert decode_frame_bytes(data) == (77, msg)
    if isinstance(msg, m.MapMessage):
        # Required keys alone decode, the rest at their defaults.
        req = {k.name: _sample(k.type, k.name) for k in cls._WIRE if k.required}  # type: ignore[attr-defined]
        wire = {k: v for k, v in cls(**req)._to_wire().items() if k in req}
        got = m.decode(kind, msgpack.packb(wire, use_bin_type=True))
        assert got == cls(**req)


def test_extension_keys_of_core_messages_are_left_out_at_default() -> None:
    assert "features" not in m.Ready(pid=1, pid1=True, **READY_BASE)._to_wire()  # type: ignore[arg-type]
    wire = m.Exec(cmd="x")._to_wire()
    for k in ("tag", "replay_bytes", "detach", "timeout_ms", "kill_grace_ms", "memory_max", "pids_max", "cpu_max"):
        assert k not in wire
    assert "no_new_privs" in wire  # this project's extension key, written as the vectors show
    assert "tree" not in m.Signal(signal=1)._to_wire()
    assert list(m.Exited(status=0, code=0)._to_wire()) == ["code", "core_dumped", "status"]
    w = m.Exec(cmd="x", tag="t", detach=True, timeout_ms=5, kill_grace_ms=0)._to_wire()
    assert list(w)[-4:] == ["tag", "timeout_ms", "kill_grace_ms", "detach"]


def test_canonical_integers_and_strings() -> None:
    p = m.OutputAck(bytes=0).encode_payload()
    assert p == b"\x81\xa5bytes\x00"
    assert m.OutputAck(bytes=255).encode_payload()[-2:] == b"\xcc\xff"
    assert m.OutputAck(bytes=65536).encode_payload()[-5:] == b"\xce\x00\x01\x00\x00"
    assert m.Signal(signal=-1).encode_payload()[8:9] == b"\xff"  # negative fixint
    assert m.Signal(signal=-33).encode_payload()[8:10] == b"\xd0\xdf"  # int 8
    long = "x" * 40
    assert b"\xd9\x28" + long.encode() in m.Error("k", long).encode_payload()  # str 8, never bin


def test_encoder_refuses_out_of_range_values() -> None:
    with pytest.raises(EncodeError):
        m.Resize(rows=70000, cols=1).encode_payload()
    with pytest.raises(EncodeError):
        m.OutputAck(bytes=-1).encode_payload()
    with pytest.raises(EncodeError):
        m.Signal(signal=2**31).encode_payload()
    with pytest.raises(EncodeError):
        m.Exec(cmd="x", tty=1).encode_payload()  # type: ignore[arg-type]
    with pytest.raises(EncodeError):
        frame_header(int(Kind.STDIN), 1, MAX_PAYLOAD + 1)
    assert len(frame_header(int(Kind.STDIN), 1, MAX_PAYLOAD)) == 9


# --- the receiving rules of "Payloads" --------------------------------------------------


def pk(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def bad(kind: Kind, payload: bytes, match: str = "") -> ProtocolError:
    with pytest.raises(ProtocolError) as e:
        m.decode(int(kind), payload)
    assert e.value.kind == "bad_payload" and not e.value.remote
    assert e.value.frame_kind == int(kind)
    assert match in str(e.value)
    return e.value


def map_bytes(*pairs: Tuple[bytes, bytes]) -> bytes:
    assert len(pairs) < 16
    return bytes([0x80 | len(pairs)]) + b"".join(k + v for k, v in pairs)


def s(text: str) -> bytes:
    b = text.encode()
    return bytes([0xA0 | len(b)]) + b


def test_rule1_exactly_one_map() -> None:
    bad(Kind.RESIZE, pk([1, 2]), "not a MessagePack map")
    bad(Kind.RESIZE, pk(5))
    bad(Kind.RESIZE, pk({"rows": 1, "cols": 2}) + b"\x80", "bytes follow")
    bad(Kind.RESIZE, pk({"rows": 1, "cols": 2}) + b"\x00")
    bad(Kind.RESIZE, b"\x83" + s("rows") + b"\x01" + s("cols") + b"\x02", "not valid MessagePack")  # 3 announced
    assert m.decode(int(Kind.SHUTDOWN), b"") == m.Shutdown()  # empty payload = empty map
    assert m.decode(int(Kind.SHUTDOWN), b"\xde\x00\x00") == m.Shutdown()  # map 16
    assert m.decode(int(Kind.SHUTDOWN), b"\xdf\x00\x00\x00\x00") == m.Shutdown()  # map 32


def test_rule2_keys_are_valid_utf8_strings() -> None:
    bad(Kind.OUTPUT_ACK, map_bytes((b"\x01", b"\x01"), (s("bytes"), b"\x01")), "not a string")
    bad(Kind.OUTPUT_ACK, map_bytes((b"\xc4\x05bytes", b"\x01")), "not a string")  # bin key
    bad(Kind.OUTPUT_ACK, map_bytes((b"\xc0", b"\x01"), (s("bytes"), b"\x01")))  # nil key
    bad(Kind.OUTPUT_ACK, map_bytes((b"\xa2\xff\xfe", b"\x01"), (s("bytes"), b"\x01")), "UTF-8")
    # every str width is a str
    for key in (b"\xd9\x05bytes", b"\xda\x00\x05bytes", b"\xdb\x00\x00\x00\x05bytes"):
        assert m.decode(int(Kind.OUTPUT_ACK), map_bytes((key, b"\x07"))) == m.OutputAck(7)


def test_rule3_no_key_twice_known_or_not() -> None:
    bad(Kind.OUTPUT_ACK, map_bytes((s("bytes"), b"\x01"), (s("bytes"), b"\x02")), "twice")
    bad(Kind.OUTPUT_ACK, map_bytes((s("bytes"), b"\x01"), (b"\xd9\x05bytes", b"\x02")), "twice")  # other width
    bad(Kind.OUTPUT_ACK, map_bytes((s("bytes"), b"\x01"), (s("zz"), b"\x01"), (s("zz"), b"\x02")), "twice")
    bad(Kind.STDIN_CLOSE, map_bytes((s("a"), b"\x01"), (s("a"), b"\x01")))  # empty kinds too


def test_rule4_depth_limit() -> None:
    def nested(levels: int) -> bytes:  # the payload map is level 1, each array one more
        return map_bytes((s("bytes"), b"\x01"), (s("x"), b"\x91" * (levels - 2) + b"\x90"))

    assert m.decode(int(Kind.OUTPUT_ACK), nested(32)) == m.OutputAck(1)
    bad(Kind.OUTPUT_ACK, nested(33), "deeper")
    bad(Kind.OUTPUT_ACK, map_bytes((s("bytes"), b"\x01"), (s("x"), b"\x81\xa1k" * 31 + b"\x80")))
    bad(Kind.OUTPUT_ACK, map_bytes((s("bytes"), b"\x01"), (s("x"), b"\x91" * 5000 + b"\x90")))


def test_rule5_unknown_keys_ignored_whatever_their_value() -> None:
    weird = [b"\xc0", b"\xcb" + struct.pack(">d", 1.5), b"\xc4\x01\x00", b"\xd4\x05\x01", b"\x81\x01\x02",
             b"\xa2\xff\xfe", b"\x92\xc0\xc3", b"\xdc\x00\x00", b"\xd6\xff\x00\x00\x00\x01"]
    for i, v in enumerate(weird):
        got = m.decode(int(Kind.STDIN_ACK), map_bytes((s(f"unknown{i}"), v), (s("bytes"), b"\x09")))
        assert got == m.StdinAck(9)


def test_rule6_defaults_and_required() -> None:
    assert m.decode(int(Kind.SIGNAL), pk({"signal": 2})) == m.Signal(2, True)
    bad(Kind.SIGNAL, pk({"group": False}), "missing field `signal`")
    bad(Kind.EXEC, pk({"args": []}), "missing field `cmd`")
    ex = m.decode(int(Kind.EXITED), pk({"status": 1}))
    assert ex == m.Exited(status=1)  # neither code nor signal: accepted, status tells


def test_rule7_strict_value_types() -> None:
    bad(Kind.RESIZE, pk({"rows": 70000, "cols": 1}), "does not fit u16")
    bad(Kind.OUTPUT_ACK, pk({"bytes": -1}), "does not fit u32")
    bad(Kind.SIGNAL, pk({"signal": 2**31}), "does not fit i32")
    bad(Kind.RESIZE, pk({"rows": 24.0, "cols": 80}), "a float")
    bad(Kind.EXEC, pk({"cmd": b"true"}), "bin")
    bad(Kind.EXEC, pk({"cmd": "true", "tty": 1}), "not a boolean")
    bad(Kind.EXEC, pk({"cmd": "true", "cwd": None}), "nil")
    bad(Kind.EXEC, pk({"cmd": "true", "args": ["a", 1]}))
    bad(Kind.EXEC, pk({"cmd": "true", "args": "a"}), "not an array")
    bad(Kind.EXEC, b"\x81" + s("cmd") + b"\xa2\xff\xfe", "UTF-8")
    # any integer width that fits
    for enc in (b"\x18", b"\xcc\x18", b"\xcd\x00\x18", b"\xce\x00\x00\x00\x18", b"\xcf" + b"\x00" * 7 + b"\x18",
                b"\xd0\x18", b"\xd1\x00\x18", b"\xd2\x00\x00\x00\x18", b"\xd3" + b"\x00" * 7 + b"\x18"):
        assert m.decode(int(Kind.RESIZE), map_bytes((s("rows"), enc), (s("cols"), b"\x50"))) == m.Resize(24, 80)
    assert m.decode(int(Kind.SIGNAL), map_bytes((s("signal"), b"\xd0\xff"))).signal == -1  # type: ignore[attr-defined]


def test_rlimit_items() -> None:
    ok = pk({"cmd": "x", "rlimits": [{"resource": "core", "soft": 0, "hard": 2**64 - 1, "z": 1}]})
    assert m.decode(int(Kind.EXEC), ok).rlimits == [m.Rlimit("core", 0, 2**64 - 1)]  # type: ignore[attr-defined]
    item_dup_unknown = b"\x85" + s("resource") + s("core") + s("soft") + b"\x00" + s("hard") + b"\x00" + \
        s("z") + b"\x01" + s("z") + b"\x02"
    got = m.decode(int(Kind.EXEC), b"\x82" + s("cmd") + s("x") + s("rlimits") + b"\x91" + item_dup_unknown)
    assert got.rlimits == [m.Rlimit("core", 0, 0)]  # type: ignore[attr-defined]
    bad(Kind.EXEC, pk({"cmd": "x", "rlimits": [["core", 0, 0]]}), "not a map")
    bad(Kind.EXEC, pk({"cmd": "x", "rlimits": [{"resource": "core", "soft": 0}]}), "missing field `hard`")
    bad(Kind.EXEC, b"\x82" + s("cmd") + s("x") + s("rlimits") + b"\x91\x83\x00\x01\x01\x01\x02\x01", "not a string")
    dup = b"\x84" + s("resource") + s("core") + s("soft") + b"\x00" + s("hard") + b"\x00" + s("soft") + b"\x01"
    bad(Kind.EXEC, b"\x82" + s("cmd") + s("x") + s("rlimits") + b"\x91" + dup, "twice")
    # an unknown resource name is well-formed (the agent answers EXEC_FAILED invalid_request)
    assert m.decode(int(Kind.EXEC), pk({"cmd": "x", "rlimits": [{"resource": "bogus", "soft": 1, "hard": 1}]}))


def test_empty_kinds_accept_empty_or_a_valid_map() -> None:
    assert m.decode(int(Kind.STDIN_CLOSE), b"") == m.StdinClose()
    assert m.decode(int(Kind.STDIN_CLOSE), pk({"later": 1})) == m.StdinClose()
    bad(Kind.STDIN_CLOSE, pk([1]))
    bad(Kind.STDIN_CLOSE, b"raw")
    bad(Kind.SHUTDOWN_DONE, pk({}) + b"\x00")


def test_kind_and_direction_checks_come_first() -> None:
    with pytest.raises(ProtocolError) as e:
        m.decode(0x7F, b"\xff")
    assert e.value.kind == "unknown_kind"
    with pytest.raises(ProtocolError) as e:
        m.decode(int(Kind.STDOUT), b"\xff", direction=Direction.HOST_TO_AGENT)
    assert e.value.kind == "wrong_direction"
    with pytest.raises(ProtocolError) as e:
        m.decode(int(Kind.EXEC), b"\xff", direction=Direction.AGENT_TO_HOST)
    assert e.value.kind == "wrong_direction"


# --- the frame decoder ---------------------------------------------------------------------


def frames_stream(n: int, seed: int) -> Tuple[bytes, List[Tuple[int, int, bytes]]]:
    rnd = random.Random(seed)
    data = bytearray()
    expect = []
    for i in range(n):
        size = rnd.choice([0, 1, 7, 100, 4096, 65536, rnd.randrange(200000), MAX_PAYLOAD])
        payload = rnd.randbytes(size) if hasattr(rnd, "randbytes") else bytes(rnd.getrandbits(8) for _ in range(size))
        data += frame_header(0x30, i, size) + payload
        expect.append((0x30, i, payload))
    return bytes(data), expect


def test_decoder_any_chunking_and_zero_copy_views() -> None:
    data, expect = frames_stream(40, 1)
    rnd = random.Random(2)
    dec = FrameDecoder()
    got = []
    pos = 0
    while pos < len(data):
        buf = dec.read_buffer()
        n = min(len(buf), rnd.choice([1, 3, 9, 1000, 65536, 300000, 2 << 20]), len(data) - pos)
        buf[:n] = data[pos : pos + n]  # what readinto/recv_into does
        pos += n
        dec.advance(n)
        for f in dec.frames():
            assert isinstance(f, Frame)
            assert isinstance(f.payload, memoryview) and f.payload.obj is dec._buf  # a view, not a copy
            got.append((f.kind, f.id, bytes(f.payload)))
        assert dec.buffered <= 9 + MAX_PAYLOAD
    assert got == expect
    assert dec.capacity == 2 * (9 + MAX_PAYLOAD)


def test_decoder_never_moves_payload_bytes() -> None:
    """Every read lands at the end of the data so far: a partial frame is never compacted."""
    data, expect = frames_stream(30, 3)
    dec = FrameDecoder()
    pos = 0
    count = 0
    while pos < len(data):
        buf = dec.read_buffer()
        assert buf.obj is dec._buf
        start = dec._w if dec._r != dec._w else 0
        n = min(len(buf), 50000, len(data) - pos)
        buf[:n] = data[pos : pos + n]
        pos += n
        dec.advance(n)
        assert dec._w == start + n
        count += len(dec.frames())
    assert count == len(expect)


def test_decoder_byte_by_byte() -> None:
    data = read_hex(VECTORS / "exec-full.hex") + read_hex(VECTORS / "ping-empty.hex")
    dec = FrameDecoder()
    out = []
    for b in data:
        out += dec.feed(bytes([b]))
    assert [(f.kind, f.id) for f in out] == [(0x10, 0x01020304), (0x02, 7)]  # type: ignore[union-attr]


def test_oversized_frame_is_skipped_without_buffering() -> None:
    length = 100 << 20
    dec = FrameDecoder()
    out = dec.feed(struct.pack(">IBI", length, 0x20, 9))
    assert out == [FrameError("frame_too_large", length, 0x20, 9)]
    assert out[0].message == "frame of 104857600 bytes exceeds the limit"  # type: ignore[union-attr]
    chunk = b"\x00" * 65536
    left = length - 5
    while left > 65536:
        assert dec.feed(chunk) == []
        left -= 65536
        assert dec.buffered == 0 and dec.skipping == left
    tail = dec.feed(b"\x00" * left + read_hex(VECTORS / "stdout.hex"))
    assert tail == [Frame(0x30, 1, b"hi\n")]
    assert dec.capacity == 2 * (9 + MAX_PAYLOAD)


def test_huge_length_costs_nothing_but_time() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"\xff\xff\xff\xff\x31\x00\x00\x00\x05") == [
        FrameError("frame_too_large", 0xFFFFFFFF, 0x31, 5)
    ]
    assert dec.skipping == 0xFFFFFFFF - 5
    assert len(dec.read_buffer()) <= dec.capacity


def test_short_frames_are_malformed_and_skipped() -> None:
    for length in range(5):
        dec = FrameDecoder()
        data = struct.pack(">I", length) + b"\xaa" * length + read_hex(VECTORS / "ping.hex")
        out = dec.feed(data)
        assert out[0] == FrameError("malformed_frame", length, None, 0)
        assert out[1] == Frame(2, 0, b"hello")
        err = out[0].to_exception()  # type: ignore[union-attr]
        assert err.kind == "malformed_frame" and err.frame_kind is None


def test_largest_valid_frame() -> None:
    payload = b"\x07" * MAX_PAYLOAD
    data = frame_header(0x30, 3, MAX_PAYLOAD) + payload
    assert len(data) == 1_048_585
    assert FrameDecoder().feed(data) == [Frame(0x30, 3, payload)]
    one_more = struct.pack(">IBI", 5 + MAX_PAYLOAD + 1, 0x30, 3) + b"\x00" * (MAX_PAYLOAD + 1)
    assert FrameDecoder().feed(one_more) == [FrameError("frame_too_large", 5 + MAX_PAYLOAD + 1, 0x30, 3)]
