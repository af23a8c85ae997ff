"""What `swapguard run` refuses before it starts anything, asked by `swapguard check` as well.

Why it exists: `check` passed configs that `run` then refused (a socket path too long once bound
under its temporary name, an unknown user, a code root that is not a git work tree, a state dir
another user controls), or that `run` refused half-way, leaving a cgroup leaf behind. Each rule
that needs the machine (users, groups, files, git) is asked here, once, by both commands, so
they refuse alike and with the same message. Rules that need only the file (socket path lengths)
are in `config.schema` already.
"""

from __future__ import annotations

import grp
import os
import pwd

from supervisor.code.checkpoint import CodeTree
from supervisor.config.schema import Config
from supervisor.control.socketfile import socket_folder_problem, socket_group_id
from supervisor.errors import CheckpointError, ConfigError
from supervisor.process import identity
from supervisor.state.lock import state_dir_problem


def user_id(name: str, *, key: str) -> int:
    """A uid from a name or a number; ConfigError naming the key for an unknown user."""
    try:
        return int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ConfigError(f"unknown user {name!r}", key=key) from None


def group_id(name: str, *, key: str) -> int:
    """A gid from a name or a number; ConfigError naming the key for an unknown group."""
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"unknown group {name!r}", key=key) from None


def advice(config: Config) -> list[str]:
    """What `check` and `init` point out, though `run` accepts it: untracked files that look
    generated but are code to swapguard (each change there is an undeclared change)."""
    tree = CodeTree(
        config.code.root,
        extra_paths=config.code.extra_paths,
        exclude=config.non_code_paths(),
        ignore=config.non_code_patterns(),
    )
    try:
        found = [p for p in tree.looks_generated() if p.rstrip("/") not in tree.extra_paths]
    except CheckpointError:
        return []  # not a work tree: preflight says so
    if not found:
        return []
    shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
    return [
        f"untracked and not ignored, but looks generated: {shown} (in {config.code.root}). "
        "swapguard counts it as code: every change there is an undeclared change, and every "
        "checkpoint copies it. If it is not code, list it in .gitignore or in code.ignore"
    ]


def preflight(config: Config) -> None:
    """Raise the first reason `run` would refuse this config (a ConfigError naming the key)."""
    if (problem := state_dir_problem(config.state.dir)) is not None:
        raise ConfigError(problem, key="state.dir")
    user = identity.resolve(config.host.user, config.host.group)
    if user is not None:
        _refuse_what_the_host_could_replace(config, user)
    if user is not None and (blocked := user.blocked_at(config.state.dir)) is not None:
        message = (
            f"the host's user {user.name!r} cannot pass through {blocked} to reach its sockets "
            f"in {config.host_socket_dir()}; choose a state.dir below folders it may enter"
        )
        raise ConfigError(message, key="state.dir")
    for name in config.control.allow_users:
        user_id(name, key="control.allow_users")
    for name in config.control.allow_groups:
        group_id(name, key="control.allow_groups")
    socket_group_id(config.control.group)
    if (problem := socket_folder_problem(config.control.socket)) is not None:
        raise ConfigError(problem, key="control.socket")
    try:
        CodeTree(config.code.root).check_work_tree()
    except CheckpointError as exc:
        raise ConfigError(exc.message, key="code.root") from None


def _refuse_what_the_host_could_replace(config: Config, user: identity.HostUser) -> None:
    """With host.user, what swapguard reads or writes as root must be out of the host's reach:
    a config, state dir or control socket folder the host could swap for its own would let it
    name the hooks (run as root), drop host.user, or forge the swap record. Nothing to guard
    when swapguard runs as that very user (unprivileged, naming its own)."""
    if user.uid == os.geteuid():
        return
    places = (
        ("config file", config.source, "host.user", "/etc/swapguard/swapguard.toml"),
        ("state.dir", config.state.dir, "state.dir", "/var/lib/swapguard"),
        ("control socket's folder", config.control.socket.parent, "control.socket",
         "/run/swapguard"),
    )  # fmt: skip
    for what, path, key, example in places:
        if (found := user.may_replace(path)) is not None:
            message = (
                f"the {what} {path} is within reach of the host's user {user.name!r}: it may "
                f"write or replace {found}, and so hand itself what swapguard does as root. "
                f"Put it where only root may write (e.g. {example})"
            )
            raise ConfigError(message, key=key)
    output = config.host.output
    rotated = output is not None and config.host.output_max_bytes > 0
    if output is not None and rotated and output.parent.is_dir() and not user.may_write(
        output.parent
    ):
        message = (
            f"the output's logger runs as the host's user {user.name!r} and rotates in "
            f"{output.parent}, which that user may not write; give it a folder of its own "
            f"(e.g. chown {user.name} {output.parent})"
        )
        raise ConfigError(message, key="host.output")
