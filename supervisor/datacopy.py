"""Verified, durable copies of files and trees, and their digests. No symlink is ever followed.

A copy is a clone where the file system can (btrfs, xfs), else a copy in the kernel, else read and
write; it keeps owner (as root), mode and times, and is fsynced. Digests are what tell a restored
copy from the snapshot it came from: `file_digest` of a file, `tree_digest` of a folder's listing
and contents. A copied SQLite file is checked by size and header, and on demand by integrity_check.
`supervisor.snapshot` builds its take and its journaled restore from these steps.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

from supervisor.errors import SnapshotError

log = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_CHUNK = 8 << 20
_NO_COPY_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


# --- copying, hashing, verifying -----------------------------------------------------------------


def copy_file(source: Path, dest: Path) -> None:
    """Clone where the file system can, else copy in the kernel; keep owner, mode and times."""
    with (
        open(os.open(source, READ_FLAGS), "rb") as src,
        open(os.open(dest, CREATE_FLAGS, 0o600), "wb") as dst,
    ):
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(f"{source} is not a regular file")
        _clone_or_copy(src.fileno(), dst.fileno())
        _chown(dst.fileno(), st.st_uid, st.st_gid)
        os.fchmod(dst.fileno(), stat.S_IMODE(st.st_mode))
        os.utime(dst.fileno(), ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fsync(dst.fileno())


def _clone_or_copy(src_fd: int, dst_fd: int) -> None:
    """FICLONE (btrfs, xfs: instant), else copy_file_range, else read/write (macOS)."""
    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
        return
    except OSError:
        pass  # ext4, tmpfs, macOS: copy instead
    try:
        while os.copy_file_range(src_fd, dst_fd, _CHUNK):
            pass
        return
    except (AttributeError, OSError) as exc:  # AttributeError: not Linux
        if isinstance(exc, OSError) and exc.errno not in _NO_COPY_RANGE:
            raise  # else both offsets moved together: carry on by hand from there
    with open(src_fd, "rb", closefd=False) as src, open(dst_fd, "wb", closefd=False) as dst:
        shutil.copyfileobj(src, dst, _CHUNK)


def copy_tree(source: Path, dest: Path, place_file: Callable[[Path, Path], None]) -> None:
    """Recreate a tree: folders, files (by place_file), symlinks as symlinks; skip the rest."""
    st = os.lstat(source)
    os.mkdir(dest, 0o700)
    for item in sorted(os.scandir(source), key=lambda e: e.name):
        src, dst = Path(item.path), dest / item.name
        mode = item.stat(follow_symlinks=False).st_mode
        if stat.S_ISDIR(mode):
            copy_tree(src, dst, place_file)
        elif stat.S_ISREG(mode):
            place_file(src, dst)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
            link = os.lstat(src)
            _chown(dst, link.st_uid, link.st_gid)
        else:
            log.warning("skipping %s: not a file, folder or symlink", src)
    _chown(dest, st.st_uid, st.st_gid)
    os.chmod(dest, stat.S_IMODE(st.st_mode))
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
    fsync_dir(dest)


def file_digest(path: Path) -> tuple[int, str]:
    """Size and sha256 of a regular file (not through a symlink)."""
    with open(os.open(path, READ_FLAGS), "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        return size, hashlib.file_digest(handle, "sha256").hexdigest()


def tree_digest(root: Path) -> tuple[int, str]:
    """Bytes of all files, and a sha256 over the sorted listing: kind, relative path, permission
    bits, link target, file contents. Equal digests mean equal trees for a rollback's purpose."""
    digest, total = hashlib.sha256(), 0
    for rel, st in _walk(root, ""):
        name, mode = os.fsencode(rel), b"%o" % stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            digest.update(b"d\0" + name + b"\0" + mode + b"\0")
        elif stat.S_ISREG(st.st_mode):
            size, sha = file_digest(root / rel)
            total += size
            digest.update(b"f\0" + name + b"\0" + mode + b"\0" + sha.encode() + b"\0")
        elif stat.S_ISLNK(st.st_mode):
            digest.update(b"l\0" + name + b"\0" + os.fsencode(os.readlink(root / rel)) + b"\0")
    return total, digest.hexdigest()


def _walk(root: Path, rel: str) -> Iterator[tuple[str, os.stat_result]]:
    st = os.lstat(root / rel)
    yield rel or ".", st
    if stat.S_ISDIR(st.st_mode):
        for name in sorted(os.listdir(root / rel)):
            yield from _walk(root, os.path.join(rel, name))


def verify_sqlite_copy(path: Path, expected_size: int, *, deep: bool) -> None:
    """Size and header always; `deep` adds integrity_check, which is O(size): take time only."""
    size = os.lstat(path).st_size
    if size != expected_size:
        raise SnapshotError(f"the copy {path} has {size} bytes, expected {expected_size}")
    if size == 0:
        return  # SQLite reads an empty file as an empty database
    with open(os.open(path, READ_FLAGS), "rb") as handle:
        if handle.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
            raise SnapshotError(f"the copy {path} is not an SQLite database (bad header)")
    if deep:
        with contextlib.closing(connect_sqlite(path, "mode=ro&immutable=1", 0)) as con:
            rows = con.execute("PRAGMA integrity_check").fetchall()
        if rows != [("ok",)]:
            raise SnapshotError(f"the copy {path} fails integrity_check: {rows[:3]}")


def connect_sqlite(path: Path, query: str, timeout: float) -> sqlite3.Connection:
    """Open `path` by URI (`query` such as "mode=ro&immutable=1"), in autocommit mode."""
    uri = f"file:{quote(str(path))}?{query}"
    return sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)


# --- small durable file-system steps -------------------------------------------------------------


def fsync_dir(folder: Path) -> None:
    """Make a rename or create in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_path(path: Path) -> None:
    """Remove a file, symlink or tree without following any symlink (rmtree walks by fd)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _chown(target: int | str | Path, uid: int, gid: int) -> None:
    """Keep ownership where we may (as root); an unprivileged run keeps its own."""
    with contextlib.suppress(PermissionError):
        os.chown(target, uid, gid, follow_symlinks=isinstance(target, int))  # never via a link
