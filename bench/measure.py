"""The restarted child and its stamps, notify throughput, status under load, idle cost.

Restart latency is measured from inside the child: one bash script, the same for every
restarter, appends a realtime stamp (`$EPOCHREALTIME`, a builtin: no fork) when it starts and
another just before it exits 1. The latency of a restart is the next child's start stamp minus the
previous child's exit stamp, so the child's own start cost counts the same for everyone and what
differs is the restarter: reaping, deciding, forking, exec.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.peers import (
    BenchError,
    SwapguardSetup,
    make_repo,
    running_swapguard,
    tagged_env,
    timed_calls_ms,
    wait_until,
)
from bench.report import percentile

CHILD_SCRIPT = """\
# The restarted child of the restart-latency bench: stamp the start, stamp the exit, fail.
echo "s ${EPOCHREALTIME/,/.}" >> "$1"
echo "e ${EPOCHREALTIME/,/.}" >> "$1"
exit 1
"""

BLASTER = """\
# The host of the heartbeat bench: READY=1, then `count` WATCHDOG=1 as fast as the socket takes
# them (a connected unix datagram socket blocks while the receiver's queue is full), then `rate`
# heartbeats a second until stopped. Standard library only; runs with -S.
import os, socket, sys, time

result, count, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
path = os.environ["NOTIFY_SOCKET"]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.connect("\\0" + path[1:] if path.startswith("@") else path)
sock.send(b"READY=1")
while not os.path.exists(result + ".go"):
    time.sleep(0.005)
beat = b"WATCHDOG=1"
started = time.time()
for _ in range(count):
    sock.send(beat)
ended = time.time()
with open(result + ".tmp", "w") as out:
    out.write(f"{started} {ended}\\n")
os.replace(result + ".tmp", result)
batch = max(1, rate // 100)
period, next_at = batch / rate, time.monotonic()
while True:
    for _ in range(batch):
        sock.send(beat)
    next_at += period
    time.sleep(max(0.0, next_at - time.monotonic()))
"""


# --- restart latency ---------------------------------------------------------------------------


def child_command(folder: Path, stamps: Path) -> list[str]:
    """argv of the stamping child; bash >= 5 is needed for $EPOCHREALTIME."""
    bash = shutil.which("bash")
    if bash is None:
        raise BenchError("bash is needed for the restart bench's child and was not found")
    script = folder / "child.sh"
    folder.mkdir(parents=True, exist_ok=True)
    script.write_text(CHILD_SCRIPT)
    return [bash, "--norc", "--noprofile", str(script), str(stamps)]


def restart_gaps_ms(stamps_text: str) -> list[float]:
    """Milliseconds from each child's exit stamp to the next child's start stamp."""
    gaps: list[float] = []
    exited: float | None = None
    for line in stamps_text.splitlines():
        kind, _, value = line.partition(" ")
        if not value.strip():
            raise BenchError(f"stamp line without a time ({line!r}): is bash older than 5.0?")
        stamp = float(value)
        if kind == "s" and exited is not None:
            gaps.append((stamp - exited) * 1000)
            exited = None
        elif kind == "e":
            exited = stamp
    return gaps


def _gaps_in(stamps: Path) -> list[float]:
    return restart_gaps_ms(stamps.read_text()) if stamps.exists() else []


def limit_gaps_ms(command: list[str], stamps: Path, exits: int, tag: str) -> list[float]:
    """The bare fork/exec loop: Popen, wait, again; `exits` gaps need exits + 1 children."""
    env = tagged_env(tag)
    for _ in range(exits + 1):
        subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        ).wait()
    gaps = _gaps_in(stamps)
    if len(gaps) < exits:
        raise BenchError(f"the fork/exec loop left {len(gaps)} restart stamps, not {exits}")
    return gaps[:exits]


# --- heartbeat and status under load ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeartbeatPlan:
    datagrams: int  # blasted as fast as possible, to measure what swapguard absorbs
    rate: int  # heartbeats a second afterwards, while the status latency is measured
    requests: int  # GET /v1/status requests timed


def heartbeat(folder: Path, plan: HeartbeatPlan, tag: str) -> dict[str, float]:
    """Datagrams a second absorbed, then GET /v1/status latency under `plan.rate` heartbeats/s."""
    repo = make_repo(folder / "repo", {"blaster.py": BLASTER})
    result = folder / "blast"
    host = {
        "command": [
            sys.executable,
            "-S",
            "blaster.py",
            str(result),
            str(plan.datagrams),
            str(plan.rate),
        ],
        "ready": "notify",
    }
    with running_swapguard(folder / "sg", SwapguardSetup(repo=repo, host=host), tag) as guard:
        total = "swapguard_notify_datagrams_total"
        before = guard.metric(total)
        cpu_before = cpu_ns_by_thread(guard.pid)
        Path(f"{result}.go").touch()
        wait_until(
            lambda: guard.metric(total) >= before + plan.datagrams,
            30 + plan.datagrams / 1000,
            f"swapguard to count {plan.datagrams} datagrams",
        )
        absorbed_at = time.time()
        # swapguard's own CPU per datagram: on a shared machine, steadier than the rate
        cpu_s = cpu_seconds_between(cpu_before, cpu_ns_by_thread(guard.pid))
        started = float(wait_until(result.read_text, 10, "the blaster's stamps").split()[0])
        msgs_s = plan.datagrams / max(absorbed_at - started, 1e-9)
        dropped = guard.metric("swapguard_notify_datagrams_dropped_total")
        if dropped:
            raise BenchError(f"swapguard dropped {dropped:.0f} datagrams of its own host")
        steady_from = guard.metric(total)
        steady_started = time.monotonic()
        latencies = timed_calls_ms(guard.client.status, plan.requests)
        load = (guard.metric(total) - steady_from) / (time.monotonic() - steady_started)
        if load < plan.rate / 2:
            raise BenchError(f"the heartbeat load was {load:.0f}/s, not about {plan.rate}/s")
    return {
        "msgs_s": msgs_s,
        "cpu_us_per_datagram": cpu_s / plan.datagrams * 1e6,
        "status_p50_ms": percentile(latencies, 50),
        "status_p99_ms": percentile(latencies, 99),
    }


# --- idle --------------------------------------------------------------------------------------


def cpu_ns_by_thread(pid: int) -> dict[str, int]:
    """CPU nanoseconds of each live thread of `pid` from /proc/<pid>/task/*/schedstat: clock
    ticks (10 ms, what psutil reads) would round a quiet minute to nothing. Empty where the
    kernel has no schedstat; `cpu_seconds_between` then falls back to psutil."""
    found: dict[str, int] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as stats:
                found[task] = int(stats.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return found


def cpu_seconds_between(before: dict[str, int], after: dict[str, int]) -> float:
    """CPU seconds used between two snapshots; a thread that ended meanwhile is not counted."""
    return sum(ns - before.get(task, 0) for task, ns in after.items()) / 1e9


def idle_cost(pids: dict[str, int], seconds: float) -> dict[str, tuple[float, float]]:
    """CPU seconds a minute and RSS MiB of each named process over the same `seconds`."""
    procs = {name: psutil.Process(pid) for name, pid in pids.items()}
    before = {name: cpu_ns_by_thread(pid) for name, pid in pids.items()}
    ticks = {name: sum(proc.cpu_times()[:2]) for name, proc in procs.items()}
    started = time.monotonic()
    time.sleep(seconds)  # the measurement window itself, not a wait for a condition
    elapsed = time.monotonic() - started
    out = {}
    for name, proc in procs.items():
        if before[name]:
            cpu = cpu_seconds_between(before[name], cpu_ns_by_thread(proc.pid))
        else:
            cpu = sum(proc.cpu_times()[:2]) - ticks[name]
        out[name] = (cpu / elapsed * 60, proc.memory_info().rss / 2**20)
    return out
