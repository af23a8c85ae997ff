"""How swapguard's cost grows with the code tree: 1k, 10k, 100k files.

For each size, one git repo of small files (100 a folder) and one swapguard on it:
- prepare: POST /v1/swaps round trip (the checkpoint), against git's own floor on the same tree,
  which is the checkpoint's core: copy the index, `git add -A` into that temporary index,
  `git write-tree` (best of three each, interleaved, once swapguard is quiet after start-up);
- rollback of a swap that touched 1% of the files: `swap.rollback_started` -> `swap.rolled_back`
  (old host spawned) in swapguard's audit log, after an explicit rollback;
- the drift watcher at rest: swapguard's RSS at every size, its CPU over a window at the largest,
  and how long it stayed busy after start-up and after the restore before it was quiet; and the
  CPU it spends while every file is read once, nothing written (at the largest size).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.measure import cpu_ns_by_thread, cpu_seconds_between, idle_cost
from bench.peers import (
    GIT_IDENTITY,
    BenchError,
    Swapguard,
    SwapguardSetup,
    git,
    progress,
    running_swapguard,
    wait_until,
)
from bench.report import ratio
from bench.rollback import event_at

FILES_PER_FOLDER = 100
PREPARES = 3
QUIET_WINDOW_S = 0.5
QUIET_CPU_S = 0.005  # under 1% of a core over the window
QUIET_LIMIT_S = 120.0
SWAP_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class TreePlan:
    files: tuple[int, ...]
    idle_s: float  # the watcher's idle window at the largest size


def _path(number: int) -> str:
    return f"d{number // FILES_PER_FOLDER:05d}/f{number % FILES_PER_FOLDER:02d}.txt"


def make_tree(root: Path, files: int) -> Path:
    """A git repo of `files` small files in one commit; the host is `sleep`."""
    root.mkdir(parents=True, exist_ok=True)
    for number in range(files):
        path = root / _path(number)
        if number % FILES_PER_FOLDER == 0:
            path.parent.mkdir()
        path.write_text(f"file {number}\n")
    (root / ".gitignore").write_text("data/\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", f"{files} files")
    return root


def git_floor_s(repo: Path, scratch: Path) -> float:
    """Copy the index, `git add -A` into the copy, `git write-tree`: the checkpoint's core."""
    scratch.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **GIT_IDENTITY, "GIT_INDEX_FILE": str(scratch / "index")}
    started = time.perf_counter()
    shutil.copy2(repo / ".git" / "index", scratch / "index")
    for args in (["add", "-A", "--", "."], ["write-tree"]):
        done = subprocess.run(
            ["git", "-C", str(repo), *args], env=env, capture_output=True, check=False
        )
        if done.returncode != 0:
            raise BenchError(f"git {args[0]} in {repo} failed: {done.stderr.decode()[-200:]}")
    elapsed = time.perf_counter() - started
    (scratch / "index").unlink()
    return elapsed


def _settled(guard: Swapguard, swap_id: str, states: tuple[str, ...]) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        doc = guard.client.swap(swap_id)
        if doc["state"] in states:
            return doc
        if doc["state"] in ("failed", "aborted", "rolled_back", "confirmed"):
            raise BenchError(f"swap {swap_id} ended {doc['state']} ({doc.get('reason')})")
        return None

    return wait_until(done, SWAP_TIMEOUT_S, f"swap {swap_id} to be {'/'.join(states)}", 0.02)


def prepare_s(guard: Swapguard, repo: Path, scratch: Path) -> tuple[tuple[float, float], str]:
    """Best of three prepares (the first two aborted) and of three runs of git's floor,
    interleaved, so both meet the index in the same state (entries written in the index's own
    second are "racily clean" and hashed again): ((prepare s, floor s), the swap kept)."""
    prepare, floor, swap_id = float("inf"), float("inf"), ""
    for attempt in range(PREPARES):
        floor = min(floor, git_floor_s(repo, scratch))
        started = time.perf_counter()
        swap_id = guard.client.prepare(f"tree scale {attempt}")["id"]
        prepare = min(prepare, time.perf_counter() - started)
        if attempt < PREPARES - 1:
            guard.client.abort(swap_id)
            _settled(guard, swap_id, ("aborted",))
    return (prepare, floor), swap_id


def rollback_s(guard: Swapguard, repo: Path, swap_id: str, files: int) -> float:
    """Touch 1% of the files, activate, roll back: started -> old host spawned, in seconds."""
    for number in range(0, files, 100):
        (repo / _path(number)).write_text(f"file {number}, version 2\n")
    guard.client.activate(swap_id)
    _settled(guard, swap_id, ("probation",))
    guard.wait_host_ready(SWAP_TIMEOUT_S)
    guard.client.rollback(swap_id, "bench")

    def rolled_back() -> dict[str, Any] | None:
        doc = guard.client.swap(swap_id)
        if doc["state"] in ("failed", "confirmed"):
            raise BenchError(f"swap {swap_id} ended {doc['state']}, not rolled back")
        done = any(e["event"] == "swap.rolled_back" for e in doc.get("events") or ())
        return doc if doc["state"] == "rolled_back" and done else None

    doc = wait_until(rolled_back, SWAP_TIMEOUT_S, f"swap {swap_id} to roll back", 0.02)
    events = doc["events"]
    return event_at(events, "swap.rolled_back") - event_at(events, "swap.rollback_started")


def busy_for_s(pid: int, limit_s: float = QUIET_LIMIT_S) -> float:
    """Seconds until `pid` spends a whole QUIET_WINDOW_S under QUIET_CPU_S of CPU: how long
    it stays busy after start-up or a restore (at 100k files: > 15 s at 20-37 s/min of CPU in
    its threads after start-up, ~5 s after a restore). `limit_s` when it never quiets."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        before = cpu_ns_by_thread(pid)
        time.sleep(QUIET_WINDOW_S)  # the window measured, not a wait for a condition
        if cpu_seconds_between(before, cpu_ns_by_thread(pid)) < QUIET_CPU_S:
            return max(0.0, time.monotonic() - started - QUIET_WINDOW_S)
    return limit_s


def read_pass_cpu_s(pid: int, repo: Path, files: int) -> float:
    """CPU seconds `pid` spends while every file of the tree is read once, nothing written (what
    a host loading its code, an editor or a `git status` does). Ideally 0: a read changes no
    code. Counted until it is quiet again."""
    before = cpu_ns_by_thread(pid)
    for number in range(files):
        with open(repo / _path(number), "rb") as source:
            source.read()
    busy_for_s(pid)
    return cpu_seconds_between(before, cpu_ns_by_thread(pid))


def tree_scale(folder: Path, plan: TreePlan, tag: str) -> dict[str, Any]:
    """prepare, git's floor, rollback and the watcher's footprint at each size. Each measurement
    starts once swapguard is quiet: how long it was busy after start-up and after the restore
    is reported too."""
    prepares, floors, rollbacks, rss, busy_start, busy_restore = [], [], [], [], [], []
    cpu = read_cpu = 0.0
    for files in plan.files:
        where = folder / f"{files}"
        started = time.monotonic()
        repo = make_tree(where / "repo", files)
        progress(f"tree: {files} files made in {time.monotonic() - started:.1f} s")
        host = {"command": ["sleep", "100000"], "ready": "started", "min_uptime": "0.1s"}
        setup = SwapguardSetup(repo=repo, host=host, deadman={"window": "10m"})
        with running_swapguard(where / "sg", setup, tag) as guard:
            progress(f"tree: swapguard up at {time.monotonic() - started:.1f} s")
            busy_start.append(busy_for_s(guard.pid))
            seconds, swap_id = prepare_s(guard, repo, where / "scratch")
            prepares.append(seconds[0])
            floors.append(seconds[1])
            progress(f"tree: prepared at {time.monotonic() - started:.1f} s")
            rollbacks.append(rollback_s(guard, repo, swap_id, files))
            progress(f"tree: rolled back at {time.monotonic() - started:.1f} s")
            guard.wait_host_ready(SWAP_TIMEOUT_S)
            busy_restore.append(busy_for_s(guard.pid))
            if files == plan.files[-1]:
                read_cpu = read_pass_cpu_s(guard.pid, repo, files)
                cpu, last_rss = idle_cost({"swapguard": guard.pid}, plan.idle_s)["swapguard"]
                rss.append(last_rss)
            else:
                rss.append(idle_cost({"swapguard": guard.pid}, 0.1)["swapguard"][1])
        shutil.rmtree(where, ignore_errors=True)
    return {
        "files": list(plan.files),
        "prepare_s": prepares,
        "git_limit_s": floors,
        "rollback_s": rollbacks,
        "rss_mib": rss,
        "prepare_growth": ratio(prepares[-1], prepares[0]),
        "git_limit_growth": ratio(floors[-1], floors[0]),
        "rollback_growth": ratio(rollbacks[-1], rollbacks[0]),
        "watcher_cpu_s_per_min": cpu,
        "watcher_rss_mib": rss[-1],
        "watcher_read_pass_cpu_s": read_cpu,
        "busy_after_start_s": busy_start,
        "busy_after_restore_s": busy_restore,
    }
