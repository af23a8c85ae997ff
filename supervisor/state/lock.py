"""The state dir's lock: one swapguard per state dir, and the dir itself, created private.

- `StateLock` is a `flock` on `state.dir/lock`: the kernel drops it when its holder dies, so a stale
  file never blocks, and a second swapguard on the same state refuses to start.
- `prepare_state_dir` makes `state.dir` 0700 when it is missing (parents 0755, whatever the
  umask) and refuses one that another user owns or may write to (`share_with_host` lets the
  host's group pass through it, no more, when the host runs as another user); the lock and the
  store both start with it. Files in it are opened without following symlinks (`open_private`,
  `check_private_file`).
- `StoreError` is defined here, not in `supervisor.state.store`, because these are the state store's
  first steps and the store imports this module; `supervisor.state.store` re-exports all three.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from pathlib import Path

from supervisor.errors import StateLocked, SwapguardError

logger = logging.getLogger(__name__)

LOCK_NAME = "lock"


class StoreError(SwapguardError):
    """The state store (folder, lock or database) cannot be opened, migrated, read or written."""

    code = "store_failed"


# --- the folder -----------------------------------------------------------------------------


def state_dir_problem(state_dir: Path) -> str | None:
    """Why `state_dir` may not hold swapguard's state, or None. A folder another user owns or may
    write to could hold planted symlinks (the lock, the store, snapshots) that swapguard would
    write through with its own rights. A missing one is fine: it is created private."""
    try:
        link = os.lstat(state_dir)
        info = os.stat(state_dir)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"state dir {state_dir}: cannot inspect it: {exc.strerror or exc}"
    me = os.geteuid()
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (0, me):
        return (
            f"state dir {state_dir} is a symlink owned by uid {link.st_uid}, not by swapguard's "
            f"user (uid {me}) or root"
        )
    if not stat.S_ISDIR(info.st_mode):
        return f"state dir {state_dir} exists and is not a directory"
    if info.st_uid != me:
        return (
            f"state dir {state_dir} is owned by uid {info.st_uid}, not by swapguard's user "
            f"(uid {me}); chown it or choose another state.dir"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"state dir {state_dir} is writable by group or others (mode {mode:04o}); "
            f"run chmod go-w on it"
        )
    return None


def prepare_state_dir(state_dir: Path) -> None:
    """Create `state_dir` 0700 (missing parents 0755), whatever the umask; refuse an existing one
    that is not swapguard's own (`state_dir_problem`)."""
    state_dir = Path(state_dir)
    missing = [folder for folder in (state_dir, *state_dir.parents) if not folder.exists()]
    for folder in reversed(missing):
        mode = 0o700 if folder == state_dir else 0o755
        try:
            os.mkdir(folder, mode)  # the umask can only take bits away: never looser than this
            os.chmod(folder, mode)  # nor tighter (a umask of 077 would hide the parents)
        except FileExistsError:
            pass  # made by someone else just now: judged below like any existing folder
        except OSError as exc:
            raise StoreError(f"cannot create state dir {folder}: {exc.strerror or exc}") from exc
    if (problem := state_dir_problem(state_dir)) is not None:
        raise StoreError(problem)


SHARED_STATE_DIR_MODE = 0o710
"""state.dir when the host runs as another user: its group (the host's) may pass through to the
host's folder, nobody else may even do that; nothing in it can be listed or read but by us."""
HOST_DIR_MODE = 0o700


def share_with_host(state_dir: Path, host_dir: Path | None, uid: int = -1, gid: int = -1) -> None:
    """Give the host's user (`uid`, `gid`) a folder of its own in `state_dir` (`host_dir`, made
    theirs, 0700) and the right to pass through `state_dir` to it (group `gid`, 0710). With
    `host_dir` None (no host.user), a state dir we opened that way earlier is closed again (0700).

    Only names in `state_dir` are touched, and it is ours alone to write: nothing planted in it
    can be followed; the host's folder is entered by nobody but the host (our sockets are bound
    elsewhere and renamed in, see `control.socketfile.bind_into`)."""
    info = os.lstat(state_dir)
    if host_dir is None:
        if stat.S_IMODE(info.st_mode) == SHARED_STATE_DIR_MODE:
            os.chmod(state_dir, 0o700)
        return
    try:
        os.mkdir(host_dir, HOST_DIR_MODE)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError(f"cannot create the host's folder {host_dir}: {exc.strerror}") from exc
    folder = os.lstat(host_dir)
    if not stat.S_ISDIR(folder.st_mode):
        raise StoreError(f"{host_dir} is not a folder; refusing to use it for the host's sockets")
    try:
        os.chown(host_dir, uid, gid, follow_symlinks=False)
        os.chmod(host_dir, HOST_DIR_MODE, follow_symlinks=False)
        os.chown(state_dir, -1, gid, follow_symlinks=False)
        os.chmod(state_dir, SHARED_STATE_DIR_MODE)
    except OSError as exc:
        raise StoreError(f"cannot give {host_dir} to uid {uid}: {exc.strerror or exc}") from exc


def open_private(path: Path, flags: int, mode: int = 0o600) -> int:
    """Open a file of the state dir without following a symlink, and make sure it is a plain
    file of swapguard's own with one link (a hard link to a victim would be written through)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(f"{path} is a symlink; refusing to open it") from None
        raise StoreError(f"cannot open {path}: {exc.strerror or exc}") from exc
    if (problem := _file_problem(path, os.fstat(fd))) is not None:
        os.close(fd)
        raise StoreError(problem)
    return fd


def check_private_file(path: Path) -> None:
    """For files opened by a library that cannot be given O_NOFOLLOW (SQLite): refuse the path
    if it is anything but a missing name or a plain file of ours with one link."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise StoreError(f"{path} is a symlink; refusing to open it")
    if (problem := _file_problem(path, info)) is not None:
        raise StoreError(problem)


def _file_problem(path: Path, info: os.stat_result) -> str | None:
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file; refusing to open it"
    if info.st_uid != os.geteuid():
        return f"{path} is owned by uid {info.st_uid}, not by swapguard's user; refusing it"
    if info.st_nlink != 1:
        return f"{path} has {info.st_nlink} hard links; refusing to write through them"
    return None


# --- one swapguard per state dir ------------------------------------------------------------


class StateLock:
    """An exclusive `flock` on `state_dir/lock`, held for the life of the daemon.

    The kernel releases it when the holder dies, however it dies, so a lock file left by a dead
    process never blocks. The descriptor is close-on-exec: the host must not inherit the lock, or
    a restarted swapguard could not take over while the old host still runs.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, state_dir: Path) -> StateLock:
        state_dir = Path(state_dir)
        prepare_state_dir(state_dir)
        path = state_dir / LOCK_NAME
        fd = open_private(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise StateLocked(
                f"state dir {state_dir} is in use by another swapguard (pid {holder})"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {path}: {exc}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        """Idempotent. Clears the pid first, so the file never names a holder that let go."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """The pid the holder wrote, or 'unknown' if it has not written it yet."""
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"
