"""Pure: percentiles, the verdict of each target, and the two outputs (a table and one JSON object).

A section whose measurement failed is None in the results; its verdict is "n/a" and the error is
listed, so one broken measurement never hides the others.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Results = Mapping[str, Any]

SECTIONS = (
    "restart_latency_ms",
    "deadline_lateness_ms",
    "rollback_s",
    "activation_downtime_s",
    "snapshot",
    "heartbeat",
    "idle",
)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolated between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100; got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; infinity for a zero denominator (a perfect score, not a crash)."""
    return numerator / denominator if denominator > 0 else math.inf


@dataclass(frozen=True, slots=True)
class Verdict:
    section: str
    target: str
    measured: bool
    passed: bool | None  # None: not measured, or no target

    @property
    def word(self) -> str:
        if not self.measured:
            return "n/a"
        return {True: "PASS", False: "MISS", None: "-"}[self.passed]


_Check = Callable[[Mapping[str, Any]], bool]
_TARGETS: tuple[tuple[str, str, _Check | None], ...] = (
    ("restart_latency_ms", ">= 20x faster than supervisord", lambda r: r["ratio"] >= 20),
    ("deadline_lateness_ms", "p99 <= 50 ms", lambda r: r["p99"] <= 50),
    ("rollback_s", "growth (large / small) <= 1.2", lambda r: r["growth"] <= 1.2),
    ("activation_downtime_s", "(no target)", None),
    ("snapshot", ">= 0.5x a plain copy", lambda r: r["ratio"] >= 0.5),
    (
        "heartbeat",
        ">= 20k datagrams/s; status p50 <= supervisord's at rest",
        lambda r: r["msgs_s"] >= 20_000 and r["status_p50_ms"] <= r["supervisord_status_p50_ms"],
    ),
    (
        "idle",
        "CPU and RSS <= supervisord's",
        lambda r: (
            r["cpu_s_per_min"] <= r["supervisord_cpu_s_per_min"]
            and r["rss_mib"] <= r["supervisord_rss_mib"]
        ),
    ),
)


def verdicts(results: Results) -> list[Verdict]:
    found = []
    for section, target, check in _TARGETS:
        values = results.get(section)
        passed = None if values is None or check is None else bool(check(values))
        found.append(Verdict(section, target, values is not None, passed))
    return found


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms"


def _measured(section: str, r: Mapping[str, Any]) -> str:
    """One line of what was measured, for the table."""
    match section:
        case "restart_latency_ms":
            return (
                f"swapguard {_ms(r['swapguard'])}, supervisord {_ms(r['supervisord'])}, "
                f"fork/exec loop {_ms(r['limit'])}: {r['ratio']:.1f}x"
            )
        case "deadline_lateness_ms":
            return f"p50 {_ms(r['p50'])}, p99 {_ms(r['p99'])}"
        case "rollback_s":
            return (
                f"small {r['small']:.3f} s, large {r['large']:.3f} s "
                f"(copy of large {r['copy_large']:.3f} s): growth {r['growth']:.2f}"
            )
        case "activation_downtime_s":
            return f"small {r['small']:.3f} s, large {r['large']:.3f} s"
        case "snapshot":
            durable = r.get("copy_fsync_mib_s")
            also = f" (copy + fsync {durable:.0f} MiB/s)" if durable else ""
            return (
                f"{r['mib_s']:.0f} MiB/s vs copy {r['copy_mib_s']:.0f} MiB/s: "
                f"{r['ratio']:.2f}x{also}"
            )
        case "heartbeat":
            return (
                f"{r['msgs_s']:,.0f} datagrams/s; status p50 {_ms(r['status_p50_ms'])} "
                f"p99 {_ms(r['status_p99_ms'])} (at rest p50 "
                f"{_ms(r.get('status_at_rest_p50_ms', math.nan))}) vs supervisord at rest "
                f"{_ms(r['supervisord_status_p50_ms'])}"
            )
        case "idle":
            return (
                f"CPU {r['cpu_s_per_min']:.3f} s/min vs {r['supervisord_cpu_s_per_min']:.3f}; "
                f"RSS {r['rss_mib']:.1f} MiB vs {r['supervisord_rss_mib']:.1f} MiB"
            )
    raise ValueError(f"unknown section {section!r}")


def render_table(results: Results, machine: Mapping[str, Any], errors: Sequence[str]) -> str:
    """The human-readable report: the machine, then one row per section, then any errors."""
    lines = [
        f"machine: {machine.get('cpu')}, {machine.get('cores')} cores, "
        f"kernel {machine.get('kernel')}, Python {machine.get('python')}, "
        f"load {machine.get('load_1m')} at start; swapguard {machine.get('swapguard')}, "
        f"{machine.get('supervisord')}",
        "",
    ]
    rows = [("metric", "measured", "target", "verdict")]
    for verdict in verdicts(results):
        values = results.get(verdict.section)
        shown = "not measured" if values is None else _measured(verdict.section, values)
        rows.append((verdict.section, shown, verdict.target, verdict.word))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = [row[i].ljust(widths[i]) for i in range(3)]
        lines.append("  ".join([*cells, row[3]]).rstrip())
    lines += [f"error: {error}" for error in errors]
    return "\n".join(lines)


def document(
    results: Results, machine: Mapping[str, Any], errors: Sequence[str], *, quick: bool
) -> dict[str, Any]:
    """The --json object: every section (null when not measured), the machine and the verdicts."""
    out: dict[str, Any] = {"machine": dict(machine), "quick": quick}
    out.update({section: _rounded(results.get(section)) for section in SECTIONS})
    out["verdicts"] = {
        v.section: {"target": v.target, "verdict": v.word} for v in verdicts(results)
    }
    out["errors"] = list(errors)
    return out


def render_json(
    results: Results, machine: Mapping[str, Any], errors: Sequence[str], *, quick: bool
) -> str:
    return json.dumps(document(results, machine, errors, quick=quick), allow_nan=False)


def _rounded(values: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Four significant decimals is plenty; infinity becomes null (JSON has no infinity)."""
    if values is None:
        return None
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, float):
            value = None if not math.isfinite(value) else round(value, 4)
        out[key] = value
    return out
