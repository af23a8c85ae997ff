"""Has HEAD moved? The stat of the files git keeps it in, so a crash loop need not ask git.

Why it exists: status shows the HEAD each new host was started on, and a host that crashes in a
loop is spawned every few milliseconds; a `git rev-parse` per spawn (1.3 ms of CPU here, a
process beside the host's start) is most of what a restart costs after the spawn itself. HEAD
moves only by a write to `HEAD`, to the loose ref it names, or to `packed-refs`, each replaced
whole (a lock file renamed over it): a new inode, size or change time; and the git dir itself
moves only by a change to `<root>/.git` (a gitfile re-pointed, a folder replaced). When none of
them changed since git was last asked, its answer stands. Where that cannot be vouched for, None:
ask git. That is: a linked worktree (`commondir`: its refs live elsewhere), the reftable format,
HEAD or its ref a symlink (its target's changes are not in the link's stat), a ref that names
another ref (a chain git follows further), an unreadable file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

Facts = tuple[str, int, int, int, int]
Signature = tuple[Facts | None, ...]


def head_signature(git_dir: Path, root: Path | None = None) -> Signature | None:
    """What HEAD is made of, as stat facts; None when they cannot tell (ask git). `root`: the
    work tree whose `.git` (a folder, or a gitfile naming `git_dir`) is part of the facts."""
    if (
        not (git_dir / "refs").is_dir()
        or (git_dir / "reftable").exists()
        or os.path.lexists(git_dir / "commondir")
    ):
        return None  # a linked worktree (refs in the common dir) or reftable: git knows
    head_path = git_dir / "HEAD"
    head = _plain_read(head_path)
    if head is None:
        return None
    files = [head_path, git_dir / "packed-refs"]
    if head.startswith(b"ref: "):
        ref = head[5:].strip().decode(errors="replace")
        if ".." in ref or not ref.startswith("refs/"):
            return None
        ref_path = git_dir / ref
        if os.path.lexists(ref_path):
            content = _plain_read(ref_path)
            if content is None or content.startswith(b"ref: "):
                return None  # a symlink, unreadable, or a symref chain: git follows it
        files.append(ref_path)
    facts = tuple(_facts(path) for path in files)
    if root is None:
        return facts
    dot_git = _facts(root / ".git", folder_identity=True)
    if dot_git is None or not _names(root / ".git", git_dir):
        return None
    return (dot_git, *facts)


def _names(dot_git: Path, git_dir: Path) -> bool:
    """Is `dot_git` that very git dir, or a gitfile naming it (not one re-pointed since)?"""
    if dot_git.is_dir() and not dot_git.is_symlink():
        try:
            return os.path.samefile(dot_git, git_dir)
        except OSError:
            return False
    content = _plain_read(dot_git)
    if content is None or not content.startswith(b"gitdir: "):
        return False
    named = Path(os.fsdecode(content[8:].strip()))
    try:
        return os.path.samefile(dot_git.parent / named, git_dir)
    except OSError:
        return False


def _plain_read(path: Path) -> bytes | None:
    """The content of a regular file (never through a symlink); None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(fd)


def _facts(path: Path, *, folder_identity: bool = False) -> Facts | None:
    """`folder_identity`: a folder counts by its inode only (its entries change all the time)."""
    try:
        found = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None  # a ref only in packed-refs, or no packed-refs: its absence is the fact
    if folder_identity and stat.S_ISDIR(found.st_mode):
        return (str(path), found.st_ino, 0, 0, 0)
    return (str(path), found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns)
