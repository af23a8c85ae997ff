"""The state dir's lock: one swapguard per state dir, and the dir itself, created private.

- `StateLock` is a `flock` on `state.dir/lock`: the kernel drops it when its holder dies, so a stale
  file never blocks, and a second swapguard on the same state refuses to start.
- `prepare_state_dir` makes `state.dir` 0700 when it is missing and leaves an operator's own folder
  as it is (warning when others may write to it); the lock and the store both start with it.
- `StoreError` is defined here, not in `supervisor.state.store`, because these are the state store's
  first steps and the store imports this module; `supervisor.state.store` re-exports all three.
"""

from __future__ import annotations

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


def prepare_state_dir(state_dir: Path) -> None:
    """Create `state_dir` 0700 if missing; leave an existing one as the operator made it."""
    if state_dir.exists():
        if not state_dir.is_dir():
            raise StoreError(f"state dir {state_dir} exists and is not a directory")
        mode = stat.S_IMODE(state_dir.stat().st_mode)
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            logger.warning("state dir %s is group/world-writable (mode %o)", state_dir, mode)
        return
    try:
        state_dir.mkdir(mode=0o700, parents=True)
        os.chmod(state_dir, 0o700)  # mkdir's mode is filtered by the umask
    except FileExistsError:
        return  # another process created it just now: theirs to set up
    except OSError as exc:
        raise StoreError(f"cannot create state dir {state_dir}: {exc}") from exc


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
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open lock file {path}: {exc}") from exc
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
