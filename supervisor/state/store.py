"""The state store: host runs, the audit log, swap records and a few values, in `state.dir`.

Why it looks like this:
- Everything swapguard must remember across its own death lives here, never in anything the host
  can write. One SQLite file in WAL mode with `synchronous = FULL`; every logical write is one
  `db.atomic("IMMEDIATE")` transaction, so a crash leaves each row either old or new, never half.
- peewee, as the design card names it: the tables are models (`supervisor.state.models`), queries
  are built from them, upserts are `on_conflict`, and the schema history is playhouse.migrate steps
  keyed by `PRAGMA user_version` (`supervisor.state.schema`). Only this package imports peewee;
  callers get frozen dataclasses and plain dicts, never models.
- One `SqliteDatabase` per `Store`, pinned to one connection (`thread_safe=False`: not one per
  thread) and serialized by the store's own lock, so the loop and the API threads never run a
  statement inside each other's transaction, and two stores in one process share nothing. Every
  query runs on the store's database (`query.execute(db)`): the models are never bound.
- An older file is migrated in one transaction; a newer one is refused and left untouched.
- The folder itself (created 0700) and its `StateLock` (one swapguard per state dir) are in
  `supervisor.state.lock`; `StoreError`, `StateLock` and `prepare_state_dir` are re-exported here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peewee

from supervisor.clock import rfc3339
from supervisor.core.swaps import TERMINAL

# Re-exported: the state dir and its lock are the store's first step.
from supervisor.state.lock import LOCK_NAME as LOCK_NAME
from supervisor.state.lock import StateLock as StateLock
from supervisor.state.lock import StoreError, check_private_file, prepare_state_dir
from supervisor.state.models import SCHEMA_VERSION, EventRow, HostRunRow, SwapRow, ValueRow

logger = logging.getLogger(__name__)

DB_NAME = "state.db"
TERMINAL_SWAP_STATES = frozenset(state.value for state in TERMINAL)
"""Swaps in these states are finished. `failed` is not: it waits for the operator to retry."""
_TERMINAL = tuple(sorted(TERMINAL_SWAP_STATES))  # bound in this order: the same SQL every time

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
_DB_ERRORS = (peewee.PeeweeException, sqlite3.Error)
"""peewee wraps what its statements raise; a row fetched from a cursor can still raise sqlite3's."""

RESERVE_NAME = "reserve"
RESERVE_BYTES = 4 << 20
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
    """One spawn of the host; `pid` + `boot_id` + `start_uptime` identify it for adoption
    (`create_time`, on the wall clock, for a run recorded before v5 or without /proc)."""

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
    exit_reason: str | None = None
    start_uptime: float | None = None


@dataclass(frozen=True, slots=True)
class RunExit:
    """How a run ended, to be recorded (`record_exit`, or with the next spawn's record)."""

    run_id: int
    at: float
    code: int | None
    signal: int | None
    reason: str | None = None  # why, once the lifecycle machine decided it


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


# --- queries shared by several methods ------------------------------------------------------


def _newest_first(query: peewee.ModelSelect[SwapRow]) -> peewee.ModelSelect[SwapRow]:
    """By created_at, ties in insertion order (rowid: an upsert keeps it, see `_upsert_swap`)."""
    return query.order_by(SwapRow.created_at.desc(), peewee.SQL("rowid").desc())


def _finished_past(keep: int) -> peewee.ModelSelect[SwapRow]:
    """Ids of finished swaps, newest first, past the newest `keep` of them."""
    finished = SwapRow.select(SwapRow.id).where(SwapRow.state.in_(_TERMINAL))
    return _newest_first(finished).offset(_count("keep", keep, 0))


# --- the store ------------------------------------------------------------------------------


class Store:
    """The daemon's memory. Thread-safe; every method is one short transaction."""

    def __init__(self, db: peewee.SqliteDatabase, path: Path) -> None:
        self._db = db
        self._lock = threading.Lock()
        self.path = path

    @classmethod
    def open(cls, state_dir: Path, *, reserve: bool = True) -> Store:
        """Create the state dir if needed, open `state.db`, migrate it to SCHEMA_VERSION.
        `reserve=False`: the caller makes the reserve later (`keep_reserve`), e.g. once the host
        is started (a first start writes 4 MiB and fsyncs them)."""
        state_dir = Path(state_dir)
        prepare_state_dir(state_dir)
        path = state_dir / DB_NAME
        for name in (DB_NAME, *(DB_NAME + suffix for suffix in ("-wal", "-shm", "-journal"))):
            check_private_file(state_dir / name)  # SQLite follows symlinks; refuse them first
        db = peewee.SqliteDatabase(
            str(path),
            pragmas=_CONNECT_PRAGMAS,
            timeout=_BUSY_TIMEOUT_MS / 1000,
            thread_safe=False,  # one connection for every thread, serialized by Store._lock
            check_same_thread=False,  # sqlite3's own check would refuse the API threads
            autoconnect=False,  # a closed store says so instead of opening again
        )
        try:
            db.connect()
            _migrate(db, path)
            _enable_wal(db, path)
        except BaseException as exc:
            with suppress(*_DB_ERRORS):
                db.close()  # any transaction was rolled back on the way out
            if isinstance(exc, _DB_ERRORS):
                raise StoreError(f"cannot open state store {path}: {_first_failure(exc)}") from exc
            raise
        store = cls(db, path)
        if reserve:
            store.keep_reserve()
        return store

    def keep_reserve(self) -> None:
        """Make (or keep) the reserve a full disk gives back: once the store is ours and opened."""
        _keep_reserve(self.path.with_name(RESERVE_NAME))

    def close(self) -> None:
        """Idempotent. The last connection to go folds the WAL into the file."""
        with self._lock:
            try:
                self._db.close()
            except _DB_ERRORS as exc:
                raise StoreError(f"state store {self.path}: close failed: {exc}") from exc

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- host runs --------------------------------------------------------------------------

    def record_spawn(
        self,
        pid: int,
        create_time: float,
        boot_id: str,
        started_at: float,
        code_version: str | None,
        swap_id: str | None,
        *,
        start_uptime: float | None = None,
        previous: RunExit | None = None,
    ) -> int:
        """Remember a spawn before anything else can happen to it; returns the run id.

        `start_uptime`: the process's start in seconds since boot, None where unknown.
        `previous`: the exit of the run before it, recorded in the same transaction. A restart
        writes nothing between an exit and the next spawn, and one commit after it."""
        end = None if previous is None else (previous.run_id, _exit_update(previous))
        insert = HostRunRow.insert(
            pid=_count("pid", pid, 1),
            create_time=_finite("create_time", create_time),
            boot_id=_text("boot_id", boot_id),
            started_at=_finite("started_at", started_at),
            code_version=code_version,
            swap_id=swap_id,
            start_uptime=None if start_uptime is None else _finite("start_uptime", start_uptime),
        )
        with self._session("record spawn", write=True, durable=False) as db:
            if end is not None and not end[1].execute(db):  # never worth failing the spawn for
                logger.warning("record spawn: no host run %r to record the exit of", end[0])
            run_id: int = insert.execute(db)
            if run_id % _TRIM_EVERY == 0:  # a live run is never trimmed: adoption needs it
                past = (HostRunRow.id <= run_id - RUNS_KEPT) & HostRunRow.exited_at.is_null(False)
                HostRunRow.delete().where(past).execute(db)
            return run_id

    def record_ready(self, run_id: int, at: float) -> None:
        self._update_run(run_id, "record ready", ready_at=_finite("at", at))

    def record_exit(
        self,
        run_id: int,
        at: float,
        code: int | None,
        signal: int | None,
        reason: str | None = None,
    ) -> None:
        columns: dict[str, object] = {
            "exited_at": _finite("at", at), "exit_code": code, "exit_signal": signal
        }
        if reason is not None:
            columns["exit_reason"] = _text("reason", reason)
        self._update_run(run_id, "record exit", **columns)

    def record_exit_reason(self, run_id: int, reason: str) -> None:
        """Why the run ended, as the lifecycle machine decided it just after its exit."""
        self._update_run(run_id, "record exit reason", exit_reason=_text("reason", reason))

    def last_ended_run(self) -> HostRun | None:
        """The newest run with its exit recorded: how the host last ended, for the status."""
        query = HostRunRow.select().where(HostRunRow.exited_at.is_null(False))
        query = query.order_by(HostRunRow.id.desc()).dicts()
        with self._session("find the last ended run") as db:
            row = query.first(db)
        return HostRun(**row) if row else None

    def record_code_version(self, run_id: int, code_version: str) -> None:
        """The checkpoint of the code a run started on, once taken (after its spawn, at start)."""
        self._update_run(run_id, "record code version", code_version=_text("code", code_version))

    def live_run(self) -> HostRun | None:
        """The newest run with no exit recorded: the host to adopt after swapguard restarts."""
        query = HostRunRow.select().where(HostRunRow.exited_at.is_null())
        query = query.order_by(HostRunRow.id.desc()).dicts()
        with self._session("find live run") as db:
            row = query.first(db)
        return HostRun(**row) if row else None

    def _update_run(self, run_id: int, what: str, **columns: Any) -> None:
        update = HostRunRow.update(**columns).where(HostRunRow.id == run_id)
        with self._session(what, write=True, durable=False) as db:
            if not update.execute(db):
                raise StoreError(f"{what}: no host run with id {run_id!r}")  # rolled back

    # --- audit log --------------------------------------------------------------------------

    def append_event(
        self,
        kind: str,
        detail: Mapping[str, Any] | None = None,
        swap_id: str | None = None,
        at: float | None = None,
    ) -> EventRecord:
        with self._session("append event", write=True, durable=_durable(kind, swap_id)) as db:
            return _insert_event(db, kind, detail, swap_id, at)

    def append_events(
        self, events: Sequence[tuple[str, Mapping[str, Any] | None, str | None, float]]
    ) -> list[EventRecord]:
        """Several entries (kind, detail, swap id, at) in one transaction, in order; durable when
        any of them must be (one commit for what one turn of the loop reports)."""
        durable = any(_durable(kind, swap_id) for kind, _, swap_id, _ in events)
        with self._session("append events", write=True, durable=durable) as db:
            return [_insert_event(db, *event) for event in events]

    def events_after(
        self, after: int, limit: int = 500, swap_id: str | None = None, up_to: int | None = None
    ) -> list[EventRecord]:
        """Events with id > `after`, oldest first: `after` is a cursor that never repeats.
        `up_to`: none past this id (the runtime's published ones)."""
        where = EventRow.id > _count("after", after, 0)
        if up_to is not None:
            where = where & (EventRow.id <= up_to)
        if swap_id is not None:  # not `? IS NULL OR ...`: the event_swap_id index must serve it
            where = where & (EventRow.swap_id == swap_id)
        columns = (EventRow.id, EventRow.at, EventRow.kind, EventRow.detail, EventRow.swap_id)
        query = EventRow.select(*columns).where(where).order_by(EventRow.id)
        query = query.limit(_count("limit", limit, 1)).tuples()
        with self._session("read events") as db:
            rows = list(query.execute(db))
        return [_event(row) for row in rows]

    def newest_event_id(self) -> int:
        """The id of the newest event (0 before the first): where a new reader of the log starts."""
        with self._session("read events") as db:
            newest = EventRow.select(peewee.fn.MAX(EventRow.id)).scalar(db)
        return int(newest or 0)

    # --- swaps ------------------------------------------------------------------------------

    def save_swap_with_events(
        self,
        swap_id: str,
        state: str,
        created_at: float,
        record: Mapping[str, Any],
        events: Sequence[tuple[str, Mapping[str, Any]]],
        before: Sequence[tuple[str, Mapping[str, Any] | None, str | None, float]] = (),
    ) -> list[EventRecord]:
        """The swap machine's record, whole, and all the audit entries of its transition,
        committed together or not at all: a reader never sees a swap in a state whose event is
        missing. `before`: entries (as `append_events` takes them) that precede it in the log,
        in the same commit (one commit, not two; the entries alone were mostly not fsynced);
        returned first."""
        with self._session("save swap with events", write=True) as db:
            records = [_insert_event(db, *entry) for entry in before]
            _upsert_swap(db, swap_id, state, created_at, record)
            records += [_insert_event(db, kind, detail, swap_id, None) for kind, detail in events]
            return records

    def load_swap(self, swap_id: str) -> dict[str, Any] | None:
        query = SwapRow.select(SwapRow.record).where(SwapRow.id == swap_id)
        with self._session("load swap") as db:
            text = query.scalar(db)
        return json.loads(text) if text is not None else None

    def list_swaps(self, limit: int = 20) -> list[dict[str, Any]]:
        """Newest first, by created_at then insertion order."""
        query = _newest_first(SwapRow.select(SwapRow.record))
        query = query.limit(_count("limit", limit, 1)).tuples()
        with self._session("list swaps") as db:
            rows = list(query.execute(db))
        return [json.loads(record) for (record,) in rows]

    def active_swap(self) -> dict[str, Any] | None:
        """The swap in flight (any state but a terminal one), or None."""
        unfinished = SwapRow.select(SwapRow.id, SwapRow.record).where(
            SwapRow.state.not_in(_TERMINAL)
        )
        query = _newest_first(unfinished).limit(2).tuples()
        with self._session("find active swap") as db:
            rows = list(query.execute(db))
        if len(rows) > 1:
            logger.warning("more than one swap in flight: %s and %s", rows[0][0], rows[1][0])
        return json.loads(rows[0][1]) if rows else None

    def forget_finished_swaps_beyond(self, keep: int) -> int:
        """Delete the records of finished swaps other than the newest `keep` (their events stay
        until trimmed); returns how many went."""
        doomed = SwapRow.delete().where(SwapRow.id.in_(_finished_past(keep)))
        with self._session("forget finished swaps", write=True) as db:
            forgotten: int = doomed.execute(db)
            return forgotten

    def finished_swap_ids_beyond(self, keep: int) -> list[str]:
        """Finished swaps other than the newest `keep` of them (newest first): their snapshots
        may go. `failed` swaps are never listed: a retried rollback needs their snapshots."""
        query = _finished_past(keep).tuples()
        with self._session("list finished swaps") as db:
            return [swap_id for (swap_id,) in query.execute(db)]

    # --- small values -----------------------------------------------------------------------

    def get_value(self, key: str) -> Any | None:
        query = ValueRow.select(ValueRow.value).where(ValueRow.key == key)
        with self._session("read value") as db:
            text = query.scalar(db)
        return json.loads(text) if text is not None else None

    def set_value(self, key: str, value: Any) -> None:
        """Store any JSON value; None deletes the key (get_value answers None either way)."""
        _text("value key", key)
        change: peewee.ModelDelete | peewee.ModelInsert
        if value is None:
            change = ValueRow.delete().where(ValueRow.key == key)
        else:
            text = _dumps(value, f"value {key!r}")
            change = ValueRow.insert(key=key, value=text, updated_at=time.time()).on_conflict(
                conflict_target=[ValueRow.key], preserve=[ValueRow.value, ValueRow.updated_at]
            )
        with self._session("write value", write=True) as db:
            change.execute(db)

    # --- plumbing ---------------------------------------------------------------------------

    @contextmanager
    def _session(
        self, what: str, *, write: bool = False, durable: bool = True
    ) -> Iterator[peewee.SqliteDatabase]:
        """The database, to this thread alone (and in a transaction, for a write). A read must
        take all its rows before it leaves: a half-read SELECT would hold a read snapshot open on
        the shared connection (and pin the WAL) until its cursor is dropped.

        `durable=False` commits without an fsync (WAL, synchronous NORMAL): still atomic and
        safe against a crash of swapguard, only a power loss may drop it. For facts about the
        host process, which a power loss ends anyway, that keeps restarts fast."""
        with self._lock:
            db = self._db
            if db.is_closed():
                raise StoreError(f"state store {self.path} is closed ({what})")
            try:
                if not write:
                    yield db
                    return
                if not durable:
                    db.pragma("synchronous", "NORMAL")
                try:
                    # BEGIN IMMEDIATE takes the write lock up front (no deadlock on a read-to-write
                    # upgrade); anything raised inside, a failed COMMIT included, rolls it back.
                    with db.atomic("IMMEDIATE"):
                        yield db
                finally:
                    if not durable:
                        db.pragma("synchronous", "FULL")
            except _DB_ERRORS as exc:
                failure = _first_failure(exc)
                if write and "full" in str(failure).lower():
                    self._release_reserve()  # the caller's next try has room
                raise StoreError(f"state store {self.path}: {what} failed: {failure}") from exc

    def _release_reserve(self) -> None:
        reserve = self.path.with_name(RESERVE_NAME)
        with suppress(FileNotFoundError):
            reserve.unlink()
            logger.error(
                "the state store's file system is full: released its %d MiB reserve (%s); "
                "free space there", RESERVE_BYTES >> 20, reserve,
            )  # fmt: skip


def _keep_reserve(path: Path) -> None:
    """Hold `RESERVE_BYTES` of the state's file system (real blocks, not a hole), given back the
    moment a write finds it full: whoever filled it (a hostile new version), swapguard can still
    record the rollback. Where there is no room for it now, it is made at a later start."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        logger.warning("no state store reserve at %s: %s", path, exc)
        return
    try:
        size = os.fstat(fd).st_size
        if size >= RESERVE_BYTES:
            return  # held since an earlier start: no write, no fsync at start-up
        chunk = bytes(1 << 20)
        while size < RESERVE_BYTES:
            size += os.pwrite(fd, chunk[: RESERVE_BYTES - size], size)
        os.fsync(fd)
    except OSError as exc:
        logger.warning("no state store reserve at %s: %s", path, exc)
        with suppress(OSError):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _first_failure(exc: BaseException) -> BaseException:
    """The database error that started it. When SQLite has already rolled a transaction back on
    its own (disk full, I/O error), peewee's ROLLBACK fails as well ("no transaction is active")
    and would hide the reason."""
    while isinstance(exc.__context__, _DB_ERRORS):
        exc = exc.__context__
    return exc


# --- opening --------------------------------------------------------------------------------


def _migrate(db: peewee.SqliteDatabase, path: Path) -> None:
    """Runs before `_enable_wal` (which writes to a new file), so a file from a newer swapguard is
    refused untouched."""
    with db.atomic("IMMEDIATE"):  # every step and the new version commit together
        version = db.pragma("user_version")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"state store {path} has schema version {version}, newer than this swapguard knows"
                f" ({SCHEMA_VERSION}); upgrade swapguard or point state.dir elsewhere"
            )
        if version == SCHEMA_VERSION:
            return
        from supervisor.state import schema  # the history: loaded for a file that needs it

        was = schema.upgrade(db, version, path)
    if was:
        logger.info("state store %s migrated from v%d to v%d", path, was, SCHEMA_VERSION)
    else:
        logger.info("state store %s created (schema v%d)", path, SCHEMA_VERSION)


def _enable_wal(db: peewee.SqliteDatabase, path: Path) -> None:
    mode = db.pragma("journal_mode", "wal")
    if str(mode).lower() != "wal":
        raise StoreError(
            f"state store {path}: SQLite refused WAL mode (got {mode!r}); state.dir must be on a"
            " local filesystem"
        )


# --- writes shared by several transactions ----------------------------------------------------


def _insert_event(
    db: peewee.Database,
    kind: str,
    detail: Mapping[str, Any] | None,
    swap_id: str | None,
    at: float | None,
) -> EventRecord:
    when = time.time() if at is None else _finite("at", at)
    text = _dumps(_mapping(f"detail of event {kind!r}", detail or {}), f"detail of {kind!r}")
    insert = EventRow.insert(at=when, kind=_text("event kind", kind), detail=text, swap_id=swap_id)
    event_id: int = insert.execute(db)
    if event_id % _TRIM_EVERY == 0:
        EventRow.delete().where(EventRow.id <= event_id - EVENTS_KEPT).execute(db)
    return EventRecord(event_id, when, kind, json.loads(text), swap_id)


def _upsert_swap(
    db: peewee.Database,
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
    row = SwapRow.insert(
        id=swap_id,
        state=state,
        created_at=_finite("created_at", created_at),
        updated_at=time.time(),
        record=_dumps(record, f"record of swap {swap_id}"),
    )
    # DO UPDATE keeps the rowid (REPLACE would not), so ties keep their order.
    updated = [SwapRow.state, SwapRow.created_at, SwapRow.updated_at, SwapRow.record]
    row.on_conflict(conflict_target=[SwapRow.id], preserve=updated).execute(db)


# --- rows to records, values to JSON --------------------------------------------------------


def _durable(kind: str, swap_id: str | None) -> bool:
    """Swap events must survive a power loss; the host's own are as mortal as the host."""
    return swap_id is not None or not kind.startswith("host.")


def _exit_update(end: RunExit) -> peewee.ModelUpdate:
    columns: dict[str, object] = {
        "exited_at": _finite("at", end.at), "exit_code": end.code, "exit_signal": end.signal
    }
    if end.reason is not None:
        columns["exit_reason"] = _text("reason", end.reason)
    return HostRunRow.update(**columns).where(HostRunRow.id == end.run_id)


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
