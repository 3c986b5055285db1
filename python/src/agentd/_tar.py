"""Local tar archives for ``upload``/``download`` (Python's :mod:`tarfile`, ustar with GNU long names).

The archive the agent's ``tar_get`` sends comes from the guest, which a
host must not trust: :func:`extract` refuses absolute names, ``..``
components, entries that would land outside the destination through a
symlink (checked against what is on disk, entry by entry), hard links to
outside, and device nodes unless running as root; an existing file is
replaced, never written through. Symlinks are kept as they are (even
absolute ones: they point into the guest's tree), and directories get
their modes and times after their contents are in.
"""

from __future__ import annotations

import os
import tarfile
from typing import IO, Any, Dict, List, Tuple

from .errors import fs_error

_EXTRACT_KW: Dict[str, Any] = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}


def arcname_of(local: str) -> str:
    """The name a local path gets in the archive: its last component (``tar -C parent -c NAME``)."""
    name = os.path.basename(os.path.normpath(os.path.abspath(local)))
    if not name:
        raise ValueError(f"cannot upload {local!r}: it has no name (the root directory)")
    return name


def add_tree(fileobj: IO[bytes], local: str) -> int:
    """Write ``local`` (a file or a whole tree, symlinks not followed) as a ustar/GNU stream; the entry count."""
    count = 0

    def counting(info: tarfile.TarInfo) -> tarfile.TarInfo:
        nonlocal count
        count += 1
        return info

    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        tar.add(local, arcname=arcname_of(local), recursive=True, filter=counting)
    return count


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _refuse(name: str, why: str) -> Exception:
    return fs_error("invalid_request", f"refusing tar entry {name!r}: {why}", path=name, op="download")


def _check_name(name: str) -> str:
    if not name or name.startswith("/"):
        raise _refuse(name, "an absolute or empty name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refuse(name, "a '..' component")
    if not parts:
        raise _refuse(name, "no name")
    return "/".join(parts)


def extract(tar: tarfile.TarFile, dest: str) -> Tuple[int, List[str]]:
    """Extract a stream-mode archive into ``dest`` safely; (entries, their names)."""
    os.makedirs(dest, exist_ok=True)
    root = os.path.realpath(dest)
    dirs: List[Tuple[str, tarfile.TarInfo]] = []
    names: List[str] = []
    as_root = os.geteuid() == 0
    for member in tar:
        rel = _check_name(member.name)
        target = os.path.join(root, rel)
        parent = os.path.realpath(os.path.dirname(target))
        if not _inside(root, parent):
            raise _refuse(member.name, "it would land outside the destination through a symlink")
        if member.islnk():
            link = _check_name(member.linkname)
            if not _inside(root, os.path.realpath(os.path.join(root, link))):
                raise _refuse(member.name, "a hard link to outside the destination")
            member.linkname = link
        if member.isdev() and not as_root:
            raise _refuse(member.name, "a device node (only root may make one)")
        member.name = rel
        names.append(rel)
        if member.isdir():
            if os.path.lexists(target) and not os.path.isdir(target):
                os.unlink(target)
            os.makedirs(target, exist_ok=True)
            dirs.append((target, member))
            continue
        if os.path.lexists(target):
            if os.path.isdir(target) and not os.path.islink(target):
                raise fs_error("is_a_directory", f"a directory is in the way of {rel!r}", path=target, op="download")
            os.unlink(target)
        tar.extract(member, root, set_attrs=True, numeric_owner=True, **_EXTRACT_KW)
    for target, member in reversed(dirs):
        if as_root:
            try:
                os.chown(target, member.uid, member.gid)
            except OSError:
                pass
        os.chmod(target, member.mode & 0o7777)
        os.utime(target, (member.mtime, member.mtime))
    return len(names), names
