"""The notify socket the host talks to (`NOTIFY_SOCKET`).

`NotifyServer` owns the receiving socket and nothing else: it neither parses nor decides who may
speak. It hands the daemon's event loop raw `Datagram`s with the sender's credentials as the kernel
checked them; the daemon drops those from outside the host's tree. On Linux a unix datagram
receiver loses nothing: once `net.unix.max_dgram_qlen` datagrams queue, a blocking sender waits
(a non-blocking one gets EAGAIN). So a flooding host slows itself down, and `drain(limit)` keeps
it from starving the rest of the loop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import struct
import sys
from pathlib import Path
from typing import NamedTuple

from supervisor import errors
from supervisor.config.schema import socket_path_problem
from supervisor.control import peers, socketfile
from supervisor.control.routes import Peer
from supervisor.core.notifyproto import MAX_DATAGRAM_BYTES

log = logging.getLogger(__name__)

RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024
_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_PIDFD = struct.Struct("i")
# One byte over the cap, so an oversized datagram reaches the parser still oversized.
_RECEIVE_BYTES = MAX_DATAGRAM_BYTES + 1
# Room for credentials and the sender's pidfd only: the kernel closes the descriptors a sender
# passes (FDSTORE=1) that do not fit, and those that do are closed on receipt.
_ANCILLARY_BYTES = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(_PIDFD.size)
_SO_RCVBUFFORCE = 33 if sys.platform.startswith("linux") else None  # not exported by Python
_HAS_PASSCRED = hasattr(socket, "SO_PASSCRED") and hasattr(socket, "SCM_CREDENTIALS")


class Datagram(NamedTuple):
    """One received datagram and its sender as the kernel saw it (None where the OS cannot tell).

    A named tuple, not a frozen dataclass: one is made per datagram, and a frozen dataclass
    costs four times as much to make."""

    payload: bytes
    pid: int | None
    uid: int | None
    gid: int | None
    # the sender's start time, pinned at receipt (`control.peers`); None where nothing pins
    start: float | None = None
    pinned: bool = True  # False: the sender's pid already named another process, or none
    # the sender's live pin, where the kernel named the very process (SCM_PIDFD): kept by the
    # server for its next datagrams; a check while it is alive needs no look at start times
    sender: peers.PeerPin | None = None


class NotifyServer:
    """A bound, non-blocking unix datagram socket that the daemon's event loop drains."""

    def __init__(
        self, path: Path, inherited: socket.socket | None = None, *, staging_dir: Path | None = None
    ) -> None:
        """Bind at `path`, or take `inherited` (from our manager's fd store) if it is bound there:
        hosts that connected to it once keep sending to the same socket. `staging_dir`: `path`'s
        folder is the host's (host.user), so the socket is bound there and renamed in
        (`socketfile.bind_into`)."""
        self.path = Path(path).absolute()
        self._staging_dir = staging_dir
        _check_socket_path_length(str(self.path))
        self.inherited = inherited is not None and _bound_at(inherited, self.path, staging_dir)
        if self.inherited:
            assert inherited is not None
            self._sock = inherited
        else:
            if inherited is not None:
                log.warning("the stored notify socket is not bound at %s: binding anew", self.path)
                inherited.close()
            self._sock = self._bind()
        self._senders = peers.KnownSenders()
        try:
            self._inode = os.stat(self.path).st_ino
            if _HAS_PASSCRED:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                if peers.SO_PASSPIDFD is not None:  # Linux >= 6.5: a pidfd of each sender
                    with contextlib.suppress(OSError):
                        self._sock.setsockopt(socket.SOL_SOCKET, peers.SO_PASSPIDFD, 1)
            _enlarge_receive_buffer(self._sock)
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            self.path.unlink(missing_ok=True)
            raise
        log.debug("notify socket bound at %s", self.path)

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if self._staging_dir is not None:
            try:
                socketfile.bind_into(sock, self.path, self._staging_dir, 0o666)
            except BaseException:
                sock.close()
                raise
            return sock
        _remove_stale_socket(self.path)
        try:
            sock.bind(str(self.path))
            # Anyone local may send; the daemon keeps only datagrams from the host's tree.
            os.chmod(self.path, 0o666)
        except BaseException:
            sock.close()
            raise
        return sock

    @property
    def bound_socket(self) -> socket.socket:
        """The bound socket itself, for our manager's fd store."""
        return self._sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self, limit: int = 1024) -> list[Datagram]:
        """Read up to `limit` pending datagrams without blocking; [] when none are waiting.

        The limit keeps one flooding host from starving the rest of the event loop.
        """
        if limit < 1:
            raise ValueError(f"drain limit must be at least 1, got {limit}")
        received: list[Datagram] = []
        while len(received) < limit:
            try:
                received.append(self._receive_one())
            except BlockingIOError:
                break
        return received

    def close(self) -> None:
        """Close the socket and remove its file, unless another server has since taken the path."""
        if self._sock.fileno() == -1:
            return
        self._senders.close()
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()

    def __enter__(self) -> NotifyServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _receive_one(self) -> Datagram:
        if not _HAS_PASSCRED:
            return Datagram(self._sock.recv(_RECEIVE_BYTES), None, None, None)
        payload, ancillary, _flags, _address = self._sock.recvmsg(_RECEIVE_BYTES, _ANCILLARY_BYTES)
        credentials: bytes | None = None
        pidfd: int | None = None
        for level, kind, data in ancillary:
            if level != socket.SOL_SOCKET:
                continue
            if kind == socket.SCM_CREDENTIALS:
                credentials = data
            elif kind == peers.SCM_PIDFD and len(data) >= _PIDFD.size:
                pidfd = _PIDFD.unpack_from(data)[0]
            elif kind == socket.SCM_RIGHTS:  # passed fds that fit in beside: never kept
                usable = len(data) - len(data) % _PIDFD.size
                for (fd,) in _PIDFD.iter_unpack(data[:usable]):
                    with contextlib.suppress(OSError):
                        os.close(fd)
        if credentials is None:
            if pidfd is not None:
                os.close(pidfd)
            return Datagram(payload, None, None, None)
        pid, uid, gid = _UCRED.unpack_from(credentials)
        if pidfd is not None and not peers.use_peer_pidfd:
            os.close(pidfd)  # tests exercise the fallback
            pidfd = None
        if pidfd is not None and (known := self._senders.known(pid)) is not None:
            os.close(pidfd)  # the hot path: the very sending process, alive and pinned before
            return Datagram(payload, pid, uid, gid, known.peer.start, True, known)
        return self._pin_sender(payload, Peer(pid, uid, gid), pidfd)

    def _pin_sender(self, payload: bytes, sender: Peer, pidfd: int | None) -> Datagram:
        """A sender not known yet (or one without pidfd): pin it by a look at its process."""
        received = peers.now()  # no later than this the sender existed: the moment of receipt
        if pidfd is not None:
            pin, kept = self._senders.pin(pidfd, sender, received)
            if kept:  # the very sending process, alive: its next datagrams cost no psutil
                peer = pin.peer
                return Datagram(payload, peer.pid, sender.uid, sender.gid, peer.start, True, pin)
        else:
            pin = peers.pin_process(sender, None, received, allow_exited=True)
        pin.close()  # judged by the start time from here: a datagram outlives its sender
        peer = pin.peer
        return Datagram(payload, peer.pid, peer.uid, peer.gid, peer.start, pin.pinned)


def _check_socket_path_length(path: str) -> None:
    if (problem := socket_path_problem(Path(path))) is not None:
        problem = f"its notify socket {problem}; use a shorter state.dir"
        raise errors.ConfigError(problem, key="state.dir")


def _bound_at(sock: socket.socket, path: Path, staging_dir: Path | None) -> bool:
    """A datagram socket bound at `path` (or renamed there), whose file is still there to be
    connected to."""
    try:
        return (
            sock.family == socket.AF_UNIX
            and sock.type == socket.SOCK_DGRAM
            and socketfile.bound_as(sock, path, staging_dir)
        )
    except OSError:
        return False


def _remove_stale_socket(path: Path) -> None:
    """A socket left by a crashed swapguard blocks bind(); anything else at the path is not ours."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "not a socket, refusing to replace it", str(path))
    path.unlink(missing_ok=True)


def _enlarge_receive_buffer(sock: socket.socket) -> None:
    """Let bursts queue in the kernel; as root, FORCE goes past net.core.rmem_max.

    On Linux this is a byte budget only: the count of queued datagrams is capped by
    net.unix.max_dgram_qlen (10 here), after which senders block or get EAGAIN.
    """
    for option in (_SO_RCVBUFFORCE, socket.SO_RCVBUF):
        if option is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, RECEIVE_BUFFER_BYTES)
            return
        except OSError as exc:
            log.debug("notify socket: receive buffer option %s refused: %s", option, exc)
