"""The state store: host runs, the audit log, swap records and a few values, in `state.dir`.

Why it looks like this:
- Everything swapguard must remember across its own death lives here, never in anything the host
  can write. One SQLite file in WAL mode with `synchronous = FULL`; every logical write is one
  `BEGIN IMMEDIATE` transaction, so a crash leaves each row either old or new, never half.
- Plain `sqlite3`, no ORM: four tables and a dozen short parameterized queries, and an ORM cost
  2.5 MiB of the idle daemon's RSS. Callers get frozen dataclasses and plain dicts, never rows.
- One connection per `Store` (autocommit mode: the store issues BEGIN IMMEDIATE / COMMIT /
  ROLLBACK itself), serialized by the store's own lock, so the loop and the API threads never run
  a statement inside each other's transaction, and two stores in one process share nothing.
- The schema is an ordered list of migrations in raw SQL (history never changes). An older file
  is migrated in one transaction; a newer one is refused and left untouched.
- The folder itself (created 0700) and its `StateLock` (one swapguard per state dir) are in
  `supervisor.state.lock`; `StoreError`, `StateLock` and `prepare_state_dir` are re-exported here.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.clock import rfc3339

# Re-exported: the state dir and its lock are the store's first step.
from supervisor.state.lock import LOCK_NAME as LOCK_NAME
from supervisor.state.lock import StateLock as StateLock
from supervisor.state.lock import StoreError, check_private_file, prepare_state_dir

logger = logging.getLogger(__name__)

DB_NAME = "state.db"
TERMINAL_SWAP_STATES = frozenset({"confirmed", "rolled_back", "aborted"})
"""Swaps in these states are finished. `failed` is not: it waits for the operator to retry."""

_BUSY_TIMEOUT_MS = 5000
CACHE_KIB = 512
"""The connection's page cache (SQLite's default is 2 MiB). The store's reads are the tails of
its tables and a few keys; the rest of an ever-growing file is one pread from the OS cache."""
_CONNECT_PRAGMAS = (
    ("synchronous", 2),
    ("foreign_keys", 1),
    ("busy_timeout", _BUSY_TIMEOUT_MS),
    ("cache_size", -CACHE_KIB),  # negative: KiB, whatever the page size
)
_CHECKED_PRAGMAS = ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")

EVENTS_KEPT = 100_000
RUNS_KEPT = 10_000
SWAP_RECORDS_KEPT = 1_000
"""History is bounded, so a crash-looping host or years of swaps cannot fill the disk: every
_TRIM_EVERY-th event or run deletes what lies past the newest *_KEPT in the same transaction (one
indexed DELETE per thousand inserts), and a prune forgets finished swaps past SWAP_RECORDS_KEPT.
The file stops growing; SQLite reuses the freed pages."""
_TRIM_EVERY = 1_000


# --- records handed to callers --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostRun:
    """One spawn of the host; `pid` + `create_time` + `boot_id` identify it for adoption."""

    id: int
    pid: int
    create_time: float
    boot_id: str
    started_at: float
    ready_at: float | None
    exited_at: float | None
    exit_code: int | None
    exit_signal: int | None
    code_version: str | None
    swap_id: str | None


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One entry of the audit log (appended to, and trimmed from the oldest end only); `at` is
    wall-clock epoch seconds."""

    id: int
    at: float
    kind: str
    detail: dict[str, Any]
    swap_id: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": rfc3339(self.at),
            "event": self.kind,
            "detail": dict(self.detail),
            "swap_id": self.swap_id,
        }


# --- schema history: append only, never edit a released step ------------------------------

_MIGRATION_1 = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE host_run (id INTEGER PRIMARY KEY AUTOINCREMENT, pid INTEGER NOT NULL,
        create_time REAL NOT NULL, boot_id TEXT NOT NULL, started_at REAL NOT NULL,
        ready_at REAL, exited_at REAL, exit_code INTEGER, exit_signal INTEGER,
        code_version TEXT, swap_id TEXT)""",
    """CREATE TABLE event (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,
        kind TEXT NOT NULL, detail TEXT NOT NULL, swap_id TEXT)""",
    """CREATE TABLE swap (id TEXT PRIMARY KEY, state TEXT NOT NULL, created_at REAL NOT NULL,
        updated_at REAL NOT NULL, record TEXT NOT NULL)""",
    "CREATE INDEX swap_created_at ON swap (created_at)",
)
_MIGRATION_2 = (
    "CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL NOT NULL)",
    "CREATE INDEX event_swap_id ON event (swap_id, id)",
    "CREATE INDEX swap_state ON swap (state)",
)


def _run_statements(statements: tuple[str, ...]) -> Callable[[sqlite3.Connection], None]:
    # One execute() per statement: executescript() would COMMIT the migration's transaction.
    def migrate(conn: sqlite3.Connection) -> None:
        for statement in statements:
            conn.execute(statement)

    return migrate


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _run_statements(_MIGRATION_1),  # v1: runs, events, swaps
    _run_statements(_MIGRATION_2),  # v2: key/value table, per-swap event and state indexes
)
SCHEMA_VERSION = len(MIGRATIONS)


# --- queries: the columns of each SELECT are in the order of the record they fill -------------

_RUN_COLUMNS = (
    "id, pid, create_time, boot_id, started_at, ready_at, exited_at, exit_code, exit_signal,"
    " code_version, swap_id"
)
_EVENT_COLUMNS = "id, at, kind, detail, swap_id"
_TABLES = "SELECT name FROM sqlite_master WHERE type = 'table'"
_NEWEST_FIRST = "ORDER BY created_at DESC, rowid DESC"  # rowid: ties in insertion order
_TERMINAL = tuple(sorted(TERMINAL_SWAP_STATES))
_TERMINAL_MARKS = ", ".join("?" for _ in _TERMINAL)
# Ids of finished swaps, newest first, past the newest `?` of them (bind *_TERMINAL, the count).
_FINISHED_PAST_KEEP = (
    f"SELECT id FROM swap WHERE state IN ({_TERMINAL_MARKS}) {_NEWEST_FIRST} LIMIT -1 OFFSET ?"
)
# ON CONFLICT DO UPDATE keeps the rowid (REPLACE would not), so ties keep their order.
_UPSERT_SWAP = """INSERT INTO swap (id, state, created_at, updated_at, record)
    VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET state = excluded.state,
    created_at = excluded.created_at, updated_at = excluded.updated_at, record = excluded.record"""
_UPSERT_VALUE = """INSERT INTO kv (key, value, updated_at) VALUES (?, ?, ?)
    ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"""
_INSERT_RUN = """INSERT INTO host_run (pid, create_time, boot_id, started_at, code_version,
    swap_id) VALUES (?, ?, ?, ?, ?, ?)"""


# --- the store ------------------------------------------------------------------------------


class Store:
    """The daemon's memory. Thread-safe; every method is one short transaction."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()
        self.path = path

    @classmethod
    def open(cls, state_dir: Path) -> Store:
        """Create the state dir if needed, open `state.db`, migrate it to `SCHEMA_VERSION`."""
        state_dir = Path(state_dir)
        prepare_state_dir(state_dir)
        path = state_dir / DB_NAME
        for name in (DB_NAME, *(DB_NAME + suffix for suffix in ("-wal", "-shm", "-journal"))):
            check_private_file(state_dir / name)  # SQLite follows symlinks; refuse them first
        try:
            conn = sqlite3.connect(
                path,
                timeout=_BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,  # autocommit: the store's own BEGIN IMMEDIATE / COMMIT
                check_same_thread=False,  # the loop and the API threads; see _session's lock
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state store {path}: {exc}") from exc
        try:
            for name, value in _CONNECT_PRAGMAS:
                conn.execute(f"PRAGMA {name} = {value}")  # constants above, never input
            _migrate(conn, path)
            _enable_wal(conn, path)
        except BaseException as exc:
            with suppress(sqlite3.Error):
                conn.close()  # any transaction was rolled back on the way out
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot open state store {path}: {exc}") from exc
            raise
        return cls(conn, path)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                conn.close()  # the last connection folds the WAL into the file
            except sqlite3.Error as exc:
                raise StoreError(f"state store {self.path}: close failed: {exc}") from exc

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def effective_pragmas(self, *names: str) -> dict[str, Any]:
        """What the connection really runs with (WAL and FULL sync are what make writes safe):
        the pragmas `names`, by default those that safety rests on."""
        for name in names:
            if not name.isidentifier():
                raise ValueError(f"pragma name must be an identifier, got {name!r}")
        with self._session("read pragmas") as conn:
            return {
                name: conn.execute(f"PRAGMA {name}").fetchone()[0]
                for name in names or _CHECKED_PRAGMAS
            }

    # --- host runs --------------------------------------------------------------------------

    def record_spawn(
        self,
        pid: int,
        create_time: float,
        boot_id: str,
        started_at: float,
        code_version: str | None,
        swap_id: str | None,
    ) -> int:
        """Remember a spawn before anything else can happen to it; returns the run id."""
        row = (
            _count("pid", pid, 1),
            _finite("create_time", create_time),
            _text("boot_id", boot_id),
            _finite("started_at", started_at),
            code_version,
            swap_id,
        )
        with self._session("record spawn", write=True, durable=False) as conn:
            run_id = _row_id(conn.execute(_INSERT_RUN, row))
            if run_id % _TRIM_EVERY == 0:  # a live run is never trimmed: adoption needs it
                trim = "DELETE FROM host_run WHERE id <= ? AND exited_at IS NOT NULL"
                conn.execute(trim, (run_id - RUNS_KEPT,))
            return run_id

    def record_ready(self, run_id: int, at: float) -> None:
        self._update_run(run_id, "record ready", "ready_at = ?", _finite("at", at))

    def record_exit(self, run_id: int, at: float, code: int | None, signal: int | None) -> None:
        columns = "exited_at = ?, exit_code = ?, exit_signal = ?"
        self._update_run(run_id, "record exit", columns, _finite("at", at), code, signal)

    def live_run(self) -> HostRun | None:
        """The newest run with no exit recorded: the host to adopt after swapguard restarts."""
        where = "WHERE exited_at IS NULL ORDER BY id DESC LIMIT 1"
        rows = self._fetch("find live run", f"SELECT {_RUN_COLUMNS} FROM host_run {where}")
        return HostRun(*rows[0]) if rows else None

    def last_runs(self, limit: int) -> list[HostRun]:
        """Newest first."""
        query = f"SELECT {_RUN_COLUMNS} FROM host_run ORDER BY id DESC LIMIT ?"
        return [HostRun(*row) for row in self._fetch("list runs", query, _count("limit", limit, 1))]

    def _update_run(self, run_id: int, what: str, columns: str, *values: Any) -> None:
        """`columns` is this module's constant text; the values are always bound."""
        query = f"UPDATE host_run SET {columns} WHERE id = ?"
        with self._session(what, write=True, durable=False) as conn:
            if not conn.execute(query, (*values, run_id)).rowcount:
                raise StoreError(f"{what}: no host run with id {run_id!r}")  # rolled back

    # --- audit log --------------------------------------------------------------------------

    def append_event(
        self,
        kind: str,
        detail: Mapping[str, Any] | None = None,
        swap_id: str | None = None,
        at: float | None = None,
    ) -> EventRecord:
        # Swap events must survive a power loss; the host's own are as mortal as the host.
        durable = swap_id is not None or not kind.startswith("host.")
        with self._session("append event", write=True, durable=durable) as conn:
            return _insert_event(conn, kind, detail, swap_id, at)

    def events_after(
        self, after: int, limit: int = 500, swap_id: str | None = None
    ) -> list[EventRecord]:
        """Events with id > `after`, oldest first: `after` is a cursor that never repeats."""
        params = (_count("after", after, 0), _count("limit", limit, 1))
        where = "id > ? ORDER BY id LIMIT ?"
        if swap_id is not None:  # not `? IS NULL OR ...`: the event_swap_id index must serve it
            where, params = "id > ? AND swap_id = ? ORDER BY id LIMIT ?", (after, swap_id, limit)
        query = f"SELECT {_EVENT_COLUMNS} FROM event WHERE {where}"
        return [_event(row) for row in self._fetch("read events", query, *params)]

    def last_event_id(self) -> int:
        """0 while the log is empty; ids are never reused and the newest is never trimmed, so
        this never goes back."""
        return self._fetch("read last event id", "SELECT MAX(id) FROM event")[0][0] or 0

    # --- swaps ------------------------------------------------------------------------------

    def save_swap(
        self, swap_id: str, state: str, created_at: float, record: Mapping[str, Any]
    ) -> None:
        """Insert or replace the swap machine's record, whole, in one transaction."""
        with self._session("save swap", write=True) as conn:
            _upsert_swap(conn, swap_id, state, created_at, record)

    def save_swap_with_event(
        self,
        swap_id: str,
        state: str,
        created_at: float,
        record: Mapping[str, Any],
        kind: str,
        detail: Mapping[str, Any] | None = None,
        at: float | None = None,
    ) -> EventRecord:
        """A transition and its audit entry, committed together or not at all."""
        with self._session("save swap with event", write=True) as conn:
            _upsert_swap(conn, swap_id, state, created_at, record)
            return _insert_event(conn, kind, detail, swap_id, at)

    def save_swap_with_events(
        self,
        swap_id: str,
        state: str,
        created_at: float,
        record: Mapping[str, Any],
        events: Sequence[tuple[str, Mapping[str, Any]]],
    ) -> list[EventRecord]:
        """A transition and all its audit entries, committed together or not at all: a reader
        never sees a swap in a state whose event is missing."""
        with self._session("save swap with events", write=True) as conn:
            _upsert_swap(conn, swap_id, state, created_at, record)
            return [_insert_event(conn, kind, detail, swap_id, None) for kind, detail in events]

    def load_swap(self, swap_id: str) -> dict[str, Any] | None:
        rows = self._fetch("load swap", "SELECT record FROM swap WHERE id = ?", swap_id)
        return json.loads(rows[0][0]) if rows else None

    def list_swaps(self, limit: int = 20) -> list[dict[str, Any]]:
        """Newest first, by created_at then insertion order."""
        query = f"SELECT record FROM swap {_NEWEST_FIRST} LIMIT ?"
        rows = self._fetch("list swaps", query, _count("limit", limit, 1))
        return [json.loads(record) for (record,) in rows]

    def active_swap(self) -> dict[str, Any] | None:
        """The swap in flight (any state but a terminal one), or None."""
        where = f"WHERE state NOT IN ({_TERMINAL_MARKS}) {_NEWEST_FIRST} LIMIT 2"
        rows = self._fetch("find active swap", f"SELECT id, record FROM swap {where}", *_TERMINAL)
        if len(rows) > 1:
            logger.warning("more than one swap in flight: %s and %s", rows[0][0], rows[1][0])
        return json.loads(rows[0][1]) if rows else None

    def forget_finished_swaps_beyond(self, keep: int) -> int:
        """Delete the records of finished swaps other than the newest `keep` (their events stay
        until trimmed); returns how many went."""
        doomed = f"DELETE FROM swap WHERE id IN ({_FINISHED_PAST_KEEP})"
        params = (*_TERMINAL, _count("keep", keep, 0))
        return self._write("forget finished swaps", doomed, *params).rowcount

    def finished_swap_ids_beyond(self, keep: int) -> list[str]:
        """Finished swaps other than the newest `keep` of them (newest first): their snapshots
        may go. `failed` swaps are never listed: a retried rollback needs their snapshots."""
        params = (*_TERMINAL, _count("keep", keep, 0))
        rows = self._fetch("list finished swaps", _FINISHED_PAST_KEEP, *params)
        return [swap_id for (swap_id,) in rows]

    # --- small values -----------------------------------------------------------------------

    def get_value(self, key: str) -> Any | None:
        rows = self._fetch("read value", "SELECT value FROM kv WHERE key = ?", key)
        return json.loads(rows[0][0]) if rows else None

    def set_value(self, key: str, value: Any) -> None:
        """Store any JSON value; None deletes the key (get_value answers None either way)."""
        _text("value key", key)
        if value is None:
            self._write("write value", "DELETE FROM kv WHERE key = ?", key)
        else:
            text = _dumps(value, f"value {key!r}")
            self._write("write value", _UPSERT_VALUE, key, text, time.time())

    # --- plumbing ---------------------------------------------------------------------------

    def _fetch(self, what: str, query: str, *params: Any) -> list[Any]:
        """All the rows at once, inside the lock: a half-read SELECT would hold a read snapshot
        open on the shared connection (and pin the WAL) until its cursor is dropped."""
        with self._session(what) as conn:
            return conn.execute(query, params).fetchall()

    def _write(self, what: str, query: str, *params: Any, durable: bool = True) -> sqlite3.Cursor:
        """One statement, one transaction."""
        with self._session(what, write=True, durable=durable) as conn:
            return conn.execute(query, params)

    @contextmanager
    def _session(
        self, what: str, *, write: bool = False, durable: bool = True
    ) -> Iterator[sqlite3.Connection]:
        """The connection, to this thread alone (and in a transaction, for a write).

        `durable=False` commits without an fsync (WAL, synchronous NORMAL): still atomic and
        safe against a crash of swapguard, only a power loss may drop it. For facts about the
        host process, which a power loss ends anyway, that keeps restarts fast."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError(f"state store {self.path} is closed ({what})")
            try:
                if not write:
                    yield conn
                    return
                if not durable:
                    conn.execute("PRAGMA synchronous = NORMAL")
                try:
                    with _transaction(conn):
                        yield conn
                finally:
                    if not durable:
                        conn.execute("PRAGMA synchronous = FULL")
            except sqlite3.Error as exc:
                raise StoreError(f"state store {self.path}: {what} failed: {exc}") from exc


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE takes the write lock up front (no deadlock on a read-to-write upgrade);
    anything raised inside, a failed COMMIT included, rolls the whole transaction back."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back already (disk full, I/O error)
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                logger.exception("rollback failed; the connection's next statement will tell")
        raise


# --- opening --------------------------------------------------------------------------------


def _enable_wal(conn: sqlite3.Connection, path: Path) -> None:
    mode = conn.execute("PRAGMA journal_mode = wal").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StoreError(
            f"state store {path}: SQLite refused WAL mode (got {mode!r}); state.dir must be on a"
            " local filesystem"
        )


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Runs before WAL is switched on, so a file from a newer swapguard is refused untouched."""
    with _transaction(conn):  # all steps and the new version commit together
        tables = {name for (name,) in conn.execute(_TABLES).fetchall()}
        version = _stored_version(conn, path) if "meta" in tables else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"state store {path} has schema version {version}, newer than this swapguard knows"
                f" ({SCHEMA_VERSION}); upgrade swapguard or point state.dir elsewhere"
            )
        if version == 0 and tables:
            raise StoreError(f"{path} is a SQLite file but not a swapguard state store")
        for number in range(version + 1, SCHEMA_VERSION + 1):
            try:
                MIGRATIONS[number - 1](conn)
            except sqlite3.Error as exc:
                raise StoreError(
                    f"state store {path}: migration to v{number} failed: {exc}"
                ) from exc
        if version != SCHEMA_VERSION:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
    if version != SCHEMA_VERSION:
        logger.info("state store %s migrated from v%d to v%d", path, version, SCHEMA_VERSION)


def _stored_version(conn: sqlite3.Connection, path: Path) -> int:
    """The meta table's schema_version."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    try:
        return int(row[0])
    except (TypeError, ValueError):
        raise StoreError(
            f"state store {path}: meta.schema_version is missing or bad: {row!r}"
        ) from None


# --- writes shared by several transactions ----------------------------------------------------


def _insert_event(
    conn: sqlite3.Connection,
    kind: str,
    detail: Mapping[str, Any] | None,
    swap_id: str | None,
    at: float | None,
) -> EventRecord:
    when = time.time() if at is None else _finite("at", at)
    text = _dumps(_mapping(f"detail of event {kind!r}", detail or {}), f"detail of {kind!r}")
    cursor = conn.execute(
        "INSERT INTO event (at, kind, detail, swap_id) VALUES (?, ?, ?, ?)",
        (when, _text("event kind", kind), text, swap_id),
    )
    event_id = _row_id(cursor)
    if event_id % _TRIM_EVERY == 0:
        conn.execute("DELETE FROM event WHERE id <= ?", (event_id - EVENTS_KEPT,))
    return EventRecord(event_id, when, kind, json.loads(text), swap_id)


def _upsert_swap(
    conn: sqlite3.Connection,
    swap_id: str,
    state: str,
    created_at: float,
    record: Mapping[str, Any],
) -> None:
    _text("swap id", swap_id)
    _text(f"state of swap {swap_id}", state)
    record = _mapping(f"record of swap {swap_id}", record)
    for key, column in (("id", swap_id), ("state", state)):
        if key in record and record[key] != column:
            raise ValueError(f"swap {swap_id}: record[{key!r}] is {record[key]!r}, not {column!r}")
    created_at = _finite("created_at", created_at)
    text = _dumps(record, f"record of swap {swap_id}")
    conn.execute(_UPSERT_SWAP, (swap_id, state, created_at, time.time(), text))


# --- rows to records, values to JSON --------------------------------------------------------


def _row_id(cursor: sqlite3.Cursor) -> int:
    row_id = cursor.lastrowid
    assert row_id is not None, "an INSERT always sets lastrowid"
    return row_id


def _event(row: tuple[Any, ...]) -> EventRecord:
    row_id, at, kind, detail, swap_id = row
    return EventRecord(row_id, at, kind, json.loads(detail), swap_id)


def _dumps(value: Any, what: str) -> str:
    """Strict JSON (no NaN): whatever goes in must read back the same in any JSON client."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON-serializable: {exc}") from exc


def _finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    return float(value)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty str, got {value!r}")
    return value


def _mapping(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping, got {type(value).__name__}")
    return dict(value)


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
