"""The state store's schema history: the steps that take any file a swapguard ever wrote to the
tables `supervisor.state.models` describes.

Why it looks like this:
- A file's version is its `PRAGMA user_version`, the number of steps applied. Files written before
  v3 kept it in a `meta` table instead (user_version 0); v3 moved it.
- A step is a function of a playhouse.migrate `SqliteMigrator`. `upgrade` runs the missing ones in
  order inside the store's opening transaction (BEGIN IMMEDIATE), the new user_version with them:
  a crash leaves the file at its old version, whole.
- Tables come from frozen copies of the models as each step shipped them, never from today's
  models, so history does not move when the models do. A new file replays every step: a fresh
  file and a migrated one have the same tables, columns and indexes.
- Append only: never edit a released step.
- The store imports this module only for a file that needs a step: a daemon restarting on an
  up-to-date store never loads playhouse.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import peewee
from playhouse.migrate import SqliteMigrator  # type: ignore[import-untyped]  # no stubs
from playhouse.sqlite_ext import AutoIncrementField  # type: ignore[import-untyped]

from supervisor.state.lock import StoreError
from supervisor.state.models import SCHEMA_VERSION

# --- frozen models: each table as the step that created it shipped it --------------------------


class _MetaV1(peewee.Model):
    """Where versions 1 and 2 kept the schema version ('schema_version', as text)."""

    key = peewee.TextField(primary_key=True)
    value = peewee.TextField()

    class Meta:
        table_name = "meta"


class _HostRunV1(peewee.Model):
    id = AutoIncrementField()
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


class _EventV1(peewee.Model):
    id = AutoIncrementField()  # AUTOINCREMENT: an id is never reused once its event is trimmed
    at = peewee.FloatField()
    kind = peewee.TextField()
    detail = peewee.TextField()
    swap_id = peewee.TextField(null=True)

    class Meta:
        table_name = "event"


class _SwapV1(peewee.Model):
    id = peewee.TextField(primary_key=True)
    state = peewee.TextField()
    created_at = peewee.FloatField()
    updated_at = peewee.FloatField()
    record = peewee.TextField()

    class Meta:
        table_name = "swap"


class _ValueV2(peewee.Model):
    key = peewee.TextField(primary_key=True)
    value = peewee.TextField()
    updated_at = peewee.FloatField()

    class Meta:
        table_name = "kv"


# --- the steps ---------------------------------------------------------------------------------


def _create_tables(db: peewee.Database, *models: type[peewee.Model]) -> None:
    """CREATE TABLE, never IF NOT EXISTS: a table already there means the file is not what its
    version says, and the step must fail."""
    for model in models:
        peewee.SchemaManager(model, db).create_table(safe=False)


def _v1_runs_events_swaps(migrator: SqliteMigrator) -> None:
    """0.1: host runs, the audit log and swap records, newest first by created_at."""
    _create_tables(migrator.database, _MetaV1, _HostRunV1, _EventV1, _SwapV1)
    migrator.migrate(migrator.add_index("swap", ("created_at",), name="swap_created_at"))


def _v2_values_and_lookups(migrator: SqliteMigrator) -> None:
    """0.1: small named values; a swap's events and the swap in flight found by index."""
    _create_tables(migrator.database, _ValueV2)
    migrator.migrate(
        migrator.add_index("event", ("swap_id", "id"), name="event_swap_id"),
        migrator.add_index("swap", ("state",), name="swap_state"),
    )


def _v3_version_in_user_version(migrator: SqliteMigrator) -> None:
    """The version moves to PRAGMA user_version (`upgrade` sets it). `meta` keeps one row,
    schema_version 3, never read again: a swapguard from before v3 reads it and refuses the file
    as newer than it knows, instead of calling it a foreign file."""
    tombstone = _MetaV1.insert(key="schema_version", value="3")
    tombstone.on_conflict(conflict_target=[_MetaV1.key], preserve=[_MetaV1.value]).execute(
        migrator.database
    )


def _v4_exit_reasons(migrator: SqliteMigrator) -> None:
    """Each host run keeps why it ended (stop, heartbeat_lost, unhealthy, crash, ...)."""
    migrator.migrate(
        migrator.add_column("host_run", "exit_reason", peewee.TextField(null=True))
    )


def _v5_start_since_boot(migrator: SqliteMigrator) -> None:
    """Each host run keeps its process's start in seconds since boot: adoption by boot id and
    that start survives a wall-clock step. Older runs keep NULL and are adopted as before."""
    migrator.migrate(
        migrator.add_column("host_run", "start_uptime", peewee.FloatField(null=True))
    )


STEPS: tuple[Callable[[SqliteMigrator], None], ...] = (
    _v1_runs_events_swaps,
    _v2_values_and_lookups,
    _v3_version_in_user_version,
    _v4_exit_reasons,
    _v5_start_since_boot,
)
"""Step n (from 1) takes a file from version n - 1 to n; there are SCHEMA_VERSION of them."""

_LEGACY_VERSIONS = (1, 2)  # kept in meta.schema_version, user_version 0


# --- running them ------------------------------------------------------------------------------


def upgrade(db: peewee.SqliteDatabase, user_version: int, path: Path) -> int:
    """Bring the file to SCHEMA_VERSION inside the caller's transaction; returns the version it
    was at. `user_version` is the file's, below SCHEMA_VERSION: 0 for a new file or one from
    before v3."""
    version = user_version or _version_before_v3(db, path)
    migrator = SqliteMigrator(db)
    for number in range(version + 1, SCHEMA_VERSION + 1):
        try:
            STEPS[number - 1](migrator)
        except peewee.PeeweeException as exc:
            raise StoreError(f"state store {path}: migration to v{number} failed: {exc}") from exc
    db.pragma("user_version", SCHEMA_VERSION)
    return version


def _version_before_v3(db: peewee.SqliteDatabase, path: Path) -> int:
    """0 for an empty file; meta's schema_version for a store from before v3."""
    tables = db.get_tables()
    if not tables:
        return 0
    if "meta" not in tables:
        raise StoreError(f"{path} is a SQLite file but not a swapguard state store")
    query = _MetaV1.select(_MetaV1.value).where(_MetaV1.key == "schema_version")
    value = query.scalar(db)
    if value not in {str(version) for version in _LEGACY_VERSIONS}:
        raise StoreError(
            f"state store {path}: PRAGMA user_version is 0 and meta.schema_version is {value!r};"
            f" a store from before v3 has {' or '.join(map(str, _LEGACY_VERSIONS))} there"
        )
    return int(value)
