"""Human renderings for the CLI: `status` like `systemctl status`, `swap list` as a table.

Pure: documents in, text out, so they are tested without a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from supervisor.control.views import exit_text
from supervisor.core.instant import wall_of


def duration(seconds: float | None) -> str:
    """`1h 2m`, `3m 4s`, `5.2s`, `120ms` — the largest two units that matter."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GiB"


def _since(stamp: str | None) -> float | None:
    if not stamp:
        return None
    return max(0.0, time.time() - wall_of(stamp))


def describe_exit(last_exit: Mapping[str, Any] | None) -> str:
    if not last_exit:
        return "-"
    what = exit_text(last_exit)
    ago = _since(last_exit.get("at"))
    return what if ago is None else f"{what}, {duration(ago)} ago"


def _dot(state: str, ready: bool) -> str:
    if state == "running" and ready:
        return "●"
    if state in ("backoff", "stopped"):
        return "○"
    return "◐"


def render_status(doc: Mapping[str, Any]) -> str:
    sup, host, code, swap = doc["supervisor"], doc["host"], doc["code"], doc.get("swap")
    state = host["state"]
    headline = f"{state}{' (ready)' if host.get('ready') else ''}"
    if state == "backoff" and host.get("backoff_remaining_s") is not None:
        headline += f", next start in {duration(host['backoff_remaining_s'])}"
    rows: list[tuple[str, str]] = [
        (
            "Supervisor",
            f"pid {sup['pid']}, swapguard {sup['version']}, "
            f"up {duration(_since(sup.get('started_at')))}",
        ),
        (
            "Host",
            f"pid {host['pid'] or '-'}, up {duration(host.get('uptime_s'))}, "
            f"restarts {host.get('restarts', 0)}",
        ),
        ("Last exit", describe_exit(host.get("last_exit"))),
    ]
    heartbeat = (
        "none since it started"
        if host.get("heartbeat_age_s") is None
        else (f"{duration(host['heartbeat_age_s'])} ago")
    )
    if host.get("status_text"):
        heartbeat += f'  "{host["status_text"]}"'
    rows.append(("Heartbeat", heartbeat))
    if "memory_bytes" in host:
        rows.append(
            (
                "Tree",
                f"{host.get('processes', 0)} processes, memory "
                f"{size(host['memory_bytes'])}, CPU {duration(host.get('cpu_s'))}",
            )
        )
    head = (code.get("head") or "-")[:12]
    rows.append(
        (
            "Code",
            f"{code['root']} @ {head}" + (" (undeclared changes)" if code.get("drift") else ""),
        )
    )
    rows.append(("Swap", render_swap_line(swap) if swap else "none in flight"))
    if (disk := doc.get("disk")) is not None:
        rows.append(("Disk", render_disk_line(disk)))
    width = max(len(label) for label, _ in rows)
    lines = [f"{_dot(state, bool(host.get('ready')))} swapguard: host {headline}"]
    lines += [f"  {label:>{width}}: {value}" for label, value in rows]
    return "\n".join(lines)


def render_disk_line(disk: Mapping[str, Any]) -> str:
    """`snapshots 96.0MiB + kept data 48.0MiB of 2.0GiB; 3.1GiB free on /srv/app/.swapguard`"""
    used = f"snapshots {size(disk.get('snapshots_bytes'))} + kept data "
    used += size(disk.get("kept_data_bytes"))
    if disk.get("keep_bytes"):
        used += f" of {size(disk['keep_bytes'])}"
    free = [f"{size(fs['free_bytes'])} free on {fs['path']}" for fs in disk.get("file_systems", [])]
    return "; ".join([used, *free])


def render_swap_line(swap: Mapping[str, Any]) -> str:
    text = f"{swap['id']} {swap['state']}"
    if swap.get("step"):
        text += f" ({swap['step']})"
    if swap.get("summary"):
        text += f' "{swap["summary"]}"'
    if swap.get("remaining_s") is not None and swap.get("deadline_at"):
        text += f" - {countdown(swap['remaining_s'])} left, deadline {swap['deadline_at']}"
    elif swap.get("remaining_s") is not None:
        text += f" - activating, hard cap in {countdown(swap['remaining_s'])}"
    if swap.get("reason"):
        text += f", reason {swap['reason']}"
    return text


def held_as(item: Mapping[str, Any]) -> str:
    """How a data entry's snapshot is held: its digest, or why there is none."""
    if item.get("sha256"):
        return f"sha256 {str(item['sha256'])[:12]}"
    held = item.get("held", "linked" if item.get("linked") else None)
    if held == "linked":
        return "kept as the original file (the new version ran on a copy; not hashed)"
    if held == "absent":
        return "absent at activation (a rollback moves aside what the new version made)"
    return "no digest recorded"


def countdown(seconds: float) -> str:
    whole = max(0, int(seconds))
    return f"{whole // 60:d}:{whole % 60:02d}"


def render_swap_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "no swaps yet"
    header = ("ID", "STATE", "REASON", "CREATED", "FINISHED", "SUMMARY")
    body = [
        (
            row["id"],
            row["state"],
            row.get("reason") or "-",
            row.get("created_at") or "-",
            row.get("finished_at") or "-",
            (row.get("summary") or "")[:40],
        )
        for row in rows
    ]
    widths = [max(len(str(line[i])) for line in (header, *body)) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in (header, *body)
    ]
    return "\n".join(line.rstrip() for line in lines)


def render_swap(doc: Mapping[str, Any]) -> str:
    lines = [render_swap_line(doc)]
    for key in ("created_at", "activated_at", "deadline_at", "hard_cap_at", "finished_at"):
        if doc.get(key):
            lines.append(f"  {key}: {doc[key]}")
    changes = doc.get("changes") or []
    if changes:
        lines.append(f"  changes ({len(changes)}):")
        lines += [f"    {c['change']:<8} {c['path']}" for c in changes[:50]]
    for item in doc.get("data") or []:
        lines.append(f"  data: {item['path']} {size(item.get('bytes'))} {held_as(item)}")
    for event in doc.get("events") or []:
        lines.append(f"  {event['at']}  {event['event']}  {event.get('detail') or ''}")
    return "\n".join(lines)
