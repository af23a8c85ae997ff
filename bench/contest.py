"""swapguard against its peers, side by side: restarts, cold starts, status calls and idle cost.

Every system supervises the same child. Restarts and cold starts are taken in interleaved rounds
of one run: each round starts every system afresh (its cold start: launched -> the child's first
start stamp), takes its exit -> next start gaps, and stops it before the next system starts, the
order rotating from round to round, so a change in the machine's load hits all alike. The floor
is a bare Python launcher that runs the child in a Popen/wait loop, started the same way.

A peer that is not installed, or fails, is skipped with the reason; swapguard failing fails the
section.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bench import rivals
from bench.measure import child_command, idle_cost, restart_gaps_ms
from bench.peers import (
    BenchError,
    Supervisord,
    Swapguard,
    SwapguardSetup,
    make_repo,
    tagged_env,
    wait_until,
)
from bench.report import PEERS, percentile
from supervisor import __version__ as swapguard_version

FLOOR = "floor"
LAUNCHER = (
    "import subprocess, sys\nfor _ in range(int(sys.argv[1])):\n    subprocess.run(sys.argv[2:])"
)
SWAPGUARD_SETTINGS = (
    "restart_delay 0, min_uptime 0, ready = started, bytecode compiled first (as an install does)"
)
SUPERVISORD_SETTINGS = "autorestart, startsecs 0, startretries 1e6 (its loop polls once a second)"


class System(Protocol):
    """A system under test: its supervising process, when it was launched, its status call."""

    launched_at: float

    @property
    def pid(self) -> int: ...

    def start(self) -> object: ...

    def stop(self) -> None: ...

    def status_ms(self, count: int) -> list[float]: ...


Factory = Callable[[Path, Sequence[str], str], System]  # (folder, the child's argv, run tag)


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    version: str | None
    settings: str
    factory: Factory
    skipped: str | None = None  # why it cannot run here


@dataclass(frozen=True, slots=True)
class Installs:
    """Where each peer's own environment is (scripts/bench makes them)."""

    supervisord: Path
    circusd: Path
    pm2: Path  # the pm2 npm package folder


@contextlib.contextmanager
def running(factory: Factory, folder: Path, command: Sequence[str], tag: str) -> Iterator[System]:
    """A system started on `command`, stopped on the way out whatever happens."""
    system = factory(folder, command, tag)
    try:
        system.start()
        yield system
    finally:
        system.stop()


class _SwapguardContender(Swapguard):
    """swapguard restarting the child at once, in a git repo of its own; not waiting for ready
    (a child that exits at once is never ready for long)."""

    def __init__(self, folder: Path, command: Sequence[str], tag: str) -> None:
        repo = make_repo(folder / "repo", {"README": "contest\n"})
        host = {
            "command": list(command),
            "ready": "started",
            "min_uptime": "0",
            "restart": "always",
            "restart_delay": "0",
            "restart_delay_max": "1s",
        }
        super().__init__(folder / "sg", SwapguardSetup(repo=repo, host=host), tag)

    def start(self, *, wait_ready: bool = False) -> Swapguard:
        return super().start(wait_ready=wait_ready)


class _Floor:
    """A bare Python launcher running the child `runs` times, one after the other."""

    def __init__(self, folder: Path, command: Sequence[str], tag: str, runs: int) -> None:
        self.folder, self.command, self.tag, self.runs = folder, list(command), tag, runs
        self.launched_at = 0.0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> _Floor:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.launched_at = time.time()
        self.process = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(self.runs), *self.command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=tagged_env(self.tag),
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, "start() first"
        return self.process.pid

    def status_ms(self, count: int) -> list[float]:
        raise BenchError("the floor has no status call")

    def stop(self) -> None:
        if self.process is not None:
            rivals.stop_tree(self.process)


def _floor(runs: int) -> Factory:
    return lambda folder, command, tag: _Floor(folder, command, tag, runs)


def lineup(installs: Installs) -> list[Peer]:
    """swapguard and its three peers, each skipped with the reason where it is not installed."""
    sd_version = rivals.supervisord_version(installs.supervisord)
    circus_version = rivals.circus_version(installs.circusd)
    pm2_version = rivals.pm2_version(installs.pm2)
    pm2_skipped = None
    if shutil.which("node") is None:
        pm2_skipped = "node is not installed (PM2 needs node and npm)"
    elif pm2_version is None:
        pm2_skipped = rivals.not_installed("pm2", installs.pm2)
    return [
        Peer("swapguard", swapguard_version, SWAPGUARD_SETTINGS, _SwapguardContender),
        Peer(
            "supervisord",
            sd_version,
            SUPERVISORD_SETTINGS,
            lambda f, c, t: Supervisord(f, installs.supervisord, c, t),
            None if sd_version else rivals.not_installed("supervisord", installs.supervisord),
        ),
        Peer(
            "circus",
            circus_version,
            rivals.CIRCUS_SETTINGS,
            lambda f, c, t: rivals.Circus(f, installs.circusd, c, t),
            None if circus_version else rivals.not_installed("circus", installs.circusd),
        ),
        Peer(
            "pm2",
            pm2_version,
            rivals.PM2_SETTINGS,
            lambda f, c, t: rivals.Pm2(f, installs.pm2, c, t),
            pm2_skipped,
        ),
    ]


# --- restarts and cold starts -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ContestPlan:
    rounds: int
    gaps: int  # exit -> next start gaps per round and system
    slow_gaps: int  # the same for supervisord, whose loop ticks once a second
    idle_s: float
    status_requests: int


def _starts(stamps: Path) -> int:
    return stamps.read_text().count("s ") if stamps.exists() else 0


def one_round(
    factory: Factory, folder: Path, gaps: int, tag: str, what: str
) -> tuple[list[float], float]:
    """One system started afresh: (its first `gaps` restart gaps, its cold start in ms)."""
    stamps = folder / "stamps"
    command = child_command(folder, stamps)
    with running(factory, folder, command, tag) as system:
        wait_until(lambda: _starts(stamps) >= gaps + 1, 30 + 3 * gaps, f"{what}'s restarts")
        launched_at = system.launched_at
    text = stamps.read_text()
    first = next(line for line in text.splitlines() if line.startswith("s "))
    return restart_gaps_ms(text)[:gaps], (float(first.split()[1]) - launched_at) * 1000


def restarts_and_cold_starts(
    folder: Path, peers: Sequence[Peer], plan: ContestPlan, tag: str
) -> dict[str, dict[str, Any]]:
    """restart_latency_ms and cold_start_ms of every peer and the floor, interleaved."""
    skipped = {peer.name: peer.skipped for peer in peers if peer.skipped}
    contenders = [(peer.name, peer.factory) for peer in peers if not peer.skipped]
    gaps: dict[str, list[float]] = {name: [] for name, _ in contenders}
    colds: dict[str, list[float]] = {name: [] for name, _ in contenders}
    gaps[FLOOR], colds[FLOOR] = [], []
    for number in range(plan.rounds):
        shift = number % len(contenders)
        order = [*contenders[shift:], *contenders[:shift], (FLOOR, _floor(plan.gaps + 1))]
        for name, factory in order:
            if name in skipped:
                continue
            count = plan.slow_gaps if name == "supervisord" else plan.gaps
            where = folder / f"{name}-{number}"
            try:
                found, cold = one_round(factory, where, count, tag, name)
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                if name in ("swapguard", FLOOR):
                    raise
                skipped[name] = f"failed in round {number + 1}: {exc}"
                continue
            gaps[name] += found
            colds[name].append(cold)
    return {
        "restart_latency_ms": versus(gaps, skipped, compat=True),
        "cold_start_ms": versus(colds, skipped, compat=False),
    }


def versus(
    samples: dict[str, list[float]], skipped: dict[str, str], *, compat: bool
) -> dict[str, Any]:
    """Medians of each system, the best peer and swapguard's ratios to it and to the floor."""
    median = {
        name: percentile(samples[name], 50) if name not in skipped and samples.get(name) else None
        for name in (*PEERS, FLOOR)
    }
    p90 = {name: percentile(v, 90) for name, v in samples.items() if v and name not in skipped}
    rivals_ran = {name: median[name] for name in PEERS[1:] if median[name] is not None}
    best = min(rivals_ran, key=lambda name: rivals_ran[name]) if rivals_ran else None
    guard, floor = median["swapguard"], median[FLOOR]
    assert guard is not None and floor is not None, "swapguard and the floor always run"
    out: dict[str, Any] = {**median, "p90": p90}
    out["best_peer"] = best
    out["best_peer_ms"] = rivals_ran[best] if best else None
    out["ratio_to_best_peer"] = guard / rivals_ran[best] if best else None
    out["ratio_to_floor"] = guard / floor
    if compat:  # the keys of the supervisord-only bench
        out["limit"] = floor
        sd = median["supervisord"]
        out["ratio"] = sd / guard if sd is not None else None
    out["samples"] = {name: len(v) for name, v in samples.items() if name not in skipped}
    out["skipped"] = {name: skipped[name] for name in PEERS if name in skipped}
    return out


# --- at rest: idle cost and status ------------------------------------------------------------


def at_rest(
    folder: Path, peers: Sequence[Peer], plan: ContestPlan, tag: str
) -> dict[str, dict[str, Any]]:
    """Every system at rest with one idle child (`sleep`), side by side with the bare launcher:
    CPU and RSS over the same window; then each one's status call, one after the other."""
    skipped = {peer.name: peer.skipped for peer in peers if peer.skipped}
    sleeper = ["sleep", "100000"]
    pids: dict[str, int] = {}
    status: dict[str, list[float]] = {}
    with ExitStack() as stack:
        started: dict[str, System] = {}
        for name, factory in [(p.name, p.factory) for p in peers if not p.skipped]:
            try:
                started[name] = stack.enter_context(running(factory, folder / name, sleeper, tag))
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                if name == "swapguard":
                    raise
                skipped[name] = f"failed to start: {exc}"
        started[FLOOR] = stack.enter_context(running(_floor(1), folder / FLOOR, sleeper, tag))
        pids = {name: system.pid for name, system in started.items()}
        time.sleep(1.0)  # let every system settle after start-up before the window opens
        cost = idle_cost(pids, plan.idle_s)
        for name, system in started.items():
            if name == FLOOR:
                continue
            try:
                status[name] = system.status_ms(plan.status_requests)
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                if name == "swapguard":
                    raise
                skipped[name] = f"status call failed: {exc}"
    names = (*PEERS, FLOOR)
    cpu = {name: cost[name][0] if name in cost else None for name in names}
    rss = {name: cost[name][1] if name in cost else None for name in names}
    gone = {name: skipped[name] for name in PEERS if name in skipped}
    idle: dict[str, Any] = {"cpu_s_per_min": cpu, "rss_mib": rss, "skipped": gone}
    idle["supervisord_cpu_s_per_min"] = cpu["supervisord"]  # the keys of the older bench
    idle["supervisord_rss_mib"] = rss["supervisord"]
    p50 = {n: percentile(status[n], 50) if n in status else None for n in PEERS}
    p99 = {n: percentile(status[n], 99) for n in PEERS if n in status}
    return {"idle": idle, "status_p50_ms": {**p50, "p99": p99, "skipped": gone}}
