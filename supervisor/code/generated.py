"""What a checkpoint does with generated files (bytecode, tool caches, `code.ignore`).

Why a module of its own: git is told the patterns as an excludes file of ours (`gitcmd.Git`), which
settles untracked files for `git add -A`. Three places need more than that, each here:
- `extra_paths` are added with `git add -f`, which ignores every ignore rule: their files are
  listed first, minus generated ones, so `node_modules` may be code while `node_modules/.cache`
  is not.
- A checkpoint taken before a pattern applied (an earlier swapguard, a `code.ignore` added since)
  may hold generated files; compared as it is, it would read as drift. Its untracked generated
  entries are dropped before any comparison, as excluded paths are.
- A restore clears every untracked path the `CLEARED` patterns (bytecode, build caches) match,
  whatever the user's `code.ignore` says, except in folders already ignored at the checkpoint
  (a virtualenv, an undeclared data folder): bytecode is the new version's output as much as
  its code is. A `.pyc` records its source's mtime in whole seconds and its size (or,
  unchecked, nothing at all), and a sourceless `json.pyc` beside a script shadows the stdlib,
  so the old version would otherwise run the new version's bytecode. Editor and backup files
  are not cleared: nothing runs them, and a backup in a data folder is the user's. The list is
  taken from the restored index, not from what the restore changed, so a restore repeated after
  a crash clears them as well.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from supervisor.code import treepaths
from supervisor.code.gitcmd import Git, literal
from supervisor.config.noncode import LOOKS_GENERATED, IgnoreRules

log = logging.getLogger(__name__)


def extra_files(git: Git, index: Path, paths: Sequence[str], skip: Sequence[str]) -> list[str]:
    """The untracked files under the extra `paths` that are not generated, nor under `skip`
    (exclude pathspecs), as literal pathspecs for `git add -f --pathspec-from-file`."""
    ours = git.excludes_file()
    excludes = [f"--exclude-from={ours}"] if ours else []
    listed = git.out(
        "ls-files", "-z", "--others", *excludes, "--", *map(literal, paths), *skip, index=index
    )
    return [literal(path) for path in listed.split("\0") if path]


def add_files(git: Git, index: Path, pathspecs: Sequence[str]) -> None:
    """`git add -f` of many literal pathspecs (through stdin: no argv limit)."""
    if pathspecs:
        git.out(
            "add", "-f", "--pathspec-from-file=-", "--pathspec-file-nul", index=index,
            stdin="\0".join(pathspecs),
        )  # fmt: skip


def drop_untracked_generated(git: Git, index: Path, tracked_tree: str) -> None:
    """Remove from `index` (a checkpoint's tree) the generated entries that the user's index did
    not track when it was taken (`tracked_tree`, "" for none): today's capture leaves them out."""
    ours = git.excludes_file()
    if not ours:
        return
    generated = _listed(git, index, f"--exclude-from={ours}")
    if generated:  # and not re-included by a .gitignore (what today's capture would do)
        generated &= _listed(git, index, "--exclude-standard")
    if generated and tracked_tree:
        tracked = git.out("ls-tree", "-r", "-z", "--name-only", "--full-tree", tracked_tree)
        generated -= set(tracked.split("\0"))
    if generated:
        git.out(
            "rm", "--cached", "-q", "--ignore-unmatch", "--pathspec-from-file=-",
            "--pathspec-file-nul", index=index, stdin="\0".join(map(literal, sorted(generated))),
        )  # fmt: skip


def _listed(git: Git, index: Path, excludes: str) -> set[str]:
    listed = git.out("ls-files", "-z", "--cached", "--ignored", excludes, index=index)
    return set(filter(None, listed.split("\0")))


def looks_generated(git: Git, index: Path | None, excluded: Sequence[str]) -> list[str]:
    """Untracked, not ignored paths (folders listed once, ending in '/') that look like build
    output, logs or environments (`LOOKS_GENERATED`), outside the `excluded` paths. `index`:
    the user's, read only (None: there is none yet, everything is untracked)."""
    root = git.root
    skip = [
        f":(exclude,literal){path}" for path in excluded if treepaths.below_real_dirs(root, path)
    ]
    listed = git.out(
        "ls-files", "-z", "--others", "--exclude-standard", "--directory", "--no-empty-directory",
        "--", ".", *skip, index=index,
    )  # fmt: skip
    rules = IgnoreRules(LOOKS_GENERATED)
    return [
        entry
        for entry in filter(None, listed.split("\0"))
        if rules.matches(entry.rstrip("/"), is_dir=entry.endswith("/"))
    ]


def clear_generated(
    git: Git, index: Path, excluded: Sequence[str], kept: Sequence[str] | None = None
) -> list[str]:
    """Remove every path untracked by `index` (the restored tree's) that `CLEARED` matches
    (bytecode, build caches), outside the `excluded` paths (data) and the folders ignored at
    the checkpoint (`kept`: `hidden.folders` of its listing; None for an older checkpoint);
    the paths removed. One git process; each path is removed through file descriptors, never
    through a symlink (a symlink itself is removed, not followed)."""
    root = git.root
    skip = [f":(exclude,literal){path}" for path in (*excluded, *(kept or ()))]
    listed = git.out(
        "ls-files", "-z", "--others", "--ignored", f"--exclude-from={git.builtin_excludes_file()}",
        "--directory", "--", ".", *skip, index=index,
    )  # fmt: skip
    removed = []
    for entry in filter(None, listed.split("\0")):
        path = entry.rstrip("/")
        if path == ".git" or path.startswith(".git/"):
            continue
        if treepaths.remove(root, path):
            removed.append(path)
    if removed:
        shown = ", ".join(removed[:5])
        log.info("removed %d generated path(s) in %s: %s", len(removed), root, shown)
    return removed
