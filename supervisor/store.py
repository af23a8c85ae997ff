"""The state store: host runs, the audit log, swap records and a few values, in `state.dir`.

Why it looks like this:
- Everything swapguard must remember across its own death lives here, never in anything the host
  can write. One SQLite file in WAL mode with `synchronous = FULL`; every logical write is one
  `BEGIN IMMEDIATE` transaction, so a crash leaves each row either old or new, never half.
- Only this module imports peewee. Callers get frozen dataclasses and plain dicts, never models.
- The models are unbound; each `Store` binds them to its own database for the span of one call
  (`bind_ctx`) under a process-wide lock, so two stores in one process never see each other's rows.
- The schema is an ordered list of migrations in raw SQL (history must not change when the models
  do). An older file is migrated in one transaction; a newer one is refused and left untouched.
- The folder itself (created 0700) and its `StateLock` (one swapguard per state dir) are in
  `supervisor.lock`; `StoreError`, `StateLock` and `prepare_state_dir` are re-exported here.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peewee

from supervisor.clock import rfc3339

# Re-exported: the state dir and its lock are the store's first step.
from supervisor.lock import LOCK_NAME as LOCK_NAME
from supervisor.lock import StateLock as StateLock
from supervisor.lock import StoreError, prepare_state_dir

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
    """One entry of the append-only audit log; `at` is wall-clock epoch seconds."""

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


def _run_statements(statements: tuple[str, ...]) -> Callable[[peewee.Database], None]:
    def migrate(db: peewee.Database) -> None:
        for statement in statements:
            db.execute_sql(statement)

    return migrate


MIGRATIONS: tuple[Callable[[peewee.Database], None], ...] = (
    _run_statements(_MIGRATION_1),  # v1: runs, events, swaps
    _run_statements(_MIGRATION_2),  # v2: key/value table, per-swap event and state indexes
)
SCHEMA_VERSION = len(MIGRATIONS)


# --- models (unbound; see Store._session) --------------------------------------------------


class _HostRunRow(peewee.Model):  # the implicit `id` is its AutoField, as in every model here
    pid = peewee.IntegerField()
    create_time = peewee.FloatField()
    boot_id = peewee.TextField()
    started_at = peewee.FloatField()
    ready_at = peewee.FloatField(null=True)
    exited_at = peewee.FloatField(null=True)
    exit_code = peewee.IntegerField(null=True)
    exit_signal = peewee.IntegerField(null=True)
    code_version = peewee.TextField(null=True)
    swap_id = peewee.TextField(null=True)

    class Meta:
        table_name = "host_run"


class _EventRow(peewee.Model):
    at = peewee.FloatField()
    kind = peewee.TextField()
    detail = peewee.TextField()
    swap_id = peewee.TextField(null=True)

    class Meta:
        table_name = "event"


class _SwapRow(peewee.Model):
    id = peewee.TextField(primary_key=True)
    state = peewee.TextField()
    created_at = peewee.FloatField()
    updated_at = peewee.FloatField()
    record = peewee.TextField()

    class Meta:
        table_name = "swap"


class _ValueRow(peewee.Model):
    key = peewee.TextField(primary_key=True)
    value = peewee.TextField()
    updated_at = peewee.FloatField()

    class Meta:
        table_name = "kv"


_MODELS = (_HostRunRow, _EventRow, _SwapRow, _ValueRow)
# bind_ctx rebinds the model classes themselves, and every Store has a single connection: one
# lock for the whole process keeps two stores (tests) or two threads (loop, API) from crossing.
_BIND_LOCK = threading.RLock()


# --- the store ------------------------------------------------------------------------------


class Store:
    """The daemon's memory. Thread-safe; every method is one short transaction."""

    def __init__(self, db: peewee.SqliteDatabase, path: Path) -> None:
        self._db = db
        self.path = path

    @classmethod
    def open(cls, state_dir: Path) -> Store:
        """Create the state dir if needed, open `state.db`, migrate it to `SCHEMA_VERSION`."""
        state_dir = Path(state_dir)
        prepare_state_dir(state_dir)
        path = state_dir / DB_NAME
        db = peewee.SqliteDatabase(
            str(path),
            pragmas=_CONNECT_PRAGMAS,
            timeout=_BUSY_TIMEOUT_MS / 1000,
            lock_type="IMMEDIATE",  # take the write lock up front: no deadlock on upgrade
            thread_safe=False,  # one connection, serialized by _BIND_LOCK
            check_same_thread=False,
            autoconnect=False,
        )
        try:
            with _BIND_LOCK:
                db.connect()
                _migrate(db, path)
                _enable_wal(db, path)
        except BaseException as exc:
            with _BIND_LOCK, suppress(peewee.PeeweeException):
                db.close()  # any transaction was rolled back on the way out
            if isinstance(exc, peewee.PeeweeException):
                raise StoreError(f"cannot open state store {path}: {exc}") from exc
            raise
        return cls(db, path)

    def close(self) -> None:
        with _BIND_LOCK:
            if not self._db.is_closed():
                self._db.close()

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
        with self._session("read pragmas"):
            return {
                name: self._db.execute_sql(f"PRAGMA {name}").fetchone()[0]
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
        with self._session("record spawn", write=True, durable=False):
            return _HostRunRow.insert(
                pid=_count("pid", pid, 1),
                create_time=_finite("create_time", create_time),
                boot_id=_text("boot_id", boot_id),
                started_at=_finite("started_at", started_at),
                code_version=code_version,
                swap_id=swap_id,
            ).execute()

    def record_ready(self, run_id: int, at: float) -> None:
        self._update_run(run_id, "record ready", ready_at=_finite("at", at))

    def record_exit(self, run_id: int, at: float, code: int | None, signal: int | None) -> None:
        self._update_run(
            run_id, "record exit", exited_at=_finite("at", at), exit_code=code, exit_signal=signal
        )

    def live_run(self) -> HostRun | None:
        """The newest run with no exit recorded: the host to adopt after swapguard restarts."""
        with self._session("find live run"):
            query = _HostRunRow.select().where(_HostRunRow.exited_at.is_null())
            rows = list(query.order_by(_HostRunRow.id.desc()).limit(1).dicts())
            return HostRun(**rows[0]) if rows else None

    def last_runs(self, limit: int) -> list[HostRun]:
        """Newest first."""
        with self._session("list runs"):
            query = (
                _HostRunRow.select()
                .order_by(_HostRunRow.id.desc())
                .limit(_count("limit", limit, 1))
            )
            return [HostRun(**row) for row in query.dicts()]

    def _update_run(self, run_id: int, what: str, **fields: Any) -> None:
        with self._session(what, write=True, durable=False):
            changed = _HostRunRow.update(**fields).where(_HostRunRow.id == run_id).execute()
            if not changed:
                raise StoreError(f"{what}: no host run with id {run_id!r}")

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
        with self._session("append event", write=True, durable=durable):
            return self._insert_event(kind, detail, swap_id, at)

    def events_after(
        self, after: int, limit: int = 500, swap_id: str | None = None
    ) -> list[EventRecord]:
        """Events with id > `after`, oldest first: `after` is a cursor that never repeats."""
        _count("limit", limit, 1)
        with self._session("read events"):
            query = _EventRow.select().where(_EventRow.id > _count("after", after, 0))
            if swap_id is not None:
                query = query.where(_EventRow.swap_id == swap_id)
            return [_event(row) for row in query.order_by(_EventRow.id).limit(limit)]

    def last_event_id(self) -> int:
        """0 while the log is empty; the log is append-only, so this never goes back."""
        with self._session("read last event id"):
            return _EventRow.select(peewee.fn.MAX(_EventRow.id)).scalar() or 0

    def _insert_event(
        self,
        kind: str,
        detail: Mapping[str, Any] | None,
        swap_id: str | None,
        at: float | None,
    ) -> EventRecord:
        when = time.time() if at is None else _finite("at", at)
        text = _dumps(_mapping(f"detail of event {kind!r}", detail or {}), f"detail of {kind!r}")
        row_id = _EventRow.insert(
            at=when, kind=_text("event kind", kind), detail=text, swap_id=swap_id
        )
        return EventRecord(row_id.execute(), when, kind, json.loads(text), swap_id)

    # --- swaps ------------------------------------------------------------------------------

    def save_swap(
        self, swap_id: str, state: str, created_at: float, record: Mapping[str, Any]
    ) -> None:
        """Insert or replace the swap machine's record, whole, in one transaction."""
        with self._session("save swap", write=True):
            self._upsert_swap(swap_id, state, created_at, record)

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
        with self._session("save swap with event", write=True):
            self._upsert_swap(swap_id, state, created_at, record)
            return self._insert_event(kind, detail, swap_id, at)

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
        with self._session("save swap with events", write=True):
            self._upsert_swap(swap_id, state, created_at, record)
            return [self._insert_event(kind, detail, swap_id, None) for kind, detail in events]

    def load_swap(self, swap_id: str) -> dict[str, Any] | None:
        with self._session("load swap"):
            row = _SwapRow.get_or_none(_SwapRow.id == swap_id)
            return json.loads(row.record) if row else None

    def list_swaps(self, limit: int = 20) -> list[dict[str, Any]]:
        """Newest first, by created_at then insertion order."""
        with self._session("list swaps"):
            query = _newest_first(_SwapRow.select(_SwapRow.record)).limit(_count("limit", limit, 1))
            return [json.loads(row.record) for row in query]

    def active_swap(self) -> dict[str, Any] | None:
        """The swap in flight (any state but a terminal one), or None."""
        with self._session("find active swap"):
            query = _SwapRow.select(_SwapRow.id, _SwapRow.record).where(
                _SwapRow.state.not_in(TERMINAL_SWAP_STATES)
            )
            rows = list(_newest_first(query).limit(2))
        if len(rows) > 1:
            logger.warning("more than one swap in flight: %s and %s", rows[0].id, rows[1].id)
        return json.loads(rows[0].record) if rows else None

    def finished_swap_ids_beyond(self, keep: int) -> list[str]:
        """Finished swaps other than the newest `keep` of them (newest first): their snapshots
        may go. `failed` swaps are never listed: a retried rollback needs their snapshots."""
        with self._session("list finished swaps"):
            query = _SwapRow.select(_SwapRow.id).where(_SwapRow.state.in_(TERMINAL_SWAP_STATES))
            return [row.id for row in _newest_first(query).offset(_count("keep", keep, 0))]

    def _upsert_swap(
        self, swap_id: str, state: str, created_at: float, record: Mapping[str, Any]
    ) -> None:
        _text("swap id", swap_id)
        _text(f"state of swap {swap_id}", state)
        record = _mapping(f"record of swap {swap_id}", record)
        for key, column in (("id", swap_id), ("state", state)):
            if key in record and record[key] != column:
                raise ValueError(
                    f"swap {swap_id}: record[{key!r}] is {record[key]!r}, not {column!r}"
                )
        fields = {
            _SwapRow.state: state,
            _SwapRow.created_at: _finite("created_at", created_at),
            _SwapRow.updated_at: time.time(),
            _SwapRow.record: _dumps(record, f"record of swap {swap_id}"),
        }
        # ON CONFLICT DO UPDATE keeps the rowid (REPLACE would not), so ties keep their order.
        _SwapRow.insert({_SwapRow.id: swap_id, **fields}).on_conflict(
            conflict_target=[_SwapRow.id], update=fields
        ).execute()

    # --- small values -----------------------------------------------------------------------

    def get_value(self, key: str) -> Any | None:
        with self._session("read value"):
            row = _ValueRow.get_or_none(_ValueRow.key == key)
            return json.loads(row.value) if row else None

    def set_value(self, key: str, value: Any) -> None:
        """Store any JSON value; None deletes the key (get_value answers None either way)."""
        _text("value key", key)
        with self._session("write value", write=True):
            if value is None:
                _ValueRow.delete().where(_ValueRow.key == key).execute()
                return
            fields = {
                _ValueRow.value: _dumps(value, f"value {key!r}"),
                _ValueRow.updated_at: time.time(),
            }
            _ValueRow.insert({_ValueRow.key: key, **fields}).on_conflict(
                conflict_target=[_ValueRow.key], update=fields
            ).execute()

    # --- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _session(self, what: str, *, write: bool = False, durable: bool = True) -> Iterator[None]:
        """Bind the models to this store's database (and open a transaction for a write).

        `durable=False` commits without an fsync (WAL, synchronous NORMAL): still atomic and
        safe against a crash of swapguard, only a power loss may drop it. For facts about the
        host process, which a power loss ends anyway, that keeps restarts fast."""
        with _BIND_LOCK:
            if self._db.is_closed():
                raise StoreError(f"state store {self.path} is closed ({what})")
            try:
                with self._db.bind_ctx(_MODELS):
                    if write and not durable:
                        self._db.execute_sql("PRAGMA synchronous = NORMAL")
                    try:
                        if write:
                            with self._db.atomic():
                                yield
                        else:
                            yield
                    finally:
                        if write and not durable:
                            self._db.execute_sql("PRAGMA synchronous = FULL")
            except peewee.PeeweeException as exc:
                raise StoreError(f"state store {self.path}: {what} failed: {exc}") from exc


# --- opening --------------------------------------------------------------------------------


def _enable_wal(db: peewee.SqliteDatabase, path: Path) -> None:
    mode = db.pragma("journal_mode", "wal")
    if str(mode).lower() != "wal":
        raise StoreError(
            f"state store {path}: SQLite refused WAL mode (got {mode!r}); state.dir must be on a"
            " local filesystem"
        )


def _migrate(db: peewee.SqliteDatabase, path: Path) -> None:
    """Runs before WAL is switched on, so a file from a newer swapguard is refused untouched."""
    with db.atomic():  # BEGIN IMMEDIATE: all steps and the new version commit together
        version = _stored_version(db, path)
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"state store {path} has schema version {version}, newer than this swapguard knows"
                f" ({SCHEMA_VERSION}); upgrade swapguard or point state.dir elsewhere"
            )
        if version == 0 and db.get_tables():
            raise StoreError(f"{path} is a SQLite file but not a swapguard state store")
        for number in range(version + 1, SCHEMA_VERSION + 1):
            try:
                MIGRATIONS[number - 1](db)
            except peewee.PeeweeException as exc:
                raise StoreError(
                    f"state store {path}: migration to v{number} failed: {exc}"
                ) from exc
        if version != SCHEMA_VERSION:
            db.execute_sql(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
    if version != SCHEMA_VERSION:
        logger.info("state store %s migrated from v%d to v%d", path, version, SCHEMA_VERSION)


def _stored_version(db: peewee.SqliteDatabase, path: Path) -> int:
    """0 for a new file; the meta table's schema_version otherwise."""
    if "meta" not in db.get_tables():
        return 0
    row = db.execute_sql("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    try:
        return int(row[0])
    except (TypeError, ValueError):
        raise StoreError(
            f"state store {path}: meta.schema_version is missing or bad: {row!r}"
        ) from None


# --- rows to records, values to JSON --------------------------------------------------------


def _newest_first(query: peewee.ModelSelect) -> peewee.ModelSelect:
    return query.order_by(_SwapRow.created_at.desc(), peewee.SQL("rowid").desc())


def _event(row: _EventRow) -> EventRecord:
    return EventRecord(row.id, row.at, row.kind, json.loads(row.detail), row.swap_id)


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
