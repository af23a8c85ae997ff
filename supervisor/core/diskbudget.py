"""The disk budget: which swaps' snapshots and kept data go, and whether a new snapshot fits.

Why it exists: every activation writes a snapshot of the data, and every rollback keeps the
probation-time data beside it; with nothing but a count (`keep_swaps`) bounding them they reach
many times the database, and an activation that finds the disk full fails after the host was
stopped. The shell measures (what each swap holds on each file system, the free space, what an
activation would write) and deletes; what to drop and whether a snapshot fits is decided here.

Rules
-----
1. `keep_swaps` first: a finished swap past the newest `keep_swaps` swaps goes, whatever it holds.
2. `keep_bytes` > 0: while the swaps kept hold more than `keep_bytes` (counting what the activation
   about to happen will write, the `reserve`), the oldest finished swap goes. Never a swap in
   flight (a `failed` rollback needs its snapshot to be retried), never the newest rolled-back
   swap: its kept data is the only copy of what the new version wrote.
3. A snapshot fits when, on each file system, what the activation writes there plus `HEADROOM`
   is at most what is free plus what rule 2's prune releases there; and, with a budget, when what
   may not be pruned plus what the snapshot holds stays within `keep_bytes`.
4. Pure: no I/O. Bytes are allocated bytes, as the shell measured them; file systems are keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from supervisor.core.swaprecord import TERMINAL, SwapState

HEADROOM = 8 << 20
"""Bytes a snapshot must leave free on each file system it writes to: a snapshot that exactly
fills a disk would fail the state store's next commit and the host's first write."""

_FINISHED = frozenset(state.value for state in TERMINAL)


@dataclass(frozen=True, slots=True)
class Held:
    """What one swap holds on disk: its snapshot (on the file system of state.dir) and the
    probation-time data its rollback kept (beside each data entry), by file system."""

    swap_id: str
    state: str  # a SwapState value
    bytes_on: Mapping[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.bytes_on.values())

    @property
    def finished(self) -> bool:
        return self.state in _FINISHED


@dataclass(frozen=True, slots=True)
class Need:
    """Bytes an activation would write on one file system for one data entry: the snapshot
    (`budgeted`: it counts against keep_bytes), or, where the data lives on another file system
    than state.dir, the copy a rollback puts back beside the probation-time data."""

    path: str
    fs: str
    bytes: int
    budgeted: bool = True


@dataclass(frozen=True, slots=True)
class FileSystem:
    """One file system involved: a path on it (named in messages and metrics) and its space."""

    key: str
    path: str
    free: int
    size: int


@dataclass(frozen=True, slots=True)
class PrunePlan:
    keep: frozenset[str]  # swaps whose snapshots and kept data stay
    drop: tuple[str, ...]  # the others among those measured, oldest first
    held: int  # bytes the kept swaps hold
    released: Mapping[str, int]  # file system -> bytes the drops give back
    protected: frozenset[str]  # never dropped for bytes (rule 2)
    over_budget: tuple[str, ...] = ()  # those of `drop` that rule 2 dropped, oldest first


NOTHING_PRUNED = PrunePlan(keep=frozenset(), drop=(), held=0, released={}, protected=frozenset())
"""A plan that releases nothing: a fit check on free space alone."""


def protected(held: Sequence[Held]) -> frozenset[str]:
    """Rule 2's exceptions among `held` (newest first): swaps in flight, the newest rollback."""
    ids = {swap.swap_id for swap in held if not swap.finished}
    rolled_back = next((s for s in held if s.state == SwapState.ROLLED_BACK.value), None)
    if rolled_back is not None:
        ids.add(rolled_back.swap_id)
    return frozenset(ids)


def plan_prune(
    held: Sequence[Held], *, keep_swaps: int, keep_bytes: int, reserve: int = 0
) -> PrunePlan:
    """Rules 1 and 2 over `held`, newest first. `reserve`: bytes about to be written."""
    guarded = protected(held)
    kept = [s for index, s in enumerate(held) if index < keep_swaps or not s.finished]
    total = sum(s.total for s in kept) + reserve
    over_budget: list[str] = []
    if keep_bytes > 0:
        for oldest in [s for s in reversed(kept) if s.swap_id not in guarded]:
            if total <= keep_bytes:
                break
            kept.remove(oldest)
            over_budget.append(oldest.swap_id)
            total -= oldest.total
    keep = frozenset(s.swap_id for s in kept)
    dropped = [s for s in reversed(held) if s.swap_id not in keep]
    released: dict[str, int] = {}
    for swap in dropped:
        for fs, size in swap.bytes_on.items():
            released[fs] = released.get(fs, 0) + size
    return PrunePlan(
        keep=keep,
        drop=tuple(s.swap_id for s in dropped),
        held=total - reserve,
        released=released,
        protected=guarded,
        over_budget=tuple(over_budget),
    )


def fit_problem(
    needs: Sequence[Need],
    file_systems: Sequence[FileSystem],
    plan: PrunePlan,
    *,
    keep_bytes: int,
) -> str | None:
    """Rule 3: why the activation's writes would not fit, naming paths and bytes; None if they do.
    `plan` is the prune made with these needs as its reserve."""
    problems: list[str] = []
    by_key = {fs.key: fs for fs in file_systems}
    for key in dict.fromkeys(need.fs for need in needs):
        on_fs = [need for need in needs if need.fs == key and need.bytes > 0]
        wanted = sum(need.bytes for need in on_fs)
        fs = by_key.get(key)
        if not wanted or fs is None:
            continue
        released = plan.released.get(key, 0)
        if wanted + HEADROOM > fs.free + released:
            what = ", ".join(
                f"{need.path}: {show_bytes(need.bytes)}"
                + ("" if need.budgeted else " for a rollback's copy")
                for need in on_fs
            )
            freed = f" (+ {show_bytes(released)} from pruning old swaps)" if released else ""
            problems.append(
                f"the file system of {fs.path} has {show_bytes(fs.free)} free{freed}; the"
                f" activation needs {show_bytes(wanted)} there ({what}) and"
                f" {show_bytes(HEADROOM)} left over"
            )
    snapshot = sum(need.bytes for need in needs if need.budgeted)
    if keep_bytes > 0 and plan.held + snapshot > keep_bytes:
        problems.append(
            f"state.keep_bytes is {show_bytes(keep_bytes)}; the snapshot needs"
            f" {show_bytes(snapshot)} beside {show_bytes(plan.held)} that may not be pruned"
            f" (swaps {', '.join(sorted(plan.keep)) or 'none'})"
        )
    if not problems:
        return None
    return "not enough disk space for the data snapshot: " + "; ".join(problems)


def show_bytes(count: int) -> str:
    """`123456789 bytes (117.7 MiB)`: exact for a script, readable for a person."""
    if count < 1024:
        return f"{count} bytes"
    size, units = count / 1024, ["KiB", "MiB", "GiB", "TiB", "PiB"]
    while size >= 1024 and len(units) > 1:
        size, units = size / 1024, units[1:]
    return f"{count} bytes ({size:.1f} {units[0]})"
