"""What a hostile new version can leave in the code tree and at the data paths, at the level of
one CodeTree or SnapshotStore: the restore ends exact, never following or opening what it finds.

The end-to-end catalogue (a real swapguard, host and deadline) is tests/test_hostile_versions.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.test_checkpoint import code_tree, git, snapshot_state, write
from tests.test_checkpoint import repo as repo  # the fixture


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
