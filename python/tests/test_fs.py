"""client.fs against the real agent: every operation, every FS_ERROR kind a host can provoke, trees, watches, windows."""

from __future__ import annotations

import errno
import os
import pathlib
import shutil
import stat
import threading
import time
from typing import Any, List

import pytest

import agentd
from agentd import messages as m
from agentd.errors import fs_error

from conftest import is_root, wait_until


def test_write_read_stat_round_trip(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    fs = client.fs
    p = tmp_path / "a.bin"
    data = os.urandom(3 * 1024 * 1024 + 17)
    assert fs.write_bytes(p, data, mode=0o640) == len(data)
    assert p.read_bytes() == data
    assert stat.S_IMODE(p.stat().st_mode) == 0o640
    assert fs.read_bytes(p) == data
    assert fs.read_bytes(p, offset=10, length=5) == data[10:15]
    st = fs.stat(p)
    real = p.stat()
    assert (st.type, st.size, st.mode, st.uid, st.gid, st.ino, st.nlink) == (
        "file", len(data), 0o640, real.st_uid, real.st_gid, real.st_ino, 1)
    assert st.mtime_ns == real.st_mtime_ns and st.st_mode == real.st_mode and st.is_file() and not st.is_dir()
    assert fs.exists(p) and fs.is_file(p) and not fs.is_dir(p) and not fs.exists(tmp_path / "nope")
    assert not client._core.streams


def test_text_append_exclusive_atomic_parents(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    fs = client.fs
    p = tmp_path / "t.txt"
    fs.write_text(p, "héllo\n")
    fs.write_bytes(p, b"more\n", append=True)
    assert fs.read_text(p) == "héllo\nmore\n"
    with pytest.raises(FileExistsError) as ei:
        fs.write_bytes(p, b"x", exclusive=True)
    assert isinstance(ei.value, agentd.FsExists) and ei.value.errno == errno.EEXIST
    assert ei.value.kind == "exists" and ei.value.filename == str(p)
    with pytest.raises(FileNotFoundError):
        fs.write_bytes(tmp_path / "missing", b"x", create=False)
    deep = tmp_path / "d1" / "d2" / "f"
    fs.write_bytes(deep, b"deep", parents=True, atomic=True)
    assert deep.read_bytes() == b"deep"
    assert sorted(os.listdir(deep.parent)) == ["f"]  # no temporary file left beside it


def test_open_streams_both_ways(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    fs = client.fs
    p = tmp_path / "s.bin"
    chunks = [os.urandom(70_000) for _ in range(40)]
    with fs.open(p, "wb") as w:
        for c in chunks:
            assert w.write(c) == len(c)
        w.flush()
    assert w.result is not None and w.result.bytes == sum(map(len, chunks))
    assert p.read_bytes() == b"".join(chunks)
    with fs.open(p, "rb") as r:
        assert r.stat is not None and r.stat.size == p.stat().st_size
        head = r.read(10)
        assert head == chunks[0][:10]
        rest = r.read()
    assert head + rest == b"".join(chunks)
    with fs.open(tmp_path / "t.txt", "w") as tw:
        tw.write("line 1\nline 2\n")
    with fs.open(tmp_path / "t.txt", "r") as tr:
        assert tr.readlines() == ["line 1\n", "line 2\n"]
    with fs.open(tmp_path / "t.txt", "ab") as a:
        a.write(b"line 3\n")
    assert (tmp_path / "t.txt").read_bytes() == b"line 1\nline 2\nline 3\n"
    with pytest.raises(FileExistsError):
        fs.open(tmp_path / "t.txt", "xb")
    with pytest.raises(ValueError):
        fs.open(p, "r+b")
    wait_until(lambda: not client._core.streams)
    assert not client._core.streams


def test_writer_with_an_exception_cancels_and_atomic_leaves_nothing(client: agentd.Client,
                                                                    tmp_path: pathlib.Path) -> None:
    p = tmp_path / "atomic.bin"
    with pytest.raises(RuntimeError):
        with client.fs.open(p, "wb", atomic=True) as w:
            w.write(b"half of it")
            raise RuntimeError("the producer failed")
    assert wait_until(lambda: not client._core.streams)
    assert os.listdir(tmp_path) == []


def test_reader_closed_early_cancels(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    p = tmp_path / "big"
    p.write_bytes(os.urandom(8 * 1024 * 1024))
    fs = agentd.fs.FileSystem(client, window=65536)
    r = fs.open(p, "rb")
    assert len(r.read1()) > 0
    st = r._st
    r.close()
    assert wait_until(lambda: st.ended)
    assert isinstance(st.final, m.FsError) and st.final.kind == "cancelled"


def test_read_window_bounds_what_waits_in_python(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    p = tmp_path / "big"
    p.write_bytes(os.urandom(4 * 1024 * 1024))
    window = 128 * 1024
    fs = agentd.fs.FileSystem(client, window=window)
    with fs.open(p, "rb") as r:
        st = r._st
        got = bytearray(r.read(1000))
        time.sleep(0.3)  # a slow consumer: the agent must stop at the window
        assert st.buffered <= window
        while True:
            assert st.buffered <= window
            b = r.read1(100_000)
            if not b:
                break
            got += b
    assert bytes(got) == p.read_bytes()


def test_write_never_exceeds_the_stdin_window(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    window = client.ready.stdin_window
    p = tmp_path / "w"
    with client.fs.open(p, "wb") as w:
        st = w._st
        for _ in range(8):
            w.write(os.urandom(window // 2 + 1))
            assert 0 <= st.credit <= window
    assert p.stat().st_size == 8 * (window // 2 + 1)
    assert not [e for e in client.take_errors() if e.kind == "window_exceeded"]


def test_directories(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    fs = client.fs
    d = tmp_path / "d"
    fs.mkdir(d, 0o750)
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    with pytest.raises(FileExistsError):
        fs.mkdir(d)
    fs.mkdir(d, exist_ok=True)
    fs.mkdir(d / "a" / "b" / "c", parents=True)
    with pytest.raises(FileExistsError):
        fs.mkdir(d / "a" / "b", parents=True)
    fs.mkdir(d / "a" / "b", parents=True, exist_ok=True)
    with pytest.raises(FileNotFoundError):
        fs.mkdir(d / "x" / "y")
    (d / "f1").write_bytes(b"12345")
    os.symlink("f1", d / "ln")
    assert sorted(fs.listdir(d)) == ["a", "f1", "ln"]
    entries = {e.name: e for e in fs.list(d, stat=True)}
    assert entries["a"].is_dir() and entries["f1"].is_file() and entries["ln"].is_symlink()
    f1 = entries["f1"].stat()
    assert f1 is not None and f1.size == 5 and entries["f1"].path == str(d / "f1")
    ln = entries["ln"].stat()
    assert ln is not None and ln.target == "f1"
    assert sorted(fs.iterdir(d)) == sorted(str(d / n) for n in ("a", "f1", "ln"))
    with fs.scandir(d) as it:
        assert sorted(e.name for e in it) == ["a", "f1", "ln"]


def test_a_big_directory_streams_in_batches(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    names = [f"entry-{i:04d}-{'x' * 120}" for i in range(700)]  # ~100 KiB of entries
    for n in names:
        (tmp_path / n).touch()
    fs = agentd.fs.FileSystem(client, window=65536)  # several FS_ENTRIES, acknowledged as consumed
    with fs.scandir(tmp_path) as it:
        got = [e.name for e in it]
    assert sorted(got) == names
    assert sorted(fs.listdir(tmp_path)) == names


def test_non_utf8_names_keep_their_bytes(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    raw = b"bad-\xff-name"
    with open(os.path.join(os.fsencode(tmp_path), raw), "wb"):
        pass
    (e,) = client.fs.list(tmp_path)
    assert e.name_bytes == raw and "\ufffd" in e.name


def test_remove_rename_links_metadata(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    fs = client.fs
    f = tmp_path / "f"
    f.write_bytes(b"x")
    fs.rename(f, tmp_path / "g")
    assert not f.exists() and (tmp_path / "g").read_bytes() == b"x"
    (tmp_path / "h").write_bytes(b"h")
    with pytest.raises(FileExistsError):
        fs.rename(tmp_path / "g", tmp_path / "h", replace=False)
    fs.replace(tmp_path / "g", tmp_path / "h")
    assert (tmp_path / "h").read_bytes() == b"x"
    fs.symlink("h", tmp_path / "l")
    assert os.readlink(tmp_path / "l") == "h" and fs.readlink(tmp_path / "l") == "h"
    assert fs.realpath(tmp_path / "l") == os.path.realpath(tmp_path / "h")
    assert fs.lstat(tmp_path / "l").type == "symlink" and fs.lstat(tmp_path / "l").target == "h"
    assert fs.stat(tmp_path / "l").type == "file"
    fs.chmod(tmp_path / "h", 0o4711)
    assert stat.S_IMODE((tmp_path / "h").stat().st_mode) == 0o4711
    fs.utime(tmp_path / "h", ns=(1_000_000_123, 2_000_000_456))
    assert (tmp_path / "h").stat().st_mtime_ns == 2_000_000_456
    assert (tmp_path / "h").stat().st_atime_ns == 1_000_000_123
    fs.utime(tmp_path / "h", (10.5, 20.25))
    assert (tmp_path / "h").stat().st_mtime == 20.25
    fs.utime(tmp_path / "l", ns=(5, 7), follow_symlinks=False)
    assert os.lstat(tmp_path / "l").st_mtime_ns == 7 and (tmp_path / "h").stat().st_mtime == 20.25
    before = time.time()
    fs.utime(tmp_path / "h")
    assert (tmp_path / "h").stat().st_mtime >= before - 1
    if is_root():
        fs.chown(tmp_path / "h", 65534, 65534)
        assert ((tmp_path / "h").stat().st_uid, (tmp_path / "h").stat().st_gid) == (65534, 65534)
        fs.chown(tmp_path / "l", gid=123, follow_symlinks=False)
        assert os.lstat(tmp_path / "l").st_gid == 123 and (tmp_path / "h").stat().st_gid == 65534
    with pytest.raises(ValueError):
        fs.chown(tmp_path / "h")
    fs.remove(tmp_path / "l")
    fs.unlink(tmp_path / "h")
    (tmp_path / "empty").mkdir()
    fs.remove(tmp_path / "empty")
    (tmp_path / "tree" / "a" / "b").mkdir(parents=True)
    (tmp_path / "tree" / "a" / "f").write_bytes(b"f")
    os.symlink("/etc", tmp_path / "tree" / "etc-link")
    with pytest.raises(agentd.FsNotEmpty) as ei:
        fs.remove(tmp_path / "tree")
    assert ei.value.errno == errno.ENOTEMPTY
    fs.rmtree(tmp_path / "tree")
    assert os.listdir(tmp_path) == [] and os.path.isdir("/etc")


def test_every_error_kind(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    fs = client.fs
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "child").touch()

    def raises(cls: Any, builtin: Any, kind: str, fn: Any, *args: Any, **kw: Any) -> agentd.FsError:
        with pytest.raises(cls) as ei:
            fn(*args, **kw)
        e = ei.value
        assert isinstance(e, builtin) and isinstance(e, OSError) and isinstance(e, agentd.AgentdError)
        assert e.kind == kind and (e.errno is not None or kind == "bad_user") and str(e)
        return e

    e = raises(agentd.FsNotFound, FileNotFoundError, "not_found", fs.stat, tmp_path / "nope")
    assert e.errno == errno.ENOENT and e.filename == str(tmp_path / "nope") and e.op == "stat"
    raises(agentd.FsNotFound, FileNotFoundError, "not_found", fs.read_bytes, tmp_path / "nope")
    raises(agentd.FsNotFound, FileNotFoundError, "not_found", fs.listdir, tmp_path / "nope")
    raises(agentd.FsNotFound, FileNotFoundError, "not_found", fs.download, tmp_path / "nope", tmp_path / "out")
    raises(agentd.FsExists, FileExistsError, "exists", fs.mkdir, tmp_path / "dir")
    raises(agentd.FsNotADirectory, NotADirectoryError, "not_a_directory", fs.listdir, tmp_path / "file")
    raises(agentd.FsNotADirectory, NotADirectoryError, "not_a_directory", fs.stat, tmp_path / "file" / "x")
    raises(agentd.FsIsADirectory, IsADirectoryError, "is_a_directory", fs.read_bytes, tmp_path / "dir")
    raises(agentd.FsIsADirectory, IsADirectoryError, "is_a_directory", fs.write_bytes, tmp_path / "dir", b"x")
    raises(agentd.FsNotEmpty, OSError, "not_empty", fs.remove, tmp_path / "dir")
    raises(agentd.FsNoSpace, OSError, "no_space", fs.write_bytes, "/dev/full", b"x" * 10)
    e = raises(agentd.FsInvalidRequest, OSError, "invalid_request", fs.chmod, tmp_path / "file", 0o17777)
    raises(agentd.FsInvalidRequest, OSError, "invalid_request", client.fs._simple, "bogus-op", tmp_path)
    raises(agentd.FsBadUser, OSError, "bad_user", fs.as_user("no-such-user-agentd").stat, tmp_path)
    os.symlink("loop2", tmp_path / "loop1")
    os.symlink("loop1", tmp_path / "loop2")
    e = raises(agentd.FsOther, OSError, "other", fs.stat, tmp_path / "loop1")
    assert e.errno == errno.ELOOP
    if is_root():
        # tmp_path's parents are root's 0700 directories: nobody may not pass them.
        nobody = fs.as_user("nobody")
        e = raises(agentd.FsPermissionDenied, PermissionError, "permission_denied", nobody.stat, tmp_path / "file")
        assert e.errno == errno.EACCES
        raises(agentd.FsPermissionDenied, PermissionError, "permission_denied", nobody.write_bytes, "/etc/x", b"")
        raises(agentd.FsPermissionDenied, PermissionError, "permission_denied", nobody.listdir, tmp_path)
    assert wait_until(lambda: not client._core.streams)


@pytest.mark.skipif(not is_root() or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_read_only_file_system(agentd_bin: str, tmp_path: pathlib.Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    script = f"mount -t tmpfs -o ro none {ro} && exec {agentd_bin} --stdio"
    try:
        c = agentd.Client.spawn_command(["unshare", "-m", "sh", "-c", script], ready_timeout=10)
    except (agentd.TransportClosed, OSError, TimeoutError) as e:
        pytest.skip(f"no private mount namespace here: {e}")
    with c:
        with pytest.raises(agentd.FsReadOnly) as ei:
            c.fs.write_bytes(ro / "x", b"x")
        assert ei.value.errno == errno.EROFS and ei.value.kind == "read_only"


def test_error_classes_for_kinds_not_provoked() -> None:
    for kind, cls, eno in [("resource", agentd.FsResource, errno.EAGAIN),
                           ("cancelled", agentd.FsCancelled, errno.ECANCELED),
                           ("duplicate_id", agentd.FsDuplicateId, None),
                           ("read_only", agentd.FsReadOnly, errno.EROFS)]:
        e = fs_error(kind, "m", path="/p", op="write")
        assert type(e) is cls and e.errno == eno and e.filename == "/p"
    e = fs_error("a_kind_from_a_later_agent", "m", errno=5)
    assert type(e) is agentd.FsError and e.errno == 5 and e.kind == "a_kind_from_a_later_agent"


def test_upload_download_round_trip(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    src = tmp_path / "src" / "tree"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "sub" / "exec.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(src / "sub" / "exec.sh", 0o755)
    (src / "private").write_bytes(os.urandom(200_000))
    os.chmod(src / "private", 0o600)
    (src / ("long-name-" + "n" * 150)).write_bytes(b"gnu long name")
    os.symlink("sub/exec.sh", src / "rel-link")
    os.symlink("/etc/hostname", src / "abs-link")
    os.link(src / "private", src / "hard")
    os.chmod(src / "empty", 0o700)
    os.utime(src / "sub" / "exec.sh", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    remote = tmp_path / "remote"
    nbytes, entries = client.fs.upload(src, remote)
    assert nbytes > 200_000 and entries == 10
    back = tmp_path / "back"
    nbytes2, entries2 = client.fs.download(remote / "tree", back)
    assert nbytes2 > 200_000 and entries2 == 10

    def snapshot(root: pathlib.Path) -> List[Any]:
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            for name in sorted(dirnames + filenames):
                p = pathlib.Path(dirpath) / name
                st = os.lstat(p)
                rel = str(p.relative_to(root))
                if stat.S_ISLNK(st.st_mode):
                    out.append((rel, "link", os.readlink(p)))
                elif stat.S_ISDIR(st.st_mode):
                    out.append((rel, "dir", stat.S_IMODE(st.st_mode)))
                else:
                    out.append((rel, "file", stat.S_IMODE(st.st_mode), p.read_bytes(), int(st.st_mtime)))
        return sorted(out)

    assert snapshot(remote / "tree") == snapshot(src)
    assert snapshot(back / "tree") == snapshot(src)
    # tar_put keeps hard links (tarfile writes them as LNKTYPE entries).
    assert os.stat(remote / "tree" / "hard").st_ino == os.stat(remote / "tree" / "private").st_ino
    assert not client._core.streams


def test_download_keeps_hard_links(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a").write_bytes(b"x")
    os.link(tmp_path / "t" / "a", tmp_path / "t" / "b")
    client.fs.download(tmp_path / "t", tmp_path / "back")
    assert os.stat(tmp_path / "back" / "t" / "a").st_ino == os.stat(tmp_path / "back" / "t" / "b").st_ino


def test_upload_a_single_file_and_refusals(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    f = tmp_path / "one.txt"
    f.write_bytes(b"one")
    client.fs.upload(f, tmp_path / "r")
    assert (tmp_path / "r" / "one.txt").read_bytes() == b"one"
    with pytest.raises(ValueError):
        client.fs.upload("/", tmp_path / "r")
    with pytest.raises(FileNotFoundError):
        client.fs.upload(tmp_path / "no-such-local", tmp_path / "r")
    assert wait_until(lambda: not client._core.streams)


def test_download_refuses_an_archive_that_escapes(tmp_path: pathlib.Path) -> None:
    import io
    import tarfile

    from agentd import _tar

    def archive(*members: Any) -> tarfile.TarFile:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for info, data in members:
                t.addfile(info, io.BytesIO(data) if data is not None else None)
        buf.seek(0)
        return tarfile.open(fileobj=buf, mode="r|")

    def member(name: str, type: bytes = tarfile.REGTYPE, linkname: str = "", data: bytes = b"") -> Any:
        i = tarfile.TarInfo(name)
        i.type = type
        i.linkname = linkname
        i.size = len(data) if type == tarfile.REGTYPE else 0
        return i, data if type == tarfile.REGTYPE else None

    dest = tmp_path / "dest"
    for bad in ([member("/etc/evil")], [member("../evil")], [member("a/../../evil")],
                [member("link", tarfile.SYMTYPE, str(tmp_path)), member("link/evil")],
                [member("h", tarfile.LNKTYPE, "../outside")]):
        with pytest.raises(agentd.FsInvalidRequest):
            _tar.extract(archive(*bad), str(dest))
    assert not (tmp_path / "evil").exists()
    # An existing symlink is replaced, never written through.
    os.symlink(tmp_path / "target", dest / "victim")
    _tar.extract(archive(member("victim", data=b"new")), str(dest))
    assert not (tmp_path / "target").exists() and (dest / "victim").read_bytes() == b"new"


def test_watch(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    fs = client.fs
    (tmp_path / "sub").mkdir()
    with fs.watch(tmp_path, recursive=True) as w:
        (tmp_path / "new").write_bytes(b"1")
        (tmp_path / "sub" / "inner").write_bytes(b"2")
        os.rename(tmp_path / "new", tmp_path / "moved")
        (tmp_path / "moved").unlink()
        (tmp_path / "later").mkdir()
        time.sleep(0.1)
        (tmp_path / "later" / "x").touch()
        seen: List[agentd.WatchEvent] = []
        want = {("created", "new"), ("created", "sub/inner"), ("moved_from", "new"), ("moved_to", "moved"),
                ("removed", "moved"), ("created", "later"), ("created", "later/x")}
        while not want <= {(e.type, e.path) for e in seen}:
            ev = w.next_event(timeout=10)
            assert ev is not None
            seen.append(ev)
        moves = [e for e in seen if e.type in ("moved_from", "moved_to")]
        assert moves[0].cookie is not None and moves[0].cookie == moves[1].cookie
        assert [e.is_dir for e in seen if e.path == "later"] == [True]
        with pytest.raises(TimeoutError):
            while True:  # the rest of what happened (modified, ...), then a quiet time: the watch goes on
                w.next_event(timeout=0.3)
        (tmp_path / "after-timeout").touch()
        ev = w.next_event(timeout=10)
        assert ev is not None and ev.path == "after-timeout"
    st = w._st
    assert isinstance(st.final, m.FsDone)
    assert list(w) == []


def test_watch_overflow_is_reported(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    try:
        limit = int(pathlib.Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    except OSError:
        pytest.skip("no inotify limits to read")
    if limit > 100_000:
        pytest.skip(f"max_queued_events is {limit}: too many files to overflow it quickly")
    fs = agentd.fs.FileSystem(client, window=65536)  # the agent's smallest watch window
    with fs.watch(tmp_path) as w:
        ev = None
        fds = [os.open(tmp_path / n, os.O_WRONLY | os.O_CREAT) for n in ("f1", "f2")]
        try:
            # Alternating, so the kernel cannot merge them, and while we do not read. The agent's
            # worker pipe holds some too, so several times the kernel's queue is needed.
            for i in range(limit * 4):
                os.write(fds[i % 2], b"x")
        finally:
            for fd in fds:
                os.close(fd)
        for _ in range(limit * 4 + 10):
            ev = w.next_event(timeout=10)
            assert ev is not None
            if ev.overflow:
                break
        assert ev is not None and ev.overflow


def test_feature_check_and_threads(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    errors: List[BaseException] = []

    def worker(i: int) -> None:
        try:
            p = tmp_path / f"t{i}"
            for j in range(20):
                data = os.urandom(1000 + j)
                client.fs.write_bytes(p, data)
                assert client.fs.read_bytes(p) == data
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []
    client._core.features = frozenset()
    with pytest.raises(agentd.FeatureNotServed):
        client.fs.stat("/")


def test_a_failing_read_is_answered_at_once(client: agentd.Client, tmp_path: pathlib.Path) -> None:
    """A read whose open fails gets its FS_ERROR without any FS_CANCEL (no probe, no timeout needed)."""
    from agentd import _ext

    req = m.FsRequest(op="read", path=str(tmp_path / "missing"))
    st = _ext.fs_stream(client._core, req)
    client._locked(st.start)
    assert wait_until(lambda: st.ended)
    assert isinstance(st.final, m.FsError) and st.final.kind == "not_found"


@pytest.mark.skipif(not is_root(), reason="needs root (to read as nobody)")
def test_read_permission_denied_where_stat_succeeds(client: agentd.Client) -> None:
    import tempfile

    d = tempfile.mkdtemp(prefix="agentd-py-")
    try:
        os.chmod(d, 0o755)
        p = os.path.join(d, "secret")
        with open(p, "wb") as f:
            f.write(b"secret")
        os.chmod(p, 0)
        with pytest.raises(PermissionError):
            client.fs.as_user("nobody").read_bytes(p, timeout=2)
    finally:
        shutil.rmtree(d)
