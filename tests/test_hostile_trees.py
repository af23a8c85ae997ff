"""What a hostile new version can leave in the code tree and at the data paths, at the level of
one CodeTree or SnapshotStore: the restore ends exact, never following or opening what it finds.

The end-to-end catalogue (a real swapguard, host and deadline) is tests/test_hostile_versions.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.code import conversions
from supervisor.code.checkpoint import CodeTree
from supervisor.code.gitlocks import Owner
from supervisor.data.datacopy import copy_file_hashed, file_digest, fsync_file
from supervisor.data.snapshot import SnapshotStore
from supervisor.errors import CheckpointError
from tests.test_checkpoint import (
    code_tree,
    commit_all,
    git,
    init_repo,
    modify,
    snapshot_state,
    write,
)
from tests.test_checkpoint import repo as repo  # the fixture
from tests.test_checkpoint import shared_dir as shared_dir  # the fixture
from tests.test_snapshot import SWAP
from tests.test_snapshot import data as data  # the fixture
from tests.test_snapshot import store as store  # the fixture


def folder_modes(repo: Path) -> dict[str, int]:
    """The permission bits of every folder of the work tree (git records none of them)."""
    found = {}
    for folder, dirs, _ in os.walk(repo):
        if Path(folder) == repo:
            dirs.remove(".git")
        for name in dirs:
            path = Path(folder) / name
            if not path.is_symlink():
                found[path.relative_to(repo).as_posix()] = stat.S_IMODE(path.lstat().st_mode)
    return found


def without_data(state: dict[str, Any]) -> dict[str, Any]:
    files = {k: v for k, v in state["files"].items() if not k.startswith("data/")}
    status = "".join(
        line for line in state["status"].splitlines(keepends=True) if "data/" not in line
    )
    return {**state, "files": files, "status": status}


@contextmanager
def unix_socket_at(path: Path) -> Iterator[None]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        yield


KILLS = 5  # restores killed at a random instant (the e2e chaos test kills swapguard itself)


# --- what a hostile new version leaves in the code tree ---------------------------------------


def folder_to_symlink_outside(repo: Path) -> None:
    outside = repo.parent / "elsewhere"
    write(outside / "app.py", "print('outside')\n")
    write(outside / "lib.py", "outside\n")
    shutil.rmtree(repo / "src")
    (repo / "src").symlink_to(outside)


def folder_to_file(repo: Path) -> None:
    shutil.rmtree(repo / "src")
    write(repo / "src", "a file now\n")


def file_to_fifo(repo: Path) -> None:
    (repo / "src/lib.py").unlink()
    os.mkfifo(repo / "src/lib.py")
    os.mkfifo(repo / "docs/fifo")


def file_to_socket(repo: Path) -> None:
    (repo / "docs/guide.txt").unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(repo / "docs/guide.txt"))


def folder_locked(repo: Path) -> None:
    write(repo / "src/new.py", "NEW = 1\n")
    (repo / "src").chmod(0)
    (repo / "docs").chmod(0o555)
    (repo / "README.md").chmod(0)


def data_folder_to_symlink(repo: Path) -> None:
    moved = repo.parent / "moved-data"
    (repo / "data").rename(moved)
    (repo / "data").symlink_to(moved)


TREE_ATTACKS: list[Callable[[Path], None]] = [
    folder_to_symlink_outside,
    folder_to_file,
    file_to_fifo,
    file_to_socket,
    folder_locked,
    data_folder_to_symlink,
]


@pytest.mark.parametrize("attack", TREE_ATTACKS, ids=lambda a: a.__name__)
def test_restore_undoes_what_a_hostile_version_leaves(
    repo: Path, attack: Callable[[Path], None]
) -> None:
    tree = code_tree(repo)
    outside = repo.parent / "elsewhere"
    before, modes = snapshot_state(repo), folder_modes(repo)
    cp = tree.take("s1")
    attack(repo)
    outside_before = sorted(p.name for p in outside.iterdir()) if outside.exists() else []
    tree.restore(cp, name="s1")
    if attack is data_folder_to_symlink:  # the data is the snapshot store's to put back
        assert not (repo / "data").exists()
        assert (repo.parent / "moved-data/app.db").read_text() == "data v1\n"
        before, modes = without_data(before), {k: v for k, v in modes.items() if k != "data"}
    assert snapshot_state(repo) == before
    assert folder_modes(repo) == modes
    assert not tree.differs(cp)
    if outside.exists():  # nothing written through the symlink
        assert sorted(p.name for p in outside.iterdir()) == outside_before
        assert (outside / "app.py").read_text() == "print('outside')\n"


def test_a_symlinked_data_folder_works_for_take_changes_and_restore(repo: Path) -> None:
    volume = repo.parent / "volume"
    (repo / "data").rename(volume)
    (repo / "data").symlink_to(volume)
    git(repo, "add", "data")  # as an ordinary layout would: the link is part of the code
    tree = code_tree(repo)
    before = snapshot_state(repo)
    cp = tree.take("s1")
    write(repo / "src/app.py", "print('v2')\n")
    assert [c.path for c in tree.changes(cp)] == ["src/app.py"]
    assert tree.differs(cp)
    tree.restore(cp, name="s1")
    assert snapshot_state(repo) == before
    assert (volume / "app.db").read_text() == "data v1\n"


# --- what a hostile new version leaves at the data paths ----------------------------------------


def make_db(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as con:
        con.execute("PRAGMA journal_mode=wal")
        con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
        con.executemany("INSERT INTO t(v) VALUES (?)", [("row",)] * 100)


def fifo_at(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def socket_at(path: Path) -> None:
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


def symlink_at(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/etc/hostname")


@pytest.mark.parametrize("sidecar", ["", "-wal"])
@pytest.mark.parametrize("plant", [fifo_at, socket_at, symlink_at], ids=lambda p: p.__name__)
def test_a_special_file_at_a_data_path_is_moved_aside_never_opened(
    store: SnapshotStore, data: Path, plant: Callable[[Path], None], sidecar: str
) -> None:
    db = data / "app.db"
    make_db(db)
    before = db.read_bytes()
    snaps = store.take(SWAP, [(db, "sqlite")])
    plant(Path(f"{db}{sidecar}"))

    store.restore(SWAP, snaps)  # a FIFO opened for reading would block here for ever
    assert db.read_bytes() == before
    assert not any(Path(f"{db}{s}").exists() for s in ("-wal", "-journal"))
    kept = Path(f"{db}.rolled-back-{SWAP}{sidecar}")
    assert os.path.lexists(kept) and not stat.S_ISREG(kept.lstat().st_mode)
    for path in store.kept_copies(SWAP):
        fsync_file(path)  # what settle does: returns at once for what is not a regular file
    assert not fsync_file(kept)
    assert Path("/etc/hostname").exists()


def test_a_locked_data_folder_gets_its_mode_back(store: SnapshotStore, data: Path) -> None:
    db = data / "app.db"
    make_db(db)
    data.chmod(0o750)
    snaps = store.take(SWAP, [(db, "sqlite")])
    data.chmod(0)
    store.restore(SWAP, snaps)
    assert stat.S_IMODE(data.lstat().st_mode) == 0o750


def test_copies_keep_holes(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as handle:
        handle.write(b"head")
        handle.seek(256 * 2**20)
        handle.write(b"middle")
        handle.truncate(512 * 2**20)  # ends in a hole
    copy = tmp_path / "copy.bin"
    size, digest = copy_file_hashed(sparse, copy)
    assert size == sparse.stat().st_size == copy.stat().st_size
    assert digest == file_digest(sparse)[1]
    assert copy.stat().st_blocks * 512 < 2**20, "the copy filled its holes"


# --- git locks: ours are cleared after a crash, anybody else's are waited out --------------------


def dead_owner() -> Owner:
    """The identity of a process that has exited (as swapguard after a kill -9)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = Owner(child.pid, psutil.Process(child.pid).create_time())
    child.wait()
    return owner


def test_locks_left_by_a_dead_swapguard_are_cleared_on_resume(repo: Path) -> None:
    tree = code_tree(repo)
    before = snapshot_state(repo)
    cp = tree.take("s1")
    modify(repo)
    owner, git_dir = dead_owner(), repo / ".git"
    journal = {"pid": owner.pid, "started": owner.started, "locks": ["index.lock", "HEAD.lock"]}
    (git_dir / f"swapguard-locks-{owner.pid}-0.json").write_text(json.dumps(journal))
    (git_dir / "index.lock").write_bytes(owner.token())  # taken after the journal, as ours are
    (git_dir / "HEAD.lock").write_text("0" * 40 + "\n")

    tree.restore(cp, name="s1")

    assert snapshot_state(repo) == before
    assert not list(git_dir.glob("*.lock")) and not list(git_dir.glob("swapguard-locks-*"))
    assert tree.index_locked() is None


def test_an_index_lock_of_somebody_else_is_reported_never_stolen(repo: Path) -> None:
    tree = code_tree(repo)
    before = snapshot_state(repo)
    cp = tree.take("s1")
    modify(repo)
    git(repo, "add", "-A")
    lock = repo / ".git/index.lock"
    lock.write_bytes(b"DIRC a git of the new version, killed mid-write")

    started = time.monotonic()
    tree.restore(cp, name="s1")  # the work tree, HEAD and branch: the index waits for the lock
    assert time.monotonic() - started < 10
    assert tree.index_locked() == str(lock)
    assert lock.read_bytes().startswith(b"DIRC a git")
    assert (repo / "src/app.py").read_text() == "print('v1, unstaged')\n"
    assert not tree.finish_index(wait=0.2)

    lock.unlink()  # its owner (or an operator) lets go
    assert tree.finish_index(wait=0.2)
    assert tree.index_locked() is None
    assert snapshot_state(repo) == before


def test_restore_killed_at_random_instants_never_leaves_a_lock(repo: Path, tmp_path: Path) -> None:
    tree = code_tree(repo)
    before = snapshot_state(repo)
    cp = tree.take("s1")
    script = (
        "import json, sys\nfrom pathlib import Path\n"
        "from supervisor.code.checkpoint import Checkpoint\n"
        "from tests.test_checkpoint import code_tree\n"
        "tree = code_tree(Path(sys.argv[1]))\n"
        "tree.restore(Checkpoint.from_json(json.loads(sys.argv[2])), name='s1')\n"
    )
    rng = random.Random(12)
    for _ in range(KILLS):
        modify(repo)
        for i in range(50):
            write(repo / f"gen/{i:02}.py", f"N = {i}\n")
        child = subprocess.Popen(
            [sys.executable, "-c", script, str(repo), json.dumps(cp.to_json())],
            cwd=Path(__file__).parent.parent,
            env={**os.environ, "TMPDIR": str(tmp_path)},
            start_new_session=True,  # killpg kills the git it runs too, as a crash would
        )
        time.sleep(rng.uniform(0.05, 0.6))  # a random instant of the restore, not a wait
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        tree.restore(cp, name="s1")  # no operator: whatever lock the killed one left is known
        assert snapshot_state(repo) == before
        assert not list((repo / ".git").glob("index.lock"))


def file_to_device(repo: Path) -> None:
    (repo / "src/lib.py").unlink()
    os.mknod(repo / "src/lib.py", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_a_device_node_in_the_tree_is_removed_never_opened(repo: Path) -> None:
    tree = code_tree(repo)
    before = snapshot_state(repo)
    cp = tree.take("s1")
    file_to_device(repo)
    tree.restore(cp, name="s1")
    assert snapshot_state(repo) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_a_device_node_at_a_data_path_is_moved_aside(store: SnapshotStore, data: Path) -> None:
    db = data / "app.db"
    make_db(db)
    before = db.read_bytes()
    snaps = store.take(SWAP, [(db, "sqlite")])
    db.unlink()
    os.mknod(db, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    store.restore(SWAP, snaps)
    assert db.read_bytes() == before
    assert stat.S_ISCHR(Path(f"{db}.rolled-back-{SWAP}").lstat().st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand the tree to another user")
def test_as_root_a_tree_of_another_user_with_locked_folders_is_restored(
    shared_dir: Path,
) -> None:
    """git runs as the tree's owner, who cannot enter a folder chmod 000: it is opened first."""
    nobody = pwd.getpwnam("nobody")
    repo = shared_dir / "repo"
    init_repo(repo)
    write(repo / "src/app.py", "v1\n")
    write(repo / "src/deep/mod.py", "deep\n")
    commit_all(repo, "first")
    subprocess.run(["chown", "-R", f"{nobody.pw_uid}:{nobody.pw_gid}", str(repo)], check=True)
    tree = CodeTree(repo)
    before, modes = snapshot_state(repo), folder_modes(repo)
    cp = tree.take("s1")
    write(repo / "src/app.py", "v2\n")
    subprocess.run(["chown", "-R", f"{nobody.pw_uid}:{nobody.pw_gid}", str(repo)], check=True)
    (repo / "src/deep").chmod(0)
    (repo / "src").chmod(0)
    tree.restore(cp, name="s1")
    assert snapshot_state(repo) == before
    assert folder_modes(repo) == modes


@pytest.mark.parametrize("plant", ["symlink", "fifo"])
def test_an_index_replaced_by_a_symlink_or_fifo_is_never_read(
    repo: Path, tmp_path: Path, plant: str
) -> None:
    tree = code_tree(repo)
    before = snapshot_state(repo)
    cp = tree.take("s1")
    modify(repo)
    index = repo / ".git/index"
    index.unlink()
    if plant == "symlink":
        (tmp_path / "big").write_bytes(b"\0" * 1024)
        index.symlink_to(tmp_path / "big")
    else:
        os.mkfifo(index)
    tree.restore(cp, name="s1")  # reading a FIFO index would block here for ever
    assert snapshot_state(repo) == before
    assert (tmp_path / "big").exists() or plant == "fifo"


# --- what a hostile new version leaves in the repository's own metadata ----------------------
# The same user owns .git: a new version can flag its index entries, rewrite the repo's config
# and its info/ files. None of it may blind the capture or bend what the restore writes.


def hostile_code(repo: Path) -> None:
    write(repo / "src/app.py", "print('hostile')\n")
    write(repo / "docs/guide.txt", "guide, hostile\n")


def index_assume_unchanged(repo: Path) -> None:
    hostile_code(repo)
    git(repo, "update-index", "--assume-unchanged", "src/app.py", "docs/guide.txt")


def index_skip_worktree(repo: Path) -> None:
    hostile_code(repo)
    git(repo, "update-index", "--skip-worktree", "src/app.py", "docs/guide.txt")


def sparse_checkout(repo: Path) -> None:
    hostile_code(repo)
    git(repo, "config", "core.sparseCheckout", "true")
    write(repo / ".git/info/sparse-checkout", "/README.md\n/run.sh\n")


def attributes_convert_line_ends(repo: Path) -> None:
    hostile_code(repo)
    write(repo / ".git/info/attributes", "* text eol=crlf\n")


def attributes_filter_driver(repo: Path) -> None:
    hostile_code(repo)
    write(repo / ".git/info/attributes", "* filter=evil\n")
    git(repo, "config", "filter.evil.smudge", "sed s/v1/EVIL/")
    git(repo, "config", "filter.evil.clean", "sed s/hostile/v1/")


def config_no_symlinks_no_modes(repo: Path) -> None:
    hostile_code(repo)
    (repo / "run.sh").chmod(0o644)
    (repo / "current").unlink()
    write(repo / "current", "not a link\n")
    git(repo, "config", "core.symlinks", "false")
    git(repo, "config", "core.fileMode", "false")
    git(repo, "config", "core.autocrlf", "true")
    git(repo, "config", "core.ignoreCase", "true")


def config_work_tree_elsewhere(repo: Path) -> None:
    hostile_code(repo)
    elsewhere = repo.parent / "elsewhere"
    elsewhere.mkdir()
    git(repo, "config", "core.worktree", str(elsewhere))


def tree_attributes_that_fail(repo: Path) -> None:
    hostile_code(repo)
    write(repo / ".gitattributes", "* working-tree-encoding=NONSENSE\n")
    write(repo / "src/.gitattributes", "*.py filter=required\n")
    git(repo, "config", "filter.required.required", "true")
    git(repo, "config", "core.safecrlf", "true")
    write(repo / "docs/guide.txt", "guide, hostile\r\n")


def tree_attributes_that_convert(repo: Path) -> None:
    hostile_code(repo)
    write(repo / ".gitattributes", "*.sh text\n")  # hides a change of line ends alone
    write(repo / "src/.gitattributes", "* text eol=crlf ident\n")
    write(repo / "run.sh", "#!/bin/sh\r\nexec python src/app.py\r\n")


def replace_refs(repo: Path) -> None:
    """`git replace` makes git read another object wherever the checkpoint's is named."""
    old_blob = git(repo, "rev-parse", "refs/swapguard/checkpoints/s1:src/app.py").strip()
    hostile_code(repo)
    new_blob = git(repo, "hash-object", "-w", "src/app.py").strip()
    git(repo, "replace", old_blob, new_blob)


def case_blind_index(repo: Path) -> None:
    """With core.ignoreCase, `makefile` beside a tracked `Makefile`-like name is not seen."""
    hostile_code(repo)
    git(repo, "config", "core.ignoreCase", "true")
    write(repo / "readme.md", "read before README.md by a case-sensitive tool\n")
    write(repo / "SRC/app.py", "print('hostile')\n")


def ignored_gitattributes(repo: Path) -> None:
    """A `.gitattributes` that git ignores still converts: a change of line ends alone hides."""
    with open(repo / ".git/info/exclude", "a") as handle:
        handle.write("/.gitattributes\n")
    write(repo / ".gitattributes", "*.sh text\nsrc/app.py working-tree-encoding=UTF-16\n")
    write(repo / "run.sh", "#!/bin/sh\r\nexec python src/app.py\r\n")
    (repo / "src/app.py").write_bytes("print('hostile')\n".encode("utf-16"))


def planted_scratch_folder(repo: Path) -> None:
    """Where a restore writes its scratch files: a folder (once made every restore fail)."""
    hostile_code(repo)
    (repo / ".git/info").mkdir(exist_ok=True)
    (repo / ".git/info/.swapguard-attributes.1").mkdir()
    (repo / ".git/swapguard-index.1").mkdir()


def huge_driver_names(repo: Path) -> None:
    """A driver name of 200 KiB and 5000 drivers: one environment string each would not fit."""
    hostile_code(repo)
    lines = [f'[filter "{"x" * 200_000}"]\n\tsmudge = sed s/v1/EVIL/\n']
    lines += [f'[filter "d{i}"]\n\tsmudge = sed s/v1/EVIL/\n' for i in range(5000)]
    with open(repo / ".git/config", "a") as handle:
        handle.write("".join(lines))
    write(repo / ".git/info/attributes", "* filter=d4999\n")


def empty_named_driver_on_an_ignored_file(repo: Path) -> None:
    """`filter=` names the driver "", and the restore adds new ignored files to the abandoned
    tree: its clean command (of the new version's) must not run."""
    hostile_code(repo)
    write(repo / ".gitattributes", "*.log filter=\n")
    git(repo, "config", "filter..clean", f"sh -c 'cat; touch {repo.parent}/driver-ran'")
    write(repo / "x.log", "a new ignored file\n")


def encoding_on_an_ignored_file(repo: Path) -> None:
    hostile_code(repo)
    write(repo / ".gitattributes", "*.log working-tree-encoding=NO-SUCH-ENC\n")
    write(repo / "x.log", "a new ignored file\n")


def deleted_and_flagged_skip_worktree(repo: Path) -> None:
    """As a sparse checkout leaves a file out: the capture must not take the flag's word."""
    (repo / "docs/more.txt").unlink()
    git(repo, "update-index", "--skip-worktree", "docs/more.txt")


METADATA_ATTACKS: list[Callable[[Path], None]] = [
    empty_named_driver_on_an_ignored_file,
    encoding_on_an_ignored_file,
    deleted_and_flagged_skip_worktree,
    replace_refs,
    case_blind_index,
    ignored_gitattributes,
    planted_scratch_folder,
    huge_driver_names,
    tree_attributes_that_fail,
    tree_attributes_that_convert,
    index_assume_unchanged,
    index_skip_worktree,
    sparse_checkout,
    attributes_convert_line_ends,
    attributes_filter_driver,
    config_no_symlinks_no_modes,
    config_work_tree_elsewhere,
]
_METADATA = (
    ".git/info/attributes",
    ".git/info/sparse-checkout",
    ".git/info/exclude",
    ".git/config",
)


@pytest.mark.parametrize("attack", METADATA_ATTACKS, ids=lambda a: a.__name__)
def test_restore_is_exact_whatever_the_new_version_did_to_git_metadata(
    repo: Path, attack: Callable[[Path], None]
) -> None:
    tree = code_tree(repo)
    kept = {name: (repo / name).read_bytes() for name in _METADATA if (repo / name).exists()}
    before = snapshot_state(repo)
    cp = tree.take("s1")
    attack(repo)
    if attack is tree_attributes_that_fail:  # a question that changes nothing fails, naming it
        with pytest.raises(CheckpointError, match="NONSENSE"):
            tree.differs(cp)
    else:
        assert tree.differs(cp), "the capture must see the hostile code"
    tree.restore(cp, name="s1")
    for name in _METADATA:  # the metadata is the user's: compare the tree with what git read then
        if name in kept:
            (repo / name).write_bytes(kept[name])
        else:
            (repo / name).unlink(missing_ok=True)
    assert snapshot_state(repo) == before
    assert not tree.differs(cp)
    assert not (repo.parent / "driver-ran").exists(), "a command of the new version's ran"
    assert not (repo.parent / "elsewhere").exists() or not any(
        (repo.parent / "elsewhere").iterdir()
    )
    if attack in (tree_attributes_that_fail, tree_attributes_that_convert):  # kept, as left
        abandoned = git(repo, "show", "refs/swapguard/abandoned/s1:src/.gitattributes")
        assert abandoned.startswith("*")


def test_a_filter_driver_added_to_an_included_config_is_turned_off(repo: Path) -> None:
    """The tree's own `.gitattributes` names a driver nobody defined; the new version defines
    it in a file the repo's config includes (the config itself unchanged). The drivers are
    looked up again when a config file changes, and every time when one includes others."""
    included = repo.parent / "included.cfg"
    included.write_text("")
    git(repo, "config", "include.path", str(included))
    write(repo / ".gitattributes", "*.py filter=fmt\n")
    tree = code_tree(repo)
    before = snapshot_state(repo)
    cp = tree.take("s1")
    assert not tree.differs(cp)
    included.write_text('[filter "fmt"]\n\tsmudge = sed s/v1/EVIL/\n\tclean = sed s/hostile/v1/\n')
    write(repo / "src/app.py", "print('hostile')\n")
    assert tree.differs(cp), "the clean command would show the old file"
    tree.restore(cp, name="s1")
    assert "EVIL" not in (repo / "src/app.py").read_text(), "the smudge command ran"
    included.write_text("")
    assert snapshot_state(repo) == before


# --- what a legitimate user's repo does: as exact as before -----------------------------------


def small_repo(tmp_path: Path, files: dict[str, bytes]) -> Path:
    repo = tmp_path / "repo"
    init_repo(repo)
    for name, content in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(content)
    commit_all(repo, "first")
    return repo


def files_of(repo: Path) -> dict[str, bytes]:
    return {
        path.relative_to(repo).as_posix(): path.read_bytes()
        for path in sorted(repo.rglob("*"))
        if ".git" not in path.relative_to(repo).parts and path.is_file()
    }


@pytest.mark.parametrize(
    "line_ends", ["core.autocrlf=true", "core.eol=crlf"], ids=["autocrlf", "eol-crlf"]
)
def test_the_users_drivers_and_line_ends_are_those_of_the_take(
    tmp_path: Path, line_ends: str
) -> None:
    """An LFS-like driver (the repo stores a pointer, the tree the content) and CR LF line ends
    from the user's config: a file the new version changed comes back as the take read it."""
    repo = small_repo(tmp_path, {"app.py": b"print('v1')\n", "run.bat": b"@echo v1\n"})
    store = tmp_path / "lfs-store"
    store.mkdir()
    keep = "h=$(sha256sum < $f | cut -c1-16); mv $f"
    clean = f"sh -c 'f=$(mktemp); cat > $f; {keep} {store}/$h; echo pointer $h'"
    git(repo, "config", "filter.lfs.clean", clean)
    git(repo, "config", "filter.lfs.smudge", f"sh -c 'read p h; cat {store}/$h'")
    git(repo, "config", "filter.lfs.required", "true")
    key, value = line_ends.split("=")
    git(repo, "config", key, value)
    write(
        repo / ".gitattributes",
        ("* text=auto\n" if key == "core.eol" else "") + "*.bin filter=lfs -text\n",
    )
    (repo / "asset.bin").write_bytes(b"\0REAL ASSET v1\0" * 100)
    for name in ("app.py", "run.bat"):
        (repo / name).unlink()
    git(repo, "checkout", "--", "app.py", "run.bat")  # written with CR LF now
    commit_all(repo, "lfs")
    tree = CodeTree(repo)
    before = files_of(repo)
    assert before["run.bat"] == b"@echo v1\r\n"
    cp = tree.take("s1")
    (repo / "asset.bin").write_bytes(b"NEW VERSION ASSET")
    (repo / "app.py").write_bytes(b"print('v2')\r\n")
    tree.restore(cp, name="s1")
    assert files_of(repo) == before


def test_a_sparse_checkout_stays_as_it_was(tmp_path: Path) -> None:
    repo = small_repo(tmp_path, {"app/a.py": b"a\n", "docs/big.md": b"doc\n", "top.txt": b"t\n"})
    git(repo, "sparse-checkout", "set", "app")
    tree = CodeTree(repo)
    before = files_of(repo)
    assert "docs/big.md" not in before
    cp = tree.take("s1")
    (repo / "app/a.py").write_bytes(b"EVIL\n")
    tree.restore(cp, name="s1")
    assert files_of(repo) == before
    assert git(repo, "status", "--porcelain") == ""


def test_a_linked_work_tree_gets_the_common_info_attributes_back(tmp_path: Path) -> None:
    """git reads info/attributes from the common git dir, not the linked work tree's own."""
    main = small_repo(tmp_path, {"run.sh": b"#!/bin/sh\necho v1\n"})
    repo = tmp_path / "linked"
    git(main, "worktree", "add", "-q", "-b", "live", str(repo))
    tree = CodeTree(repo)
    before = files_of(repo)
    cp = tree.take("s1")
    write(main / ".git/info/attributes", "run.sh text\n")  # hides a change of line ends alone
    (repo / "run.sh").write_bytes(b"#!/bin/sh\r\necho v1\r\n")
    tree.restore(cp, name="s1")
    assert files_of(repo) == before
    assert not (main / ".git/info/attributes").exists()


def test_the_byte_for_byte_attributes_a_dead_restore_left_are_no_users(repo: Path) -> None:
    """Killed while it read the tree byte for byte, a restore leaves swapguard's attributes in
    info/attributes: the next take removes them rather than record them as the user's."""
    (repo / ".git/info").mkdir(exist_ok=True)
    (repo / ".git/info/attributes").write_bytes(conversions._RAW)
    cp = code_tree(repo).take("s1")
    assert not (repo / ".git/info/attributes").exists()
    message = git(repo, "cat-file", "commit", cp.commit)
    assert "info-attributes: none" in message
