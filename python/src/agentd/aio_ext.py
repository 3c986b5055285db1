"""The asyncio twins of :mod:`agentd.fs` and :mod:`agentd.net`: ``client.fs``, ``client.connect_tcp``, ...

Same operations, same protocol code (the generators of ``agentd._ext``,
driven by :meth:`agentd.aio.AsyncClient._drive`), awaited instead of
blocking. Cancelling a call cancels what it started in the guest: a
cancelled ``read_bytes``/``write_bytes``/``upload`` sends FS_CANCEL (an
``atomic`` write leaves nothing), a cancelled connect closes the
connection; cancelling a read of an open file, a ``recv`` or a wait for the
next watch event loses nothing. ``upload``/``download`` run :mod:`tarfile`
in a worker thread that streams through the connection (no temporary
file, the same windows).
"""

from __future__ import annotations

import asyncio
import os
import socket
import tarfile
from typing import TYPE_CHECKING, Any, AsyncIterator, List, Optional, Set, Tuple, Union

from . import _ext
from . import _tar
from . import messages as m
from ._ext import DEFAULT_WINDOW, DirEntry, ExtStream, FileStat, WatchEvent
from .errors import FsExists, FsNotFound, NetError, TransportClosed
from .fs import StrPath, Times, _p, ns_times, split_mode
from .net import Address, host_wait, tcp_request, unix_request

if TYPE_CHECKING:
    from .aio import AsyncClient

__all__ = ["AsyncFileSystem", "AsyncReader", "AsyncWriter", "AsyncWatch", "AsyncNet", "AsyncConnection",
           "AsyncForwarder"]


class AsyncFileSystem:
    """``client.fs`` of an :class:`~agentd.aio.AsyncClient`: the operations of :class:`agentd.fs.FileSystem`, awaited."""

    def __init__(self, client: "AsyncClient", *, user: Optional[str] = None, window: int = DEFAULT_WINDOW) -> None:
        self._c = client
        self.user = user
        self.window = window

    def as_user(self, user: Union[str, int, None]) -> "AsyncFileSystem":
        """The same file system, operated on as guest ``user``."""
        return AsyncFileSystem(self._c, user=None if user is None else str(user), window=self.window)

    def _req(self, op: str, path: StrPath, **kw: Any) -> m.FsRequest:
        self._c.require_feature("fs")
        req = m.FsRequest(op=op, path=_p(path), user=self.user, window=self.window, **kw)
        req.encode_payload()
        return req

    async def _simple(self, op: str, path: StrPath, **kw: Any) -> m.FsDone:
        return await self._c._drive(_ext.fs_simple(self._c._core, self._req(op, path, **kw)))

    async def stat(self, path: StrPath, *, follow_symlinks: bool = True) -> FileStat:
        done = await self._simple("stat" if follow_symlinks else "lstat", path)
        assert done.stat is not None
        return FileStat.of(done.stat)

    async def lstat(self, path: StrPath) -> FileStat:
        return await self.stat(path, follow_symlinks=False)

    async def exists(self, path: StrPath) -> bool:
        try:
            await self.stat(path)
        except FsNotFound:
            return False
        return True

    async def is_dir(self, path: StrPath) -> bool:
        try:
            return (await self.stat(path)).is_dir()
        except FsNotFound:
            return False

    async def readlink(self, path: StrPath) -> str:
        done = await self._simple("readlink", path)
        assert done.path is not None
        return done.path

    async def realpath(self, path: StrPath) -> str:
        done = await self._simple("realpath", path)
        assert done.path is not None
        return done.path

    async def read_bytes(self, path: StrPath, *, offset: int = 0, length: Optional[int] = None) -> bytes:
        req = self._req("read", path, offset=offset, length=length)
        return await self._c._drive(_ext.fs_read_all(self._c._core, req))

    async def read_text(self, path: StrPath, encoding: str = "utf-8", errors: str = "strict") -> str:
        return (await self.read_bytes(path)).decode(encoding, errors)

    async def write_bytes(self, path: StrPath, data: m.Buffer, *, mode: int = 0o644, atomic: bool = False,
                          parents: bool = False, append: bool = False, exclusive: bool = False,
                          create: bool = True) -> int:
        req = self._req("write", path, mode=mode, atomic=atomic, parents=parents, append=append,
                        exclusive=exclusive, create=create)
        done = await self._c._drive(_ext.fs_write_all(self._c._core, req, data))
        return done.bytes if done.bytes is not None else len(memoryview(data).cast("B"))

    async def write_text(self, path: StrPath, text: str, encoding: str = "utf-8", errors: str = "strict",
                         **kwargs: Any) -> int:
        return await self.write_bytes(path, text.encode(encoding, errors), **kwargs)

    async def open(self, path: StrPath, mode: str = "rb", *, offset: int = 0, length: Optional[int] = None,
                   file_mode: int = 0o644, atomic: bool = False, parents: bool = False
                   ) -> Union["AsyncReader", "AsyncWriter"]:
        """``"rb"``: an :class:`AsyncReader`; ``"wb"``/``"ab"``/``"xb"``: an :class:`AsyncWriter` (binary only)."""
        kind, binary = split_mode(mode)
        if not binary:
            raise ValueError("the asyncio file objects are binary: open with 'rb', 'wb', 'ab' or 'xb'")
        if kind == "r":
            req = self._req("read", path, offset=offset, length=length)
            st, stat = await self._c._drive(_ext.fs_open_read(self._c._core, req))
            return AsyncReader(self._c, st, req.path, stat)
        req = self._req("write", path, mode=file_mode, atomic=atomic, parents=parents, append=kind == "a",
                        exclusive=kind == "x")
        st = await self._c._drive(_ext.fs_open_write(self._c._core, req))
        return AsyncWriter(self._c, st, req.path)

    async def list(self, path: StrPath = ".", *, stat: bool = False) -> List[DirEntry]:
        req = self._req("list", path, stat=stat)
        return await self._c._drive(_ext.fs_list_all(self._c._core, req))

    async def listdir(self, path: StrPath = ".") -> List[str]:
        return [e.name for e in await self.list(path)]

    async def scandir(self, path: StrPath = ".", *, stat: bool = False) -> AsyncIterator[DirEntry]:
        """The entries as they stream in (an async generator; leaving it early cancels the listing)."""
        req = self._req("list", path, stat=stat)
        st = _ext.fs_stream(self._c._core, req)
        st.start()
        self._c._flush()
        try:
            while True:
                batch = await self._c._drive(_ext.next_entries(st, req.path))
                if batch is None:
                    return
                for e in batch:
                    yield e
        finally:
            st.cancel()
            self._c._flush()

    async def mkdir(self, path: StrPath, mode: int = 0o755, *, parents: bool = False, exist_ok: bool = False) -> None:
        try:
            if parents and not exist_ok:
                try:
                    await self._simple("mkdir", path, mode=mode)
                    return
                except FsNotFound:
                    pass
            await self._simple("mkdir", path, mode=mode, parents=parents)
        except FsExists:
            if not exist_ok or not await self.is_dir(path):
                raise

    async def remove(self, path: StrPath) -> None:
        await self._simple("remove", path)

    async def rmtree(self, path: StrPath) -> None:
        await self._simple("remove", path, recursive=True)

    async def rename(self, src: StrPath, dst: StrPath, *, replace: bool = True) -> None:
        await self._simple("rename", src, to=_p(dst), replace=replace)

    async def chmod(self, path: StrPath, mode: int) -> None:
        await self._simple("chmod", path, mode=mode)

    async def chown(self, path: StrPath, uid: Optional[int] = None, gid: Optional[int] = None, *,
                    follow_symlinks: bool = True) -> None:
        u = None if uid is None or uid == -1 else uid
        g = None if gid is None or gid == -1 else gid
        if u is None and g is None:
            raise ValueError("chown: give uid, gid or both")
        await self._simple("chown", path, uid=u, gid=g, follow=follow_symlinks)

    async def utime(self, path: StrPath, times: Times = None, *, ns: Optional[Tuple[int, int]] = None,
                    follow_symlinks: bool = True) -> None:
        a, mt = ns_times(times, ns)
        await self._simple("utimes", path, atime_ns=a, mtime_ns=mt, follow=follow_symlinks)

    async def symlink(self, target: str, path: StrPath) -> None:
        await self._simple("symlink", path, target=target)

    async def upload(self, local: StrPath, remote_dir: StrPath, *, owners: bool = False) -> Tuple[int, int]:
        """As :meth:`agentd.fs.FileSystem.upload`; tarfile runs in a thread, streaming through the window."""
        local_s = os.fspath(local)
        req = self._req("tar_put", remote_dir, parents=True, owners=owners)
        st = await self._c._drive(_ext.fs_open_write(self._c._core, req))
        w = AsyncWriter(self._c, st, req.path)
        loop = asyncio.get_running_loop()
        bridge = _SyncWriter(w, loop)
        try:
            await loop.run_in_executor(None, _tar.add_tree, bridge, local_s)  # type: ignore[arg-type]
        except BaseException:
            w.abort()
            raise
        done = await w.finish()
        return done.bytes or 0, done.entries or 0

    async def download(self, remote: StrPath, local_dir: StrPath) -> Tuple[int, int]:
        """As :meth:`agentd.fs.FileSystem.download`; tarfile runs in a thread, reading through the window."""
        req = self._req("tar_get", remote)
        st, stat = await self._c._drive(_ext.fs_open_read(self._c._core, req))
        r = AsyncReader(self._c, st, req.path, stat)
        loop = asyncio.get_running_loop()
        bridge = _SyncReader(r, loop)
        dest = os.fspath(local_dir)

        def work() -> int:
            with tarfile.open(fileobj=bridge, mode="r|") as tar:  # type: ignore[call-overload]
                return _tar.extract(tar, dest)[0]

        try:
            n = await loop.run_in_executor(None, work)
            done = await self._c._drive(_ext.wait_for(st, st.try_final))
        except BaseException:
            r.close()
            raise
        assert isinstance(done, m.FsDone)
        return done.bytes or 0, done.entries if done.entries is not None else n

    async def watch(self, path: StrPath, *, recursive: bool = False) -> "AsyncWatch":
        req = self._req("watch", path, recursive=recursive)
        st = await self._c._drive(_ext.fs_open_watch(self._c._core, req))
        return AsyncWatch(self._c, st)


class _SyncWriter:
    """A blocking file-like writer for a worker thread, writing through an AsyncWriter on the loop."""

    def __init__(self, w: "AsyncWriter", loop: asyncio.AbstractEventLoop) -> None:
        self._w = w
        self._loop = loop

    def write(self, data: Any) -> int:
        b = bytes(data)
        return asyncio.run_coroutine_threadsafe(self._w.write(b), self._loop).result()

    def flush(self) -> None:
        pass


class _SyncReader:
    def __init__(self, r: "AsyncReader", loop: asyncio.AbstractEventLoop) -> None:
        self._r = r
        self._loop = loop

    def read(self, n: int = -1) -> bytes:
        return asyncio.run_coroutine_threadsafe(self._r.read(n), self._loop).result()


class AsyncReader:
    """A guest file open for reading (``await read(n)``, ``async for chunk in reader``); ``stat`` from FS_OPENED."""

    def __init__(self, client: "AsyncClient", st: ExtStream, path: str, stat: Optional[FileStat]) -> None:
        self._c = client
        self._st = st
        self.name = path
        self.stat = stat
        self.closed = False

    async def read1(self, n: int = -1) -> bytes:
        if self.closed:
            raise ValueError("read from a closed file")
        st = self._st
        return await self._c._drive(_ext.wait_for(st, lambda: st.try_read(n)))

    async def read(self, n: int = -1) -> bytes:
        parts: List[bytes] = []
        want = n if n is not None and n >= 0 else -1
        while want != 0:
            b = await self.read1(want)
            if not b:
                break
            parts.append(b)
            if want > 0:
                want -= len(b)
        return b"".join(parts)

    def __aiter__(self) -> "AsyncReader":
        return self

    async def __anext__(self) -> bytes:
        b = await self.read1()
        if not b:
            raise StopAsyncIteration
        return b

    def close(self) -> None:
        """FS_CANCEL if the read has not finished."""
        if self.closed:
            return
        self.closed = True
        try:
            self._st.cancel()
            self._c._flush()
        except TransportClosed:
            pass

    async def __aenter__(self) -> "AsyncReader":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class AsyncWriter:
    """A guest file open for writing: ``await write(data)`` waits for window; ``await finish()`` completes it."""

    def __init__(self, client: "AsyncClient", st: ExtStream, path: str) -> None:
        self._c = client
        self._st = st
        self.name = path
        self.result: Optional[m.FsDone] = None
        self.closed = False

    async def write(self, data: m.Buffer) -> int:
        if self.closed:
            raise ValueError("write to a closed file")
        return await self._c._drive(_ext.push_all(self._st, data))

    async def drain(self) -> None:
        """Wait until the agent has taken every byte written so far."""
        st = self._st
        await self._c._drive(_ext.wait_for(st, st.try_drained))

    async def finish(self) -> m.FsDone:
        """FS_END, then FS_DONE (raises the FS_ERROR if the write failed)."""
        if self.result is not None:
            return self.result
        try:
            self.result = await self._c._drive(_ext.finish_write(self._st))
        finally:
            self.closed = True
        return self.result

    aclose = finish

    def abort(self) -> None:
        """FS_CANCEL: an ``atomic`` write leaves nothing."""
        self.closed = True
        try:
            self._st.cancel()
            self._c._flush()
        except TransportClosed:
            pass

    async def __aenter__(self) -> "AsyncWriter":
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        else:
            await self.finish()


class AsyncWatch:
    """A watch: ``async for event in watch``; ``await watch.aclose()`` ends it."""

    def __init__(self, client: "AsyncClient", st: ExtStream) -> None:
        self._c = client
        self._st = st
        self._batch: List[WatchEvent] = []
        self._done = False

    def __aiter__(self) -> "AsyncWatch":
        return self

    async def __anext__(self) -> WatchEvent:
        ev = await self.next_event()
        if ev is None:
            raise StopAsyncIteration
        return ev

    async def next_event(self, timeout: Optional[float] = None) -> Optional[WatchEvent]:
        """The next event; None once ended; TimeoutError after ``timeout`` (the watch goes on)."""
        while not self._batch:
            if self._done:
                return None
            batch = await self._c._drive(_ext.next_events(self._st), timeout)
            if batch is None:
                self._done = True
                return None
            self._batch = batch[::-1]
        return self._batch.pop()

    async def aclose(self) -> None:
        if self._done and self._st.ended:
            return
        self._done = True
        self._batch = []
        try:
            await self._c._drive(_ext.stop_watch(self._st), 10.0)
        except TransportClosed:
            pass

    async def __aenter__(self) -> "AsyncWatch":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncNet:
    """``client.net`` of an :class:`~agentd.aio.AsyncClient`."""

    def __init__(self, client: "AsyncClient", *, user: Optional[str] = None, window: int = DEFAULT_WINDOW) -> None:
        self._c = client
        self.user = user
        self.window = window

    async def _open(self, req: m.NetConnect, target: str, timeout: Optional[float]) -> "AsyncConnection":
        self._c.require_feature("net")
        st, connected = await self._c._drive(_ext.net_connect(self._c._core, req, target), host_wait(timeout))
        return AsyncConnection(self._c, st, connected, target)

    async def connect_tcp(self, address: Address, *, timeout: Optional[float] = 10.0,
                          user: Union[str, int, None] = None, window: Optional[int] = None) -> "AsyncConnection":
        u = self.user if user is None else str(user)
        req, target = tcp_request(address, timeout=timeout, user=u, window=window or self.window)
        return await self._open(req, target, timeout)

    async def connect_unix(self, path: str, *, timeout: Optional[float] = 10.0,
                           user: Union[str, int, None] = None, window: Optional[int] = None) -> "AsyncConnection":
        u = self.user if user is None else str(user)
        req, target = unix_request(os.fspath(path), timeout=timeout, user=u, window=window or self.window)
        return await self._open(req, target, timeout)

    async def forward(self, local_port: int, remote: Address, *, local_host: str = "127.0.0.1",
                      connect_timeout: Optional[float] = 10.0) -> "AsyncForwarder":
        self._c.require_feature("net")
        fw = AsyncForwarder(self, remote, connect_timeout)
        await fw._start(local_host, local_port)
        return fw


class AsyncConnection:
    """A connection to a guest socket for asyncio: ``await sendall``, ``await recv``, ``shutdown``, ``close``."""

    def __init__(self, client: "AsyncClient", st: ExtStream, connected: m.NetConnected, target: str) -> None:
        self._c = client
        self._st = st
        self.peer = connected.peer
        self.local = connected.local
        self.target = target
        self.closed = False

    def _check(self) -> None:
        if self.closed:
            raise OSError(9, "Bad file descriptor: the connection is closed")

    async def sendall(self, data: m.Buffer) -> None:
        """Send all of ``data``; cancelled, the connection is closed (part of it may have gone)."""
        self._check()
        await self._c._drive(_ext.push_all(self._st, data))

    async def recv(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` bytes; ``b""`` once the guest side shut down. Cancelling loses nothing."""
        self._check()
        st = self._st
        return await self._c._drive(_ext.wait_for(st, lambda: st.try_read(bufsize)))

    async def read(self, n: int = -1) -> bytes:
        """``n`` bytes (fewer at the end); everything to the guest's end of file when ``n`` < 0."""
        parts: List[bytes] = []
        want = n
        while want != 0:
            b = await self.recv(65536 if want < 0 else want)
            if not b:
                break
            parts.append(b)
            if want > 0:
                want -= len(b)
        return b"".join(parts)

    def shutdown(self, how: int = socket.SHUT_WR) -> None:
        """``SHUT_WR``: NET_SHUTDOWN (the guest reads end of file); ``SHUT_RD``/``SHUT_RDWR`` as the sync twin."""
        self._check()
        st = self._st
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            st.close_send(m.NetShutdown())
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            st.discard = True
            n = st.buffered
            st.data.clear()
            st.data_off = st.buffered = 0
            st._consumed(n)
        self._c._flush()

    def close(self, *, reset: bool = False) -> None:
        """NET_CLOSE now (``reset``: a TCP RST)."""
        if self.closed:
            return
        self.closed = True
        try:
            _ext.net_close(self._st, reset)
            self._c._flush()
        except TransportClosed:
            pass

    async def wait_closed(self, timeout: Optional[float] = 10.0) -> m.NetClosed:
        st = self._st

        def done() -> Optional[m.Message]:
            if st.ended:
                if isinstance(st.final, m.NetClosed):
                    return st.final
                st.raise_failure()
            st.before_wait()
            return None

        v = await self._c._drive(_ext.wait_for(st, done), timeout)
        assert isinstance(v, m.NetClosed)
        return v

    async def __aenter__(self) -> "AsyncConnection":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class AsyncForwarder:
    """The asyncio port forwarder (``await client.forward(local_port, remote_port)``); ``await stop()``."""

    def __init__(self, net: AsyncNet, remote: Address, connect_timeout: Optional[float]) -> None:
        self._net = net
        self.remote = remote
        self.connect_timeout = connect_timeout
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: Set["asyncio.Task[None]"] = set()
        self.accepted = 0
        self.errors: List[BaseException] = []
        self.port = 0

    async def _start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._on_client, host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn: Optional[AsyncConnection] = None
        try:
            try:
                conn = await self._net.connect_tcp(self.remote, timeout=self.connect_timeout)
            except (NetError, TransportClosed, OSError) as e:
                self.errors.append(e)
                return

            async def up() -> None:
                assert conn is not None
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    await conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)

            up_task = asyncio.ensure_future(up())
            try:
                while True:
                    data = await conn.recv(65536)
                    if not data:
                        break
                    writer.write(data)
                    await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()
                await up_task
            finally:
                up_task.cancel()
        except (OSError, TransportClosed):
            pass
        finally:
            if conn is not None:
                conn.close()
            writer.close()
            self._tasks.discard(task)

    @property
    def active(self) -> int:
        return len(self._tasks)

    async def stop(self) -> None:
        """Stop accepting and close every relayed connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> "AsyncForwarder":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
