"""What happens in a worker once a swap is over: the data its rollback kept goes to disk."""

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
from supervisor.daemon import swapwork
from supervisor.data.snapshot import SnapshotStore
from supervisor.state.store import Store
from tests.support import make_sample_repo


def write_rows(db: Path, *values: str) -> None:
    with closing(sqlite3.connect(db, isolation_level=None)) as con:
        con.execute("PRAGMA journal_mode=wal")
        con.execute("CREATE TABLE IF NOT EXISTS t (v TEXT)")
        con.executemany("INSERT INTO t VALUES (?)", [(v,) for v in values])


def test_settle_syncs_what_a_rollback_kept_then_prunes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    db = repo / "data" / "app.db"
    db.parent.mkdir()
    write_rows(db, "old")
    config_file = tmp_path / "swapguard.toml"
    config_file.write_text(
        f'[host]\ncommand = ["true"]\ncwd = "{repo}"\n[code]\nroot = "{repo}"\n'
        f'[state]\ndir = "{tmp_path / "state"}"\n[[data]]\npath = "{db}"\nkind = "sqlite"\n'
    )
    config = load_config(config_file)
    synced: list[Path] = []
    real_fsync = swapwork.fsync_file

    def spy(path: Path, *args: object) -> bool:
        synced.append(Path(path))
        return real_fsync(path, *args)

    monkeypatch.setattr(swapwork, "fsync_file", spy)
    with Store.open(config.state.dir) as store:
        snapshots = SnapshotStore(config.state.dir / "snapshots")
        work = swapwork.SwapWork(config, store, CodeTree(repo), snapshots)
        taken = snapshots.take("s1", [(db, "sqlite")])
        write_rows(db, "written on probation")
        snapshots.restore("s1", taken)
        kept = db.with_name("app.db.rolled-back-s1")
        assert snapshots.kept_copies("s1") == [kept]

        prepared, _ = swaps.new_swap(id="s1", summary="", now=clock.now(), checkpoint={})
        finished = replace(prepared, state=swaps.SwapState.ROLLED_BACK)
        store.save_swap_with_events(
            "s1", "rolled_back", prepared.created_at.wall, finished.to_json(), []
        )
        work.settle(finished, keep=5)
        assert synced == [kept]

        synced.clear()
        work.settle(replace(finished, state=swaps.SwapState.CONFIRMED), keep=5)
        assert synced == []  # a confirmed swap kept nothing
        with closing(sqlite3.connect(kept)) as con:
            assert [row[0] for row in con.execute("SELECT v FROM t")] == [
                "old",
                "written on probation",
            ]

        newer = replace(finished, id="s2", state=swaps.SwapState.CONFIRMED)
        store.save_swap_with_events(
            "s2", "confirmed", prepared.created_at.wall + 1, newer.to_json(), []
        )
        work.settle(newer, keep=1)  # s1 is pruned: its kept copy goes with its snapshot
        assert not kept.exists() and snapshots.kept_copies("s1") == []
