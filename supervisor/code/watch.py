"""Code-root events, debounced, handed to the loop.

The watcher does not decide what a change means: it only says "something under the root moved",
at most once per `debounce` seconds. The runtime then asks git whether the tree differs from the
version the host runs on, which also settles ignored files and swapguard's own restores (a restore
puts the tree back to a checkpoint, so it never reads as drift).

What is never code does not even wake it: `.git`, the non-code paths of the config, and files
matching the non-code patterns (bytecode, tool caches, `code.ignore`; `IgnoreRules`, the same
patterns git is given for the checkpoints). Python writing `__pycache__` at every start costs
nothing. A tracked file that matches a pattern is still code for the checkpoints, but its change
alone does not wake the watcher: the next drift check sees it.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from supervisor.config.noncode import GENERATED, IgnoreRules

log = logging.getLogger(__name__)
IDLE_TIMEOUT_S = 300.0
CHANGES = [
    FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileClosedEvent,
    DirCreatedEvent, DirDeletedEvent, DirModifiedEvent, DirMovedEvent,
]  # fmt: skip
"""What can change the tree. Opens and read-only closes are left out of the kernel's watch mask
itself (watchdog's `event_filter`): a host that reads its tree costs the watcher nothing."""
PARENT_NOTICES = sys.platform.startswith("linux")
"""inotify reports every change of a folder's entries as an event of the entry itself, and
watchdog adds a DirModifiedEvent of the folder to each: redundant, and it would make a file
written in `__pycache__` wake the watcher through `__pycache__`'s parent. Elsewhere (FSEvents'
rescan of a folder) such an event may be all there is, so it counts."""
# watchdog's inotify backend warns when a new subdirectory re-registers a watch; harmless noise.
warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: CodeWatcher) -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not self.watcher.wanted() or (PARENT_NOTICES and isinstance(event, DirModifiedEvent)):
            return
        paths = [event.src_path, getattr(event, "dest_path", "") or ""]
        is_dir = event.is_directory
        if any(path and not self.watcher.ignored(str(path), is_dir=is_dir) for path in paths):
            self.watcher.poke()


class CodeWatcher:
    """Calls `on_change()` (from its own thread) after a quiet `debounce` following any change."""

    def __init__(
        self,
        root: Path,
        on_change: Callable[[], object],
        *,
        ignore: Iterable[Path] = (),
        patterns: Sequence[str] = GENERATED,
        debounce: float = 0.3,
        wanted: Callable[[], bool] = lambda: True,
    ) -> None:
        """`ignore`: absolute paths that are never code; `patterns`: gitignore patterns, relative
        to root, of files that are never code (Config.non_code_paths / non_code_patterns).
        `wanted()` (read on the watcher's thread): False while nobody would act on a change (a
        swap in flight: its own steps rewrite the tree, and the drift check waits for its end);
        events then cost no pattern matching, which a restore of 100k files would pay for."""
        self.root = root
        self._root_prefix = str(root).rstrip("/") + "/"
        self._rules = IgnoreRules(patterns)
        self.on_change = on_change
        self.wanted = wanted
        self.debounce = debounce
        prefixes = [root / ".git", *ignore]
        self._ignore = tuple(str(p) for p in prefixes)
        self._timer: threading.Timer | None = None
        self._last_change = 0.0
        self._lock = threading.Lock()
        # The dispatcher blocks on its queue; stop() puts a sentinel there, so a long timeout only
        # spares an idle swapguard a wake-up every second (watchdog's default).
        self._observer = Observer(timeout=IDLE_TIMEOUT_S)
        self._observer.daemon = True
        self._observer.schedule(_Handler(self), str(root), recursive=True, event_filter=CHANGES)

    def ignored(self, path: str, *, is_dir: bool = False) -> bool:
        """Whether a change at `path` (absolute, as watchdog names it) is never a code change."""
        if any(
            path == prefix or path.startswith(prefix + "/") or path.startswith(prefix + "-")
            for prefix in self._ignore
        ):
            return True
        relative = path.removeprefix(self._root_prefix)
        return relative != path and self._rules.matches(relative, is_dir=is_dir)

    def start(self) -> None:
        self._observer.start()

    def poke(self) -> None:
        """A change: fire once the tree has been quiet for `debounce`. One timer at a time, moved
        on by its own firing (a burst of a hundred thousand events starts no thread each)."""
        with self._lock:
            self._last_change = time.monotonic()
            if self._timer is None:
                self._arm(self.debounce)

    def _arm(self, delay: float) -> None:
        self._timer = threading.Timer(delay, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            quiet_for = time.monotonic() - self._last_change
            if quiet_for < self.debounce:
                self._arm(self.debounce - quiet_for)  # changes came since: wait for the quiet
                return
            self._timer = None
        try:
            self.on_change()
        except Exception:  # the loop may be closing; the watcher must not die noisily
            log.debug("code watcher callback failed", exc_info=True)

    def stop(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        self._observer.stop()
        self._observer.join(timeout=5)
