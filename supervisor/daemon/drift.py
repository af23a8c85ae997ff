"""The drift guard: the code baseline, and changes to the tree that no swap declared.

Why it exists: a host that rewrites its code without preparing a swap leaves nothing to roll back
to. The baseline is a checkpoint of the code the running host was started on (taken at start,
right after the host's spawn, after a confirmed swap, after a rollback's restore, and when a
drifted tree is started); a tree
that differs from it has drifted. Drift is reported as a `code.drift` event, and with
`undeclared_changes = "guard"` it becomes an automatic swap prepared *from the baseline*, so the
deadman clock can roll the change back. Status shows the baseline's commit (`code_version`), the
HEAD the host was started on, and whether the tree has drifted.

Rules it keeps:
- Loop thread only. Git and the baseline's store writes run in the runtime's worker pool; their
  results come back through `call_soon_threadsafe`.
- No drift check while a baseline refresh is pending: it would compare against the version from
  before a confirmed swap (or, at start, the version of an earlier run) and "guard" the one the
  host runs. A change seen meanwhile is checked once the refresh settles, and a prepare waits for
  it (`settled`): every swap is prepared with the host's baseline in place.
- The baseline at start is taken after the host is spawned (git's processes are the larger part
  of a cold start): a run spawned while a refresh is pending is recorded without a code version,
  which the baseline fills in (`record_code_version`). A run adopted without one (swapguard was
  killed before its baseline was taken) gets its baseline then.
- The tree at start is not trusted as the baseline: when an earlier one is stored, a tree that
  differs from it (changed while swapguard was down, or by the host as it started) keeps the
  earlier one, and the drift check that follows reports it (and guards from the earlier one).
  Only a confirm made while swapguard was down explains a difference; with no earlier baseline
  (a first start) there is nothing to compare with.
- The HEAD shown for a new host is read by one git run at a time: a spawn while one is queued
  waits for it, a spawn while one runs has it run once more (a crash loop does not queue one per
  restart).
- A check answered against a baseline that has since been replaced is asked again, never acted on.
- Nothing is checked or guarded while a swap is in flight: the swap owns the tree then.
- It reaches the runtime only through the callables it is given (`swap_in_flight`, `emit`,
  `prepare_swap`, `record_code_version`), and the runtime reads it only through its public
  methods and attributes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from supervisor.code import refstat
from supervisor.code.checkpoint import Checkpoint, CodeTree
from supervisor.config.schema import CodeConfig
from supervisor.core import swaps
from supervisor.daemon import faults
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
        record_code_version: Callable[[str], None],
    ) -> None:
        """`prepare_swap(summary, checkpoint)` starts an automatic swap from that checkpoint in
        the background; `emit(kind, detail)` records an audit event; `record_code_version(commit)`
        records the baseline as the code of a run spawned while it was pending."""
        self.config = config
        self.store = store
        self.code = code
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self._swap_in_flight = swap_in_flight
        self._emit = emit
        self._prepare_swap = prepare_swap
        self._record_code_version = record_code_version
        self.drifted = False
        self.checks = 0  # comparisons of the tree with the baseline finished (a metric)
        self._last_check_error: str | None = None  # the last failed check's cause, logged once
        self._pending = False  # a baseline refresh (at start, after a confirm) is on its way
        self._recheck = False  # a change was seen while it was
        self._unversioned_run = False  # the current run was spawned while it was
        self._settle_waiters: list[asyncio.Future[None]] = []
        self._head_job: Future[None] | None = None
        self._head_again = False  # a spawn came while the job ran: read HEAD once more
        # planned at start: (the confirmed swap it settles, the stored baseline to compare with)
        self._at_start: tuple[str | None, Checkpoint | None] | None = None
        self._head_signature: refstat.Signature | None = None  # of the HEAD last read (worker)
        baseline = store.get_value(BASELINE_KEY)
        self.code_version: str | None = (
            baseline.get("commit") if isinstance(baseline, dict) else None
        )
        self.head: str | None = baseline.get("head") if isinstance(baseline, dict) else None

    def plan_at_start(self, *, adopted: bool, run_code_version: str | None) -> None:
        """Before the host is started: is the checkpoint of the code it starts on (what the drift
        guard falls back to) to be taken? If so, from now on drift checks and prepares wait for
        it (`settled`), and a run spawned meanwhile gets it as its code version. `take_at_start`
        then takes it, once the host is spawned.

        Taken unless a swap is in flight, or an adopted host already has one
        (`run_code_version`) that no confirm (made while swapguard was down) has outdated."""
        newest = self.store.list_swaps(limit=1)
        confirmed = newest[0]["id"] if newest and newest[0]["state"] == "confirmed" else None
        unsettled = confirmed is not None and (
            self.store.get_value(BASELINE_CONFIRMED_KEY) != confirmed
        )
        missing = self.code_version is None or run_code_version is None
        if not self._swap_in_flight() and (not adopted or missing or unsettled):
            self._pending = True
            stored = self.store.get_value(BASELINE_KEY)
            # The code an earlier run was started on: a tree that differs from it now changed
            # while no baseline was pending (swapguard down, or the host at its start), and no
            # swap declared it, unless a confirm made while swapguard was down explains it.
            keep = isinstance(stored, dict) and not unsettled
            keep = keep and self.config.undeclared_changes != "ignore"
            previous = Checkpoint.from_json(stored) if keep and isinstance(stored, dict) else None
            self._at_start = (confirmed, previous)
            self._unversioned_run = adopted and run_code_version is None

    def take_at_start(self) -> None:
        """The baseline `plan_at_start` decided on, in a worker (git's processes are the larger
        part of a cold start: they run once the host is spawned)."""
        if self._at_start is not None:
            confirmed, previous = self._at_start
            self._at_start = None
            self._pending = True
            self.pool.submit(self._refresh_baseline_blocking, confirmed, True, previous)

    def refreshing(self) -> bool:
        """Is a baseline on its way? A run spawned now gets its code version from it."""
        return self._pending

    def on_run_spawned(self) -> None:
        """A host process was spawned: recorded without a code version if a refresh is pending."""
        self._unversioned_run = self._pending

    async def settled(self) -> None:
        """Returns once no baseline refresh is pending (at once when none is)."""
        while self._pending:
            waiter = self.loop.create_future()
            self._settle_waiters.append(waiter)
            await waiter

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
            self.checks += 1
            if (error := finished.exception()) is not None:
                self._check_failed(error)
                return
            self._last_check_error = None
            if finished.result():
                self._on_drift(checkpoint)

        future.add_done_callback(done)

    def _check_failed(self, error: BaseException) -> None:
        """A drift check that could not run (a tree git fails on): logged once per cause, not
        once per change of the tree."""
        said = str(error)
        if said != self._last_check_error:
            log.warning("drift check of %s failed: %s", self.config.root, said)
        self._last_check_error = said

    def on_host_spawned(self) -> None:
        """A new host process: status shows its HEAD, and a drifted tree it starts on is the
        baseline from now on (outside a swap)."""
        self.on_run_spawned()
        if self.drifted and not self._swap_in_flight():
            self._refresh_baseline()  # a baseline carries its HEAD
        elif not self._pending:
            self._refresh_head()

    def _refresh_head(self) -> None:
        job = self._head_job
        if job is not None and not job.done():
            # Queued: it reads HEAD after this spawn anyway. Running: it may have read it before.
            self._head_again = self._head_again or job.running()
            return
        self._head_again = False
        self._head_job = self.pool.submit(self._refresh_head_blocking)

    def on_swap_finished(self, swap: swaps.Swap) -> None:
        """A confirmed swap's tree becomes the baseline; after an abort or a rollback the tree is
        the restored checkpoint again, which is not drift."""
        if swap.state is swaps.SwapState.CONFIRMED:
            # Until the confirmed tree is the baseline, a drift check would compare against the
            # version before the swap and "guard" the one just confirmed.
            self._refresh_baseline(swap.id)
        else:
            self.drifted = False
            # Once the swap is over (the watcher drops what happens during one): a process the
            # new version left behind may have written code after the restore.
            self.loop.call_soon(self.on_tree_changed)

    def baseline_taken(self, checkpoint: Checkpoint) -> None:
        """On the loop: `checkpoint` (just stored as the baseline) is the code the host runs on."""
        self.head = checkpoint.head
        self.code_version = checkpoint.commit
        if not self._swap_in_flight():
            self.drifted = False
        if self._unversioned_run and checkpoint.commit:
            self._record_code_version(checkpoint.commit)
        self._unversioned_run = False
        self._settled()

    def _refresh_baseline(self, confirmed: str | None = None) -> None:
        """In a worker; drift checks and prepares wait for it. `confirmed`: see below."""
        self._pending = True
        self.pool.submit(self._refresh_baseline_blocking, confirmed)

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
        self._unversioned_run = False
        waiters, self._settle_waiters = self._settle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if self._recheck:
            self._recheck = False
            self.on_tree_changed()

    def _baseline_kept(self) -> None:
        """On the loop: the tree at start differs from the stored baseline, which stays the
        baseline (the code before the change); the drift check that follows reports it."""
        self._recheck = True
        self._settled()
        self._refresh_head()  # status shows the HEAD the host was started on

    def _refresh_baseline_blocking(
        self, confirmed: str | None, at_start: bool = False, previous: Checkpoint | None = None
    ) -> None:
        """In a worker. `confirmed`: the id of the confirmed swap whose code this baseline is;
        `previous`: at start, the stored baseline, kept if the tree differs from it."""
        if at_start:
            faults.reached("baseline/at_start")  # the host is spawned, its baseline not yet taken
        if previous is not None:
            try:
                changed = self.code.differs(previous)
            except SwapguardError as exc:  # its commit gone, say: the tree as it is, as before
                log.warning("the stored code baseline cannot be compared: %s", exc.message)
                changed = False
            if changed:
                log.warning("the code changed since its baseline, and no swap declared it")
                self.loop.call_soon_threadsafe(self._baseline_kept)
                return
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
        """In a worker: status shows the HEAD the host was started on; git is asked off the loop,
        and only when the files HEAD is kept in changed since it was last asked (`refstat`)."""
        try:
            # Read before git: a move meanwhile is seen next time.
            signature = refstat.head_signature(self.code.git_dir(), self.code.root)
            if signature is not None and signature == self._head_signature:
                head: str | None = self.head
            else:
                head = self.code.head()
                self._head_signature = signature
        except SwapguardError:
            head = None
        self.loop.call_soon_threadsafe(self._head_read, head)

    def _head_read(self, head: str | None) -> None:
        if head is not None:
            self.head = head
        if self._head_again:
            self._refresh_head()
