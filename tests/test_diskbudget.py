"""The disk budget: what goes (oldest first, never the swap in flight nor the last rollback's kept
data) and whether a snapshot fits. The rules are pure tables; the prune runs on real snapshots."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest

from supervisor import clock
from supervisor.code.checkpoint import CodeTree
from supervisor.config.schema import load_config
from supervisor.core import swaps
from supervisor.core.diskbudget import (
    HEADROOM,
    FileSystem,
    Held,
    Need,
    fit_problem,
    plan_prune,
    show_bytes,
)
from supervisor.daemon import swapwork
from supervisor.data import diskusage
from supervisor.data.snapshot import SnapshotStore
from supervisor.errors import InsufficientStorage
from supervisor.state.store import Store
from tests.support import make_sample_repo

MiB = 1 << 20


def held(swap_id: str, state: str, mib: int, fs: str = "state") -> Held:
    return Held(swap_id=swap_id, state=state, bytes_on={fs: mib * MiB})


# newest first, as the store lists them
HISTORY = (
    held("s6", "probation", 10),  # in flight
    held("s5", "confirmed", 10),
    held("s4", "rolled_back", 10, "data"),  # the last rollback: its kept data stays
    held("s3", "confirmed", 10),
    held("s2", "rolled_back", 10, "data"),
    held("s1", "confirmed", 10),
)

PRUNE_CASES = [
    # (keep_swaps, keep_bytes MiB, reserve MiB, kept, over_budget)
    (20, 0, 0, {"s6", "s5", "s4", "s3", "s2", "s1"}, ()),
    (3, 0, 0, {"s6", "s5", "s4"}, ()),  # the count alone, as before the budget
    (20, 60, 0, {"s6", "s5", "s4", "s3", "s2", "s1"}, ()),  # exactly at the budget
    (20, 45, 0, {"s6", "s5", "s4", "s3"}, ("s1", "s2")),  # oldest first
    (20, 45, 10, {"s6", "s5", "s4"}, ("s1", "s2", "s3")),  # room for what is about to come
    (20, 1, 0, {"s6", "s4"}, ("s1", "s2", "s3", "s5")),  # never in flight, never last rollback
    (2, 1, 0, {"s6"}, ("s5",)),  # the count first: s4 was past it already
]


@pytest.mark.parametrize(("keep_swaps", "budget", "reserve", "kept", "over"), PRUNE_CASES)
def test_plan_prune(
    keep_swaps: int, budget: int, reserve: int, kept: set[str], over: tuple[str, ...]
) -> None:
    plan = plan_prune(
        HISTORY, keep_swaps=keep_swaps, keep_bytes=budget * MiB, reserve=reserve * MiB
    )
    assert plan.keep == kept
    assert plan.over_budget == over
    assert set(plan.drop) == {h.swap_id for h in HISTORY} - kept
    assert plan.held == 10 * MiB * len(kept)
    dropped = [h for h in HISTORY if h.swap_id in plan.drop]
    for fs in ("state", "data"):
        assert plan.released.get(fs, 0) == sum(h.bytes_on.get(fs, 0) for h in dropped)


def test_a_failed_swap_is_in_flight_for_the_budget() -> None:
    history = (held("s2", "confirmed", 10), held("s1", "failed", 10))
    plan = plan_prune(history, keep_swaps=1, keep_bytes=1, reserve=0)
    assert plan.keep == {"s1"}  # its retried rollback needs the snapshot; s2 goes


STATE = FileSystem(key="state", path="/srv/app/.swapguard", free=100 * MiB, size=1000 * MiB)
DATA = FileSystem(key="data", path="/srv/app/data/app.db", free=30 * MiB, size=1000 * MiB)


def test_fits_when_every_file_system_has_room() -> None:
    needs = [Need("/srv/app/data/app.db", "state", 50 * MiB)]
    plan = plan_prune(HISTORY, keep_swaps=20, keep_bytes=0, reserve=50 * MiB)
    assert fit_problem(needs, [STATE, DATA], plan, keep_bytes=0) is None


def test_free_space_short_names_the_path_and_the_bytes() -> None:
    needs = [Need("/srv/app/data/app.db", "state", 100 * MiB - HEADROOM + 1)]
    plan = plan_prune(HISTORY, keep_swaps=20, keep_bytes=0)
    problem = fit_problem(needs, [STATE, DATA], plan, keep_bytes=0)
    assert problem is not None
    assert "/srv/app/.swapguard" in problem and "/srv/app/data/app.db" in problem
    assert show_bytes(100 * MiB) in problem  # the free bytes
    assert show_bytes(100 * MiB - HEADROOM + 1) in problem  # the bytes needed


def test_what_the_budget_prunes_counts_as_free() -> None:
    needs = [Need("/srv/app/data/app.db", "state", 110 * MiB)]
    plan = plan_prune(HISTORY, keep_swaps=20, keep_bytes=130 * MiB, reserve=110 * MiB)
    assert plan.released["state"] == 30 * MiB  # s5, s3, s1 (s2 is kept data beside the data)
    assert fit_problem(needs, [STATE, DATA], plan, keep_bytes=130 * MiB) is None  # 100 + 30 free
    bigger = [Need("/srv/app/data/app.db", "state", 125 * MiB)]
    plan = plan_prune(HISTORY, keep_swaps=20, keep_bytes=60 * MiB, reserve=125 * MiB)
    problem = fit_problem(bigger, [STATE, DATA], plan, keep_bytes=60 * MiB)
    assert problem is not None and "from pruning old swaps" in problem
    assert "state.keep_bytes" in problem  # s6 and s4 stay: 20 MiB + 125 MiB > 60 MiB


def test_a_rollback_copy_needs_room_beside_the_data() -> None:
    needs = [
        Need("/srv/app/data/app.db", "state", 40 * MiB),
        Need("/srv/app/data/app.db", "data", 40 * MiB, budgeted=False),
    ]
    plan = plan_prune(HISTORY, keep_swaps=20, keep_bytes=100 * MiB, reserve=40 * MiB)
    problem = fit_problem(needs, [STATE, DATA], plan, keep_bytes=100 * MiB)
    assert problem is not None and "/srv/app/data/app.db has" in problem
    assert "keep_bytes" not in problem  # the rollback's copy is not a snapshot's


# --- the prune on real snapshots ---------------------------------------------------------------


def write_blob(db: Path, size: int) -> None:
    with closing(sqlite3.connect(db, isolation_level=None)) as con:
        con.execute("PRAGMA journal_mode=wal")
        con.execute("CREATE TABLE IF NOT EXISTS blobs (b BLOB)")
        con.execute("INSERT INTO blobs VALUES (randomblob(?))", (size,))
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def test_keep_bytes_prunes_oldest_first_never_in_flight_nor_last_rollback(tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    db = repo / "data" / "app.db"
    db.parent.mkdir()
    write_blob(db, MiB)
    config_file = tmp_path / "swapguard.toml"
    config_file.write_text(
        f'[host]\ncommand = ["true"]\ncwd = "{repo}"\n[code]\nroot = "{repo}"\n'
        f'[state]\ndir = "{tmp_path / "state"}"\nkeep_bytes = "{3 * MiB + MiB // 2}"\n'
        f'[[data]]\npath = "{db}"\nkind = "sqlite"\n'
    )
    config = load_config(config_file)
    with Store.open(config.state.dir) as store:
        snapshots = SnapshotStore(config.state.dir / "snapshots")
        work = swapwork.SwapWork(config, store, CodeTree(repo), snapshots)
        prepared, _ = swaps.new_swap(id="s0", summary="", now=clock.now(), checkpoint={})

        def record(swap_id: str, state: str, at: float) -> swaps.Swap:
            swap = replace(prepared, id=swap_id, state=swaps.SwapState(state))
            store.save_swap_with_events(swap_id, state, at, swap.to_json(), [])
            return swap

        # s1 confirmed, s2 rolled back (kept data beside the db), s3 confirmed, s4 rolled back,
        # s5 in flight: about 1 MiB each, 5 MiB against a 3.5 MiB budget.
        for number, state in enumerate(["confirmed", "rolled_back"] * 2, start=1):
            swap_id = f"s{number}"
            taken = snapshots.take(swap_id, [(db, "sqlite")])
            write_blob(db, 64 * 1024)
            if state == "rolled_back":
                snapshots.restore(swap_id, taken)
                assert snapshots.kept_copies(swap_id)
            record(swap_id, state, prepared.created_at.wall + number)
        snapshots.take("s5", [(db, "sqlite")])
        record("s5", "probation", prepared.created_at.wall + 5)

        work.prune(keep=20)

        left = set(diskusage.swap_folders(snapshots.root))
        assert left == {"s3", "s4", "s5"}  # s1, then s2 (with its kept data) went first
        assert snapshots.kept_copies("s4") and not db.with_name("app.db.rolled-back-s2").exists()
        assert work.usage is not None
        assert work.usage.snapshots + work.usage.kept <= 3 * MiB + MiB // 2
        assert work.usage.kept >= MiB  # the last rollback's kept data is measured

        # An activation makes room first: s3 goes so that its snapshot fits in 4 MiB.
        work.config = replace(config, state=replace(config.state, keep_bytes=4 * MiB))
        work.check_disk(make_room=True)
        assert set(diskusage.swap_folders(snapshots.root)) == {"s4", "s5"}

        # A budget so small nothing else fits: the swap in flight and the last rollback stay.
        work.config = replace(config, state=replace(config.state, keep_bytes=1))
        work.prune(keep=20)
        assert set(diskusage.swap_folders(snapshots.root)) == {"s4", "s5"}
        # ... and an activation cannot fit its snapshot beside them: refused, nothing pruned.
        with pytest.raises(InsufficientStorage, match=r"state\.keep_bytes"):
            work.check_disk(make_room=True)
        assert set(diskusage.swap_folders(snapshots.root)) == {"s4", "s5"}
