"""Ignored untracked paths: a new version must not hide code behind ignore rules.

Why: a capture (`git add -A`) follows every `.gitignore` and `.git/info/exclude`, and a restore
(`read-tree --reset -u`) never removes an ignored untracked file. Both rule sets are the host's
to write, so a new version could drop `json/__init__.py` beside a `json/.gitignore` holding `*`:
no drift, and it survives a rollback to shadow the stdlib for the old version. So a checkpoint
records which ignored untracked paths were there (`listing`, in its commit message); what is
ignored now and was not then is the new version's (`added_since`): drift, and a restore moves it
into the abandoned tree and removes it.

What the listing leaves out: paths swapguard's own patterns (`GENERATED`, `code.ignore`) match,
which no host can change (a restore clears the bytecode among them anyway, `generated`), and
the excluded paths (data, state). A folder git did not descend into (itself ignored, such as a
virtualenv) is recorded as one entry ending in '/': whatever appears below it later is not code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from supervisor.code.gitcmd import Git
from supervisor.config.noncode import IgnoreRules

_PREFIX = "ignored: "


def listing(git: Git, index: Path, skip: Sequence[str], excluded: Sequence[str]) -> list[str]:
    """The ignored untracked paths of the work tree as `index` (a capture's) sees them, outside
    `skip` (exclude pathspecs of the `excluded` paths), minus those swapguard's own patterns
    match, and minus a folder that holds an excluded path (a data folder git lists whole: it is
    never code, and never to be removed). One git process."""
    listed = git.out(
        "ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--directory",
        "--", ".", *skip, index=index,
    )  # fmt: skip
    entries = sorted(filter(None, listed.split("\0")))
    # git lists a folder whose files are all ignored and then its files too: keep the files,
    # so a folder stands for "everything below" only when git did not look inside it
    inside = {entry for entry in entries if entry.endswith("/")} & {
        parent for entry in entries for parent in parents(entry)
    }
    ours = IgnoreRules(git.excludes)
    holders = {parent for path in excluded for parent in parents(path + "/")}
    return [
        entry
        for entry in entries
        if entry not in inside
        and entry != ".git/"
        and entry not in holders
        and not ours.matches(entry.rstrip("/"), is_dir=entry.endswith("/"))
    ]


def added_since(recorded: Iterable[str], now: Sequence[str]) -> list[str]:
    """The entries of `now` that neither are in `recorded` nor lie below a folder of it."""
    known = set(recorded)
    folders = {entry for entry in known if entry.endswith("/")}
    return [
        entry
        for entry in now
        if entry not in known and not any(parent in folders for parent in parents(entry))
    ]


def to_message(entries: Sequence[str]) -> str:
    """The commit-message line of a listing (JSON: any path, one line)."""
    return f"{_PREFIX}{json.dumps(list(entries))}\n"


def from_message(message: str) -> list[str] | None:
    """The listing a checkpoint's message records; None for a checkpoint taken before
    listings were recorded (then nothing ignored is doomed: the earlier behaviour)."""
    for line in message.splitlines():
        if line.startswith(_PREFIX):
            try:
                found = json.loads(line.removeprefix(_PREFIX))
            except ValueError:
                return None
            if isinstance(found, list) and all(isinstance(entry, str) for entry in found):
                return found
            return None
    return None


def folders(entries: Iterable[str]) -> list[str]:
    """The folder entries (without their '/'): a restore clears no bytecode below them."""
    return [entry.rstrip("/") for entry in entries if entry.endswith("/")]


def parents(entry: str) -> list[str]:
    """'a/b/c' or 'a/b/c/' -> ['a/', 'a/b/']."""
    parts = entry.rstrip("/").split("/")
    return ["/".join(parts[:depth]) + "/" for depth in range(1, len(parts))]
