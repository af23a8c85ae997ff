"""The control socket's file: the folder it is bound in, its group, a stale one left by a crash.

Why apart from `control.server`: these are decisions about a path on disk, asked by `swapguard
check` (through `daemon.preflight`) as well as by the server before it binds, with the same
messages; the server owns the socket itself and the HTTP spoken on it.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import re
import socket
import stat
import time
from pathlib import Path

from supervisor import errors
from supervisor.config.schema import staging_socket_path

logger = logging.getLogger(__name__)
_STAGED_NAME = re.compile(r"\.[0-9a-f]{8}\.sock~")  # staging_socket_path's names


class ControlSocketInUse(errors.SwapguardError):
    """A live swapguard already answers on the control socket path."""

    code = "socket_in_use"


def socket_group_id(group: str) -> int:
    """The control socket's group (-1: keep ours); ConfigError naming an unknown one."""
    if not group:
        return -1
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        message = f"unknown group {group!r} for the control socket"
        raise errors.ConfigError(message, key="control.group") from None


def socket_folder_problem(path: Path) -> str | None:
    """Why the control socket's folder is unsafe to bind in, or None: where others may rename
    files (writable by group or others, without the sticky bit), one could swap the socket file
    for a symlink between its bind and its chmod, and have swapguard chmod a file of theirs."""
    folder = path.parent
    try:
        info = os.stat(folder)
    except OSError:
        return None  # missing: bind names it
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        mode = stat.S_IMODE(info.st_mode)
        return (
            f"the control socket's folder {folder} is writable by group or others without the "
            f"sticky bit (mode {mode:04o}); choose another control.socket or chmod go-w it"
        )
    return None


def clear_stale_socket(path: Path) -> None:
    """Remove a socket file nobody answers on; refuse to touch a live one or a non-socket."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            message = f"{path} exists and is not a socket; refusing to replace it"
            raise errors.ConfigError(message, key="control.socket")
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            logger.info("removing stale control socket %s", path)
            path.unlink(missing_ok=True)
            return
        except TimeoutError:
            pass  # a listener with a full backlog is alive too
        except OSError as err:
            message = f"cannot check the existing socket {path}: {err.strerror or err}"
            raise errors.ConfigError(message, key="control.socket") from None
    raise ControlSocketInUse(f"another swapguard is answering on {path}")


def bind_into(sock: socket.socket, path: Path, staging_dir: Path, mode: int) -> None:
    """Bind `sock` at `path` in a folder somebody else owns (the host's, see
    `Config.host_socket_dir`): bound and chmodded under a temporary name in `staging_dir` (ours
    alone), then renamed into place. Nothing at `path` is followed or probed: the rename replaces
    whatever the folder's owner left there (a stale socket, a file, a symlink); only one
    swapguard holds the state dir, so no live one is ever replaced. A folder there, which a
    rename cannot replace, is renamed aside (`_move_aside`): an obstacle the host left must not
    keep swapguard from starting, and so from rolling back a swap in flight."""
    staging = staging_dir / staging_socket_path(path).name
    staging.unlink(missing_ok=True)
    try:
        sock.bind(str(staging))
        os.chmod(staging, mode)
        for attempt in range(_OBSTACLE_TRIES):
            try:
                os.replace(staging, path)
                return
            except IsADirectoryError:
                if attempt == _OBSTACLE_TRIES - 1:
                    raise
                _move_aside(path)
    finally:
        staging.unlink(missing_ok=True)


_OBSTACLE_TRIES = 4


def _move_aside(path: Path) -> None:
    """Rename the folder at `path` to `.obstacle-<ns>` beside it, in the same (host's) folder:
    a rename follows nothing and deletes nothing (its owner may look at it, and remove it)."""
    for _ in range(_OBSTACLE_TRIES):
        aside = path.with_name(f".obstacle-{time.time_ns()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return  # gone already: the next rename tries again
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                continue  # that name is taken (planted?): another one
            raise
        logger.warning("a folder was where the socket %s goes: moved it aside to %s", path, aside)
        return


def bound_as(sock: socket.socket, path: Path, staging_dir: Path | None = None) -> bool:
    """`sock` was bound at `path`, or under a temporary name beside it or in `staging_dir` and
    renamed to `path` (`staging_socket_path`, `bind_into`), and a socket file is there."""
    try:
        bound = Path(sock.getsockname())
        staged = _STAGED_NAME.fullmatch(bound.name) is not None
        return (
            (bound == path or (staged and bound.parent in (path.parent, staging_dir)))
            and stat.S_ISSOCK(os.lstat(path).st_mode)
        )
    except (OSError, TypeError):
        return False


def listening_at(sock: socket.socket, path: Path, staging_dir: Path | None = None) -> bool:
    """A unix stream socket that listens, bound at `path` (or under the temporary name it was
    first bound at beside it or in `staging_dir`, then renamed: see `staging_socket_path`,
    `bind_into`), whose file is there."""
    try:
        return (
            bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
            and sock.family == socket.AF_UNIX
            and sock.type == socket.SOCK_STREAM
            and bound_as(sock, path, staging_dir)
        )
    except (OSError, TypeError):
        return False
