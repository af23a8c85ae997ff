"""Data snapshots: real WAL-mode SQLite files written by real (forked) writer processes that die
without cleaning up, real crashes (SIGKILL / os._exit) at every restore step, real file systems."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import mmap
import os
import select
import shutil
import signal
import sqlite3
import stat
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from supervisor.data import datacopy, restoresteps, sqlitebusy
from supervisor.data.datacopy import FLUSH_STEP, StopSignal, copy_file_hashed, fsync_dir, fsync_file
from supervisor.data.snapshot import (
    ENTRY_STEPS,
    RESTORE_STEPS,
    SQLITE_SIDECARS,
    TAKE_STEPS,
    VERIFY_STEPS,
    DataSnapshot,
    SnapshotStore,
    file_digest,
    tree_digest,
)
from supervisor.errors import SnapshotError

WAIT_S = 10.0
SWAP = "20261124-060000-abc123"
TABLE = "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)"


# --- real processes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Child:
    pid: int
    alive: int  # read end of a pipe whose write end only the child holds: EOF once it is gone


def fork_child(body: Callable[[], None]) -> Child:
    """Run `body` in a forked child that then dies by os._exit, closing nothing: like a killed
    host, it leaves its -wal/-shm/-journal exactly as they were."""
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(alive_r)
            body()
        except BaseException:
            traceback.print_exc()
            code = 70
        finally:
            os._exit(code)
    os.close(alive_w)
    return Child(pid, alive_r)


def wait_child(child: Child) -> int:
    """The child's exit status (negative: killed by that signal), waiting at most WAIT_S."""
    try:
        gone = select.select([child.alive], [], [], WAIT_S)[0]
    finally:
        os.close(child.alive)
    if not gone:
        os.kill(child.pid, signal.SIGKILL)
    _, status = os.waitpid(child.pid, 0)
    assert gone, f"child {child.pid} still ran after {WAIT_S}s"
    return os.waitstatus_to_exitcode(status)


def run_child(body: Callable[[], None]) -> int:
    return wait_child(fork_child(body))


def writer(
    db: Path, values: list[str], *, mode: str = "wal", then: Callable[[Any], None] | None = None
) -> None:
    """A real writer: commits `values` (autocheckpoint off, so they stay in the WAL), runs `then`,
    and dies without closing."""

    def body() -> None:
        con = sqlite3.connect(db, isolation_level=None)
        con.execute(f"PRAGMA journal_mode={mode}")
        con.execute("PRAGMA wal_autocheckpoint=0")
        con.execute(TABLE)
        con.execute("BEGIN")
        con.executemany("INSERT INTO t(v) VALUES (?)", [(v,) for v in values])
        con.execute("COMMIT")
        if then is not None:
            then(con)

    assert run_child(body) == 0


def dump(db: Path) -> list[tuple[int, str]]:
    with closing(sqlite3.connect(db)) as con:
        return con.execute("SELECT id, v FROM t ORDER BY id").fetchall()


def integrity(db: Path) -> str:
    with closing(sqlite3.connect(db)) as con:
        return con.execute("PRAGMA integrity_check").fetchone()[0]


def sidecars(db: Path) -> list[str]:
    return [s for s in SQLITE_SIDECARS if os.path.lexists(f"{db}{s}")]


def strays(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if "swapguard-restore" in name]


def kept(path: Path) -> Path:
    return Path(f"{path}.rolled-back-{SWAP}")


def bytes_held(store: SnapshotStore) -> int:
    """Bytes of regular files under the store, each inode counted once (takes may hard-link)."""
    sizes: dict[tuple[int, int], int] = {}
    for folder, _, files in os.walk(store.root):
        for name in files:
            info = os.lstat(os.path.join(folder, name))
            if stat.S_ISREG(info.st_mode):
                sizes[info.st_dev, info.st_ino] = info.st_size
    return sum(sizes.values())


def rows(values: list[str], start: int = 1) -> list[tuple[int, str]]:
    return [(start + i, v) for i, v in enumerate(values)]


BASE = [f"old-{i}" for i in range(50)]
NEW = [f"new-{i}" for i in range(30)]


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "state" / "snapshots")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


# --- take ----------------------------------------------------------------------------------------


def test_take_captures_pending_wal_frames(store: SnapshotStore, data: Path) -> None:
    db = data / "app.db"
    writer(db, BASE)
    assert os.path.getsize(f"{db}-wal") > 0  # the rows are only in the WAL

    [snap] = store.take(SWAP, [(db, "sqlite")])

    copy = store.root / SWAP / "0"
    assert snap == DataSnapshot(str(db), "sqlite", True, copy.stat().st_size, "", linked=True)
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700
    assert sidecars(copy) == []
    uri = f"file:{copy}?mode=ro&immutable=1"
    with closing(sqlite3.connect(uri, uri=True)) as con:
        assert con.execute("SELECT id, v FROM t ORDER BY id").fetchall() == rows(BASE)
    assert snap.bytes <= bytes_held(store) < snap.bytes + 4096  # and a small manifest


def test_take_refuses_a_database_another_process_holds(tmp_path: Path, data: Path) -> None:
    db = data / "app.db"
    writer(db, BASE)
    store = SnapshotStore(tmp_path / "snapshots", busy_timeout=0.2)
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()

    def hold_write_lock() -> None:
        os.close(hold_w)  # so that the test closing its end reads as EOF here
        con = sqlite3.connect(db, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT INTO t(v) VALUES ('uncommitted')")
        os.write(ready_w, b"x")
        os.read(hold_r, 1)  # until the test closes its end

    child = fork_child(hold_write_lock)
    try:
        assert select.select([ready_r], [], [], WAIT_S)[0], "the writer never took its lock"
        with pytest.raises(SnapshotError, match=rf"{db}.*locked"):
            store.take(SWAP, [(db, "sqlite")])
    finally:
        os.close(hold_w)
        wait_child(child)
        for fd in (ready_r, ready_w, hold_r):
            os.close(fd)
    assert not (store.root / SWAP).exists()
    assert os.listdir(store.root) == []  # the failed take left nothing behind


@pytest.mark.parametrize(
    ("setup", "kind", "message"),
    [
        (lambda p: p.write_bytes(b"garbage" * 100), "sqlite", "not a database"),
        (lambda p: p.symlink_to("/etc/hostname"), "file", "not a regular file"),
        (lambda p: p.mkdir(), "file", "not a regular file"),
        (lambda p: p.write_text("x"), "dir", "not a directory"),
        (lambda p: p.symlink_to("/etc"), "dir", "not a directory"),
    ],
)
def test_take_names_the_entry_it_cannot_snapshot(
    store: SnapshotStore, data: Path, setup: Callable[[Path], None], kind: str, message: str
) -> None:
    good, bad = data / "good.txt", data / "bad"
    good.write_text("fine")
    setup(bad)
    with pytest.raises(SnapshotError, match=rf"data entry {bad} \({kind}\): .*{message}"):
        store.take(SWAP, [(good, "file"), (bad, kind)])
    assert os.listdir(store.root) == []


@pytest.mark.parametrize(
    ("swap_id", "entries", "message"),
    [
        ("../x", [], "swap id"),
        ("", [], "swap id"),
        (SWAP, [(Path("relative.db"), "sqlite")], "must be absolute"),
        (SWAP, [(Path("/tmp/x.db"), "mysql")], "kind 'mysql'"),
        (SWAP, [(Path("/tmp/x.db"), "file"), (Path("/tmp/x.db"), "file")], "listed twice"),
    ],
)
def test_take_rejects_bad_input(
    store: SnapshotStore, swap_id: str, entries: list[tuple[Path, str]], message: str
) -> None:
    with pytest.raises(SnapshotError, match=message):
        store.take(swap_id, entries)


def test_take_refuses_an_entry_holding_the_store(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "state" / "snapshots")
    with pytest.raises(SnapshotError, match="overlaps the snapshot root"):
        store.take(SWAP, [(tmp_path / "state", "dir")])


@pytest.mark.parametrize(("step", "occurrence"), [("take_entry", 2), ("commit_take", 1)])
def test_a_crash_mid_take_leaves_only_what_retry_and_prune_clean(
    store: SnapshotStore, data: Path, step: str, occurrence: int
) -> None:
    assert step in TAKE_STEPS
    db, notes = data / "app.db", data / "notes.txt"
    writer(db, BASE)
    notes.write_text("notes")
    entries = [(db, "sqlite"), (notes, "file")]
    crash = crashing(store, before=step, occurrence=occurrence)
    assert run_child(lambda: crash.take(SWAP, entries)) == -signal.SIGKILL
    assert not (store.root / SWAP).exists()

    snaps = store.take(SWAP, entries)  # a retry succeeds and leaves no leftovers
    assert sorted(os.listdir(store.root)) == [SWAP]
    assert [s.existed for s in snaps] == [True, True]
    assert run_child(lambda: crash.take("other", entries)) == -signal.SIGKILL
    store.prune([SWAP])
    assert sorted(os.listdir(store.root)) == [SWAP]


def test_a_take_keeps_the_original_file_and_gives_the_live_path_a_working_copy(
    store: SnapshotStore, data: Path
) -> None:
    """The snapshot is the original inode (durable without a copy); the new version gets a
    copy with the same bytes, mode and times, in the live path."""
    db, notes = data / "app.db", data / "notes.txt"
    writer(db, BASE)
    notes.write_text("notes")
    notes.chmod(0o640)
    before = {path: os.lstat(path) for path in (db, notes)}
    snaps = store.take(SWAP, [(db, "sqlite"), (notes, "file")])
    assert [snap.linked for snap in snaps] == [True, True]
    for index, path in enumerate((db, notes)):
        snapshot, live = os.lstat(store.root / SWAP / str(index)), os.lstat(path)
        assert snapshot.st_ino == before[path].st_ino != live.st_ino
        assert (live.st_mode, live.st_mtime_ns) == (snapshot.st_mode, snapshot.st_mtime_ns)
        assert file_digest(path) == file_digest(store.root / SWAP / str(index))
        assert snaps[index].bytes == live.st_size
    assert dump(db) == rows(BASE)
    assert not [name for name in os.listdir(data) if "swapguard-take" in name]


def resident_share(path: Path) -> float:
    """The share of the file's pages in the page cache (mincore(2) on a mapping of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size, page = path.stat().st_size, mmap.PAGESIZE
    pages = -(-size // page)
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY) as m:
        anchor = ctypes.c_char.from_buffer(m)  # the mapping's address; released before it closes
        vector = ctypes.create_string_buffer(pages)
        failed = libc.mincore(ctypes.addressof(anchor), size, vector)
        del anchor
    assert failed == 0, os.strerror(ctypes.get_errno())
    return sum(byte & 1 for byte in vector.raw) / pages


@pytest.mark.parametrize("copier", ["kernel", "by hand"])
def test_the_working_copy_recycles_the_snapshots_page_cache(
    store: SnapshotStore, data: Path, copier: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy is made into the pages the snapshot gives up, chunk by chunk (on a VM, fresh
    memory cost several times the copy): the snapshot leaves the cache, the copy is exact."""
    if not sys.platform.startswith("linux") or not hasattr(os, "posix_fadvise"):
        pytest.skip("mincore/posix_fadvise are Linux's")
    if copier == "by hand":  # a kernel without copy_file_range between these files

        def refused(*args: object) -> int:
            raise OSError(errno.ENOSYS, "copy_file_range refused")

        monkeypatch.setattr(datacopy, "_kernel_copy", refused)
    probe = data / "probe.bin"
    probe.write_bytes(os.urandom(1 << 20))
    os.sync()
    probe.read_bytes()
    held = resident_share(probe)
    with open(probe, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if held < 0.9 or resident_share(probe) > 0.1:  # tmpfs: its pages are the file itself
        pytest.skip("this file system does not drop clean pages it is advised to")
    blob = data / "blob.bin"
    blob.write_bytes(os.urandom((24 << 20) + 4321))  # several chunks, and a tail
    expected = file_digest(blob)
    blob.read_bytes()  # as the host leaves it: in the cache (dirty, too: the take syncs it)
    [snap] = store.take(SWAP, [(blob, "file")])
    snapshot = store.root / SWAP / "0"
    left, warm = resident_share(snapshot), resident_share(blob)  # before anything reads them
    assert snap.linked and file_digest(blob) == file_digest(snapshot) == expected
    assert left < 0.1 and warm > 0.9  # the snapshot gave its pages up; the copy is in the cache


def test_a_crash_before_the_working_copies_are_in_place_is_made_good(
    store: SnapshotStore, data: Path
) -> None:
    """Killed after the snapshot is durable: taking again makes the working copies (even over
    a live file a power cut tore or lost), and a rollback instead restores from the store."""
    db, notes = data / "app.db", data / "notes.txt"
    writer(db, BASE)
    notes.write_text("notes")
    entries = [(db, "sqlite"), (notes, "file")]
    crash = crashing(store, before="swap_in_copies")
    assert run_child(lambda: crash.take(SWAP, entries)) == -signal.SIGKILL
    assert os.path.lexists(store.root / SWAP / "manifest.json")
    notes.unlink()  # as if cut between the unlink and the rename

    store.take(SWAP, entries)
    assert dump(db) == rows(BASE) and notes.read_text() == "notes"
    assert os.lstat(db).st_ino != os.lstat(store.root / SWAP / "0").st_ino
    assert not [name for name in os.listdir(data) if "swapguard-take" in name]

    assert run_child(lambda: crash.take("other", entries)) == -signal.SIGKILL
    store.restore("other", [])  # the runtime never heard of that take's result
    assert dump(db) == rows(BASE) and notes.read_text() == "notes"
    assert not [name for name in os.listdir(data) if "swapguard" in name or "rolled-back" in name]
    with pytest.raises(SnapshotError, match="a restore has begun"):
        store.take("other", entries)


def test_a_restore_before_any_take_bars_a_late_one(store: SnapshotStore, data: Path) -> None:
    """A rollback whose restore ran before the take it raced: the take must not swap the live
    file under the old version afterwards."""
    notes = data / "notes.txt"
    notes.write_text("notes")
    inode = os.lstat(notes).st_ino
    store.restore(SWAP, [])
    with pytest.raises(SnapshotError, match="a restore has begun"):
        store.take(SWAP, [(notes, "file")])
    assert os.lstat(notes).st_ino == inode and notes.read_text() == "notes"
    store.prune([])
    assert os.listdir(store.root) == []


@pytest.fixture
def elsewhere(data: Path) -> Iterator[Path]:
    """A folder on another file system than `data` (a tmpfs), where links cannot reach."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        if os.stat(other).st_dev == data.stat().st_dev:
            pytest.skip("/dev/shm is on the same file system here")
        yield Path(other)


def test_a_take_across_file_systems_makes_a_durable_copy(data: Path, elsewhere: Path) -> None:
    store = SnapshotStore(elsewhere / "snapshots")
    notes = data / "notes.txt"
    notes.write_text("notes")
    inode = os.lstat(notes).st_ino
    [snap] = store.take(SWAP, [(notes, "file")])
    assert not snap.linked and os.lstat(notes).st_ino == inode


def test_copy_hashed_across_file_systems_falls_back_and_hashes_what_it_wrote(data: Path) -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    source = data / "blob.bin"
    source.write_bytes(os.urandom((20 << 20) + 12345))  # several copy and hash chunks, and a tail
    source.chmod(0o640)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        dest = Path(other) / "copy"
        size, digest = copy_file_hashed(source, dest)
        assert (size, digest) == file_digest(source) == file_digest(dest)
        assert stat.S_IMODE(dest.stat().st_mode) == 0o640
        assert dest.stat().st_mtime_ns == source.stat().st_mtime_ns


# --- verify: the slow check, after the new version is up -----------------------------------------


def corrupt_an_index_page(db: Path) -> None:
    """A database whose index page disagrees with its table: every page is still well formed, so
    opening, checkpointing and quick_check pass, and only integrity_check finds it."""
    with closing(sqlite3.connect(db, isolation_level=None)) as con:
        con.execute(TABLE)
        con.execute("CREATE INDEX t_v ON t(v)")
        con.executemany("INSERT INTO t(v) VALUES (?)", [(v,) for v in BASE])
        root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 't_v'").fetchone()[0]
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
    image = bytearray(db.read_bytes())
    start = (root - 1) * page_size
    at = image.index(b"old-17", start, start + page_size)
    image[at : at + 6] = b"Xld-17"  # the index entry of row 18 now names another value
    db.write_bytes(image)
    with closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    assert integrity(db) != "ok"


def test_verify_passes_sound_snapshots(store: SnapshotStore, data: Path) -> None:
    db, notes, absent = data / "app.db", data / "notes.txt", data / "absent.db"
    writer(db, BASE)
    notes.write_text("notes")
    snaps = store.take(SWAP, [(db, "sqlite"), (notes, "file"), (absent, "sqlite")])

    verdicts = store.verify(SWAP, snaps)

    assert [(path, ok) for path, ok, _ in verdicts] == [
        (str(db), True),
        (str(notes), True),
        (str(absent), True),
    ]
    assert verdicts[0][2] == "ok"
    marked = [replace(snap, verified=ok) for snap, (_, ok, _) in zip(snaps, verdicts, strict=True)]
    assert store.verify(SWAP, marked) == verdicts  # a recorded verdict is still the same record
    writer(db, NEW)
    store.restore(SWAP, marked)
    assert dump(db) == rows(BASE)


def test_take_copies_a_corrupt_database_exactly_and_verify_reports_it(
    store: SnapshotStore, data: Path
) -> None:
    db = data / "app.db"
    corrupt_an_index_page(db)
    as_left = file_digest(db)

    [snap] = store.take(SWAP, [(db, "sqlite")])  # no integrity_check while the host is down

    assert file_digest(store.root / SWAP / "0") == as_left
    [(path, ok, detail)] = store.verify(SWAP, [snap])
    assert (path, ok) == (str(db), False)
    assert detail.startswith("integrity_check: ") and "t_v" in detail, detail
    store.restore(SWAP, [snap])  # reported, not refused: it is exactly what the host left
    assert file_digest(db) == as_left


def test_verify_reports_a_damaged_snapshot_file(store: SnapshotStore, data: Path) -> None:
    db = data / "app.db"
    writer(db, BASE)
    [snap] = store.take(SWAP, [(db, "sqlite")])
    copy = store.root / SWAP / "0"
    with open(copy, "r+b") as handle:
        handle.write(b"not the header!!")

    [(_, ok, detail)] = store.verify(SWAP, [snap])

    assert not ok and "bad header" in detail, detail


def test_verify_refuses_what_it_cannot_check(store: SnapshotStore, data: Path) -> None:
    notes = data / "notes.txt"
    notes.write_text("old")
    [snap] = store.take(SWAP, [(notes, "file")])
    with pytest.raises(SnapshotError, match="differs from the store's"):
        store.verify(SWAP, [replace(snap, bytes=snap.bytes + 1)])
    with pytest.raises(SnapshotError, match="no snapshot"):
        store.verify("never-taken", [snap])
    store.restore(SWAP, [snap])
    with pytest.raises(SnapshotError, match="a restore has begun"):
        store.verify(SWAP, [snap])


@pytest.mark.parametrize("stopper", ["restore", "stop_verify"])
def test_a_restore_stops_a_verify_under_way_without_waiting_for_it(
    store: SnapshotStore, data: Path, stopper: str
) -> None:
    """stop_verify: what a rollback calls first, so that the check's CPU goes to the rollback."""
    db = data / "app.db"
    writer(db, BASE)
    snaps = store.take(SWAP, [(db, "sqlite")])
    in_verify, go_on = threading.Event(), threading.Event()
    outcome: list[BaseException | list[Any]] = []

    class Pausing(SnapshotStore):
        def _before_step(self, step: str) -> None:
            if step in VERIFY_STEPS:
                in_verify.set()
                assert go_on.wait(WAIT_S)

    pausing = Pausing(store.root)

    def run_verify() -> None:
        try:
            outcome.append(pausing.verify(SWAP, snaps))
        except BaseException as exc:
            outcome.append(exc)

    verifier = threading.Thread(target=run_verify)
    verifier.start()
    try:
        assert in_verify.wait(WAIT_S)
        writer(db, NEW)
        if stopper == "stop_verify":
            pausing.stop_verify("20261124-060000-ffffff")  # another swap's: nothing to stop
            pausing.stop_verify(SWAP)
        else:
            pausing.restore(SWAP, snaps)  # does not wait for the verify in progress
            assert dump(db) == rows(BASE)
    finally:
        go_on.set()
        verifier.join(WAIT_S)
    assert not verifier.is_alive()
    [error] = outcome
    assert isinstance(error, SnapshotError) and "verify stopped" in str(error), error


def test_a_stop_signal_interrupts_the_statement_it_guards(tmp_path: Path) -> None:
    stop, running = StopSignal(), threading.Event()
    outcome: list[BaseException | None] = []

    def endless_query() -> None:
        with closing(sqlite3.connect(tmp_path / "x.db", check_same_thread=False)) as con:
            con.create_function("running", 0, lambda: running.set() or 1)
            endless = "WITH RECURSIVE c(i) AS (SELECT running() UNION ALL SELECT i + 1 FROM c)"
            with stop.interrupting(con):
                try:
                    con.execute(f"{endless} SELECT max(i) FROM c").fetchone()
                    outcome.append(None)
                except sqlite3.OperationalError as exc:
                    outcome.append(exc)

    query = threading.Thread(target=endless_query, daemon=True)
    query.start()
    assert running.wait(WAIT_S), "the query never started"
    stop.set()
    query.join(WAIT_S)
    assert not query.is_alive(), "the statement was not interrupted"
    [error] = outcome
    assert stop.is_set() and "interrupted" in str(error)


# --- restore: SQLite against a hostile new version -----------------------------------------------


def open_hot_journal(con: sqlite3.Connection) -> None:
    """Die mid-transaction in rollback-journal mode with pages spilled: a hot -journal."""
    con.execute("PRAGMA cache_size=2")
    con.execute("BEGIN")
    con.executemany("INSERT INTO t(v) VALUES (?)", [("x" * 500,)] * 2000)


def grow_huge_wal(con: sqlite3.Connection) -> None:
    con.execute("BEGIN")
    con.executemany("INSERT INTO t(v) VALUES (?)", [("w" * 4000,)] * 5000)
    con.execute("COMMIT")


def corrupt(db: Path) -> Callable[[Any], None]:
    def overwrite(con: Any) -> None:
        with open(db, "r+b") as handle:
            handle.write(b"\xde\xad" * (os.path.getsize(db) // 2))

    return overwrite


SCENARIOS = {
    # name: (the new version's journal mode, what it does after committing NEW, kept rows)
    "wrote_rows": ("wal", None, len(BASE + NEW)),
    "hot_journal": ("delete", open_hot_journal, len(BASE + NEW)),  # the open txn rolled back
    "huge_wal": ("wal", grow_huge_wal, len(BASE + NEW) + 5000),
    "deleted_db": ("wal", "unlink", None),
    "deleted_folder": ("wal", "rmtree", None),
    "corrupted": ("wal", "corrupt", None),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_restore_sqlite_ends_exact(store: SnapshotStore, data: Path, scenario: str) -> None:
    db = data / "app.db"
    writer(db, BASE)
    snaps = store.take(SWAP, [(db, "sqlite")])
    taken = file_digest(store.root / SWAP / "0")
    mode, then, kept_rows = SCENARIOS[scenario]
    action = {
        "unlink": lambda con: os.unlink(db),
        "rmtree": lambda con: shutil.rmtree(data),
        "corrupt": corrupt(db),
    }.get(then, then)
    writer(db, NEW, mode=mode, then=action)
    if scenario == "hot_journal":
        assert os.path.getsize(f"{db}-journal") > 0, "precondition: the journal is hot"
    if scenario == "huge_wal":
        assert os.path.getsize(f"{db}-wal") > 16 << 20

    store.restore(SWAP, snaps)

    assert sidecars(db) == [] and strays(data) == []
    assert file_digest(db) == taken
    assert dump(db) == rows(BASE)
    assert integrity(db) == "ok"
    if kept_rows is not None:  # the probation-time data, settled into one readable file
        assert sidecars(kept(db)) == []
        assert dump(kept(db))[: len(BASE + NEW)] == rows(BASE + NEW)
        assert len(dump(kept(db))) == kept_rows
        assert integrity(kept(db)) == "ok"
    if scenario == "deleted_db":
        assert not kept(db).exists() and Path(f"{kept(db)}-wal").exists()
    if scenario == "corrupted":
        assert kept(db).read_bytes()[:4] == b"\xde\xad\xde\xad"
    assert not (store.root / SWAP / "0").exists()  # released: the live file owns that inode now


def test_a_finished_restore_run_again_changes_nothing(store: SnapshotStore, data: Path) -> None:
    db = data / "app.db"
    writer(db, BASE)
    snaps = store.take(SWAP, [(db, "sqlite")])
    writer(db, NEW)
    store.restore(SWAP, snaps)
    writer(db, ["old version running again"])  # the old host writes after the rollback

    store.restore(SWAP, snaps)

    assert dump(db) == rows([*BASE, "old version running again"])
    assert dump(kept(db))[: len(BASE) + len(NEW)] == rows(BASE + NEW)


def test_restore_does_not_let_sqlite_follow_a_planted_sidecar_symlink(
    store: SnapshotStore, data: Path, tmp_path: Path
) -> None:
    db, victim = data / "app.db", tmp_path / "victim"
    victim.write_bytes(b"precious" * 1000)
    writer(db, BASE)
    snaps = store.take(SWAP, [(db, "sqlite")])
    writer(db, NEW)
    os.unlink(f"{db}-wal")
    os.symlink(victim, f"{db}-wal")  # a checkpoint through this would truncate the victim

    store.restore(SWAP, snaps)

    assert victim.read_bytes() == b"precious" * 1000
    assert dump(db) == rows(BASE) and sidecars(db) == []
    assert os.path.islink(f"{kept(db)}-wal")


def test_restore_moves_aside_a_folder_turned_into_a_symlink(
    store: SnapshotStore, data: Path, tmp_path: Path
) -> None:
    notes = data / "notes.txt"
    notes.write_text("old")
    data.chmod(0o750)
    snaps = store.take(SWAP, [(notes, "file")])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("not yours")
    shutil.rmtree(data)
    data.symlink_to(elsewhere)

    store.restore(SWAP, snaps)

    assert not data.is_symlink() and notes.read_text() == "old"
    assert stat.S_IMODE(data.lstat().st_mode) == 0o750
    kept = data.with_name(f"{data.name}.rolled-back-{SWAP}")
    assert kept.is_symlink() and os.readlink(kept) == str(elsewhere)
    assert os.listdir(elsewhere) == ["notes.txt"]
    assert (elsewhere / "notes.txt").read_text() == "not yours"


def test_restore_refuses_a_folder_further_up_turned_into_a_symlink(
    store: SnapshotStore, data: Path, tmp_path: Path
) -> None:
    (data / "deeper").mkdir()
    notes = data / "deeper" / "notes.txt"
    notes.write_text("old")
    snaps = store.take(SWAP, [(notes, "file")])
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "deeper").mkdir(parents=True)
    (elsewhere / "deeper" / "notes.txt").write_text("not yours")
    shutil.rmtree(data)
    data.symlink_to(elsewhere)

    with pytest.raises(SnapshotError, match=rf"data entry {notes} \(file\), step set_aside"):
        store.restore(SWAP, snaps)

    assert os.listdir(elsewhere / "deeper") == ["notes.txt"]
    assert (elsewhere / "deeper" / "notes.txt").read_text() == "not yours"
    store.prune([])
    assert (store.root / SWAP).exists(), "an unfinished restore keeps its snapshot"


# --- restore: files and folders ------------------------------------------------------------------


def build_tree(root: Path, outside: Path) -> None:
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(os.urandom(5000))
    (root / "sub" / "deep" / "empty").write_text("")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o750)
    (root / "link").symlink_to("a.txt")
    (root / "outside").symlink_to(outside)


def mutate_tree(root: Path) -> None:
    (root / "a.txt").write_text("changed")
    (root / "sub" / "b.bin").unlink()
    (root / "added" / "x").mkdir(parents=True)
    (root / "added" / "x" / "new.txt").write_text("new")
    (root / "run.sh").chmod(0o600)
    (root / "link").unlink()
    (root / "link").symlink_to("sub")


def test_restore_file_and_dir(store: SnapshotStore, data: Path, tmp_path: Path) -> None:
    notes, tree = data / "notes.txt", data / "tree"
    notes.write_text("old notes")
    notes.chmod(0o640)
    build_tree(tree, tmp_path)
    before = tree_digest(tree)
    snaps = store.take(SWAP, [(notes, "file"), (tree, "dir")])
    assert (snaps[1].bytes, snaps[1].sha256) == before
    notes.write_text("new notes")
    notes.chmod(0o600)
    mutate_tree(tree)
    after = tree_digest(tree)

    store.restore(SWAP, snaps)

    assert notes.read_text() == "old notes" and stat.S_IMODE(notes.stat().st_mode) == 0o640
    assert tree_digest(tree) == before
    assert os.readlink(tree / "outside") == str(tmp_path)
    assert kept(notes).read_text() == "new notes"
    assert tree_digest(kept(tree)) == after
    assert strays(data) == []
    assert store.placements["copy"] == 0 and store.placements["link"] == 5


@pytest.mark.parametrize("kind", ["sqlite", "file", "dir"])
def test_target_absent_at_activation_is_absent_after(
    store: SnapshotStore, data: Path, kind: str
) -> None:
    target = data / "thing"
    [snap] = store.take(SWAP, [(target, kind)])
    assert (snap.existed, snap.bytes, snap.sha256) == (False, 0, "")
    if kind == "sqlite":
        writer(target, NEW)
        assert sidecars(target)
    elif kind == "file":
        target.write_text("created by the new version")
    else:
        (target / "inner").mkdir(parents=True)

    store.restore(SWAP, [snap])

    assert not os.path.lexists(target) and sidecars(target) == []
    assert os.path.lexists(kept(target))
    if kind == "sqlite":
        assert dump(kept(target)) == rows(NEW) and sidecars(kept(target)) == []


def test_a_target_replaced_by_a_symlink_is_moved_aside_not_followed(
    store: SnapshotStore, data: Path, tmp_path: Path
) -> None:
    notes, victim = data / "notes.txt", tmp_path / "victim.txt"
    notes.write_text("old")
    victim.write_text("victim")
    snaps = store.take(SWAP, [(notes, "file")])
    notes.unlink()
    notes.symlink_to(victim)

    store.restore(SWAP, snaps)

    assert not notes.is_symlink() and notes.read_text() == "old"
    assert victim.read_text() == "victim" and os.readlink(kept(notes)) == str(victim)


# --- crash at every step, then restore again -----------------------------------------------------


def crashing(
    store: SnapshotStore, *, before: str | None = None, occurrence: int = 1, at_record: int = 0
) -> SnapshotStore:
    """A store on the same root that dies by SIGKILL before the `occurrence`-th `before` step,
    or by os._exit(86) just before making its `at_record`-th journal record durable."""
    counts = {"step": 0, "record": 0}

    class Crashing(SnapshotStore):
        def _before_step(self, step: str) -> None:
            if step == before:
                counts["step"] += 1
                if counts["step"] == occurrence:
                    os.kill(os.getpid(), signal.SIGKILL)

        def _record(self, journal_path: Path, journal: dict[str, Any]) -> None:
            counts["record"] += 1
            if counts["record"] == at_record:
                os._exit(86)
            super()._record(journal_path, journal)

    return Crashing(store.root)


def crash_points() -> Iterator[Any]:
    entries = 3
    for step in RESTORE_STEPS:
        for occurrence in range(1, (entries if step in ENTRY_STEPS else 1) + 1):
            yield pytest.param(
                {"before": step, "occurrence": occurrence}, id=f"{step}-{occurrence}"
            )
    # records: the intent, the database swapped in, the folder staged and swapped in, finished
    # (which says the last file is swapped in)
    for record in range(1, 6):
        yield pytest.param({"at_record": record}, id=f"record-{record}")


@dataclass(frozen=True)
class Probation:
    """A swap on probation, built once (takes fsync a lot) and copied afresh for each crash."""

    work: Path
    template: Path
    snaps: list[DataSnapshot]
    tree_before: tuple[int, str]
    tree_after: tuple[int, str]

    def fresh(self) -> SnapshotStore:
        shutil.rmtree(self.work)
        shutil.copytree(self.template, self.work, symlinks=True)
        return SnapshotStore(self.work / "snapshots")


@pytest.fixture(scope="module")
def probation(tmp_path_factory: pytest.TempPathFactory) -> Probation:
    base = tmp_path_factory.mktemp("probation")
    work, data = base / "work", base / "work" / "data"
    data.mkdir(parents=True)
    db, tree, fresh = data / "app.db", data / "tree", data / "fresh.txt"
    writer(db, BASE)
    build_tree(tree, base)
    tree_before = tree_digest(tree)
    store = SnapshotStore(work / "snapshots")
    snaps = store.take(SWAP, [(db, "sqlite"), (tree, "dir"), (fresh, "file")])
    writer(db, NEW)
    mutate_tree(tree)
    fresh.write_text("created on probation")
    shutil.copytree(work, base / "template", symlinks=True)
    return Probation(work, base / "template", snaps, tree_before, tree_digest(tree))


@pytest.mark.parametrize("crash", list(crash_points()))
def test_restore_killed_at_any_step_then_rerun_ends_exact(
    probation: Probation, crash: dict[str, Any]
) -> None:
    store, snaps = probation.fresh(), probation.snaps
    data = probation.work / "data"
    db, tree, fresh = data / "app.db", data / "tree", data / "fresh.txt"

    status = run_child(lambda: crashing(store, **crash).restore(SWAP, snaps))
    assert status == (86 if "at_record" in crash else -signal.SIGKILL)
    store.restore(SWAP, snaps)

    assert dump(db) == rows(BASE) and integrity(db) == "ok" and sidecars(db) == []
    assert dump(kept(db)) == rows(BASE + NEW) and sidecars(kept(db)) == []
    assert tree_digest(tree) == probation.tree_before
    assert tree_digest(kept(tree)) == probation.tree_after
    assert not fresh.exists() and kept(fresh).read_text() == "created on probation"
    assert strays(data) == []
    assert sorted(os.listdir(store.root / SWAP)) == ["manifest.json", "restore.json"]


# --- speed and placement -------------------------------------------------------------------------


def make_big_db(db: Path, megabytes: int) -> None:
    with closing(sqlite3.connect(db, isolation_level=None)) as con:
        con.execute("CREATE TABLE blobs(id INTEGER PRIMARY KEY, x BLOB)")
        con.execute(
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < ?) "
            "INSERT INTO blobs(x) SELECT randomblob(1048576) FROM c",
            (megabytes,),
        )
        con.execute("PRAGMA journal_mode=wal")


def test_restore_time_does_not_follow_size(
    store: SnapshotStore, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    timings = []
    for megabytes in (10, 100):
        db = data / f"big-{megabytes}.db"
        make_big_db(db, megabytes)
        swap = f"{SWAP}-{megabytes}"
        snaps = store.take(swap, [(db, "sqlite")])
        snapshot_inode = (store.root / swap / "0").stat().st_ino
        taken = file_digest(store.root / swap / "0")
        with closing(sqlite3.connect(db, isolation_level=None)) as con:
            con.execute("DELETE FROM blobs WHERE id % 2 = 0")
        links, copies = store.placements["link"], store.placements["copy"]

        started = time.perf_counter()
        store.restore(swap, snaps)
        timings.append((megabytes, time.perf_counter() - started))

        assert db.stat().st_ino == snapshot_inode  # renamed into place, not copied
        assert (store.placements["link"] - links, store.placements["copy"] - copies) == (1, 0)
        assert file_digest(db) == taken
    with capsys.disabled():
        shown = ", ".join(f"{mb} MB: {seconds * 1000:.1f} ms" for mb, seconds in timings)
        print(f"\n[snapshot] restore on one file system: {shown}")


def durable_copy(source: Path, dest: Path) -> None:
    """The floor take() is measured against: a kernel copy, fsynced with its folder."""
    shutil.copyfile(source, dest)
    with open(dest, "rb") as handle:
        os.fsync(handle.fileno())
    fsync_dir(dest.parent)


def test_take_time_is_close_to_a_durable_copy(
    store: SnapshotStore, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, floor_copy = data / "big.db", tmp_path / "floor.db"
    make_big_db(db, 100)
    os.sync()  # each timing below pays for its own writeback only
    started = time.perf_counter()
    durable_copy(db, floor_copy)
    floor = time.perf_counter() - started
    os.sync()
    started = time.perf_counter()
    [snap] = store.take(SWAP, [(db, "sqlite")])
    took = time.perf_counter() - started
    started = time.perf_counter()
    [(_, ok, _)] = store.verify(SWAP, [snap])
    verified = time.perf_counter() - started

    assert ok and file_digest(store.root / SWAP / "0") == file_digest(floor_copy)
    with capsys.disabled():
        print(
            f"\n[snapshot] {snap.bytes >> 20} MiB: take {took * 1000:.0f} ms, copy+fsync "
            f"{floor * 1000:.0f} ms ({took / floor:.2f}x); verify {verified * 1000:.0f} ms"
        )


def test_restore_across_file_systems_copies_and_verifies(
    tmp_path: Path, data: Path, elsewhere: Path
) -> None:
    store = SnapshotStore(elsewhere / "snapshots")
    db, tree = data / "app.db", data / "tree"
    writer(db, BASE)
    build_tree(tree, tmp_path)
    before = tree_digest(tree)
    snaps = store.take(SWAP, [(db, "sqlite"), (tree, "dir")])
    writer(db, NEW)
    mutate_tree(tree)

    store.restore(SWAP, snaps)

    assert store.placements["link"] == 0 and store.placements["copy"] == 5
    assert dump(db) == rows(BASE) and sidecars(db) == [] and tree_digest(tree) == before


@pytest.mark.parametrize("before", ["mark_finished", "settle_kept"])
def test_a_restore_by_copy_killed_after_its_last_swap_in_keeps_the_probation_data(
    data: Path, elsewhere: Path, before: str
) -> None:
    """Across file systems the restored file is a copy, not the snapshot's inode: once swapped
    in (not journaled for the last entry) it must not be taken for probation-time data."""
    store = SnapshotStore(elsewhere / "snapshots")
    db, notes = data / "app.db", data / "notes.txt"
    writer(db, BASE)
    notes.write_text("notes v1")
    snaps = store.take(SWAP, [(db, "sqlite"), (notes, "file")])
    writer(db, NEW)
    notes.write_text("notes v2")

    status = run_child(lambda: crashing(store, before=before).restore(SWAP, snaps))
    assert status == -signal.SIGKILL
    store.restore(SWAP, snaps)

    assert dump(db) == rows(BASE) and sidecars(db) == [] and integrity(db) == "ok"
    assert dump(kept(db)) == rows(BASE + NEW) and sidecars(kept(db)) == []
    assert notes.read_text() == "notes v1" and kept(notes).read_text() == "notes v2"
    assert store.placements["link"] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_a_flush_goes_a_step_at_a_time_and_stops_when_no_longer_wanted(data: Path) -> None:
    """A big fsync would make every other fsync on the file system (the store's commits on the
    event loop) wait for all of it; a rollback makes the rest of the flush pointless."""
    big = data / "copy.db"
    content = os.urandom(1024) * (2 * FLUSH_STEP // 1024 + 5)  # 2 steps and a bit
    big.write_bytes(content)
    asked: list[int] = []

    def wanted() -> bool:
        asked.append(1)
        return True

    assert fsync_file(big, wanted) and len(asked) == 4  # before each of 3 steps, before the fsync
    big.write_bytes(content)  # dirty again
    asked.clear()

    def for_one_step() -> bool:
        asked.append(1)
        return len(asked) < 2

    assert not fsync_file(big, for_one_step)
    assert len(asked) == 2  # stopped before the second step
    (data / "link").symlink_to(big)
    assert not fsync_file(data / "link") and not fsync_file(data / "missing")


# --- housekeeping and records --------------------------------------------------------------------


def test_prune_keeps_what_it_is_told_and_never_follows_links(
    store: SnapshotStore, data: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    notes = data / "notes.txt"
    notes.write_text("x" * 1000)
    store.take("swap-a", [(notes, "file")])
    store.take("swap-b", [(notes, "file")])
    (store.root / "swap-b" / "escape").symlink_to(outside)
    (store.root / "swap-c").symlink_to(outside)
    held = bytes_held(store)
    assert held >= 2000

    store.prune(["swap-a", "swap-c-not-listed"])

    assert sorted(os.listdir(store.root)) == ["swap-a"]
    assert (outside / "precious").read_text() == "keep me"
    assert bytes_held(store) == held / 2


def test_prune_removes_the_probation_data_a_pruned_swap_kept(
    store: SnapshotStore, data: Path
) -> None:
    """A rolled-back swap's `<path>.rolled-back-<id>` (sidecars too) goes with its snapshot."""
    db, notes = data / "app.db", data / "notes.txt"
    writer(db, BASE)
    notes.write_text("old")
    for swap_id in ("swap-a", "swap-b"):
        snaps = store.take(swap_id, [(db, "sqlite"), (notes, "file")])
        writer(db, NEW)
        notes.write_text(f"written on probation of {swap_id}")
        store.restore(swap_id, snaps)
    kept_a = [Path(f"{path}.rolled-back-swap-a") for path in (db, notes)]
    kept_b = [Path(f"{path}.rolled-back-swap-b") for path in (db, notes)]
    assert all(path.exists() for path in kept_a + kept_b)

    store.prune(["swap-b"])

    assert sorted(os.listdir(store.root)) == ["swap-b"]
    assert not [name for name in os.listdir(data) if "rolled-back-swap-a" in name]
    assert all(path.exists() for path in kept_b)
    assert kept_b[1].read_text() == "written on probation of swap-b"
    assert dump(db) == rows(BASE) and notes.read_text() == "old"


def test_prune_goes_on_past_a_swap_it_cannot_remove_now(
    store: SnapshotStore, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kept copy an operator made unremovable must not stop every later prune."""
    notes = data / "notes.txt"
    notes.write_text("x")
    for swap_id in ("swap-a", "swap-b", "swap-c"):
        store.take(swap_id, [(notes, "file")])
    real_drop = restoresteps.drop_kept

    def refuse_b(swap_dir: Path) -> None:
        if swap_dir.name == "swap-b":
            raise PermissionError(1, "Operation not permitted")
        real_drop(swap_dir)

    monkeypatch.setattr(restoresteps, "drop_kept", refuse_b)
    store.prune(["swap-c"])
    assert sorted(os.listdir(store.root)) == ["swap-b", "swap-c"]  # swap-b: next time
    monkeypatch.setattr(restoresteps, "drop_kept", real_drop)
    store.prune(["swap-c"])
    assert sorted(os.listdir(store.root)) == ["swap-c"]


def test_taking_a_swap_again_keeps_its_snapshot_and_remakes_the_working_copy(
    store: SnapshotStore, data: Path
) -> None:
    """Only a resumed SNAPSHOT step takes again, with the host stopped since: the live file can
    differ only by a power cut tearing the working copy, which is made again from the snapshot."""
    notes = data / "notes.txt"
    notes.write_text("first")
    [first] = store.take(SWAP, [(notes, "file")])
    notes.write_text("torn")
    [snap] = store.take(SWAP, [(notes, "file")])
    assert snap == first
    assert file_digest(store.root / SWAP / "0")[1] == hashlib.sha256(b"first").hexdigest()
    assert notes.read_text() == "first"
    assert sorted(os.listdir(store.root)) == [SWAP]
    assert sorted(os.listdir(data)) == ["notes.txt"]  # no working copy left behind


def test_restore_refuses_records_the_store_does_not_hold(store: SnapshotStore, data: Path) -> None:
    notes = data / "notes.txt"
    notes.write_text("old")
    [snap] = store.take(SWAP, [(notes, "file")])
    forged = DataSnapshot(snap.path, "file", True, snap.bytes, "0" * 64)
    with pytest.raises(SnapshotError, match="differs from the store's"):
        store.restore(SWAP, [forged])
    with pytest.raises(SnapshotError, match="no snapshot"):
        store.restore("never-taken", [snap])
    assert notes.read_text() == "old"


def test_data_snapshot_json_round_trip() -> None:
    snap = DataSnapshot("/srv/app.db", "sqlite", True, 4096, "a" * 64)
    assert DataSnapshot.from_json(snap.to_json()) == snap
    assert set(snap.to_json()) == {"path", "kind", "existed", "bytes", "sha256"}  # as before
    for verdict in (True, False):
        checked = replace(snap, verified=verdict)
        assert checked.to_json() == {**snap.to_json(), "verified": verdict}
        assert DataSnapshot.from_json(checked.to_json()) == checked


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"path": "/x", "kind": "file", "existed": True, "bytes": 1}, "must be an object with"),
        (
            {"path": "x", "kind": "file", "existed": True, "bytes": 1, "sha256": "a" * 64},
            "absolute",
        ),
        ({"path": "/x", "kind": "zip", "existed": True, "bytes": 1, "sha256": "a" * 64}, "kind"),
        ({"path": "/x", "kind": "file", "existed": 1, "bytes": 1, "sha256": "a" * 64}, "bool"),
        ({"path": "/x", "kind": "file", "existed": True, "bytes": -1, "sha256": "a" * 64}, "int"),
        ({"path": "/x", "kind": "file", "existed": True, "bytes": 1, "sha256": "xyz"}, "sha256"),
        (
            {"path": "/x", "kind": "file", "existed": True, "bytes": 1, "sha256": "a" * 64}
            | {"verified": "yes"},
            "verified must be a bool",
        ),
        (
            {"path": "/x", "kind": "file", "existed": False, "bytes": 0, "sha256": "a" * 64},
            "exactly",
        ),
        ([], "must be an object"),
    ],
)
def test_data_snapshot_rejects_bad_records(record: Any, message: str) -> None:
    with pytest.raises(SnapshotError, match=message):
        DataSnapshot.from_json(record)


# --- a database another process holds for a while: tenacity tries again within a bound -----------


@contextmanager
def holding(db: Path, lock: str) -> Iterator[Callable[[], None]]:
    """A real process holds `db`: "write" (BEGIN IMMEDIATE, one row in flight, committed when
    released) or "read" (a read transaction on a WAL with frames in it, which keeps a TRUNCATE
    checkpoint from finishing). Yields the release; the child then exits."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()

    def body() -> None:
        os.close(hold_w)
        con = sqlite3.connect(db, isolation_level=None)
        con.execute("PRAGMA wal_autocheckpoint=0")
        if lock == "write":
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT INTO t(v) VALUES ('held')")
        else:
            con.execute("INSERT INTO t(v) VALUES ('held')")  # a frame the reader sits behind
            con.execute("BEGIN")
            con.execute("SELECT count(*) FROM t").fetchone()
        os.write(ready_w, b"x")
        os.read(hold_r, 1)
        con.execute("COMMIT")
        con.close()

    child = fork_child(body)
    try:
        assert select.select([ready_r], [], [], WAIT_S)[0], "the holder never took its lock"
        yield lambda: os.close(hold_w)
    finally:
        with contextlib.suppress(OSError):
            os.close(hold_w)
        assert wait_child(child) == 0
        for fd in (ready_r, ready_w, hold_r):
            os.close(fd)


@contextmanager
def busy_seen() -> Iterator[threading.Event]:
    """Set once a call logged that it found a database busy and will try again."""
    seen = threading.Event()

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "trying again" in record.getMessage():
                seen.set()

    logger = logging.getLogger(sqlitebusy.__name__)
    handler, level = Handler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def in_thread(call: Callable[[], Any]) -> Callable[[], Any]:
    """Start `call`; the returned function joins it (bounded) and gives its result or error."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()

    def join() -> Any:
        thread.join(WAIT_S)
        assert not thread.is_alive(), "the call never returned"
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return join


@pytest.mark.parametrize("lock", ["write", "read"])
def test_take_tries_again_while_another_process_holds_the_database(
    tmp_path: Path, data: Path, lock: str
) -> None:
    db = data / "app.db"
    writer(db, BASE)
    store = SnapshotStore(tmp_path / "snapshots", busy_timeout=WAIT_S)
    with holding(db, lock) as release, busy_seen() as seen:
        join = in_thread(lambda: store.take(SWAP, [(db, "sqlite")]))
        assert seen.wait(WAIT_S), "the take never found the database busy"
        release()
        [snap] = join()
    copy = store.root / SWAP / "0"
    assert snap.bytes == copy.stat().st_size and sidecars(copy) == []
    with closing(sqlite3.connect(f"file:{copy}?mode=ro&immutable=1", uri=True)) as con:
        assert con.execute("SELECT v FROM t ORDER BY id").fetchall()[-1] == ("held",)


def test_settle_kept_folds_the_wal_once_a_straggler_lets_go(data: Path) -> None:
    db = data / "app.db.rolled-back-x"
    writer(db, BASE)
    assert sidecars(db)  # the WAL holds the rows
    with holding(db, "read") as release, busy_seen() as seen:
        join = in_thread(lambda: restoresteps.settle_kept({"kind": "sqlite", "kept": str(db)}))
        assert seen.wait(WAIT_S), "settle_kept never found the copy busy"
        release()
        join()
    assert not os.path.exists(f"{db}-wal") or os.path.getsize(f"{db}-wal") == 0
    assert dump(db)[-1] == (len(BASE) + 1, "held") and integrity(db) == "ok"
