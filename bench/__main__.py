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

from bench import measure, peers, report, rollback
from supervisor import __version__ as swapguard_version

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SUPERVISORD = REPO_ROOT / ".bench-venv" / "supervisord" / "bin" / "supervisord"
GROUPS = {
    "restart": ("restart_latency_ms",),
    "load": ("heartbeat", "idle"),
    "swaps": ("deadline_lateness_ms", "rollback_s", "activation_downtime_s", "snapshot"),
}


@dataclass(frozen=True, slots=True)
class Plan:
    """How much of each measurement: the full run, or --quick (under 3 minutes on 2 cores)."""

    exits: int
    idle_s: float
    status_requests: int
    datagrams: int
    heartbeat_rate: int
    swaps: rollback.SwapPlan

    @classmethod
    def for_run(cls, quick: bool) -> Plan:
        if quick:
            swaps = rollback.SwapPlan(small_mib=10, large_mib=200, small_swaps=10, large_swaps=2)
            return cls(20, 10.0, 500, 50_000, 1000, swaps)
        swaps = rollback.SwapPlan(small_mib=10, large_mib=1024, small_swaps=20, large_swaps=3)
        return cls(30, 20.0, 500, 100_000, 1000, swaps)


def machine(supervisord: Path) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        peer = subprocess.run(
            [str(supervisord), "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except OSError:
        peer = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_1m": round(os.getloadavg()[0], 2),
        "swapguard": swapguard_version,
        "supervisord": f"supervisord {peer or 'unknown'}",
    }


def _progress(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


class Bench:
    """One run: a temp root, a tag for every process, results and errors by section."""

    def __init__(self, root: Path, tag: str, plan: Plan, supervisord: Path) -> None:
        self.root, self.tag, self.plan, self.supervisord = root, tag, plan, supervisord
        self.results: dict[str, Any] = {}
        self.errors: list[str] = []

    def step(self, name: str, work: Callable[[], dict[str, Any]]) -> None:
        """Run one group; its failure is recorded, not fatal, and its processes are killed."""
        _progress(f"{name} ...")
        started = time.monotonic()
        try:
            self.results.update(work())
        except Exception as exc:  # recorded; the other groups still run
            why = str(exc) if isinstance(exc, peers.BenchError) else f"{type(exc).__name__}: {exc}"
            self.errors.append(f"{name}: {why}")
            _progress(f"{name} failed: {why}")
        finally:
            _progress(f"{name} took {time.monotonic() - started:.1f} s")
            peers.kill_tagged(self.tag)

    def restart(self) -> dict[str, Any]:
        folder = self.root / "restart"
        figures = measure.restart_latency(folder, self.supervisord, self.plan.exits, self.tag)
        return {"restart_latency_ms": figures}

    def load(self) -> dict[str, Any]:
        idle, at_rest = measure.idle_and_status(
            self.root / "idle",
            self.supervisord,
            self.plan.idle_s,
            self.plan.status_requests,
            self.tag,
        )
        hb_plan = measure.HeartbeatPlan(
            self.plan.datagrams, self.plan.heartbeat_rate, self.plan.status_requests
        )
        beat = measure.heartbeat(self.root / "heartbeat", hb_plan, self.tag)
        return {"idle": idle, "heartbeat": {**beat, **at_rest}}

    def swaps(self) -> dict[str, Any]:
        return rollback.swap_sections(self.root / "swaps", self.plan.swaps, self.tag)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description="swapguard against supervisord 4.x and fork/exec."
    )
    parser.add_argument("--quick", action="store_true", help="smaller run, under 3 minutes")
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
    return parser.parse_args(argv)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that clean up


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    plan = Plan.for_run(args.quick)
    about = machine(args.supervisord)
    _progress(
        f"{about['cpu']}, {about['cores']} cores, {about['kernel']}, Python {about['python']}"
    )
    groups = args.only or list(GROUPS)
    tag = uuid.uuid4().hex
    root = Path(tempfile.mkdtemp(prefix="sgbench-", dir="/tmp"))
    bench = Bench(root, tag, plan, args.supervisord)
    started = time.monotonic()
    try:
        for group in GROUPS:
            if group in groups:
                bench.step(group, getattr(bench, group))
    finally:
        peers.kill_tagged(tag)
        shutil.rmtree(root, ignore_errors=True)
    _progress(f"done in {time.monotonic() - started:.0f} s")
    if args.json:
        print(report.render_json(bench.results, about, bench.errors, quick=args.quick))
    else:
        print(report.render_table(bench.results, about, bench.errors))
    return 1 if bench.errors else 0


if __name__ == "__main__":
    sys.exit(main())
