"""The locks swapguard takes in a git dir: known to be ours after a crash, never stolen otherwise;
and the other git-dir state that could stop a rollback (a half-done merge or rebase).

Why: a kill -9 of swapguard (or of the git it runs) between taking a lock and releasing it
leaves the lock file behind, and every later git command, ours included, then refuses to run:
the rollback would end `failed` with the new version's code and data in place.

Theory of operation: before an operation that may take locks in the repo (our own `index.lock`,
and the ref locks of the git commands it runs), a journal naming those locks and their owner
(pid and process start time) is written durably into the git dir. The owner holds an exclusive
`flock` on the journal for the whole operation, and every git command run inside it inherits
that open file (`inherited_fds`), so the flock stays held as long as the owner *or any git it
started* lives: a git orphaned by a swapguard that died (swapguard alone killed, or exited)
still holds it, and its locks are left to it. The journal is removed when the operation ends,
or kept when a git of ours had to be killed in it (its locks stay behind). A later swapguard
(`clear_stale`, on resume and before each operation) that can take the flock of a journal
knows that nobody of ours runs under it, and removes the listed locks that are provably ours:
created after the journal was written (a lock older than it is somebody else's) and, for the
`index.lock` we take ourselves, carrying the owner's token as its content (written to a temp
file, then linked into place, so it never exists empty). Any other lock is reported, never
removed.
"""

from __future__ import annotations

import contextlib
import fcntl
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
_held = threading.local()  # this thread's journals: their fds go to the git commands it runs


def inherited_fds() -> tuple[int, ...]:
    """The flocked journals of this thread's operations: every git it runs keeps them open, so a
    git that outlives us (orphaned) still proves its locks are held (`Git.run` passes them)."""
    return tuple(held.fd for held in getattr(_held, "stack", ()))


def git_was_killed() -> None:
    """A git command of this thread was killed (timed out): the locks it held stay behind, so
    the journals of the operations it ran in are kept for `clear_stale`."""
    for held in getattr(_held, "stack", ()):
        held.keep = True


@dataclass
class _Holding:
    fd: int
    keep: bool = False


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
        record = {"pid": owner.pid, "started": owner.started, "locks": list(locks), "flock": True}
        held = _Holding(_write_flocked(journal, json.dumps(record)))
        stack: list[_Holding] = getattr(_held, "stack", [])
        _held.stack = stack
        stack.append(held)
        try:
            yield
        finally:
            stack.remove(held)
            try:
                if held.keep:
                    log.warning("%s: a git of ours was killed holding its locks; kept for "
                                "clearing", journal)  # fmt: skip
                else:
                    journal.unlink(missing_ok=True)
            finally:
                os.close(held.fd)  # the flock goes with it (unless a git of ours still runs)

    def clear_stale(self, wait: float = 0.0) -> list[str]:
        """Remove the locks of journals nobody of ours holds any more; the names of those removed.

        A journal still held by a git whose swapguard died (an orphan that goes on) is waited
        for up to `wait` seconds, then left to it: its locks are its own to release."""
        cleared: list[str] = []
        for temp in self.git_dir.glob(f".{_JOURNAL_PREFIX}*.tmp"):  # torn before it was in place
            with _flocked(temp) as fd:
                if fd is not None:
                    temp.unlink(missing_ok=True)
        for journal in sorted(self.git_dir.glob(f"{_JOURNAL_PREFIX}*.json")):
            # one of this process's own is held by a thread at work: no use waiting for it
            mine = journal.name.startswith(f"{_JOURNAL_PREFIX}{os.getpid()}-")
            with _flocked(journal, 0.0 if mine else wait) as fd:
                if fd is None:
                    continue  # ours, still running (or gone meanwhile)
                recorded = _read_journal(fd)
                if recorded is None:
                    journal.unlink(missing_ok=True)  # torn before it was durable: nothing taken
                    continue
                owner, locks, flocked = recorded
                if not flocked and owner.alive():
                    continue  # written before journals were flocked: its owner still runs
                since = os.fstat(fd).st_mtime_ns
                for name in locks:
                    if self._remove_if_ours(name, owner, since):
                        cleared.append(name)
                journal.unlink(missing_ok=True)
        if cleared:
            log.warning("removed git locks left by a swapguard that died: %s", ", ".join(cleared))
        return cleared

    def foreign_locks(self) -> list[str]:
        """The `*.lock` files of the git dir that no journal of ours can claim: somebody else's
        (a user's git at work, or one that crashed). Reported, never removed."""
        claimed: set[str] = set()
        for journal in self.git_dir.glob(f"{_JOURNAL_PREFIX}*.json"):
            with contextlib.suppress(OSError):
                fd = os.open(journal, _READ)
                try:
                    recorded, since = _read_journal(fd), os.fstat(fd).st_mtime_ns
                finally:
                    os.close(fd)
                if recorded is not None:
                    owner, locks, _ = recorded
                    claimed.update(name for name in locks if self._claims(name, owner, since))
        found = [path for path in self.git_dir.glob("*.lock") if path.name not in claimed]
        return sorted(str(path) for path in found)

    def _claims(self, name: str, owner: Owner, since: int) -> bool:
        """Whether the lock `name` is provably the journal's: a regular file inside the git dir,
        created no earlier than the journal (`since`, its mtime in ns: the same clock), and for
        index.lock carrying the owner's token."""
        path = self.git_dir / name
        if not _inside(path, self.git_dir):
            return False
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_mtime_ns < since:
            return False
        return name != INDEX_LOCK or _lock_content(path) == owner.token()

    def _remove_if_ours(self, name: str, owner: Owner, since: int) -> bool:
        """Remove the lock `name` if the journal claims it (`_claims`); anything else that
        exists is reported, never removed."""
        path = self.git_dir / name
        if not self._claims(name, owner, since):
            if os.path.lexists(path) and _inside(path, self.git_dir):
                log.warning("%s: not taken by the swapguard that died (left alone)", path)
            return False
        path.unlink(missing_ok=True)
        return True

    @contextlib.contextmanager
    def index_lock(self) -> Iterator[None]:
        """Hold index.lock the way git does, carrying our token (inside `holding`).
        FileExistsError when somebody holds it."""
        owner = Owner.me()
        lock = self.git_dir / INDEX_LOCK
        temp = self.git_dir / _index_lock_temp()
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
                journaled = [INDEX_LOCK, _index_lock_temp()]
                with attempt, self.holding(journaled), self.index_lock():
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


def _index_lock_temp() -> str:
    """Where this thread writes the index.lock it is about to link into place."""
    return f"swapguard-lock.{os.getpid()}.{threading.get_ident()}"


@contextlib.contextmanager
def _flocked(path: Path, wait: float = 0.0) -> Iterator[int | None]:
    """`path` opened (never followed) with its flock taken, waiting up to `wait` seconds for
    it; None when somebody holds it still, or it is gone or no regular file."""
    try:
        fd = os.open(path, _READ)
    except OSError:
        yield None
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not _take_flock(fd, wait):
            yield None
        else:
            yield fd
    finally:
        os.close(fd)


def _take_flock(fd: int, wait: float) -> bool:
    try:
        for attempt in Retrying(
            retry=retry_if_exception_type(BlockingIOError),
            wait=wait_exponential(multiplier=0.02, max=0.25),
            stop=stop_after_delay(wait),
            reraise=True,
        ):
            with attempt:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_journal(fd: int) -> tuple[Owner, list[str], bool] | None:
    """(owner, locks, whether the journal is flocked by its owner) or None if torn."""
    try:
        data = json.loads(os.pread(fd, _MAX_JOURNAL, 0))
        owner = Owner(int(data["pid"]), float(data["started"]))
        locks = [str(name) for name in data["locks"]]
        flocked = data.get("flock") is True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return owner, locks, flocked


def _write_flocked(path: Path, text: str) -> int:
    """Write `path` durably (temp file, fsync, rename, fsync of the folder), flocked from before
    it appears; returns its fd, which holds the flock until closed."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.unlink(missing_ok=True)
    fd = os.open(temp, _CREATE, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, text.encode())
        os.fsync(fd)
        os.replace(temp, path)
        fsync_folder(path.parent)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    return fd


def fsync_folder(folder: Path) -> None:
    """Make a rename or create in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _inside(path: Path, folder: Path) -> bool:
    return os.path.normpath(path).startswith(os.path.normpath(folder) + os.sep)
