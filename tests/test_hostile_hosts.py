"""Hostile new versions: whatever the host does on probation, the rollback starts on time and
ends exact.

Each case runs v1 (the well-behaved sample host) under a real swapguard, swaps in a v2 that does
one hostile thing (tests/hostile_host.py, or a sample host behaviour) and never confirms, and then
checks the contract's guarantee: the rollback starts no later than min(deadline, hard cap) + 1 s
(earlier when a crash or a lost heartbeat triggers it), and ends with the code tree and the
database exactly as before the swap, v1 running with SWAPGUARD_ROLLED_BACK, no other process in
the repo and no process of the new version's tree alive anywhere.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.core.instant import wall_of
from supervisor.errors import SwapguardError
from tests.support import Supervisor, make_sample_repo, rows, supervised, wait_for
from tests.test_swap_e2e import db_dump, new_version, tree_state

HOSTILE_HOST = Path(__file__).resolve().parent / "hostile_host.py"
ROLLBACK_START_SLACK_S = 1.0  # the contract: rollback begins by min(deadline, hard cap) + 1 s
WINDOW = "1500ms"  # every attack here is under way within a few hundred ms of the spawn
FLOOD_DATAGRAMS = 100_000
FLOODED_LATE_S = 0.35  # unflooded, the rollback begins within ~0.1 s of the deadline here


@dataclass(frozen=True)
class Case:
    """One hostile v2: what it does, why it must be rolled back, what its probation data is."""

    behaviour: str
    reason: str = "deadline"
    kept: str = "migrated"  # the kept probation copy: migrated | untouched | absent | garbage
    attacks: bool = True  # reports "done" in data/hostile.log once its attack is under way
    processes: int = 1  # processes it records ("pid" lines) before the rollback
    # how late the rollback may begin: the contract's 1 s, but input must not eat that budget
    max_late: float = ROLLBACK_START_SLACK_S
    host: dict[str, Any] = field(default_factory=dict)
    deadman: dict[str, Any] = field(default_factory=dict)
    app: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    @property
    def id(self) -> str:
        return self.name or self.behaviour


# Slow (scripts/test --slow): the cases whose trigger and exact end state the default run checks
# already, in test_swap_e2e.py::test_each_trigger_rolls_back_exactly (crash_loop, not_ready and
# heartbeat_lost) or here (corrupt_db for a version that destroys the database, EXTENSION_FLOOD
# for a notify flood still on when the rollback is due).
CASES = [
    pytest.param(
        Case("crash", reason="crash_loop", attacks=False, processes=0), marks=pytest.mark.slow
    ),
    pytest.param(Case("hang", attacks=False, processes=0), marks=pytest.mark.slow),
    Case("exit0_now", reason="crash_loop", kept="untouched", attacks=False),
    pytest.param(
        Case(
            "stop_heartbeats",
            reason="heartbeat_lost",
            host={"heartbeat_timeout": "1s"},
            deadman={"window": "3s"},  # room for the heartbeat to be missed first
        ),
        marks=pytest.mark.slow,
    ),
    Case("ignore_term"),
    Case("escape", processes=5),
    # the flood is still on when the deadline passes ...
    pytest.param(
        Case("flood_notify", app={"flood": FLOOD_DATAGRAMS}, max_late=FLOODED_LATE_S),
        marks=pytest.mark.slow,
    ),
    # ... or all of it arrives before (about 15k datagrams a second here)
    pytest.param(
        Case(
            "flood_notify",
            name="flood_notify_all",
            app={"flood": FLOOD_DATAGRAMS},
            deadman={"window": "15s", "hard_cap": "30s"},
            max_late=FLOODED_LATE_S,
        ),
        marks=pytest.mark.slow,
    ),
    Case("flood_control", app={"threads": 50, "idle": 20, "report_at": 100}),
    pytest.param(Case("delete_db", kept="absent"), marks=pytest.mark.slow),
    Case("corrupt_db", kept="garbage"),
    Case("hold_lock"),
    # 16 MiB of WAL is ~2000 synced commits: on a loaded disk that outlasts WINDOW
    Case("grow_wal", app={"wal_bytes": 16 * 1024 * 1024}, deadman={"window": "3s"}),
]


# every datagram a valid extension: the hard cap holds all the same (its own tests, below)
EXTENSION_FLOOD = Case(
    "flood_notify",
    name="flood_extend",
    app={"flood": FLOOD_DATAGRAMS, "extend": True, "workers": 8},
    deadman={"hard_cap": "3s"},
    max_late=FLOODED_LATE_S,
)


def _case_id(case: Any) -> str:
    return case.id if isinstance(case, Case) else str(case)


def hostile_repo(root: Path) -> Path:
    """The sample repo with `run.py` (tests/hostile_host.py) as the host's entry point."""
    repo = make_sample_repo(root)
    shutil.copy(HOSTILE_HOST, repo / "run.py")  # untracked: part of every checkpoint all the same
    return repo


def hostile_log(repo: Path) -> list[tuple[str, str]]:
    path = repo / "data" / "hostile.log"
    if not path.exists():
        return []
    return [tuple(line.split(" ", 1)) for line in path.read_text().splitlines() if " " in line]


def swap_doc(sup: Supervisor, swap_id: str) -> dict[str, Any] | None:
    """The swap, or None while the control socket is too busy to answer (a flooded socket)."""
    try:
        return sup.client.swap(swap_id)
    except SwapguardError:
        return None


def repo_processes(sup: Supervisor) -> set[int]:
    """Live processes working in the repo (the host, and a git of swapguard's for a moment),
    swapguard itself aside."""
    assert sup.process is not None
    found = set()
    for proc in psutil.process_iter(["cwd", "status"]):
        if proc.info["cwd"] == str(sup.repo) and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.add(proc.pid)
    return found - {sup.process.pid}


def processes_of_swap(swap_id: str) -> list[str]:
    """Live processes started on probation of `swap_id` (each inherits SWAPGUARD_SWAP_ID)."""
    found = []
    for proc in psutil.process_iter(["status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if proc.environ().get("SWAPGUARD_SWAP_ID") == swap_id:
                found.append(f"{proc.pid} {' '.join(proc.cmdline())}")
        except psutil.Error:
            continue
    return found


def rollback_started_at(sup: Supervisor, doc: dict[str, Any]) -> float:
    """When the rollback of swap `doc` began, from the audit log. The swap document lists only
    its first 1000 events, which a host that extends in a loop can fill on its own."""
    for event in doc["events"]:
        if event["event"] == "swap.rollback_started":
            return wall_of(event["at"])
    cursor = 0
    while page := sup.client.events(after=cursor, limit=1000):
        for event in page:
            if event["event"] == "swap.rollback_started" and event["swap_id"] == doc["id"]:
                return wall_of(event["at"])
        cursor = page[-1]["id"]
    raise AssertionError(f"swap {doc['id']} has no swap.rollback_started event")


def rollback_lateness(sup: Supervisor, doc: dict[str, Any]) -> tuple[float, float]:
    """Seconds from activation to the rollback's start, and from min(deadline, hard cap) to it."""
    started = rollback_started_at(sup, doc)
    due = min(wall_of(doc["deadline_at"]), wall_of(doc["hard_cap_at"]))
    return started - wall_of(doc["activated_at"]), started - due


def assert_data_exact(db: Path, before: dict[str, list], swap_id: str) -> None:
    """The database holds exactly what it held before the swap, plus v1's restart row."""
    after = db_dump(db)
    assert sorted(after) == sorted(before), "tables differ from before the swap"
    for table, content in before.items():
        if table != "starts":
            assert after[table] == content, table
    assert after["starts"][:-1] == before["starts"]
    restart = after["starts"][-1]
    assert (restart[1], restart[3], restart[4]) == ("v1", None, swap_id)
    assert not db.with_name("app.db-journal").exists()
    wal = db.with_name("app.db-wal")
    assert not wal.exists() or wal.stat().st_size < 1024 * 1024, "the new version's WAL survived"


def assert_kept_copy(db: Path, case: Case, before: dict[str, list], swap_id: str) -> None:
    """Nothing the new version wrote is lost: it is kept beside the data."""
    kept = db.with_name(f"app.db.rolled-back-{swap_id}")
    if case.kept == "absent":
        assert not kept.exists()
    elif case.kept == "garbage":
        assert kept.exists() and kept.read_bytes()[:16] != b"SQLite format 3\x00"
    elif case.kept == "untouched":
        assert db_dump(kept) == before
    else:
        assert "migrated_v2" in db_dump(kept)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_hostile_new_version_is_rolled_back_on_time_and_exact(tmp_path: Path, case: Case) -> None:
    run_hostile_case(tmp_path, case)


def run_hostile_case(tmp_path: Path, case: Case) -> dict[str, Any]:
    """v1, then `case` as v2 on probation, then every check of the end state; returns the swap
    as it ended (with its first 1000 events)."""
    repo = hostile_repo(tmp_path / "repo")
    host = {
        "command": [sys.executable, "run.py"],
        "stop_timeout": "500ms",  # then SIGKILL: whoever ignores SIGTERM costs only this
        # The sample host ticks (and so notices SIGTERM) once a WATCHDOG_USEC/2, else once a
        # second: v1 then stops within 0.1 s. No heartbeat is required of anyone unless a case
        # sets heartbeat_timeout, which sets WATCHDOG_USEC itself.
        "env": {"WATCHDOG_USEC": "200000"},
        **case.host,
    }
    deadman = {"window": WINDOW, "hard_cap": "10s", "max_crashes": 2, **case.deadman}
    with supervised(repo, host=host, deadman=deadman) as sup:
        db = repo / "data" / "app.db"
        sup.start()
        wait_for(lambda: rows(db, "SELECT count(*) FROM starts")[0][0] >= 1, what="v1's first row")
        before_tree, before_db = tree_state(repo), db_dump(db)
        began = time.monotonic()
        swap_id = sup.client.prepare(f"hostile {case.behaviour}")["id"]
        new_version(repo, {"version": "v2", "behaviour": case.behaviour, **case.app})
        sup.client.activate(swap_id)
        if case.attacks:
            wait_for(
                lambda: any(what == "done" for what, _ in hostile_log(repo)),
                what=f"the {case.behaviour} attack to begin",
            )
        doc = wait_for(
            lambda: (d := swap_doc(sup, swap_id)) and d["state"] == "rolled_back" and d,
            timeout=40,
            what="the rollback to end",
        )
        took = time.monotonic() - began
        # on time
        assert doc["reason"] == case.reason
        since_activation, late = rollback_lateness(sup, doc)
        print(
            f"\n{case.id}: rollback ({case.reason}) began {since_activation:.2f}s after "
            f"activation, {late:+.2f}s against the deadline; swap to rolled back in {took:.2f}s"
        )
        assert late <= min(case.max_late, ROLLBACK_START_SLACK_S)
        if case.reason != "deadline":
            assert late < 0, "the earlier trigger should have rolled back before the deadline"
        # exact: code, data, the old version alone
        assert tree_state(repo) == before_tree
        running = sup.wait_host(ready=True)
        wait_for(
            lambda: (
                rows(db, "SELECT version, rolled_back FROM starts ORDER BY id DESC LIMIT 1")
                == [("v1", swap_id)]
            ),
            what="v1 back, told of it",
        )
        assert_data_exact(db, before_db, swap_id)
        assert_kept_copy(db, case, before_db, swap_id)
        assert processes_of_swap(swap_id) == []
        # swapguard's own git may still be tidying up in the repo (pruning): it soon ends
        wait_for(lambda: repo_processes(sup) == {running["pid"]}, what="v1 alone in the repo")
        recorded = [int(value) for what, value in hostile_log(repo) if what == "pid"]
        assert len(recorded) >= case.processes, recorded
        _check_aftermath(sup, case)
    return doc


def _check_aftermath(sup: Supervisor, case: Case) -> None:
    """What a case leaves to check beyond the common end state."""
    if case.behaviour == "flood_notify":
        metrics = sup.client.metrics()
        received = _metric(metrics, "swapguard_notify_datagrams_total")
        sent = sum(int(value) for what, value in hostile_log(sup.repo) if what == "sent")
        print(f"{case.id}: {sent} datagrams sent, {received} received")
        assert received >= sent
        # refused requests (extensions past the hard cap) are logged, but not once each
        refusals = sup.output().count("notify: cannot")
        print(f"{case.id}: {refusals} refused notify requests logged")
        assert refusals <= 5
        if case.app.get("extend"):  # each one accepted is a store write: far fewer get through
            extended = sup.events().count("swap.extended")
            print(f"{case.id}: {extended} extensions accepted, each one an event in the store")
            assert received >= 500
            return
        assert sent >= 1000
        if case.deadman:  # the deadline left time for all of it
            assert sent == case.app["flood"]
            took = float(next(value for what, value in hostile_log(sup.repo) if what == "flood_s"))
            print(f"{case.id}: the flood took {took:.1f}s, {sent / took:.0f} datagrams/s")
    if case.behaviour == "flood_control":
        answered = sum(int(value) for what, value in hostile_log(sup.repo) if what == "answered")
        print(f"flood_control: at least {answered} requests of the flood answered")
        # the socket answers at once again: nothing of the flood is left holding it
        started = time.monotonic()
        assert sup.status()["swap"] is None
        assert time.monotonic() - started < 2.0
    if case.behaviour == "grow_wal":
        grown = max(int(value) for what, value in hostile_log(sup.repo) if what == "done")
        print(f"grow_wal: the WAL reached {grown / 2**20:.1f} MiB on probation")
        assert grown >= case.app["wal_bytes"]


def _metric(text: str, name: str) -> int:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    raise AssertionError(f"no metric {name}")


@pytest.fixture(scope="module")
def extension_flood(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run of EXTENSION_FLOOD (with all its checks) for the tests below to share."""
    return run_hostile_case(tmp_path_factory.mktemp("extension_flood"), EXTENSION_FLOOD)


def test_an_extension_flood_is_held_to_the_hard_cap(extension_flood: dict[str, Any]) -> None:
    assert extension_flood["reason"] == "deadline"
    assert extension_flood["deadline_at"] == extension_flood["hard_cap_at"]  # extended to it


def test_an_extension_flood_does_not_flood_the_audit_log(extension_flood: dict[str, Any]) -> None:
    kinds = [event["event"] for event in extension_flood["events"]]
    assert kinds.count("swap.extended") <= 10
    assert "swap.rolled_back" in kinds
