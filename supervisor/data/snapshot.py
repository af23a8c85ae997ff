"""Snapshots of the host's [[data]] entries: taken at activation, restored exactly at rollback.

- take() runs while the host is stopped, so its time is downtime: it does only what an exact,
  durable snapshot needs. SQLite is checkpointed first (WAL folded in, hot journal rolled back),
  so the main file alone is the database. A file's snapshot is the original file itself,
  hard-linked into a staging folder (durable at once: only what the host left unflushed is
  fsynced), and the kernel copies it to a working copy, into the pages the snapshot gives up
  (`datacopy.working_copy`: new memory, not the copy, was most of a large take on a VM that
  returns freed memory to its hypervisor); once the staging folder is renamed into
  place, the working copy replaces the live file (`linked` records, which carry no digest: the
  snapshot is the file that was live, not a copy to check against it). The new version
  thus writes to a copy that is not yet on disk: the swap machine orders SyncData once it runs and
  confirms nothing before. Across file systems, and for folders, the snapshot is a durable copy
  instead; where a rollback would copy it back (the data is not on the store's file system), the
  take also allocates its size beside the target (`restoresteps.make_reserve`), freed by the
  restore right before its copy, or once the swap ends (drop_reserves, prune).
  A crash before the rename leaves only the staging folder (and working copies), which
  the next take() or prune() removes; after it, take() again reuses the snapshot and makes the
  working copies afresh from it (the live files may be torn by a power cut).
- verify() is the slow check (SQLite integrity_check, seconds per GiB), run once the new version is
  up. A snapshot that fails it is still the exact copy of what the host left: it is reported, and
  restore() still puts it back. A restore, prune or retake of the swap stops it (SnapshotError).
- restore() is a list of named steps (RESTORE_STEPS) under a durable journal: after a crash anywhere
  another restore() ends exact; a finished restore run again is a no-op. Its time does not grow
  with the data: the snapshot is hard-linked beside the target and renamed over it (copied only
  across file systems); once finished the store drops its links, as the live data owns them now.
- Probation-time data is kept as "<path>.rolled-back-<swap id>" (SQLite: sidecars renamed alongside,
  then checkpointed into one file), until prune() drops that swap's snapshot. No symlink is
  followed: targets are renamed, never opened through a link; trees are removed by rmtree's
  fd-based walk; a folder that now resolves elsewhere is refused. The restore's steps themselves
  are `supervisor.data.restoresteps`.
- The copying, hashing and SQLite checks themselves are `supervisor.data.datacopy` (`file_digest`,
  `tree_digest`, `SQLITE_MAGIC` and `SQLITE_SIDECARS` are re-exported here).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sqlite3
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, get_args

from supervisor.config.schema import DataKind
from supervisor.core.ids import SWAP_ID_SYNTAX, is_swap_id
from supervisor.data import restoresteps
from supervisor.data.datacopy import SQLITE_MAGIC as SQLITE_MAGIC  # re-exported, unused here
from supervisor.data.datacopy import (
    SQLITE_SIDECARS,
    StopSignal,
    connect_sqlite,
    copy_file,
    copy_file_hashed,
    copy_tree,
    explain,
    fsync_dir,
    read_entries_json,
    remove_path,
    sqlite_verdict,
    tree_digest,
    verify_sqlite_copy,
    working_copy,
    write_json,
)
from supervisor.data.datacopy import file_digest as file_digest  # re-exported, unused here
from supervisor.data.restoresteps import ENTRY_STEPS
from supervisor.data.sqlitebusy import ATTEMPT_TIMEOUT_S, SqliteBusy, is_busy, while_busy
from supervisor.errors import SnapshotError

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = get_args(DataKind)  # the config's [[data]] kinds
RESTORE_STEPS = ("write_intent", *ENTRY_STEPS, "mark_finished", "settle_kept", "release")
TAKE_STEPS = ("take_entry", "commit_take", "swap_in_copies")
VERIFY_STEPS = ("verify_entry",)

Json = dict[str, Any]
Verdict = tuple[str, bool, str]  # verify(): (path, ok, detail)
_FIELDS = ("path", "kind", "existed", "bytes", "sha256")
_MANIFEST, _JOURNAL = "manifest.json", restoresteps.JOURNAL
_STAGING, _REPLACED = ".taking-", ".replaced-"
_NO_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.EACCES)


@dataclass(frozen=True, slots=True)
class DataSnapshot:
    """What take() captured of one entry; the runtime stores it and hands it back to restore()."""

    path: str  # the live target, absolute, its folder resolved at take time
    kind: str  # "sqlite" | "file" | "dir"
    existed: bool  # False: rollback moves aside whatever the new version created there
    bytes: int  # of the snapshot (dir: of all its files); 0 when not existed
    sha256: str  # of the snapshot (dir: tree_digest); "" when not existed, or linked
    verified: bool | None = None  # verify()'s verdict once the runtime records it; None: not yet
    linked: bool = False  # the snapshot is the original file; the live path holds a working copy

    def __post_init__(self) -> None:
        if problem := _snapshot_problem(self):
            raise SnapshotError(f"snapshot record for {self.path!r}: {problem}")

    def to_json(self) -> Json:
        data = {name: getattr(self, name) for name in _FIELDS}
        if self.linked:
            data["linked"] = True
        return data if self.verified is None else {**data, "verified": self.verified}

    @classmethod
    def from_json(cls, data: Json) -> DataSnapshot:
        """Also reads records written before `verified` and `linked` existed."""
        if not isinstance(data, dict) or any(name not in data for name in _FIELDS):
            raise SnapshotError(f"snapshot record must be an object with {_FIELDS}; got {data!r}")
        fields = {name: data[name] for name in _FIELDS}
        return cls(**fields, verified=data.get("verified"), linked=data.get("linked", False))


def _snapshot_problem(snap: DataSnapshot) -> str | None:
    if not isinstance(snap.path, str) or not os.path.isabs(snap.path):
        return "path must be an absolute path string"
    if snap.kind not in KINDS:
        return f"kind {snap.kind!r} is not one of {', '.join(KINDS)}"
    if not isinstance(snap.existed, bool) or type(snap.bytes) is not int or snap.bytes < 0:
        return f"existed must be a bool, bytes an int >= 0; got {snap.existed!r}, {snap.bytes!r}"
    if not isinstance(snap.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}|", snap.sha256):
        return f"sha256 must be 64 lowercase hex digits or empty; got {snap.sha256!r}"
    if bool(snap.sha256) != (snap.existed and not snap.linked):
        return "sha256 is set exactly when the target existed and was copied (not linked)"
    if not snap.existed and snap.bytes:
        return "bytes is 0 when the target did not exist"
    if snap.verified is not None and not isinstance(snap.verified, bool):
        return f"verified must be a bool or absent; got {snap.verified!r}"
    only_files = not snap.linked or (snap.existed and snap.kind != "dir")
    if not isinstance(snap.linked, bool) or not only_files:
        return f"linked must be a bool, and only for an existing file; got {snap.linked!r}"
    return None


class SnapshotStore:
    """Snapshots under `root` (<state.dir>/snapshots), one folder per swap. Blocking: call it
    from a worker thread. One instance per root; a lock serializes its methods, except that
    verify() holds it only to start, and is stopped by whatever would change its snapshot."""

    def __init__(self, root: Path, *, busy_timeout: float = 5.0) -> None:
        self.root = Path(os.path.abspath(root))
        self.busy_timeout = busy_timeout  # how long take() waits on a SQLite lock
        self.placements: Counter[str] = Counter()  # restore: files put in place by "link"/"copy"
        self._lock = threading.Lock()
        self._verifying: list[tuple[str, StopSignal]] = []  # each running verify(): swap, stop
        self._verifying_lock = threading.Lock()  # not _lock: verify() runs without that one
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        if not stat.S_ISDIR(os.lstat(self.root).st_mode):
            raise SnapshotError(f"snapshot root {self.root} is not a directory (or is a symlink)")
        os.chmod(self.root, 0o700)

    # --- hooks: tests override them in a child process to crash at a chosen point ------------

    def _before_step(self, step: str) -> None:
        """Called before every step of take() (TAKE_STEPS), restore() (RESTORE_STEPS) and
        verify() (VERIFY_STEPS)."""
        log.debug("snapshot step %s", step)

    def _record(self, journal_path: Path, journal: Json) -> None:
        """Make the restore journal durable; a crash before this repeats the step just done."""
        write_json(journal_path, journal)

    # --- take --------------------------------------------------------------------------------

    def take(self, swap_id: str, entries: Sequence[tuple[Path, str]]) -> list[DataSnapshot]:
        """Snapshot every entry for `swap_id`; if this swap's take already finished (a crash
        came before the runtime heard of it), keep that snapshot and only redo the working
        copies. Refused once a restore of the swap has begun: its rollback has moved on."""
        _check_swap_id(swap_id)
        targets = self._check_entries(entries)
        started = time.monotonic()
        with self._lock:
            self._stop_verifying(lambda swap: swap == swap_id)
            final = self.root / swap_id
            if os.path.lexists(final / _JOURNAL):
                raise SnapshotError(f"swap {swap_id}: a restore has begun; its snapshot stays")
            again = os.path.lexists(final / _MANIFEST)
            if again:
                records = self._taken_before(final, swap_id, targets)
            else:
                records = self._take_all(final, swap_id, targets)
            self._before_step("swap_in_copies")
            for index, snap in enumerate(records):
                if not snap.linked:
                    continue
                original = None if again else final / str(index)
                try:
                    _swap_in_working_copy(Path(snap.path), swap_id, original)
                except OSError as exc:  # the snapshot is safe: a rollback restores from it
                    why = f"putting its working copy in place: {explain(exc)}"
                    raise SnapshotError(f"data entry {snap.path}: {why}") from exc
        size, elapsed = sum(s.bytes for s in records), time.monotonic() - started
        log.info(
            "took %d snapshots of swap %s, %d bytes, %.2fs", len(records), swap_id, size, elapsed
        )
        return records

    def _take_all(
        self, final: Path, swap_id: str, targets: list[tuple[Path, str]]
    ) -> list[DataSnapshot]:
        staging = self.root / f"{_STAGING}{swap_id}"
        remove_path(staging)
        os.mkdir(staging, 0o700)
        records: list[DataSnapshot] = []
        reserved: list[str] = []  # only ours go if this take fails
        try:
            for index, (target, kind) in enumerate(targets):
                self._before_step("take_entry")
                working = Path(_working_name(str(target), swap_id))
                try:
                    records.append(self._take_one(staging / str(index), target, kind, working))
                except (OSError, sqlite3.Error, SnapshotError) as exc:
                    raise SnapshotError(f"data entry {target} ({kind}): {explain(exc)}") from exc
                if self._reserve(records[-1], staging / str(index)):
                    reserved.append(str(target))
            self._before_step("commit_take")
            listed = [
                {"index": i, **snap.to_json(), **restoresteps.folder_record(snap.path)}
                for i, snap in enumerate(records)
            ]
            write_json(staging / _MANIFEST, {"swap_id": swap_id, "entries": listed})
            self._commit_staging(staging, final)
        except BaseException:
            with contextlib.suppress(OSError):  # else the next take or prune removes it
                remove_path(staging)
                for target, _ in targets:
                    remove_path(Path(_working_name(str(target), swap_id)))
                for made in reserved:
                    restoresteps.drop_reserve(made)
            raise
        return records

    def _taken_before(
        self, final: Path, swap_id: str, targets: list[tuple[Path, str]]
    ) -> list[DataSnapshot]:
        """The finished take of this swap, with fresh working copies made from its snapshots."""
        entries = read_entries_json(final / _MANIFEST)["entries"]
        records = [DataSnapshot.from_json(entry) for entry in entries]
        if [(Path(r.path), r.kind) for r in records] != targets:
            raise SnapshotError(
                f"swap {swap_id}: its snapshot was taken of other [[data]] entries"
                " (the configuration changed mid-activation?)"
            )
        log.info("swap %s: its take had finished; making the working copies again", swap_id)
        for index, snap in enumerate(records):
            self._reserve(snap, final / str(index))
            if snap.linked:
                working = Path(_working_name(snap.path, swap_id))
                remove_path(working)
                if working_copy(final / str(index), working) != snap.bytes:
                    raise SnapshotError(f"the snapshot of {snap.path} is no longer its size")
        return records

    def _reserve(self, snap: DataSnapshot, copy: Path) -> bool:
        """Where a rollback would copy this snapshot back (data on another file system than
        the store), hold that room beside the target now (`restoresteps.make_reserve`): the
        new version cannot take it. A linked snapshot, or a folder on the store's file
        system, is restored by links and needs none. True if it made one."""
        if not snap.existed or snap.linked:
            return False
        if snap.kind == "dir" and _same_fs(os.path.dirname(snap.path), self.root):
            return False
        size = _allocated(copy) if snap.kind == "dir" else snap.bytes
        try:
            restoresteps.make_reserve(snap.path, size)
        except OSError as exc:
            raise SnapshotError(
                f"data entry {snap.path}: cannot reserve {size} bytes beside it for a"
                f" rollback's copy (its file system is not state.dir's): {explain(exc)}"
            ) from exc
        return True

    def drop_reserves(self, swap_id: str) -> None:
        """The swap is over (confirmed, aborted, rolled back, failed): free the room its take
        reserved beside the data. A rollback's restore has freed it already. The name is one
        per entry: a reserve a newer swap's take made (its folder sorts after) stays."""
        _check_swap_id(swap_id)
        with self._lock:
            newer = {
                path
                for item in os.scandir(self.root)
                if not item.name.startswith(".") and item.name > swap_id
                for path in _manifest_paths(self.root / item.name)
            }
            for path in set(_manifest_paths(self.root / swap_id)) - newer:
                restoresteps.drop_reserve(path)

    def _check_entries(self, entries: Sequence[tuple[Path, str]]) -> list[tuple[Path, str]]:
        """Absolute targets with their folder resolved, known kinds, no duplicates, not our root."""
        checked: list[tuple[Path, str]] = []
        root_real = os.path.realpath(self.root)
        for raw, kind in entries:
            if kind not in KINDS:
                raise SnapshotError(f"data entry {raw}: kind {kind!r} is not one of {KINDS}")
            path = Path(raw)
            if not path.is_absolute() or path.name in ("", ".", ".."):
                raise SnapshotError(f"data entry {raw}: path must be absolute and name a file")
            target = Path(os.path.realpath(path.parent)) / path.name
            if any(target == other for other, _ in checked):
                raise SnapshotError(f"data entry {raw}: listed twice")
            if _within(str(target), root_real) or _within(root_real, str(target)):
                raise SnapshotError(f"data entry {raw}: overlaps the snapshot root {self.root}")
            checked.append((target, kind))
        return checked

    def _take_one(self, dest: Path, target: Path, kind: str, working: Path) -> DataSnapshot:
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            return DataSnapshot(str(target), kind, False, 0, "")
        if kind == "dir":
            if not stat.S_ISDIR(st.st_mode):
                raise SnapshotError("not a directory (symlinks are not followed)")
            copy_tree(target, dest, copy_file)
            size, digest = tree_digest(dest)
            return DataSnapshot(str(target), kind, True, size, digest)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError("not a regular file (symlinks are not followed)")
        if kind == "sqlite":
            self._checkpoint_live(target)
        linked = _link(target, dest)
        if linked:
            remove_path(working)
            size, digest = working_copy(dest, working), ""
        else:
            size, digest = copy_file_hashed(target, dest)  # fsynced, and sized as the source
        if kind == "sqlite":
            verify_sqlite_copy(working if linked else dest, size)  # integrity_check: verify()
        return DataSnapshot(str(target), kind, True, size, digest, linked=linked)

    def _checkpoint_live(self, db: Path) -> None:
        """Fold the WAL in (and roll a hot journal back): the main file alone is the database."""
        for suffix in SQLITE_SIDECARS:
            side = f"{db}{suffix}"
            if os.path.lexists(side) and not stat.S_ISREG(os.lstat(side).st_mode):
                raise SnapshotError(f"{side} is not a regular file")
        try:
            for attempt in while_busy(self.busy_timeout, str(db)):
                with attempt:
                    _fold_wal(db, min(ATTEMPT_TIMEOUT_S, self.busy_timeout))
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
            raise SnapshotError(f"locked by another process (is the host running?): {exc}") from exc

    def _commit_staging(self, staging: Path, final: Path) -> None:
        """Rename the finished staging folder into place; an older take of the swap goes."""
        fsync_dir(staging)
        replaced = self.root / f"{_REPLACED}{final.name}"
        remove_path(replaced)
        if os.path.lexists(final):
            os.rename(final, replaced)
        os.rename(staging, final)
        fsync_dir(self.root)
        remove_path(replaced)

    # --- restore -----------------------------------------------------------------------------

    def restore(self, swap_id: str, snapshots: Sequence[DataSnapshot]) -> None:
        """Put every snapshot back exactly, keeping the probation-time data beside it.

        With no `snapshots`, the rollback came while the take was in flight and never heard of
        its result: restore whatever that take left (it may have put working copies in place),
        and leave a finished journal, so that a take still to come is refused."""
        _check_swap_id(swap_id)
        started = time.monotonic()
        with self._lock:
            self._stop_verifying(lambda swap: swap == swap_id)
            swap_dir = self.root / swap_id
            journal_path = swap_dir / _JOURNAL
            if not snapshots:
                snapshots = self._interrupted_take(swap_id)
                if not snapshots:
                    return
            if not os.path.lexists(swap_dir / _MANIFEST):
                raise SnapshotError(f"swap {swap_id}: no snapshot in {self.root} (pruned?)")
            if os.path.lexists(journal_path):
                journal = read_entries_json(journal_path)
                _match(swap_id, journal, snapshots)
                if [e["path"] for e in journal["entries"]] != [s.path for s in snapshots]:
                    raise SnapshotError(f"swap {swap_id}: a restore of other entries is under way")
            else:
                self._before_step("write_intent")
                manifest = read_entries_json(swap_dir / _MANIFEST)
                journal = restoresteps.plan(swap_id, _match(swap_id, manifest, snapshots))
                self._record(journal_path, journal)
            if not journal["finished"]:
                self._run_entries(swap_dir, journal_path, journal)
                self._before_step("mark_finished")
                journal["finished"] = True
                self._record(journal_path, journal)
            for entry in journal["entries"]:
                self._before_step("settle_kept")
                restoresteps.settle_kept(entry)
            self._before_step("release")  # (not made durable: links left by a crash are pruned)
            for entry in journal["entries"]:
                remove_path(swap_dir / str(entry["index"]))
        elapsed = time.monotonic() - started
        log.info("restored %d data entries of swap %s in %.3fs", len(snapshots), swap_id, elapsed)

    def _interrupted_take(self, swap_id: str) -> list[DataSnapshot]:
        """The records of a take nobody heard of; none (and a barrier to later takes) if none."""
        swap_dir = self.root / swap_id
        if os.path.lexists(swap_dir / _MANIFEST):
            entries = read_entries_json(swap_dir / _MANIFEST)["entries"]
            for entry in entries:  # a take cut short may have left its working copies
                remove_path(Path(_working_name(entry["path"], swap_id)))
            return [DataSnapshot.from_json(entry) for entry in entries]
        remove_path(self.root / f"{_STAGING}{swap_id}")
        if not os.path.lexists(swap_dir / _JOURNAL):
            os.makedirs(swap_dir, 0o700, exist_ok=True)
            barrier = {"swap_id": swap_id, "entries": [], "done": [], "finished": True}
            self._record(swap_dir / _JOURNAL, barrier)
            fsync_dir(self.root)
        return []

    def _run_entries(self, swap_dir: Path, journal_path: Path, journal: Json) -> None:
        """Each entry's steps, with a journal record once it is swapped in; for the last file,
        the record that the restore is finished says so. A folder's stage is recorded too: a
        folder found at its target cannot be told from one a straggler made. (Journals of older
        versions also name other steps they had done.)"""
        entries = journal["entries"]
        for position, entry in enumerate(entries):
            if f"{entry['index']}/swap_in" in journal["done"]:
                continue
            for step in ENTRY_STEPS:
                key = f"{entry['index']}/{step}"
                if key in journal["done"]:
                    continue
                self._before_step(step)
                try:
                    restoresteps.run_step(step, swap_dir, entry, self._place_file)
                except (OSError, sqlite3.Error, SnapshotError) as exc:
                    where = f"data entry {entry['path']} ({entry['kind']}), step {step}"
                    raise SnapshotError(f"{where}: {explain(exc)}") from exc
                folder_step = entry["kind"] == "dir" and step != "set_aside"
                if folder_step or (step == "swap_in" and position < len(entries) - 1):
                    journal["done"].append(key)
                    self._record(journal_path, journal)

    def _place_file(self, source: Path, dest: Path) -> str:
        """Link a snapshot file into the target's folder, or copy it across file systems."""
        how = "link" if _link(source, dest) else "copy"
        if how == "copy":
            copy_file(source, dest)
        self.placements[how] += 1
        return how

    # --- verify ------------------------------------------------------------------------------

    def verify(self, swap_id: str, snapshots: Sequence[DataSnapshot]) -> list[Verdict]:
        """(path, ok, detail) for each snapshot, in order: SQLite ones get integrity_check (opened
        immutable, read-only), the rest were fully checked by take(). Slow, and the store stays
        usable meanwhile: run it in a worker thread once the new version is up. Raises
        SnapshotError if the swap has no snapshot, a restore of it has begun, or a restore,
        prune or retake stops it midway."""
        _check_swap_id(swap_id)
        started, stop = time.monotonic(), StopSignal()
        with self._lock:
            swap_dir = self.root / swap_id
            if not os.path.lexists(swap_dir / _MANIFEST):
                raise SnapshotError(f"swap {swap_id}: no snapshot in {self.root} (pruned?)")
            if os.path.lexists(swap_dir / _JOURNAL):
                raise SnapshotError(f"swap {swap_id}: a restore has begun; nothing left to verify")
            entries = _match(swap_id, read_entries_json(swap_dir / _MANIFEST), snapshots)
            with self._verifying_lock:
                self._verifying.append((swap_id, stop))
        try:
            verdicts: list[Verdict] = []
            for entry in entries:
                self._before_step("verify_entry")
                ok, detail = _verify_entry(swap_dir / str(entry["index"]), entry, stop)
                verdicts.append((entry["path"], ok, detail))
                if stop.is_set():
                    break
        finally:
            with self._verifying_lock:
                self._verifying.remove((swap_id, stop))
        if stop.is_set():
            raise SnapshotError(f"swap {swap_id}: verify stopped: its snapshot is being changed")
        for path, ok, detail in verdicts:
            (log.info if ok else log.warning)("snapshot of %s: %s", path, detail)
        log.info("verified swap %s in %.2fs", swap_id, time.monotonic() - started)
        return verdicts

    def stop_verify(self, swap_id: str) -> None:
        """Stop a verify() of this swap now, without taking the store's lock: a rollback has
        begun, and a deep check (seconds of CPU per GiB) must not slow its first steps."""
        self._stop_verifying(lambda swap: swap == swap_id)

    def _stop_verifying(self, doomed: Callable[[str], bool]) -> None:
        """Stop each verify() of a swap whose snapshot is about to change; its verdict is void.
        No wait: a verify holds no lock, and what it still reads cannot harm the data."""
        with self._verifying_lock:
            for swap_id, stop in self._verifying:
                if doomed(swap_id) and not stop.is_set():
                    log.info("stopping the verify of swap %s", swap_id)
                    stop.set()

    # --- housekeeping ------------------------------------------------------------------------

    def kept_copies(self, swap_id: str) -> list[Path]:
        """What the finished restore of `swap_id` kept of the probation-time data (see
        `restoresteps.kept_copies`); empty for a swap that was not rolled back."""
        _check_swap_id(swap_id)
        return restoresteps.kept_copies(self.root / swap_id)

    def prune(self, keep: Iterable[str]) -> None:
        """Remove the snapshots of every swap not in `keep`, the probation-time data its restore
        kept, and leftovers of interrupted takes. A swap whose restore is unfinished stays: its
        snapshot is the only copy of that data."""
        keep_ids = set(keep)
        with self._lock:
            self._stop_verifying(lambda swap: swap not in keep_ids)
            held = {p for swap in keep_ids if is_swap_id(swap)
                    for p in _manifest_paths(self.root / swap)}  # fmt: skip
            for item in os.scandir(self.root):
                path = self.root / item.name
                if not item.name.startswith(".") and item.name in keep_ids:
                    continue
                if restoresteps.restore_unfinished(path):
                    log.warning("not pruning %s: its restore is unfinished", path)
                    continue
                try:
                    for target in set(_manifest_paths(path)) - held:  # the reserve is per entry
                        restoresteps.drop_reserve(target)
                    restoresteps.drop_kept(path)
                    remove_path(path)
                except OSError as err:  # e.g. an operator's copy we may not remove: next time
                    log.warning("not pruning %s now: %s", path, err.strerror or err)
            fsync_dir(self.root)


def _verify_entry(copy: Path, entry: Json, stop: StopSignal) -> tuple[bool, str]:
    if not entry["existed"]:
        return True, "nothing to check: the target was absent at activation"
    if entry["kind"] != "sqlite":
        return True, f"nothing more to check: a {entry['kind']} is sized and hashed by take()"
    return sqlite_verdict(copy, entry["bytes"], stop)


# --- records and working copies ----------------------------------------------------------------


def _match(swap_id: str, recorded: Json, snapshots: Sequence[DataSnapshot]) -> list[Json]:
    """The recorded entries behind `snapshots`; each must be exactly what take() recorded."""
    by_path = {entry["path"]: entry for entry in recorded["entries"]}
    for snap in snapshots:
        entry = by_path.get(snap.path)
        if entry is None:
            raise SnapshotError(f"swap {swap_id}: the store has no snapshot of {snap.path}")
        if DataSnapshot.from_json(entry) != replace(snap, verified=None):
            raise SnapshotError(f"swap {swap_id}: snapshot of {snap.path} differs from the store's")
    return [by_path[snap.path] for snap in snapshots]


def _manifest_paths(swap_dir: Path) -> list[str]:
    """The targets a swap folder's manifest lists; none if it has none (or an unreadable one)."""
    manifest = swap_dir / _MANIFEST
    if swap_dir.is_symlink() or not os.path.lexists(manifest):
        return []
    try:
        return [entry["path"] for entry in read_entries_json(manifest)["entries"]]
    except (SnapshotError, KeyError, TypeError):
        return []


def _same_fs(path: str | Path, other: str | Path) -> bool:
    return os.lstat(path).st_dev == os.lstat(other).st_dev


def _allocated(tree: Path) -> int:
    """Allocated bytes of the files under `tree` (a copy of them allocates as much)."""
    total = 0
    for folder, _, files in os.walk(tree):
        total += sum(os.lstat(os.path.join(folder, name)).st_blocks * 512 for name in files)
    return total


def _working_name(target: str, swap_id: str) -> str:
    folder, name = os.path.split(target)
    return os.path.join(folder, f".{name}.swapguard-take-{swap_id}")


def _link(target: Path, dest: Path) -> bool:
    """Hard-link the live file as its own snapshot; False where the file system can't."""
    try:
        os.link(target, dest, follow_symlinks=False)
        return True
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        return False


def _fold_wal(db: Path, timeout: float) -> None:
    """One try at making the main file the whole database; SqliteBusy if someone held it back."""
    with contextlib.closing(connect_sqlite(db, "mode=rw", timeout)) as con:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        con.execute("BEGIN IMMEDIATE")  # a writer still at work fails this after the timeout
        con.execute("COMMIT")
        busy = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    if busy:
        raise SqliteBusy("locked: the WAL could not be checkpointed (host running?)")
    for side in (f"{db}-wal", f"{db}-journal"):
        if os.path.lexists(side) and os.lstat(side).st_size:
            raise SqliteBusy(f"{side} still holds data after a checkpoint (a writer?)")


def _swap_in_working_copy(target: Path, swap_id: str, original: Path | None) -> None:
    """Put the working copy in the target's place, where `original` (the snapshot, if just
    taken) must still be. Not a rename over the target: on ext4 that flushes the copy to disk
    (auto_da_alloc), which is SyncData's job, off the downtime."""
    working = Path(_working_name(str(target), swap_id))
    if os.path.lexists(target):
        if original is not None and not restoresteps.same_file(target, original):
            raise SnapshotError(f"{target} changed during the take: is a writer still running?")
        os.unlink(target)
    os.rename(working, target)


# --- small checks (the journal and the restore steps are restoresteps') --------------------------


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _check_swap_id(swap_id: str) -> None:
    if not is_swap_id(swap_id):
        raise SnapshotError(f"swap id {swap_id!r}: expected {SWAP_ID_SYNTAX}")
