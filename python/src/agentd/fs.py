"""``client.fs``: the guest's files (extension ``fs``), shaped like :mod:`pathlib`, :mod:`os` and :mod:`shutil`.

Every call is one FS_REQUEST, run by the agent in a worker process of its
own (as the agent's user, or ``user`` given to :meth:`FileSystem.as_user`),
so a slow disk blocks only that call. Reads and writes stream with windows
both ways: :meth:`FileSystem.open` returns file objects that hold at most
one window of data in Python, and a writer waits for the agent's
acknowledgements instead of queueing. Failures are :class:`~agentd.FsError`
subclasses, which are also the builtin ``OSError`` subclasses where one
fits (:class:`FileNotFoundError`, :class:`PermissionError`, ...), with
``errno`` and ``filename``.

Paths are the guest's (POSIX); a relative path is relative to the user's
home directory in the guest.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Tuple, Union

from . import _ext
from . import _tar
from . import messages as m
from ._ext import DEFAULT_WINDOW, DirEntry, ExtStream, FileStat, WatchEvent
from .errors import FsExists, FsNotFound, TransportClosed

if TYPE_CHECKING:
    from .client import Client

__all__ = ["FileSystem", "RemoteReader", "RemoteWriter", "Watch", "ScandirIterator", "FileStat", "DirEntry",
           "WatchEvent"]

StrPath = Union[str, "os.PathLike[str]"]
Times = Optional[Tuple[float, float]]


def _p(path: StrPath) -> str:
    p = os.fspath(path)
    if not isinstance(p, str):
        raise TypeError(f"a guest path is a str, not {type(p).__name__}")
    return p


def ns_times(times: Times, ns: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """``os.utime``'s arguments as (atime_ns, mtime_ns); neither: the host's time now."""
    if times is not None and ns is not None:
        raise ValueError("utime: give times or ns, not both")
    if ns is not None:
        return int(ns[0]), int(ns[1])
    if times is not None:
        return int(times[0] * 1e9), int(times[1] * 1e9)
    now = time.time_ns()
    return now, now


def split_mode(mode: str) -> Tuple[str, bool]:
    """('r'|'w'|'a'|'x', binary) for an open() mode; refuses what the guest cannot give."""
    kinds = [c for c in mode if c in "rwax"]
    if len(kinds) != 1 or "+" in mode or any(c not in "rwaxbt" for c in mode) or ("b" in mode and "t" in mode):
        raise ValueError(f"invalid mode {mode!r}: one of r, w, a, x, with b or t (no '+': a guest file is read "
                         "or written as a stream)")
    return kinds[0], "b" in mode


class FileSystem:
    """The guest's file system through one client (``client.fs``); thread safe like the client.

    ``user`` (see :meth:`as_user`) runs every operation as that guest user,
    so the kernel's permission checks apply. ``window`` is the agent → host
    window of reads, listings and watches (bytes in flight per call).
    """

    def __init__(self, client: "Client", *, user: Optional[str] = None, window: int = DEFAULT_WINDOW) -> None:
        self._c = client
        self.user = user
        self.window = window

    def as_user(self, user: Union[str, int, None]) -> "FileSystem":
        """The same file system, operated on as guest ``user`` (``name``, ``uid``, ``name:group``, ``uid:gid``)."""
        return FileSystem(self._c, user=None if user is None else str(user), window=self.window)

    def _req(self, op: str, path: StrPath, **kw: Any) -> m.FsRequest:
        self._c.require_feature("fs")
        req = m.FsRequest(op=op, path=_p(path), user=self.user, window=self.window, **kw)
        req.encode_payload()  # a value out of range fails here, in the caller
        return req

    def _simple(self, op: str, path: StrPath, timeout: Optional[float] = None, **kw: Any) -> m.FsDone:
        return self._c._drive(_ext.fs_simple(self._c._core, self._req(op, path, **kw)), timeout)

    # --- metadata -------------------------------------------------------------------------

    def stat(self, path: StrPath, *, follow_symlinks: bool = True) -> FileStat:
        """The metadata of ``path`` (``follow_symlinks=False``: of a symlink itself, as :meth:`lstat`)."""
        done = self._simple("stat" if follow_symlinks else "lstat", path)
        assert done.stat is not None, "FS_DONE of stat without a stat record"
        return FileStat.of(done.stat)

    def lstat(self, path: StrPath) -> FileStat:
        """The metadata of ``path`` without following a symlink there (``target`` holds its target)."""
        return self.stat(path, follow_symlinks=False)

    def exists(self, path: StrPath) -> bool:
        """Whether ``path`` exists (following symlinks)."""
        try:
            self.stat(path)
        except FsNotFound:
            return False
        return True

    def is_dir(self, path: StrPath) -> bool:
        """Whether ``path`` is a directory (following symlinks)."""
        try:
            return self.stat(path).is_dir()
        except FsNotFound:
            return False

    def is_file(self, path: StrPath) -> bool:
        """Whether ``path`` is a regular file (following symlinks)."""
        try:
            return self.stat(path).is_file()
        except FsNotFound:
            return False

    def readlink(self, path: StrPath) -> str:
        """The target of the symlink ``path``."""
        done = self._simple("readlink", path)
        assert done.path is not None
        return done.path

    def realpath(self, path: StrPath) -> str:
        """``path`` made absolute with every symlink resolved (it must exist)."""
        done = self._simple("realpath", path)
        assert done.path is not None
        return done.path

    # --- whole files ----------------------------------------------------------------------------

    def read_bytes(self, path: StrPath, *, offset: int = 0, length: Optional[int] = None,
                   timeout: Optional[float] = None) -> bytes:
        """The file's bytes (from ``offset``, at most ``length``)."""
        req = self._req("read", path, offset=offset, length=length)
        return self._c._drive(_ext.fs_read_all(self._c._core, req), timeout)

    def read_text(self, path: StrPath, encoding: str = "utf-8", errors: str = "strict") -> str:
        """The file decoded as text."""
        return self.read_bytes(path).decode(encoding, errors)

    def write_bytes(
        self,
        path: StrPath,
        data: m.Buffer,
        *,
        mode: int = 0o644,
        atomic: bool = False,
        parents: bool = False,
        append: bool = False,
        exclusive: bool = False,
        create: bool = True,
        timeout: Optional[float] = None,
    ) -> int:
        """Write ``data`` to the file (truncating it, or ``append``); returns the bytes written.

        ``mode``: permission bits of a new file. ``atomic``: written to a
        temporary file in the same directory and renamed into place, so a
        reader never sees half of it and a failure leaves nothing.
        ``parents``: create missing directories. ``exclusive``: the file must
        not exist (:class:`FileExistsError`). ``create=False``: it must.
        """
        req = self._req("write", path, mode=mode, atomic=atomic, parents=parents, append=append,
                        exclusive=exclusive, create=create)
        done = self._c._drive(_ext.fs_write_all(self._c._core, req, data), timeout)
        return done.bytes if done.bytes is not None else len(memoryview(data).cast("B"))

    def write_text(self, path: StrPath, text: str, encoding: str = "utf-8", errors: str = "strict",
                   **kwargs: Any) -> int:
        """Write ``text`` encoded; keyword arguments as :meth:`write_bytes`. Returns the bytes written."""
        return self.write_bytes(path, text.encode(encoding, errors), **kwargs)

    def open(
        self,
        path: StrPath,
        mode: str = "rb",
        *,
        encoding: Optional[str] = None,
        errors: Optional[str] = None,
        newline: Optional[str] = None,
        offset: int = 0,
        length: Optional[int] = None,
        file_mode: int = 0o644,
        atomic: bool = False,
        parents: bool = False,
    ) -> Any:
        """A streaming file object: ``"rb"`` a :class:`RemoteReader`, ``"wb"``/``"ab"``/``"xb"`` a :class:`RemoteWriter`.

        Text modes (``"r"``, ``"w"``, ...) wrap them in :class:`io.TextIOWrapper`.
        Open errors are raised here. A writer's data is complete when it is
        closed (leaving a ``with`` block normally); leaving it with an
        exception cancels the write (``atomic`` then leaves nothing).
        """
        kind, binary = split_mode(mode)
        raw: Union[RemoteReader, RemoteWriter]
        if kind == "r":
            req = self._req("read", path, offset=offset, length=length)
            st, stat = self._c._drive(_ext.fs_open_read(self._c._core, req))
            raw = RemoteReader(self._c, st, req.path, stat)
        else:
            req = self._req("write", path, mode=file_mode, atomic=atomic, parents=parents, append=kind == "a",
                            exclusive=kind == "x")
            st = self._c._drive(_ext.fs_open_write(self._c._core, req))
            raw = RemoteWriter(self._c, st, req.path)
        if binary:
            return raw
        if kind == "r":
            return io.TextIOWrapper(raw, encoding=encoding or "utf-8", errors=errors, newline=newline)
        return io.TextIOWrapper(raw, encoding=encoding or "utf-8", errors=errors, newline=newline,
                                write_through=True)

    # --- directories ------------------------------------------------------------------------------

    def scandir(self, path: StrPath = ".", *, stat: bool = False) -> "ScandirIterator":
        """The entries of a directory as they stream in (``os.scandir``-like; ``stat=True``: with metadata)."""
        req = self._req("list", path, stat=stat)
        st = _ext.fs_stream(self._c._core, req)
        self._c._locked(st.start)
        return ScandirIterator(self._c, st, req.path)

    def listdir(self, path: StrPath = ".") -> List[str]:
        """The names in a directory (not ``.`` and ``..``), in the directory's order."""
        return [e.name for e in self.list(path)]

    def list(self, path: StrPath = ".", *, stat: bool = False) -> List[DirEntry]:
        """Every entry of a directory (``stat=True``: with metadata)."""
        req = self._req("list", path, stat=stat)
        return self._c._drive(_ext.fs_list_all(self._c._core, req))

    def iterdir(self, path: StrPath = ".") -> Iterator[str]:
        """The paths of a directory's entries (``path`` joined with each name), as ``pathlib.Path.iterdir``."""
        with self.scandir(path) as it:
            for e in it:
                yield e.path

    def mkdir(self, path: StrPath, mode: int = 0o755, *, parents: bool = False, exist_ok: bool = False) -> None:
        """Create a directory, as ``pathlib.Path.mkdir`` (``parents``: missing parents too, mode 0o755)."""
        try:
            if parents and not exist_ok:
                try:
                    self._simple("mkdir", path, mode=mode)
                    return
                except FsNotFound:
                    pass
            self._simple("mkdir", path, mode=mode, parents=parents)
        except FsExists:
            if not exist_ok or not self.is_dir(path):
                raise

    def makedirs(self, path: StrPath, mode: int = 0o755, exist_ok: bool = False) -> None:
        """``os.makedirs``."""
        self.mkdir(path, mode, parents=True, exist_ok=exist_ok)

    def remove(self, path: StrPath) -> None:
        """Remove a file, a symlink or an empty directory."""
        self._simple("remove", path)

    unlink = remove

    def rmtree(self, path: StrPath) -> None:
        """Remove a whole tree (files, symlinks, directories; symlinks are not followed)."""
        self._simple("remove", path, recursive=True)

    def rename(self, src: StrPath, dst: StrPath, *, replace: bool = True) -> None:
        """Rename ``src`` to ``dst`` (an existing ``dst`` is replaced unless ``replace=False``: FileExistsError)."""
        self._simple("rename", src, to=_p(dst), replace=replace)

    def replace(self, src: StrPath, dst: StrPath) -> None:
        """``os.replace``."""
        self.rename(src, dst, replace=True)

    def chmod(self, path: StrPath, mode: int) -> None:
        """Set the permission bits (at most 0o7777)."""
        self._simple("chmod", path, mode=mode)

    def chown(self, path: StrPath, uid: Optional[int] = None, gid: Optional[int] = None, *,
              follow_symlinks: bool = True) -> None:
        """Set the owner and/or group (-1 or None: unchanged)."""
        u = None if uid is None or uid == -1 else uid
        g = None if gid is None or gid == -1 else gid
        if u is None and g is None:
            raise ValueError("chown: give uid, gid or both")
        self._simple("chown", path, uid=u, gid=g, follow=follow_symlinks)

    def utime(self, path: StrPath, times: Times = None, *, ns: Optional[Tuple[int, int]] = None,
              follow_symlinks: bool = True) -> None:
        """Set access and modification times, as ``os.utime`` (neither ``times`` nor ``ns``: the host's time now)."""
        a, mt = ns_times(times, ns)
        self._simple("utimes", path, atime_ns=a, mtime_ns=mt, follow=follow_symlinks)

    def symlink(self, target: str, path: StrPath) -> None:
        """Create the symlink ``path`` pointing to ``target`` (as ``os.symlink(target, path)``)."""
        self._simple("symlink", path, target=target)

    # --- trees ---------------------------------------------------------------------------------------

    def upload(self, local: StrPath, remote_dir: StrPath, *, owners: bool = False,
               timeout: Optional[float] = None) -> Tuple[int, int]:
        """Copy the local file or tree ``local`` into the guest directory ``remote_dir`` (created if missing).

        It lands as ``remote_dir/NAME`` (``NAME`` being ``local``'s last
        component), like ``docker cp`` and ``tar -C``: modes, times,
        symlinks (not followed), hard links and empty directories are kept;
        ``owners=True`` keeps uids and gids too (takes a root user). One
        tar_put stream, built on the fly by :mod:`tarfile`. Returns the
        agent's ``(bytes, entries)``.
        """
        local_s = os.fspath(local)
        req = self._req("tar_put", remote_dir, parents=True, owners=owners)
        st = self._c._drive(_ext.fs_open_write(self._c._core, req))
        w = RemoteWriter(self._c, st, req.path)
        try:
            _tar.add_tree(w, local_s)  # type: ignore[arg-type]
        except BaseException:
            w.abort()
            raise
        done = w.finish(timeout)
        return done.bytes or 0, done.entries or 0

    def download(self, remote: StrPath, local_dir: StrPath, *, timeout: Optional[float] = None) -> Tuple[int, int]:
        """Copy the guest file or tree ``remote`` into the local directory ``local_dir`` (as ``local_dir/NAME``).

        One tar_get stream, extracted as it arrives. The archive is checked
        entry by entry (no absolute names, no ``..``, nothing written
        through a symlink or outside ``local_dir``). Returns ``(bytes, entries)``.
        """
        req = self._req("tar_get", remote)
        st, _stat = self._c._drive(_ext.fs_open_read(self._c._core, req))
        r = RemoteReader(self._c, st, req.path, _stat)
        try:
            with tarfile.open(fileobj=r, mode="r|") as tar:
                n, _names = _tar.extract(tar, os.fspath(local_dir))
            done = self._c._drive(_ext.wait_for(st, st.try_final), timeout)
        except BaseException:
            r.close()
            raise
        assert isinstance(done, m.FsDone)
        return done.bytes or 0, done.entries if done.entries is not None else n

    def watch(self, path: StrPath, *, recursive: bool = False) -> "Watch":
        """Watch ``path`` for changes: an iterator of :class:`WatchEvent` (close it, or leave its ``with``, to stop).

        Returns once the watches are set, so changes made afterwards are
        seen. Events wait in the guest's kernel while you do not read; if
        its queue overflows, the next event has ``overflow=True``.
        """
        req = self._req("watch", path, recursive=recursive)
        st = self._c._drive(_ext.fs_open_watch(self._c._core, req))
        return Watch(self._c, st)


class RemoteReader(io.BufferedIOBase):
    """A guest file open for reading (FS_DATA within the window; reading acknowledges). ``stat`` from FS_OPENED."""

    def __init__(self, client: "Client", st: ExtStream, path: str, stat: Optional[FileStat]) -> None:
        super().__init__()
        self._c = client
        self._st = st
        self.name = path
        self.stat = stat

    def __del__(self) -> None:  # from the garbage collector: cancel without waiting
        st = getattr(self, "_st", None)
        if st is not None and not st.ended:
            self._c._defer(st.cancel)

    def readable(self) -> bool:
        return True

    def _read(self, n: int) -> bytes:
        if self.closed:
            raise ValueError("read from a closed file")
        st = self._st
        return self._c._drive(_ext.wait_for(st, lambda: st.try_read(n)))

    def read1(self, size: int = -1) -> bytes:
        """What is there (at most ``size``), waiting only if nothing is; ``b""`` at the end."""
        return self._read(size if size is not None and size >= 0 else -1)

    def read(self, size: Optional[int] = -1) -> bytes:
        """``size`` bytes (fewer only at the end); the rest of the file when ``size`` is negative."""
        parts: List[bytes] = []
        want = -1 if size is None or size < 0 else size
        while want != 0:
            b = self._read(want)
            if not b:
                break
            parts.append(b)
            if want > 0:
                want -= len(b)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        data = self.read(len(mv))
        mv[: len(data)] = data
        return len(data)

    def readinto1(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        data = self.read1(len(mv))
        mv[: len(data)] = data
        return len(data)

    @property
    def done(self) -> Optional[m.FsDone]:
        """FS_DONE once the whole file was read."""
        f = self._st.final
        return f if isinstance(f, m.FsDone) else None

    def close(self) -> None:
        """Stop: FS_CANCEL if the read has not finished (the rest is not sent)."""
        if self.closed:
            return
        try:
            self._c._locked(self._st.cancel)
        except TransportClosed:
            pass
        finally:
            super().close()


class RemoteWriter(io.BufferedIOBase):
    """A guest file open for writing: :meth:`write` waits for window; :meth:`close` completes it (FS_END, FS_DONE)."""

    def __init__(self, client: "Client", st: ExtStream, path: str) -> None:
        super().__init__()
        self._c = client
        self._st = st
        self.name = path
        self.result: Optional[m.FsDone] = None

    def __del__(self) -> None:
        st = getattr(self, "_st", None)
        if st is not None and not st.ended:
            self._c._defer(st.cancel)

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        """Send all of ``data`` (waiting while the agent's window is used up); returns its length."""
        if self.closed:
            raise ValueError("write to a closed file")
        return self._c._drive(_ext.push_all(self._st, data))

    def flush(self) -> None:
        """Frames go out as they are queued; this waits until the agent has taken every byte so far."""
        if not self.closed:
            st = self._st
            self._c._drive(_ext.wait_for(st, st.try_drained))
            if st.error is not None or st.closed is not None:
                st.raise_failure()

    def finish(self, timeout: Optional[float] = None) -> m.FsDone:
        """FS_END and wait for FS_DONE (raises the FS_ERROR if the write failed); the file is then closed."""
        if self.result is not None:
            return self.result
        try:
            self.result = self._c._drive(_ext.finish_write(self._st), timeout)
        finally:
            super().close()
        return self.result

    def abort(self) -> None:
        """Cancel the write (FS_CANCEL): an ``atomic`` write leaves nothing, another what was written."""
        try:
            self._c._locked(self._st.cancel)
        except TransportClosed:
            pass
        finally:
            super().close()

    def close(self) -> None:
        """Complete the write: see :meth:`finish`."""
        if not self.closed:
            self.finish()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


class ScandirIterator:
    """The entries of a guest directory as they stream in; a context manager (closing it cancels the listing)."""

    def __init__(self, client: "Client", st: ExtStream, path: str) -> None:
        self._c = client
        self._st = st
        self._path = path
        self._batch: List[DirEntry] = []
        self._done = False

    def __del__(self) -> None:  # abandoned unfinished: cancel without waiting
        st = getattr(self, "_st", None)
        if st is not None and not st.ended:
            self._c._defer(st.cancel)

    def __iter__(self) -> "ScandirIterator":
        return self

    def __next__(self) -> DirEntry:
        while not self._batch:
            if self._done:
                raise StopIteration
            batch = self._c._drive(_ext.next_entries(self._st, self._path))
            if batch is None:
                self._done = True
                raise StopIteration
            self._batch = batch[::-1]
        return self._batch.pop()

    def close(self) -> None:
        """Stop listing (FS_CANCEL if the agent is not done)."""
        self._done = True
        self._batch = []
        try:
            self._c._locked(self._st.cancel)
        except TransportClosed:
            pass

    def __enter__(self) -> "ScandirIterator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Watch:
    """A watch on a guest path: iterate for :class:`WatchEvent`; :meth:`close` ends it (FS_CANCEL, FS_DONE)."""

    def __init__(self, client: "Client", st: ExtStream) -> None:
        self._c = client
        self._st = st
        self._batch: List[WatchEvent] = []
        self._done = False

    def __iter__(self) -> "Watch":
        return self

    def __next__(self) -> WatchEvent:
        ev = self.next_event()
        if ev is None:
            raise StopIteration
        return ev

    def next_event(self, timeout: Optional[float] = None) -> Optional[WatchEvent]:
        """The next event; None once the watch ended; TimeoutError after ``timeout`` seconds without one."""
        while not self._batch:
            if self._done:
                return None
            batch = self._c._drive(_ext.next_events(self._st), timeout)
            if batch is None:
                self._done = True
                return None
            self._batch = batch[::-1]
        return self._batch.pop()

    def close(self) -> None:
        """End the watch and wait for FS_DONE."""
        if self._done and self._st.ended:
            return
        self._done = True
        self._batch = []
        try:
            self._c._drive(_ext.stop_watch(self._st), 10.0)
        except TransportClosed:
            pass

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

