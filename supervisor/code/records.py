"""What a checkpoint records, and what a restore reports changed: plain records, kept apart from
the git work that makes them (`checkpoint`) so the swap record and the API can hold them."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from supervisor.core.ids import SWAP_ID_SYNTAX, is_swap_id
from supervisor.errors import CheckpointError

_SHA = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")


@dataclass(frozen=True)
class Checkpoint:
    """Where the code tree was: the captured tree's commit, the staged tree, HEAD and branch."""

    commit: str
    index_tree: str
    head: str | None
    branch: str | None

    def __post_init__(self) -> None:
        if not _SHA.fullmatch(self.commit):
            raise CheckpointError(f"checkpoint: commit must be a hex sha, got {self.commit!r}")
        if self.index_tree and not _SHA.fullmatch(self.index_tree):
            raise CheckpointError(
                f"checkpoint: index_tree must be a hex sha, got {self.index_tree!r}"
            )
        if self.head is not None and not _SHA.fullmatch(self.head):
            raise CheckpointError(f"checkpoint: head must be a hex sha or null, got {self.head!r}")
        if self.head is None and self.branch is None:
            raise CheckpointError("checkpoint: a detached HEAD needs a head commit")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Checkpoint:
        if not isinstance(data, dict):
            raise CheckpointError(f"checkpoint: expected an object, got {type(data).__name__}")
        nullable = {"commit": False, "index_tree": False, "head": True, "branch": True}
        missing = sorted(nullable.keys() - data.keys())
        if missing:
            raise CheckpointError(f"checkpoint: missing field(s) {', '.join(missing)}")
        for key, optional in nullable.items():
            value = data[key]
            if not (isinstance(value, str) or (optional and value is None)):
                raise CheckpointError(f"checkpoint: field {key!r} has the wrong type: {value!r}")
        return cls(data["commit"], data["index_tree"], data["head"], data["branch"])


@dataclass(frozen=True)
class Change:
    path: str
    change: Literal["added", "modified", "deleted"]


def check_name(name: str) -> None:
    """Checkpoints are named by their swap's id (or "baseline"): the id syntax fits a ref name."""
    if not is_swap_id(name):
        raise CheckpointError(f"checkpoint name {name!r}: expected a swap id, {SWAP_ID_SYNTAX}")
