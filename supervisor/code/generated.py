"""What a checkpoint does with generated files (bytecode, tool caches, `code.ignore`).

Why a module of its own: git is told the patterns as an excludes file of ours (`gitcmd.Git`), which
settles untracked files for `git add -A`. Three places need more than that, each here:
- `extra_paths` are added with `git add -f`, which ignores every ignore rule: their files are
  listed first, minus generated ones, so `node_modules` may be code while `node_modules/.cache`
  is not.
- A checkpoint taken before a pattern applied (an earlier swapguard, a `code.ignore` added since)
  may hold generated files; compared as it is, it would read as drift. Its untracked generated
  entries are dropped before any comparison, as excluded paths are.
- A restore leaves generated files alone (they are not code), but Python's bytecode of a module
  the restore rewrote is removed: the new version's `.pyc` records its source's mtime in whole
  seconds and its size, so a rollback within the same second to a source of the same size would
  otherwise run the new version's bytecode.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

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


def clear_stale_bytecode(root: Path, rewritten: Sequence[str], kept: set[str]) -> None:
    """Remove `__pycache__/<module>.*.pyc` beside each rewritten `.py` file, unless the restored
    tree holds that `.pyc` itself (`kept`). Never through a symlinked folder; never anything but
    a regular file."""
    removed = 0
    for path in rewritten:
        source = PurePosixPath(path)
        if source.suffix != ".py":
            continue
        cache = source.parent / "__pycache__"
        folder = root / cache
        if not (treepaths.below_real_dirs(root, str(cache)) and treepaths.is_real_dir(folder)):
            continue
        for compiled in folder.glob(f"{glob.escape(source.stem)}.*.pyc"):
            relative = str(cache / compiled.name)
            if relative not in kept and treepaths.is_regular(compiled):
                compiled.unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("removed %d bytecode file(s) of restored modules in %s", removed, root)
