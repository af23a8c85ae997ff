"""What the runtime shows: the status document and the Prometheus exposition.

Pure functions of a runtime's state taken on the loop thread; nothing here changes anything.
Each view tells only what is known: no heartbeat age for a host that never sent a heartbeat (in
the status, the console and /metrics alike), and every exit with why it happened. The metrics
are one table, `METRICS`: a name, a type, a help text and how its value is read.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from supervisor import __version__, clock
from supervisor.core.instant import Instant
from supervisor.core.lifecycle import ExitReason, Host, HostState
from supervisor.core.supervisionrecord import Liveness
from supervisor.core.swaps import TERMINAL, Swap, SwapState

if TYPE_CHECKING:
    from supervisor.core.diskbudget import FileSystem
    from supervisor.daemon.counters import Counters
    from supervisor.daemon.runtime import Runtime
    from supervisor.data.diskusage import Usage


def _wall_of(boot_moment: float | None, boot_now: float, wall_now: float) -> float | None:
    if boot_moment is None:
        return None
    return wall_now - (boot_now - boot_moment)


def host_view(host: Host, *, boot_now: float, wall_now: float, code_version: str | None) -> dict:
    last = host.last_exit
    heartbeat_age = (
        None if host.last_heartbeat is None else round(boot_now - host.last_heartbeat, 3)
    )
    uptime = None
    if host.started_at is not None and host.state in (HostState.STARTING, HostState.RUNNING):
        uptime = round(boot_now - host.started_at, 3)
    # A start whose spawn waits (a code check while a swap is prepared) has no process yet:
    # nothing runs, so the host shows as stopped until it has a pid.
    state = host.state
    if state is HostState.STARTING and host.pid is None:
        state = HostState.STOPPED
    backoff = None
    if host.state is HostState.BACKOFF and host.backoff_until is not None:
        backoff = round(max(0.0, host.backoff_until - boot_now), 3)
    return {
        "state": state.value,
        "pid": host.pid,
        "ready": host.ready,
        "started_at": clock.rfc3339(_wall_of(host.started_at, boot_now, wall_now)),
        "uptime_s": uptime,
        "restarts": host.restarts,
        "failures": host.failures,
        "backoff_remaining_s": backoff,
        "last_exit": None
        if last is None
        else {
            "code": last.code,
            "signal": last.signal,
            "at": clock.rfc3339(last.at),
            "reason": None if last.reason is None else last.reason.value,
        },
        "last_heartbeat_at": clock.rfc3339(_wall_of(host.last_heartbeat, boot_now, wall_now)),
        "heartbeat_age_s": heartbeat_age,
        "status_text": host.status_text,
        "code_version": code_version,
    }


EXIT_REASONS = {
    "stop": "stopped",
    "restart": "restarted",
    "heartbeat_lost": "heartbeat lost",
    "start_timeout": "not ready in time",
    "unhealthy": "health check failed",
    "crash": "crashed",
    "exit": "exited on its own",
    "spawn_failed": "could not be started",
}
"""How the console and the page say why the host's last run ended (`last_exit.reason`)."""


def exit_text(last_exit: Mapping[str, Any]) -> str:
    """`killed by signal 15 (heartbeat lost)`: how the last run ended and why."""
    if last_exit.get("signal") is not None:
        what = f"killed by signal {last_exit['signal']}"
    elif last_exit.get("code") is not None:
        what = f"exit {last_exit['code']}"
    else:
        what = "exited (status unknown)"
    if reason := last_exit.get("reason"):
        what += f" ({EXIT_REASONS.get(reason, reason)})"
    return what


def status(runtime: Runtime) -> dict[str, Any]:
    """The contract's GET /v1/status document (stable fields first; more may be added). Safe on
    any thread: it reads only values the loop replaces whole, never mutates in place. The host
    and the swap come as one pair, from one moment; the drift guard's few fields (strings and a
    flag, set on the loop) may be a moment apart from them."""
    boot_now, wall_now = clock.boot_clock(), time.time()
    published = runtime.published  # one record: host, swap and liveness from one moment
    host, swap = published.host, published.swap
    drift = runtime.drift_guard
    host_doc = host_view(
        host, boot_now=boot_now, wall_now=wall_now, code_version=drift.code_version
    )
    host_doc["liveness_failures"] = _liveness_failures(published.liveness)
    return {
        "supervisor": {
            "pid": os.getpid(),
            "version": __version__,
            "started_at": clock.rfc3339(runtime.started_at),
            "state_dir": str(runtime.config.state.dir),
            "cgroup": str(runtime.cgroup.path) if runtime.cgroup else None,
        },
        "host": host_doc,
        "swap": swap.view(clock.now()) if swap is not None else None,
        "code": {
            "root": str(runtime.config.code.root),
            "head": drift.head,
            "drift": drift.drifted,
            "index_locked": runtime.code.index_locked(),  # someone's index.lock holds our index
            "foreign_locks": runtime.code.foreign_locks(),  # locks in .git that are not ours
        },
        "disk": disk_view(runtime),
    }


def disk_view(runtime: Runtime) -> dict[str, Any]:
    """What the snapshots and the kept probation data hold (as last measured: at start, after
    each activation and each finished swap) and the space of each file system involved (now)."""
    usage = runtime.work.usage
    budget = runtime.config.state.keep_bytes
    return {
        "keep_bytes": budget or None,
        "used_bytes": None if usage is None else usage.snapshots + usage.kept,
        "snapshots_bytes": None if usage is None else usage.snapshots,
        "kept_data_bytes": None if usage is None else usage.kept,
        "swaps_held": None if usage is None else sum(1 for held in usage.held if held.total),
        "measured_at": None if usage is None else clock.rfc3339(usage.measured_at),
        "file_systems": [
            {"path": fs.path, "holds": holds, "free_bytes": fs.free, "size_bytes": fs.size}
            for fs, holds in runtime.work.file_systems()
        ],
    }


def _liveness_failures(liveness: Liveness) -> int | None:
    """Failed liveness checks in a row; None while the liveness check does not run."""
    return None if liveness.next_at is None else liveness.failures


@dataclass(frozen=True, slots=True)
class Reading:
    """What /metrics reads, taken once on the loop thread: every metric sees the same moment."""

    host: Host
    swap: Swap | None
    liveness: Liveness
    counters: Counters
    drifted: bool
    drift_checks: int
    hook_events_dropped: int
    boot_now: float
    now: Instant
    disk_usage: Usage | None  # as last measured; None until the first measure
    keep_bytes: int
    file_systems: Sequence[FileSystem]


Sample = float | Mapping[str, float] | None
"""A metric's value now: one number, numbers by label value, or None: no sample (nothing to
tell, e.g. the age of a heartbeat that never came)."""


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    kind: Literal["gauge", "counter"]
    help: str
    value: Callable[[Reading], Sample]
    label: str | None = None  # the label of a metric whose value is a mapping


def _heartbeat_age(r: Reading) -> float | None:
    beat = r.host.last_heartbeat
    return None if beat is None else round(r.boot_now - beat, 3)


def _remaining(r: Reading) -> float:
    remaining = None if r.swap is None else r.swap.remaining_s(r.now)
    return -1.0 if remaining is None else remaining


def _finished(r: Reading) -> Mapping[str, float]:
    finished = r.counters.swaps_finished
    return {state: finished.get(state, 0) for state in SwapState if state in TERMINAL}


def _exits(r: Reading) -> Mapping[str, float]:
    return {reason: r.counters.exits.get(reason, 0) for reason in ExitReason}


def _disk_used(r: Reading) -> Mapping[str, float] | None:
    usage = r.disk_usage
    return None if usage is None else {"snapshots": usage.snapshots, "kept_data": usage.kept}


METRICS: tuple[Metric, ...] = (
    Metric("swapguard_host_up", "gauge", "1 while the host process is alive.",
           lambda r: int(r.host.state in (HostState.STARTING, HostState.RUNNING))),
    Metric("swapguard_host_ready", "gauge", "1 while the host is ready.",
           lambda r: int(r.host.ready)),
    Metric("swapguard_host_restarts_total", "counter", "Restarts of the host.",
           lambda r: r.host.restarts),
    Metric("swapguard_host_spawns_total", "counter", "Host processes spawned.",
           lambda r: r.counters.spawns),
    Metric("swapguard_host_failures", "gauge", "Consecutive host failures (backoff).",
           lambda r: r.host.failures),
    Metric("swapguard_host_liveness_failures", "gauge",
           "Failed liveness checks in a row (no sample: the liveness check is not running).",
           lambda r: _liveness_failures(r.liveness)),
    Metric("swapguard_host_exits_total", "counter",
           "Exits of the host's process since start, by why it ended.", _exits, "reason"),
    Metric("swapguard_heartbeat_age_seconds", "gauge",
           "Seconds since the host's last heartbeat (no sample: none since it started).",
           _heartbeat_age),
    Metric("swapguard_heartbeats_total", "counter",
           "Heartbeats received (WATCHDOG=1, STATUS=, POST /v1/heartbeat).",
           lambda r: r.counters.heartbeats),
    Metric("swapguard_notify_datagrams_total", "counter", "Notify datagrams received.",
           lambda r: r.counters.datagrams),
    Metric("swapguard_notify_datagrams_dropped_total", "counter",
           "Datagrams dropped: sender outside the host's tree.",
           lambda r: r.counters.datagrams_dropped),
    Metric("swapguard_notify_datagrams_invalid_total", "counter",
           "Datagrams that did not parse.", lambda r: r.counters.datagrams_invalid),
    Metric("swapguard_swap_in_flight", "gauge", "1 while a swap is in flight.",
           lambda r: int(r.swap is not None)),
    Metric("swapguard_swap_remaining_seconds", "gauge",
           "Seconds before the deadman rolls back (-1: no clock running).", _remaining),
    Metric("swapguard_swaps_finished_total", "counter",
           "Swaps finished since start, by final state.", _finished, "state"),
    Metric("swapguard_code_drift", "gauge", "1 when the code tree changed undeclared.",
           lambda r: int(r.drifted)),
    Metric("swapguard_code_drift_checks_total", "counter",
           "Comparisons of the code tree with the baseline finished (the watcher at work).",
           lambda r: r.drift_checks),
    Metric("swapguard_hook_events_dropped_total", "counter",
           "Events the hook never got: its queue was full, or it failed every attempt.",
           lambda r: r.hook_events_dropped),
    Metric("swapguard_disk_used_bytes", "gauge",
           "Bytes held by snapshots and by kept probation data (no sample: not measured yet).",
           _disk_used, "what"),
    Metric("swapguard_disk_budget_bytes", "gauge", "state.keep_bytes (0: no byte bound).",
           lambda r: r.keep_bytes),
    Metric("swapguard_fs_free_bytes", "gauge", "Free bytes of each file system involved.",
           lambda r: {fs.path: fs.free for fs in r.file_systems}, "path"),
    Metric("swapguard_fs_size_bytes", "gauge", "Size of each file system involved.",
           lambda r: {fs.path: fs.size for fs in r.file_systems}, "path"),
)  # fmt: skip
"""Every metric /metrics shows, in its order: add one here and nowhere else."""


def render_metrics(metrics: Sequence[Metric], reading: Reading) -> str:
    """Prometheus text exposition format 0.0.4 of `metrics` as `reading` has them."""
    out: list[str] = []
    for metric in metrics:
        out.append(f"# HELP {metric.name} {metric.help}")
        out.append(f"# TYPE {metric.name} {metric.kind}")
        value = metric.value(reading)
        if isinstance(value, Mapping):
            assert metric.label is not None, f"{metric.name} has values by label but no label"
            out += [
                f'{metric.name}{{{metric.label}="{_label(key)}"}} {n}' for key, n in value.items()
            ]
        elif value is not None:
            out.append(f"{metric.name} {value}")
    return "\n".join(out) + "\n"


def _label(value: str) -> str:
    """A Prometheus label value: backslash, double quote and line feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics(runtime: Runtime) -> str:
    """The runtime's metrics now; on the loop thread (the counters are the loop's)."""
    reading = Reading(
        host=runtime.host,
        swap=runtime.swap,
        liveness=runtime.state.liveness,
        counters=runtime.counters,
        drifted=runtime.drift_guard.drifted,
        drift_checks=runtime.drift_guard.checks,
        hook_events_dropped=runtime.hooks.dropped,
        boot_now=clock.boot_clock(),
        now=clock.now(),
        disk_usage=runtime.work.usage,
        keep_bytes=runtime.config.state.keep_bytes,
        file_systems=[fs for fs, _ in runtime.work.file_systems()],
    )
    return render_metrics(METRICS, reading)
