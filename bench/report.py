"""Pure: percentiles, the verdict of each target, and the two outputs (tables and one JSON object).

A section whose measurement failed is None in the results; its verdict is "n/a" and the error is
listed, so one broken measurement never hides the others. A peer that could not run is None inside
a section, with the reason under the section's `skipped`; the targets judge against the peers that
ran.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Results = Mapping[str, Any]

PEERS = ("swapguard", "supervisord", "circus", "pm2")
RIVALS = PEERS[1:]
SECTIONS = (
    "restart_latency_ms",
    "cold_start_ms",
    "status_p50_ms",
    "heartbeat",
    "idle",
    "deadline_lateness_ms",
    "rollback_s",
    "activation_downtime_s",
    "snapshot",
    "tree_scale",
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


def ran(section: Mapping[str, Any]) -> dict[str, float]:
    """The rivals of a per-system section that have a figure (skipped ones are None)."""
    return {name: section[name] for name in RIVALS if section.get(name) is not None}


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


def _restart(r: Mapping[str, Any]) -> bool:
    best = r.get("best_peer_ms")
    return (best is None or r["swapguard"] <= best) and r["swapguard"] <= 2 * r["floor"]


def _cold(r: Mapping[str, Any]) -> bool:
    best = r.get("best_peer_ms")
    return best is None or r["swapguard"] <= best


def _status(r: Mapping[str, Any]) -> bool:
    return all(r["swapguard"] <= value for value in ran(r).values())


def _idle(r: Mapping[str, Any]) -> bool:
    cpu, rss = r["cpu_s_per_min"], r["rss_mib"]
    cheaper = all(cpu["swapguard"] <= value for value in ran(cpu).values())
    supervisord = rss.get("supervisord")
    return cheaper and (supervisord is None or rss["swapguard"] <= 1.25 * supervisord)


def _lateness(r: Mapping[str, Any]) -> bool:
    stressed = r.get("stressed_p99")
    return r["p99"] <= 10 and (stressed is None or stressed <= 50)


def _tree(r: Mapping[str, Any]) -> bool:
    pairs = zip(r["prepare_s"], r["git_limit_s"], strict=True)
    return all(prepare <= 1.5 * limit for prepare, limit in pairs)


_Check = Callable[[Mapping[str, Any]], bool]
_TARGETS: tuple[tuple[str, str, _Check | None], ...] = (
    ("restart_latency_ms", "p50 <= fastest peer's and <= 2x the fork/exec floor", _restart),
    ("cold_start_ms", "p50 <= fastest peer's", _cold),
    ("status_p50_ms", "p50 at rest <= every peer's (same content)", _status),
    (
        "heartbeat",
        ">= 20k datagrams/s; status p99 <= 1 ms under 1k heartbeats/s",
        lambda r: r["msgs_s"] >= 20_000 and r["status_p99_ms"] <= 1.0,
    ),
    ("idle", "CPU <= every peer's; RSS <= 1.25x supervisord's", _idle),
    ("deadline_lateness_ms", "p99 <= 10 ms at rest, <= 50 ms stressed", _lateness),
    (
        "rollback_s",
        "small <= 60 ms; growth (large / small) <= 1.2",
        lambda r: r["small"] <= 0.060 and r["growth"] <= 1.2,
    ),
    (
        "activation_downtime_s",
        "large <= 1.2x a plain copy of its file",
        lambda r: r["large"] <= 1.2 * r["copy_large"],
    ),
    ("snapshot", ">= 0.5x a plain copy", lambda r: r["ratio"] >= 0.5),
    ("tree_scale", "prepare <= 1.5x git add -A + write-tree, every size", _tree),
)


def verdicts(results: Results) -> list[Verdict]:
    found = []
    for section, target, check in _TARGETS:
        values = results.get(section)
        passed = None if values is None or check is None else bool(check(values))
        found.append(Verdict(section, target, values is not None, passed))
    return found


# --- the table ---------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return (
        f"{value:.0f} ms"
        if value >= 100
        else f"{value:.1f} ms"
        if value >= 10
        else (f"{value:.2f} ms")
    )


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def _versus_best(figures: Mapping[str, Any]) -> str:
    """swapguard / the best peer that ran, and which one it is."""
    rivals = ran(figures)
    if not rivals or figures.get("swapguard") is None:
        return "-"
    best = min(rivals, key=lambda name: rivals[name])
    return f"{_x(ratio(figures['swapguard'], rivals[best]))} ({best})"


def _matrix_rows(results: Results, words: Mapping[str, str]) -> list[list[str]]:
    """The side-by-side figures: one row per figure, one column per system."""
    rows: list[list[str]] = []

    def add(
        label: str, figures: Mapping[str, Any] | None, show: Callable[..., str], word: str
    ) -> None:
        if figures is None:
            return
        cells = [show(figures.get(name)) for name in (*PEERS, "floor")]
        floor = figures.get("floor")
        guard = figures.get("swapguard")
        vs_floor = _x(ratio(guard, floor)) if guard is not None and floor else "-"
        rows.append([label, *cells, _versus_best(figures), vs_floor, word])

    restart = results.get("restart_latency_ms")
    add("exit -> next start, p50", restart, _ms, words["restart_latency_ms"])
    if restart is not None:
        add("exit -> next start, p90", restart.get("p90"), _ms, "")
    add("cold start -> child running", results.get("cold_start_ms"), _ms, words["cold_start_ms"])
    status = results.get("status_p50_ms")
    add("status p50 at rest", status, _ms, words["status_p50_ms"])
    if status is not None:
        add("status p99 at rest", status.get("p99"), _ms, "")
    idle = results.get("idle")
    if idle is not None:
        add("idle CPU, s/min", idle["cpu_s_per_min"], _num, words["idle"])
        add("idle RSS, MiB", idle["rss_mib"], lambda v: _num(v, 1), "")
    return rows


def _cpu_per_datagram(r: Mapping[str, Any]) -> str:
    """swapguard's CPU per datagram, where the run measured it (older JSON has none)."""
    cpu = r.get("cpu_us_per_datagram")
    return "" if cpu is None else f" ({cpu:.1f} us CPU each)"


def _measured(section: str, r: Mapping[str, Any]) -> str:
    """One line of what was measured, for the targets table."""
    match section:
        case "restart_latency_ms" | "cold_start_ms":
            best = r.get("best_peer")
            versus = f", best peer {best} {_ms(r['best_peer_ms'])}" if best else ""
            return f"swapguard {_ms(r['swapguard'])}{versus}, floor {_ms(r['floor'])}"
        case "status_p50_ms":
            return ", ".join(f"{name} {_ms(r.get(name))}" for name in PEERS)
        case "heartbeat":
            return (
                f"{r['msgs_s']:,.0f} datagrams/s{_cpu_per_datagram(r)}; status under 1k "
                f"heartbeats/s p50 {_ms(r['status_p50_ms'])} p99 {_ms(r['status_p99_ms'])}"
            )
        case "idle":
            cpu, rss = r["cpu_s_per_min"], r["rss_mib"]
            return (
                f"CPU {_num(cpu['swapguard'])} s/min; RSS {_num(rss['swapguard'], 1)} MiB "
                f"vs supervisord {_num(rss.get('supervisord'), 1)} MiB"
            )
        case "deadline_lateness_ms":
            return (
                f"p50 {_ms(r['p50'])}, p99 {_ms(r['p99'])}, "
                f"stressed p99 {_ms(r.get('stressed_p99'))}"
            )
        case "rollback_s":
            return (
                f"small {r['small']:.3f} s, large {r['large']:.3f} s "
                f"(copy of large {r['copy_large']:.3f} s): growth {r['growth']:.2f}"
            )
        case "activation_downtime_s":
            return (
                f"small {r['small']:.3f} s, large {r['large']:.3f} s, "
                f"copy of large {r['copy_large']:.3f} s"
            )
        case "snapshot":
            durable = r.get("copy_fsync_mib_s")
            also = f" (copy + fsync {durable:.0f} MiB/s)" if durable else ""
            return (
                f"{r['mib_s']:.0f} MiB/s vs copy {r['copy_mib_s']:.0f} MiB/s: "
                f"{_x(r['ratio'])}{also}"
            )
        case "tree_scale":
            sizes = zip(r["files"], r["prepare_s"], r["git_limit_s"], r["rollback_s"], strict=True)
            shown = "; ".join(
                f"{files // 1000}k: prepare {prepare:.2f} s vs git {limit:.2f} s, "
                f"rollback {back:.2f} s"
                for files, prepare, limit, back in sizes
            )
            busy = r.get("busy_after_start_s") or [math.nan]
            return (
                f"{shown}; watcher at {r['files'][-1] // 1000}k: "
                f"{_num(r['watcher_cpu_s_per_min'])} s/min, {_num(r['watcher_rss_mib'], 1)} MiB, "
                f"busy {_num(busy[-1], 1)} s after start-up, "
                f"{_num(r.get('watcher_read_pass_cpu_s'), 2)} s CPU for one read of every file"
            )
    raise ValueError(f"unknown section {section!r}")


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def render_table(
    results: Results,
    machine: Mapping[str, Any],
    errors: Sequence[str],
    peers: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The human-readable report: the machine, the peers and their settings, the side-by-side
    figures, one row per target, then any errors."""
    lines = [
        f"machine: {machine.get('cpu')}, {machine.get('cores')} cores, "
        f"kernel {machine.get('kernel')}, Python {machine.get('python')}, "
        f"load {machine.get('load_1m')} at start, {machine.get('git')}",
        "",
    ]
    for name, about in (peers or {}).items():
        if about.get("skipped"):
            lines.append(f"{name}: skipped: {about['skipped']}")
        else:
            lines.append(f"{name} {about.get('version')}: {about.get('settings')}")
    found = verdicts(results)
    words = {verdict.section: verdict.word for verdict in found}
    matrix = _matrix_rows(results, words)
    if matrix:
        header = ["figure", *PEERS, "floor", "vs best peer", "vs floor", "verdict"]
        lines += ["", *_columns([header, *matrix])]
    rows = [["metric", "measured", "target", "verdict"]]
    for verdict in found:
        values = results.get(verdict.section)
        shown = "not measured" if values is None else _measured(verdict.section, values)
        rows.append([verdict.section, shown, verdict.target, verdict.word])
    lines += ["", *_columns(rows)]
    lines += [f"error: {error}" for error in errors]
    return "\n".join(lines)


# --- the JSON document -------------------------------------------------------------------------


def document(
    results: Results,
    machine: Mapping[str, Any],
    errors: Sequence[str],
    *,
    quick: bool,
    peers: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The --json object: every section (null when not measured), the peers, the machine and
    the verdicts."""
    out: dict[str, Any] = {"machine": dict(machine), "quick": quick}
    out["peers"] = {name: dict(about) for name, about in (peers or {}).items()}
    out.update({section: _rounded(results.get(section)) for section in SECTIONS})
    out["verdicts"] = {
        v.section: {"target": v.target, "verdict": v.word} for v in verdicts(results)
    }
    out["errors"] = list(errors)
    return out


def render_json(
    results: Results,
    machine: Mapping[str, Any],
    errors: Sequence[str],
    *,
    quick: bool,
    peers: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    return json.dumps(document(results, machine, errors, quick=quick, peers=peers), allow_nan=False)


def _rounded(value: Any) -> Any:
    """Four significant decimals is plenty; infinity becomes null (JSON has no infinity)."""
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(item) for item in value]
    return value
