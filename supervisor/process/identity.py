"""Whom the host runs as: `host.user` and `host.group` resolved against the user database.

Why a module of its own: `swapguard check` (through `daemon.preflight`) and the spawn path must
read the same names the same way and refuse alike. The user is looked up as a login would
(supervisord's `user=`, systemd's `User=`): the uid, the primary group unless `host.group` names
another, the supplementary groups of the group database (initgroups), and HOME, USER, LOGNAME and
SHELL. A numeric uid without a passwd entry is accepted only with an explicit `host.group` (there
is no primary group to take), and gets no supplementary groups and HOME=/.

Only root may run the host as somebody else; swapguard running unprivileged may name its own
user and group (nothing is switched; HOME and the rest are still set), and anything else is a
config error at start, not a failed spawn at every restart.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.errors import ConfigError


@dataclass(frozen=True, slots=True)
class HostUser:
    """A resolved `host.user`: ids for the spawn, and the login's variables for its environment."""

    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary, as initgroups would set them
    name: str
    home: str
    shell: str

    def popen_args(self) -> dict[str, Any]:
        """subprocess's `user`, `group` and `extra_groups`, or nothing when no switch is needed.
        (They cost the fast vfork: CPython forks in full to change ids.)"""
        if os.geteuid() != 0:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def blocked_at(self, folder: Path) -> Path | None:
        """The first folder on the way to `folder` (itself excluded) this user may not pass
        through, by the permission bits (ACLs are not read); None when the way is open."""
        for parent in reversed(Path(folder).parents):
            try:
                info = os.stat(parent)
            except OSError:
                return None  # missing: created by swapguard, 0755
            if self.uid == 0:
                continue
            if info.st_uid == self.uid:
                bit = stat.S_IXUSR
            elif info.st_gid == self.gid or info.st_gid in self.groups:
                bit = stat.S_IXGRP
            else:
                bit = stat.S_IXOTH
            if not info.st_mode & bit:
                return parent
        return None

    def may_replace(self, path: Path) -> Path | None:
        """The first of `path` and the folders above it up to / that this user could write, or
        in which it could rename or replace the next one on the way; None when none. Root reads
        these as root (the config, state.dir, the control socket's folder): one the host could
        swap for its own (`mv .swapguard x && mkdir .swapguard`) would hand it root.

        Writable: owned by the user (it may chmod), or g+w for one of its groups, or o+w. In a
        sticky writable folder (/tmp) the user may replace only entries it owns, so the next
        one on the way is safe there when neither it nor the folder is the user's. A missing
        entry in a writable folder is not safe (the host could make it first). Symlinks on the
        way are checked where they are, and their targets too. By the mode bits (no ACLs)."""
        if self.uid == 0:
            return None
        literal = Path(os.path.abspath(path))
        for chain in dict.fromkeys((literal, Path(os.path.realpath(literal)))):
            if (found := self._replaceable_on(chain)) is not None:
                return found
        return None

    def _replaceable_on(self, path: Path) -> Path | None:
        nodes = [*reversed(path.parents), path]
        infos: list[os.stat_result | None] = []
        for node in nodes:
            try:
                infos.append(os.lstat(node))
            except OSError:
                infos.append(None)
        for index, (node, info) in enumerate(zip(nodes, infos, strict=True)):
            if info is None:
                return None  # missing, and its folder was safe: swapguard makes it
            if not self._writes(info):
                continue
            if index == len(nodes) - 1:
                return node
            child = infos[index + 1]
            sticky_safe = (
                info.st_mode & stat.S_ISVTX
                and info.st_uid != self.uid
                and child is not None
                and child.st_uid != self.uid
            )
            if not sticky_safe:
                return node
        return None

    def may_write(self, path: Path) -> bool:
        """This user may write (or chmod) `path` (followed); False when it is missing."""
        try:
            return self.uid == 0 or self._writes(os.stat(path))
        except OSError:
            return False

    def _writes(self, info: os.stat_result) -> bool:
        """This user may write (or chmod) the file or folder `info` is of."""
        if stat.S_ISLNK(info.st_mode):
            return False  # a link cannot be changed, only replaced in its (checked) folder
        if info.st_uid == self.uid:
            return True
        if info.st_gid in (self.gid, *self.groups) and info.st_mode & stat.S_IWGRP:
            return True
        return bool(info.st_mode & stat.S_IWOTH)

    def login_env(self) -> dict[str, str]:
        """HOME, USER, LOGNAME and SHELL, as login(1) sets them."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name, "SHELL": self.shell}


def resolve(user: str, group: str = "") -> HostUser | None:
    """`host.user`/`host.group` as a HostUser, None when `user` is empty; a ConfigError naming
    the key for an unknown user or group, or a switch this process may not make."""
    if not user:
        return None
    entry = _passwd(user)
    if entry is None:
        if not user.isdigit():
            raise ConfigError(f"unknown user {user!r} (not in the user database)", key="host.user")
        if not group:
            message = f"uid {user} has no entry in the user database: set host.group as well"
            raise ConfigError(message, key="host.user")
        uid, name, home, shell, primary = int(user), user, "/", "/bin/sh", None
    else:
        uid, name, home, shell, primary = (
            entry.pw_uid, entry.pw_name, entry.pw_dir or "/", entry.pw_shell or "/bin/sh",
            entry.pw_gid,
        )  # fmt: skip
    gid = _group_id(group) if group else primary
    assert gid is not None
    groups: tuple[int, ...] = ()
    if entry is not None:
        groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, gid))))
    found = HostUser(uid, gid, groups, name, home, shell)
    _check_allowed(found, group)
    return found


def _passwd(user: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError, ValueError):
        return None


def _group_id(group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"unknown group {group!r} (not in the group database)",
                          key="host.group") from None  # fmt: skip


def _check_allowed(found: HostUser, group: str) -> None:
    """Unprivileged, swapguard can start the host only as itself (and in its own groups)."""
    me = os.geteuid()
    if me == 0:
        return
    if found.uid != me:
        message = (
            f"running the host as {found.name!r} (uid {found.uid}) needs swapguard to run as "
            f"root; it runs as uid {me}: start it as root, or remove host.user"
        )
        raise ConfigError(message, key="host.user")
    if group and found.gid != os.getegid():
        message = (
            f"swapguard (uid {me}, not root) runs in group {os.getegid()}, not {group!r} "
            f"(gid {found.gid}), and cannot change it: start it as root, or remove host.group"
        )
        raise ConfigError(message, key="host.group")
