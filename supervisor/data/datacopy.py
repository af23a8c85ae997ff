"""Verified, durable copies of files and trees, and their digests. No symlink is ever followed.

A copy is a clone where the file system can (btrfs, xfs), else a copy in the kernel, else read and
write; it keeps owner (as root), mode and times, is fsynced, and must have its source's size with
the source unchanged meanwhile; a working copy (the take's copy of a snapshot that is the original
file) is not fsynced, and is made into the page cache its source gives up (`working_copy`).
`copy_file_hashed` also hashes the copy, on a second thread while the disk syncs it. Digests are
what tell a restored copy from the snapshot it came from: `file_digest` of a file, `tree_digest`
of a folder's listing and contents. A copied SQLite file is checked by size and header;
`sqlite_verdict` (integrity_check) is the slow, deep check, which can be stopped, for after the
host is back up.
`supervisor.data.snapshot` builds its take and its journaled restore from these steps.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import logging
import os
import shutil
import sqlite3
import stat
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from supervisor.config.schema import SQLITE_SIDECARS as SQLITE_SIDECARS  # re-exported
from supervisor.errors import SnapshotError

log = logging.getLogger(__name__)

SQLITE_MAGIC = b"SQLite format 3\x00"
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO never blocks
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_CREATE_READABLE = CREATE_FLAGS & ~os.O_WRONLY | os.O_RDWR  # copy_file_hashed reads it back
_CHUNK = 8 << 20
_HASH_CHUNK = 1 << 20
_PROGRESS_STEPS = 10_000  # SQLite VM steps between looks at a stop flag
_NO_COPY_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


# --- time bounds ---------------------------------------------------------------------------------

_bounds = threading.local()


@contextlib.contextmanager
def time_bound(seconds: float, what: str) -> Iterator[None]:
    """Inside (on this thread), every copy, hash, walk and flush of this module ends with a
    SnapshotError once `seconds` have passed, checked between chunks and entries: a file system
    that trickles or hangs between calls (the host's data may sit on one) costs a worker this
    long, not for ever. A single call the kernel never returns cannot be cut short: the
    runtime's reserved pool keeps a spare worker for that. Nested bounds: the inner one counts."""
    previous = getattr(_bounds, "bound", None)
    _bounds.bound = (time.monotonic() + seconds, seconds, what)
    try:
        yield
    finally:
        _bounds.bound = previous


def _current_bound() -> tuple[float, float, str] | None:
    bound: tuple[float, float, str] | None = getattr(_bounds, "bound", None)
    return bound


def check_time(bound: tuple[float, float, str] | None = None, where: object = "") -> None:
    """Raise once the bound (this thread's, or `bound`) has passed."""
    bound = bound if bound is not None else _current_bound()
    if bound is not None and time.monotonic() > bound[0]:
        at = f" (at {where})" if where else ""
        raise SnapshotError(
            f"{bound[2]} took longer than {bound[1]:g}s{at}: is a file system hung or slow?"
        )


# --- copying, hashing, verifying -----------------------------------------------------------------


def copy_file(source: Path, dest: Path) -> None:
    """Clone where the file system can, else copy in the kernel; keep owner, mode and times."""
    _copy(source, dest, hashed=False, working=False)


def copy_file_hashed(source: Path, dest: Path) -> tuple[int, str]:
    """copy_file, and the size and sha256 of the copy as written. A second thread hashes it while
    the disk syncs it: fsync is I/O wait, so on two cores the hash costs next to no time."""
    size, digest = _copy(source, dest, hashed=True, working=False)
    assert digest is not None
    return size, digest


def working_copy(snapshot: Path, dest: Path) -> int:
    """Copy a snapshot that is the original file itself (hard-linked) for the new version to
    work on; the bytes copied. The snapshot is fsynced first (costing only what the host left
    unflushed); the copy is not: until SyncData has, a crash of the machine rolls back.

    Each range copied then leaves the page cache of the snapshot, which nobody reads until a
    verify or a rollback: the copy's pages are the snapshot's, recycled, and the cache does not
    grow by the file's size while the host is down. New memory is what such a copy costs where
    pages are cheap to copy but not to come by: on the development VM (its balloon reports
    freed memory to the hypervisor, which takes it back) 1 GiB copied into new pages took
    2.7-3.3 s of CPU inside the daemon, into recycled ones 0.4-0.7 s. A snapshot out of the
    cache (nothing read it lately) is read from disk into pages that are recycled in turn; its
    copy's pages are then new."""
    return _copy(snapshot, dest, hashed=False, working=True)[0]


def _copy(source: Path, dest: Path, *, hashed: bool, working: bool) -> tuple[int, str | None]:
    """(size, sha256 if `hashed`) of the copy. `working`: see working_copy (the source is
    fsynced, before, and dropped from the cache as it is copied); else the copy is fsynced."""
    with (
        open(os.open(source, READ_FLAGS), "rb") as src,
        open(os.open(dest, _CREATE_READABLE, 0o600), "r+b") as dst,
    ):
        before = os.fstat(src.fileno())
        if not stat.S_ISREG(before.st_mode):
            raise SnapshotError(f"{source} is not a regular file")
        if working:  # first: only clean pages can leave the cache
            os.fsync(src.fileno())
        copied = _clone_or_copy(src.fileno(), dst.fileno(), recycle=working)
        # Not during the copy: that is CPU work in the kernel, and the hash would compete with it.
        hasher = _DigestBeside(dst.fileno(), copied) if hashed else None
        try:
            _chown(dst.fileno(), before.st_uid, before.st_gid)
            os.fchmod(dst.fileno(), stat.S_IMODE(before.st_mode))
            os.utime(dst.fileno(), ns=(before.st_atime_ns, before.st_mtime_ns))
            if not working:
                os.fsync(dst.fileno())
        except BaseException:
            if hasher is not None:
                hasher.abandon()  # its thread is gone before the file is closed
            raise
        digest = hasher.result() if hasher is not None else None
        after, size = os.fstat(src.fileno()), os.fstat(dst.fileno()).st_size
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise SnapshotError(f"{source} changed while it was copied: is a writer still running?")
    if copied != before.st_size or size != before.st_size:
        raise SnapshotError(f"the copy {dest} has {size} bytes, its source {before.st_size}")
    if digest is not None and digest[0] != size:
        raise SnapshotError(f"hashed {digest[0]} bytes of the copy {dest}, which has {size}")
    return size, None if digest is None else digest[1]


FLUSH_STEP = 8 * 2**20
"""How much of a file `fsync_file` writes out at a time, where Linux lets it choose. One big
fsync fills the disk's queue and its write cache, and other fsyncs on the file system wait for
all of it, the state store's commits on the event loop too. Measured on the development VM with a
1 GiB database and a 1 s deadman window, so that the deadline falls inside the flush of the new
version's copy: in one fsync, the loop's commits stalled and the rollback began 163-481 ms late
and took 0.25-0.60 s; written out 8 MiB at a time, each step followed by a journal commit (an
fsync of the folder, which flushes the disk's cache of what the step wrote): 1-3 ms late,
0.11-0.15 s. The flush itself takes about as long (1.4-2.1 s either way on that disk)."""
_SYNC_FILE_RANGE_WAIT_ALL = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER (<fcntl.h>)


def fsync_file(path: Path, wanted: Callable[[], bool] = lambda: True) -> bool:
    """fsync the regular file at `path` (never through a symlink), written out FLUSH_STEP at a
    time where Linux allows; `wanted()` is asked between steps, and a flush no longer wanted
    stops there. True once the file is on disk; False if there is none, or it was not wanted.
    Each step is followed by an fsync of the file's folder (see FLUSH_STEP)."""
    fd = open_regular(path)
    if fd is None:
        return False
    try:
        st = os.fstat(fd)
        if (write_out := _sync_file_range()) is not None and st.st_size > FLUSH_STEP:
            for offset in range(0, st.st_size, FLUSH_STEP):
                if not wanted():
                    return False
                check_time(where=f"flushing {path}")
                if write_out(fd, offset, FLUSH_STEP, _SYNC_FILE_RANGE_WAIT_ALL) != 0:
                    break  # refused (an odd file system): the fsync below does it all
                fsync_dir(Path(os.path.dirname(path) or "."))
        if not wanted():
            return False
        os.fsync(fd)
        return True
    finally:
        os.close(fd)


def open_regular(path: Path) -> int | None:
    """A read-only fd of the regular file at `path`, or None if there is none. Never through a
    symlink, and never blocking or acting on what the new version may have left there: a FIFO
    (an open would wait for a writer for ever), a socket, a device node."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        fd = os.open(path, READ_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):  # swapped for a link or socket meanwhile
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between the lstat and the open
        os.close(fd)
        return None
    return fd


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) from the C library (the os module has none); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _clone_or_copy(src_fd: int, dst_fd: int, *, recycle: bool = False) -> int:
    """FICLONE (btrfs, xfs: instant), else copy_file_range, else read/write (macOS): the bytes
    of the file accounted for. Only the source's data is copied: its holes stay holes (a sparse
    file must not grow to its full size in the copy, the disk may not hold that). `recycle`:
    each range copied is dropped from the source's page cache (see working_copy)."""
    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
        return os.fstat(dst_fd).st_size
    except OSError:
        pass  # ext4, tmpfs, macOS: copy instead
    size = os.fstat(src_fd).st_size
    try:
        done = _copy_data(src_fd, dst_fd, size, _kernel_copy, recycle)
    except (AttributeError, OSError) as exc:  # AttributeError: not Linux
        if isinstance(exc, OSError) and exc.errno not in _NO_COPY_RANGE:
            raise
        done = _copy_data(src_fd, dst_fd, size, _user_copy, recycle)  # again, by hand
    os.ftruncate(dst_fd, done)  # a hole at the end is a size, not data
    return done


def _copy_data(
    src_fd: int,
    dst_fd: int,
    size: int,
    copy: Callable[[int, int, int, int], int],
    recycle: bool = False,
) -> int:
    """Copy each data segment of the source (SEEK_DATA/SEEK_HOLE) to the same offsets; the
    offset reached (`size` unless the source shrank meanwhile). `recycle`: drop each chunk
    copied from the source's page cache, so that the next chunk's copy can reuse its pages."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src_fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            return size  # nothing but a hole up to the end
        end = min(os.lseek(src_fd, start, os.SEEK_HOLE), size)
        while start < end:
            check_time(where=f"byte {start} of {size}")
            step = copy(src_fd, dst_fd, start, min(end - start, _CHUNK))
            if not step:
                return start  # the source shrank under us
            if recycle:
                _drop_cached(src_fd, start, step)
            start += step
        offset = end
    return size


def _drop_cached(fd: int, offset: int, count: int) -> None:
    """Let the kernel reuse the (clean) cached pages of this range: a hint, ignored where the
    system has none (macOS) or the file system refuses it."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):
            advise(fd, offset, count, os.POSIX_FADV_DONTNEED)


def _kernel_copy(src_fd: int, dst_fd: int, offset: int, count: int) -> int:
    return os.copy_file_range(src_fd, dst_fd, count, offset, offset)


def _user_copy(src_fd: int, dst_fd: int, offset: int, count: int) -> int:
    data = os.pread(src_fd, count, offset)
    written = 0
    while written < len(data):
        written += os.pwrite(dst_fd, data[written:], offset + written)
    return len(data)


class _DigestBeside:
    """sha256 of the first `size` bytes of an open file, read (pread) on a second thread. pread
    and hashlib release the GIL, so the caller goes on meanwhile, e.g. to fsync the file."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd, self._size = fd, size
        self._hashed, self._sha = 0, _hashlib().sha256()
        self._bound = _current_bound()  # the caller's: this runs on a thread of its own
        self._abandoned = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sha256-beside", daemon=True)
        self._thread.start()

    def result(self) -> tuple[int, str]:
        """(bytes hashed, hex digest), once the thread is done."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hashed, self._sha.hexdigest()

    def abandon(self) -> None:
        """Stop at the next chunk and wait for the thread, raising nothing."""
        self._abandoned = True
        self._thread.join()

    def _run(self) -> None:
        buffer = memoryview(bytearray(_HASH_CHUNK))
        try:
            while self._hashed < self._size and not self._abandoned:
                check_time(self._bound, f"hashing byte {self._hashed}")
                piece = buffer[: min(len(buffer), self._size - self._hashed)]
                got = os.preadv(self._fd, [piece], self._hashed)
                if not got:
                    raise SnapshotError(f"the copy ended at {self._hashed} of {self._size} bytes")
                self._sha.update(piece[:got])
                self._hashed += got
        except BaseException as exc:  # handed to result(), in the copying thread
            self._error = exc


def _hashlib() -> types.ModuleType:
    """hashlib, imported at the first hash rather than with this module: it maps OpenSSL's
    libcrypto (3.5 MiB of RSS), which a supervisor that never snapshots data never needs."""
    import hashlib

    return hashlib


def copy_tree(source: Path, dest: Path, place_file: Callable[[Path, Path], object]) -> None:
    """Recreate a tree: folders, files (by place_file), symlinks as symlinks; skip the rest."""
    st = os.lstat(source)
    os.mkdir(dest, 0o700)
    for item in sorted(os.scandir(source), key=lambda e: e.name):
        check_time(where=item.path)
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
    with open(os.open(path, READ_FLAGS), "rb", buffering=0) as handle:
        size, sha = os.fstat(handle.fileno()).st_size, _hashlib().sha256()
        while chunk := handle.read(_HASH_CHUNK):  # by chunks: the time bound is checked between
            check_time(where=f"hashing {path}")
            sha.update(chunk)
        return size, sha.hexdigest()


def tree_digest(root: Path) -> tuple[int, str]:
    """Bytes of all files, and a sha256 over the sorted listing: kind, relative path, permission
    bits, link target, file contents. Equal digests mean equal trees for a rollback's purpose."""
    digest, total = _hashlib().sha256(), 0
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
    check_time(where=root / rel)
    st = os.lstat(root / rel)
    yield rel or ".", st
    if stat.S_ISDIR(st.st_mode):
        for name in sorted(os.listdir(root / rel)):
            yield from _walk(root, os.path.join(rel, name))


def verify_sqlite_copy(path: Path, expected_size: int) -> None:
    """The cheap checks of a copied database, size and header; `sqlite_verdict` is the deep one."""
    size = os.lstat(path).st_size
    if size != expected_size:
        raise SnapshotError(f"the copy {path} has {size} bytes, expected {expected_size}")
    if size == 0:
        return  # SQLite reads an empty file as an empty database
    with open(os.open(path, READ_FLAGS), "rb") as handle:
        if handle.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
            raise SnapshotError(f"the copy {path} is not an SQLite database (bad header)")


def sqlite_verdict(path: Path, expected_size: int, stop: StopSignal) -> tuple[bool, str]:
    """(ok, detail) of a database copy nobody writes: size, header, then `PRAGMA integrity_check`
    opened immutable and read-only. That is O(size), seconds per GiB, so it never runs while the
    host is down; `stop` cuts it short (then the verdict is void: the caller checks `stop`)."""
    try:
        verify_sqlite_copy(path, expected_size)
        with (
            contextlib.closing(connect_sqlite(path, "mode=ro&immutable=1", 0)) as con,
            stop.interrupting(con),
        ):
            con.set_progress_handler(stop.is_set, _PROGRESS_STEPS)  # a stop just before the run
            found = [str(row[0]) for row in con.execute("PRAGMA integrity_check")]
    except (OSError, sqlite3.Error, SnapshotError) as exc:
        return False, f"unreadable as a database: {exc}"
    if found == ["ok"]:
        return True, "ok"
    more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
    return False, f"integrity_check: {'; '.join(found[:3])}{more}"


class StopSignal:
    """A request to stop a slow check, which also interrupts the SQLite statement it is running
    (a progress handler alone would wait for integrity_check's long btree walk to end)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = False
        self._running: sqlite3.Connection | None = None

    def is_set(self) -> bool:
        return self._stopped

    def set(self) -> None:
        with self._lock:
            self._stopped = True
            if self._running is not None:
                self._running.interrupt()  # the one call sqlite3 allows from another thread

    @contextlib.contextmanager
    def interrupting(self, con: sqlite3.Connection) -> Iterator[None]:
        """While inside, set() interrupts `con`; leave before closing it."""
        with self._lock:
            self._running = con
        try:
            yield
        finally:
            with self._lock:
                self._running = None


def connect_sqlite(path: Path, query: str, timeout: float) -> sqlite3.Connection:
    """Open `path` by URI (`query` such as "mode=ro&immutable=1"), in autocommit mode."""
    uri = f"file:{quote(str(path))}?{query}"
    return sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)


# --- small durable file-system steps -------------------------------------------------------------


def fsync_dir(folder: Path) -> None:
    """Make a rename or create in `folder` durable (not through a symlink in its place)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
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


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Durably: a temp file in the same folder, fsync, rename, fsync the folder."""
    temp = path.with_name(f".{path.name}.tmp")
    remove_path(temp)
    with open(os.open(temp, CREATE_FLAGS, 0o600), "w", encoding="utf-8") as handle:
        json.dump(data, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    fsync_dir(path.parent)


def read_entries_json(path: Path) -> dict[str, Any]:
    """A snapshot manifest or restore journal: a JSON object with an `entries` list."""
    try:
        with open(os.open(path, READ_FLAGS), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{path} is unreadable or corrupt: {explain(exc)}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise SnapshotError(f"{path} is corrupt: it lists no entries")
    return data


def explain(exc: BaseException) -> str:
    """An error as an operator reads it: ENOSPC names the disk, a SnapshotError its message."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" ({exc.filename})" if exc.filename else ""  # copy_file_range names no file
        return f"no space left on device{where}"
    return exc.message if isinstance(exc, SnapshotError) else str(exc) or type(exc).__name__
