"""What converts a file as git reads it from the tree or writes it there: recorded by each take,
in force at each restore, whatever the new version changed since.

Three things convert: the filter drivers (commands the config names, run on each file an
attributes line names), the line-end settings (`core.autocrlf`, `core.eol`), and the attributes
(`text`, `eol`, `ident`, `working-tree-encoding`, `filter`) of `.git/info/attributes`, which
outranks every `.gitattributes` of the tree. The new version may rewrite all three: a driver of
its own would write its own bytes at the restore, `* text eol=crlf` would end every restored line
in CR LF (and the old version might not start), and an unknown encoding would fail every `git
add`, and with it every rollback. So:

- a checkpoint records the drivers and line-end settings (`gitcmd.Git.conversions`) and the
  attributes file (its blob, "none" when there was none) in its commit message;
- a restore puts the attributes file back first (what it replaces is kept as a blob, named in the
  log; never written through a link), and runs git with the recorded drivers and settings alone
  (`gitcmd.Git.as_at_the_take`);
- a restore reads the tree byte for byte (`raw`: nothing in the tree's attributes can hide a
  change or fail the read), and writes the checkpoint with the conversions of the take.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from supervisor.code import treepaths
from supervisor.code.gitcmd import Git

log = logging.getLogger(__name__)

_ATTRIBUTES = "info-attributes: "
_CONFIG = "conversions: "
_NONE = "none"
_ATTRIBUTES_LINE = re.compile(
    rf"^{_ATTRIBUTES}([0-9a-f]{{40}}(?:[0-9a-f]{{24}})?|{_NONE})$", re.MULTILINE
)
_CONFIG_LINE = re.compile(rf"^{_CONFIG}(.*)$", re.MULTILINE)
_LIMIT = 1 << 20  # bytes: an attributes file is a few lines; a bigger one is no attributes file
_SCRATCH = ".swapguard-attributes."  # the file a put-back writes, then renames over
# while a restore reads the tree: no attribute converts anything (this file outranks the tree's)
_RAW = b"* -text -eol -crlf -ident -filter -working-tree-encoding\n"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def to_message(git: Git, info: Path) -> str:
    """The commit-message lines that record what converts files now. `info`: the repo's
    `info` folder (the common git dir's: a linked work tree reads that one)."""
    with _opened(info) as folder:
        content = None if folder is None else _read(folder)
        if content == _RAW and folder is not None:  # ours, left by a restore cut short
            log.warning("%s: swapguard's byte-for-byte attributes removed", info / "attributes")
            treepaths.remove_at(folder, "attributes")
            content = None
    blob = _NONE if content is None or len(content) > _LIMIT else _hash(git, content)
    config = json.dumps(git.conversions(), ensure_ascii=True, sort_keys=True)
    return f"{_ATTRIBUTES}{blob}\n{_CONFIG}{config}\n"


def attributes_from_message(message: str) -> str | None:
    """The recorded blob of the attributes file, "none" (there was none), or None: a checkpoint
    taken before swapguard kept it (then it is left as it is)."""
    found = _ATTRIBUTES_LINE.search(message)
    return found.group(1) if found else None


def config_from_message(message: str) -> dict[str, str] | None:
    """The recorded drivers and line-end settings; None for a checkpoint taken before swapguard
    kept them (then a restore runs no driver and converts no line end)."""
    found = _CONFIG_LINE.search(message)
    if found is None:
        return None
    try:
        config = json.loads(found.group(1))
    except ValueError:
        return None
    if not isinstance(config, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in config.items()
    ):
        return None
    return config


def put_back(git: Git, info: Path, recorded: str) -> None:
    """Make `info/attributes` what `recorded` (`attributes_from_message`) says it was: written
    beside and renamed over, or removed; a no-op when it is so already."""
    wanted = None if recorded == _NONE else _blob(git, recorded)
    _make(git, info, wanted, keep=True)


@contextlib.contextmanager
def raw(git: Git, info: Path) -> Iterator[None]:
    """While in the block, no attribute converts anything: a restore reads the tree byte for
    byte. Then the file is put back as it was (a restore dying in the block leaves ours, which
    the next restore replaces with the recorded one, and a take removes)."""
    with _opened(info) as folder:
        before = None if folder is None else _read(folder)
    if before is not None and len(before) > _LIMIT:
        before = None
    _make(git, info, _RAW, keep=False)  # not synced: a crash leaves it to be repaired anyway
    try:
        yield
    finally:
        _make(git, info, before, keep=False)


def _make(git: Git, info: Path, wanted: bytes | None, *, keep: bool) -> None:
    """`info/attributes` holding `wanted` (None: no such file), every step through the folder's
    descriptor; with `keep` (a put-back), synced, and what it replaces is kept as a blob, named
    in the log."""
    with _opened(info) as folder:
        if folder is None:
            if os.path.lexists(info):
                log.warning("%s is no folder: replaced by one", info)
                treepaths.remove(info.parent, info.name)  # a link or a file: never followed
            elif wanted is None:
                return
            os.mkdir(info, 0o755)
            git.give(info)
            return _make(git, info, wanted, keep=keep)
        for name in os.listdir(folder):
            if name.startswith(_SCRATCH):  # a put-back a crash cut short (or planted)
                treepaths.remove_at(folder, name)
        now = _read(folder)
        exists = _exists(folder)
        if now == wanted and (wanted is not None or not exists):
            return None
        if keep and now is not None and len(now) <= _LIMIT:
            log.warning("%s replaced; it was blob %s", info / "attributes", _hash(git, now))
        elif keep and exists:
            log.warning("%s replaced; it was no regular file", info / "attributes")
        if wanted is None:
            treepaths.remove_at(folder, "attributes")
        else:
            _write_beside(git, folder, wanted, sync=keep)
        if keep:
            os.fsync(folder)
    return None


@contextlib.contextmanager
def _opened(info: Path) -> Iterator[int | None]:
    """The `info` folder, opened without following a link (None: it is no real folder)."""
    try:
        fd = os.open(info, _DIR)
    except OSError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _read(folder: int) -> bytes | None:
    """`attributes`' bytes when it is a regular file (never a link, a FIFO or a device)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open("attributes", flags, dir_fd=folder)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return file.read(_LIMIT + 1)


def _exists(folder: int) -> bool:
    try:
        os.stat("attributes", dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _hash(git: Git, content: bytes) -> str:
    args = ("hash-object", "-w", "--no-filters", "--stdin")
    return git.out(*args, stdin=os.fsdecode(content)).strip()


def _blob(git: Git, sha: str) -> bytes:
    found = git.objects([sha], contents=True)[0]
    if found is None or found.type != "blob":
        log.warning("the recorded info/attributes (blob %s) is gone: put back empty", sha)
        return b""
    return found.body


def _write_beside(git: Git, folder: int, content: bytes, *, sync: bool) -> None:
    """A new file, synced, renamed over `attributes` (a folder there is removed first)."""
    scratch = f"{_SCRATCH}{os.getpid()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(scratch, flags, 0o644, dir_fd=folder)
    try:
        with os.fdopen(fd, "wb", closefd=False) as out:
            out.write(content)
        if sync:
            os.fsync(fd)
        if git.owner is not None:
            os.fchown(fd, git.owner.uid, git.owner.gid)
        treepaths.remove_at(folder, "attributes", folders_only=True)
        os.rename(scratch, "attributes", src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(scratch, dir_fd=folder)
        raise
    finally:
        os.close(fd)

