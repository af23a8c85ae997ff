"""The drift guard: the code baseline, and changes to the tree that no swap declared.

Why it exists: a host that rewrites its code without preparing a swap leaves nothing to roll back
to. The baseline is a checkpoint of the code the running host was started on (taken at start,
after a confirmed swap, after a rollback's restore, and when a drifted tree is started); a tree
that differs from it has drifted. Drift is reported as a `code.drift` event, and with
`undeclared_changes = "guard"` it becomes an automatic swap prepared *from the baseline*, so the
deadman clock can roll the change back. Status shows the baseline's commit (`code_version`), the
HEAD the host was started on, and whether the tree has drifted.

Rules it keeps:
- Loop thread only. Git and the baseline's store writes run in the runtime's worker pool; their
  results come back through `call_soon_threadsafe`.
- No drift check while a baseline refresh is pending: it would compare against the version from
  before a confirmed swap and "guard" the one just confirmed. A change seen meanwhile is checked
  once the refresh settles.
- A check answered against a baseline that has since been replaced is asked again, never acted on.
- Nothing is checked or guarded while a swap is in flight: the swap owns the tree then.
- It reaches the runtime only through the three callables it is given (`swap_in_flight`, `emit`,
  `prepare_swap`), and the runtime reads it only through its public methods and attributes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from supervisor.code.checkpoint import Checkpoint, CodeTree
from supervisor.config.schema import CodeConfig
from supervisor.core import swaps
from supervisor.daemon.swapwork import BASELINE_KEY
from supervisor.errors import SwapguardError
from supervisor.state.store import Store

log = logging.getLogger(__name__)

BASELINE_CONFIRMED_KEY = "host_checkpoint_confirmed"
"""Store key of the confirmed swap whose code the baseline was last taken from: a supervisor
killed between a confirm and that refresh takes it on restart, else the drift guard would
prepare from the code before the swap (and its rollback would undo the confirmed version)."""


class DriftGuard:
    """Owns the baseline and the drift flag. Construct and call on the runtime's loop thread."""

    def __init__(
        self,
        config: CodeConfig,
        store: Store,
        code: CodeTree,
        pool: ThreadPoolExecutor,
        *,
        swap_in_flight: Callable[[], bool],
        emit: Callable[[str, Mapping[str, Any]], None],
        prepare_swap: Callable[[str, Checkpoint], None],
    ) -> None:
        """`prepare_swap(summary, checkpoint)` starts an automatic swap from that checkpoint in
        the background; `emit(kind, detail)` records an audit event."""
        self.config = config
        self.store = store
        self.code = code
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self._swap_in_flight = swap_in_flight
        self._emit = emit
        self._prepare_swap = prepare_swap
        self.drifted = False
        self._pending = False  # a baseline refresh after a confirm is on its way
        self._recheck = False  # a change was seen while it was
        baseline = store.get_value(BASELINE_KEY)
        self.code_version: str | None = (
            baseline.get("commit") if isinstance(baseline, dict) else None
        )
        self.head: str | None = baseline.get("head") if isinstance(baseline, dict) else None

    async def take_at_start(self, *, adopted: bool) -> None:
        """The checkpoint of the code the host starts on: what the drift guard falls back to.

        Taken unless a swap is in flight, or an adopted host already has one that no confirm
        (made while swapguard was down) has outdated."""
        newest = self.store.list_swaps(limit=1)
        confirmed = newest[0]["id"] if newest and newest[0]["state"] == "confirmed" else None
        unsettled = confirmed is not None and (
            self.store.get_value(BASELINE_CONFIRMED_KEY) != confirmed
        )
        if not self._swap_in_flight() and (not adopted or self.code_version is None or unsettled):
            await self.loop.run_in_executor(self.pool, self._refresh_baseline_blocking, confirmed)

    def on_tree_changed(self) -> None:
        """From the watcher (via call_soon_threadsafe): compare the tree with the running code."""
        if self._swap_in_flight() or self.config.undeclared_changes == "ignore":
            return
        if self._pending:
            self._recheck = True
            return
        baseline = self.store.get_value(BASELINE_KEY)
        if not isinstance(baseline, dict):
            return
        checkpoint = Checkpoint.from_json(baseline)
        future = self.loop.run_in_executor(self.pool, self.code.differs, checkpoint)

        def done(finished: asyncio.Future[bool]) -> None:
            if finished.exception() is None and finished.result():
                self._on_drift(checkpoint)

        future.add_done_callback(done)

    def on_host_spawned(self) -> None:
        """A new host process: status shows its HEAD, and a drifted tree it starts on is the
        baseline from now on (outside a swap)."""
        self.pool.submit(self._refresh_head_blocking)
        if self.drifted and not self._swap_in_flight():
            self.pool.submit(self._refresh_baseline_blocking)

    def on_swap_finished(self, swap: swaps.Swap) -> None:
        """A confirmed swap's tree becomes the baseline; after an abort or a rollback the tree is
        the restored checkpoint again, which is not drift."""
        if swap.state is swaps.SwapState.CONFIRMED:
            # Until the confirmed tree is the baseline, a drift check would compare against the
            # version before the swap and "guard" the one just confirmed.
            self._pending = True
            self.pool.submit(self._refresh_baseline_blocking, swap.id)
        else:
            self.drifted = False

    def baseline_taken(self, checkpoint: Checkpoint) -> None:
        """On the loop: `checkpoint` (just stored as the baseline) is the code the host runs on."""
        self.head = checkpoint.head
        self.code_version = checkpoint.commit
        if not self._swap_in_flight():
            self.drifted = False
        self._settled()

    def _on_drift(self, baseline: Checkpoint) -> None:
        if self._swap_in_flight() or self.drifted or self._pending:
            return
        if baseline.commit != self.code_version:  # compared against a baseline since replaced
            self.on_tree_changed()
            return
        self.drifted = True
        self._emit("code.drift", {"root": str(self.config.root)})
        if self.config.undeclared_changes == "guard":
            self._prepare_swap("undeclared change (guard)", baseline)

    def _settled(self) -> None:
        self._pending = False
        if self._recheck:
            self._recheck = False
            self.on_tree_changed()

    def _refresh_baseline_blocking(self, confirmed: str | None = None) -> None:
        """In a worker. `confirmed`: the id of the confirmed swap whose code this baseline is."""
        try:
            checkpoint = self.code.take("baseline")  # which checks the tree first
        except SwapguardError as exc:
            log.warning("no code baseline: %s", exc.message)
            self.loop.call_soon_threadsafe(self._settled)
            return
        self.store.set_value(BASELINE_KEY, checkpoint.to_json())
        if confirmed is not None:
            self.store.set_value(BASELINE_CONFIRMED_KEY, confirmed)
        self.loop.call_soon_threadsafe(self.baseline_taken, checkpoint)

    def _refresh_head_blocking(self) -> None:
        """In a worker: status shows the HEAD the host was started on; git is asked off the loop."""
        try:
            head = self.code.head()
        except SwapguardError:
            return
        self.loop.call_soon_threadsafe(setattr, self, "head", head)
