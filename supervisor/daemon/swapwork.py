"""The blocking work behind the swap machine's actions: git, snapshots, builds, health checks.

Every method runs in a worker thread, touches only the code tree, the snapshot store and the
state store it was given, and returns a value or raises a `SwapguardError`; the runtime turns
that into `StepDone` / `StepFailed` on its loop. Nothing here reads or changes runtime state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from supervisor.code.checkpoint import Checkpoint, CodeTree
from supervisor.config.schema import Config
from supervisor.core import diskbudget, swaps
from supervisor.data import diskusage
from supervisor.data.datacopy import fsync_dir, fsync_file, time_bound
from supervisor.data.snapshot import DataSnapshot, SnapshotStore
from supervisor.errors import InsufficientStorage, SwapguardError
from supervisor.process import identity, jobs
from supervisor.state.store import SWAP_RECORDS_KEPT, Store

log = logging.getLogger(__name__)

OUTPUT_DIR = "output"
"""Folder of state.dir that keeps build and hook output (0700, files 0600)."""

INDEX_WAIT_S = 10.0
"""After a rollback, how long a worker waits for somebody else's index.lock to go so it can put
git's index back (else the next checkpoint, change listing or drift check does)."""

SPACE_FRESH_S = 1.0
"""How old the free space that status and /metrics show may be."""

DATA_LIMIT_S = 600.0
"""The longest a snapshot, a restore, a flush of the data or a settle may copy, hash or flush
paths the host can write (checked between chunks): a file system that hangs or trickles fails
the step (which is retried) instead of holding a worker for ever."""

BASELINE_KEY = "host_checkpoint"
"""Store key of the checkpoint of the code the running host was started on (drift guard)."""


def failure_detail(result: jobs.JobResult) -> str:
    """What an event may say of a job: how it ended and where its output is, never the output
    (a reader of the control socket must not see what a build or a check printed)."""
    if result.ok:
        return "ok"
    if result.output_file is None:
        return result.describe()
    return f"{result.describe()}; output in {result.output_file.name}"


def _checkpoint(swap: swaps.Swap) -> Checkpoint:
    return Checkpoint.from_json(dict(swap.checkpoint))


def _snapshots(swap: swaps.Swap) -> list[DataSnapshot]:
    return [DataSnapshot.from_json(dict(item)) for item in swap.data]


class SwapWork:
    def __init__(
        self, config: Config, store: Store, code: CodeTree, snapshots: SnapshotStore
    ) -> None:
        self.config = config
        self.store = store
        self.code = code
        self.snapshots = snapshots
        # host.user: the build and the health check run as the host does (they run code the host
        # may rewrite); resolved at start, where preflight has checked it
        self.user = identity.resolve(config.host.user, config.host.group)
        self._pruning = threading.Lock()  # two swaps' settles must not race for git's ref locks
        self._reported_foreign: list[str] = []  # the locks of the last code.foreign_locks event
        self._space: tuple[float, list[tuple[diskbudget.FileSystem, list[str]]]] | None = None
        self.usage: diskusage.Usage | None = None  # the last measure; views read it, never change

    def take_checkpoint(self, name: str) -> Checkpoint:
        return self.code.take(name)  # which checks the tree first

    def take_snapshots(self, swap: swaps.Swap) -> dict[str, Any]:
        entries = [(entry.path, entry.kind) for entry in self.config.data]
        # An activation that was not asked for (the host exited on changed code) had no check
        # before the host stopped: refuse here, before a byte is copied, rather than at ENOSPC.
        try:
            needs = diskusage.take_needs(entries, self.snapshots.root)
            space = [fs for fs, _ in diskusage.file_systems(self._labelled_paths())]
        except OSError as exc:  # cannot tell: the take itself finds out
            log.warning("swap %s: cannot measure the disk before the snapshot: %s", swap.id, exc)
            needs, space = [], []
        if problem := diskbudget.fit_problem(needs, space, diskbudget.NOTHING_PRUNED, keep_bytes=0):
            raise InsufficientStorage(problem)
        with time_bound(DATA_LIMIT_S, "the snapshot of the data"):
            taken = self.snapshots.take(swap.id, entries)
        return {
            "data": [snap.to_json() for snap in taken],
            "unsynced": any(snap.linked for snap in taken),
        }

    def sync_data(self, swap: swaps.Swap, wanted: Callable[[], bool] = lambda: True) -> None:
        """fsync the working copies the new version writes to (and their folders' renames):
        what a confirm makes permanent must be on disk. Costs what is still unflushed. Stops
        once not `wanted` (a rollback began: that copy is only kept data now, and the rollback's
        own commits should not wait behind its flush)."""
        with time_bound(DATA_LIMIT_S, "the flush of the new version's data"):
            for snap in _snapshots(swap):
                if snap.linked:
                    target = Path(snap.path)
                    fsync_file(target, wanted)  # gone or replaced by the new version: its own
                    if not wanted():
                        return
                    if target.parent.is_dir() and not target.parent.is_symlink():
                        fsync_dir(target.parent)

    def build(self, phase: swaps.Step | None, ordered_at: int | None = None) -> None:
        """Run the build; its output goes to a file only swapguard's user can read, and the
        error (an event anyone who can read the socket sees) names that file, never quotes it.
        `ordered_at`: see `jobs.run_job`."""
        try:
            output = jobs.new_output_file(self.config.state.dir / OUTPUT_DIR, "build")
        except OSError as exc:
            raise SwapguardError(f"build ({phase}) not run: {exc}") from None
        result = jobs.run_job(
            self.config.code.build,
            cwd=self.config.code.root,
            timeout=self.config.code.build_timeout,
            log_name="build",
            output_to=output,
            user=self.user,
            ordered_at=ordered_at,
        )
        if not result.ok:
            raise SwapguardError(f"build {result.describe()} ({phase}); output in {output.name}")

    def restore_code(self, swap: swaps.Swap) -> Checkpoint:
        """Back to the swap's checkpoint, which is then the code the host runs on. The rollback's
        first step: a verify of the swap's snapshots still running is stopped (its CPU is the
        rollback's now; the restore of the data would stop it anyway)."""
        self.snapshots.stop_verify(swap.id)
        checkpoint = _checkpoint(swap)
        try:
            self.code.restore(checkpoint, name=swap.id)
        finally:
            self._report_foreign_locks(swap.id)
        if lock := self.code.index_locked():
            self.store.append_event(
                "code.index_locked",
                {"lock": lock, "detail": "git's index is put back once this lock goes"},
                swap_id=swap.id,
            )
        self.store.set_value(BASELINE_KEY, checkpoint.to_json())
        return checkpoint

    def _report_foreign_locks(self, swap_id: str) -> None:
        """An event when a restore finds locks in .git that swapguard did not take (once per
        set: a retried step finds the same ones); they are never removed."""
        foreign = self.code.foreign_locks()
        if foreign and foreign != self._reported_foreign:
            try:
                self.store.append_event(
                    "code.foreign_locks",
                    {"locks": foreign, "detail": "not swapguard's: left alone"},
                    swap_id=swap_id,
                )
            except SwapguardError as exc:  # a report: it never fails the restore
                log.warning("swap %s: code.foreign_locks not recorded: %s", swap_id, exc.message)
                return
        self._reported_foreign = foreign

    def restore_data(self, swap: swaps.Swap) -> None:
        with time_bound(DATA_LIMIT_S, "the restore of the data"):
            self.snapshots.restore(swap.id, _snapshots(swap))

    def health_check(self, ordered_at: int | None = None) -> jobs.JobResult:
        """One run of the health check; its output is kept like the build's (`failure_detail`).
        `ordered_at`: see `jobs.run_job`."""
        return jobs.run_job(
            self.config.deadman.health_check,
            cwd=self.config.code.root,
            timeout=self.config.deadman.health_interval,
            log_name="health",
            output_to=jobs.new_output_file(self.config.state.dir / OUTPUT_DIR, "health"),
            user=self.user,
            ordered_at=ordered_at,
        )

    def save_changes(self, swap: swaps.Swap) -> None:
        """What the new version changed, kept for the swap's record (a rollback erases it)."""
        try:
            changes = self.code.changes(_checkpoint(swap))
        except SwapguardError as exc:
            log.warning("swap %s: changes not recorded: %s", swap.id, exc.message)
            return
        self.store.set_value(
            f"changes:{swap.id}", [{"path": c.path, "change": c.change} for c in changes]
        )

    def verify_snapshots(self, swap: swaps.Swap) -> tuple[str, dict[str, Any]] | None:
        """integrity_check of the snapshots, off the activation path (it reads whole files).
        A failure means the data was already corrupt before the swap: reported, not fatal.
        Returns the event to record, or None when there was nothing to verify."""
        if not swap.data:
            return None
        self.measure_disk()  # the new snapshot, off the activation path
        try:
            results = self.snapshots.verify(swap.id, _snapshots(swap))
        except SwapguardError as exc:
            log.info("swap %s: snapshots not verified: %s", swap.id, exc.message)
            return None
        bad = [{"path": path, "detail": detail} for path, ok, detail in results if not ok]
        if bad:
            return "snapshot.corrupt", {"entries": bad}
        return "snapshot.verified", {"entries": len(results)}

    def settle(self, swap: swaps.Swap, keep: int) -> None:
        """In a worker, once a swap is over: free the room its take reserved beside the data
        (`SnapshotStore.drop_reserves`), put on disk what its rollback kept of the
        probation-time data (the old version was restarted first; the new version's flush may
        have been cut short), then prune. A failure is logged: nothing waits for this."""
        try:
            if swap.state in swaps.TERMINAL:  # a failed one may be retried: its room stays
                self.snapshots.drop_reserves(swap.id)
            if swap.state is swaps.SwapState.ROLLED_BACK:
                if not self.code.finish_index(wait=INDEX_WAIT_S):
                    log.warning("swap %s: git's index is still locked; put back later", swap.id)
                kept = self.snapshots.kept_copies(swap.id)
                with time_bound(DATA_LIMIT_S, f"the flush of what swap {swap.id} kept"):
                    for path in kept:
                        fsync_file(path)
                    for folder in {path.parent for path in kept}:
                        fsync_dir(folder)
            self.prune(keep)
        except (SwapguardError, OSError) as exc:
            log.warning("after swap %s: %s", swap.id, getattr(exc, "message", exc))
        except Exception:  # a bug: the worker's future would swallow it
            log.exception("after swap %s", swap.id)

    def prune(self, keep: int) -> None:
        """Drop checkpoints and snapshots of finished swaps beyond the newest `keep`, and their
        records beyond SWAP_RECORDS_KEPT; then, under state.keep_bytes, the snapshots and kept
        data of the oldest finished swaps until the rest fit (`core.diskbudget`)."""
        with self._pruning:
            self._prune(keep)

    def _prune(self, keep: int) -> None:
        self.code.drop(*self.store.finished_swap_ids_beyond(keep))
        self.store.forget_finished_swaps_beyond(max(keep, SWAP_RECORDS_KEPT))
        usage = self._measure(keep)
        plan = diskbudget.plan_prune(
            usage.held, keep_swaps=keep, keep_bytes=self.config.state.keep_bytes
        )
        self._drop(plan, usage)

    def _drop(self, plan: diskbudget.PrunePlan, usage: diskusage.Usage) -> None:
        """Carry out `plan`: the snapshot store keeps exactly its swaps (and removes leftovers)."""
        held = {swap.swap_id: swap.total for swap in usage.held}
        for swap_id in plan.over_budget:
            log.info("pruning swap %s: its snapshot and kept data (%d bytes) are over"
                     " state.keep_bytes", swap_id, held[swap_id])  # fmt: skip
        self.snapshots.prune(plan.keep)
        self._measure(self.config.state.keep_swaps)

    # --- the disk budget -------------------------------------------------------------------

    def check_disk(self, *, make_room: bool) -> None:
        """Raise InsufficientStorage, naming paths and bytes, when an activation's snapshot would
        not fit now: free space on each file system involved, and state.keep_bytes. Nothing
        changes when it is refused. With `make_room`, the oldest finished swaps the budget lets
        go are pruned first (the activation is about to write its snapshot)."""
        entries = [(entry.path, entry.kind) for entry in self.config.data]
        if not entries:
            return
        keep_swaps, keep_bytes = self.config.state.keep_swaps, self.config.state.keep_bytes
        with self._pruning:
            needs = diskusage.take_needs(entries, self.snapshots.root)
            usage = self._measure(keep_swaps)
            reserve = sum(need.bytes for need in needs if need.budgeted)
            plan = diskbudget.plan_prune(
                usage.held, keep_swaps=keep_swaps, keep_bytes=keep_bytes, reserve=reserve
            )
            space = [fs for fs, _ in diskusage.file_systems(self._labelled_paths())]
            if problem := diskbudget.fit_problem(needs, space, plan, keep_bytes=keep_bytes):
                raise InsufficientStorage(problem)
            if make_room and plan.drop:
                self._drop(plan, usage)

    def measure_disk(self) -> diskusage.Usage | None:
        """Measure what the snapshots and kept data hold now (status and /metrics show it); a
        failure is logged and leaves the last figures: nothing waits for this."""
        try:
            with self._pruning:
                return self._measure(self.config.state.keep_swaps)
        except (SwapguardError, OSError) as exc:
            log.warning("cannot measure the disk: %s", getattr(exc, "message", exc))
            return None

    def _measure(self, keep: int) -> diskusage.Usage:
        records = self.store.list_swaps(limit=keep)
        active = self.store.active_swap()
        if active is not None and all(record["id"] != active["id"] for record in records):
            records.append(active)  # an older failed swap: kept, without taking a newer's place
        swaps_held = [(str(record["id"]), str(record["state"])) for record in records]
        self.usage = diskusage.measure(self.snapshots.root, swaps_held, time.time())
        self._space = None  # the free space is read afresh with the figures just measured
        return self.usage

    def _labelled_paths(self) -> list[tuple[str, Path]]:
        """What lives where: state.dir first, then each data entry (metrics label them so)."""
        return [("state.dir", self.config.state.dir), ("snapshots", self.snapshots.root)] + [
            (str(entry.path), entry.path) for entry in self.config.data
        ]

    def file_systems(self) -> list[tuple[diskbudget.FileSystem, list[str]]]:
        """The file systems involved, with their free space at most a second old (a status
        under a heartbeat flood should not cost a statvfs each)."""
        now = time.monotonic()
        cached = self._space
        if cached is None or now >= cached[0]:
            cached = self._space = (
                now + SPACE_FRESH_S,
                diskusage.file_systems(self._labelled_paths()),
            )
        return cached[1]
