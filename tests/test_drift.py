"""The drift guard's baseline at start, taken after the host's spawn: what waits for it.

Driven directly on a loop of its own, with a real git repo, a real store and a worker pool whose
one worker is held busy, so that the baseline is pending for as long as the test wants.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from supervisor.code.checkpoint import Checkpoint, CodeTree
from supervisor.code.refstat import head_signature
from supervisor.config.schema import CodeConfig
from supervisor.core import swaps
from supervisor.daemon.drift import DriftGuard
from supervisor.daemon.swapwork import BASELINE_KEY
from supervisor.state.store import Store
from tests.support import git, make_sample_repo

WAIT_S = 30.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "state") as opened:
        yield opened


def _guard(repo: Path, store: Store, pool: ThreadPoolExecutor) -> tuple[DriftGuard, list]:
    calls: list = []
    config = CodeConfig(
        root=repo, extra_paths=(), build=(), build_timeout=60.0, undeclared_changes="guard"
    )
    guard = DriftGuard(
        config,
        store,
        CodeTree(repo),
        pool,
        swap_in_flight=lambda: False,
        emit=lambda kind, detail: calls.append(("emit", kind)),
        prepare_swap=lambda summary, checkpoint: calls.append(("prepare", checkpoint.commit)),
        record_code_version=lambda commit: calls.append(("version", commit)),
    )
    return guard, calls


async def _guard_with_its_baseline(
    repo: Path, store: Store, pool: ThreadPoolExecutor
) -> tuple[DriftGuard, list]:
    """A guard started as the service starts it, once its baseline is taken."""
    guard, calls = _guard(repo, store, pool)
    guard.plan_at_start(adopted=False, run_code_version=None)
    guard.take_at_start()
    await asyncio.wait_for(guard.settled(), WAIT_S)
    return guard, calls


async def _until(condition: Callable[[], bool], what: object = "timed out") -> None:
    """Poll `condition` on the loop (the guard's answers arrive as callbacks there)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


def test_prepares_and_drift_checks_wait_for_the_baseline_taken_after_the_spawn(
    tmp_path: Path, store: Store
) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    pool = ThreadPoolExecutor(max_workers=1)
    busy = threading.Event()
    pool.submit(busy.wait, WAIT_S)  # the one worker is held: the baseline stays pending

    async def scenario() -> None:
        guard, calls = _guard(repo, store, pool)
        guard.plan_at_start(adopted=False, run_code_version=None)
        assert guard.refreshing()  # a run spawned now is recorded without a code version
        guard.on_host_spawned()  # the host is spawned before the baseline is taken
        guard.take_at_start()
        settled = asyncio.ensure_future(guard.settled())
        (repo / "undeclared.txt").write_text("written as the host starts\n")
        guard.on_tree_changed()  # no check against an older baseline while it is pending
        await asyncio.sleep(0.2)
        assert not settled.done() and guard.code_version is None and calls == []
        busy.set()
        await asyncio.wait_for(settled, WAIT_S)
        baseline = store.get_value(BASELINE_KEY)
        assert isinstance(baseline, dict) and guard.code_version == baseline["commit"]
        assert calls == [("version", guard.code_version)]  # the spawned run gets it
        # a first start ever: no earlier baseline, so the change made meanwhile is in this one
        assert not CodeTree(repo).differs(Checkpoint.from_json(baseline))
        assert not guard.refreshing()
        await guard.settled()  # nothing pending: at once

    try:
        asyncio.run(asyncio.wait_for(scenario(), WAIT_S * 2))
    finally:
        busy.set()
        pool.shutdown(wait=True)


@pytest.mark.parametrize("adopted", [False, True])
def test_a_change_made_before_the_baseline_at_start_is_drift_not_baseline(
    tmp_path: Path, store: Store, adopted: bool
) -> None:
    """A host that rewrites its code as it starts (or a change made while swapguard was down, or
    killed before the baseline): the earlier baseline stays, the change is drift, and the guard
    swap is prepared from the code before it."""
    repo = make_sample_repo(tmp_path / "repo")
    pool = ThreadPoolExecutor(max_workers=1)
    busy = threading.Event()

    async def scenario() -> None:
        first, _ = _guard(repo, store, pool)
        first.plan_at_start(adopted=False, run_code_version=None)
        first.take_at_start()
        await asyncio.wait_for(first.settled(), WAIT_S)
        before = first.code_version
        assert before is not None

        (repo / "down.txt").write_text("written while swapguard was down\n")
        pool.submit(busy.wait, WAIT_S)  # the baseline stays pending while the host starts
        guard, calls = _guard(repo, store, pool)
        guard.plan_at_start(adopted=adopted, run_code_version=None)
        assert guard.refreshing()
        guard.on_host_spawned()
        guard.take_at_start()
        (repo / "app.py").write_text("print('rewritten by the host at its start')\n")
        guard.on_tree_changed()
        busy.set()
        await asyncio.wait_for(guard.settled(), WAIT_S)
        await _until(lambda: guard.drifted)
        assert calls == [("emit", "code.drift"), ("prepare", before)]
        baseline = store.get_value(BASELINE_KEY)
        assert isinstance(baseline, dict) and baseline["commit"] == before == guard.code_version

    try:
        asyncio.run(asyncio.wait_for(scenario(), WAIT_S * 2))
    finally:
        busy.set()
        pool.shutdown(wait=True)


def test_an_unchanged_tree_at_start_is_no_drift(tmp_path: Path, store: Store) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    pool = ThreadPoolExecutor(max_workers=1)

    async def scenario() -> None:
        for _ in range(2):
            guard, calls = _guard(repo, store, pool)
            guard.plan_at_start(adopted=False, run_code_version=None)
            guard.take_at_start()
            guard.on_tree_changed()  # as the service asks once its watcher runs
            await asyncio.wait_for(guard.settled(), WAIT_S)
            # the drift check runs on the one worker: it has answered once a job after it ran
            await asyncio.get_running_loop().run_in_executor(pool, lambda: None)
            for _ in range(3):
                await asyncio.sleep(0)  # its answer's callback
            assert not guard.drifted and calls == []

    try:
        asyncio.run(asyncio.wait_for(scenario(), WAIT_S * 2))
    finally:
        pool.shutdown(wait=True)


def test_an_adopted_run_without_a_code_version_gets_its_baseline(
    tmp_path: Path, store: Store
) -> None:
    """swapguard was killed between the spawn and the baseline: the adoption takes it; a run that
    has one keeps it (a change made while swapguard was down stays drift)."""
    repo = make_sample_repo(tmp_path / "repo")
    pool = ThreadPoolExecutor(max_workers=1)

    async def scenario() -> None:
        guard, calls = _guard(repo, store, pool)
        guard.plan_at_start(adopted=True, run_code_version=None)
        assert guard.refreshing()
        guard.take_at_start()
        await asyncio.wait_for(guard.settled(), WAIT_S)
        taken = guard.code_version
        assert taken is not None and calls == [("version", taken)]  # the adopted run's code

        again, _ = _guard(repo, store, pool)
        again.plan_at_start(adopted=True, run_code_version=taken)
        assert not again.refreshing() and again.code_version == taken

    try:
        asyncio.run(asyncio.wait_for(scenario(), WAIT_S * 2))
    finally:
        pool.shutdown(wait=True)


def test_head_moves_are_seen_in_the_files_git_keeps_it_in(tmp_path: Path) -> None:
    """What lets a crash loop skip `git rev-parse`: every way HEAD moves changes the signature."""
    repo = make_sample_repo(tmp_path / "repo")
    git_dir = repo / ".git"
    first = head_signature(git_dir)
    assert first is not None and head_signature(git_dir) == first
    (repo / "README.txt").write_text("nothing committed: HEAD stays\n")
    assert head_signature(git_dir) == first
    seen = [first]
    for args in (
        ("commit", "-qam", "moved"),  # the branch's loose ref
        ("checkout", "-qb", "other"),  # HEAD names another ref
        ("pack-refs", "--all"),  # the ref goes into packed-refs
        ("commit", "-q", "--allow-empty", "-m", "again"),
        ("checkout", "-q", "--detach"),  # HEAD holds a commit
    ):
        git(repo, *args)
        now = head_signature(git_dir)
        assert now is not None and now not in seen, args
        seen.append(now)
    git(repo, "worktree", "add", "-q", str(tmp_path / "linked"))
    linked = Path(git(tmp_path / "linked", "rev-parse", "--absolute-git-dir").strip())
    assert head_signature(linked) is None  # its refs live in the common dir: ask git


def test_where_the_stat_of_heads_files_cannot_vouch_for_it_git_is_asked(tmp_path: Path) -> None:
    """A symref chain, HEAD or its ref a symlink, a linked worktree's git dir given a `refs`
    folder, a gitfile re-pointed to another git dir: None (ask git), never a stale answer."""
    repo = make_sample_repo(tmp_path / "repo")
    git_dir = repo / ".git"
    assert head_signature(git_dir, repo) is not None
    branch = git(repo, "symbolic-ref", "HEAD").strip()

    git(repo, "symbolic-ref", "refs/heads/chain", branch)  # a ref whose content is `ref: ...`
    git(repo, "symbolic-ref", "HEAD", "refs/heads/chain")
    assert head_signature(git_dir, repo) is None
    git(repo, "symbolic-ref", "HEAD", branch)
    assert head_signature(git_dir, repo) is not None

    (git_dir / "HEAD").rename(git_dir / "HEAD.real")
    (git_dir / "HEAD").symlink_to("HEAD.real")
    assert head_signature(git_dir, repo) is None
    (git_dir / "HEAD").unlink()
    (git_dir / "HEAD.real").rename(git_dir / "HEAD")

    ref = git_dir / branch
    ref.rename(git_dir / "real-ref")
    ref.symlink_to(git_dir / "real-ref")
    assert head_signature(git_dir, repo) is None
    ref.unlink()
    (git_dir / "real-ref").rename(ref)
    assert head_signature(git_dir, repo) is not None

    git(repo, "worktree", "add", "-q", str(tmp_path / "linked"))
    linked = Path(git(tmp_path / "linked", "rev-parse", "--absolute-git-dir").strip())
    (linked / "refs").mkdir()
    assert head_signature(linked, tmp_path / "linked") is None  # commondir: refs live there

    other = make_sample_repo(tmp_path / "other")
    moved = tmp_path / "moved.git"
    (other / ".git").rename(moved)
    (other / ".git").write_text(f"gitdir: {moved}\n")
    assert head_signature(moved, other) is not None  # a gitfile naming that git dir
    (other / ".git").write_text(f"gitdir: {git_dir}\n")  # re-pointed: the cached dir is stale
    assert head_signature(moved, other) is None


def test_a_change_made_after_a_rollback_restored_the_tree_is_drift(
    tmp_path: Path, store: Store
) -> None:
    """The watcher drops what happens during a swap; a process the new version left behind may
    write code once the restore is done. The end of a rollback checks the tree once more."""
    repo = make_sample_repo(tmp_path / "repo")
    pool = ThreadPoolExecutor(max_workers=1)

    async def scenario() -> None:
        guard, calls = await _guard_with_its_baseline(repo, store, pool)
        (repo / "app.py").write_text("print('written after the restore')\n")  # no event
        rolled_back = cast(swaps.Swap, SimpleNamespace(state=swaps.SwapState.ROLLED_BACK))
        guard.on_swap_finished(rolled_back)
        await _until(lambda: ("emit", "code.drift") in calls, calls)
        assert guard.drifted and any(call[0] == "prepare" for call in calls)

    try:
        asyncio.run(asyncio.wait_for(scenario(), WAIT_S * 2))
    finally:
        pool.shutdown(wait=True)


def test_a_drift_check_git_fails_on_is_logged_once_per_cause(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A tree whose attributes make git fail (an encoding it does not know) cannot be compared:
    said in the log, once however often the tree changes, and no drift is made up."""
    repo = make_sample_repo(tmp_path / "repo")
    pool = ThreadPoolExecutor(max_workers=1)

    async def scenario() -> None:
        guard, calls = await _guard_with_its_baseline(repo, store, pool)
        (repo / ".gitattributes").write_text("* working-tree-encoding=NONSENSE\n")
        for _ in range(3):
            before = guard.checks
            guard.on_tree_changed()
            await _until(lambda b=before: guard.checks > b, "no drift check ended")  # on the loop
        assert not guard.drifted and calls == []

    try:
        with caplog.at_level("WARNING", logger="supervisor.daemon.drift"):
            asyncio.run(asyncio.wait_for(scenario(), WAIT_S * 2))
    finally:
        pool.shutdown(wait=True)
    failed = [r.getMessage() for r in caplog.records if "drift check" in r.getMessage()]
    assert len(failed) == 1 and "NONSENSE" in failed[0], failed
