"""The cgroup v2 leaf that holds the host's tree, so that `cgroup.kill` empties it at once.

The leaf sits at <our own cgroup>/swapguard/<name>: under our own cgroup so that a service manager's
delegation (systemd's `Delegate=yes`) and its limits cover the host too. Without a writable cgroup2
mount there is no leaf, and `process.host` finds the tree by descent, group and reparenting.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_CGROUP_PARENT = "swapguard"
LEAF_PARENT = _CGROUP_PARENT
"""The folder of our leaves in the hierarchy: /proc/<pid>/cgroup of a member names it."""
_CGROUP_NAME = re.compile(r"[A-Za-z0-9_.-]+")

WAIT_TO_BE_MOVED = 'IFS= read -r word && [ "$word" = moved ] || exit 70; '
"""The start of a /bin/sh stub for a child of another user (host.user), which cannot join our
leaf itself: it waits on stdin until `move_and_release` has moved it in, and only then execs
(so no fork of it escapes). Anything but our word (we died meanwhile) and it ends: what nobody
recorded must not run. What it execs must take stdin from elsewhere (`</dev/null`)."""
_MOVED = b"moved\n"


@dataclass(frozen=True, slots=True)
class CgroupLeaf:
    """A cgroup v2 leaf holding the host's tree, so that `cgroup.kill` empties it at once."""

    path: Path
    member_line: str
    """What /proc/<pid>/cgroup of a member says ("0::/…/swapguard/<name>"), as we read it."""

    @classmethod
    def create(cls, name: str) -> CgroupLeaf | None:
        """<our own cgroup>/swapguard/<name>, reused if it exists (an adopted host's leaf is found
        again after a supervisor restart); None without a writable cgroup2 mount.

        Under our own cgroup so that a service manager's delegation (systemd's `Delegate=yes`)
        and its limits cover the host too; at the mount's top only when we sit at the root."""
        if not _CGROUP_NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError(f"cgroup leaf name must be letters, digits, '_', '.', '-': {name!r}")
        mount = _cgroup2_mount()
        if mount is None:
            return None
        relative = f"{_own_cgroup().rstrip('/')}/{_CGROUP_PARENT}/{name}"
        leaf = mount / relative.lstrip("/")
        try:
            leaf.mkdir(parents=True, exist_ok=True)
            if not os.access(leaf / "cgroup.procs", os.W_OK):
                raise PermissionError("cgroup.procs is not writable")
        except OSError as exc:
            log.info("no cgroup for the host (%s): %s", leaf, exc)
            return None
        return cls(leaf, f"0::{relative}")

    def pids(self) -> list[int]:
        try:
            return [int(line) for line in (self.path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def holds(self, pid: int) -> bool:
        """Is `pid` a member now? One read of its /proc/<pid>/cgroup: with a pidfd opened on it
        first, this says the pinned process is ours (a pid read from cgroup.procs may have been
        recycled since)."""
        try:
            fd = os.open(f"/proc/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            text = os.read(fd, 65536).decode(errors="replace")
        except OSError:
            return False
        finally:
            os.close(fd)
        return self.member_line in text.splitlines()

    def add(self, pid: int) -> bool:
        """Move `pid` into the leaf, from outside (a child that dropped its privileges before
        exec cannot move itself); False when the kernel refuses."""
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            log.warning("cannot move pid %d into %s: %s", pid, self.path, exc)
            return False
        return True

    def move_and_release(self, popen: subprocess.Popen[bytes]) -> None:
        """Move a child waiting in `WAIT_TO_BE_MOVED` into the leaf, then let it go on; its stdin
        (our end) is closed and dropped."""
        self.add(popen.pid)  # refused: logged, and it runs outside (as the stub's fallback does)
        if popen.stdin is None:
            return
        try:
            popen.stdin.write(_MOVED)
            popen.stdin.close()
        except OSError as exc:  # it died already: its exit is seen as any other
            log.debug("pid %d is gone before it was released: %s", popen.pid, exc)
        popen.stdin = None

    def kill(self) -> bool:
        """SIGKILL every member at once (Linux >= 5.14); False where cgroup.kill is missing."""
        try:
            (self.path / "cgroup.kill").write_text("1")
        except OSError:
            return False
        return True

    def remove(self) -> None:
        """rmdir the leaf once it is empty; never raises (a busy leaf is simply kept)."""
        try:
            self.path.rmdir()
        except OSError as exc:
            log.debug("cgroup %s kept: %s", self.path, exc)


def _own_cgroup() -> str:
    """Our path in the v2 hierarchy ("0::/system.slice/swapguard.service"), "/" when unknown."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return "/"
    path = next((line[3:] for line in lines if line.startswith("0::")), "/")
    if path.endswith(f"/{_CGROUP_PARENT}") or f"/{_CGROUP_PARENT}/" in path:
        return path.split(f"/{_CGROUP_PARENT}", 1)[0] or "/"  # we run inside a host's leaf
    return path


def _cgroup2_mount() -> Path | None:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        before, sep, after = line.partition(" - ")
        fields = before.split()
        if sep and after.split()[:1] == ["cgroup2"] and len(fields) > 4:
            return Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
    return None
