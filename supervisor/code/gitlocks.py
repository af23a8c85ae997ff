"""The locks swapguard takes in a git dir: known to be ours after a crash, never stolen otherwise;
and the other git-dir state that could stop a rollback (a half-done merge or rebase).

Why: a kill -9 of swapguard (or of the git it runs) between taking a lock and releasing it
leaves the lock file behind, and every later git command, ours included, then refuses to run:
the rollback would end `failed` with the new version's code and data in place.

Theory of operation: before an operation that may take locks in the repo (our own `index.lock`,
and the ref locks of the git commands it runs), a journal naming those locks and their owner
(pid and process start time) is written durably into the git dir. It is removed when the
operation ends. A later swapguard that finds a journal whose owner is dead knows the listed
locks that still exist are ours, and removes them. The `index.lock` we take ourselves carries the
owner's token as its content (written to a temp file, then linked into place, so it never exists
empty): an `index.lock` that does not carry a dead owner's token belongs to somebody else, and is
reported, never removed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from supervisor.errors import CheckpointError

log = logging.getLogger(__name__)

INDEX_LOCK = "index.lock"
PENDING_INDEX = "swapguard-index-pending"  # the index a restore could not put in place yet
_JOURNAL_PREFIX = "swapguard-locks-"
_TOKEN_PREFIX = b"swapguard-lock "
_MAX_JOURNAL = 64 * 1024
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# Files in the git dir that mean an operation is half done; a checkpoint now would be a lie.
_IN_PROGRESS = (
    ("MERGE_HEAD", "a merge"),
    ("rebase-merge", "a rebase"),
    ("rebase-apply", "a rebase or git am"),
    ("CHERRY_PICK_HEAD", "a cherry-pick"),
    ("REVERT_HEAD", "a revert"),
    ("sequencer", "a cherry-pick or revert sequence"),
    ("BISECT_LOG", "a bisect"),
)
# What accompanies those files; set aside with them
_COMPANIONS = ("MERGE_MSG", "MERGE_MODE", "AUTO_MERGE", "SQUASH_MSG", "MERGE_RR")
_counter = itertools.count()
_counter_lock = threading.Lock()


@dataclass(frozen=True)
class Owner:
    """A process, by pid and start time (a pid alone may have been reused since)."""

    pid: int
    started: float

    @classmethod
    def me(cls) -> Owner:
        return cls(os.getpid(), _start_time(os.getpid()) or 0.0)

    def alive(self) -> bool:
        started = _start_time(self.pid)
        return started is not None and abs(started - self.started) < 0.05

    def token(self) -> bytes:
        return _TOKEN_PREFIX + f"{self.pid} {self.started:.3f}\n".encode()


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


class GitLocks:
    """The lock journal of one git dir."""

    def __init__(self, git_dir: Path) -> None:
        self.git_dir = git_dir

    @contextlib.contextmanager
    def holding(self, locks: Sequence[str]) -> Iterator[None]:
        """Journal `locks` (relative to the git dir) as ours for the time inside."""
        owner = Owner.me()
        with _counter_lock:
            serial = next(_counter)
        journal = self.git_dir / f"{_JOURNAL_PREFIX}{owner.pid}-{serial}.json"
        _write_durably(
            journal, json.dumps({"pid": owner.pid, "started": owner.started, "locks": list(locks)})
        )
        try:
            yield
        finally:
            journal.unlink(missing_ok=True)

    def clear_stale(self) -> list[str]:
        """Remove the locks of journals whose owner is dead; the names of those removed."""
        cleared: list[str] = []
        for journal in sorted(self.git_dir.glob(f"{_JOURNAL_PREFIX}*.json")):
            recorded = _read_journal(journal)
            if recorded is None:
                journal.unlink(missing_ok=True)  # torn before it was durable: nothing was taken
                continue
            owner, locks = recorded
            if owner.alive():
                continue
            for name in locks:
                if self._remove_if_ours(name, owner):
                    cleared.append(name)
            journal.unlink(missing_ok=True)
        if cleared:
            log.warning("removed git locks left by a swapguard that died: %s", ", ".join(cleared))
        return cleared

    def _remove_if_ours(self, name: str, owner: Owner) -> bool:
        path = self.git_dir / name
        if not _inside(path, self.git_dir):
            return False
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        if name == INDEX_LOCK and _lock_content(path) != owner.token():
            return False  # somebody else's index.lock, taken after ours went
        path.unlink(missing_ok=True)
        return True

    @contextlib.contextmanager
    def index_lock(self) -> Iterator[None]:
        """Hold index.lock the way git does, carrying our token (inside `holding`).
        FileExistsError when somebody holds it."""
        owner = Owner.me()
        lock = self.git_dir / INDEX_LOCK
        temp = self.git_dir / f"swapguard-lock.{owner.pid}.{threading.get_ident()}"
        temp.unlink(missing_ok=True)
        fd = os.open(temp, _CREATE, 0o644)
        try:
            os.write(fd, owner.token())
        finally:
            os.close(fd)
        try:
            os.link(temp, lock, follow_symlinks=False)  # atomic; never an empty lock
        finally:
            temp.unlink(missing_ok=True)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)

    @property
    def index(self) -> Path:
        return self.git_dir / "index"

    def pending(self) -> bool:
        return os.path.lexists(self.git_dir / PENDING_INDEX)

    def make_pending(self, staged: Path | None) -> tuple[int, int, int]:
        """Leave `staged` (None: no index at all) as the index to put in place once we may;
        returns the signature of the index it is to replace."""
        pending = self.git_dir / PENDING_INDEX
        pending.unlink(missing_ok=True)
        over = signature(self.index)
        if staged is not None:
            os.rename(staged, pending)
        else:
            os.close(os.open(pending, _CREATE, 0o644))  # empty: the checkpoint had no index
        fsync_folder(self.git_dir)
        return over

    def put_now(self, staged: Path | None) -> bool:
        """Put `staged` (None: no index at all) in place of the index at once, under index.lock,
        within a `holding` that names INDEX_LOCK; False, and nothing changed, while somebody else
        holds that lock (then `make_pending`). Any older pending index is dropped."""
        try:
            with self.index_lock():
                self.drop_pending()
                if staged is None:
                    self.index.unlink(missing_ok=True)
                else:
                    os.replace(staged, self.index)
                fsync_folder(self.git_dir)
        except FileExistsError:
            return False
        return True

    def put_pending(self, wait: float) -> bool:
        """Put the pending index in place under index.lock, waiting up to `wait` seconds for
        somebody else's lock to go; False if it did not."""
        pending = self.git_dir / PENDING_INDEX
        try:
            for attempt in _lock_attempts(wait):
                with attempt, self.holding([INDEX_LOCK]), self.index_lock():
                    if not os.path.lexists(pending):
                        return True  # another thread of ours put it in place meanwhile
                    if os.lstat(pending).st_size == 0:
                        self.index.unlink(missing_ok=True)
                        pending.unlink()
                    else:
                        os.replace(pending, self.index)
                    fsync_folder(self.git_dir)
        except FileExistsError:
            return False
        return True

    def drop_pending(self) -> None:
        (self.git_dir / PENDING_INDEX).unlink(missing_ok=True)

    def foreign_index_lock(self) -> str | None:
        """The path of an index.lock somebody else holds, or None."""
        path = self.git_dir / INDEX_LOCK
        return str(path) if os.path.lexists(path) else None


def signature(path: Path) -> tuple[int, int, int]:
    """Enough of a file's stat to tell that somebody wrote it: (inode, size, mtime); 0s if none."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _lock_attempts(wait: float) -> Retrying:
    """Short waits for a lock somebody else holds, bounded by `wait` (then FileExistsError)."""
    return Retrying(
        retry=retry_if_exception_type(FileExistsError),
        wait=wait_exponential(multiplier=0.02, max=0.25),
        stop=stop_after_delay(wait),
        reraise=True,
    )


def refuse_in_progress(root: Path, git_dir: Path) -> None:
    """CheckpointError while a merge, rebase, cherry-pick... is half done: a checkpoint now
    would describe a state nobody chose."""
    for marker, what in _IN_PROGRESS:
        if (git_dir / marker).exists():
            raise CheckpointError(f"{root}: {what} is in progress ({git_dir / marker})")


def set_aside_in_progress(root: Path, git_dir: Path, name: str) -> list[str]:
    """A merge, rebase, cherry-pick... begun since the checkpoint (a take refuses during one) is
    the new version's: its state files are moved into `swapguard-aside-<name>/` of the git dir
    (renamed, never read), so that it cannot stop its own rollback. The names moved."""
    markers = [marker for marker, _ in _IN_PROGRESS]
    found = [m for m in (*markers, *_COMPANIONS) if os.path.lexists(git_dir / m)]
    if not any(m in found for m in markers):
        return []
    aside = git_dir / f"swapguard-aside-{name}"
    aside.mkdir(exist_ok=True)
    for marker in found:
        dest, counter = aside / marker, 0
        while os.path.lexists(dest):
            counter += 1
            dest = aside / f"{marker}.{counter}"
        os.rename(git_dir / marker, dest)
    fsync_folder(git_dir)
    log.warning(
        "%s: set aside a git operation in progress (%s) in %s", root, ", ".join(found), aside
    )
    return found


def index_locked_error(path: str) -> CheckpointError:
    return CheckpointError(
        f"{path} exists: another git command is running or crashed; "
        "remove the file once no git process is left"
    )


def _lock_content(path: Path) -> bytes:
    try:
        fd = os.open(path, _READ)
    except OSError:
        return b""
    try:
        return os.read(fd, 256)
    finally:
        os.close(fd)


def _read_journal(path: Path) -> tuple[Owner, list[str]] | None:
    try:
        fd = os.open(path, _READ)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            data = json.loads(os.read(fd, _MAX_JOURNAL))
        finally:
            os.close(fd)
        owner = Owner(int(data["pid"]), float(data["started"]))
        locks = [str(name) for name in data["locks"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return owner, locks


def _write_durably(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.unlink(missing_ok=True)
    fd = os.open(temp, _CREATE, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename or create in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _inside(path: Path, folder: Path) -> bool:
    return os.path.normpath(path).startswith(os.path.normpath(folder) + os.sep)
