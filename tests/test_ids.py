"""One swap-id rule: every layer an id passes through accepts and refuses exactly what
`supervisor.core.ids` does, and the ids swapguard makes pass it."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from supervisor import clock
from supervisor.code.checkpoint import CodeTree
from supervisor.control import routes
from supervisor.core import notifyproto, swaps
from supervisor.core.ids import is_swap_id
from supervisor.data.snapshot import SnapshotStore
from supervisor.errors import BadRequest, CheckpointError, NotFound, SnapshotError
from tests.support import git

VALID = ["s1", "a", "20261124-060000-abc123", "A_b-9", "x" * 64, "baseline", "0", "9-"]
INVALID = [
    *("", ".", "..", "...", ".hidden", "a.b", "x.lock", "a..b", "-a", "_a", "x" * 65),
    *("a/b", "a b", " s1", "s1 ", "é", "a\\b", "a:b", "a~1", "a^b", "a@{1}", "a*", "a\tb"),
]


def test_the_ids_swapguard_makes_are_valid() -> None:
    made = {clock.new_id() for _ in range(50)}
    assert all(is_swap_id(swap_id) for swap_id in made), made


def test_non_strings_are_not_ids() -> None:
    assert not any(is_swap_id(value) for value in (None, 1, b"s1", ["s1"]))


def _accepted_by_the_api(swap_id: str) -> bool:
    try:
        routes.resolve("GET", f"/v1/swaps/{quote(swap_id, safe='')}")
    except (BadRequest, NotFound):  # NotFound: the empty id leaves no swap in the path
        return False
    return True


def _accepted_by_the_machine(swap_id: str) -> bool:
    try:
        swaps.new_swap(id=swap_id, summary="", now=clock.now(), checkpoint={})
    except BadRequest:
        return False
    return True


def _accepted_in_a_datagram(swap_id: str) -> bool:
    try:
        message = notifyproto.parse_datagram(f"X_SWAPGUARD_CONFIRM={swap_id}".encode())
    except notifyproto.NotifyError:
        return False
    return message.confirm_swap_id == swap_id


def _accepted_by_the_snapshots(store: SnapshotStore, swap_id: str) -> bool:
    try:
        store.kept_copies(swap_id)
    except SnapshotError:
        return False
    return True


def _accepted_by_the_checkpoints(tree: CodeTree, swap_id: str) -> bool:
    try:
        tree.drop(swap_id)
    except CheckpointError:
        return False
    return True


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    git(root, "init", "-q", "-b", "main")
    return root


@pytest.mark.parametrize("swap_id", VALID + INVALID)
def test_every_layer_applies_the_same_rule(swap_id: str, repo: Path) -> None:
    verdicts = {
        "api": _accepted_by_the_api(swap_id),
        "machine": _accepted_by_the_machine(swap_id),
        "notify": _accepted_in_a_datagram(swap_id),
        "snapshots": _accepted_by_the_snapshots(SnapshotStore(repo / "snaps"), swap_id),
        "checkpoints": _accepted_by_the_checkpoints(CodeTree(repo), swap_id),
    }
    expected = swap_id in VALID
    assert is_swap_id(swap_id) is expected
    assert verdicts == dict.fromkeys(verdicts, expected)
