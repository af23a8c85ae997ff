"""The steps of a journaled data restore, one data entry at a time.

Why it exists: `SnapshotStore.restore` keeps the journal (durably, once an entry is swapped in)
and the lock; what each step does to the file system is here. Every step can run again after a
crash at any point of it, and ends in the same state, so only `swap_in` needs a journal record
(a set_aside after it would keep the restored data): each costs two fsyncs, on the rollback's path.
- set_aside: whatever is at the target now (SQLite: its sidecars, then the file) is renamed to the
  kept name, `<path>.rolled-back-<swap id>`, unless it is still the snapshot itself (a take cut
  short before its working copy went in place: nothing was written, nothing to keep), or the
  kept name is taken (it ran before: what is at the target now is the restore's own);
- stage: the snapshot is linked (across file systems: copied, then checked in full) to a temp
  name in the target's folder (made durable by swap_in's fsync of that folder); right before a
  copy, the reserve the take allocated beside the target (`make_reserve`) is unlinked, so the
  copy needs no room the new version could have taken;
- swap_in: stale SQLite sidecars go, then the staged file is renamed over the target;
- settle_kept, once every entry is in place: the kept SQLite copy's WAL or hot journal is folded
  into it (one readable file); run again at every restore() call, as it is not journaled.
No symlink is followed: targets are renamed, never opened through a link; a folder that now
resolves elsewhere is refused.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisor.config.schema import reserve_path
from supervisor.data.datacopy import (
    SQLITE_SIDECARS,
    connect_sqlite,
    copy_tree,
    file_digest,
    fsync_dir,
    read_entries_json,
    remove_path,
    tree_digest,
    verify_sqlite_copy,
)
from supervisor.data.sqlitebusy import ATTEMPT_TIMEOUT_S, SqliteBusy, while_busy
from supervisor.errors import SnapshotError

log = logging.getLogger(__name__)

ENTRY_STEPS = ("set_aside", "stage", "swap_in")  # per entry, in order; then settle_kept
JOURNAL = "restore.json"
SETTLE_BUSY_FOR_S = 2.0
"""How long settle_kept tries while a straggler of the new version holds the kept copy: it runs
before the old version starts, and a copy left with its sidecars is whole, only not one file."""

Json = dict[str, Any]
PlaceFile = Callable[[Path, Path], str]  # links or copies a file; says which: "link" | "copy"


def plan(swap_id: str, entries: list[Json]) -> Json:
    """The journal: each entry with the free name its probation-time data will be kept under."""
    planned = []
    for entry in entries:
        base = kept = f"{entry['path']}.rolled-back-{swap_id}"
        counter = 0
        while any(os.path.lexists(kept + suffix) for suffix in ("", *SQLITE_SIDECARS)):
            counter += 1
            kept = f"{base}.{counter}"
        planned.append({**entry, "kept": kept})
    return {"swap_id": swap_id, "entries": planned, "done": [], "finished": False}


def restore_unfinished(swap_dir: Path) -> bool:
    """True if a restore of this swap began and did not finish (its snapshot must stay)."""
    journal = swap_dir / JOURNAL
    if swap_dir.is_symlink() or not swap_dir.is_dir() or not os.path.lexists(journal):
        return False
    try:
        return not read_entries_json(journal).get("finished", False)
    except SnapshotError:
        return True


def kept_copies(swap_dir: Path) -> list[Path]:
    """The probation-time data a finished restore of this swap kept: each entry's kept name and
    the SQLite sidecars beside it, as they exist now; none through a folder that was redirected."""
    journal = swap_dir / JOURNAL
    if swap_dir.is_symlink() or not os.path.lexists(journal):
        return []
    try:
        done = read_entries_json(journal)
    except SnapshotError as err:
        log.warning("the probation-time data of %s is unknown: %s", swap_dir.name, err)
        return []
    if not done.get("finished", False):
        return []
    found = []
    for entry in done["entries"]:
        kept = entry.get("kept")
        if not isinstance(kept, str):
            continue
        try:
            check_folder(kept)
        except SnapshotError as err:
            log.warning("leaving %s alone: %s", kept, err)
            continue
        suffixes = ("", *SQLITE_SIDECARS) if entry.get("kind") == "sqlite" else ("",)
        found += [Path(kept + suffix) for suffix in suffixes if os.path.lexists(kept + suffix)]
    return found


def drop_kept(swap_dir: Path) -> None:
    """Remove the probation-time data a finished restore of this swap kept (its swap is being
    pruned), never through a symlink."""
    copies = kept_copies(swap_dir)
    for path in copies:
        remove_path(path)
    for folder in {path.parent for path in copies}:
        fsync_dir(folder)
    if copies:
        log.info("removed %s, kept since swap %s rolled back", copies[0], swap_dir.name)


def run_step(step: str, swap_dir: Path, entry: Json, place_file: PlaceFile) -> None:
    """Run one of ENTRY_STEPS for one journal entry."""
    match step:
        case "set_aside":
            set_aside(swap_dir, entry)
        case "stage":
            stage(swap_dir, entry, place_file)
        case "swap_in":
            swap_in(swap_dir, entry, place_file)
        case _:
            raise ValueError(f"no restore step {step!r}")


def set_aside(swap_dir: Path, entry: Json) -> None:
    """Rename whatever is at the target now (SQLite: with its sidecars) to the kept name."""
    target, kept = entry["path"], entry["kept"]
    reclaim_folder(target, swap_dir.name, entry)
    check_folder(target)
    if entry["existed"] and same_file(target, swap_dir / str(entry["index"])):
        os.unlink(target)  # still the snapshot itself (a take cut short): nothing to keep
        return
    if os.path.lexists(kept):  # moved already (last): the target holds the restore's own now
        return
    suffixes = (*SQLITE_SIDECARS, "") if entry["kind"] == "sqlite" else ("",)
    moved = [suffix for suffix in suffixes if os.path.lexists(target + suffix)]
    for suffix in moved:
        os.rename(target + suffix, kept + suffix)
    if moved:
        fsync_dir(Path(os.path.dirname(target)))
        log.info("kept the probation-time %s as %s", target, kept)


def stage(swap_dir: Path, entry: Json, place_file: PlaceFile) -> None:
    """Link (across file systems: copy) the snapshot to a temp name in the target's folder."""
    if not entry["existed"]:
        return
    target, kind = entry["path"], entry["kind"]
    source, staged = swap_dir / str(entry["index"]), Path(staged_name(target, swap_dir.name))
    if not os.path.lexists(source):
        raise SnapshotError(f"the snapshot data {source} is missing")
    check_folder(target)
    if not staged.parent.is_dir():  # the new version deleted the folder
        staged.parent.mkdir(parents=True)
        fsync_dir(staged.parent.parent)  # (the link below is made durable by swap_in)
    remove_path(staged)
    drop_reserve(target)  # a crash after this finds it gone: the copy needs no more than it held
    placed: list[str] = []
    if kind == "dir":
        copy_tree(source, staged, lambda src, dst: placed.append(place_file(src, dst)))
    else:
        placed.append(place_file(source, staged))
    if "copy" in placed:  # a copy is O(size) anyway: check it all
        size, digest = tree_digest(staged) if kind == "dir" else file_digest(staged)
    else:
        size, digest = entry["bytes"] if kind == "dir" else staged.lstat().st_size, None
    if kind == "sqlite":
        verify_sqlite_copy(staged, entry["bytes"])
    if size != entry["bytes"] or digest not in (None, entry["sha256"] or digest):
        raise SnapshotError(f"the staged copy {staged} does not match the snapshot")


def swap_in(swap_dir: Path, entry: Json, place_file: PlaceFile) -> None:
    """Clear stale SQLite sidecars, then rename the staged copy over the target."""
    target = entry["path"]
    folder = Path(os.path.dirname(target))
    check_folder(target)
    stale = [target + s for s in SQLITE_SIDECARS if os.path.lexists(target + s)]
    if stale and entry["kind"] == "sqlite":  # gone for good before the file they'd replay onto
        for path in stale:
            remove_path(Path(path))
        fsync_dir(folder)
    if not entry["existed"]:
        put_folder_back(folder, entry)
        return
    staged = staged_name(target, swap_dir.name)
    if not os.path.lexists(staged) and not os.path.lexists(target):
        stage(swap_dir, entry, place_file)  # the staged copy went missing: make it again
    if os.path.lexists(staged):
        if entry["kind"] == "dir" and os.path.lexists(target):
            raise SnapshotError("something reappeared at the target mid-restore")
        os.replace(staged, target)
        fsync_dir(folder)
    put_folder_back(folder, entry)


def settle_kept(entry: Json) -> None:
    """Fold the kept SQLite copy's WAL or hot journal into it: one readable file."""
    kept = entry["kept"]
    if entry["kind"] != "sqlite" or not os.path.lexists(kept):
        return
    names = [kept] + [kept + s for s in SQLITE_SIDECARS if os.path.lexists(kept + s)]
    if len(names) == 1 or not all(stat.S_ISREG(os.lstat(name).st_mode) for name in names):
        return  # one file already; or a symlink SQLite would follow: leave it untouched
    try:
        for attempt in while_busy(SETTLE_BUSY_FOR_S, kept):
            with attempt:
                _fold_kept_wal(Path(kept))
    except (sqlite3.Error, SqliteBusy) as exc:
        log.warning("kept copy %s stays as it was, sidecars and all: %s", kept, exc)


def _fold_kept_wal(kept: Path) -> None:
    with contextlib.closing(connect_sqlite(kept, "mode=rw", ATTEMPT_TIMEOUT_S)) as con:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:
            raise SqliteBusy("its WAL could not be checkpointed: a reader holds it")


def make_reserve(target: str, size: int) -> None:
    """Allocate `size` bytes beside `target` (`reserve_path`), held until the swap ends: the
    room a rollback's copy of the snapshot needs, which the new version can then not take.
    One of ours left by a crashed take is replaced; anything but a regular file there is
    refused, and no symlink is followed. Where the file system cannot allocate (no fallocate),
    zeros are written instead. ENOSPC and the like raise OSError, leaving no reserve."""
    path = reserve_path(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise SnapshotError(f"{path} is not a regular file; not touching it") from None
        os.unlink(path)  # ours, from a take cut short
        fd = os.open(path, flags, 0o600)
    try:
        try:
            if size:
                os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            _write_zeros(fd, size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    fsync_dir(path.parent)


def _write_zeros(fd: int, size: int) -> None:
    block = bytes(1 << 20)
    written = 0
    while written < size:
        written += os.write(fd, block[: min(len(block), size - written)])


def drop_reserve(target: str) -> None:
    """Free the room `make_reserve` held beside `target` (a rollback's copy is about to use
    it, or the swap is over); never through a symlink, and a folder there is left alone."""
    path = reserve_path(target)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            os.unlink(path)


def same_file(path: str | Path, other: str | Path) -> bool:
    try:
        return os.path.samestat(os.lstat(path), os.lstat(other))
    except FileNotFoundError:
        return False


def staged_name(target: str, swap_id: str) -> str:
    folder, name = os.path.split(target)
    return os.path.join(folder, f".{name}.swapguard-restore-{swap_id}")


def folder_record(target: str) -> Json:
    """The mode and owner of a target's folder, for the manifest: a restore puts them back."""
    try:
        st = os.lstat(os.path.dirname(target))
    except FileNotFoundError:
        return {}
    return {
        "folder_mode": stat.S_IMODE(st.st_mode),
        "folder_uid": st.st_uid,
        "folder_gid": st.st_gid,
    }


def reclaim_folder(target: str, swap_id: str, entry: Json) -> None:
    """Make the target's folder a real folder we may change again: a symlink, file or anything
    else the new version put in its place is moved aside (never followed) as
    `<folder>.rolled-back-<swap id>`, and a folder it locked is opened up (its recorded mode
    comes back at swap_in). Only the target's own folder: one further up is refused."""
    folder = os.path.dirname(target)
    parent = os.path.dirname(folder)
    if os.path.realpath(parent) != parent:
        raise SnapshotError(
            f"{parent} now resolves to {os.path.realpath(parent)}; not following it"
        )
    try:
        st: os.stat_result | None = os.lstat(folder)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        kept = f"{folder}.rolled-back-{swap_id}"
        counter = 0
        while os.path.lexists(kept):
            counter += 1
            kept = f"{folder}.rolled-back-{swap_id}.{counter}"
        os.rename(folder, kept)
        fsync_dir(Path(parent))
        log.warning("%s was no longer a folder; kept what was there as %s", folder, kept)
        st = None
    if st is None:
        os.mkdir(folder, 0o700)
        put_folder_back(folder, entry)
        fsync_dir(Path(parent))
    elif st.st_mode & 0o700 != 0o700 and os.geteuid() in (0, st.st_uid):
        os.chmod(folder, stat.S_IMODE(st.st_mode) | 0o700, follow_symlinks=False)


def put_folder_back(folder: str | Path, entry: Json) -> None:
    """The folder's mode and owner as the take recorded them (older manifests: left alone)."""
    if "folder_mode" not in entry:
        return
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode):
        return
    if (st.st_uid, st.st_gid) != (entry["folder_uid"], entry["folder_gid"]):
        with contextlib.suppress(PermissionError):
            os.chown(folder, entry["folder_uid"], entry["folder_gid"], follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) != entry["folder_mode"]:
        os.chmod(folder, entry["folder_mode"], follow_symlinks=False)


def check_folder(target: str) -> None:
    """Refuse a target whose folder now resolves elsewhere: a symlink planted to redirect us."""
    folder = os.path.dirname(target)
    real = os.path.realpath(folder)
    if real != folder:
        raise SnapshotError(f"its folder {folder} now resolves to {real}; not following it")
