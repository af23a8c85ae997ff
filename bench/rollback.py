"""Swaps that are never confirmed: deadline lateness, rollback time, activation downtime, snapshots.

Each swap is the real thing: prepare (checkpoint the code), write a new version into the git tree,
activate (stop the host, snapshot the SQLite [[data]] entry, spawn), then let the short deadman
window run out. Every number comes from swapguard's own audit log (event `at`, millisecond
precision) and the swap document's `deadline_at`:
- lateness: deadline_at -> `swap.rollback_started` (at rest, and with CPU hogs and a disk writer)
- rollback: deadline_at -> `swap.rolled_back` (the old version spawned again)
- activation downtime: `host.stopped` -> `host.started` after `swap.activated`
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.peers import (
    BenchError,
    Swapguard,
    SwapguardSetup,
    make_repo,
    running_swapguard,
    wait_until,
)
from bench.report import percentile, ratio
from bench.stress import stressed
from supervisor.data.snapshot import SnapshotStore

WINDOW = "1s"
ROW_BYTES = 4000  # one row per 4 KiB page: no overflow pages, size ~ rows * page size
SWAP_TIMEOUT_S = 180.0  # a 1 GiB activation snapshot (copy, integrity check, hash) fits easily


def make_database(path: Path, mib: int) -> int:
    """A WAL-mode SQLite file of about `mib` MiB of random rows; returns its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = max(1, mib * 2**20 // 4096)
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA page_size=4096")
        con.execute("PRAGMA journal_mode=OFF")  # built fast; switched to WAL below
        con.execute("PRAGMA synchronous=OFF")
        con.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        con.execute("BEGIN")
        done = 0
        while done < rows:
            batch = min(65536, rows - done)
            con.execute(
                "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < ?) "
                "INSERT INTO rows (body) SELECT randomblob(?) FROM n",
                (batch, ROW_BYTES),
            )
            done += batch
        con.execute("COMMIT")
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()
    return path.stat().st_size


def read_through(path: Path) -> None:
    """Read a file whole, as a host working on its database has: it is in the page cache at the
    activation, as it is for the plain copy the downtime is compared with. (The bench's host is
    `sleep`, which reads nothing: a take copies the snapshot into the pages it gives up, so after
    a rollback the database would be out of the cache, unlike a real host's.)"""
    with open(path, "rb", buffering=0) as handle:
        while handle.read(8 << 20):
            pass


@dataclass(frozen=True, slots=True)
class SwapTiming:
    lateness_ms: float  # deadline -> rollback started
    rollback_s: float  # deadline -> old version spawned
    activation_downtime_s: float  # old host stopped -> new host spawned


def _moment(stamp: str | None, what: str) -> float:
    if not stamp:
        raise BenchError(f"swapguard gave no {what}")
    return datetime.fromisoformat(stamp).timestamp()


def event_at(events: Iterable[Mapping[str, Any]], kind: str, after: float = -1.0) -> float:
    for event in events:
        at = _moment(event["at"], f"time of {event['event']}")
        if event["event"] == kind and at >= after:
            return at
    raise BenchError(f"no {kind} event in swapguard's log")


def swap_timing(swap: Mapping[str, Any], log: Sequence[Mapping[str, Any]]) -> SwapTiming:
    """Pure: the three figures of one rolled-back swap, from its document and the global log."""
    deadline = _moment(swap.get("deadline_at"), f"deadline_at for swap {swap.get('id')}")
    own = swap.get("events") or []
    started = event_at(own, "swap.rollback_started")
    rolled_back = event_at(own, "swap.rolled_back")
    ordered = sorted(log, key=lambda event: event["id"])
    activation = [event for event in ordered if event.get("swap_id") in (None, swap["id"])]
    activated = next((i for i, e in enumerate(activation) if e["event"] == "swap.activated"), None)
    if activated is None:
        raise BenchError(f"no swap.activated event for swap {swap['id']}")
    after = activation[activated:]
    stop_index = next((i for i, e in enumerate(after) if e["event"] == "host.stopped"), None)
    if stop_index is None:
        raise BenchError(f"the old host of swap {swap['id']} never stopped")
    stopped = _moment(after[stop_index]["at"], "host.stopped")
    spawned = event_at(after[stop_index:], "host.started")
    return SwapTiming((started - deadline) * 1000, rolled_back - deadline, spawned - stopped)


def _events_since(guard: Swapguard, after: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    while page := guard.client.events(after=after, limit=500):
        found += page
        after = page[-1]["id"]
    return found


class SwapRunner:
    """Activated swaps left to the deadman on one swapguard, one at a time, each timed."""

    def __init__(self, guard: Swapguard, repo: Path) -> None:
        self.guard, self.repo = guard, repo
        self.cursor = max((event["id"] for event in _events_since(guard, 0)), default=0)
        self.count = 0

    def one(self) -> SwapTiming:
        os.sync()  # no writeback left over from earlier work (a big snapshot) skews this swap
        for path in self.guard.setup.data:
            read_through(path)
        self.count += 1
        client = self.guard.client
        swap_id = client.prepare(f"bench swap {self.count}")["id"]
        (self.repo / "version.txt").write_text(f"version {self.count + 1}\n")
        client.activate(swap_id)

        def finished() -> dict[str, Any] | None:
            # The record is saved before its events are appended, and GET /v1/swaps/{id} reads
            # the store off the loop: a terminal state can show before its event does.
            doc = client.swap(swap_id)
            if doc["state"] == "rolled_back":
                done = any(e["event"] == "swap.rolled_back" for e in doc.get("events") or ())
                return doc if done else None
            return doc if doc["state"] in ("confirmed", "failed") else None

        doc = wait_until(finished, SWAP_TIMEOUT_S, f"swap {swap_id} to roll back", 0.05)
        if doc["state"] != "rolled_back" or doc.get("reason") != "deadline":
            raise BenchError(
                f"swap {swap_id} ended {doc['state']} (reason {doc.get('reason')}), "
                "not rolled back at its deadline"
            )
        self.guard.wait_host_ready()
        log = _events_since(self.guard, self.cursor)
        self.cursor = max((event["id"] for event in log), default=self.cursor)
        return swap_timing(doc, log)


def swap_instance(folder: Path, mib: int) -> tuple[SwapguardSetup, Path]:
    """A git repo whose host is `sleep`, with a WAL-mode SQLite database of `mib` MiB as data."""
    repo = make_repo(folder / "repo", {"version.txt": "version 1\n"})
    database = repo / "data" / "app.db"
    make_database(database, mib)
    host = {"command": ["sleep", "100000"], "ready": "started", "min_uptime": "0.1s"}
    setup = SwapguardSetup(repo=repo, host=host, deadman={"window": WINDOW}, data=(database,))
    return setup, database


@dataclass(frozen=True, slots=True)
class CopyTimes:
    copy_s: float  # plain shutil.copyfile: lands in the page cache
    copy_fsync_s: float  # the same copy made durable (fsync): a snapshot across file systems
    take_s: float  # SnapshotStore.take: checkpoint, original linked aside, copy for the host


def copy_and_snapshot_s(database: Path, folder: Path, rounds: int = 2) -> CopyTimes:
    """Best of `rounds` plain copies and SnapshotStore.take of the same database, alternating,
    each from a warm page cache and a settled disk (sync before each)."""
    copies, durable, takes = [], [], []
    store_root = folder / "snapshots"
    for number in range(rounds):
        copy = folder / "plain-copy.db"
        os.sync()
        started = time.perf_counter()
        shutil.copyfile(database, copy)
        copies.append(time.perf_counter() - started)
        descriptor = os.open(copy, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        durable.append(time.perf_counter() - started)
        copy.unlink()
        store = SnapshotStore(store_root)
        os.sync()
        started = time.perf_counter()
        store.take(f"bench-snapshot-{number}", [(database, "sqlite")])
        takes.append(time.perf_counter() - started)
        shutil.rmtree(store_root)
    os.sync()
    return CopyTimes(min(copies), min(durable), min(takes))


@dataclass(frozen=True, slots=True)
class SwapPlan:
    small_mib: int
    large_mib: int
    small_swaps: int
    large_swaps: int
    stressed_swaps: int  # small swaps with two CPU hogs and a disk writer beside swapguard


def swap_sections(folder: Path, plan: SwapPlan, tag: str) -> dict[str, dict[str, float | None]]:
    """deadline_lateness_ms, rollback_s, activation_downtime_s and snapshot, from one run.
    Small and large swaps alternate, so a change in the machine's load hits both alike; then
    small swaps again with two CPU hogs and a disk writer beside swapguard (stressed lateness)."""
    small_setup, _ = swap_instance(folder / "small", plan.small_mib)
    large_setup, database = swap_instance(folder / "large", plan.large_mib)
    size_mib = database.stat().st_size / 2**20
    times = copy_and_snapshot_s(database, folder / "large")
    small: list[SwapTiming] = []
    large: list[SwapTiming] = []
    with (
        running_swapguard(folder / "small" / "sg", small_setup, tag) as small_guard,
        running_swapguard(folder / "large" / "sg", large_setup, tag) as large_guard,
    ):
        small_runner = SwapRunner(small_guard, small_setup.repo)
        large_runner = SwapRunner(large_guard, large_setup.repo)
        for number in range(max(plan.small_swaps, plan.large_swaps)):
            if number < plan.large_swaps:
                large.append(large_runner.one())
            if number < plan.small_swaps:
                small.append(small_runner.one())
        with stressed(folder / "stress", tag):
            loaded = [small_runner.one() for _ in range(plan.stressed_swaps)]
    lateness = [t.lateness_ms for t in small + large]
    stressed_p99 = percentile([t.lateness_ms for t in loaded], 99) if loaded else None
    small_rollback = percentile([t.rollback_s for t in small], 50)
    large_rollback = percentile([t.rollback_s for t in large], 50)
    return {
        "deadline_lateness_ms": {
            "p50": percentile(lateness, 50),
            "p99": percentile(lateness, 99),
            "stressed_p99": stressed_p99,
        },
        "rollback_s": {
            "small": small_rollback,
            "large": large_rollback,
            "copy_large": times.copy_s,
            "growth": ratio(large_rollback, small_rollback),
        },
        "activation_downtime_s": {
            "small": percentile([t.activation_downtime_s for t in small], 50),
            "large": percentile([t.activation_downtime_s for t in large], 50),
            "copy_large": times.copy_s,
        },
        "snapshot": {
            "mib_s": size_mib / times.take_s,
            "copy_mib_s": size_mib / times.copy_s,
            "ratio": ratio(times.copy_s, times.take_s),
            "copy_fsync_mib_s": size_mib / times.copy_fsync_s,
        },
    }
