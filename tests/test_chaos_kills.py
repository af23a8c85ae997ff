"""Chaos: swapguard killed (with the git it runs, as its service manager would) at random instants
of activation and rollback, restarted, killed again, and so on; every swap must still end exact,
with one host, and no lock of swapguard's left in the repo (issue 12, item 2).

Each swap gets a new version with a few hundred changed files, so that the code restore (where a
kill once left swapguard's own `.git/index.lock` behind) is long enough to be hit often. The
default run kills a handful of times; `scripts/test --slow` a hundred times in flight.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from supervisor.process.cgroup import CgroupLeaf
from tests.support import Supervisor, report_figure, supervised, wait_for
from tests.test_crash_points import CONFIG, _swap_in_store, assert_rolled_back_exactly
from tests.test_crash_points import repo as repo  # the fixture: sample host, build, dist/
from tests.test_swap_e2e import db_dump, new_version, tree_state

FAST_KILLS = 4
SLOW_KILLS = 100
MAX_KILLS_PER_SWAP = 6
WINDOW_S = 1.0
GENERATED = 300  # files the new version adds: a code restore long enough to be killed in
IN_FLIGHT = ("probation", "rolling_back")  # a kill that found the swap there counts


def kill_all_of_swapguard(sup: Supervisor) -> None:
    """SIGKILL to swapguard's process group: the daemon and any git it runs (not the host, which
    lives in a session of its own, as under a service manager's KillMode=mixed)."""
    assert sup.process is not None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sup.process.pid, signal.SIGKILL)
    sup.process.wait(30)


def git_locks(repo: Path) -> list[str]:
    """Every lock file in the repo's git dir (refs' too), and swapguard's lock journals."""
    git_dir = repo / ".git"
    found = [*git_dir.glob("*.lock"), *(git_dir / "refs").rglob("*.lock")]
    found += git_dir.glob("swapguard-locks-*")
    return sorted(str(path.relative_to(git_dir)) for path in found)


def assert_no_lock_left(sup: Supervisor, timeout: float) -> None:
    """No lock stays in the git dir; a failure names each one left, with its journal and the
    end of swapguard's log, so that it is explained."""
    deadline = time.monotonic() + timeout
    while (left := git_locks(sup.repo)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not left:
        return
    git_dir = sup.repo / ".git"
    detail = []
    for name in left:
        with contextlib.suppress(OSError):
            detail.append(f"{name}: {(git_dir / name).read_bytes()[:200]!r}")
    raise AssertionError(
        f"locks left in {git_dir} after {timeout}s: {left}\n" + "\n".join(detail)
        + "\n---- swapguard log ----\n" + sup.output()[-4000:]
    )


def chaos(sup: Supervisor, kills: int, rng: random.Random) -> tuple[Counter[str], int]:
    """Swaps, each killed at random instants until it is over (at most MAX_KILLS_PER_SWAP),
    until `kills` kills have found a swap in activation, probation or rollback; where each kill
    hit, and how many swaps it took."""
    hit: Counter[str] = Counter()
    repo, swaps = sup.repo, 0
    while sum(n for where, n in hit.items() if where.startswith(IN_FLIGHT)) < kills:
        swaps += 1
        before_tree, before_db = tree_state(repo), db_dump(repo / "data" / "app.db")
        swap_id = sup.client.prepare(f"chaos {swaps}")["id"]
        new_version(repo, {"version": "v2"})
        for index in range(GENERATED):
            (repo / "gen").mkdir(exist_ok=True)
            (repo / "gen" / f"{index:03}.py").write_text(f"N = {index}\n")
        sup.client.activate(swap_id)
        pace = WINDOW_S + 1.5  # the first kill anywhere in activation, probation, rollback
        for _ in range(MAX_KILLS_PER_SWAP):
            assert sup.process is not None
            # the pace of the attack, not a wait for a condition: a random instant from now
            with contextlib.suppress(subprocess.TimeoutExpired):
                sup.process.wait(rng.uniform(0.0, pace))
            kill_all_of_swapguard(sup)
            where = _swap_in_store(sup, swap_id).split(" ")[0]
            hit[where] += 1
            sup.start(wait_ready=False)
            if not where.startswith(IN_FLIGHT):
                break
            pace = 0.8  # then early in what the restarted daemon resumes
        # a kill just before the new version's spawn keeps its deadline (swaps.resume): it may
        # be rolled back before it ran long enough to migrate the data
        assert_rolled_back_exactly(
            sup, swap_id, "deadline", before_tree, before_db, new_version_ran=False
        )
        # a git of swapguard's may hold one for milliseconds (a prune); none may stay
        assert_no_lock_left(sup, 5.0)
        assert sup.status()["code"]["index_locked"] is None
        sup.wait_host(ready=True)
    return hit, swaps


def run_chaos(repo: Path, kills: int, seed: int) -> None:
    deadman = {"window": f"{WINDOW_S}s", "hard_cap": "60s", "max_crashes": 5}
    started = time.monotonic()
    with supervised(repo, deadman=deadman, code=CONFIG["code"]) as sup:
        sup.start()
        hit, swaps = chaos(sup, kills, random.Random(seed))
    in_flight = sum(n for where, n in hit.items() if where.startswith(IN_FLIGHT))
    report_figure(
        f"chaos: {sum(hit.values())} kills ({in_flight} with the swap in activation, probation "
        f"or rollback) over {swaps} swaps, {swaps} of {swaps} ended exact with one host, in "
        f"{time.monotonic() - started:.0f}s; kills by step: {dict(sorted(hit.items()))}"
    )


def test_kills_at_random_instants_of_activation_and_rollback(repo: Path) -> None:
    run_chaos(repo, FAST_KILLS, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_hundred_kills_at_random_instants(repo: Path) -> None:
    run_chaos(repo, SLOW_KILLS, seed=2)


@pytest.mark.skipif(os.geteuid() != 0, reason="moves a process into the host's cgroup leaf")
def test_a_host_spawned_but_never_recorded_is_killed_before_another_starts(repo: Path) -> None:
    """What a kill between spawning the host and recording it leaves: a live process in the
    host's cgroup leaf that no run records. The next swapguard must not start a second host."""
    with supervised(repo) as sup:
        sup.start()
        host_pid = sup.status()["host"]["pid"]
        leaf = CgroupLeaf.create(hashlib.sha256(str(sup.state).encode()).hexdigest()[:16])
        if leaf is None or host_pid not in leaf.pids():
            pytest.skip("no cgroup leaf for the host here")
        kill_all_of_swapguard(sup)
        os.kill(host_pid, signal.SIGKILL)  # the recorded run is gone ...
        wait_for(lambda: host_pid not in leaf.pids(), what="the recorded host to go")
        stray = subprocess.Popen(  # ... and an unrecorded one runs in the leaf
            ["sleep", "300"], start_new_session=True
        )
        (leaf.path / "cgroup.procs").write_text(str(stray.pid))  # into the host's leaf
        sup.start()
        assert stray.wait(timeout=10) == -signal.SIGKILL
        assert leaf.pids() == [sup.status()["host"]["pid"]]
        lost = [e for e in sup.client.events(after=0, limit=1000) if e["event"] == "host.lost"]
        assert len(lost) == 1 and "unrecorded process" in str(lost[0]), lost
