"""No lock of ours outlives us (issue 12, item 2): a git of swapguard's killed while it holds its
locks (a prune's `update-ref --stdin`, here held open by a reference-transaction hook that the
test-only SWAPGUARD_TEST_GIT_HOOKS fault lets run), with swapguard or alone, or orphaned and
still running; and a lock swapguard did not take, which is never removed.

Real processes, real git, real signals: the code tree is driven from a child process that is
killed -9 (with its process group, as a service manager would, or alone), then a fresh one
resumes as a restarted swapguard does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.code import gitcmd
from supervisor.code.gitlocks import GitLocks
from supervisor.errors import CheckpointError
from tests.support import Supervisor, git, make_sample_repo, supervised, wait_for
from tests.test_checkpoint import code_tree, commit, modify, snapshot_state
from tests.test_checkpoint import repo as repo  # the fixture: a dirty tree of every kind
from tests.test_hostile_trees import dead_owner
from tests.test_swap_e2e import new_version

# Holds a ref transaction's locks (it is "prepared") until `go` appears beside it, when one of
# its updates matches the extended regex in `block` (by default: a deletion).
BLOCKING_HOOK = """\
#!/bin/sh
[ "$1" = prepared ] || exit 0
here=$(dirname "$0")
grep -qE -f "$here/block" || exit 0
echo $$ > "$here/held"
while [ ! -e "$here/go" ]; do sleep 0.05; done
"""
DELETION = "^[0-9a-f]+ 0{40} "
DROP = (
    "import sys\nfrom pathlib import Path\n"
    "from tests.test_checkpoint import code_tree\n"
    "code_tree(Path(sys.argv[1])).drop('s1')\n"
)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def hooks(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "hooks"
    folder.mkdir()
    hook = folder / "reference-transaction"
    hook.write_text(BLOCKING_HOOK)
    hook.chmod(0o755)
    (folder / "block").write_text(DELETION + "\n")
    yield folder
    (folder / "go").touch()  # no hook of a failed test waits for ever


def lock_files(repo: Path) -> list[str]:
    """Every lock in the git dir (refs' too) and our journals, as names relative to it."""
    git_dir = repo / ".git"
    found = [*git_dir.glob("*.lock"), *(git_dir / "refs").rglob("*.lock")]
    found += git_dir.glob("swapguard-locks-*")
    return sorted(str(path.relative_to(git_dir)) for path in found)


@contextlib.contextmanager
def prune_held_open(
    repo: Path, hooks: Path, tmp_path: Path, script: str = DROP, *args: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A process dropping checkpoint s1 (or running `script`), its git held inside the ref
    transaction (locks taken)."""
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(repo), *args],
        cwd=ROOT,
        env={**os.environ, "SWAPGUARD_TEST_GIT_HOOKS": str(hooks), "TMPDIR": str(tmp_path)},
        start_new_session=True,
    )
    try:
        wait_for(lambda: (hooks / "held").exists(), what="the prune's git to hold its locks")
        yield child
    finally:
        (hooks / "go").touch()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(30)


def test_a_prune_killed_with_its_git_leaves_no_lock_once_resumed(
    repo: Path, hooks: Path, tmp_path: Path
) -> None:
    tree = code_tree(repo)
    tree.take("s1")
    with prune_held_open(repo, hooks, tmp_path) as child:
        held = lock_files(repo)
        os.killpg(child.pid, signal.SIGKILL)  # swapguard and its git, as a service manager does
        child.wait(30)
    assert "packed-refs.lock" in held and "refs/swapguard/checkpoints/s1.lock" in held, held
    assert lock_files(repo) == held  # killed: nothing released them

    cleared = code_tree(repo).clear_stale_locks()  # what a restarted swapguard does first

    assert "packed-refs.lock" in cleared
    assert lock_files(repo) == []
    tree.drop("s1")  # and the prune goes through
    assert "refs/swapguard/checkpoints/s1" not in git(repo, "for-each-ref")


OPERATION = (
    "import json, sys\nfrom pathlib import Path\n"
    "from supervisor.code.checkpoint import Checkpoint\n"
    "from tests.test_checkpoint import code_tree\n"
    "tree, op = code_tree(Path(sys.argv[1])), sys.argv[2]\n"
    "cp = Checkpoint.from_json(json.loads(sys.argv[3]))\n"
    "if op == 'take':\n    tree.take('s2')\n"
    "elif op == 'drop':\n    tree.drop('s1')\n"
    "else:\n    tree.restore(cp, name='s1')\n"
)
# (operation, the ref whose transaction is held open, a lock that must be held then)
GIT_STEPS = {
    "take: the checkpoint ref": ("take", "refs/swapguard/checkpoints/s2", "checkpoints/s2.lock"),
    "restore: the abandoned ref": ("restore", "refs/swapguard/abandoned/s1", "abandoned/s1.lock"),
    "restore: the branch and HEAD": ("restore", " refs/heads/main$", "HEAD.lock"),
    "prune: refs deleted": ("drop", DELETION, "packed-refs.lock"),
}


@pytest.mark.parametrize("step", list(GIT_STEPS))
def test_killed_inside_each_ref_transaction_then_resumed_leaves_no_lock(
    repo: Path, hooks: Path, tmp_path: Path, step: str
) -> None:
    """Each git step of ours that takes locks in the git dir, killed -9 (with its git) while
    they are held: a resumed swapguard clears them all, and the operation then goes through."""
    operation, ref, expected = GIT_STEPS[step]
    tree = code_tree(repo)
    before = snapshot_state(repo)
    cp = tree.take("s1")
    modify(repo)
    commit(repo)  # the branch moved: a restore rewrites it (and HEAD's reflog, under HEAD.lock)
    (hooks / "block").write_text(ref + "\n")
    cp_json = json.dumps(cp.to_json())
    with prune_held_open(repo, hooks, tmp_path, OPERATION, operation, cp_json) as child:
        held = lock_files(repo)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(30)
    assert any(name.endswith(expected) for name in held), held

    code_tree(repo).clear_stale_locks()
    assert lock_files(repo) == []
    if operation == "restore":
        tree.restore(cp, name="s1")
        assert snapshot_state(repo) == before
    elif operation == "take":
        tree.take("s2")
    else:
        tree.drop("s1")
    assert lock_files(repo) == []


def test_an_orphaned_git_keeps_its_locks_until_it_ends(
    repo: Path, hooks: Path, tmp_path: Path
) -> None:
    """swapguard dies alone (the OOM killer, a stall exit): its git goes on. A new swapguard must
    not take the locks that git still holds; once it ends they are its own business, and the
    journal it leaves is cleared by the next operation."""
    tree = code_tree(repo)
    tree.take("s1")
    with prune_held_open(repo, hooks, tmp_path) as child:
        child.kill()  # swapguard alone: its git (and the hook it runs) are orphaned
        child.wait(30)
        orphan = int((hooks / "held").read_text())
        assert os.path.exists(f"/proc/{orphan}") or sys.platform != "linux"
        started = time.monotonic()
        assert code_tree(repo).clear_stale_locks() == []
        assert "packed-refs.lock" in lock_files(repo)  # never stolen from a running git
        assert GitLocks(repo / ".git").clear_stale(wait=0.3) == []
        with pytest.raises(CheckpointError, match="lock"):  # ours wait their turn too
            tree.drop("s1")
        assert time.monotonic() - started < 15
        (hooks / "go").touch()  # the orphan finishes its transaction, as git would
        wait_for(lambda: "packed-refs.lock" not in lock_files(repo), what="the orphan to end")
    assert "refs/swapguard/checkpoints/s1" not in git(repo, "for-each-ref")
    code_tree(repo).clear_stale_locks()
    assert lock_files(repo) == []


def test_an_orphaned_git_killed_later_leaves_its_locks_to_the_next_swapguard(
    repo: Path, hooks: Path, tmp_path: Path
) -> None:
    tree = code_tree(repo)
    tree.take("s1")
    with prune_held_open(repo, hooks, tmp_path) as child:
        child.kill()
        child.wait(30)
        assert code_tree(repo).clear_stale_locks() == []  # the orphan runs: left to it
        os.killpg(child.pid, signal.SIGKILL)  # then it dies too, holding its locks
        wait_for(lambda: code_tree(repo).clear_stale_locks(), what="the locks to be cleared")
    assert lock_files(repo) == []
    tree.drop("s1")
    assert "refs/swapguard/checkpoints/s1" not in git(repo, "for-each-ref")


def test_a_git_of_ours_killed_on_timeout_keeps_its_journal(
    repo: Path, hooks: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A git we kill ourselves (GIT_TIMEOUT_S) is killed with all it started (its process
    group: here the hook that hangs) and leaves its locks: they stay journaled, and the next
    clear removes them, since nothing of ours runs under them any more."""
    tree = code_tree(repo)
    tree.take("s1")
    monkeypatch.setenv("SWAPGUARD_TEST_GIT_HOOKS", str(hooks))
    monkeypatch.setattr(gitcmd, "GIT_TIMEOUT_S", 1.0)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="did not finish"):
        code_tree(repo).drop("s1")
    assert time.monotonic() - started < 30  # not held by the hook's pipes
    left = lock_files(repo)
    assert "packed-refs.lock" in left and any(n.startswith("swapguard-locks-") for n in left)
    wait_for(lambda: code_tree(repo).clear_stale_locks(), what="the journal to be free")
    assert lock_files(repo) == []


def test_a_lock_older_than_the_journal_is_somebody_elses(repo: Path) -> None:
    """A HEAD.lock that was there before a dead swapguard journaled its locks was not its own
    (its git would have failed on it): reported, never removed."""
    code_tree(repo).take("s1")
    git_dir = repo / ".git"
    foreign = git_dir / "HEAD.lock"
    foreign.write_text("a git of the user's, at work\n")
    os.utime(foreign, (time.time() - 60, time.time() - 60))
    owner = dead_owner()
    journal = {"pid": owner.pid, "started": owner.started, "locks": ["HEAD.lock"], "flock": True}
    (git_dir / f"swapguard-locks-{owner.pid}-0.json").write_text(json.dumps(journal))

    assert code_tree(repo).clear_stale_locks() == []
    assert foreign.read_text() == "a git of the user's, at work\n"
    assert not list(git_dir.glob("swapguard-locks-*"))


def test_a_hook_the_new_version_plants_never_runs_in_our_git(repo: Path) -> None:
    """A reference-transaction hook that hangs would hold HEAD.lock, and the rollback with it."""
    tree = code_tree(repo)
    cp = tree.take("s1")
    hook = repo / ".git" / "hooks" / "reference-transaction"
    hook.parent.mkdir(exist_ok=True)
    hook.write_text("#!/bin/sh\ntouch \"$(dirname \"$0\")/ran\"\nsleep 300\n")
    hook.chmod(0o755)
    modify(repo)
    started = time.monotonic()
    tree.restore(cp, name="s1")
    tree.drop("s1")
    assert time.monotonic() - started < 30
    assert not (hook.parent / "ran").exists()
    assert lock_files(repo) == []


# --- swapguard itself, killed in a settle's prune -------------------------------------------------


def kill_in_prune(sup: Supervisor, hooks: Path, *, alone: bool) -> list[str]:
    """Run swapguard with the blocking hook, abort two swaps (the second one's settle prunes
    the first: keep_swaps = 1), and kill swapguard -9 while the prune's git holds its locks:
    with its process group, or `alone` (its git orphaned). Returns the locks held at the kill."""
    sup.start(env={"SWAPGUARD_TEST_GIT_HOOKS": str(hooks)})
    for summary in ("to be pruned", "to prune it"):
        swap_id = sup.client.prepare(summary)["id"]
        (sup.repo / "feature.py").write_text("print('new')\n")
        sup.client.abort(swap_id)
        sup.wait_swap(swap_id, "aborted")
    wait_for(lambda: (hooks / "held").exists(), what="the prune's git to hold its locks")
    held = lock_files(sup.repo)
    assert sup.process is not None
    if alone:
        sup.process.kill()
    else:
        os.killpg(sup.process.pid, signal.SIGKILL)
    sup.process.wait(30)
    return held


def test_swapguard_killed_in_a_prune_clears_its_locks_on_resume(
    tmp_path: Path, hooks: Path
) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    with supervised(repo, extra="keep_swaps = 1\n") as sup:
        held = kill_in_prune(sup, hooks, alone=False)
        assert "packed-refs.lock" in held, held
        sup.start()
        wait_for(lambda: not lock_files(repo), timeout=10, what="no lock left")
        cleared = wait_for(
            lambda: [e for e in sup.client.events() if e["event"] == "code.stale_locks_cleared"],
            what="the code.stale_locks_cleared event",
        )
        assert "packed-refs.lock" in cleared[0]["detail"]["locks"], cleared


def test_swapguard_restarted_beside_its_orphaned_git_never_steals_its_locks(
    tmp_path: Path, hooks: Path
) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    with supervised(repo, extra="keep_swaps = 1\n") as sup:
        kill_in_prune(sup, hooks, alone=True)
        sup.start()
        sup.wait_host(ready=True)
        assert "packed-refs.lock" in lock_files(repo)  # the orphan's, while it runs
        (hooks / "go").touch()  # the orphan ends its transaction and lets go of its locks
        wait_for(lambda: "packed-refs.lock" not in lock_files(repo), what="the orphan to end")
        swap_id = sup.client.prepare("after the orphan")["id"]  # clears the journal it left
        assert lock_files(repo) == []
        sup.client.abort(swap_id)


def test_a_lock_swapguard_did_not_take_is_reported_never_stolen(tmp_path: Path) -> None:
    """A HEAD.lock of somebody else's (a user's git at work) stops the code restore: the event
    and status name it, it is never removed, and the rollback completes once it goes."""
    repo = make_sample_repo(tmp_path / "repo")
    with supervised(repo, deadman={"window": "60s", "hard_cap": "120s"}) as sup:
        sup.start()
        swap_id = sup.client.prepare("a version to roll back")["id"]
        new_version(repo, {"version": "v2"})
        sup.client.activate(swap_id)
        sup.wait_swap(swap_id, "probation")
        foreign = repo / ".git" / "HEAD.lock"
        foreign.write_text("a git of the user's, at work\n")
        sup.client.rollback(swap_id)
        event = wait_for(
            lambda: [e for e in sup.client.events() if e["event"] == "code.foreign_locks"],
            what="the code.foreign_locks event",
        )
        assert event[0]["detail"]["locks"] == [str(foreign)], event
        assert sup.status()["code"]["foreign_locks"] == [str(foreign)]
        assert foreign.read_text() == "a git of the user's, at work\n"  # never stolen
        foreign.unlink()  # its owner lets go: the rollback's retry goes through
        doc = sup.wait_swap(swap_id, "rolled_back", timeout=60)
        assert doc["state"] == "rolled_back"
        wait_for(lambda: sup.status()["code"]["foreign_locks"] == [], what="the report to clear")
