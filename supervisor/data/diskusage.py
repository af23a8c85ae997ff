"""What the disk budget is decided on (`core.diskbudget`): bytes held, bytes free, bytes needed.

Why it looks like this:
- Bytes are allocated bytes (`st_blocks` * 512), each inode counted once: a sparse database
  costs what it occupies, and a copy of it (which keeps holes) the same.
- A file's snapshot always lands on the file system of state.dir: where the data shares it, the
  live file is linked aside and the new version gets a copy beside it (on that same file system);
  elsewhere the snapshot is a copy into state.dir. A folder is copied into state.dir. Where the
  data lives on another file system, a rollback copies the snapshot back beside the kept data, so
  that file system must have room for it too. The estimate assumes a full copy: where the file
  system can share extents (reflink) the real cost is smaller.
- Nothing is followed through a symlink; what vanishes while it is measured counts as 0.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from supervisor.core.diskbudget import FileSystem, Held, Need
from supervisor.core.ids import is_swap_id
from supervisor.data import restoresteps
from supervisor.data.datacopy import SQLITE_SIDECARS


@dataclass(frozen=True, slots=True)
class Usage:
    """What the snapshots and the kept probation data hold now, as measured."""

    held: tuple[Held, ...]  # one per swap folder of the snapshot store, in the order asked
    snapshots: int  # bytes under the snapshot store (leftovers of interrupted takes too)
    kept: int  # bytes of probation-time data kept beside the data entries
    measured_at: float  # wall clock


def fs_key(path: str | Path) -> str:
    """The file system holding `path` (its nearest existing folder), as a key."""
    probe = Path(path)
    while True:
        try:
            return str(os.lstat(probe).st_dev)
        except FileNotFoundError:
            if probe.parent == probe:
                raise
            probe = probe.parent


def file_systems(labelled: Iterable[tuple[str, str | Path]]) -> list[tuple[FileSystem, list[str]]]:
    """Each file system among `labelled` (label, path) once, first path first, with its space
    (statvfs: what an unprivileged writer may use) and the labels of what it holds."""
    found: dict[str, tuple[FileSystem, list[str]]] = {}
    for label, path in labelled:
        probe = _existing(Path(path))
        try:
            key = str(os.lstat(probe).st_dev)
            if key in found:
                found[key][1].append(label)
                continue
            vfs = os.statvfs(probe)
        except OSError:
            continue
        fs = FileSystem(
            key=key,
            path=str(path),
            free=vfs.f_bavail * vfs.f_frsize,
            size=vfs.f_blocks * vfs.f_frsize,
        )
        found[key] = (fs, [label])
    return list(found.values())


def take_needs(entries: Sequence[tuple[Path, str]], state_dir: Path) -> list[Need]:
    """What an activation would write for each [[data]] entry (path, kind), by file system."""
    state_fs = fs_key(state_dir)
    needs: list[Need] = []
    for path, kind in entries:
        size = _entry_bytes(path, kind)
        if not size:
            continue
        needs.append(Need(path=str(path), fs=state_fs, bytes=size))
        data_fs = fs_key(path.parent)
        if data_fs != state_fs:
            needs.append(Need(path=str(path), fs=data_fs, bytes=size, budgeted=False))
    return needs


def measure(snapshot_root: Path, swaps: Sequence[tuple[str, str]], now: float) -> Usage:
    """What each of `swaps` (id, state) holds, and the totals of the store and the kept data."""
    seen: set[tuple[int, int]] = set()
    held: list[Held] = []
    kept_total = 0
    for swap_id, state in swaps:
        folder = snapshot_root / swap_id
        bytes_on: dict[str, int] = {}
        if is_swap_id(swap_id):
            for kept in restoresteps.kept_copies(folder):
                for key, size in _tree_bytes(kept, seen).items():
                    bytes_on[key] = bytes_on.get(key, 0) + size
                    kept_total += size
            for key, size in _tree_bytes(folder, seen).items():
                bytes_on[key] = bytes_on.get(key, 0) + size
        held.append(Held(swap_id=swap_id, state=state, bytes_on=bytes_on))
    everything = sum(_tree_bytes(snapshot_root, set()).values())
    return Usage(held=tuple(held), snapshots=everything, kept=kept_total, measured_at=now)


def swap_folders(snapshot_root: Path) -> list[str]:
    """The swap ids that have a folder in the snapshot store."""
    with contextlib.suppress(FileNotFoundError), os.scandir(snapshot_root) as items:
        return [item.name for item in items if is_swap_id(item.name)]
    return []


def _entry_bytes(path: Path, kind: str) -> int:
    """Allocated bytes a snapshot of the entry takes (SQLite: with its WAL, folded in first)."""
    if kind == "dir":
        return sum(_tree_bytes(path, set()).values())
    names = [path] + ([Path(f"{path}{s}") for s in SQLITE_SIDECARS[:1]] if kind == "sqlite" else [])
    return sum(_file_bytes(name) for name in names)


def _file_bytes(path: Path) -> int:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    return _allocated(st) if stat.S_ISREG(st.st_mode) else 0


def _allocated(st: os.stat_result) -> int:
    blocks = getattr(st, "st_blocks", None)
    return blocks * 512 if blocks else st.st_size


def _tree_bytes(root: Path, seen: set[tuple[int, int]]) -> dict[str, int]:
    """Allocated bytes under `root` (a file or a folder, never followed), by file system."""
    found: dict[str, int] = {}
    stack = [root]
    while stack:
        path = stack.pop()
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(OSError), os.scandir(path) as items:
                stack.extend(Path(item.path) for item in items)
            continue
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        key = str(st.st_dev)
        found[key] = found.get(key, 0) + _allocated(st)
    return found


def _existing(path: Path) -> Path:
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path
