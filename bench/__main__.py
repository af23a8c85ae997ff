"""`python -m bench [--quick] [--json] [--only GROUP ...]`: run the benchmark, print the report.

Progress goes to stderr, the report (table or one JSON object) to stdout. Every process started
is killed and every file removed at the end, also on Ctrl-C or SIGTERM. Exit status: 0 when every
section was measured (whatever its verdict), 1 when a measurement failed, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import contest, measure, peers, report, rollback, treescale

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = REPO_ROOT / ".bench-venv"
DEFAULT_SUPERVISORD = BENCH_VENV / "supervisord" / "bin" / "supervisord"
DEFAULT_CIRCUSD = BENCH_VENV / "circus" / "bin" / "circusd"
DEFAULT_PM2 = BENCH_VENV / "pm2" / "node_modules" / "pm2"
GROUPS = {
    "restart": ("restart_latency_ms", "cold_start_ms"),
    "load": ("status_p50_ms", "heartbeat", "idle"),
    "swaps": ("deadline_lateness_ms", "rollback_s", "activation_downtime_s", "snapshot"),
    "tree": ("tree_scale",),
}


@dataclass(frozen=True, slots=True)
class Plan:
    """How much of each measurement: the full run, or --quick (under 2 minutes on 2 cores)."""

    contest: contest.ContestPlan
    datagrams: int
    heartbeat_rate: int
    swaps: rollback.SwapPlan
    tree: treescale.TreePlan

    @classmethod
    def for_run(cls, quick: bool) -> Plan:
        if quick:
            return cls(
                contest.ContestPlan(
                    rounds=4, gaps=5, slow_gaps=2, idle_s=10.0, status_requests=300
                ),
                30_000,
                1000,
                rollback.SwapPlan(
                    small_mib=10, large_mib=200, small_swaps=8, large_swaps=2, stressed_swaps=6
                ),
                treescale.TreePlan(files=(1000, 10_000), idle_s=4.0),
            )
        return cls(
            contest.ContestPlan(rounds=6, gaps=6, slow_gaps=4, idle_s=20.0, status_requests=500),
            100_000,
            1000,
            rollback.SwapPlan(
                small_mib=10, large_mib=1024, small_swaps=20, large_swaps=3, stressed_swaps=20
            ),
            treescale.TreePlan(files=(1000, 10_000, 100_000), idle_s=20.0),
        )


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    git = subprocess.run(["git", "--version"], capture_output=True, text=True, check=False)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "git": git.stdout.strip(),
        "load_1m": round(os.getloadavg()[0], 2),
    }


def describe(lineup: list[contest.Peer]) -> dict[str, dict[str, Any]]:
    """Each system's version, settings and skip reason, for the report."""
    return {
        peer.name: {"version": peer.version, "settings": peer.settings, "skipped": peer.skipped}
        for peer in lineup
    }


class Bench:
    """One run: a temp root, a tag for every process, results and errors by section."""

    def __init__(self, root: Path, tag: str, plan: Plan, lineup: list[contest.Peer]) -> None:
        self.root, self.tag, self.plan, self.lineup = root, tag, plan, lineup
        self.results: dict[str, Any] = {}
        self.errors: list[str] = []

    def step(self, name: str, work: Callable[[], dict[str, Any]]) -> None:
        """Run one group; its failure is recorded, not fatal, and its processes are killed."""
        peers.progress(f"{name} ...")
        started = time.monotonic()
        try:
            self.results.update(work())
        except Exception as exc:  # recorded; the other groups still run
            why = str(exc) if isinstance(exc, peers.BenchError) else f"{type(exc).__name__}: {exc}"
            self.errors.append(f"{name}: {why}")
            peers.progress(f"{name} failed: {why}")
        finally:
            peers.progress(f"{name} took {time.monotonic() - started:.1f} s")
            peers.kill_tagged(self.tag)

    def restart(self) -> dict[str, Any]:
        return contest.restarts_and_cold_starts(
            self.root / "restart", self.lineup, self.plan.contest, self.tag
        )

    def load(self) -> dict[str, Any]:
        rest = contest.at_rest(self.root / "idle", self.lineup, self.plan.contest, self.tag)
        hb_plan = measure.HeartbeatPlan(
            self.plan.datagrams, self.plan.heartbeat_rate, self.plan.contest.status_requests
        )
        beat = measure.heartbeat(self.root / "heartbeat", hb_plan, self.tag)
        status = rest["status_p50_ms"]
        beat["status_at_rest_p50_ms"] = status["swapguard"]  # the keys of the older bench
        beat["supervisord_status_p50_ms"] = status["supervisord"]
        return {**rest, "heartbeat": beat}

    def swaps(self) -> dict[str, Any]:
        return rollback.swap_sections(self.root / "swaps", self.plan.swaps, self.tag)

    def tree(self) -> dict[str, Any]:
        return {"tree_scale": treescale.tree_scale(self.root / "tree", self.plan.tree, self.tag)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="swapguard against supervisord, circus, PM2 and the physical limits.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller run, under 2 minutes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--only", action="append", choices=sorted(GROUPS), help="run only this group (repeatable)"
    )
    parser.add_argument(
        "--supervisord",
        type=Path,
        default=Path(os.environ.get("SWAPGUARD_BENCH_SUPERVISORD", DEFAULT_SUPERVISORD)),
        help="supervisord 4.x executable, from a venv without swapguard (scripts/bench makes it)",
    )
    parser.add_argument(
        "--circusd",
        type=Path,
        default=Path(os.environ.get("SWAPGUARD_BENCH_CIRCUSD", DEFAULT_CIRCUSD)),
        help="circusd from a venv of its own (scripts/bench makes it)",
    )
    parser.add_argument(
        "--pm2",
        type=Path,
        default=Path(os.environ.get("SWAPGUARD_BENCH_PM2", DEFAULT_PM2)),
        help="the pm2 npm package folder (scripts/bench installs it privately)",
    )
    return parser.parse_args(argv)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that clean up


def compile_swapguard() -> None:
    """swapguard's bytecode, as an install writes it (pip compiles a wheel's modules; the peers'
    venvs have theirs). A checkout installed editable with PYTHONDONTWRITEBYTECODE set would
    otherwise compile every module at every start, which no installed supervisor does (about
    90 ms of CPU here). The files go in the package's __pycache__ folders, ignored by git."""
    import compileall

    import supervisor

    compileall.compile_dir(str(Path(supervisor.__file__).parent), quiet=1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    plan = Plan.for_run(args.quick)
    about = machine()
    peers.progress(
        f"{about['cpu']}, {about['cores']} cores, {about['kernel']}, Python {about['python']}"
    )
    lineup = contest.lineup(contest.Installs(args.supervisord, args.circusd, args.pm2))
    systems = describe(lineup)
    for name, system in systems.items():
        shown = f"skipped: {system['skipped']}" if system["skipped"] else system["version"]
        peers.progress(f"{name}: {shown}")
        about[name] = system["version"]  # the versions, as the older bench's machine had them
    groups = args.only or list(GROUPS)
    compile_swapguard()
    tag = uuid.uuid4().hex
    root = Path(tempfile.mkdtemp(prefix="sgbench-", dir="/tmp"))
    bench = Bench(root, tag, plan, lineup)
    started = time.monotonic()
    try:
        for group in GROUPS:
            if group in groups:
                bench.step(group, getattr(bench, group))
    finally:
        peers.kill_tagged(tag)
        shutil.rmtree(root, ignore_errors=True)
    peers.progress(f"done in {time.monotonic() - started:.0f} s")
    if args.json:
        print(
            report.render_json(bench.results, about, bench.errors, quick=args.quick, peers=systems)
        )
    else:
        print(report.render_table(bench.results, about, bench.errors, systems))
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
