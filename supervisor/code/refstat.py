"""Has HEAD moved? The stat of the files git keeps it in, so a crash loop need not ask git.

Why it exists: status shows the HEAD each new host was started on, and a host that crashes in a
loop is spawned every few milliseconds; a `git rev-parse` per spawn (1.3 ms of CPU here, a
process beside the host's start) is most of what a restart costs after the spawn itself. HEAD
moves only by a write to `HEAD`, to the loose ref it names, or to `packed-refs`, each replaced
whole (a lock file renamed over it): a new inode, size or change time. When none of them
changed since git was last asked, its answer stands. Where that cannot be vouched for (a
linked worktree, whose refs live elsewhere; the reftable format; an unreadable file), None:
ask git.
"""

from __future__ import annotations

import os
from pathlib import Path

Signature = tuple[tuple[str, int, int, int, int] | None, ...]


def head_signature(git_dir: Path) -> Signature | None:
    """What HEAD is made of, as stat facts; None when they cannot tell (ask git)."""
    if not (git_dir / "refs").is_dir() or (git_dir / "reftable").exists():
        return None  # a linked worktree (refs in the common dir) or reftable: git knows
    try:
        head = (git_dir / "HEAD").read_bytes()
    except OSError:
        return None
    files = [git_dir / "HEAD", git_dir / "packed-refs"]
    if head.startswith(b"ref: "):
        ref = head[5:].strip().decode(errors="replace")
        if ".." in ref or not ref.startswith("refs/"):
            return None
        files.append(git_dir / ref)
    return tuple(_facts(path) for path in files)


def _facts(path: Path) -> tuple[str, int, int, int, int] | None:
    try:
        stat = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None  # a ref only in packed-refs, or no packed-refs: its absence is the fact
    return (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
