"""Permission bits of a code tree beyond the one git keeps (a file's executable bit).

Why: a new version may chmod 000 a folder or a file, or make a folder read-only. Git neither
records nor restores such bits (nor any folder's), so without this a rollback would bring the
old content back under the new version's modes, or, run unprivileged, fail on a folder it can no
longer enter. A checkpoint records the files and folders whose bits differ from what git would
give them (few, usually none); a restore first opens up what it must enter, and afterwards puts
every path of the tree back to its recorded bits, or git's default for the rest.

Owners too, where swapguard runs as root (only root can give a file back to its owner): a host
running as another user may replace a file of root's (or chgrp one) in a folder it owns, and
git, which runs as the tree's owner, recreates what it restores as that owner. So a checkpoint
records the owner git would give (`owners <uid>:<gid>`) and every path owned otherwise
(`owner <uid>:<gid> <json path>`); a restore lchowns every path of the tree back, before the
modes (a chown clears set-id bits). A checkpoint without the `owners` line (taken unprivileged,
or before owners were recorded) leaves owners alone.

Every chown and chmod acts on the entry itself (an O_PATH handle opened without following a
symlink), never on a file with other names: a new version may hard-link a file from outside the
tree in place of one of the same content (git sees no change), and a chmod of that name would
reach the file outside. Such a name is written afresh from the checkpoint first. And before a
restore captures the tree, the whole tree is opened to git's user (`open_all`): git passes over
in silence what it cannot read.

The record travels in the checkpoint commit's message, one `mode <octal> <json path>` line each,
so it lives exactly as long as the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from supervisor.code import treepaths
from supervisor.code.gitcmd import Git

log = logging.getLogger(__name__)
_O_PATH: int = getattr(os, "O_PATH", 0) if sys.platform.startswith("linux") else 0

_LINE = re.compile(r"mode ([0-7]{1,5}) (\".*\")")
_OWNER_LINE = re.compile(r"owner ([0-9]{1,10}):([0-9]{1,10}) (\".*\")")
_DEFAULT_OWNER_LINE = re.compile(r"owners ([0-9]{1,10}):([0-9]{1,10})")
_GITLINK = "160000"
_CAP_DAC_OVERRIDE = 1  # capabilities(7)
Modes = dict[str, int]
Owner = tuple[int, int]  # (uid, gid)
Listing = list[tuple[str, str]]  # (git mode, path) of every blob, link and tree of a tree
_WRITTEN = ("040000", "100755", "100644")  # the git modes whose paths get permission bits


def umask() -> int:
    """This process's umask, read without changing it (os.umask would, for every thread)."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status", encoding="ascii") as status:
                for line in status:
                    if line.startswith("Umask:"):
                        return int(line.split()[1], 8)
        except (OSError, ValueError):
            pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def overrides_permissions() -> bool:
    """Whether this process (and so a git it runs as itself) passes every permission check on
    files: CAP_DAC_OVERRIDE in its effective set (root, unless a unit or container dropped it).
    False when it cannot tell."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << _CAP_DAC_OVERRIDE))
    except (OSError, ValueError, IndexError):
        pass
    return False


def default_mode(git_mode: str, mask: int) -> int | None:
    """The bits git gives a path of this git mode when it writes it; None for a link or gitlink."""
    if git_mode == "040000":
        return 0o777 & ~mask
    if git_mode == "100755":
        return 0o777 & ~mask
    if git_mode == "100644":
        return 0o666 & ~mask
    return None


def odd_modes_and_owners(
    root: Path, listing: Listing, mask: int, default: Owner | None
) -> tuple[Modes, dict[str, Owner]]:
    """The paths of `listing` whose bits differ from git's default for them, and (with a
    `default` owner) those owned otherwise. One lstat a path, by string (a tree of 100k files:
    a pathlib object each would cost more than the lstat), for both records at once."""
    modes: Modes = {}
    owners: dict[str, Owner] = {}
    base = os.path.join(root, "")
    lstat, is_link, bits = os.lstat, stat.S_ISLNK, stat.S_IMODE
    defaults = {git_mode: default_mode(git_mode, mask) for git_mode in _WRITTEN}
    for git_mode, path in listing:
        if git_mode == _GITLINK:
            continue
        wanted = defaults.get(git_mode)
        if wanted is None and default is None:
            continue  # a link: no bits of its own, and no owner recorded
        try:
            st = lstat(base + path)
        except OSError:
            continue  # vanished since git listed it
        if wanted is not None and bits(st.st_mode) != wanted and not is_link(st.st_mode):
            modes[path] = bits(st.st_mode)
        if default is not None and (st.st_uid, st.st_gid) != default:
            owners[path] = (st.st_uid, st.st_gid)
    return modes, owners


def to_message(modes: Modes) -> str:
    return "".join(f"mode {mode:o} {json.dumps(path)}\n" for path, mode in sorted(modes.items()))


def from_message(message: str) -> Modes:
    found: Modes = {}
    for line in message.splitlines():
        if match := _LINE.fullmatch(line):
            try:
                path = json.loads(match.group(2))
            except ValueError:
                continue
            if isinstance(path, str):
                found[path] = int(match.group(1), 8)
    return found


def owners_to_message(default: Owner, owners: dict[str, Owner]) -> str:
    lines = [f"owners {default[0]}:{default[1]}\n"]
    lines.extend(f"owner {u}:{g} {json.dumps(path)}\n" for path, (u, g) in sorted(owners.items()))
    return "".join(lines)


def owners_from_message(message: str) -> tuple[Owner | None, dict[str, Owner]]:
    """The default owner (None: owners were not recorded) and the paths owned otherwise."""
    default: Owner | None = None
    found: dict[str, Owner] = {}
    for line in message.splitlines():
        if match := _DEFAULT_OWNER_LINE.fullmatch(line):
            default = (int(match.group(1)), int(match.group(2)))
        elif match := _OWNER_LINE.fullmatch(line):
            try:
                path = json.loads(match.group(3))
            except ValueError:
                continue
            if isinstance(path, str):
                found[path] = (int(match.group(1)), int(match.group(2)))
    return default, found


def differing(
    root: Path,
    listing: Listing,
    modes: Modes,
    mask: int,
    owners: tuple[Owner, dict[str, Owner]] | None,
) -> Listing:
    """The paths of `listing` that look otherwise than recorded (bits: `modes`, else git's
    default; owners: the default and the paths owned otherwise, None to leave owners alone), or
    that have other names: what `put_back_all` must see to. One lstat a path, by string (a tree
    of 100k files: a pathlib object or a pinned handle each would cost more than the lstat)."""
    base = os.path.join(root, "")
    lstat, bits = os.lstat, stat.S_IMODE
    defaults = {git_mode: default_mode(git_mode, mask) for git_mode in _WRITTEN}
    default_owner, owned = owners if owners is not None else ((-1, -1), {})
    odd: Listing = []
    for item in listing:
        git_mode, path = item
        if git_mode == _GITLINK:
            continue
        try:
            st = lstat(base + path)
        except OSError:
            continue  # not there: nothing to give back
        wanted = modes.get(path, defaults.get(git_mode))
        if (
            (wanted is not None and bits(st.st_mode) != wanted)
            or (owners is not None and (st.st_uid, st.st_gid) != owned.get(path, default_owner))
            or (st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode))
        ):
            odd.append(item)
    return odd


def put_back_all(
    git: Git,
    index: Path,
    odd: Listing,
    modes: Modes,
    mask: int,
    owners: tuple[Owner, dict[str, Owner]] | None,
) -> None:
    """After a restore has written the tree, for the `odd` paths (`differing`): each file with
    other names written afresh (`unshare_hard_links`), then each path given back its recorded
    owner (`put_back_owners`, unless `owners` is None), then its recorded bits (`put_back`).
    Each step looks at a path again through a pinned handle before it changes it: what is
    changed is what was checked."""
    if not odd:
        return
    unshare_hard_links(git, index, odd)
    if owners is not None:
        put_back_owners(git.root, odd, *owners)
    put_back(git.root, odd, modes, mask)


def put_back_owners(
    root: Path, listing: Listing, default: Owner, recorded: dict[str, Owner]
) -> list[str]:
    """lchown every path of `listing` to its recorded owner, else `default`; the paths changed.
    Never through a symlink (a link itself is given back its owner), and never a file linked
    elsewhere too (`unshare_hard_links` runs first: one left is skipped, and logged)."""
    changed = []
    for git_mode, path in listing:
        if git_mode == _GITLINK:
            continue
        wanted = recorded.get(path, default)
        with _pinned(root, path) as (target, st, parent):
            if st is None or (st.st_uid, st.st_gid) == wanted or _shared(path, st):
                continue
            if target.startswith("/proc/"):
                os.chown(target, *wanted)  # the pinned entry itself, checked above
            else:
                os.chown(target, *wanted, dir_fd=parent, follow_symlinks=False)
            changed.append(path)
    return changed


def hard_linked(root: Path, listing: Listing) -> list[str]:
    """The files of `listing` that have another name too: a new version may have linked a file
    from outside the tree (one of root's) in place of a file of the same content, which git
    then sees as unchanged and leaves; a chown or chmod of it would reach the file outside."""
    found = []
    for git_mode, path in listing:
        if git_mode in ("100644", "100755"):
            try:
                st = os.lstat(root / path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                found.append(path)
    return found


def unshare_hard_links(git: Git, index: Path, listing: Listing) -> list[str]:
    """Write afresh, from `index` (the restored one), every file of `listing` that has another
    name too: its name is unlinked (the other names keep their content, owner and mode), then
    git writes it as a file of its own. The paths rewritten."""
    linked = hard_linked(git.root, listing)
    gone = [path for path in linked if treepaths.remove(git.root, path)]
    if gone:
        git.out("checkout-index", "-f", "-q", "-z", "--stdin", index=index, stdin="\0".join(gone))
        log.warning("rewrote %d hard-linked file(s) in %s: %s", len(gone), git.root, gone[:5])
    return gone


_PARENT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextmanager
def _pinned(root: Path, path: str) -> Iterator[tuple[str, os.stat_result | None, int | None]]:
    """What to chown or chmod for `path` (relative to `root`), its lstat (None: gone) and the
    folder fd to name it from. Every folder above it is entered by an fd opened with
    O_NOFOLLOW, so a folder swapped for a symlink (by a process of the host's user that outlived
    its tree) leads nowhere: the path counts as gone. On Linux the entry itself is an O_PATH
    handle (never through a symlink), named by /proc/self/fd: what is changed is what was
    checked. Elsewhere, and for a symlink itself (lchown), its name in that folder."""
    parts = PurePosixPath(path).parts
    with contextlib.ExitStack() as stack:
        try:
            if not parts or ".." in parts:
                raise FileNotFoundError(path)
            parent = os.open(root, _PARENT_FLAGS)
            stack.callback(os.close, parent)
            for name in parts[:-1]:
                parent = os.open(name, _PARENT_FLAGS, dir_fd=parent)
                stack.callback(os.close, parent)
            target = parts[-1]
            if _O_PATH:
                fd = os.open(target, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
                stack.callback(os.close, fd)
                found = os.fstat(fd)
                if not stat.S_ISLNK(found.st_mode):
                    target = f"/proc/self/fd/{fd}"
            else:
                found = os.stat(target, dir_fd=parent, follow_symlinks=False)
        except OSError:
            yield path, None, None
            return
        yield target, found, parent


def _shared(path: str, st: os.stat_result) -> bool:
    """A file or link with another name too: never chowned nor chmodded (see `hard_linked`)."""
    if stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1:
        return False
    log.warning("left the owner and mode of %s alone: it has %d names", path, st.st_nlink)
    return True


def open_all(git: Git, skip: Sequence[str]) -> int:
    """Give the owner the right to read every file and to list, enter and change every folder
    of the tree (not `.git`, nor the `skip` paths), so that git, running unprivileged or as the
    tree's owner, sees the whole tree: it passes over in silence what it cannot read, so a
    folder the new version made 0111 would be neither captured nor removed, and a file of mode
    000 would fail every restore. Through file descriptors, never following a symlink. A file
    with another name is never changed: if git's user cannot read it, its name in the tree is
    unlinked (the new version linked it there; the file itself stays where its other names are).
    The modes of the checkpoint's paths are put back afterwards (`put_back`), other paths are
    removed by the restore. How many paths were changed.

    Nothing to do (and no walk of the tree, one stat a path) when git runs as root with
    CAP_DAC_OVERRIDE: no bit stops it from reading, listing or changing anything, and no file
    with another name is ever unlinked for it (it can read them all)."""
    root = git.root
    uid = os.geteuid() if hasattr(os, "geteuid") else -1  # root may change any path
    reader = git.owner.uid if git.owner is not None else uid
    if reader == 0 and overrides_permissions():
        return 0
    skipped = {".git", *skip}
    changed = 0

    def opened(name: str, dir_fd: int | None, bits: int) -> bool:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return False
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            readable = st.st_mode & 0o004 or (st.st_uid == reader and st.st_mode & 0o400)
            if readable or reader == 0:
                return False
            try:
                os.unlink(name, dir_fd=dir_fd)
            except OSError as exc:  # git then fails on it, naming it
                log.warning("could not unlink %s in %s: %s", name, root, exc)
                return False
            log.warning("unlinked %s from %s: a file with other names git cannot read", name, root)
            return True
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            return False
        if st.st_mode & bits == bits or not (uid == 0 or st.st_uid == uid):
            return False
        try:
            os.chmod(name, stat.S_IMODE(st.st_mode) | bits, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as exc:  # a read-only mount, say: git then reports what it cannot read
            log.warning("could not open up %s in %s: %s", name, root, exc)
            return False
        return True

    changed += opened(str(root), None, 0o700)
    for top, dirs, files, top_fd in os.fwalk(root, follow_symlinks=False):
        relative = os.path.relpath(top, root)
        dirs[:] = [d for d in dirs if _joined(relative, d) not in skipped]
        for name in dirs:  # before fwalk enters them
            changed += opened(name, top_fd, 0o700)
        for name in files:
            changed += opened(name, top_fd, 0o400)
    if changed:
        log.info("opened up %d path(s) in %s for the restore", changed, root)
    return changed


def open_up(root: Path, folders: Iterable[str]) -> None:
    """Give the owner back the right to enter and change each folder (top down), so a restore
    whose git runs unprivileged (as swapguard's user, or as the tree's owner when swapguard is
    root) is not stopped by a folder the new version locked. Only folders we may chmod; never
    through a symlink: a path that is not a real folder is left to git, which replaces it."""
    uid = os.geteuid() if hasattr(os, "geteuid") else -1  # root may change any folder
    for rel in sorted(set(folders), key=lambda p: p.count("/")):
        path = root / rel
        try:
            st = os.lstat(path)
        except OSError:
            continue
        mine = uid == 0 or st.st_uid == uid
        if stat.S_ISDIR(st.st_mode) and mine and st.st_mode & 0o700 != 0o700:
            os.chmod(path, stat.S_IMODE(st.st_mode) | 0o700, follow_symlinks=False)


def put_back(root: Path, listing: Listing, recorded: Modes, mask: int) -> list[str]:
    """Set every path of `listing` to its recorded bits, else git's default; the paths changed.
    Files first, then folders deepest first: a folder is closed only once what is below it is
    done. Never through a symlink, never a file with another name too (see `hard_linked`)."""
    changed = []
    defaults = {git_mode: default_mode(git_mode, mask) for git_mode in _WRITTEN}
    folders = sorted((item for item in listing if item[0] == "040000"), key=_depth, reverse=True)
    for git_mode, path in [*(item for item in listing if item[0] != "040000"), *folders]:
        wanted = recorded.get(path, defaults.get(git_mode))
        if wanted is None:
            continue
        with _pinned(root, path) as (target, st, parent):
            if st is None:
                continue
            is_dir = git_mode == "040000"
            kind_ok = stat.S_ISDIR(st.st_mode) if is_dir else stat.S_ISREG(st.st_mode)
            if not kind_ok or stat.S_IMODE(st.st_mode) == wanted or _shared(path, st):
                continue
            if target.startswith("/proc/"):
                os.chmod(target, wanted)  # the pinned entry itself, checked above
            else:  # a file or folder (never a link), named in its pinned folder
                os.chmod(target, wanted, dir_fd=parent)
            changed.append(path)
    return changed


def _depth(item: tuple[str, str]) -> int:
    return item[1].count("/")


def _joined(folder: str, name: str) -> str:
    return name if folder == "." else f"{folder}/{name}"


def folders_of(paths: Iterable[str]) -> Iterator[str]:
    """Every folder above each path (relative, root excluded), once."""
    seen: set[str] = set()
    for path in paths:
        for parent in PurePosixPath(path).parents:
            name = str(parent)
            if name == "." or name in seen:
                continue
            seen.add(name)
            yield name
