"""The code watcher on a real tree: a change is told once the tree is quiet, a read is not a
change, and a burst of thousands of events costs neither a thread nor a call each."""

from __future__ import annotations

import threading
from pathlib import Path

from supervisor.code.watch import CodeWatcher
from supervisor.config.noncode import GENERATED
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


def test_generated_files_do_not_wake_it(tmp_path: Path) -> None:
    """Python writing bytecode (a temp file renamed into `__pycache__`), a test run's cache and
    an editor's swap file are no change; a `code.ignore` pattern neither; code still is."""
    (tmp_path / "pkg").mkdir()
    calls: list[int] = []
    watcher = CodeWatcher(
        tmp_path, lambda: calls.append(1), patterns=(*GENERATED, "tmp/"), debounce=0.2
    )
    woke: list[str] = []  # the paths that passed the filter
    ignored = watcher.ignored

    def recording(path: str, *, is_dir: bool = False) -> bool:
        if not (result := ignored(path, is_dir=is_dir)):
            woke.append(path)
        return result

    watcher.ignored = recording  # type: ignore[method-assign]
    watcher.start()
    try:
        cache = tmp_path / "pkg" / "__pycache__"
        cache.mkdir()
        (cache / "mod.cpython-311.pyc.140").write_bytes(b"bytecode")
        (cache / "mod.cpython-311.pyc.140").rename(cache / "mod.cpython-311.pyc")
        (tmp_path / ".pytest_cache" / "v").mkdir(parents=True)
        (tmp_path / ".pytest_cache" / "v" / "lastfailed").write_text("{}")
        (tmp_path / "pkg" / ".mod.py.swp").write_text("vim")
        (tmp_path / "tmp").mkdir()
        (tmp_path / "tmp" / "scratch").write_text("x")
        (tmp_path / "pkg" / "mod.py").write_text("VERSION = 2\n")  # the one change of code
        wait_for(lambda: calls, what="the code change")
        (tmp_path / "pkg" / "__pycache__" / "other.cpython-311.pyc").write_bytes(b"more")
        (tmp_path / "marker.py").write_text("")
        wait_for(lambda: len(calls) >= 2, what="the marker")
        assert set(woke) == {str(tmp_path / "pkg" / "mod.py"), str(tmp_path / "marker.py")}
        assert watcher.ignored(str(cache / "x.pyc"))
        assert watcher.ignored(str(cache), is_dir=True)
        assert not watcher.ignored(str(tmp_path / "pkg" / "mod.py"))
    finally:
        watcher.stop()
