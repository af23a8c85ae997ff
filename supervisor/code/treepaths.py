"""What is on disk in a code tree, looked at without following a symlink or opening anything.

Why: a new version may leave a symlink where a folder was, or a FIFO, socket or device where a file
was. Git refuses pathspecs below a symlink and cannot hold special files; opening a FIFO blocks.
These predicates let the checkpoint tell such paths apart with lstat alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath


def is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def is_special(path: Path) -> bool:
    """A FIFO, socket or device: git cannot hold it, and opening it could block or act."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode))


def plain(root: Path, path: str) -> bool:
    """`path` exists as a file, link or folder, reached through real folders only."""
    return (
        below_real_dirs(root, path) and os.path.lexists(root / path) and not is_special(root / path)
    )


def first_non_dir_above(root: Path, path: str) -> str | None:
    """The topmost folder of `path` (below root) that is now something else, or None."""
    for parent in reversed(PurePosixPath(path).parents):
        if parent.name and os.path.lexists(root / parent) and not is_real_dir(root / parent):
            return str(parent)
    return None


def below_real_dirs(root: Path, path: str) -> bool:
    """Every folder between root and `path` is a real folder, not a symlink to one."""
    return all(
        not parent.name or is_real_dir(root / parent) for parent in PurePosixPath(path).parents
    )


def is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def special_entries(root: Path, folders: Iterable[str]) -> list[str]:
    """FIFOs, sockets and devices directly in each of `folders` (relative; "" is root) that are
    real folders reached through real folders; `.git` at the top is skipped. No stat calls:
    the kinds come from the directory listing."""
    found = []
    for folder in sorted(set(folders)):
        if folder and not (below_real_dirs(root, folder) and is_real_dir(root / folder)):
            continue
        try:
            with os.scandir(root / folder) as entries:
                for entry in entries:
                    if not folder and entry.name == ".git":
                        continue
                    if not (
                        entry.is_file(follow_symlinks=False)
                        or entry.is_dir(follow_symlinks=False)
                        or entry.is_symlink()
                    ):
                        found.append(f"{folder}/{entry.name}" if folder else entry.name)
        except OSError:
            continue
    return found


def remove(root: Path, path: str) -> bool:
    """Remove `path` (relative) and all below it, never following a symlink: each folder above
    it is entered through a file descriptor opened with O_NOFOLLOW, and a folder is removed by
    the fd-based `shutil.rmtree`; whether something was removed. A path below a symlink or
    below something that is no folder any more is left alone (it is not in the tree)."""
    parts = PurePosixPath(path).parts
    if not parts or ".." in parts:
        return False
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    with contextlib.ExitStack() as stack:
        try:
            fd = os.open(root, flags)
            stack.callback(os.close, fd)
            for name in parts[:-1]:
                fd = os.open(name, flags, dir_fd=fd)
                stack.callback(os.close, fd)
        except OSError:
            return False
        return remove_at(fd, parts[-1])


def remove_at(folder: int, name: str, *, folders_only: bool = False) -> bool:
    """Remove `name` in the folder open as `folder` (a folder with all below it, by the fd-based
    `shutil.rmtree`), never following a symlink; whether something was there. `folders_only`:
    anything else is left (a rename will replace it)."""
    try:
        mode = os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode
    except OSError:
        return False
    if stat.S_ISDIR(mode):
        shutil.rmtree(name, dir_fd=folder)
    elif not folders_only:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=folder)
    return True
