"""The code watcher on a real tree: a change is told once the tree is quiet, a read is not a
change, and a burst of thousands of events costs neither a thread nor a call each."""

from __future__ import annotations

import threading
from pathlib import Path

from supervisor.code.watch import CodeWatcher
from tests.support import wait_for


def watching(root: Path, ignore: tuple[Path, ...] = ()) -> tuple[CodeWatcher, list[int]]:
    calls: list[int] = []
    watcher = CodeWatcher(root, lambda: calls.append(1), ignore=ignore, debounce=0.2)
    watcher.start()
    return watcher, calls


def test_a_change_is_told_once_the_tree_is_quiet(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("v1\n")
    watcher, calls = watching(tmp_path)
    try:
        (tmp_path / "app.py").write_text("v2\n")
        wait_for(lambda: calls, what="the change")
        # a read is no change: reading every file again makes no further call
        for _ in range(50):
            (tmp_path / "app.py").read_text()
        (tmp_path / "marker").write_text("")  # a later change proves the watcher still works
        wait_for(lambda: len(calls) >= 2, what="the marker")
        assert len(calls) == 2
    finally:
        watcher.stop()


def test_a_burst_costs_no_thread_per_event(tmp_path: Path) -> None:
    watcher, calls = watching(tmp_path, ignore=(tmp_path / "ignored",))
    try:
        threads_before = threading.active_count()
        peak = threads_before
        for number in range(3000):
            (tmp_path / f"f{number}").write_text("x")
            if number % 100 == 0:
                peak = max(peak, threading.active_count())
        wait_for(lambda: calls, what="the burst told")
        assert peak <= threads_before + 2
        assert len(calls) <= 3  # debounced: once the burst stopped (a slow disk: a pause or two)
        (tmp_path / "ignored").mkdir()
        (tmp_path / "ignored" / "x").write_text("x")
        (tmp_path / "seen").write_text("")
        count = len(calls)
        wait_for(lambda: len(calls) > count, what="the change after the ignored one")
    finally:
        watcher.stop()
