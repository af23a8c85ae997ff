"""How the demo talks: plain lines for logs and pipes, or lines plus a redrawn block on a TTY.

The narration is the same either way; only the status block differs. On a terminal it sits under
the narration and is redrawn in place (ANSI: cursor up, erase down) as the countdown runs; in plain
mode the tour prints a status line itself at the moments that matter.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from typing import Any, Protocol, TextIO

from supervisor.cli.console import duration

_BAR_WIDTH = 20


class Screen(Protocol):
    live: bool

    def say(self, line: str) -> None:
        """A line that stays."""

    def show(self, doc: Mapping[str, Any]) -> None:
        """The current status document (live: redraw the block; plain: nothing)."""

    def close(self) -> None:
        """Leave the terminal as it was found."""


class PlainScreen:
    live = False

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def show(self, doc: Mapping[str, Any]) -> None:
        return

    def close(self) -> None:
        return


class LiveScreen:
    """Narration scrolls up; a small status block stays at the bottom and is redrawn in place."""

    live = True

    def __init__(self, window_s: float, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.window_s = window_s
        self.block: list[str] = []
        self.out.write("\x1b[?25l")  # hide the cursor while redrawing

    def _erase_block(self) -> None:
        if self.block:
            self.out.write(f"\x1b[{len(self.block)}F\x1b[J")

    def _draw_block(self) -> None:
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
        for line in self.block:
            self.out.write(line[:width] + "\n")  # never wrap: the erase counts lines

    def say(self, line: str) -> None:
        self._erase_block()
        self.out.write(line + "\n")
        self._draw_block()
        self.out.flush()

    def show(self, doc: Mapping[str, Any]) -> None:
        self._erase_block()
        self.block = status_block(doc, self.window_s)
        self._draw_block()
        self.out.flush()

    def close(self) -> None:
        self._erase_block()
        self.block = []
        self.out.write("\x1b[?25h")
        self.out.flush()


def make_screen(live: bool | None, window_s: float) -> Screen:
    """Live when asked, or by default when stdout is a terminal; `live=False` forces plain."""
    use_live = sys.stdout.isatty() if live is None else live
    return LiveScreen(window_s) if use_live else PlainScreen()


def status_block(doc: Mapping[str, Any], window_s: float) -> list[str]:
    """Two or three lines: the host, and the swap in flight with its countdown bar."""
    host = doc["host"]
    dot = "●" if host.get("state") == "running" and host.get("ready") else "○"
    heartbeat = host.get("heartbeat_age_s")
    lines = [
        "  ┌─ live status " + "─" * 40,
        f"  │ host  {dot} {host.get('state')}{' (ready)' if host.get('ready') else ''}"
        f"  pid {host.get('pid') or '-'}  {host.get('status_text') or ''}"
        f"  heartbeat {duration(heartbeat) + ' ago' if heartbeat is not None else '-'}",
    ]
    swap = doc.get("swap")
    if swap is None:
        lines.append("  │ swap  none in flight")
    else:
        lines.append(f"  │ swap  {swap['id']}  {swap['state']}  {countdown(swap, window_s)}")
    lines.append("  └" + "─" * 55)
    return lines


def countdown(swap: Mapping[str, Any], window_s: float) -> str:
    """`[#######.....] 4.2s to the deadline`, or the step it is on when no clock runs yet."""
    remaining = swap.get("remaining_s")
    if swap.get("state") != "probation" or remaining is None:
        step = swap.get("step")
        return f"(step: {step})" if step else ""
    if swap.get("deadline_at") is None:
        return f"starting the new version (hard cap in {duration(remaining)})"
    filled = round(_BAR_WIDTH * min(1.0, max(0.0, remaining) / window_s))
    bar = "#" * filled + "." * (_BAR_WIDTH - filled)
    return f"[{bar}] {duration(max(0.0, remaining))} to the deadline"


def bullet(ok: bool, text: str) -> str:
    return f"  {'✓' if ok else '✗'} {text}"


def arrow(text: str) -> str:
    return f"  → {text}"


def heading(text: str) -> str:
    return f"\n{text}\n{'─' * len(text)}"
