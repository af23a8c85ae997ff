"""Checkpoints of real git repos: take, let a "new version" mutate, restore: exactly as before."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.code import treemodes, treepaths
from supervisor.code.checkpoint import Change, Checkpoint, CodeTree
from supervisor.config.noncode import GENERATED
from supervisor.errors import CheckpointError, ConfigError

WAIT_S = 10.0


def git(repo: Path, *args: str) -> str:
    """The tests' own git, as a user would run it (safe.directory: repos may belong to nobody)."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    proc = subprocess.run(
        ["git", "-c", "safe.directory=*", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"git {args}: {proc.stderr}"
    return proc.stdout


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def snapshot_state(repo: Path) -> dict[str, Any]:
    """Everything restore promises to put back: files, modes, links, HEAD, branch, index."""
    files: dict[str, tuple[str, int, str]] = {}
    for folder, dirs, names in os.walk(repo):
        base = Path(folder)
        if base == repo:
            dirs.remove(".git")
        for name in [*names, *(d for d in dirs if (base / d).is_symlink())]:
            path = base / name
            info = path.lstat()
            rel = path.relative_to(repo).as_posix()
            if stat.S_ISLNK(info.st_mode):
                files[rel] = ("link", 0, os.readlink(path))
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                files[rel] = ("file", stat.S_IMODE(info.st_mode), digest)
    head = subprocess.run(
        ["git", "-c", "safe.directory=*", "rev-parse", "-q", "--verify", "HEAD"],
        cwd=repo,
        capture_output=True,
        text=True,
    ).stdout.strip()
    branch = subprocess.run(
        ["git", "-c", "safe.directory=*", "symbolic-ref", "-q", "HEAD"],
        cwd=repo,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "files": files,
        "head": head,
        "branch": branch,
        "status": git(repo, "status", "--porcelain=v2", "--untracked-files=all"),
        "staged": git(repo, "diff", "--cached", "--binary"),
    }


def init_repo(repo: Path) -> None:
    repo.mkdir(parents=True, exist_ok=True)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "Host Developer")
    git(repo, "config", "user.email", "dev@example.com")


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD").strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repo with three commits and a dirty tree of every kind."""
    repo = tmp_path / "repo"
    init_repo(repo)
    write(repo / ".gitignore", "*.log\ndist/\n.swapguard/\n")
    write(repo / "README.md", "# host\n")
    write(repo / "src/app.py", "print('v1')\n")
    write(repo / "src/lib.py", "X = 1\n")
    write(repo / "docs/guide.txt", "guide\n")
    write(repo / "run.sh", "#!/bin/sh\nexec python src/app.py\n")
    (repo / "run.sh").chmod(0o755)
    (repo / "current").symlink_to("src/app.py")
    commit_all(repo, "first")
    write(repo / "src/lib.py", "X = 2\n")
    write(repo / "src/extra.py", "Y = 1\n")
    commit_all(repo, "second")
    write(repo / "docs/more.txt", "more\n")
    commit_all(repo, "third")
    # staged, staged-then-modified, unstaged, untracked, ignored, extra path, excluded
    write(repo / "README.md", "# host, staged\n")
    write(repo / "staged.txt", "new and staged\n")
    write(repo / "src/lib.py", "X = 3\n")
    git(repo, "add", "README.md", "staged.txt", "src/lib.py")
    write(repo / "src/lib.py", "X = 4\n")
    write(repo / "src/app.py", "print('v1, unstaged')\n")
    write(repo / "notes/todo.txt", "untracked\n")
    write(repo / "debug.log", "ignored\n")
    write(repo / "dist/bundle.js", "bundle v1\n")
    write(repo / "dist/lib/chunk.js", "chunk v1\n")
    write(repo / ".swapguard/state.db", "swapguard's own\n")
    write(repo / "data/app.db", "data v1\n")
    return repo


def code_tree(repo: Path) -> CodeTree:
    return CodeTree(
        repo,
        extra_paths=["dist"],
        exclude=[repo / ".swapguard", repo / "data/app.db", repo / "data/app.db-wal"],
    )


def abandoned(repo: Path, name: str) -> str:
    return git(repo, "rev-parse", f"refs/swapguard/abandoned/{name}").strip()


def is_ancestor(repo: Path, commit: str, tip: str) -> bool:
    return (
        subprocess.run(
            ["git", "merge-base", "--is-ancestor", commit, tip], cwd=repo, capture_output=True
        ).returncode
        == 0
    )


# --- what a new version may do to the tree ------------------------------------------------------


def modify(repo: Path) -> None:
    write(repo / "src/app.py", "print('v2')\n")
    write(repo / "docs/guide.txt", "guide v2\n")


def add(repo: Path) -> None:
    write(repo / "src/new.py", "NEW = 1\n")
    write(repo / "pkg/deep/er/mod.py", "DEEP = 1\n")


def delete(repo: Path) -> None:
    (repo / "docs/guide.txt").unlink()
    (repo / "notes/todo.txt").unlink()
    shutil.rmtree(repo / "src")


def rename(repo: Path) -> None:
    (repo / "src/lib.py").rename(repo / "src/library.py")
    (repo / "docs").rename(repo / "manual")


def chmod(repo: Path) -> None:
    (repo / "README.md").chmod(0o755)
    (repo / "run.sh").chmod(0o644)


def relink(repo: Path) -> None:
    (repo / "current").unlink()
    (repo / "current").symlink_to("src/lib.py")
    (repo / "docs/more.txt").unlink()
    (repo / "docs/more.txt").symlink_to("../README.md")


def file_to_dir(repo: Path) -> None:
    (repo / "docs/guide.txt").unlink()
    write(repo / "docs/guide.txt/index.md", "now a folder\n")
    shutil.rmtree(repo / "notes")
    write(repo / "notes", "now a file\n")


def restage(repo: Path) -> None:
    git(repo, "reset", "-q")
    write(repo / "docs/more.txt", "more v2\n")
    git(repo, "add", "docs/more.txt", "src/app.py")


def extra_paths(repo: Path) -> None:
    write(repo / "dist/bundle.js", "bundle v2\n")
    write(repo / "dist/new.js", "new chunk\n")
    shutil.rmtree(repo / "dist/lib")


def commit(repo: Path) -> None:
    write(repo / "src/app.py", "print('v2 committed')\n")
    commit_all(repo, "new version")


def switch_branch(repo: Path) -> None:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "on main")
    git(repo, "checkout", "-q", "-b", "feature")
    write(repo / "feature.py", "F = 1\n")
    commit_all(repo, "on feature")


def detach(repo: Path) -> None:
    git(repo, "checkout", "-q", "-f", "--detach", "HEAD~2")


MUTATIONS: list[Callable[[Path], None]] = [
    modify,
    add,
    delete,
    rename,
    chmod,
    relink,
    file_to_dir,
    restage,
    extra_paths,
    commit,
    switch_branch,
    detach,
]


@pytest.mark.parametrize("mutate", MUTATIONS, ids=lambda m: m.__name__)
def test_restore_undoes_each_kind_of_change(repo: Path, mutate: Callable[[Path], None]) -> None:
    tree = code_tree(repo)
    before = snapshot_state(repo)
    cp = tree.take("s1")
    assert snapshot_state(repo) == before
    mutate(repo)
    assert snapshot_state(repo) != before
    tree.restore(cp, name="s1")
    assert snapshot_state(repo) == before
    assert not tree.differs(cp)


def test_restore_undoes_every_change_at_once(repo: Path) -> None:
    tree = code_tree(repo)
    before = snapshot_state(repo)
    cp = tree.take("all")
    for mutate in (modify, add, chmod, relink, file_to_dir, extra_paths, restage, rename, commit):
        mutate(repo)
    tree.restore(cp, name="all")
    assert snapshot_state(repo) == before


def test_restore_puts_back_bits_of_paths_it_rewrote_and_of_paths_it_left(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bits git does not keep come back both where read-tree rewrote a path (its content
    changed, or its folder went) and where it left one alone (only its bits changed): every
    path is looked at once, after read-tree."""
    (repo / "docs/guide.txt").chmod(0o600)
    (repo / "docs").chmod(0o750)
    (repo / "src/extra.py").chmod(0o640)
    tree = code_tree(repo)
    before = snapshot_state(repo)
    cp = tree.take("bits")
    shutil.rmtree(repo / "docs")  # the folder and its odd bits go; a plain one comes instead
    write(repo / "docs/guide.txt", "guide, v2\n")
    (repo / "src/extra.py").chmod(0o644)  # its content stays: read-tree leaves it alone
    (repo / "README.md").chmod(0o600)
    looked: list[list[str]] = []
    real = treemodes.differing

    def recording(root: Path, listing: Any, *args: Any) -> Any:
        looked.append(sorted(path for _, path in listing))
        return real(root, listing, *args)

    monkeypatch.setattr(treemodes, "differing", recording)
    tree.restore(cp, name="bits")
    assert snapshot_state(repo) == before
    assert stat.S_IMODE((repo / "docs").stat().st_mode) == 0o750
    assert len(looked) == 1 and {"docs", "docs/guide.txt", "src/extra.py", "README.md"} <= {
        *looked[0]
    }


def test_restore_puts_back_the_bits_of_a_file_read_tree_rewrote_for_a_removed_hard_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new version links a tracked 0600 file under an ignored name; the rollback removes that
    name (kept in the abandoned state), which changes the file's ctime, so read-tree rewrites
    the file too (git's modes) although its content never changed. Its bits come back: the
    look at every path follows read-tree (it ran beside it, and missed this one)."""
    repo = tmp_path / "repo"
    init_repo(repo)
    write(repo / ".gitignore", "*.log\n")
    write(repo / "app.py", "print(1)\n")
    write(repo / "secret.py", "KEY = 1\n")
    commit_all(repo, "first")
    (repo / "secret.py").chmod(0o600)
    tree = code_tree(repo)
    before = snapshot_state(repo)
    cp = tree.take("linked")
    os.link(repo / "secret.py", repo / "secret.log")
    write(repo / "app.py", "print(2)\n")
    real = treepaths.remove

    def in_the_next_second(root: Path, path: str) -> None:  # git compares whole-second ctimes
        if path.endswith(".log"):
            now = time.time()
            time.sleep(math.ceil(now) - now + 0.05)
        real(root, path)

    monkeypatch.setattr(treepaths, "remove", in_the_next_second)
    tree.restore(cp, name="linked")
    assert stat.S_IMODE(os.lstat(repo / "secret.py").st_mode) == 0o600
    assert snapshot_state(repo) == before


def test_take_leaves_index_head_and_refs_of_the_user_alone(repo: Path) -> None:
    index = (repo / ".git/index").read_bytes()
    head_file = (repo / ".git/HEAD").read_bytes()
    branch_tip = git(repo, "rev-parse", "refs/heads/main")
    config = (repo / ".git/config").read_bytes()
    cp = code_tree(repo).take("s1")
    assert (repo / ".git/index").read_bytes() == index
    assert (repo / ".git/HEAD").read_bytes() == head_file
    assert (repo / ".git/config").read_bytes() == config
    assert git(repo, "rev-parse", "refs/heads/main") == branch_tip
    assert not (repo / ".git/refs/stash").exists()
    assert cp.head == branch_tip.strip() and cp.branch == "main"
    assert git(repo, "rev-parse", "refs/swapguard/checkpoints/s1").strip() == cp.commit
    assert git(repo, "rev-parse", f"{cp.commit}^1").strip() == cp.head
    assert git(repo, "rev-parse", f"{cp.commit}^2^{{tree}}").strip() == cp.index_tree


def test_checkpoint_tree_holds_extra_paths_but_never_excluded_or_ignored(repo: Path) -> None:
    cp = code_tree(repo).take("s1")
    listed = set(git(repo, "ls-tree", "-r", "--name-only", cp.commit).split())
    assert {"dist/bundle.js", "dist/lib/chunk.js", "notes/todo.txt", "staged.txt"} <= listed
    assert not {".swapguard/state.db", "data/app.db", "debug.log"} & listed


def test_commits_of_the_new_version_stay_reachable(repo: Path) -> None:
    tree = code_tree(repo)
    cp = tree.take("s1")
    switch_branch(repo)
    feature_tip = git(repo, "rev-parse", "HEAD").strip()
    main_tip = git(repo, "rev-parse", "refs/heads/main").strip()
    tree.restore(cp, name="s1")
    git(repo, "branch", "-q", "-D", "feature")  # only swapguard's refs are left to keep them
    kept = abandoned(repo, "s1")
    assert is_ancestor(repo, feature_tip, kept) and is_ancestor(repo, main_tip, kept)
    git(repo, "reflog", "expire", "--expire=now", "--all")
    git(repo, "gc", "-q", "--prune=now")
    git(repo, "cat-file", "-e", f"{feature_tip}^{{commit}}")
    assert git(repo, "show", f"{kept}:feature.py") == "F = 1\n"


def test_restore_keeps_ignored_files_it_must_replace(repo: Path) -> None:
    tree = code_tree(repo)
    before = snapshot_state(repo)
    cp = tree.take("s1")
    (repo / "docs/guide.txt").unlink()
    write(repo / "docs/guide.txt/build.log", "ignored, in the way\n")
    tree.restore(cp, name="s1")
    assert snapshot_state(repo) == before
    assert git(repo, "show", "refs/swapguard/abandoned/s1:docs/guide.txt/build.log")


def test_ignored_and_excluded_files_are_not_touched(repo: Path) -> None:
    """What was ignored at the take stays as the new version left it, and so do excluded paths;
    an ignored file that was not there is the new version's: a change, and a rollback moves it
    into the abandoned tree."""
    tree = code_tree(repo)
    cp = tree.take("s1")
    write(repo / "debug.log", "ignored, written by v2\n")
    write(repo / "v2.log", "new ignored\n")
    write(repo / "data/app.db", "data v2\n")
    write(repo / "data/app.db-wal", "wal v2\n")
    write(repo / ".swapguard/state.db", "swapguard wrote this meanwhile\n")
    modify(repo)
    assert [c.path for c in tree.changes(cp)] == ["docs/guide.txt", "src/app.py", "v2.log"]
    tree.restore(cp, name="s1")
    assert (repo / "debug.log").read_text() == "ignored, written by v2\n"
    assert not (repo / "v2.log").exists()
    assert git(repo, "show", f"{abandoned(repo, 's1')}:v2.log") == "new ignored\n"
    assert (repo / "data/app.db").read_text() == "data v2\n"
    assert (repo / "data/app.db-wal").read_text() == "wal v2\n"
    assert (repo / ".swapguard/state.db").read_text() == "swapguard wrote this meanwhile\n"
    assert (repo / "src/app.py").read_text() == "print('v1, unstaged')\n"
    assert not tree.differs(cp)


def test_new_files_code_ignore_matches_are_neither_changes_nor_removed(repo: Path) -> None:
    """`code.ignore` is swapguard's, out of the host's reach: what it matches is never code."""
    tree = CodeTree(repo, exclude=[repo / ".swapguard"], ignore=(*GENERATED, "*.log"))
    cp = tree.take("s1")
    write(repo / "v2.log", "new, declared not code\n")
    assert tree.changes(cp) == []
    tree.restore(cp, name="s1")
    assert (repo / "v2.log").read_text() == "new, declared not code\n"


def test_excluded_file_tracked_by_git_is_neither_captured_nor_restored(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(repo)
    write(repo / "app.py", "v1\n")
    write(repo / "data/app.db", "committed by mistake\n")
    commit_all(repo, "first")
    tree = CodeTree(repo, exclude=[repo / "data/app.db"])
    cp = tree.take("s1")
    write(repo / "data/app.db", "live data\n")
    write(repo / "app.py", "v2\n")
    commit_all(repo, "v2 commits the db too")
    tree.restore(cp, name="s1")
    assert (repo / "data/app.db").read_text() == "live data\n"
    assert (repo / "app.py").read_text() == "v1\n"


def test_restore_refuses_to_replace_a_folder_that_holds_an_excluded_file(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(repo)
    write(repo / "var", "a file at first\n")
    commit_all(repo, "first")
    tree = CodeTree(repo, exclude=[repo / "var/app.db"])
    cp = tree.take("s1")
    (repo / "var").unlink()
    write(repo / "var/app.db", "live data\n")
    with pytest.raises(CheckpointError, match="excluded"):
        tree.restore(cp, name="s1")
    assert (repo / "var/app.db").read_text() == "live data\n"


# A restore in a child process that stops just before one of its steps (a CodeTree method, or a
# git command line), says so, and waits there to be killed: a crash at a known point, whatever
# the machine's load.
_STOPPING_RESTORE = """
import json, sys, time
from pathlib import Path
from supervisor.code import checkpoint
from tests.test_checkpoint import code_tree

repo, cp = Path(sys.argv[1]), checkpoint.Checkpoint.from_json(json.loads(sys.argv[2]))
stop_at = sys.argv[3]

def stop(*args, **kwargs):
    print("stopped", flush=True)
    time.sleep(600)

if stop_at.startswith("git "):
    command, run_git = stop_at.split()[1:], checkpoint._Git.run

    def run(self, *args, **kwargs):
        if list(args[: len(command)]) == command:
            stop()
        return run_git(self, *args, **kwargs)

    checkpoint._Git.run = run
else:
    setattr(checkpoint.CodeTree, stop_at, stop)
code_tree(repo).restore(cp, name="s1")
print("finished", flush=True)
"""


def kill_restore_at(repo: Path, cp: Checkpoint, stop_at: str, scratch: Path) -> None:
    """Run a restore of `cp` in a child, SIGKILL it where it stopped, and check it did stop."""
    child = subprocess.Popen(
        [sys.executable, "-c", _STOPPING_RESTORE, str(repo), json.dumps(cp.to_json()), stop_at],
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "TMPDIR": str(scratch)},  # the killed child leaves its scratch here
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # killpg also kills any git it runs, as a crash would
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], WAIT_S)
        said = child.stdout.readline().strip() if ready else "nothing"
        assert said == "stopped", f"the restore said {said!r} instead of stopping at {stop_at}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=WAIT_S)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL


# (the step the restore is killed before, and what it must have left half done)
CRASH_POINTS = {
    "_put_refs": "nothing changed yet: the new version's tree, HEAD and index",
    "git read-tree --reset -u": "the abandoned state's ref kept, HEAD and branch put back",
    "_put_index": "work tree, HEAD and branch restored; the user's index still the new version's",
}


@pytest.mark.parametrize("stop_at", list(CRASH_POINTS))
def test_restore_killed_half_way_then_repeated_ends_exact(
    repo: Path, tmp_path: Path, stop_at: str
) -> None:
    tree = code_tree(repo)
    before = snapshot_state(repo)
    cp = tree.take("s1")
    for i in range(300):
        write(repo / f"gen/{i:03}.py", f"N = {i}\n")
    commit(repo)
    new_head = git(repo, "rev-parse", "HEAD").strip()
    changed = snapshot_state(repo)

    kill_restore_at(repo, cp, stop_at, tmp_path)

    half_done = snapshot_state(repo)
    kept = (repo / ".git/refs/swapguard/abandoned/s1").exists()
    assert kept == (stop_at != "_put_refs"), CRASH_POINTS[stop_at]
    if stop_at == "_put_refs":
        assert half_done == changed, CRASH_POINTS[stop_at]
    else:
        assert (half_done["head"], half_done["branch"]) == (before["head"], before["branch"])
    if stop_at == "git read-tree --reset -u":
        assert half_done["files"] == changed["files"], CRASH_POINTS[stop_at]
    elif stop_at != "_put_refs":
        assert not (repo / "gen").exists(), CRASH_POINTS[stop_at]
        assert half_done["files"] == before["files"], CRASH_POINTS[stop_at]
    assert not list((repo / ".git").glob("swapguard-index.*")), CRASH_POINTS[stop_at]
    assert not (repo / ".git/index.lock").exists()  # killed between steps, not inside git
    # the restore died holding its locks: their journal is left for the next one to clear
    assert list((repo / ".git").glob("swapguard-locks-*.json")), "killed outside the restore?"

    tree.restore(cp, name="s1")
    assert snapshot_state(repo) == before
    assert not list((repo / ".git").glob("swapguard-index.*"))
    assert not list((repo / ".git").glob("swapguard-locks-*.json"))
    first = abandoned(repo, "s1")
    tree.restore(cp, name="s1")
    assert snapshot_state(repo) == before
    assert abandoned(repo, "s1") == first
    assert is_ancestor(repo, new_head, first)
    assert git(repo, "show", f"{first}:gen/123.py") == "N = 123\n"


def test_take_refuses_while_index_lock_exists(repo: Path) -> None:
    (repo / ".git/index.lock").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"index\.lock"):
        code_tree(repo).take("s1")
    assert git(repo, "for-each-ref", "refs/swapguard/") == ""


def test_take_refuses_during_a_merge_and_restore_sets_it_aside(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(repo)
    write(repo / "a.txt", "base\n")
    commit_all(repo, "base")
    tree = CodeTree(repo)
    cp = tree.take("before")
    git(repo, "checkout", "-q", "-b", "other")
    write(repo / "a.txt", "other\n")
    commit_all(repo, "other")
    git(repo, "checkout", "-q", "main")
    write(repo / "a.txt", "main\n")
    commit_all(repo, "main")
    merge = subprocess.run(["git", "merge", "other"], cwd=repo, capture_output=True)
    assert merge.returncode != 0
    before = snapshot_state(repo)
    with pytest.raises(CheckpointError, match="a merge is in progress"):
        tree.take("s1")
    assert snapshot_state(repo) == before
    # a merge begun since the checkpoint (by the new version) does not stop its rollback
    tree.restore(cp, name="s1")
    assert not (repo / ".git/MERGE_HEAD").exists()
    assert (repo / ".git/swapguard-aside-s1/MERGE_HEAD").exists()
    assert (repo / "a.txt").read_text() == "base\n"
    assert git(repo, "status", "--porcelain") == ""


def test_unborn_branch(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(repo)
    write(repo / "app.py", "v1\n")
    write(repo / "staged.py", "staged\n")
    git(repo, "add", "staged.py")
    tree = CodeTree(repo)
    before = snapshot_state(repo)
    cp = tree.take("s1")
    assert cp.head is None and cp.branch == "main" and cp.index_tree
    write(repo / "app.py", "v2\n")
    commit_all(repo, "the new version's first commit")
    new_head = git(repo, "rev-parse", "HEAD").strip()
    tree.restore(cp, name="s1")
    assert snapshot_state(repo) == before
    assert tree.head() is None
    assert is_ancestor(repo, new_head, abandoned(repo, "s1"))


def test_fresh_repo_without_an_index(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(repo)
    write(repo / "app.py", "v1\n")
    tree = CodeTree(repo)
    before = snapshot_state(repo)
    cp = tree.take("s1")
    assert cp.index_tree == "" and not (repo / ".git/index").exists()
    write(repo / "app.py", "v2\n")
    git(repo, "add", "-A")
    tree.restore(cp, name="s1")
    assert snapshot_state(repo) == before
    assert not (repo / ".git/index").exists()


@pytest.mark.parametrize("staged_apart", [False, True])
def test_restore_leaves_an_index_whose_stat_data_is_fresh(
    tmp_path: Path, staged_apart: bool
) -> None:
    """The index put back is the one that wrote the work tree (nothing staged apart from it) or
    one built from it: no entry is stat-dirty but those that differ from the work tree."""
    repo = tmp_path / "repo"
    init_repo(repo)
    for i in range(20):
        write(repo / f"src/m{i:02}.py", f"N = {i}\n")
    commit_all(repo, "first")
    if staged_apart:
        write(repo / "src/m00.py", "N = 'staged'\n")
        git(repo, "add", "src/m00.py")
        write(repo / "src/m00.py", "N = 'staged, then changed'\n")
    time.sleep(1.1)  # no entry racily clean: what git finds stat-dirty is the restore's doing
    tree = CodeTree(repo)
    before = snapshot_state(repo)
    cp = tree.take("s1")
    write(repo / "src/m01.py", "N = 'new version'\n")
    write(repo / "src/new.py", "added\n")
    git(repo, "add", "-A")
    tree.restore(cp, name="s1")
    assert snapshot_state(repo) == before
    dirty = git(repo, "diff-files", "--name-only").split()
    assert dirty == (["src/m00.py"] if staged_apart else [])


def test_detached_head(repo: Path) -> None:
    git(repo, "checkout", "-q", "--detach", "HEAD~1")
    tree = code_tree(repo)
    before = snapshot_state(repo)
    cp = tree.take("s1")
    assert cp.branch is None and cp.head == before["head"]
    git(repo, "checkout", "-q", "-f", "main")
    write(repo / "src/app.py", "print('v2')\n")
    commit_all(repo, "v2 on main")
    tree.restore(cp, name="s1")
    assert snapshot_state(repo) == before


def test_changes_lists_added_modified_deleted(repo: Path) -> None:
    tree = code_tree(repo)
    cp = tree.take("s1")
    assert tree.changes(cp) == [] and not tree.differs(cp)
    write(repo / "src/app.py", "print('v2')\n")
    write(repo / "src/new.py", "NEW = 1\n")
    (repo / "docs/guide.txt").unlink()
    (repo / "run.sh").chmod(0o644)
    write(repo / "dist/bundle.js", "bundle v2\n")
    (repo / "current").unlink()
    write(repo / "current", "no longer a link\n")
    assert tree.differs(cp)
    assert tree.changes(cp) == [
        Change("current", "modified"),
        Change("dist/bundle.js", "modified"),
        Change("docs/guide.txt", "deleted"),
        Change("run.sh", "modified"),
        Change("src/app.py", "modified"),
        Change("src/new.py", "added"),
    ]


def test_drop_forgets_the_refs_of_one_swap(repo: Path) -> None:
    tree = code_tree(repo)
    cp = tree.take("s1")
    tree.take("s2")
    modify(repo)
    tree.restore(cp, name="s1")
    tree.drop("s1")
    assert git(repo, "for-each-ref", "--format=%(refname)", "refs/swapguard/").split() == [
        "refs/swapguard/checkpoints/s2"
    ]
    tree.drop("s1")  # pruning again is fine


def test_drop_of_many_swaps_runs_git_twice(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prune names every finished swap past keep_swaps: the cost must not grow with them."""
    tree = code_tree(repo)
    for name in ("s1", "s2", "s3"):
        tree.take(name)
    calls: list[str] = []
    real_run = type(tree._git).run

    def counting_run(git: Any, *args: str, **kwargs: Any) -> str | None:
        calls.append(args[0])
        return real_run(git, *args, **kwargs)

    monkeypatch.setattr(type(tree._git), "run", counting_run)
    tree.drop(*(f"gone-{i}" for i in range(200)), "s1", "s3")
    assert calls == ["for-each-ref", "update-ref"]
    assert git(repo, "for-each-ref", "--format=%(refname)", "refs/swapguard/").split() == [
        "refs/swapguard/checkpoints/s2"
    ]
    with pytest.raises(CheckpointError, match="checkpoint name"):
        tree.drop("s2", "../escape")
    assert "refs/swapguard/checkpoints/s2" in git(repo, "for-each-ref", "refs/swapguard/")


def test_checkpoint_json_round_trip_and_bad_records() -> None:
    cp = Checkpoint(commit="a" * 40, index_tree="b" * 40, head="c" * 40, branch="main")
    assert Checkpoint.from_json(cp.to_json()) == cp
    with pytest.raises(CheckpointError, match="missing field"):
        Checkpoint.from_json({"commit": "a" * 40})
    with pytest.raises(CheckpointError, match="commit"):
        Checkpoint.from_json({**cp.to_json(), "commit": "HEAD"})
    with pytest.raises(CheckpointError, match="branch"):
        Checkpoint.from_json({**cp.to_json(), "branch": 3})
    with pytest.raises(CheckpointError, match="detached"):
        Checkpoint.from_json({**cp.to_json(), "head": None, "branch": None})


def test_bad_roots_names_and_paths_are_named(tmp_path: Path, repo: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="not a git repository"):
        CodeTree(tmp_path / "plain").check()
    with pytest.raises(CheckpointError, match="not a directory"):
        CodeTree(tmp_path / "missing").check()
    with pytest.raises(CheckpointError, match="top of its git work tree"):
        CodeTree(repo / "src").check()
    with pytest.raises(CheckpointError, match="checkpoint name"):
        code_tree(repo).take("../escape")
    with pytest.raises(ConfigError, match=r"code\.extra_paths"):
        CodeTree(repo, extra_paths=["../outside"])
    with pytest.raises(ConfigError, match="must be absolute"):
        CodeTree(repo, exclude=[Path("relative.db")])


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder another user can enter (pytest's tmp_path lives under a 0700 folder)."""
    folder = Path(tempfile.mkdtemp(prefix="swapguard-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_as_root_git_runs_as_the_owner_of_the_tree(shared_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    repo = shared_dir / "repo"
    init_repo(repo)
    write(repo / "app.py", "v1\n")
    commit_all(repo, "first")
    write(repo / "app.py", "v1 dirty\n")
    subprocess.run(["chown", "-R", f"{nobody.pw_uid}:{nobody.pw_gid}", str(repo)], check=True)
    tree = CodeTree(repo)
    before = snapshot_state(repo)
    cp = tree.take("s1")
    write(repo / "app.py", "v2\n")
    write(repo / "new/module.py", "new\n")
    subprocess.run(["chown", "-R", f"{nobody.pw_uid}:{nobody.pw_gid}", str(repo)], check=True)
    tree.restore(cp, name="s1")
    assert snapshot_state(repo) == before
    owned_by_root = [
        str(Path(folder) / name)
        for folder, dirs, names in os.walk(repo)
        for name in [*dirs, *names]
        if (Path(folder) / name).lstat().st_uid == 0
    ]
    assert owned_by_root == []


def test_take_cost_grows_with_what_changed_not_with_tree_size(tmp_path: Path) -> None:
    repo = tmp_path / "big"
    init_repo(repo)
    stream = [b"commit refs/heads/main\ncommitter Dev <dev@example.com> 0 +0000\ndata 4\nbig\n"]
    for n in range(5000):
        body = f"VALUE = {n}\n".encode()
        stream.append(
            b"M 100644 inline pkg%02d/mod%03d.py\ndata %d\n%s"
            % (n // 100, n % 100, len(body), body)
        )
    # one pack instead of 5,000 loose objects: the setup stays quick on a loaded machine
    subprocess.run(["git", "fast-import", "--quiet"], cwd=repo, input=b"".join(stream), check=True)
    git(repo, "reset", "-q", "--hard")
    tree = CodeTree(repo)
    started = time.perf_counter()
    first = tree.take("first")
    first_s = time.perf_counter() - started
    write(repo / "pkg07/mod042.py", "VALUE = 'changed'\n")
    started = time.perf_counter()
    second = tree.take("second")
    second_s = time.perf_counter() - started
    print(
        f"\ntake() on 5,000 files: first {first_s * 1000:.0f} ms, "
        f"one file changed {second_s * 1000:.0f} ms"
    )
    assert tree.changes(first) == [Change("pkg07/mod042.py", "modified")]
    assert not tree.differs(second)


# A writer of its own: files and whole folders appear and vanish while git lists and reads them.
_CHURN = """
import itertools, os, sys
root = sys.argv[1]
for n in itertools.count():
    folder = os.path.join(root, f"churn{n % 3}")
    os.makedirs(folder, exist_ok=True)
    for i in range(30):
        with open(os.path.join(folder, f"t{i}.txt"), "w") as f:
            f.write(str(n) * 2000)
    for i in range(30):
        os.unlink(os.path.join(folder, f"t{i}.txt"))
    os.rmdir(folder)
    if n == 0:
        print("churning", flush=True)
"""


def _tree_without_churn(repo: Path, commit: str) -> list[str]:
    listed = git(repo, "ls-tree", "-r", "--full-tree", commit).splitlines()
    return [line for line in listed if not line.split("\t", 1)[1].startswith("churn")]


def test_take_survives_files_that_vanish_while_it_runs(repo: Path) -> None:
    """A host may write and delete files while we checkpoint (issue 14 item 5): no take fails
    (git add is tried again within a bounded time), and the rest of the tree is exact."""
    tree = code_tree(repo)
    calm = tree.take("calm")
    churner = subprocess.Popen(
        [sys.executable, "-c", _CHURN, str(repo)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert churner.stdout is not None and churner.stdout.readline() == "churning\n"
        for round_ in range(8):
            taken = tree.take(f"churn{round_}")
            assert _tree_without_churn(repo, taken.commit) == _tree_without_churn(repo, calm.commit)
            assert churner.poll() is None, "the churner stopped: the test proves nothing"
    finally:
        churner.kill()
        churner.wait(timeout=WAIT_S)


def test_prepare_through_swapguard_while_a_process_churns_the_tree(tmp_path: Path) -> None:
    """The same churn beside a real `swapguard run`: POST /v1/swaps answers 201 every time."""
    from tests.support import make_sample_repo, supervised

    repo = make_sample_repo(tmp_path / "repo")
    with supervised(repo, code={"undeclared_changes": "warn"}) as sup:
        sup.start()
        for round_ in range(3):
            churner = subprocess.Popen(
                [sys.executable, "-c", _CHURN, str(repo)], stdout=subprocess.PIPE, text=True
            )
            try:
                assert churner.stdout is not None and churner.stdout.readline() == "churning\n"
                swap = sup.client.prepare(f"while files churn {round_}")
                assert swap["state"] == "prepared" and churner.poll() is None
            finally:
                churner.kill()
                churner.wait(timeout=WAIT_S)
            sup.client.abort(swap["id"])
            sup.wait_swap(swap["id"], "aborted")


@pytest.mark.parametrize(
    ("stderr", "vanished"),
    [
        ("fatal: unable to stat 'churn1/t3.txt': No such file or directory", True),
        ("fatal: unable to stat 'a b/x': Not a directory", True),
        ('error: open("src/x.py"): No such file or directory\nfatal: adding files failed', True),
        ("fatal: unable to stat 'locked/x': Permission denied", False),  # would not go away
        ("fatal: Unable to create '/r/.git/index.lock': File exists.", False),
    ],
)
def test_only_a_file_that_vanished_makes_the_take_try_again(stderr: str, vanished: bool) -> None:
    from supervisor.code.checkpoint import _vanished_file

    assert _vanished_file(CheckpointError(f"git add failed in /r (exit 128): {stderr}")) is vanished


def test_a_git_that_outlives_its_limit_is_killed_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tree on a hung file system fails the step (retried with backoff), never holds a worker."""
    from supervisor.code import gitcmd

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "git"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(gitcmd, "GIT_TIMEOUT_S", 0.3)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="did not finish within"):
        gitcmd.Git(tmp_path).run("status")
    assert time.monotonic() - started < 30


def test_a_restore_puts_the_index_back_across_file_systems(repo: Path, tmp_path: Path) -> None:
    """The repo on one file system, the scratch folder (TMPDIR) on another, as with a tmpfs
    /tmp: the staged index is built in the git dir, never renamed in from the scratch folder
    (a merge of this session made every rollback of such a tree end `failed`: EXDEV)."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        moved = mount_point / "repo"
        shutil.copytree(repo, moved, symlinks=True)
        tree = code_tree(moved)
        cp = tree.take("s1")
        staged_before = git(moved, "diff", "--cached", "--name-only")
        write(moved / "src/app.py", "print('v2')\n")
        git(moved, "add", "-A")
        tree.restore(cp, name="s1")
        assert (moved / "src/app.py").read_text() == "print('v1, unstaged')\n"
        assert git(moved, "diff", "--cached", "--name-only") == staged_before
        assert "staged.txt" in staged_before
        assert not tree.differs(cp)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


# --- ignored files the new version hid (review H1) ---------------------------------------------


def test_a_package_hidden_by_its_own_gitignore_is_drift_and_goes(repo: Path) -> None:
    tree = code_tree(repo)
    cp = tree.take("s1")
    before = snapshot_state(repo)
    write(repo / "json/__init__.py", "raise SystemExit('the new version ran')\n")
    write(repo / "json/.gitignore", "*\n")
    os.mkfifo(repo / "json/pipe")  # git cannot hold it: it must not stop the restore
    added = {Change("json/.gitignore", "added"), Change("json/__init__.py", "added")}
    assert added <= set(tree.changes(cp))
    tree.restore(cp, name="s1")
    assert not os.path.lexists(repo / "json")
    assert snapshot_state(repo) == before
    kept = abandoned(repo, "s1")
    assert git(repo, "show", f"{kept}:json/__init__.py").startswith("raise SystemExit")
    assert not tree.differs(cp)


def test_a_module_hidden_by_info_exclude_is_drift_and_goes(repo: Path) -> None:
    tree = code_tree(repo)
    cp = tree.take("s1")
    with open(repo / ".git/info/exclude", "a") as handle:
        handle.write("json.py\n")
    write(repo / "json.py", "raise SystemExit('the new version ran')\n")
    assert Change("json.py", "added") in tree.changes(cp)
    tree.restore(cp, name="s1")
    assert not (repo / "json.py").exists()
    assert git(repo, "show", f"{abandoned(repo, 's1')}:json.py")


def test_what_lies_in_a_folder_ignored_at_the_take_is_no_code(repo: Path) -> None:
    """A virtualenv (ignored as a folder) is not code: a new version's writes there stay."""
    write(repo / ".gitignore", "*.log\ndist/\n.swapguard/\n.venv/\n")
    commit_all(repo, "ignore .venv")
    write(repo / ".venv/lib/site.py", "old\n")
    tree = code_tree(repo)
    cp = tree.take("s1")
    write(repo / ".venv/lib/site.py", "new\n")
    write(repo / ".venv/lib/json.py", "new\n")
    write(repo / ".venv/lib/__pycache__/json.cpython-311.pyc", "new bytecode\n")
    assert tree.changes(cp) == []
    tree.restore(cp, name="s1")
    assert (repo / ".venv/lib/site.py").read_text() == "new\n"
    assert (repo / ".venv/lib/json.py").exists()
    assert (repo / ".venv/lib/__pycache__/json.cpython-311.pyc").exists()


def test_a_checkpoint_without_a_listing_keeps_the_earlier_behaviour(repo: Path) -> None:
    """Taken by an earlier swapguard (no `ignored:` line): new ignored files are left alone."""
    tree = code_tree(repo)
    taken = tree.take("s1")
    message = git(repo, "cat-file", "commit", taken.commit).split("\n\n", 1)[1]
    older = "".join(line + "\n" for line in message.splitlines() if not line.startswith("ignored:"))
    parents = git(repo, "rev-list", "--parents", "-n1", taken.commit).split()[1:]
    args = [arg for parent in parents for arg in ("-p", parent)]
    commit = git(repo, "commit-tree", "-m", older, *args, f"{taken.commit}^{{tree}}").strip()
    cp = Checkpoint(commit=commit, index_tree=taken.index_tree, head=taken.head,
                    branch=taken.branch)  # fmt: skip
    write(repo / "v2.log", "new ignored\n")
    assert tree.changes(cp) == []
    tree.restore(cp, name="s1")
    assert (repo / "v2.log").read_text() == "new ignored\n"


def test_hidden_files_go_when_nothing_was_ignored_at_the_take(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init_repo(repo)
    write(repo / "app.py", "import json\n")
    commit_all(repo, "v1")
    tree = CodeTree(repo)
    cp = tree.take("s1")
    assert "ignored: []" in git(repo, "cat-file", "commit", cp.commit)
    write(repo / "json/__init__.py", "raise SystemExit('the new version ran')\n")
    write(repo / "json/.gitignore", "*\n")
    assert not tree.differs(cp)  # hosts write ignored logs at run time: no drift (see differs)
    tree.restore(cp, name="s1")
    assert not (repo / "json").exists()


def test_a_data_folder_made_after_the_take_is_never_removed(tmp_path: Path) -> None:
    """An ignored folder that holds an excluded path is data, even when it is new."""
    repo = tmp_path / "repo"
    init_repo(repo)
    write(repo / ".gitignore", "data/\n")
    write(repo / "app.py", "print('v1')\n")
    commit_all(repo, "v1")
    tree = CodeTree(repo, exclude=[repo / "data/app.db"])
    cp = tree.take("s1")
    write(repo / "data/app.db", "live data\n")
    write(repo / "data/export.csv", "the host's\n")
    assert tree.changes(cp) == []
    tree.restore(cp, name="s1")
    assert (repo / "data/app.db").read_text() == "live data\n"
    assert (repo / "data/export.csv").exists()


def test_bits_and_owners_are_never_put_back_through_a_folder_swapped_for_a_symlink(
    tmp_path: Path,
) -> None:
    """A process of the host's user that outlived its tree swaps `pkg/` for a link to a folder
    outside the tree once read-tree is done: the restore's chown and chmod of `pkg/__init__.py`
    must not reach the file of the same name out there (as root, that would hand it over)."""
    root, outside = tmp_path / "tree", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    victim = outside / "__init__.py"
    write(victim, "# not the tree's\n")
    victim.chmod(0o644)
    (root / "pkg").symlink_to(outside)
    item = [("100644", "pkg/__init__.py")]
    before = os.lstat(victim)
    owner = (before.st_uid + 1234, before.st_gid + 1234)
    assert treemodes.put_back_owners(root, item, owner, {}) == []
    assert treemodes.put_back(root, item, {"pkg/__init__.py": 0o666}, 0o022) == []
    after = os.lstat(victim)
    assert (after.st_uid, after.st_gid, after.st_mode) == (
        before.st_uid,
        before.st_gid,
        before.st_mode,
    )
