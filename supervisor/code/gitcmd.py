"""The git binary, run in one work tree with a clean, explicit environment.

Why a module of its own: every git command swapguard runs goes through here, so the environment
(no GIT_* of the caller, a fixed identity, no optional locks, no hooks, C locale) and the user it
runs as (the tree's owner when swapguard is root, so nothing in the tree or `.git` becomes
root's) are decided in one place. The tree is trusted per command (`-c safe.directory=<tree>`):
whoever owns it or `.git`, git never stops at its ownership check, and nobody's git config is
changed.
"""

from __future__ import annotations

import atexit
import functools
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from supervisor.code import gitlocks
from supervisor.errors import CheckpointError

GIT_TIMEOUT_S = 300.0
"""No git command of ours runs longer: a tree on a hung file system fails the step (it is then
retried with backoff) instead of holding a worker for ever."""


@functools.cache
def _no_index() -> str:
    """A path where no index is, nor ever will be, for commands that need none: git would
    otherwise read `.git/index` itself, where a new version may have left a FIFO (git would
    block for ever) or garbage. Its folder is ours and anybody may look in it (git may run as
    the tree's owner)."""
    folder = tempfile.mkdtemp(prefix="swapguard-no-index-")
    os.chmod(folder, 0o755)
    atexit.register(shutil.rmtree, folder, True)
    return os.path.join(folder, "index")


# Config that would make a scratch-index operation slow, lossy or chatty, overridden per call.
_GIT_CONFIG = (
    "core.fsmonitor=false",  # a stale token in a copied index could hide a change
    "core.splitIndex=false",
    "gc.auto=0",
    "maintenance.auto=false",
    "advice.addEmbeddedRepo=false",
)
_HOOKS_FAULT = "SWAPGUARD_TEST_GIT_HOOKS"
"""Test-only fault: a folder of git hooks our commands run (by default none runs)."""


def _hooks_path() -> str:
    """No hook of the repo runs in our commands: a `reference-transaction` hook the new version
    planted would otherwise run (and could hang) while our update-ref holds HEAD.lock, and the
    rollback with it. `/dev/null` is no folder, so git finds no hook there."""
    return os.environ.get(_HOOKS_FAULT) or os.devnull
_IDENTITY = {
    "GIT_AUTHOR_NAME": "swapguard",
    "GIT_AUTHOR_EMAIL": "swapguard@localhost",
    "GIT_COMMITTER_NAME": "swapguard",
    "GIT_COMMITTER_EMAIL": "swapguard@localhost",
}


@dataclass(frozen=True)
class _Owner:
    """Whom git runs as when we are root and the tree belongs to someone else."""

    uid: int
    gid: int
    home: str


def _owner_of(root: Path) -> _Owner | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    try:
        stat = root.stat()
    except OSError:
        return None  # check() reports the missing root
    if stat.st_uid == 0:
        return None
    try:
        entry = pwd.getpwuid(stat.st_uid)
    except KeyError:
        return _Owner(stat.st_uid, stat.st_gid, "/")
    return _Owner(stat.st_uid, entry.pw_gid, entry.pw_dir)


class Git:
    """Runs the git binary in one work tree with a clean, explicit environment.

    `excludes` (gitignore patterns: the files that are never code) are added to the ignore rules
    of every command run here, and only here: they go to a file of ours given as
    `core.excludesFile`, after the user's own global excludes file (which that setting would
    otherwise replace), so the user's repo, config and `.gitignore` are never touched."""

    def __init__(self, root: Path, *, excludes: Sequence[str] = ()) -> None:
        self.root = root
        self.owner = _owner_of(root)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        env.update(_IDENTITY, GIT_OPTIONAL_LOCKS="0", GIT_TERMINAL_PROMPT="0", LC_ALL="C")
        if self.owner is not None:
            env["HOME"] = self.owner.home
        self._env = env
        # git refuses a repository another user owns ("dubious ownership"): allowed for this
        # tree, per command; no config file of anybody's is changed.
        trusted = dict.fromkeys((str(root), os.path.realpath(root)))
        config = [
            *_GIT_CONFIG,
            f"core.hooksPath={_hooks_path()}",
            *(f"safe.directory={path}" for path in trusted),
        ]
        self._config = [arg for item in config for arg in ("-c", item)]
        self.excludes = tuple(excludes)
        self._excludes_files: tuple[str, str] | None = None

    def excludes_file(self) -> str | None:
        """A file holding `excludes` alone (for `ls-files --exclude-from`), or None if none."""
        return self._prepare_excludes()[1] if self.excludes else None

    def _prepare_excludes(self) -> tuple[str, str]:
        """(merged, ours): written once, on first use; the user's global excludes file is read
        then (a change to it takes a restart of swapguard, like a config change)."""
        if self._excludes_files is None:
            folder = tempfile.mkdtemp(prefix="swapguard-excludes-")
            os.chmod(folder, 0o755)  # git may run as the tree's owner
            atexit.register(shutil.rmtree, folder, True)
            ours = "".join(f"{pattern}\n" for pattern in self.excludes)
            theirs = _read_small_text(self._user_excludes_path(), self.owner)
            files = (os.path.join(folder, "merged"), os.path.join(folder, "ours"))
            for path, text in zip(files, (theirs + "\n" + ours, ours), strict=True):
                with open(path, "w", encoding="utf-8") as out:
                    out.write(text)
                os.chmod(path, 0o600)  # the user's excludes are theirs to read
                self.give(Path(path))
            self._excludes_files = files
        return self._excludes_files

    def _user_excludes_path(self) -> str:
        """Where git would read the user's global excludes: core.excludesFile, else XDG's."""
        found = self._run(("config", "--path", "--get", "core.excludesFile"), None, (1,), "", [])
        if found and found.strip():
            return found.strip()
        home = self._env.get("HOME", "/")
        xdg = self._env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
        return os.path.join(xdg, "git", "ignore")

    def run(
        self, *args: str, index: Path | None = None, ok: Sequence[int] = (0,), stdin: str = ""
    ) -> str | None:
        """Git's stdout, or None when it exited with an accepted non-zero code."""
        config = list(self._config)
        if self.excludes:
            config += ["-c", f"core.excludesFile={self._prepare_excludes()[0]}"]
        return self._run(args, index, ok, stdin, config)

    def _run(
        self,
        args: Sequence[str],
        index: Path | None,
        ok: Sequence[int],
        stdin: str,
        config: Sequence[str],
    ) -> str | None:
        env = {**self._env, "GIT_INDEX_FILE": str(index or _no_index())}
        owner = self.owner
        try:
            proc = subprocess.run(
                ["git", *config, *args],
                cwd=self.root,
                env=env,
                input=os.fsencode(stdin),
                capture_output=True,
                user=owner.uid if owner else None,
                group=owner.gid if owner else None,
                extra_groups=[] if owner else None,
                timeout=GIT_TIMEOUT_S,
                # the flocked lock journals this thread holds: a git that outlives us keeps
                # proving that the locks it holds are taken (see gitlocks)
                pass_fds=gitlocks.inherited_fds(),
            )
        except FileNotFoundError as exc:
            raise CheckpointError("git is not installed or not on PATH") from exc
        except subprocess.TimeoutExpired as exc:  # killed: whatever lock it held stays
            gitlocks.git_was_killed()
            raise CheckpointError(
                f"git {args[0]} in {self.root} did not finish within {GIT_TIMEOUT_S:.0f}s"
            ) from exc
        if proc.returncode == 0:
            return os.fsdecode(proc.stdout)
        if proc.returncode in ok:
            return None
        stderr = os.fsdecode(proc.stderr).strip() or "(no output)"
        raise CheckpointError(
            f"git {args[0]} failed in {self.root} (exit {proc.returncode}): {stderr}"
        )

    def out(self, *args: str, index: Path | None = None, stdin: str = "") -> str:
        return self.run(*args, index=index, stdin=stdin) or ""

    def give(self, path: Path) -> None:
        """Hand a scratch file or folder we created to the user git runs as."""
        if self.owner is not None:
            os.chown(path, self.owner.uid, self.owner.gid)


def _read_small_text(path: str, owner: _Owner | None) -> str:
    """A regular file's text (at most 1 MiB), else "". Opened non-blocking (a FIFO never holds
    us). Run as root for the tree's `owner`, only a file that owner could have read counts
    (theirs, or readable by all): a path the repo's config names must not leak root's files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return ""
        if owner is not None and info.st_uid != owner.uid and not info.st_mode & stat.S_IROTH:
            return ""
        try:
            return file.read(1 << 20).decode("utf-8", "replace")
        except OSError:
            return ""


def literal(path: str) -> str:
    return f":(literal){path}"
