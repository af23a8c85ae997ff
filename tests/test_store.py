"""The state store against real SQLite files, real flocks and real SIGKILLed processes."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from supervisor.errors import StateLocked, SwapguardError
from supervisor.state import schema
from supervisor.state import store as store_module
from supervisor.state.store import (
    SCHEMA_VERSION,
    EventRecord,
    HostRun,
    RunExit,
    StateLock,
    Store,
    StoreError,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 10.0
MAIN_V2_STORE = Path(__file__).with_name("fixtures") / "state-v2.sql"
MAIN_V4_STORE = Path(__file__).with_name("fixtures") / "state-v4.sql"

# The v1 schema exactly as the first release wrote it: a fixture of history, never regenerated.
V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE host_run (id INTEGER PRIMARY KEY AUTOINCREMENT, pid INTEGER NOT NULL,
    create_time REAL NOT NULL, boot_id TEXT NOT NULL, started_at REAL NOT NULL,
    ready_at REAL, exited_at REAL, exit_code INTEGER, exit_signal INTEGER,
    code_version TEXT, swap_id TEXT);
CREATE TABLE event (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,
    kind TEXT NOT NULL, detail TEXT NOT NULL, swap_id TEXT);
CREATE TABLE swap (id TEXT PRIMARY KEY, state TEXT NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, record TEXT NOT NULL);
CREATE INDEX swap_created_at ON swap (created_at);
INSERT INTO meta VALUES ('schema_version', '1');
"""


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store.open(tmp_path / "state") as opened:
        yield opened


@contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain connection beside the store's, to look at what is really on disk; closed after."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def stored_version(db_path: Path) -> int:
    with raw(db_path) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def pragmas(store: Store, *names: str) -> dict[str, Any]:
    """What the store's own connection runs with (per-connection pragmas: only it can tell)."""
    return {name: store._db.pragma(name) for name in names}


def runs(store: Store) -> list[HostRun]:
    """Every host run on disk, newest first."""
    columns = ", ".join(HostRun.__slots__)
    with raw(store.path) as conn:
        rows = conn.execute(f"SELECT {columns} FROM host_run ORDER BY id DESC").fetchall()
    return [HostRun(*row) for row in rows]


def last_event_id(store: Store) -> int:
    events = store.events_after(0, limit=100_000)
    return events[-1].id if events else 0


def save_swap(
    store: Store, swap_id: str, state: str, created_at: float, record: dict[str, Any]
) -> None:
    store.save_swap_with_events(swap_id, state, created_at, record, [])


def schema_of(db_path: Path) -> dict[str, Any]:
    """Tables with their columns (name, type, not null, primary key) and indexes with theirs.
    A primary key's NOT NULL is left out: main's DDL did not say it and peewee's does (SQLite lets
    a TEXT PRIMARY KEY hold NULL unless told), and no key column has ever held one."""
    with raw(db_path) as conn:
        names = conn.execute("SELECT type, name, tbl_name FROM sqlite_master ORDER BY name")
        found: dict[str, Any] = {}
        for kind, name, table in names.fetchall():
            if kind == "table":
                info = conn.execute(f"PRAGMA table_info({name})").fetchall()
                found[name] = [(col[1], col[2], col[5] or col[3], col[5]) for col in info]
            elif kind == "index" and not name.startswith("sqlite_autoindex"):
                columns = [col[2] for col in conn.execute(f"PRAGMA index_info({name})")]
                found[name] = (table, columns)
    return found


def rows_of(db_path: Path, table: str) -> list[tuple[Any, ...]]:
    with raw(db_path) as conn:
        return conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()


def dir_snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def python(code: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, **kwargs)


def read_line(proc: subprocess.Popen[str]) -> str:
    """One line from the child's stdout, or fail after WAIT_S instead of hanging."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], WAIT_S)
    assert ready, "child printed nothing in time"
    return proc.stdout.readline().strip()


# --- opening, pragmas, migrations ---------------------------------------------------------


def test_open_creates_a_private_dir_and_the_current_schema(tmp_path: Path) -> None:
    state_dir = tmp_path / "deep" / "state"
    Store.open(state_dir).close()
    assert state_dir.stat().st_mode & 0o777 == 0o700
    assert stored_version(state_dir / "state.db") == SCHEMA_VERSION
    with raw(state_dir / "state.db") as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"meta", "host_run", "event", "swap", "kv"} <= tables


def test_an_operators_dir_mode_is_kept_and_a_writable_one_refused(tmp_path: Path) -> None:
    private, shared = tmp_path / "private", tmp_path / "shared"
    private.mkdir(mode=0o750)
    os.chmod(private, 0o750)
    shared.mkdir()
    os.chmod(shared, 0o777)
    Store.open(private).close()
    with pytest.raises(StoreError, match=r"shared is writable by group or others \(mode 0777\)"):
        Store.open(shared)
    assert private.stat().st_mode & 0o777 == 0o750
    assert shared.stat().st_mode & 0o777 == 0o777 and not list(shared.iterdir())


def test_a_state_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a dir")
    with pytest.raises(StoreError, match="not a directory"):
        Store.open(tmp_path / "state")


def test_wal_and_full_sync_are_really_set(store: Store) -> None:
    assert pragmas(store, "journal_mode", "synchronous", "foreign_keys", "busy_timeout") == {
        "journal_mode": "wal",
        "synchronous": 2,
        "foreign_keys": 1,
        "busy_timeout": 5000,
    }
    with raw(store.path) as conn:  # WAL is a property of the file, seen by every connection
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_v1_file_is_migrated_with_its_rows(tmp_path: Path) -> None:
    db_path = tmp_path / "state.db"
    with raw(db_path) as conn:
        conn.executescript(V1_SCHEMA)
        conn.execute(
            "INSERT INTO host_run (pid, create_time, boot_id, started_at)"
            " VALUES (42, 1.5, 'b', 2.0)"
        )
        conn.execute("INSERT INTO event (at, kind, detail) VALUES (3.0, 'host.started', '{}')")
        conn.execute(
            "INSERT INTO swap VALUES ('s1', 'probation', 4.0, 4.0, ?)",
            (json.dumps({"id": "s1", "state": "probation"}),),
        )
    with Store.open(tmp_path) as store:
        assert stored_version(db_path) == SCHEMA_VERSION
        assert store.live_run() == HostRun(1, 42, 1.5, "b", 2.0, None, None, None, None, None, None)
        assert [event.kind for event in store.events_after(0)] == ["host.started"]
        assert store.active_swap() == {"id": "s1", "state": "probation"}
        store.set_value("checkpoint", "abc")  # the table v2 added
        assert store.get_value("checkpoint") == "abc"
        assert store.append_event("after.migration").id == 2


def fresh_store(folder: Path) -> Path:
    Store.open(folder).close()
    return folder / "state.db"


def main_v2_store(folder: Path) -> Path:
    """The store today's main wrote (tests/fixtures/state-v2.sql), as a WAL-mode file again."""
    db_path = folder / "state.db"
    with raw(db_path) as conn:
        conn.executescript(MAIN_V2_STORE.read_text())
        assert conn.execute("PRAGMA journal_mode = wal").fetchone()[0] == "wal"
    return db_path


def test_a_store_written_by_main_is_migrated_with_every_row(tmp_path: Path) -> None:
    db_path = main_v2_store(tmp_path)
    assert stored_version(db_path) == 0
    tables = ("host_run", "event", "swap", "kv", "sqlite_sequence")
    before = {table: rows_of(db_path, table) for table in tables}
    assert [len(before[table]) for table in tables] == [3, 17, 2, 4, 2]
    assert rows_of(db_path, "meta") == [("schema_version", "2")]
    with Store.open(tmp_path) as store:
        assert stored_version(db_path) == SCHEMA_VERSION
        after = {table: rows_of(db_path, table) for table in tables}
        new_columns = (None, None)  # v4 exit_reason, v5 start_uptime: unknown for old runs
        assert after == before | {"host_run": [(*row, *new_columns) for row in before["host_run"]]}
        # v3's one change of data: swapguard <= 0.1 now refuses the file as newer than it knows
        assert rows_of(db_path, "meta") == [("schema_version", "3")]
        # and the store reads it all as main did
        live = store.live_run()
        assert live is not None and (live.id, live.exited_at) == (3, None)
        assert live == HostRun(*before["host_run"][-1], exit_reason=None, start_uptime=None)
        events = store.events_after(0, limit=100)
        assert [(e.id, e.at, e.kind, e.swap_id) for e in events] == [
            (row[0], row[1], row[2], row[4]) for row in before["event"]
        ]
        assert [event.detail for event in events] == [json.loads(row[3]) for row in before["event"]]
        confirmed, rolled_back = (row[0] for row in before["swap"])
        assert [s["id"] for s in store.list_swaps()] == [rolled_back, confirmed]
        assert store.load_swap(confirmed) == json.loads(before["swap"][0][4])
        assert store.active_swap() is None
        assert store.finished_swap_ids_beyond(1) == [confirmed]
        rolled_back_ids = [row[0] for row in before["event"] if row[4] == rolled_back]
        assert [e.id for e in store.events_after(0, swap_id=rolled_back)] == rolled_back_ids
        assert store.get_value("host_checkpoint_confirmed") == confirmed
        for key, text, _ in before["kv"]:
            assert store.get_value(key) == json.loads(text)
        assert store.append_event("after.migration").id == 18  # AUTOINCREMENT carried on
        assert store.record_spawn(9, 1.0, "boot", 1.0, None, None) == 4
    assert schema_of(db_path) == schema_of(fresh_store(tmp_path / "fresh"))


def test_a_v4_store_is_migrated_and_its_live_run_has_no_start_since_boot(tmp_path: Path) -> None:
    """v5 adds each run's start since boot; a run v4 recorded keeps NULL there, and adoption
    falls back to its wall-clock create_time (test_supervise covers that end)."""
    db_path = tmp_path / "state.db"
    with raw(db_path) as conn:
        conn.executescript(MAIN_V4_STORE.read_text())
        assert conn.execute("PRAGMA journal_mode = wal").fetchone()[0] == "wal"
    assert stored_version(db_path) == 4
    tables = ("host_run", "event", "swap", "kv", "meta", "sqlite_sequence")
    before = {table: rows_of(db_path, table) for table in tables}
    assert [len(before[table]) for table in tables] == [2, 3, 0, 1, 1, 2]
    with Store.open(tmp_path) as store:
        assert stored_version(db_path) == SCHEMA_VERSION == 5
        after = {table: rows_of(db_path, table) for table in tables}
        assert after == before | {"host_run": [(*row, None) for row in before["host_run"]]}
        live = store.live_run()
        assert live is not None and (live.id, live.pid, live.start_uptime) == (2, 4188, None)
        assert live == HostRun(*before["host_run"][-1], start_uptime=None)
        ended = store.last_ended_run()
        assert ended is not None and ended.exit_reason == "heartbeat_lost"
        new = store.record_spawn(9, 1.0, "boot", 1.0, None, None, start_uptime=123.45)
        assert new == 3 and store.live_run() == HostRun(
            3, 9, 1.0, "boot", 1.0, None, None, None, None, None, None, None, 123.45
        )
    assert schema_of(db_path) == schema_of(fresh_store(tmp_path / "fresh"))


def test_a_fresh_store_and_a_migrated_v1_store_have_the_same_schema(tmp_path: Path) -> None:
    """Every step replays for a new file, so the two paths cannot drift apart."""
    with raw(tmp_path / "state.db") as conn:
        conn.executescript(V1_SCHEMA)
    Store.open(tmp_path).close()
    migrated, fresh = schema_of(tmp_path / "state.db"), schema_of(fresh_store(tmp_path / "new"))
    assert migrated == fresh
    assert {"host_run", "event", "swap", "kv", "meta", "swap_created_at", "event_swap_id"} <= set(
        fresh
    )


def test_a_run_keeps_why_it_ended(tmp_path: Path) -> None:
    with Store.open(tmp_path) as store:
        run_id = store.record_spawn(9, 1.0, "boot", 1.0, None, None)
        store.record_exit(run_id, 2.0, None, 15)
        store.record_exit_reason(run_id, "heartbeat_lost")
        with pytest.raises(StoreError, match="no host run"):
            store.record_exit_reason(run_id + 1, "stop")
    row = rows_of(tmp_path / "state.db", "host_run")[0]
    assert (row[8], row[11], row[12]) == (15, "heartbeat_lost", None)


def test_the_schema_history_has_one_step_per_version() -> None:
    assert len(schema.STEPS) == SCHEMA_VERSION


def test_an_up_to_date_store_opens_without_the_schema_history(tmp_path: Path) -> None:
    """playhouse.migrate is for files that need a step; a daemon restart does not load it."""
    fresh_store(tmp_path)
    opens = python(
        "import json, sys; from pathlib import Path; from supervisor.state.store import Store\n"
        "Store.open(Path(sys.argv[1])).close()\n"
        "names = [m for m in sys.modules if m.startswith(('playhouse', 'supervisor.state.'))]\n"
        "print(json.dumps(sorted(names)))",
        str(tmp_path),
        stdout=subprocess.PIPE,
    )
    output, _ = opens.communicate(timeout=WAIT_S)
    assert opens.returncode == 0
    loaded = json.loads(output)
    assert "supervisor.state.store" in loaded and "supervisor.state.schema" not in loaded
    assert not [name for name in loaded if name.startswith("playhouse")]


def test_a_migration_that_fails_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    """All the steps and the new version are one transaction: a step that fails undoes them all."""
    db_path = tmp_path / "state.db"
    with raw(db_path) as conn:
        conn.executescript(V1_SCHEMA)
        conn.execute("CREATE TABLE kv (key TEXT)")  # in the way of step 2
    before = schema_of(db_path)
    with pytest.raises(StoreError, match='migration to v2 failed: table "kv" already exists'):
        Store.open(tmp_path)
    assert schema_of(db_path) == before
    assert (stored_version(db_path), rows_of(db_path, "meta")) == (0, [("schema_version", "1")])


def test_a_newer_store_is_refused_and_left_untouched(tmp_path: Path) -> None:
    Store.open(tmp_path).close()
    # the WAL folded in at close; the reserve a full disk gives back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reserve", "state.db"]
    with raw(tmp_path / "state.db") as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = dir_snapshot(tmp_path)
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer") as caught:
        Store.open(tmp_path)
    assert isinstance(caught.value, SwapguardError)
    assert dir_snapshot(tmp_path) == before


def test_files_that_are_not_state_stores_are_refused_untouched(tmp_path: Path) -> None:
    foreign, garbage, unversioned = tmp_path / "foreign", tmp_path / "garbage", tmp_path / "meta"
    for folder in (foreign, garbage, unversioned):
        folder.mkdir()
    with raw(foreign / "state.db") as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    (garbage / "state.db").write_bytes(b"this is no database " * 100)
    with raw(unversioned / "state.db") as conn:  # a v1 store whose version row is gone
        conn.executescript(V1_SCHEMA)
        conn.execute("DELETE FROM meta")
    cases = (
        (foreign, "not a swapguard state store"),
        (garbage, "not a database"),
        (unversioned, r"user_version is 0 and meta.schema_version is None"),
    )
    for folder, reason in cases:
        before = dir_snapshot(folder)
        with pytest.raises(StoreError, match=reason):
            Store.open(folder)
        assert dir_snapshot(folder) == before


def test_two_stores_in_one_process_keep_their_own_rows(tmp_path: Path) -> None:
    with Store.open(tmp_path / "a") as first, Store.open(tmp_path / "b") as second:
        first.append_event("only.in.a")
        second.set_value("only", "b")
        assert [event.kind for event in first.events_after(0)] == ["only.in.a"]
        assert second.events_after(0) == []
        assert first.get_value("only") is None
        assert second.get_value("only") == "b"


def test_a_closed_store_says_so(tmp_path: Path) -> None:
    opened = Store.open(tmp_path)
    opened.close()
    opened.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        opened.events_after(0)


# --- host runs ------------------------------------------------------------------------------


def test_host_runs_round_trip(store: Store) -> None:
    assert store.live_run() is None
    first = store.record_spawn(100, 10.25, "boot-1", 11.0, "cp-1", None)
    store.record_ready(first, 12.0)
    store.record_exit(first, 13.0, 1, None)
    second = store.record_spawn(101, 14.5, "boot-1", 15.0, "cp-2", "swap-1")
    assert store.live_run() == HostRun(
        second, 101, 14.5, "boot-1", 15.0, None, None, None, None, "cp-2", "swap-1"
    )
    store.record_exit(second, 16.0, None, signal.SIGKILL)
    assert store.live_run() is None
    newest, oldest = runs(store)
    assert newest.exit_signal == signal.SIGKILL and newest.exit_code is None
    assert oldest == HostRun(first, 100, 10.25, "boot-1", 11.0, 12.0, 13.0, 1, None, "cp-1", None)


def test_a_restart_records_the_exit_with_the_next_spawn(store: Store) -> None:
    """One transaction after the fork: the old run closed and the new one opened together."""
    first = store.record_spawn(100, 10.25, "boot-1", 11.0, None, None)
    second = store.record_spawn(
        101, 14.5, "boot-1", 15.0, None, None, previous=RunExit(first, 13.0, 1, None)
    )
    assert store.live_run() == HostRun(
        second, 101, 14.5, "boot-1", 15.0, None, None, None, None, None, None
    )
    assert runs(store)[1] == HostRun(
        first, 100, 10.25, "boot-1", 11.0, None, 13.0, 1, None, None, None
    )
    store.record_code_version(second, "cp-1")  # the baseline, taken after the spawn
    live = store.live_run()
    assert live is not None and live.code_version == "cp-1"
    # a previous run that is not there (never the case) costs a warning, never the spawn
    missing = RunExit(77, 1.0, 0, None)
    third = store.record_spawn(102, 16.0, "boot-1", 16.5, None, None, previous=missing)
    assert store.live_run() is not None and third > second
    with pytest.raises(ValueError, match="at"):
        endless = RunExit(third, float("inf"), 0, None)
        store.record_spawn(103, 1.0, "boot", 1.0, None, None, previous=endless)
    live = store.live_run()
    assert live is not None and live.id == third  # a refused spawn record changes nothing


def test_events_of_one_turn_go_in_one_transaction_in_order(store: Store) -> None:
    records = store.append_events([
        ("host.exited", {"code": 1}, None, 5.0),
        ("host.started", {"pid": 7}, None, 5.5),
        ("swap.noted", {}, "swap-1", 6.0),
    ])
    assert [(r.kind, r.at, r.swap_id) for r in records] == [
        ("host.exited", 5.0, None), ("host.started", 5.5, None), ("swap.noted", 6.0, "swap-1")]
    assert [r.id for r in records] == [r.id for r in store.events_after(0)]
    with pytest.raises(ValueError, match="JSON"):
        store.append_events([("host.ok", {}, None, 7.0), ("host.bad", {"x": {1, 2}}, None, 7.0)])
    assert len(store.events_after(0)) == 3  # all or nothing


def test_host_run_updates_and_spawns_check_their_input(store: Store) -> None:
    with pytest.raises(StoreError, match="no host run with id 99"):
        store.record_ready(99, 1.0)
    with pytest.raises(ValueError, match="pid"):
        store.record_spawn(0, 1.0, "boot", 1.0, None, None)
    with pytest.raises(ValueError, match="started_at"):
        store.record_spawn(5, 1.0, "boot", float("nan"), None, None)
    with pytest.raises(ValueError, match="start_uptime"):
        store.record_spawn(5, 1.0, "boot", 1.0, None, None, start_uptime=float("inf"))
    with pytest.raises(ValueError, match="limit"):
        store.events_after(0, limit=0)
    assert runs(store) == []


# --- events ---------------------------------------------------------------------------------


def test_events_are_ordered_and_paged_by_id(store: Store) -> None:
    assert last_event_id(store) == 0
    appended = [
        store.append_event("swap.prepared", {"summary": "x"}, swap_id="s1", at=1_700_000_000.5),
        store.append_event("host.started", {"pid": 7}),
        store.append_event("swap.activated", None, swap_id="s1"),
    ]
    assert [event.id for event in appended] == [1, 2, 3]
    assert last_event_id(store) == 3
    assert store.events_after(0) == appended
    assert store.events_after(1, limit=1) == [appended[1]]
    assert store.events_after(3) == []
    assert [event.id for event in store.events_after(0, swap_id="s1")] == [1, 3]
    assert appended[2].detail == {}
    assert appended[0].to_json() == {
        "id": 1,
        "at": "2023-11-14T22:13:20.500Z",
        "event": "swap.prepared",
        "detail": {"summary": "x"},
        "swap_id": "s1",
    }


def test_event_ids_never_repeat_after_deletions(store: Store) -> None:
    for n in range(3):
        store.append_event("tick", {"n": n})
    with raw(store.path) as conn:
        conn.execute("DELETE FROM event WHERE id >= 2")
    assert store.append_event("tick").id == 4


def test_bad_events_are_refused_by_name(store: Store) -> None:
    with pytest.raises(ValueError, match="event kind"):
        store.append_event("")
    with pytest.raises(ValueError, match="detail of event 'x'"):
        store.append_event("x", ["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not JSON-serializable"):
        store.append_event("x", {"when": object()})
    assert last_event_id(store) == 0


# --- swaps ----------------------------------------------------------------------------------


def swap_record(swap_id: str, state: str, **extra: Any) -> dict[str, Any]:
    return {"id": swap_id, "state": state, "changes": [{"path": "a.py"}], **extra}


def test_swaps_round_trip_and_upsert(store: Store) -> None:
    assert store.load_swap("s1") is None
    save_swap(store, "s1", "prepared", 10.0, swap_record("s1", "prepared"))
    save_swap(store, "s1", "probation", 10.0, swap_record("s1", "probation", deadline=99.5))
    assert store.load_swap("s1") == swap_record("s1", "probation", deadline=99.5)
    assert store.list_swaps() == [swap_record("s1", "probation", deadline=99.5)]


def test_swaps_list_newest_first_with_ties_in_insertion_order(store: Store) -> None:
    for swap_id, created_at in (("old", 1.0), ("tie-a", 5.0), ("tie-b", 5.0), ("mid", 3.0)):
        save_swap(store, swap_id, "confirmed", created_at, {"id": swap_id})
    save_swap(store, "tie-a", "confirmed", 5.0, {"id": "tie-a", "again": True})  # keeps its place
    assert [s["id"] for s in store.list_swaps()] == ["tie-b", "tie-a", "mid", "old"]
    assert [s["id"] for s in store.list_swaps(limit=2)] == ["tie-b", "tie-a"]


def test_active_swap_is_the_one_not_finished_and_failed_is_not_finished(store: Store) -> None:
    assert store.active_swap() is None
    for n, state in enumerate(("confirmed", "rolled_back", "aborted")):
        save_swap(store, f"done-{n}", state, float(n), {"id": f"done-{n}"})
    assert store.active_swap() is None
    save_swap(store, "f", "failed", 9.0, {"id": "f", "state": "failed"})
    assert store.active_swap() == {"id": "f", "state": "failed"}
    save_swap(store, "f", "rolled_back", 9.0, {"id": "f", "state": "rolled_back"})
    assert store.active_swap() is None


def test_finished_swaps_beyond_keep_are_listed_for_pruning(store: Store) -> None:
    states = ["confirmed", "rolled_back", "failed", "aborted", "confirmed", "probation"]
    for n, state in enumerate(states):
        save_swap(store, f"s{n}", state, float(n), {})
    assert store.finished_swap_ids_beyond(2) == ["s1", "s0"]
    assert store.finished_swap_ids_beyond(0) == ["s4", "s3", "s1", "s0"]
    assert store.finished_swap_ids_beyond(10) == []
    with pytest.raises(ValueError, match="keep"):
        store.finished_swap_ids_beyond(-1)


def test_finished_swap_records_beyond_keep_are_forgotten(store: Store) -> None:
    states = ["confirmed", "rolled_back", "failed", "aborted", "confirmed", "probation"]
    for n, state in enumerate(states):
        save_swap(store, f"s{n}", state, float(n), {})
    assert store.forget_finished_swaps_beyond(2) == 2
    assert [f"s{n}" for n in range(6) if store.load_swap(f"s{n}") is not None] == [
        "s2", "s3", "s4", "s5"
    ]  # fmt: skip
    assert store.forget_finished_swaps_beyond(2) == 0
    assert store.finished_swap_ids_beyond(0) == ["s4", "s3"]


def test_history_is_trimmed_past_the_newest_kept(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every _TRIM_EVERY-th insert trims; a run with no exit (a host to adopt) always stays."""
    monkeypatch.setattr(store_module, "_TRIM_EVERY", 10)
    monkeypatch.setattr(store_module, "EVENTS_KEPT", 15)
    monkeypatch.setattr(store_module, "RUNS_KEPT", 5)
    for n in range(1, 41):
        store.append_event("host.started", {"n": n})
    assert [e.id for e in store.events_after(0, limit=100)] == list(range(26, 41))
    assert last_event_id(store) == 40
    for n in range(1, 21):
        run_id = store.record_spawn(100 + n, 1.0, "boot", float(n), None, None)
        if n not in (3, 20):
            store.record_exit(run_id, float(n), 0, None)
    assert [run.id for run in runs(store)] == [20, 19, 18, 17, 16, 3]
    assert (live := store.live_run()) is not None and live.id == 20


def test_a_swap_and_its_events_commit_together_or_not_at_all(store: Store) -> None:
    events = [("swap.activated", {"deadline": 2.0}), ("swap.probation", {})]
    first, second = store.save_swap_with_events("s1", "probation", 1.0, {"id": "s1"}, events)
    assert first == EventRecord(1, first.at, "swap.activated", {"deadline": 2.0}, "s1")
    assert (second.id, second.kind, second.swap_id) == (2, "swap.probation", "s1")
    assert store.events_after(0) == [first, second]
    with pytest.raises(ValueError, match="not JSON-serializable"):
        bad = [("fine", {}), ("bad", {"x": {1, 2}})]
        store.save_swap_with_events("s1", "confirmed", 1.0, {"id": "s1"}, bad)
    assert store.load_swap("s1") == {"id": "s1"}  # the swap write was rolled back with the event
    assert store.active_swap() == {"id": "s1"}
    assert last_event_id(store) == 2


def test_entries_before_a_swap_commit_with_it_and_keep_their_place(store: Store) -> None:
    """The loop's audit entries of a turn go in the swap record's commit, ahead of its events."""
    before = [("host.stopped", {"pid": 7}, None, 5.0), ("host.exited", None, "s1", 5.5)]
    records = store.save_swap_with_events(
        "s1", "rolling_back", 1.0, {"id": "s1"}, [("swap.rollback_started", {})], before
    )
    assert [(r.id, r.kind, r.swap_id, r.at) for r in records[:2]] == [
        (1, "host.stopped", None, 5.0),
        (2, "host.exited", "s1", 5.5),
    ]
    third = (records[2].id, records[2].kind, records[2].swap_id)
    assert third == (3, "swap.rollback_started", "s1")
    assert store.events_after(0) == records
    with pytest.raises(ValueError, match="not JSON-serializable"):
        bad = [("bad", {"x": {1, 2}}, None, 6.0)]
        store.save_swap_with_events("s1", "rolled_back", 1.0, {"id": "s2"}, [], bad)
    assert store.load_swap("s1") == {"id": "s1"}  # nothing of the refused commit stayed
    assert last_event_id(store) == 3


def test_bad_swaps_are_refused_by_name(store: Store) -> None:
    with pytest.raises(ValueError, match=r"record\['state'\] is 'prepared', not 'probation'"):
        save_swap(store, "s1", "probation", 1.0, {"state": "prepared"})
    with pytest.raises(ValueError, match="swap id"):
        save_swap(store, "", "prepared", 1.0, {})
    with pytest.raises(ValueError, match="record of swap s1 must be a mapping"):
        save_swap(store, "s1", "prepared", 1.0, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not JSON-serializable"):
        save_swap(store, "s1", "prepared", 1.0, {"deadline": float("inf")})
    assert store.list_swaps() == []


# --- values ---------------------------------------------------------------------------------


def test_values_hold_json_and_none_deletes(store: Store) -> None:
    assert store.get_value("missing") is None
    value = {"checkpoint": "abc", "paths": ["dist"], "n": 3, "ok": True}
    store.set_value("host.checkpoint", value)
    assert store.get_value("host.checkpoint") == value
    store.set_value("host.checkpoint", 7)
    assert store.get_value("host.checkpoint") == 7
    store.set_value("host.checkpoint", None)
    assert store.get_value("host.checkpoint") is None
    with pytest.raises(ValueError, match="value 'k' is not JSON-serializable"):
        store.set_value("k", float("nan"))


def test_threads_share_one_store(store: Store) -> None:
    def write(worker: int) -> None:
        for n in range(20):
            store.append_event("tick", {"worker": worker, "n": n})
            store.set_value(f"w{worker}", n)

    workers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(WAIT_S)
    assert last_event_id(store) == 80
    assert [store.get_value(f"w{w}") for w in range(4)] == [19] * 4


def test_two_stores_written_by_threads_at_once_keep_their_own_rows(tmp_path: Path) -> None:
    stores = {name: Store.open(tmp_path / name) for name in ("a", "b")}
    try:

        def write(name: str, worker: int) -> None:
            for n in range(15):
                stores[name].append_event(f"{name}.tick", {"worker": worker, "n": n})
                stores[name].set_value(f"{name}{worker}", n)

        workers = [
            threading.Thread(target=write, args=(name, w)) for name in stores for w in range(2)
        ]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(WAIT_S)
        for name, opened in stores.items():
            assert {event.kind for event in opened.events_after(0)} == {f"{name}.tick"}
            assert last_event_id(opened) == 30
            assert [opened.get_value(f"{other}{w}") for other in stores for w in range(2)] == (
                [14, 14, None, None] if name == "a" else [None, None, 14, 14]
            )
    finally:
        for opened in stores.values():
            opened.close()


def test_a_reader_thread_never_sees_half_a_transaction(store: Store) -> None:
    """The loop and API threads share one connection: without the store's lock, a read would run
    inside the other thread's open transaction and see its first event without its second."""
    writing = threading.Event()
    odd_counts: list[int] = []

    def write() -> None:
        writing.set()
        for n in range(60):
            events = [("swap.a", {"n": n}), ("swap.b", {"n": n})]
            store.save_swap_with_events("s1", "probation", 1.0, {"n": n}, events)

    writer = threading.Thread(target=write)
    writer.start()
    assert writing.wait(WAIT_S)
    while writer.is_alive():
        count = last_event_id(store)
        if count % 2:
            odd_counts.append(count)
    writer.join(WAIT_S)
    assert odd_counts == []
    assert last_event_id(store) == 120
    assert store.load_swap("s1") == {"n": 59}


@contextmanager
def statements(store: Store) -> Iterator[list[str]]:
    """The SQL the store's own connection runs meanwhile (the store's private connection: no
    public surface says which statements a write issues)."""
    seen: list[str] = []
    conn = store._db.connection()
    conn.set_trace_callback(seen.append)
    try:
        yield seen
    finally:
        conn.set_trace_callback(None)


def test_each_write_is_one_immediate_transaction_and_host_facts_skip_the_fsync(
    store: Store,
) -> None:
    run_id = store.record_spawn(7, 1.0, "boot", 1.0, None, None)
    head = {False: ["BEGIN IMMEDIATE"], True: ["PRAGMA synchronous = NORMAL", "BEGIN IMMEDIATE"]}
    tail = {False: ["COMMIT"], True: ["COMMIT", "PRAGMA synchronous = FULL"]}
    writes: list[tuple[Callable[[], object], bool]] = [  # (write, relaxed)
        (lambda: store.set_value("k", 1), False),
        (lambda: store.record_spawn(8, 1.0, "boot", 1.0, None, None), True),
        (lambda: store.record_ready(run_id, 2.0), True),
        (lambda: store.record_exit(run_id, 3.0, 0, None), True),
        (lambda: store.append_event("host.started", {"pid": 8}), True),
        (lambda: store.append_event("host.started", {"pid": 8}, swap_id="s1"), False),
        (lambda: store.append_event("config.reloaded"), False),
        (lambda: store.save_swap_with_events("s1", "prepared", 1.0, {}, [("a", {})]), False),
    ]
    for write, relaxed in writes:
        with statements(store) as seen:
            write()
        body = seen[len(head[relaxed]) : -len(tail[relaxed])]
        assert seen == [*head[relaxed], *body, *tail[relaxed]]
        assert body and not [s for s in body if s.startswith(("BEGIN", "COMMIT", "PRAGMA"))]
    assert pragmas(store, "synchronous") == {"synchronous": 2}


def test_a_failed_relaxed_write_rolls_back_and_still_restores_full_sync(store: Store) -> None:
    with statements(store) as seen, pytest.raises(StoreError, match="no host run with id 99"):
        store.record_ready(99, 1.0)
    assert seen[-2:] == ["ROLLBACK", "PRAGMA synchronous = FULL"]
    with pytest.raises(ValueError, match="event kind"):
        store.append_event("", swap_id=None)  # not a host fact, but fails inside its transaction
    with pytest.raises(ValueError, match="not JSON-serializable"):
        store.append_event("host.bad", {"x": object()})  # relaxed, fails inside
    assert pragmas(store, "synchronous") == {"synchronous": 2}
    assert last_event_id(store) == 0
    assert runs(store) == []


def test_sqlite_errors_become_store_errors_naming_the_file_and_the_step(store: Store) -> None:
    with raw(store.path) as conn:
        conn.execute("DROP TABLE kv")
    with pytest.raises(StoreError, match=r"state\.db: write value failed: no such table: kv"):
        store.set_value("k", 1)
    with pytest.raises(StoreError, match=r"state\.db: read value failed: no such table: kv"):
        store.get_value("k")
    with pytest.raises(StoreError) as caught:
        store.get_value("k")
    assert str(store.path) in str(caught.value)
    store.append_event("still.works")  # the failed transaction left nothing open
    assert last_event_id(store) == 1


def test_a_full_disk_fails_a_write_by_its_reason_and_changes_nothing(store: Store) -> None:
    """On SQLITE_FULL, SQLite rolls the whole transaction back by itself: peewee's ROLLBACK then
    fails ("no transaction is active"), and the error must still name the full disk."""
    store.append_event("swap.before", swap_id="s0")
    store._db.pragma("max_page_count", store._db.pragma("page_count"))  # not one page more
    big = {"blob": "x" * 100_000}
    with pytest.raises(StoreError, match=r"save swap with events failed: database or disk is full"):
        store.save_swap_with_events("s1", "prepared", 1.0, big, [("swap.prepared", {})])
    with pytest.raises(StoreError, match=r"append event failed: database or disk is full"):
        store.append_event("host.output", big)  # relaxed: full sync must come back all the same
    assert pragmas(store, "synchronous") == {"synchronous": 2}
    assert store.load_swap("s1") is None and last_event_id(store) == 1
    store._db.pragma("max_page_count", 1 << 20)  # room again: the same store goes on
    store.save_swap_with_events("s1", "prepared", 1.0, big, [("swap.prepared", {})])
    assert store.load_swap("s1") == big and last_event_id(store) == 2


# --- the state lock -------------------------------------------------------------------------

HOLD_LOCK = """
import sys
from supervisor.state.store import StateLock
lock = StateLock.acquire(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""

TRY_LOCK = """
import sys
from supervisor.errors import StateLocked
from supervisor.state.store import StateLock
try:
    StateLock.acquire(sys.argv[1])
except StateLocked as exc:
    print(exc.message, flush=True)
    sys.exit(7)
print("acquired", flush=True)
"""


def test_a_second_swapguard_is_refused_until_the_holder_dies(tmp_path: Path) -> None:
    holder = python(HOLD_LOCK, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert read_line(holder) == "held"
        with pytest.raises(StateLocked, match=rf"in use by another swapguard \(pid {holder.pid}\)"):
            StateLock.acquire(tmp_path)
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(WAIT_S) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(WAIT_S)
    assert (tmp_path / "lock").read_text().strip() == str(holder.pid)  # stale, and harmless
    with StateLock.acquire(tmp_path):
        assert (tmp_path / "lock").read_text().strip() == str(os.getpid())
        contender = python(TRY_LOCK, str(tmp_path), stdout=subprocess.PIPE)
        output, _ = contender.communicate(timeout=WAIT_S)
        assert contender.returncode == 7, output
        assert f"pid {os.getpid()}" in output
    contender = python(TRY_LOCK, str(tmp_path), stdout=subprocess.PIPE)
    output, _ = contender.communicate(timeout=WAIT_S)
    assert (contender.returncode, output.strip()) == (0, "acquired")


def test_the_lock_is_exclusive_within_a_process_too_and_released_cleanly(tmp_path: Path) -> None:
    lock = StateLock.acquire(tmp_path)
    with pytest.raises(StateLocked):
        StateLock.acquire(tmp_path)
    lock.release()
    lock.release()  # idempotent
    assert (tmp_path / "lock").read_text() == ""
    StateLock.acquire(tmp_path).release()


# --- crash safety ---------------------------------------------------------------------------

BURST_THEN_SIGKILL = """
import hashlib, os, random, signal, sys, threading
from pathlib import Path
from supervisor.state.store import Store

store = Store.open(Path(sys.argv[1]))
halfway = threading.Event()

def kill_self() -> None:
    halfway.wait()
    # A random moment a few writes later, so runs die at different points of a transaction.
    threading.Event().wait(random.uniform(0.0, 0.05))
    os.kill(os.getpid(), signal.SIGKILL)

threading.Thread(target=kill_self, daemon=True).start()
for seq in range(1, 100_000):
    blob = os.urandom(6000).hex()  # several pages per row
    digest = hashlib.sha256(blob.encode()).hexdigest()
    record = {"seq": seq, "blob": blob, "sha256": digest}
    store.save_swap_with_events(
        f"swap-{seq % 7}", "probation", float(seq), record,
        [("swap.saved", {"seq": seq, "sha256": digest})],
    )
    store.set_value("last_seq", seq)
    if seq == 30:
        halfway.set()
sys.exit(3)
"""


def test_a_sigkill_mid_burst_leaves_whole_rows(tmp_path: Path) -> None:
    child = python(BURST_THEN_SIGKILL, str(tmp_path))
    assert child.wait(60) == -signal.SIGKILL
    with raw(tmp_path / "state.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with Store.open(tmp_path) as store:
        events = store.events_after(0, limit=100_000)
        swaps = store.list_swaps(limit=100)
        last_seq = store.get_value("last_seq")
    assert len(events) >= 30
    assert [event.detail["seq"] for event in events] == list(range(1, len(events) + 1))
    event_digest = {event.detail["seq"]: event.detail["sha256"] for event in events}
    for record in swaps:
        assert hashlib.sha256(record["blob"].encode()).hexdigest() == record["sha256"]
        assert event_digest[record["seq"]] == record["sha256"]  # swap and event went in together
    newest = max(record["seq"] for record in swaps)
    assert newest == len(events)  # the last committed transaction carried both
    assert last_seq in (newest - 1, newest)  # a separate transaction, one behind at most
