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
import contextlib
import functools
import hashlib
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from supervisor.code import gitlocks
from supervisor.config.noncode import CLEARED
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
# The repo's config is the new version's to write (it runs as the tree's owner): a key that
# changes what git reads from the work tree or writes into it is pinned here, so that no
# setting planted after the take can hide a change from a capture or bend what a restore
# writes (its files, links and bits as git stores them). What converts file contents (the
# filter drivers, the line ends) is the take's while a restore runs: `Git.as_at_the_take`.
_GIT_CONFIG = (
    "core.fsmonitor=false",  # a stale token in a copied index could hide a change
    "core.splitIndex=false",
    "core.untrackedCache=false",  # a forged cache in a copied index could hide a new file
    "core.sparseCheckout=false",  # else a restore leaves what the patterns leave out
    "core.sparseCheckoutCone=false",
    "index.sparse=false",
    "core.symlinks=true",  # else links are restored as plain files
    "core.fileMode=true",  # else the executable bit is neither seen nor restored
    "core.safecrlf=false",  # else a file with mixed line ends fails the capture
    "core.ignoreCase=false",  # else `makefile` beside a tracked `Makefile` is not seen
    "core.precomposeUnicode=false",
    "core.useReplaceRefs=false",  # else `git replace` swaps a checkpoint's objects for others
    "submodule.recurse=false",  # else a restore runs a submodule's own config and drivers
    "core.attributesFile=/dev/null",  # the repo's `.gitattributes` and info/attributes only
    "core.checkStat=default",
    "core.trustctime=true",
    "gc.auto=0",
    "maintenance.auto=false",
    "advice.addEmbeddedRepo=false",
)
# What converts a file as git reads or writes it, from the config: the filter drivers (commands
# the repo's config names, which an attributes line runs on a file) and the line-end settings.
# A take records them; a restore runs with those alone (`as_at_the_take`).
_CONVERSION_KEY = re.compile(
    r"filter\.(.*)\.(?:clean|smudge|process|required)|core\.(?:autocrlf|eol)", re.DOTALL
)
_INCLUDE_KEY = re.compile(r"include\.path|includeif\..*\.path", re.DOTALL)
_LOOKUP = (
    r"^(filter\..*\.(clean|smudge|process|required)|core\.(autocrlf|eol)"
    r"|include\.path|includeif\..*\.path)$"
)
# each key of a driver the take did not know, and what it is set to at a restore: no command
# (git passes the bytes through), and not required (else it would fail every file it names)
_DRIVER_OFF = {"clean": "", "smudge": "", "process": "", "required": "false"}
_LINE_ENDS_DEFAULT = {"core.autocrlf": "false", "core.eol": "native"}
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
class GitObject:
    """An object `Git.objects` found: its id, its type and (when asked for) its contents."""

    sha: str
    type: str
    body: bytes


_OBJECT = re.compile(rb"[0-9a-f]{40}(?:[0-9a-f]{24})? (?:commit|tree|blob|tag) [0-9]+")


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
        env.update(GIT_NO_REPLACE_OBJECTS="1", GIT_GRAFT_FILE=os.devnull)  # objects as stored
        # the work tree is root, whatever a `core.worktree` planted in the repo's config says
        env["GIT_WORK_TREE"] = os.path.abspath(root)
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
        self._excludes_files: tuple[str, str, str] | None = None
        self._conversions: tuple[object, list[tuple[str, str]]] | None = None  # signature, pairs
        self._take_time: dict[str, str] | None = None  # within `as_at_the_take`
        self._take_tree = ""  # the tree a restore writes, within `as_at_the_take`

    def excludes_file(self) -> str | None:
        """A file holding `excludes` alone (for `ls-files --exclude-from`), or None if none."""
        return self._prepare_excludes()[1] if self.excludes else None

    def builtin_excludes_file(self) -> str:
        """A file holding the patterns of what a restore clears (`CLEARED`: bytecode and build
        caches), whatever the user's `code.ignore` says."""
        return self._prepare_excludes()[2]

    def _prepare_excludes(self) -> tuple[str, str, str]:
        """(merged, ours, built-in): written once, on first use; the user's global excludes file
        is read then (a change to it takes a restart of swapguard, like a config change).

        They stay ours, in a folder only we can write: git, running as the tree's owner, reads
        them (group-readable, the owner's group) but can neither rewrite nor replace them (a
        pattern added there would hide a file from every capture)."""
        if self._excludes_files is None:
            folder = tempfile.mkdtemp(prefix="swapguard-excludes-")
            os.chmod(folder, 0o755)  # git may run as the tree's owner: it may enter, not write
            atexit.register(shutil.rmtree, folder, True)
            ours = "".join(f"{pattern}\n" for pattern in self.excludes)
            builtin = "".join(f"{pattern}\n" for pattern in CLEARED)
            theirs = _read_small_text(self._user_excludes_path(), self.owner)
            names = ("merged", "ours", "builtin")
            texts = (theirs + "\n" + ours, ours, builtin)
            files = tuple(os.path.join(folder, name) for name in names)
            for path, text in zip(files, texts, strict=True):
                self._write_private(path, text)
            self._excludes_files = (files[0], files[1], files[2])
        return self._excludes_files

    def _write_private(self, path: str, text: str) -> None:
        """A new file of ours the tree's owner may read and nobody else (the user's excludes
        are theirs to read): mode 0640, group the owner's, never the owner's to write."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            if self.owner is not None:
                os.fchown(fd, -1, self.owner.gid)
                os.fchmod(fd, 0o640)
            out.write(text)

    def _user_excludes_path(self) -> str:
        """Where git would read the user's global excludes: core.excludesFile, else XDG's."""
        asked = ("config", "--path", "--get", "core.excludesFile")
        found = os.fsdecode(self._run(asked, None, (1,), "", []) or b"").strip()
        if found:
            return found
        home = self._env.get("HOME", "/")
        xdg = self._env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
        return os.path.join(xdg, "git", "ignore")

    def run(
        self, *args: str, index: Path | None = None, ok: Sequence[int] = (0,), stdin: str = ""
    ) -> str | None:
        """Git's stdout, or None when it exited with an accepted non-zero code."""
        found = self.run_bytes(*args, index=index, ok=ok, stdin=stdin)
        return None if found is None else os.fsdecode(found)

    def run_bytes(
        self, *args: str, index: Path | None = None, ok: Sequence[int] = (0,), stdin: str = ""
    ) -> bytes | None:
        """`run`, with git's stdout as it wrote it (object contents are bytes, sized in bytes)."""
        config = list(self._config)
        if self.excludes:
            config += ["-c", f"core.excludesFile={self._prepare_excludes()[0]}"]
        if (recorded := self._take_time) is not None:  # every command: even write-tree hashes
            config += ["-c", f"include.path={self._conversions_file(recorded)}"]  # racy files
        return self._run(args, index, ok, stdin, config)

    def conversions(self) -> dict[str, str]:
        """The filter drivers' keys and the line-end settings in force now (a take records
        them: a restore writes the tree with them)."""
        return {
            key: value for key, value in self._conversions_now() if not _INCLUDE_KEY.fullmatch(key)
        }

    @contextlib.contextmanager
    def as_at_the_take(self, recorded: dict[str, str] | None, tree: str = "") -> Iterator[None]:
        """Within (a restore), every command that converts runs with the drivers and line-end
        settings `recorded` at the take (None: a take that recorded none; no driver then),
        whatever the config says now: the new version may have defined a driver (a command
        of its own, run on each file git reads or writes) or changed one, or the line ends.
        `tree`: the tree the restore writes, whose attributes a git that knows `attr.tree`
        reads (the new version could point that key at a tree of its own)."""
        self._take_time, self._take_tree = dict(recorded or {}), tree
        try:
            yield
        finally:
            self._take_time, self._take_tree = None, ""

    def _conversions_file(self, recorded: dict[str, str]) -> str:
        """A config file of ours (`-c include.path=`, read after the repo's: it wins) that puts
        every driver and line-end setting as `recorded`: a driver the take did not know is off
        (no command, not required), one it knew gets its commands back. A file, not `-c`
        pairs: a name may hold `=`, and thousands of drivers would not fit in argv."""
        now = dict(self._conversions_now())
        pins: dict[str, str] = dict(_LINE_ENDS_DEFAULT)
        for key in now:
            found = _CONVERSION_KEY.fullmatch(key)
            if found is None or (name := found.group(1)) is None:
                continue
            known = any(k.startswith(f"filter.{name}.") for k in recorded)
            for part, off in _DRIVER_OFF.items():
                full = f"filter.{name}.{part}"
                if part != "process" or not known:
                    pins[full] = off
                elif now.get(full) != recorded.get(full):
                    # a `process` the take did not have: no config can unset a key, and any
                    # value (even none) takes the place of clean and smudge: the driver is off
                    # (and made not required below: its files are written as stored)
                    pins[full] = recorded.get(full, off)
        pins.update(recorded)
        for key, value in list(pins.items()):
            if key.endswith(".process") and value == "" and key not in recorded:
                pins[key.removesuffix("process") + "required"] = "false"  # even if the take's was
        if self._take_tree:  # git >= 2.42 reads attributes from `attr.tree` if set: the target's
            pins["attr.tree"] = self._take_tree
        text = _config_text(pins)
        name = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        path = os.path.join(os.path.dirname(self._prepare_excludes()[0]), f"conversions-{name}")
        if not os.path.exists(path):
            scratch = f"{path}.{threading.get_ident()}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(scratch)
            self._write_private(scratch, text)
            os.rename(scratch, path)
        return path

    def _conversions_now(self) -> list[tuple[str, str]]:
        """(key, value) of every driver key, line-end setting and include in any config git
        reads here; looked up again whenever a config file changed (always, when one includes
        others: the included file may change alone)."""
        signature = self._config_signature()
        known = self._conversions
        if known is not None and signature is not None and known[0] == signature:
            return known[1]
        asked = ("config", "-z", "--get-regexp", _LOOKUP)
        found = os.fsdecode(self._run(asked, None, (1,), "", self._config) or b"")
        pairs = [
            (key, value)
            for key, _, value in (entry.partition("\n") for entry in found.split("\0") if entry)
        ]
        includes = any(_INCLUDE_KEY.fullmatch(key) for key, _ in pairs)
        self._conversions = None if includes else (signature, pairs)
        return pairs

    def _config_signature(self) -> tuple[tuple[int, int, int, int] | None, ...] | None:
        """The stat of every config file git reads here (None: one cannot be told)."""
        git_dir = os.path.join(self.root, ".git")
        if not os.path.isdir(git_dir):
            return None  # a .git file names the git dir elsewhere: looked up every time
        home = self._env.get("HOME", "/")
        xdg = self._env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
        paths = (
            os.path.join(git_dir, "config"),
            os.path.join(git_dir, "config.worktree"),
            os.path.join(home, ".gitconfig"),
            os.path.join(xdg, "git", "config"),
            "/etc/gitconfig",  # (git runs without the GIT_* of our environment)
        )
        found: list[tuple[int, int, int, int] | None] = []
        for path in paths:
            try:
                info = os.stat(path)
            except FileNotFoundError:
                found.append(None)
            except OSError:
                return None
            else:
                found.append((info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns))
        return tuple(found)

    def _run(
        self,
        args: Sequence[str],
        index: Path | None,
        ok: Sequence[int],
        stdin: str,
        config: Sequence[str],
    ) -> bytes | None:
        env = {**self._env, "GIT_INDEX_FILE": str(index or _no_index())}
        owner = self.owner
        try:
            proc = subprocess.Popen(
                ["git", *config, *args],
                cwd=self.root,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                user=owner.uid if owner else None,
                group=owner.gid if owner else None,
                extra_groups=[] if owner else None,
                # the flocked lock journals this thread holds: a git that outlives us keeps
                # proving that the locks it holds are taken (see gitlocks)
                pass_fds=gitlocks.inherited_fds(),
            )
        except FileNotFoundError as exc:
            raise CheckpointError("git is not installed or not on PATH") from exc
        except OSError as exc:  # E2BIG, EAGAIN: a failed step, retried like any other
            raise CheckpointError(f"git {args[0]} could not be started: {exc}") from exc
        # Not communicate(timeout=): with one it polls for the exit with sleeps, a millisecond
        # or two of every git run; a timer kills a git that outlives the limit instead.
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            # with what it started: a child of git's holding its pipes would keep communicate
            # waiting (git stays in our process group, so a manager's group kill takes it too).
            # git first: killed after a hook of its, it could still see the hook fail and roll
            # its transaction back, so whether its locks stay would be a race.
            children: list[psutil.Process] = []
            with contextlib.suppress(psutil.Error):
                children = psutil.Process(proc.pid).children(recursive=True)
            proc.kill()
            for child in children:
                with contextlib.suppress(psutil.Error):
                    child.kill()

        overdue = threading.Timer(GIT_TIMEOUT_S, kill)
        overdue.start()
        try:
            with proc:
                stdout, stderr = proc.communicate(os.fsencode(stdin))
        finally:
            overdue.cancel()
        if killed.is_set():  # whatever lock it held stays, journaled: cleared later
            gitlocks.git_was_killed()
            raise CheckpointError(
                f"git {args[0]} in {self.root} did not finish within {GIT_TIMEOUT_S:.0f}s"
            )
        if proc.returncode == 0:
            return stdout
        if proc.returncode in ok:
            return None
        said = os.fsdecode(stderr).strip() or "(no output)"
        raise CheckpointError(
            f"git {args[0]} failed in {self.root} (exit {proc.returncode}): {said}"
        )

    def objects(self, names: Sequence[str], *, contents: bool) -> list[GitObject | None]:
        """Many revisions looked up by one `git cat-file --batch` (or `--batch-check`): each
        object found, or None where git has none by that name. Names hold no newline."""
        if any("\n" in name for name in names):
            raise CheckpointError("a revision to look up holds a newline")
        mode = "--batch" if contents else "--batch-check"
        out = self.run_bytes("cat-file", mode, stdin="".join(f"{n}\n" for n in names)) or b""
        found: list[GitObject | None] = []
        at = 0
        for _ in names:
            end = out.index(b"\n", at)
            header = out[at:end].split(b" ")
            at = end + 1
            if len(header) != 3 or not _OBJECT.fullmatch(b" ".join(header)):
                found.append(None)  # "<name> missing" (or "ambiguous"): nothing by that name
                continue
            size = int(header[2])
            body = out[at : at + size] if contents else b""
            at += size + 1 if contents else 0
            found.append(GitObject(header[0].decode(), header[1].decode(), body))
        return found

    def out(self, *args: str, index: Path | None = None, stdin: str = "") -> str:
        return self.run(*args, index=index, stdin=stdin) or ""

    def give(self, path: Path) -> None:
        """Hand a scratch file or folder we created to the user git runs as."""
        if self.owner is not None:
            os.chown(path, self.owner.uid, self.owner.gid)


def _read_small_text(path: str, owner: _Owner | None) -> str:
    """A regular file's text (at most 1 MiB), else "". The path comes from a config the tree's
    owner (or a new version) may write, so nothing but a regular file is ever opened for reading:
    it is first reached with O_PATH (which opens no device and blocks on no FIFO; a symlink, as
    in a dotfiles home, is followed), checked, then reopened through that very handle. Run as
    root for the tree's `owner`, only a file that owner could have read counts (theirs, or
    readable by all): a path the repo's config names must not leak root's files."""
    try:
        handle = os.open(path, getattr(os, "O_PATH", 0) | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            return ""
        if owner is not None and info.st_uid != owner.uid and not info.st_mode & stat.S_IROTH:
            return ""
        proc = f"/proc/self/fd/{handle}"
        if not hasattr(os, "O_PATH") or not os.path.exists(proc):
            return ""  # no way to reopen exactly what was checked: the user's excludes skipped
        fd = os.open(proc, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return ""
    finally:
        os.close(handle)
    with os.fdopen(fd, "rb") as file:
        if not os.path.samestat(os.fstat(fd), info):
            return ""
        try:
            return file.read(1 << 20).decode("utf-8", "replace")
        except OSError:
            return ""


def _config_text(pairs: dict[str, str]) -> str:
    """A git config file setting `pairs` (`section.subsection.key`: value), each quoted."""
    lines = []
    for key, value in pairs.items():
        section, _, rest = key.partition(".")
        subsection, dot, name = rest.rpartition(".")
        if "\n" in subsection or "\0" in subsection + value:
            continue  # no config file can hold it, so no config defines it
        # `filter..clean` has a subsection, empty: `[filter ""]`, not `[filter]`
        head = f"[{section} {_quoted(subsection)}]" if dot else f"[{section}]"
        lines.append(f"{head}\n\t{name} = {_quoted(value)}\n")
    return "".join(lines)


def _quoted(text: str) -> str:
    """A value or subsection name in double quotes, as git's config parser reads it back."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def literal(path: str) -> str:
    return f":(literal){path}"


@dataclass(frozen=True)
class Where:
    """Where the work tree stands: its git dir, HEAD's commit and tree, its branch (None:
    detached)."""

    git_dir: Path
    head: str | None
    head_tree: str | None
    branch: str | None


def branch_name(ref: str) -> str:
    if not ref.startswith("refs/heads/"):
        raise CheckpointError(f"HEAD points at {ref}, which is not a branch")
    return ref.removeprefix("refs/heads/")


def under(path: str, folders: Sequence[str]) -> bool:
    return any(path == folder or path.startswith(folder + "/") for folder in folders)


def index_may_hold(index: Path, paths: Sequence[str]) -> bool:
    """Whether the index file may have an entry at or below one of `paths`. False only when its
    bytes say so: a version 2 or 3 index (full path names), not split, not sparse, in which no
    path's bytes occur. Saves a git run per capture when, as usual, it tracks none of them."""
    if not paths:
        return False
    try:
        data = index.read_bytes()
    except FileNotFoundError:
        return False
    if data[:4] != b"DIRC" or int.from_bytes(data[4:8], "big") not in (2, 3):
        return True
    if b"link" in data or b"sdir" in data:
        return True
    return any(os.fsencode(path) in data for path in paths)
