"""The disk budget end to end, on a real small file system (tmpfs) holding state.dir: a snapshot
that cannot fit is refused before anything changes and before the host is stopped; status and
/metrics show the bytes used and free."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from supervisor.config.schema import reserve_path
from supervisor.data import diskusage
from supervisor.data.snapshot import SnapshotStore
from supervisor.errors import InsufficientStorage, SnapshotError
from tests.support import (
    Supervisor,
    git,
    make_sample_repo,
    rows,
    supervised,
    wait_for,
    write_app,
)

prometheus = pytest.importorskip("prometheus_client.parser")

MiB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount a tmpfs of the size asked (bytes); skipped where mounting is not allowed."""
    mounts: list[Path] = []

    def mount(size: int) -> Path:
        point = tmp_path / f"fs{len(mounts)}"
        point.mkdir()
        options = f"size={size},mode=0755"
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def make_database(db: Path, size: int) -> None:
    """A WAL-mode database of about `size` bytes of random (incompressible, not sparse) data."""
    db.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as con:
        con.execute("PRAGMA journal_mode=wal")
        con.execute("CREATE TABLE IF NOT EXISTS blobs (b BLOB)")
        for _ in range(size // MiB):
            con.execute("INSERT INTO blobs VALUES (randomblob(?))", (MiB - 512,))
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def fill(folder: Path, leave: int) -> Path:
    """Write a file that leaves about `leave` bytes free on the file system of `folder`."""
    vfs = os.statvfs(folder)
    size = vfs.f_bavail * vfs.f_frsize - leave
    filler = folder / "filler"
    with filler.open("wb") as out:
        while size > 0:
            chunk = min(size, MiB)
            out.write(os.urandom(chunk))
            size -= chunk
    return filler


@dataclass
class OnProbation:
    """A swap whose only [[data]] is a SQLite file on its own small file system, on probation."""

    sup: Supervisor
    data_fs: Path
    db: Path
    reserve: Path
    swap_id: str
    new_pid: int
    before: list[tuple[int]]


def activate_v2(sup: Supervisor, repo: Path, old_pid: int) -> tuple[str, dict[str, Any]]:
    """Prepare a swap, write v2 and activate it: the swap's id and the new host, once ready."""
    swap = sup.client.prepare("v2")
    write_app(repo, {"version": "v2", "behaviour": "ok"})
    sup.client.activate(swap["id"])
    return swap["id"], sup.wait_host(ready=True, pid_not=old_pid)


@contextlib.contextmanager
def data_swap_on_probation(
    tmp_path: Path, data_fs: Path, window: str
) -> Iterator[OnProbation]:
    """State and code on tmp_path, the data on `data_fs`: the take copies it into state.dir and
    allocates the rollback's room (the reserve) beside it."""
    repo = make_sample_repo(tmp_path / "repo")  # (a git dir on the full fs is another matter)
    db = data_fs / "data" / "app.db"
    make_database(db, 4 * MiB)
    entry = f'[[data]]\npath = "{db}"\nkind = "sqlite"\n'
    with supervised(
        repo, state_parent=tmp_path, deadman={"window": window}, data=False, extra=entry
    ) as sup:
        old = sup.start().status()["host"]
        before = rows(db, "SELECT count(*) FROM blobs")
        swap_id, new = activate_v2(sup, repo, old["pid"])
        wait_for(lambda: "swap.probation" in sup.events(), what="the new version on probation")
        yield OnProbation(sup, data_fs, db, reserve_path(db), swap_id, new["pid"], before)


def fill_to_the_last_byte(junk: Path) -> None:
    with contextlib.suppress(OSError), junk.open("wb") as out:
        while True:
            out.write(b"x" * 4096)
            out.flush()


def assert_rows_as_before(db: Path, before: list[tuple[int]]) -> None:
    """Read without a -shm file: the file system may still be full."""
    readonly = sqlite3.connect(f"file:{db}?immutable=1", uri=True)
    with contextlib.closing(readonly):
        assert readonly.execute("SELECT count(*) FROM blobs").fetchall() == before


def swapguard_refs(repo: Path) -> str:
    return git(repo, "for-each-ref", "refs/swapguard/checkpoints")


def test_prepare_refuses_a_snapshot_that_cannot_fit(
    tmp_path: Path, small_fs: Callable[[int], Path]
) -> None:
    state_fs = small_fs(32 * MiB)
    repo = make_sample_repo(tmp_path / "repo")
    make_database(repo / "data" / "app.db", 26 * MiB)
    with supervised(repo, state_parent=state_fs) as sup:
        host = sup.start().status()["host"]
        disk = sup.status()["disk"]
        state_fs_view = disk["file_systems"][0]
        assert state_fs_view["holds"][:2] == ["state.dir", "snapshots"]
        assert 0 < state_fs_view["free_bytes"] < 32 * MiB
        assert state_fs_view["size_bytes"] == 32 * MiB
        refs_before, events_before = swapguard_refs(repo), sup.events()

        with pytest.raises(InsufficientStorage) as refused:
            sup.client.prepare("too big")
        message = str(refused.value)
        assert str(sup.state) in message and "app.db" in message
        assert "free" in message and "needs" in message

        assert sup.client.swaps() == []  # nothing changed: no swap, no checkpoint, no event
        assert swapguard_refs(repo) == refs_before
        assert "swap.prepared" not in sup.events()[len(events_before) :]
        after = sup.status()["host"]
        assert after["pid"] == host["pid"] and after["state"] == "running"


def test_activate_refuses_before_the_host_is_stopped_then_goes_once_there_is_room(
    tmp_path: Path, small_fs: Callable[[int], Path]
) -> None:
    state_fs = small_fs(40 * MiB)
    repo = make_sample_repo(tmp_path / "repo")
    db = repo / "data" / "app.db"
    make_database(db, 4 * MiB)
    with supervised(repo, state_parent=state_fs, deadman={"window": "60s"}) as sup:
        old = sup.start().status()["host"]
        swap = sup.client.prepare("v2")
        write_app(repo, {"version": "v2", "behaviour": "ok"})
        filler = fill(state_fs, leave=6 * MiB)  # the snapshot needs 4 MiB and 8 MiB to spare

        with pytest.raises(InsufficientStorage, match="not enough disk space"):
            sup.client.activate(swap["id"])
        assert sup.client.swap(swap["id"])["state"] == "prepared"
        host = sup.status()["host"]
        assert host["pid"] == old["pid"] and host["state"] == "running"
        assert "host.exited" not in sup.events() and "swap.activated" not in sup.events()
        assert not list((sup.state / "snapshots").iterdir())

        filler.unlink()
        sup.client.activate(swap["id"])
        sup.wait_host(ready=True, pid_not=old["pid"])
        sup.wait_swap(swap["id"], "probation")
        wait_for(lambda: sup.client.swap(swap["id"])["data_on_disk"], what="data flushed")
        sup.client.confirm(swap["id"])

        # status and /metrics: the snapshot the confirmed swap keeps, and the free space
        disk = wait_for(
            lambda: (d := sup.status()["disk"])["snapshots_bytes"] >= 4 * MiB and d,
            what="the new snapshot measured",
        )
        assert disk["used_bytes"] == disk["snapshots_bytes"] + disk["kept_data_bytes"]
        assert disk["keep_bytes"] is None

        def metrics() -> dict[str, dict[tuple[str, ...], float]]:
            text = sup.client.metrics()
            families = prometheus.text_string_to_metric_families(text)
            return {
                f.name: {tuple(s.labels.values()): s.value for s in f.samples} for f in families
            }

        def free_as_statvfs_says() -> dict[str, dict[tuple[str, ...], float]] | None:
            found = metrics()
            vfs = os.statvfs(state_fs)
            shown = found["swapguard_fs_free_bytes"][(str(sup.state),)]
            return found if abs(shown - vfs.f_bavail * vfs.f_frsize) < 2 * MiB else None

        found = wait_for(free_as_statvfs_says, what="the free space in /metrics")
        used = found["swapguard_disk_used_bytes"]
        assert used[("snapshots",)] >= 4 * MiB and used[("kept_data",)] == 0
        assert (str(db),) in found["swapguard_fs_free_bytes"]  # the data's file system
        assert found["swapguard_fs_size_bytes"][(str(sup.state),)] == 40 * MiB
        assert found["swapguard_disk_budget_bytes"][()] == 0


def test_an_activation_nobody_asked_for_that_cannot_fit_rolls_back_before_copying(
    tmp_path: Path, small_fs: Callable[[int], Path]
) -> None:
    """A restart while a swap is prepared activates it (the code changed): the host is stopped
    by the operator, so the take itself refuses, at once, and the old version comes back."""
    state_fs = small_fs(40 * MiB)
    repo = make_sample_repo(tmp_path / "repo")
    db = repo / "data" / "app.db"
    make_database(db, 4 * MiB)
    with supervised(repo, state_parent=state_fs, deadman={"window": "60s"}) as sup:
        old = sup.start().status()["host"]
        swap = sup.client.prepare("v2")
        write_app(repo, {"version": "v2", "behaviour": "ok"})
        fill(state_fs, leave=6 * MiB)
        before = rows(db, "SELECT count(*) FROM blobs")
        sup.client.host("restart")
        done = sup.wait_swap(swap["id"], "rolled_back")
        assert done["reason"] == "activation_failed"
        failed = [e for e in done["events"] if e["event"] == "swap.rollback_started"]
        assert "not enough disk space" in failed[0]["detail"]["error"]
        sup.wait_host(ready=True, pid_not=old["pid"])
        assert '"v1"' in (repo / "app.json").read_text()
        assert rows(db, "SELECT count(*) FROM blobs") == before


def test_a_new_version_that_fills_the_disk_is_rolled_back_all_the_same(
    tmp_path: Path, small_fs: Callable[[int], Path]
) -> None:
    """The README's promise for a full file system: data and state.dir share a tmpfs, the new
    version fills it to the last byte, and the rollback still ends exact (renames and links need
    no room; the store's reserve keeps its records writable)."""
    shared = small_fs(48 * MiB)
    repo = make_sample_repo(shared / "repo")
    db = repo / "data" / "app.db"
    make_database(db, 4 * MiB)
    with supervised(repo, state_parent=shared, deadman={"window": "60s"}) as sup:
        sup.log = tmp_path / "swapguard.log"  # not on the file system about to be filled
        old = sup.start().status()["host"]
        before = rows(db, "SELECT count(*) FROM blobs")
        swap_id, new = activate_v2(sup, repo, old["pid"])
        wait_for(
            lambda: "swap.probation" in sup.events() and sup.client.swap(swap_id)["data_on_disk"],
            what="the new version on probation, its data flushed",
        )

        writer = sqlite3.connect(db, isolation_level=None, timeout=10)
        with contextlib.closing(writer), contextlib.suppress(sqlite3.OperationalError):
            while True:  # until "database or disk is full"
                writer.execute("INSERT INTO blobs VALUES (randomblob(?))", (MiB // 4,))
        fill_to_the_last_byte(repo / "data" / "junk")  # the last bytes too
        assert os.statvfs(shared).f_bavail == 0

        sup.client.rollback(swap_id, reason="disk filled")
        sup.wait_swap(swap_id, "rolled_back", timeout=60)
        sup.wait_host(ready=True, pid_not=new["pid"])
        assert rows(db, "SELECT count(*) FROM blobs") == before
        kept = db.with_name(f"app.db.rolled-back-{swap_id}")
        assert rows(kept, "SELECT count(*) FROM blobs")[0][0] > before[0][0]
        disk = wait_for(
            lambda: (d := sup.status()["disk"])["kept_data_bytes"] > 4 * MiB and d,
            what="the kept data measured",
        )
        assert disk["file_systems"][0]["holds"] == ["state.dir", "snapshots", str(db)]


def test_what_a_take_needs_lands_on_the_file_system_of_state_dir(
    tmp_path: Path, small_fs: Callable[[int], Path]
) -> None:
    """The estimate the fit check uses: the snapshot on state.dir's file system whatever the
    data's, and across file systems the rollback's copy beside the data too; allocated bytes,
    SQLite with its WAL, a folder's files, nothing through a symlink, a missing entry free."""
    other = small_fs(16 * MiB)
    state = tmp_path / "state"
    state.mkdir()
    near, far = tmp_path / "near.db", other / "far.db"
    make_database(near, 2 * MiB)
    make_database(far, 2 * MiB)
    writer = sqlite3.connect(near, isolation_level=None)  # open: its WAL is not folded at close
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("INSERT INTO blobs VALUES (randomblob(?))", (MiB,))
    wal = os.lstat(f"{near}-wal").st_blocks * 512
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "file").write_bytes(os.urandom(MiB))
    (folder / "elsewhere").symlink_to(other)  # never followed
    entries = [(near, "sqlite"), (far, "sqlite"), (folder, "dir"), (tmp_path / "gone", "file")]
    with contextlib.closing(writer):
        needs = diskusage.take_needs(entries, state)
        main = os.lstat(near).st_blocks * 512
    state_fs, other_fs = diskusage.fs_key(state), diskusage.fs_key(other)
    assert [(n.path, n.fs, n.budgeted) for n in needs] == [
        (str(near), state_fs, True),
        (str(far), state_fs, True),
        (str(far), other_fs, False),  # the rollback copies it back across file systems
        (str(folder), state_fs, True),
    ]
    sizes = [n.bytes for n in needs]
    assert sizes[0] == main + wal and wal >= MiB
    assert sizes[1] == sizes[2] == os.lstat(far).st_blocks * 512
    assert sizes[3] == MiB


def test_a_new_version_that_fills_the_data_file_system_is_rolled_back_across_file_systems(
    tmp_path: Path, small_fs: Callable[[int], Path]
) -> None:
    """Data on its own small tmpfs, state.dir elsewhere: the snapshot is a copy in state.dir,
    and the rollback copies it back. The new version fills the data's file system to the last
    byte; the reserve the take allocated beside the data is freed for that copy, so the rollback
    still ends exact, and no reserve is left behind."""
    with data_swap_on_probation(tmp_path, small_fs(48 * MiB), "60s") as on:
        assert on.reserve.stat().st_blocks * 512 >= on.db.stat().st_size  # allocated, not sparse

        writer = sqlite3.connect(on.db, isolation_level=None, timeout=10)
        with contextlib.closing(writer), contextlib.suppress(sqlite3.OperationalError):
            while True:  # until "database or disk is full"
                writer.execute("INSERT INTO blobs VALUES (randomblob(?))", (MiB // 4,))
        fill_to_the_last_byte(on.data_fs / "data" / "junk")  # the last bytes too
        assert os.statvfs(on.data_fs).f_bavail == 0

        on.sup.client.rollback(on.swap_id, reason="disk filled")
        on.sup.wait_swap(on.swap_id, "rolled_back", timeout=60)
        on.sup.wait_host(ready=True, pid_not=on.new_pid)
        assert not on.reserve.exists()
        assert_rows_as_before(on.db, on.before)  # still full: the kept data, the junk
        assert not os.path.lexists(f"{on.db}-wal")


def test_no_reserve_is_left_once_a_swap_is_confirmed(
    tmp_path: Path, small_fs: Callable[[int], Path]
) -> None:
    data_fs = small_fs(32 * MiB)
    repo = make_sample_repo(data_fs / "repo")
    db = repo / "data" / "app.db"
    make_database(db, 2 * MiB)
    reserve = reserve_path(db)
    with supervised(repo, state_parent=tmp_path, deadman={"window": "60s"}) as sup:
        old = sup.start().status()["host"]
        swap_id, _ = activate_v2(sup, repo, old["pid"])
        wait_for(lambda: "swap.probation" in sup.events(), what="the new version on probation")
        assert reserve.exists()
        assert "swapguard-reserve" not in git(repo, "status", "--porcelain", "--ignored")
        sup.client.confirm(swap_id)
        sup.wait_swap(swap_id, "confirmed", timeout=60)
        wait_for(lambda: not reserve.exists(), what="the reserve removed after the confirm")


def test_a_take_that_cannot_reserve_the_rollbacks_room_fails_and_leaves_the_data_untouched(
    tmp_path: Path, small_fs: Callable[[int], Path]
) -> None:
    """The room goes after the fit check, before the take allocates its reserve: the take fails
    (activation_failed: the old version runs on), the live data and its folder are as they were."""
    data_fs = small_fs(16 * MiB)
    db = data_fs / "data" / "app.db"
    make_database(db, 4 * MiB)
    before = db.read_bytes()
    filler = data_fs / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as out:
        while True:
            out.write(b"x" * 65536)
            out.flush()
    os.truncate(filler, filler.stat().st_size - MiB)  # room for SQLite's -shm, not for a copy
    listing = sorted(os.listdir(db.parent))
    store = SnapshotStore(tmp_path / "snapshots")
    with pytest.raises(SnapshotError, match="reserve"):
        store.take("s1-reserve", [(db, "sqlite")])
    assert db.read_bytes() == before
    assert sorted(os.listdir(db.parent)) == listing
    assert diskusage.swap_folders(store.root) == []


def test_the_reserve_is_replaced_after_a_crash_refused_over_a_symlink_and_freed_by_a_restore(
    tmp_path: Path, small_fs: Callable[[int], Path]
) -> None:
    """A reserve of ours left by a crashed take is replaced; a symlink at its name is refused,
    never followed. A restore unlinks it right before its copy, and a restore run again needs
    nothing; the swap's end drops a reserve, but not one a newer swap's take made."""
    data_fs = small_fs(32 * MiB)
    db = data_fs / "data" / "app.db"
    make_database(db, 2 * MiB)
    reserve = reserve_path(db)
    reserve.write_bytes(b"left by a crash")
    store = SnapshotStore(tmp_path / "snapshots")
    taken = store.take("s1-reserve", [(db, "sqlite")])
    assert not taken[0].linked
    assert reserve.stat().st_size == db.stat().st_size
    assert reserve.stat().st_blocks * 512 >= db.stat().st_size

    before = db.read_bytes()
    db.write_bytes(b"the new version's")
    store.restore("s1-reserve", taken)
    assert db.read_bytes() == before
    assert not reserve.exists()
    store.restore("s1-reserve", taken)  # repeated: a no-op, nothing needed
    assert db.read_bytes() == before

    store.take("s2-reserve", [(db, "sqlite")])
    store.take("s3-reserve", [(db, "sqlite")])
    store.drop_reserves("s2-reserve")  # an older swap's end: s3's reserve stays
    assert reserve.exists()
    store.drop_reserves("s3-reserve")
    assert not reserve.exists()

    store.prune([])
    bait = tmp_path / "bait"
    bait.write_text("not ours")
    reserve.symlink_to(bait)
    with pytest.raises(SnapshotError, match="not a regular file"):
        store.take("s4-reserve", [(db, "sqlite")])
    assert bait.read_text() == "not ours"
    assert reserve.is_symlink()
    assert db.read_bytes() == before


def test_a_restore_cut_short_after_the_reserve_went_copies_all_the_same(
    tmp_path: Path, small_fs: Callable[[int], Path]
) -> None:
    """A crash between the reserve's unlink and the copy: the restore run again finds it gone
    and copies anyway (the room it held is still free)."""
    data_fs = small_fs(16 * MiB)
    db = data_fs / "app.db"
    make_database(db, 2 * MiB)
    store = SnapshotStore(tmp_path / "snapshots")
    taken = store.take("s1-reserve", [(db, "sqlite")])
    before = db.read_bytes()
    db.write_bytes(b"the new version's")
    reserve_path(db).unlink()
    store.restore("s1-reserve", taken)
    assert db.read_bytes() == before


def test_a_reserve_goes_when_its_swap_is_pruned(
    tmp_path: Path, small_fs: Callable[[int], Path]
) -> None:
    data_fs = small_fs(16 * MiB)
    db = data_fs / "app.db"
    make_database(db, MiB)
    reserve = reserve_path(db)
    store = SnapshotStore(tmp_path / "snapshots")
    store.take("s1-reserve", [(db, "sqlite")])
    store.prune(["s1-reserve"])
    assert reserve.exists()
    store.prune([])
    assert not reserve.exists()


def test_no_reserve_where_the_data_shares_state_dirs_file_system(tmp_path: Path) -> None:
    db = tmp_path / "data" / "app.db"
    make_database(db, MiB)
    store = SnapshotStore(tmp_path / "snapshots")
    assert store.take("s1-reserve", [(db, "sqlite")])[0].linked
    assert not reserve_path(db).exists()


def test_a_kill_between_the_take_and_the_rollback_keeps_the_reserve(
    tmp_path: Path, small_fs: Callable[[int], Path]
) -> None:
    """swapguard is killed -9 during probation and restarted: the reserve is still held (the
    restart's prune keeps the swap in flight), and the rollback of a full data file system
    still ends exact."""
    with data_swap_on_probation(tmp_path, small_fs(32 * MiB), "120s") as on:
        sup = on.sup
        sup.kill9()
        sup.start(wait_ready=False)
        wait_for(lambda: sup.status()["host"]["pid"] == on.new_pid, what="the host adopted")
        assert on.reserve.exists()

        fill_to_the_last_byte(on.data_fs / "data" / "junk")
        assert os.statvfs(on.data_fs).f_bavail == 0
        sup.client.rollback(on.swap_id, reason="disk filled")
        sup.wait_swap(on.swap_id, "rolled_back", timeout=60)
        assert not on.reserve.exists()
        assert_rows_as_before(on.db, on.before)
