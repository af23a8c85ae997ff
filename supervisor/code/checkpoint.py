"""Exact, side-effect-free checkpoints of a git work tree, and exact restore.

Theory of operation: a checkpoint is an ordinary commit whose tree is the work tree as it is
(tracked, untracked-not-ignored, and the ignored `extra_paths`), built in a scratch copy of
`.git/index` so the user's index, branch, HEAD, stash and config are never touched, and so the
stat cache makes the cost proportional to what changed. (`git stash create` would leave untracked
files out; it, `git restore` and `git checkout` all rewrite the user's index.) Its first parent is
HEAD; a second parent holds the user's staged state (as `git stash` does) when HEAD's tree or the
captured one does not already keep that tree from being garbage-collected. A ref under
`refs/swapguard/` keeps them reachable.

Restore builds the same kind of tree of the current state; one ref transaction keeps it, with
the current HEAD and branch tip, under `refs/swapguard/abandoned/<name>` and puts the branch and
HEAD back, before the work tree changes; then `read-tree --reset -u` turns the current tree into
the checkpoint's (git writes, deletes and chmods only what differs), and the index is put back.
Every step sets an absolute state, so a restore repeated after a crash ends exact.

Cost: each git run is a process (2-3 ms here even for a small tree), so the git runs are few and
those that do not wait on each other run at once: a take runs 8 (6 in a row), a restore 10 (6 in
a row), a drift check 2 (see the README's Benchmarks for where the time goes). Beside git, a take
and a restore each look at every path of the tree once (one `lstat` by string, for the bits git
does not keep and, as root, the owner): the take's while git lists the ignored paths, the
restore's once read-tree is done (it rewrites every path whose stat no longer matches the
capture's, not only the changed ones: a removed hard link changes its file's ctime).

Ignored untracked paths are not captured, but a take records their listing (`hidden`): one the
new version adds (behind a `.gitignore` or `.git/info/exclude` of its own) is drift, and a restore
keeps it in the abandoned tree and removes it (`changes` lists it; `differs`, the drift check,
does not: hosts write logs beside their code at run time).

Whatever a new version leaves in the tree is replaced, never followed or opened: a symlink where
a folder was (git is never given a path below it), FIFOs, sockets and devices (git cannot hold
them: they count as absent, and a restore removes them), folders and files it locked (opened up
first; every mode the checkpoint recorded comes back, `treemodes`). The locks it takes in `.git`
are journaled as ours before they are taken (`gitlocks`), so a crash leaves none that blocks the
next run; somebody else's `index.lock` is waited on briefly, then the index alone is left pending
until it goes: the work tree, HEAD and branch are restored all the same. Any other lock that is
not ours is never removed, and reported (`foreign_locks`).

Limits (documented, not hidden):
- A lock is proved ours by our journal naming it and by its age (created after the journal):
  if our git died before taking a lock the journal names, and somebody else's git took it since,
  it cannot be told from ours (git writes no owner into its locks) and goes on resume.
- Submodules are recorded as their gitlink (the commit) only; their own work trees are neither
  captured nor restored.
- Content passes through the repo's attribute filters (eol, LFS): a file whose bytes are not
  canonical under its `.gitattributes` comes back canonical.
- The staged state is kept as a tree: intent-to-add, assume-unchanged and skip-worktree flags
  of the user's index are not restored.
- When swapguard runs as root on a tree owned by someone else, git runs as that owner, so no
  file in the tree or in `.git` ends up owned by root; as root, every path's owner is recorded
  and restored as well (`treemodes`).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Literal

import tenacity

from supervisor.code import conversions, generated, hidden, treemodes, treepaths
from supervisor.code.gitcmd import Git as _Git
from supervisor.code.gitcmd import Where, branch_name, index_may_hold, literal, under
from supervisor.code.gitlocks import (
    INDEX_LOCK,
    GitLocks,
    index_locked_error,
    refuse_in_progress,
    set_aside_in_progress,
    signature,
)
from supervisor.code.records import Change as Change  # re-exported: callers import it from here
from supervisor.code.records import Checkpoint as Checkpoint
from supervisor.code.records import check_name as _check_name
from supervisor.config.noncode import GENERATED
from supervisor.core.backoff import exponential
from supervisor.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)
_SPECIAL_ROUNDS = 5  # `git add` again after dropping paths it cannot hold: rounds at most
_LOCK_WAIT_S = 1.0  # a git of somebody else's holding index.lock: how long a restore waits
_ORPHAN_WAIT_S = 2.0
"""How long a restore waits for a git orphaned by a swapguard that died to finish with its locks
(past it, the restore goes on; a step that then meets one of them fails and is retried)."""
_VANISHED_RETRY_FOR_S = 10.0
"""How long a take keeps retrying `git add` while files vanish under it; a prepare's client waits
65 s, and a churn that beats dozens of attempts in this time is not a tree one can checkpoint."""
# git's words for a path that was listed, then gone (or its folder turned into a file) when read.
_VANISHED = re.compile(
    r"""((?:unable to stat|pathspec) '.*'|open\(".*"\))"""
    r"""(?:: (?:No such file or directory|Not a directory)| did not match any files)"""
)

REF_ROOT = "refs/swapguard"
_CHECKPOINTS = f"{REF_ROOT}/checkpoints"
_ABANDONED = f"{REF_ROOT}/abandoned"

_DIFF = ("diff-tree", "-r", "-z", "--no-renames")
_LS_IGNORED = ("ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--")
_LS_TREE = ("ls-tree", "-r", "-t", "-z", "--full-tree")
_SKIPPED = "skip-worktree: "  # the commit-message line of the take's skip-worktree paths
_SKIPPED_LINE = re.compile(rf"^{_SKIPPED}([0-9a-f]{{40}}(?:[0-9a-f]{{24}})?|none)$", re.MULTILINE)
# the `ls-files -v -z` entries (after a NUL) whose tag says assume-unchanged or skip-worktree
_FLAGGED = re.compile(rb"\0([a-zS]) ([^\0]*)")
_LS_TREE_LINE = re.compile(r"([0-7]{6}) [a-z]+ [0-9a-f]+\t([^\0]*)\0")  # mode type sha\tpath\0
# `git add` names a path it cannot hold (a FIFO, a socket, a device) in this line of stderr
_NOT_ADDABLE = re.compile(
    r"error: (.+): can only add regular files, symbolic links or git-directories"
)
# Locks the git commands of a take or restore may leave in the git dir (besides the refs they name)
_LOCKS = (INDEX_LOCK, "HEAD.lock", "packed-refs.lock")
_STAGED_PREFIX = "swapguard-index."  # the index a restore builds in the git dir, then renames


class CodeTree:
    """Checkpoints and restores of one git work tree (blocking; run it in a worker thread)."""

    def __init__(
        self,
        root: Path,
        *,
        extra_paths: Sequence[str] = (),
        exclude: Sequence[Path] = (),
        ignore: Sequence[str] = GENERATED,
    ) -> None:
        """`exclude`: absolute paths that are never code; `ignore`: gitignore patterns of
        untracked files that are never code (Config.non_code_paths / non_code_patterns)."""
        self.root = Path(os.path.abspath(root))
        self.extra_paths = tuple(_relative_extra(p) for p in extra_paths)
        self.excluded = tuple(sorted({r for p in exclude if (r := self._relative_excluded(p))}))
        self._git = _Git(self.root, excludes=ignore)
        self._trees: dict[tuple[str, tuple[int, int, int]], str] = {}  # see _tree_of
        self._hidden: dict[str, list[str] | None] = {}  # checkpoint commit -> recorded listing
        self._known_git_dir: Path | None = None
        self._blocked_by: str | None = None
        self._pending_over: tuple[int, int, int] | None = None  # the index a pending one replaces
        # One thread at a time puts a pending index back: a swap's settle waits for somebody's
        # index.lock to go while the drift check at its end captures the tree (which tries too);
        # interleaved, the one that failed could report a lock after the other put the index back.
        self._pending_lock = threading.Lock()
        self._foreign: list[str] = []  # locks somebody else holds, as the last look found them

    # --- public ---------------------------------------------------------------------------

    def check_work_tree(self) -> None:
        """Refuse (CheckpointError) unless root is the top of a git work tree (`check`, `run`)."""
        self._git_dir(fresh=True)

    def check(self) -> None:
        """Refuse (CheckpointError) unless the tree is in a state a checkpoint can describe."""
        self._check_takeable(self._git_dir(fresh=True))

    def _check_takeable(self, git_dir: Path) -> None:
        self._clear_stale()
        if foreign := self._locks().foreign_index_lock():
            raise index_locked_error(foreign)
        refuse_in_progress(self.root, git_dir)

    def clear_stale_locks(self) -> list[str]:
        """On resume: remove the locks a swapguard that died left in the repo (`gitlocks`); the
        names of those removed. A tree that is not (yet) a git work tree has none."""
        try:
            self._git_dir(fresh=True)
            return self._clear_stale()
        except (CheckpointError, OSError) as exc:
            log.warning("%s: stale git locks not looked for: %s", self.root, exc)
            return []

    def foreign_locks(self) -> list[str]:
        """Locks in the git dir that swapguard did not take, as its last git operation found
        them (status and events report them; they are never removed)."""
        return list(self._foreign)

    def _clear_stale(self, wait: float = 0.0) -> list[str]:
        locks = self._locks()
        cleared = locks.clear_stale(wait)
        foreign = locks.foreign_locks()
        if foreign and foreign != self._foreign:
            log.warning("%s: locks swapguard did not take: %s", self.root, ", ".join(foreign))
        self._foreign = foreign
        return cleared

    def index_locked(self) -> str | None:
        """The index.lock that kept the last restore from putting the index back, while it lasts
        (the index is put back by the first operation after it goes)."""
        return self._blocked_by

    def finish_index(self, wait: float) -> bool:
        """Put back an index a restore left pending, waiting up to `wait` seconds for somebody
        else's index.lock to go; whether none is pending any more."""
        self._finish_pending_index(wait=wait)
        return self._blocked_by is None

    def take(self, name: str) -> Checkpoint:
        """Capture the tree as refs/swapguard/checkpoints/<name>; the user's state is untouched."""
        _check_name(name)
        started = time.monotonic()
        where = self._look()
        self._check_takeable(where.git_dir)
        head, branch = where.head, where.branch
        with self._scratch() as scratch, _beside() as pool:  # two indexes, two gits at once
            staged = pool.submit(self._index_tree, scratch / "staged")
            skipped: list[str] = []
            tree = self._capture(scratch / "capture", skipped=skipped)
            skip = self._exclude_pathspecs()
            hid = pool.submit(hidden.listing, self._git, scratch / "capture", skip, self.excluded)
            listing = self._listing(tree)
            default, mask = self._default_owner(), treemodes.umask()
            # one lstat a path (the bits git does not keep), while git lists the ignored paths
            modes, odd = treemodes.odd_modes_and_owners(self.root, listing, mask, default)
            index_tree, ignored = staged.result(), hid.result()
        owners = "" if default is None else treemodes.owners_to_message(default, odd)
        parents = [head] if head else []
        if index_tree and index_tree not in (tree, where.head_tree):  # else reachable already
            parents.append(self._commit(index_tree, parents[:1], f"swapguard index {name}"))
        message = (
            f"swapguard checkpoint {name}\n\nbranch: {branch}\n"
            f"{treemodes.to_message(modes)}{owners}{hidden.to_message(ignored)}"
            f"{conversions.to_message(self._git, self._info_dir(where.git_dir))}"
            f"{self._skipped_to_message(skipped)}"
        )
        commit = self._commit(tree, parents, message)
        ref = f"{_CHECKPOINTS}/{name}"
        with self._locks().holding([*_LOCKS, f"{ref}.lock"]):
            self._git.out("update-ref", "-m", f"swapguard: checkpoint {name}", ref, commit)
        log.info("checkpoint %s of %s: %s (%.0f ms)", name, self.root, commit[:12], _ms(started))
        return Checkpoint(commit=commit, index_tree=index_tree, head=head, branch=branch)

    def restore(self, cp: Checkpoint, *, name: str) -> None:
        """Make work tree, index, HEAD and branch what they were at `cp`; lose no commit or file.

        Whatever the new version left (symlinks for folders, FIFOs, sockets, locked folders) is
        replaced, never followed or opened. An index.lock somebody else holds does not stop it:
        the work tree, HEAD and branch are restored, and the index once the lock goes."""
        _check_name(name)
        started = time.monotonic()
        abandoned_ref = f"{_ABANDONED}/{name}"
        branch_ref = [f"refs/heads/{cp.branch}"] if cp.branch else []
        with _beside() as pool:  # three lookups, three gits at once
            listed = pool.submit(self._listing, cp.commit)
            looked = pool.submit(
                self._git.objects, [cp.commit, abandoned_ref, *branch_ref], contents=True
            )
            where = self._look()
            found, listing = looked.result(), listed.result()
        locks = self._locks()
        self._clear_stale(wait=_ORPHAN_WAIT_S)
        set_aside_in_progress(self.root, where.git_dir, name)
        if found[0] is None or found[0].type != "commit":
            raise CheckpointError(f"checkpoint commit {cp.commit} is missing from {self.root}")
        message = found[0].body.decode("utf-8", "surrogateescape")
        info = self._info_dir(where.git_dir)
        if (attributes := conversions.attributes_from_message(message)) is not None:
            conversions.put_back(self._git, info, attributes)  # before git reads the tree
        target, listing = self._filtered(message.split("\n", 1)[0].removeprefix("tree "), listing)
        tips = [where.head, *(tip.sha for tip in found[2:] if tip is not None)]
        previous = found[1].sha if found[1] is not None else None
        mask = treemodes.umask()
        ref_locks = [f"{abandoned_ref}.lock", f"refs/heads/{cp.branch}.lock"]
        staged_lock = f"{_STAGED_PREFIX}{os.getpid()}.lock"  # git's, on the index _put_index builds
        with (
            locks.holding([*_LOCKS, *ref_locks, staged_lock]),
            self._scratch() as scratch,
            self._git.as_at_the_take(conversions.config_from_message(message), target),
        ):
            treemodes.open_up(self.root, (path for mode, path in listing if mode == "040000"))
            treemodes.open_all(self._git, self.excluded)
            index = scratch / "current"
            with conversions.raw(self._git, info):  # nothing the tree says can hide a change
                current = self._capture(index, aside=True)
            recorded = hidden.from_message(message)  # None: an older checkpoint, none doomed
            folders = {"", *(path for mode, path in listing if mode == "040000")}
            # while diff runs: the abandoned state's commit, the ignored paths, and the look
            # into every folder for FIFOs, sockets and devices (nothing changes the tree now)
            with _beside(3) as pool:
                early = None if previous else pool.submit(self._abandon, current, tips, name)
                listed_now = (
                    None if recorded is None else pool.submit(self._hidden_since, recorded, index)
                )
                special = pool.submit(treepaths.special_entries, self.root, folders)
                added, gone = self._diff(current, target)
            hid = [] if listed_now is None else listed_now.result()
            more = set(treemodes.folders_of(gone)) - folders  # the current tree's, not the target's
            specials = {*special.result(), *treepaths.special_entries(self.root, more)}
            self._remove_untracked_special(sorted(specials))
            keep = (p for p in hid if not treepaths.is_special(self.root / p))  # git cannot
            doomed = sorted({*self._ignored_in_the_way(added, index), *keep})
            if doomed:  # ignored files git must remove: keep their content in the abandoned tree
                with conversions.raw(self._git, info):  # as they are: nothing converts them
                    self._git.out("add", "-f", "--", *map(literal, doomed), index=index)
                    current = self._git.out("write-tree", index=index).strip()
            made = early.result() if early is not None and not doomed else None
            self._put_refs(cp, name, current, tips, previous, made=made)
            folders_of_hid = self._new_folders(hid, recorded or [], folders)
            for path in [*hid, *folders_of_hid]:  # kept in the abandoned tree now: removed,
                treepaths.remove(self.root, path)  # never followed
            if where.branch != cp.branch and cp.branch is not None:
                self._git.out("symbolic-ref", "-m", f"swapguard: restore {name}", "HEAD",
                              f"refs/heads/{cp.branch}")  # fmt: skip
            default_owner, owners = treemodes.owners_from_message(message)
            owned = None
            if default_owner is not None and self._default_owner() is not None:
                owned = (default_owner, owners)
            modes = treemodes.from_message(message)
            self._git.out("read-tree", "--reset", "-u", target, index=index)
            kept = None if recorded is None else hidden.folders(recorded)
            generated.clear_generated(self._git, index, self.excluded, kept)
            # Every path is looked at (one lstat each) once read-tree is done, never while it
            # runs: it rewrites the changed paths, but also any path whose stat no longer
            # matches the capture's (a hard link removed above changes its ctime), as
            # git's user, with git's modes. After the generated paths went: a folder's bits
            # put back may close it.
            odd_all = treemodes.differing(self.root, listing, modes, mask, owned)
            treemodes.put_back_all(self._git, index, odd_all, modes, mask, owned)
            sparse = self._skipped_from_message(message)
            self._put_index(cp.index_tree, target, worktree_index=index, sparse=sparse)
        self._foreign = locks.foreign_locks()
        log.info("restored %s to %s (%s) in %.0f ms", self.root, name, cp.commit[:12], _ms(started))

    def changes(self, cp: Checkpoint) -> list[Change]:
        """What differs between the work tree now and `cp`, by path relative to root (an
        ignored path that was not there at `cp` is an added one)."""
        recorded = self._recorded_hidden(cp)
        with self._scratch() as scratch:
            current = self._capture(scratch / "current")
            hid = self._hidden_since(recorded, scratch / "current") if recorded is not None else []
        diff = self._git.out(*_DIFF, "--name-status", self._tree_of(cp), current)
        fields = diff.split("\0")
        kinds: dict[str, Literal["added", "modified", "deleted"]] = {"A": "added", "D": "deleted"}
        found = [
            Change(path, kinds.get(status, "modified"))
            for status, path in zip(fields[0::2], fields[1::2], strict=False)
            if status
        ]
        found += [Change(path, "added") for path in hid]
        return sorted(found, key=lambda change: change.path)

    def differs(self, cp: Checkpoint) -> bool:
        """Whether anything at all changed since `cp` (one capture, no diff listing).

        An ignored path that was not there at `cp` is no drift here (`changes` lists it, a
        restore removes it): hosts write logs beside their code under `*.log` at run time, and
        each new name would prepare a guard swap."""
        with self._scratch() as scratch:
            current = self._capture(scratch / "current")
        return current != self._tree_of(cp)

    def looks_generated(self) -> list[str]:
        """Untracked, not ignored paths that look like build output, logs or environments:
        code to swapguard, so each change there is drift (`init` and `check` point them out)."""
        index = self._git_dir(fresh=True) / "index"
        found = index if treepaths.is_regular(index) else None
        return generated.looks_generated(self._git, found, self.excluded)

    def git_dir(self) -> Path:
        """The work tree's git dir (asked of git once)."""
        return self._git_dir()

    def head(self) -> str | None:
        """HEAD's commit, or None on an unborn branch."""
        found = self._git.run("rev-parse", "-q", "--verify", "HEAD^{commit}", ok=(1,))
        return found.strip() if found else None

    def drop(self, *names: str) -> None:
        """Forget every swapguard ref of each of `names`, so gc may reclaim what only they kept.
        Two git runs however many names: a prune names every finished swap past `keep_swaps`."""
        for name in names:
            _check_name(name)
        if not (wanted := set(names)):
            return
        listed = self._git.out("for-each-ref", "--format=%(refname)", f"{REF_ROOT}/")
        doomed = [
            ref for ref in listed.split() if ref.count("/") == 3 and ref.rsplit("/", 1)[1] in wanted
        ]
        locks = self._locks()
        self._clear_stale()
        if doomed:
            with locks.holding([*_LOCKS, *(f"{ref}.lock" for ref in doomed)]):
                self._git.run(
                    "update-ref", "--stdin", stdin="".join(f"delete {r}\n" for r in doomed)
                )
            log.info("dropped %s", ", ".join(doomed))

    # --- capture ----------------------------------------------------------------------------

    def _capture(
        self, index: Path, *, aside: bool = False, skipped: list[str] | None = None
    ) -> str:
        """Write the tree of the work tree as it is, through a scratch copy of the index. What
        git cannot hold (a FIFO, a socket, a device) counts as absent; with `aside` (a restore
        about to write the tree) it is removed first, never opened."""
        self._finish_pending_index()
        real = self._git_dir() / "index"
        if treepaths.is_regular(real):  # a symlink or FIFO planted there is no index: never read
            shutil.copy2(real, index)  # keeps the mtime, so git's racy-clean detection stays right
            self._git.give(index)
            found = self._unflag(index)
            if skipped is not None:
                skipped += found
        skip = self._exclude_pathspecs()
        self._add_all(index, skip, aside=aside)
        self._forget_excluded(index)
        return self._git.out("write-tree", index=index).strip()

    def _unflag(self, index: Path) -> list[str]:
        """Clear the assume-unchanged and skip-worktree flags in a copy of the user's index:
        `git add` takes a flagged entry's word for the file (so a new version that flags what it
        changed, or deleted, would hide it from every capture, and the restore would leave it)
        and refuses to add a skip-worktree path at all. The skip-worktree paths found (a sparse
        checkout's): a take records them, and a restore flags them again in the index it puts
        back where they are still absent."""
        listing = b"\0" + (self._git.run_bytes("ls-files", "-v", "-z", index=index) or b"")
        found = _FLAGGED.findall(listing)  # `-v` tags: lower case assume-unchanged, S skip-worktree
        flagged = {
            "--no-assume-unchanged": [os.fsdecode(p) for tag, p in found if tag.islower()],
            "--no-skip-worktree": [os.fsdecode(p) for tag, p in found if tag in (b"S", b"s")],
        }
        for option, paths in flagged.items():  # update-index applies one flag option a path
            if paths:
                log.info("%s: %s for the capture: %s", self.root, option, paths[:5])
                stdin = "".join(f"{path}\0" for path in paths)
                self._git.out("update-index", option, "-z", "--stdin", index=index, stdin=stdin)
        return flagged["--no-skip-worktree"]

    def _add_all(self, index: Path, skip: list[str], *, aside: bool) -> None:
        """`git add -A`, again within a bounded time when a file vanished between git listing and
        reading it: a host that writes and deletes files while we checkpoint must not fail it."""
        for attempt in tenacity.Retrying(
            retry=tenacity.retry_if_exception(_vanished_file),
            wait=exponential(0.01, 0.25, jitter=0.01, rng=random.Random()),
            stop=tenacity.stop_after_delay(_VANISHED_RETRY_FOR_S),
            before_sleep=_log_vanished,
            reraise=True,
        ):
            with attempt:
                self._add_once(index, skip, aside=aside)
                present = [p for p in self.extra_paths if treepaths.plain(self.root, p)]
                if present:  # minus generated files below them (`git add -f` would take them)
                    found = generated.extra_files(self._git, index, present, skip)
                    generated.add_files(self._git, index, found)

    def _add_once(self, index: Path, skip: list[str], *, aside: bool) -> None:
        """One `git add -A`; a path git cannot hold (a FIFO, a socket, a device) is dropped from
        the index (and with `aside`, from the tree) and the add runs again."""
        for _ in range(_SPECIAL_ROUNDS):
            try:
                self._git.out("add", "-A", "--ignore-errors", "--", ".", *skip, index=index)
                return
            except CheckpointError as exc:
                special = _NOT_ADDABLE.findall(exc.message)
                others = [
                    line
                    for line in exc.message.split(": ", 1)[-1].splitlines()
                    if line.strip() and not _NOT_ADDABLE.search(line)
                ]
                if not (special and not others):
                    raise
                self._drop_special(index, special, aside=aside)
        raise CheckpointError(f"git add kept finding paths it cannot hold in {self.root}")

    def _drop_special(self, index: Path, paths: list[str], *, aside: bool) -> None:
        """Paths that are neither file, link nor folder: never code. A restore removes them."""
        log.warning("not code (neither file, link nor folder): %s", ", ".join(paths[:5]))
        self._git.out(
            "rm",
            "--cached",
            "-f",
            "-q",
            "--ignore-unmatch",
            "--",
            *map(literal, paths),
            index=index,
        )
        if aside:
            for path in paths:
                full = self.root / path
                if treepaths.below_real_dirs(self.root, path) and treepaths.is_special(full):
                    full.unlink()

    def _exclude_pathspecs(self) -> list[str]:
        """Pathspecs that keep excluded files from being hashed at all (a big database would be).

        Glob pathspecs whose first character is escaped: git names a literal exclude pathspec
        below an ignored folder as an ignored path it refuses to add (a check-ignore run
        per capture would tell which), but compares only the part before the first wildcard,
        here none. Each path and everything below it."""
        # a path below a symlink (a data folder on another volume) is not in the tree at all
        reachable = [path for path in self.excluded if treepaths.below_real_dirs(self.root, path)]
        specs = []
        for path in reachable:
            escaped = "\\" + re.sub(r"([*?\[\\])", r"\\\1", path)
            specs += [f":(exclude,glob){escaped}", f":(exclude,glob){escaped}/**"]
        return specs

    def _index_tree(self, scratch: Path) -> str:
        """The tree the user staged, from a copy: write-tree may rewrite the index it reads."""
        real = self._git_dir() / "index"
        if not treepaths.is_regular(real):
            return ""
        shutil.copy2(real, scratch)
        self._git.give(scratch)
        return self._git.out("write-tree", index=scratch).strip()

    def _forget_excluded(self, index: Path) -> None:
        """Drop excluded paths that the user's index tracks: never captured, never restored."""
        if index_may_hold(index, self.excluded):  # (rm --cached looks at no path on disk)
            self._git.out(
                "rm", "--cached", "-r", "-f", "-q", "--ignore-unmatch", "--",
                *map(literal, self.excluded), index=index,
            )  # fmt: skip

    def _tree_of(self, cp: Checkpoint) -> str:
        """The checkpoint's tree minus excluded paths and untracked generated files (both may
        have grown since the take). Worked out once per checkpoint and `.git/info/exclude` (read
        to tell generated files): a commit never changes."""
        key = (cp.commit, signature(self._git_dir() / "info" / "exclude"))
        if (known := self._trees.get(key)) is not None:
            return known
        names = [f"{cp.commit}^{{tree}}", *(f"{cp.commit}:{path}" for path in self.excluded)]
        found = self._git.objects(names, contents=False)
        if found[0] is None:
            raise CheckpointError(f"checkpoint commit {cp.commit} is missing from {self.root}")
        with self._scratch() as scratch:
            index = scratch / "filtered"
            self._git.out("read-tree", found[0].sha, index=index)
            if any(found[1:]):
                self._forget_excluded(index)
            generated.drop_untracked_generated(self._git, index, cp.index_tree)
            tree = self._git.out("write-tree", index=index).strip()
        if len(self._trees) >= 16:  # (clear: atomic, whichever worker thread gets here)
            self._trees.clear()
        self._trees[key] = tree
        return tree

    def _recorded_hidden(self, cp: Checkpoint) -> list[str] | None:
        """The ignored untracked paths `cp` recorded (None: it is older than such listings);
        read once per checkpoint (one git run)."""
        if cp.commit not in self._hidden:
            found = self._git.objects([cp.commit], contents=True)[0]
            if found is None or found.type != "commit":
                raise CheckpointError(f"checkpoint commit {cp.commit} is missing from {self.root}")
            if len(self._hidden) >= 16:
                self._hidden.clear()
            message = found.body.decode("utf-8", "surrogateescape")
            self._hidden[cp.commit] = hidden.from_message(message)
        return self._hidden[cp.commit]

    def _hidden_since(self, recorded: list[str], index: Path) -> list[str]:
        """Ignored untracked paths (folders without their '/') that `recorded` does not hold:
        the new version's, hidden from the capture (`hidden`). `index`: the capture's."""
        now = hidden.listing(self._git, index, self._exclude_pathspecs(), self.excluded)
        found = [entry.rstrip("/") for entry in hidden.added_since(recorded, now)]
        if found:
            log.info("ignored, and not there at the checkpoint: %s", ", ".join(found[:5]))
        return found

    def _filtered(
        self, tree: str, listing: list[tuple[str, str]]
    ) -> tuple[str, list[tuple[str, str]]]:
        """`tree` (listed as `listing`) minus excluded paths, and its listing."""
        listed = {path for _, path in listing}  # with its folders: an excluded one is listed
        if any(path in listed for path in self.excluded):
            tree = self._without_excluded(tree)
            listing = self._listing(tree)
        return tree, listing

    def _without_excluded(self, tree: str) -> str:
        with self._scratch() as scratch:
            index = scratch / "filtered"
            self._git.out("read-tree", tree, index=index)
            self._git.out(
                "rm", "--cached", "-r", "-f", "-q", "--ignore-unmatch", "--",
                *map(literal, self.excluded), index=index,
            )  # fmt: skip
            return self._git.out("write-tree", index=index).strip()

    def _commit(self, tree: str, parents: Sequence[str], message: str) -> str:
        args = ["commit-tree", "--no-gpg-sign", "-m", message, tree]
        for parent in parents:
            args += ["-p", parent]
        return self._git.out(*args).strip()

    # --- restore -------------------------------------------------------------------------------

    def _diff(self, current: str, target: str) -> tuple[list[str], list[str]]:
        """The paths of files the target adds to the current tree, and those it has not."""
        fields = self._git.out(*_DIFF, "--name-status", current, target).split("\0")
        added, gone = [], []
        for status, path in zip(fields[0::2], fields[1::2], strict=False):
            if status == "A":
                added.append(path)
            elif status == "D":
                gone.append(path)
        return added, gone

    def _ignored_in_the_way(self, added: list[str], index: Path) -> list[str]:
        """Untracked (ignored) paths that `read-tree --reset -u` would delete to make room.

        They sit where the target adds a file (a directory of ignored files, an ignored file)
        or needs a directory. An excluded path there refuses the restore before any change.
        """
        doomed: set[str] = set()
        for path in added:
            for excluded in self.excluded:
                if excluded == path or excluded.startswith(path + "/"):
                    raise CheckpointError(
                        f"restore would replace {self.root / path} but it holds the excluded "
                        f"{self.root / excluded}; move it away and retry"
                    )
            blocking = treepaths.first_non_dir_above(self.root, path)
            if blocking is not None:  # a file or symlink where a folder must be: nothing below it
                if blocking in self.excluded:
                    raise CheckpointError(
                        f"restore needs a folder at the excluded {self.root / blocking}"
                    )
                if not treepaths.is_special(self.root / blocking):
                    doomed.add(blocking)
                continue
            full = self.root / path
            if treepaths.is_real_dir(full):
                listed = self._git.out(*_LS_IGNORED, literal(path), index=index)
                doomed.update(
                    p for p in listed.split("\0") if p and not treepaths.is_special(self.root / p)
                )
            elif os.path.lexists(full) and not treepaths.is_special(full):
                doomed.add(path)
        return sorted(doomed)

    def _new_folders(self, hid: list[str], recorded: list[str], folders: set[str]) -> list[str]:
        """The topmost folders above `hid` paths that neither the target tree (`folders`), the
        checkpoint's listing nor an excluded path has a part in: the new version's whole, with
        what git lists nowhere (a FIFO beside a hidden package)."""
        known = {parent for entry in recorded for parent in hidden.parents(entry)}
        known |= {parent for path in self.excluded for parent in hidden.parents(path)}
        known = {entry.rstrip("/") for entry in (*known, *recorded)}
        found = set()
        for path in hid:
            parts = path.split("/")
            for depth in range(1, len(parts)):
                top = "/".join(parts[:depth])
                if top not in folders:
                    if top not in known and not under(top, self.excluded):
                        found.add(top)
                    break
        return sorted(found)

    def _remove_untracked_special(self, found: list[str]) -> None:
        """FIFOs, sockets and devices git passes over in silence (`found` in any folder of the
        current or the target tree): unless ignored or excluded they are the new version's, and
        go (never opened)."""
        found = [p for p in found if not under(p, self.excluded)]
        if not found:
            return
        listed = self._git.run("check-ignore", "-z", "--stdin", ok=(1,), stdin="\0".join(found))
        ignored = set((listed or "").split("\0"))
        for path in found:
            if path not in ignored and treepaths.is_special(self.root / path):
                (self.root / path).unlink()
                log.info("removed %s: neither file, link nor folder, and not ignored", path)

    def _put_refs(
        self,
        cp: Checkpoint,
        name: str,
        current: str,
        tips: Sequence[str | None],
        previous: str | None,
        *,
        made: str | None = None,
    ) -> None:
        """In one ref transaction, before the work tree changes: keep the abandoned state, its
        HEAD and its branch tip reachable under swapguard's refs, and put the branch and HEAD
        back at the checkpoint's commit.

        A repeated restore keeps the first abandoned commit (the new version's tree) and only adds
        a merge commit when some commit would otherwise become unreachable. `made`: the first
        one, written already (`_abandon`).
        """
        ref = f"{_ABANDONED}/{name}"
        heads = list(dict.fromkeys(tip for tip in tips if tip))
        orders = []
        if previous is None:
            orders.append(f"create {ref} {made or self._abandon(current, heads, name)}")
        elif loose := [tip for tip in heads if not self._reachable(tip, previous, cp.commit)]:
            commit = self._commit(
                f"{previous}^{{tree}}", [previous, *loose], f"swapguard abandoned {name}"
            )
            orders.append(f"update {ref} {commit} {previous}")
        if cp.branch is None:
            orders += ["option no-deref", f"update HEAD {cp.head}"]
        elif cp.head is None:
            orders.append(f"delete refs/heads/{cp.branch}")
        else:
            orders.append(f"update refs/heads/{cp.branch} {cp.head}")
        stdin = "".join(f"{order}\n" for order in orders)
        self._git.run("update-ref", "-m", f"swapguard: restore {name}", "--stdin", stdin=stdin)

    def _abandon(self, current: str, tips: Sequence[str | None], name: str) -> str:
        """The commit of the abandoned state: its tree, with HEAD and the branch tip as parents."""
        heads = list(dict.fromkeys(tip for tip in tips if tip))
        return self._commit(current, heads, f"swapguard abandoned {name}")

    def _reachable(self, commit: str, *tips: str) -> bool:
        return any(
            self._git.run("merge-base", "--is-ancestor", commit, tip, ok=(1,)) is not None
            for tip in tips
        )

    def _skipped_to_message(self, paths: list[str]) -> str:
        """The commit-message line of the take's skip-worktree paths (a blob of them: a sparse
        checkout may leave out thousands)."""
        if not paths:
            return f"{_SKIPPED}none\n"
        stdin = "".join(f"{path}\0" for path in paths)
        return f"{_SKIPPED}{self._git.out('hash-object', '-w', '--stdin', stdin=stdin).strip()}\n"

    def _skipped_from_message(self, message: str) -> list[str]:
        found = _SKIPPED_LINE.search(message)
        if found is None or found.group(1) == "none":
            return []
        blob = self._git.objects([found.group(1)], contents=True)[0]
        if blob is None or blob.type != "blob":
            return []
        return [path for path in os.fsdecode(blob.body).split("\0") if path]

    def _put_index(
        self, index_tree: str, target: str, *, worktree_index: Path, sparse: list[str]
    ) -> None:
        """Replace the user's index with the staged tree of the checkpoint, atomically.

        Built from the index that just wrote the work tree, so unchanged entries keep their stat
        data (read-tree keeps it for entries it leaves alone); when the staged tree is the work
        tree's (nothing staged apart, nothing untracked), that index is the one. While somebody
        else holds index.lock, the new index waits beside it as PENDING_INDEX (put in place
        after a short wait, else by the first operation after the lock goes)."""
        git_dir = self._git_dir()
        for stale in git_dir.glob(f"{_STAGED_PREFIX}*"):  # left by a restore that was killed
            treepaths.remove(git_dir, stale.name)  # (or planted: a folder, never followed)
        staged = git_dir / f"{_STAGED_PREFIX}{os.getpid()}"
        try:
            if index_tree:
                shutil.copy2(worktree_index, staged)
            if index_tree and index_tree != target:
                # Not `--index-output`: git writes it as the lock of the index it reads (in the
                # scratch folder) renamed over, which fails across file systems (a tmpfs /tmp).
                self._git.out("read-tree", "--reset", index_tree, index=staged)
            if index_tree and sparse:  # what a sparse checkout left out, and is still out
                self._flag_sparse(staged, sparse)
            if index_tree:
                real = git_dir / "index"
                if real.exists():
                    os.chmod(staged, real.stat().st_mode & 0o7777)
                self._git.give(staged)
            if self._locks().put_now(staged if index_tree else None):
                self._blocked_by = self._pending_over = None
                return
            self._pending_over = self._locks().make_pending(staged if index_tree else None)
        finally:
            staged.unlink(missing_ok=True)
        self._finish_pending_index(wait=_LOCK_WAIT_S)

    def _flag_sparse(self, index: Path, sparse: list[str]) -> None:
        """Flag skip-worktree again where the take found it, the path is in the index put back
        and no file is there (a flag is never taken from today's index: the new version's)."""
        listed = set(
            os.fsdecode(self._git.run_bytes("ls-files", "-z", index=index) or b"").split("\0")
        )
        absent = [p for p in sparse if p in listed and not os.path.lexists(self.root / p)]
        if absent:
            stdin = "".join(f"{path}\0" for path in absent)
            self._git.out(
                "update-index", "--skip-worktree", "-z", "--stdin", index=index, stdin=stdin
            )

    def _finish_pending_index(self, *, wait: float = 0.0) -> None:
        """Put a pending index in place once nobody else holds index.lock (within `wait`)."""
        with self._pending_lock:
            self._finish_pending_index_alone(wait)

    def _finish_pending_index_alone(self, wait: float) -> None:
        locks = self._locks()
        if not locks.pending():
            self._blocked_by = None
            return
        self._clear_stale()
        if self._pending_over is not None and signature(locks.index) != self._pending_over:
            log.warning("%s: the index was written since the restore; keeping it", self.root)
            locks.drop_pending()
            self._blocked_by = self._pending_over = None
            return
        if not locks.put_pending(wait):
            self._blocked_by = locks.foreign_index_lock() or str(locks.git_dir / INDEX_LOCK)
            log.warning(
                "%s: git's index stays as the new version left it while %s exists "
                "(held by another process); it is put back once that goes",
                self.root, self._blocked_by,
            )  # fmt: skip
            return
        if self._blocked_by:
            log.info("%s: the index is back, %s went", self.root, self._blocked_by)
        self._blocked_by = self._pending_over = None

    def _locks(self) -> GitLocks:
        return GitLocks(self._git_dir())

    def _default_owner(self) -> tuple[int, int] | None:
        """Who owns what git writes in the tree; None unless we are root (only root can give a
        path back to another owner, so only then are owners recorded and restored)."""
        if os.geteuid() != 0:
            return None
        owner = self._git.owner
        return (os.geteuid(), os.getegid()) if owner is None else (owner.uid, owner.gid)

    def _listing(self, tree: str) -> list[tuple[str, str]]:
        """(git mode, path) of every blob, link and folder of `tree` (parsed by one regex: a
        tree of 100k files is 100k lines)."""
        return _LS_TREE_LINE.findall(self._git.out(*_LS_TREE, tree))

    # --- plumbing ------------------------------------------------------------------------------

    def _git_dir(self, *, fresh: bool = False) -> Path:
        """The work tree's git dir; CheckpointError unless root is the top of a git work tree."""
        if self._known_git_dir is not None and not fresh:
            return self._known_git_dir
        if not self.root.is_dir():
            raise CheckpointError(f"code root {self.root} is not a directory")
        found = self._git.out(
            "rev-parse", "--is-inside-work-tree", "--show-toplevel", "--absolute-git-dir"
        )
        return self._top(found.splitlines())

    def _top(self, lines: list[str]) -> Path:
        """From rev-parse's work tree, top and git dir lines: the git dir, root being the top."""
        if len(lines) != 3 or lines[0] != "true":
            raise CheckpointError(f"code root {self.root} is not a git work tree")
        # git runs with root as its work tree (whatever `core.worktree` says): the repo must be
        # root's own, found at root/.git, not one git found further up
        dot_git = self.root / ".git"
        if not dot_git.exists() or (
            dot_git.is_dir() and Path(lines[2]).resolve() != dot_git.resolve()
        ):
            top = Path(lines[2]).parent
            raise CheckpointError(
                f"code root {self.root} must be the top of its git work tree {top}"
            )
        self._known_git_dir = Path(lines[2])
        return self._known_git_dir

    def _info_dir(self, git_dir: Path) -> Path:
        """The `info` folder git reads attributes from: the common git dir's, which a linked
        work tree's git dir (holding a `commondir` file) is not."""
        if not treepaths.is_regular(git_dir / "commondir"):
            return git_dir / "info"
        found = self._git.out("rev-parse", "--path-format=absolute", "--git-common-dir")
        return Path(found.strip()) / "info"

    def _look(self) -> Where:
        """Check that root is the top of a git work tree, and where its HEAD is: one git run
        (three more when HEAD has no commit yet or the answer is not the usual one)."""
        if not self.root.is_dir():
            raise CheckpointError(f"code root {self.root} is not a directory")
        found = self._git.run(
            "rev-parse", "--is-inside-work-tree", "--show-toplevel", "--absolute-git-dir",
            "HEAD", "HEAD^{tree}", "--symbolic-full-name", "HEAD", "--", ok=(128,),
        )  # fmt: skip
        lines = found.splitlines() if found is not None else []
        if len(lines) != 7 or lines[6] != "--" or not lines[5].startswith(("HEAD", "refs/")):
            return Where(self._git_dir(fresh=True), self.head(), None, self._branch())
        branch = None if lines[5] == "HEAD" else branch_name(lines[5])
        return Where(self._top(lines[:3]), lines[3], lines[4], branch)

    def _branch(self) -> str | None:
        found = self._git.run("symbolic-ref", "-q", "HEAD", ok=(1,))
        if found is None:
            return None
        return branch_name(found.strip())

    @contextmanager
    def _scratch(self) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="swapguard-checkpoint-") as folder:
            self._git.give(Path(folder))
            yield Path(folder)

    def _relative_excluded(self, path: Path) -> str | None:
        """`path` relative to root, or None when it lies outside (then nothing can touch it)."""
        if not Path(path).is_absolute():
            raise ConfigError(f"excluded path {str(path)!r} must be absolute")
        absolute = Path(os.path.abspath(path))
        for base in (self.root, self.root.resolve()):
            if absolute.is_relative_to(base) and absolute != base:
                return absolute.relative_to(base).as_posix()
        return None


def _beside(workers: int = 2) -> ThreadPoolExecutor:
    """Threads for git runs that do not wait on each other (each thread waits on its git)."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="swapguard-git")


def _vanished_file(exc: BaseException) -> bool:
    return isinstance(exc, CheckpointError) and _VANISHED.search(exc.message) is not None


def _log_vanished(state: tenacity.RetryCallState) -> None:
    found = _VANISHED.search(str(state.outcome.exception())) if state.outcome else None
    log.info(
        "a file vanished during the checkpoint (%s); adding again in %.0f ms (attempt %d)",
        found.group(1) if found else "?",
        state.upcoming_sleep * 1000,
        state.attempt_number + 1,
    )


def _relative_extra(path: str) -> str:
    """Validate an extra path: relative, inside root, not in .git."""
    pure = PurePosixPath(str(path))
    if not str(path) or pure.is_absolute() or ".." in pure.parts or str(pure) == ".":
        raise ConfigError(
            f"{str(path)!r} must be a relative path inside the code root", key="code.extra_paths"
        )
    if pure.parts[0] == ".git":
        raise ConfigError(f"{str(path)!r} lies inside .git", key="code.extra_paths")
    return pure.as_posix()


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000
