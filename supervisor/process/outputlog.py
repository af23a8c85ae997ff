"""The host's output file, rotated by size: a small logger process between the host and the file.

Why a process of its own: the host's output never passes through a pipe that swapguard reads (a
restart of swapguard must neither kill nor block the host), yet a file the host writes itself
cannot be rotated under it. So, with `output_max_bytes` set, the host's stdout and stderr go to a
pipe read by this logger, as s6-log or multilog would: it runs in a session of its own outside
the host's cgroup, survives a restart of swapguard, and ends by itself when every writer of the
pipe is gone (the host and all it started).

It writes every byte at once (a prompt without a newline shows at once) and rotates only where a
line ends, so no line is torn across two files and none is lost; a file can pass the limit by one
read (64 KiB) at most. It follows a move of the file by logrotate (it checks the path at most once
a second, or at once on SIGHUP) and opens nothing through a symlink.

With host.user, the output is the host's to write, not root's: swapguard opens it by a walk that
follows no symlink on the way (`open_no_links`: a host that swapped its log folder for a link to
a folder of root's must not have root create a file there), and the logger drops to the host's
user before it reads a byte, so every file it opens or renames later is one the host could.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from supervisor.process.identity import HostUser

READ_BYTES = 64 * 1024
RECHECK_S = 1.0
OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_MODE = 0o640
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_no_links(path: Path) -> int:
    """Open (create) `path` for appending, following no symlink anywhere on the way: each folder
    from / is opened relative to the one before with O_NOFOLLOW, then the file; it must be a
    regular file with a single link (not a hard link planted to a file of somebody else's)."""
    absolute = Path(os.path.abspath(path))
    folder = os.open("/", _DIR_FLAGS)
    try:
        for depth, part in enumerate(absolute.parent.parts[1:], start=2):
            try:
                inner = os.open(part, _DIR_FLAGS, dir_fd=folder)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    where = Path(*absolute.parts[:depth])
                    raise OSError(exc.errno, f"{where} is not a folder (a symlink is not followed)",
                                  str(path)) from None
                raise
            os.close(folder)
            folder = inner
        fd = os.open(absolute.name, OPEN_FLAGS, FILE_MODE, dir_fd=folder)
    finally:
        os.close(folder)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise OSError(errno.EPERM, "not a regular file with a single link", str(path))
    return fd


class RotatingFile:
    """`path` and its backups `path.1` (newest) ... `path.<backups>`, starting on `fd` (open on
    `path`, checked by the caller) or on `path` opened here."""

    def __init__(self, path: Path, max_bytes: int, backups: int, fd: int | None = None) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self.reopen_wanted = False
        self._fd = -1
        if fd is None:
            fd = os.open(self.path, OPEN_FLAGS, FILE_MODE)
        self._adopt(fd)

    def _adopt(self, fd: int) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        found = os.fstat(fd)
        self._identity, self._size = (found.st_dev, found.st_ino), found.st_size
        self._checked = time.monotonic()

    def _open(self) -> None:
        """The file at `path` from now on; on failure (a symlink planted there, a full disk) the
        current file goes on taking the output and the path is tried again later."""
        try:
            self._adopt(os.open(self.path, OPEN_FLAGS, FILE_MODE))
        except OSError as exc:
            self._checked = time.monotonic()
            print(f"swapguard outputlog: cannot open {self.path}: {exc}", file=sys.stderr)

    def write(self, data: bytes) -> None:
        self._follow_moves()
        end = data.rfind(b"\n") + 1
        if end and self._size + len(data) > self.max_bytes:
            # up to the last full line here, the rest (a line still being written) in the next
            self._write(data[:end])
            self._rotate()
            data = data[end:]
        self._write(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            self._size += written
            view = view[written:]

    def _rotate(self) -> None:
        try:
            for number in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{number}")
                with contextlib.suppress(FileNotFoundError):
                    os.rename(older, self.path.with_name(f"{self.path.name}.{number + 1}"))
            if self.backups:
                os.rename(self.path, self.path.with_name(f"{self.path.name}.1"))
            else:
                os.unlink(self.path)
        except OSError as exc:
            print(f"swapguard outputlog: cannot rotate {self.path}: {exc}", file=sys.stderr)
        self._open()

    def _follow_moves(self) -> None:
        """Reopen when asked (SIGHUP) or when the path is no longer our file (logrotate)."""
        now = time.monotonic()
        if not self.reopen_wanted and now - self._checked < RECHECK_S:
            return
        self._checked = now
        try:
            found = os.lstat(self.path)
            moved = (found.st_dev, found.st_ino) != self._identity
        except OSError:  # gone, or out of reach (a folder swapped under us): try to reopen
            moved = True
        if moved or self.reopen_wanted:
            self.reopen_wanted = False
            self._open()

    def close(self) -> None:
        os.close(self._fd)


def run(path: Path, max_bytes: int, backups: int, source: int = 0, target: int = 1) -> int:
    """Copy `source` into the rotating file, opened on `target`, until every writer closed it."""
    for ignored in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(ignored, signal.SIG_IGN)  # only the end of its input ends it
    rotating = RotatingFile(path, max_bytes, backups, fd=target)
    signal.signal(signal.SIGHUP, lambda signum, frame: setattr(rotating, "reopen_wanted", True))
    while chunk := os.read(source, READ_BYTES):
        rotating.write(chunk)
    rotating.close()
    return 0


_live: dict[int, subprocess.Popen[bytes]] = {}


def reopen() -> None:
    """SIGHUP to our live loggers: reopen the file now (a logger that outlived an earlier
    swapguard notices a move by itself within a second)."""
    for logger in list(_live.values()):
        with contextlib.suppress(ProcessLookupError):
            logger.send_signal(signal.SIGHUP)


def open_for(path: Path, user: HostUser | None) -> int:
    """The output file opened by swapguard: with a host user, by `open_no_links`."""
    if user is not None and user.uid != os.geteuid():
        return open_no_links(path)
    return os.open(path, OPEN_FLAGS, FILE_MODE)


def start(path: Path, max_bytes: int, backups: int, user: HostUser | None = None) -> int:
    """Start a logger for `path` and return the pipe's write end, for the host's stdout/stderr.

    The file is opened here, so a bad path fails the host's spawn with a clear error. The logger
    is our child in a session of its own; a thread waits for it, so it is never left a zombie and
    never taken for an orphan of the host's tree. With `user`, the logger runs as that user
    (it drops to it itself: the interpreter may sit where that user may not read).
    """
    file_fd = open_for(path, user)
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        argv = [sys.executable, "-m", "supervisor.process.outputlog"]
        argv += [str(path), str(max_bytes), str(backups)]
        if user is not None and user.uid != os.geteuid():
            argv += [str(user.uid), str(user.gid), ",".join(map(str, user.groups))]
        # Imported here: the logger process itself (this module as __main__) needs none of it.
        from supervisor.process import jobs

        with jobs.SPAWN_LOCK:
            logger = subprocess.Popen(
                argv, stdin=read_end, stdout=file_fd, start_new_session=True
            )
            jobs.register(logger.pid)
            _live[logger.pid] = logger
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
        os.close(file_fd)

    def reap() -> None:
        logger.wait()
        _live.pop(logger.pid, None)
        jobs.unregister(logger.pid)

    threading.Thread(target=reap, name=f"swapguard-outputlog-{logger.pid}", daemon=True).start()
    return write_end


def _become(uid: int, gid: int, groups: str) -> None:
    """Drop to the host's user for good (groups first: after setuid they may not change)."""
    os.setgroups([int(group) for group in groups.split(",") if group])
    os.setgid(gid)
    os.setuid(uid)


if __name__ == "__main__":
    if len(sys.argv) > 4:
        _become(int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    sys.exit(run(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
