"""The repo's own attributes file, `.git/info/attributes`: kept by each checkpoint, put back first
by each restore.

It outranks every `.gitattributes` of the tree, and its `text`, `eol`, `ident` and
`working-tree-encoding` lines convert what git reads from the tree and writes into it. A line a
new version adds there (`* text eol=crlf`) would make a restore write other bytes than the take
read: every restored script would end its lines in CR LF, and the old version might not start.
So a checkpoint records the file as it was (its blob, in the commit message; "none" when there
was none), and a restore puts that back before it captures or writes anything; the file it
replaces is kept as a blob (logged) and never followed. Filter drivers are off for swapguard's git
altogether (`gitcmd`), and the keys of the repo's config that change what git reads or writes are
pinned there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from supervisor.code import treepaths
from supervisor.code.gitcmd import Git

log = logging.getLogger(__name__)

_PREFIX = "info-attributes: "
_NONE = "none"
_LINE = re.compile(rf"^{_PREFIX}([0-9a-f]{{40}}(?:[0-9a-f]{{24}})?|{_NONE})$", re.MULTILINE)
_LIMIT = 1 << 20  # bytes: an attributes file is a few lines; a bigger one is no attributes file
_SCRATCH = ".swapguard-attributes."  # the file a put-back writes, then renames over
_RAW = b"* -text -eol -crlf -ident -filter -working-tree-encoding\n"


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _read(folder_fd: int) -> bytes | None:
    """`attributes`' bytes when it is a regular file (never a link, a FIFO or a device)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open("attributes", flags, dir_fd=folder_fd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return file.read(_LIMIT + 1)


@contextlib.contextmanager
def _info(git_dir: Path) -> Iterator[int | None]:
    """The `info` folder, opened without following a link (None: it is no real folder)."""
    try:
        fd = os.open(git_dir / "info", _DIR)
    except OSError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def to_message(git: Git, git_dir: Path) -> str:
    """The commit-message line that records the file as it is now (its content kept as a
    blob). Anything but a regular file in a real `info` folder counts as none: git would not
    read a FIFO, and through a link it is not the repo's."""
    with _info(git_dir) as folder:
        content = None if folder is None else _read(folder)
    if content is None or len(content) > _LIMIT:
        return f"{_PREFIX}{_NONE}\n"
    return f"{_PREFIX}{_hash(git, content)}\n"


def _hash(git: Git, content: bytes) -> str:
    args = ("hash-object", "-w", "--no-filters", "--stdin")
    return git.out(*args, stdin=os.fsdecode(content)).strip()


def from_message(message: str) -> str | None:
    """The recorded blob, "none" (there was no file), or None: a checkpoint taken before
    swapguard kept the file (then it is left as it is)."""
    found = _LINE.search(message)
    return found.group(1) if found else None


def put_back(git: Git, git_dir: Path, recorded: str) -> None:
    """Make `.git/info/attributes` what `recorded` (`from_message`) says it was: written beside
    and renamed over, or removed; every step through the `info` folder's descriptor, so never
    through a link. A no-op when it is so already."""
    _make(git, git_dir, None if recorded == _NONE else _blob(git, recorded), keep=True)


@contextlib.contextmanager
def raw(git: Git, git_dir: Path, recorded: str) -> Iterator[None]:
    """While in the block, no attribute converts anything (info/attributes outranks the
    tree's): for a capture the tree's own attributes fail (an unknown encoding), which would
    fail every rollback. Then what `recorded` says is put back (also by the next restore, if
    we die in the block)."""
    _make(git, git_dir, _RAW, keep=True)
    try:
        yield
    finally:
        _make(git, git_dir, None if recorded == _NONE else _blob(git, recorded), keep=False)


def _make(git: Git, git_dir: Path, wanted: bytes | None, *, keep: bool) -> None:
    """`info/attributes` holding `wanted` (None: no such file); with `keep`, what it replaces
    is kept as a blob, named in the log."""
    with _info(git_dir) as folder:
        if folder is None:
            if wanted is None and not os.path.lexists(git_dir / "info"):
                return
            log.warning("%s is no folder: replaced by one", git_dir / "info")
            treepaths.remove(git_dir, "info")  # a link or a file: removed, never followed
            os.mkdir(git_dir / "info", 0o755)
            git.give(git_dir / "info")
            return _make(git, git_dir, wanted, keep=keep)
        for stale in os.listdir(folder):
            if stale.startswith(_SCRATCH):  # a put-back a crash cut short
                os.unlink(stale, dir_fd=folder)
        now = _read(folder)
        try:
            os.stat("attributes", dir_fd=folder, follow_symlinks=False)
            exists = True
        except FileNotFoundError:
            exists = False
        if now == wanted and (wanted is not None or not exists):
            return None
        if not keep:
            pass
        elif now is not None and len(now) <= _LIMIT:
            log.warning("%s replaced; it was blob %s", git_dir / "info/attributes", _hash(git, now))
        elif exists:
            log.warning("%s replaced; it was no regular file", git_dir / "info/attributes")
        if wanted is None:
            _remove(folder)
        else:
            _write_beside(git, folder, wanted)
        os.fsync(folder)
    return None


def _blob(git: Git, sha: str) -> bytes:
    found = git.objects([sha], contents=True)[0]
    if found is None or found.type != "blob":
        log.warning("the recorded .git/info/attributes (blob %s) is gone: put back empty", sha)
        return b""
    return found.body


def _write_beside(git: Git, folder: int, content: bytes) -> None:
    """A new file, synced, renamed over `attributes` (a folder there is removed first)."""
    scratch = f"{_SCRATCH}{os.getpid()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(scratch, flags, 0o644, dir_fd=folder)
    try:
        with os.fdopen(fd, "wb", closefd=False) as out:
            out.write(content)
        os.fsync(fd)
        if git.owner is not None:
            os.fchown(fd, git.owner.uid, git.owner.gid)
        _remove(folder, folders_only=True)
        os.rename(scratch, "attributes", src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(scratch, dir_fd=folder)
        raise
    finally:
        os.close(fd)


def _remove(folder: int, *, folders_only: bool = False) -> None:
    """Remove `attributes` (a folder there with all below it), never following a link."""
    try:
        mode = os.stat("attributes", dir_fd=folder, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree("attributes", dir_fd=folder)
    elif not folders_only:
        os.unlink("attributes", dir_fd=folder)
