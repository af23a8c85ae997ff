"""What the runtime shows: the status document and the Prometheus exposition.

Pure functions of a runtime's state taken on the loop thread; nothing here changes anything.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from supervisor import __version__, clock
from supervisor.core.lifecycle import Host, HostState
from supervisor.core.swaps import TERMINAL, SwapState

if TYPE_CHECKING:
    from supervisor.daemon.runtime import Runtime


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
        else {"code": last.code, "signal": last.signal, "at": clock.rfc3339(last.at)},
        "last_heartbeat_at": clock.rfc3339(_wall_of(host.last_heartbeat, boot_now, wall_now)),
        "heartbeat_age_s": heartbeat_age,
        "status_text": host.status_text,
        "code_version": code_version,
    }


def status(runtime: Runtime) -> dict[str, Any]:
    """The contract's GET /v1/status document (stable fields first; more may be added). Safe on
    any thread: it reads only values the loop replaces whole, never mutates in place. The host
    and the swap come as one pair, from one moment; the drift guard's few fields (strings and a
    flag, set on the loop) may be a moment apart from them."""
    boot_now, wall_now = clock.boot_clock(), time.time()
    host, swap = runtime.machines
    drift = runtime.drift_guard
    return {
        "supervisor": {
            "pid": os.getpid(),
            "version": __version__,
            "started_at": clock.rfc3339(runtime.started_at),
            "state_dir": str(runtime.config.state.dir),
            "cgroup": str(runtime.cgroup.path) if runtime.cgroup else None,
        },
        "host": host_view(
            host, boot_now=boot_now, wall_now=wall_now, code_version=drift.code_version
        ),
        "swap": swap.view(clock.now()) if swap is not None else None,
        "code": {
            "root": str(runtime.config.code.root),
            "head": drift.head,
            "drift": drift.drifted,
            "index_locked": runtime.code.index_locked(),  # someone's index.lock holds our index
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


def _line(
    out: list[str], name: str, kind: str, help_text: str, value: float | int, labels: str = ""
) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")
    out.append(f"{name}{labels} {value}")


def metrics(runtime: Runtime) -> str:
    """Prometheus text exposition format 0.0.4."""
    host = runtime.host
    boot_now = clock.boot_clock()
    counters = runtime.counters
    out: list[str] = []
    up = int(host.state in (HostState.STARTING, HostState.RUNNING))
    _line(out, "swapguard_host_up", "gauge", "1 while the host process is alive.", up)
    _line(out, "swapguard_host_ready", "gauge", "1 while the host is ready.", int(host.ready))
    _line(out, "swapguard_host_restarts_total", "counter", "Restarts of the host.", host.restarts)
    _line(out, "swapguard_host_spawns_total", "counter", "Host processes spawned.", counters.spawns)
    _line(
        out,
        "swapguard_host_failures",
        "gauge",
        "Consecutive host failures (backoff).",
        host.failures,
    )
    age = -1.0 if host.last_heartbeat is None else round(boot_now - host.last_heartbeat, 3)
    _line(
        out,
        "swapguard_heartbeat_age_seconds",
        "gauge",
        "Seconds since the last heartbeat (-1: none yet).",
        age,
    )
    _line(out, "swapguard_heartbeats_total", "counter", "Heartbeats received.", counters.heartbeats)
    _line(
        out,
        "swapguard_notify_datagrams_total",
        "counter",
        "Notify datagrams received.",
        counters.datagrams,
    )
    _line(
        out,
        "swapguard_notify_datagrams_dropped_total",
        "counter",
        "Datagrams dropped: sender outside the host's tree.",
        counters.datagrams_dropped,
    )
    _line(
        out,
        "swapguard_notify_datagrams_invalid_total",
        "counter",
        "Datagrams that did not parse.",
        counters.datagrams_invalid,
    )
    swap = runtime.swap
    _line(
        out,
        "swapguard_swap_in_flight",
        "gauge",
        "1 while a swap is in flight.",
        int(swap is not None),
    )
    remaining = -1.0
    if swap is not None:
        view = swap.view(clock.now())
        if view.get("remaining_s") is not None:
            remaining = float(view["remaining_s"])
    _line(
        out,
        "swapguard_swap_remaining_seconds",
        "gauge",
        "Seconds before the deadman rolls back (-1: no clock running).",
        remaining,
    )
    out.append("# HELP swapguard_swaps_finished_total Swaps finished since start, by final state.")
    out.append("# TYPE swapguard_swaps_finished_total counter")
    for state in [final for final in SwapState if final in TERMINAL]:  # in a stable order
        out.append(
            f'swapguard_swaps_finished_total{{state="{state}"}} '
            f"{counters.swaps_finished.get(state, 0)}"
        )
    _line(
        out,
        "swapguard_code_drift",
        "gauge",
        "1 when the code tree changed undeclared.",
        int(runtime.drift_guard.drifted),
    )
    _line(
        out,
        "swapguard_hook_events_dropped_total",
        "counter",
        "Events the hook never got: its queue was full, or it failed every attempt.",
        runtime.hooks.dropped,
    )
    _disk_lines(out, runtime)
    return "\n".join(out) + "\n"


def _disk_lines(out: list[str], runtime: Runtime) -> None:
    usage = runtime.work.usage
    if usage is not None:
        out.append(
            "# HELP swapguard_disk_used_bytes Bytes held by snapshots and by kept probation data."
        )
        out.append("# TYPE swapguard_disk_used_bytes gauge")
        out.append(f'swapguard_disk_used_bytes{{what="snapshots"}} {usage.snapshots}')
        out.append(f'swapguard_disk_used_bytes{{what="kept_data"}} {usage.kept}')
    _line(
        out,
        "swapguard_disk_budget_bytes",
        "gauge",
        "state.keep_bytes (0: no byte bound).",
        runtime.config.state.keep_bytes,
    )
    space = runtime.work.file_systems()
    for name, help_text, field in (
        ("swapguard_fs_free_bytes", "Free bytes of each file system involved.", "free"),
        ("swapguard_fs_size_bytes", "Size of each file system involved.", "size"),
    ):
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} gauge")
        for fs, _ in space:
            out.append(f'{name}{{path="{_label(fs.path)}"}} {getattr(fs, field)}')


def _label(value: str) -> str:
    """A Prometheus label value: backslash, double quote and line feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
