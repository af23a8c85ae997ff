"""The state store's tables as peewee models: the columns the store reads and writes today.

Why it looks like this:
- Unbound (no `Meta.database`): each `Store` owns one `SqliteDatabase` and runs every query on
  it (`query.execute(db)`), so two stores in one process share nothing and no model class is ever
  rebound (`bind_ctx` rebinds a class for every thread of the process at once).
- No table is created from these models: `supervisor.state.schema` builds every file step by
  step, and SCHEMA_VERSION names the step these models describe. A change here is a new step
  there.
- JSON lives in text columns (`detail`, `record`, `value`): the store writes it strictly (no NaN)
  and names what failed; the columns it queries by are real columns.
"""

from __future__ import annotations

import peewee

SCHEMA_VERSION = 5
"""The step of the schema history these models describe: the `PRAGMA user_version` of a file
that needs no migration."""


class HostRunRow(peewee.Model):
    """One spawn of the host; the newest one with no exit is the host to adopt, if its process
    still has the recorded start (`boot_id` + `start_uptime`; `create_time` before v5)."""

    id = peewee.AutoField()
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
    exit_reason = peewee.TextField(null=True)  # lifecycle.ExitReason: why it ended (v4)
    start_uptime = peewee.FloatField(null=True)  # its start in seconds since boot (v5)

    class Meta:
        table_name = "host_run"


class EventRow(peewee.Model):
    """One entry of the audit log. Ids come from AUTOINCREMENT: never reused after a trim."""

    id = peewee.AutoField()
    at = peewee.FloatField()
    kind = peewee.TextField()
    detail = peewee.TextField()
    swap_id = peewee.TextField(null=True)

    class Meta:
        table_name = "event"


class SwapRow(peewee.Model):
    """The swap machine's record, whole, beside the columns it is looked up by."""

    id = peewee.TextField(primary_key=True)
    state = peewee.TextField()
    created_at = peewee.FloatField()
    updated_at = peewee.FloatField()
    record = peewee.TextField()

    class Meta:
        table_name = "swap"


class ValueRow(peewee.Model):
    """A small named value (checkpoints, pending changes)."""

    key = peewee.TextField(primary_key=True)
    value = peewee.TextField()
    updated_at = peewee.FloatField()

    class Meta:
        table_name = "kv"
