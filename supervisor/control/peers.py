"""Who is on the other end of a control connection or a notify datagram, pinned to the process.

Why it exists: the kernel reports a peer's pid, but a pid is a number that is handed out again once
its process is gone. A reader that connects, passes the connection to a child and exits could
otherwise wait for a process of the host's tree to get its old pid, and write as that process.
So a peer is pinned while it is surely alive: a pidfd for the very process (SO_PEERPIDFD, or
SCM_PIDFD for a datagram, on Linux >= 6.5), else `pidfd_open` of the reported pid, accepted only if
that process started before the connection was accepted (a later one cannot be the peer). The pin
keeps the process's start time; a write right is judged against the pinned process and ends with
it (`PeerPin.alive`).

Without pidfd (macOS) the start time alone tells a later process under the peer's pid apart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import sys
from collections import OrderedDict

from supervisor.control.routes import Peer
from supervisor.process.proctree import (
    has_exited,
    open_pidfd,
    proc_info,
    started_at_uptime,
    uptime,
)

logger = logging.getLogger(__name__)

_LINUX = sys.platform.startswith("linux")
SO_PEERPIDFD = 77 if _LINUX else None  # not exported by Python 3.11's socket module
SO_PASSPIDFD = 76 if _LINUX else None
SCM_PIDFD = 4 if _LINUX else None
_UCRED = "iII"  # struct ucred: pid, uid, gid (Linux)
_XUCRED = "IIh16I"  # struct xucred: version, uid, ngroups, groups[16] (macOS, FreeBSD)
use_peer_pidfd = SO_PEERPIDFD is not None  # tests turn it off to exercise the fallback
START_ROUNDING_S = 0.01
"""Start times count in clock ticks (10 ms): one tick of slack before a process counts as
started after the moment it was seen."""


def peer_credentials(sock: socket.socket) -> Peer:
    """The connecting process's pid/uid/gid from the kernel; Nones where the OS cannot say."""
    try:
        if (so_peercred := getattr(socket, "SO_PEERCRED", None)) is not None:
            raw = sock.getsockopt(socket.SOL_SOCKET, so_peercred, struct.calcsize(_UCRED))
            return Peer(*struct.unpack(_UCRED, raw))
        if (local_peercred := getattr(socket, "LOCAL_PEERCRED", None)) is not None:
            sol_local = getattr(socket, "SOL_LOCAL", 0)
            raw = sock.getsockopt(sol_local, local_peercred, struct.calcsize(_XUCRED))
            _version, uid, ngroups, *groups = struct.unpack(_XUCRED, raw)
            pid = None
            if (local_peerpid := getattr(socket, "LOCAL_PEERPID", None)) is not None:
                pid = struct.unpack("i", sock.getsockopt(sol_local, local_peerpid, 4))[0]
            return Peer(pid, uid, groups[0] if ngroups > 0 else None)
    except (OSError, struct.error) as err:
        logger.debug("peer credentials unavailable: %s", err)
    return Peer(None, None, None)


class PeerPin:
    """A peer and, where the OS allows, a pidfd on its process; `alive` is false for good once
    that process has exited (or when it could not be pinned at all)."""

    def __init__(self, peer: Peer, pidfd: int | None, *, pinned: bool) -> None:
        self.peer = peer
        self._pidfd = pidfd
        self._pinned = pinned  # False: the process was gone, or was not the peer, at accept

    @property
    def pinned(self) -> bool:
        """Was the peer's process found, and found to be the peer, when it was pinned?"""
        return self._pinned

    def alive(self) -> bool:
        if not self._pinned:
            return False
        if self._pidfd is None:
            return True  # nothing to pin with here: the peer is taken as reported
        return not has_exited(self._pidfd)

    def close(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None

    @property
    def holds_process(self) -> bool:
        """Pinned by a pidfd still open (not a start time alone, nor nothing)."""
        return self._pinned and self._pidfd is not None

    def retire(self) -> None:
        """Close it for good: from now on it vouches for nothing (`alive` is False)."""
        self.close()
        self._pinned = False

    def describe(self) -> str:
        return f"pid {self.peer.pid} uid {self.peer.uid}"


def pin_connection(sock: socket.socket) -> PeerPin:
    """Pin the process at the other end of an accepted connection (call right after accept)."""
    accepted = now()
    peer = peer_credentials(sock)
    exact = None
    if use_peer_pidfd and SO_PEERPIDFD is not None and peer.pid is not None:
        with contextlib.suppress(OSError):
            exact = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    return pin_process(peer, exact, accepted)


def pin_process(
    peer: Peer, exact_pidfd: int | None, seen_at: float | None, *, allow_exited: bool = False
) -> PeerPin:
    """Pin `peer` given the kernel's own pidfd for it (exact) or none; `seen_at` is a moment
    (`now`, seconds since boot) by which the peer surely existed (one started later is a
    stranger). Takes ownership of `exact_pidfd`. `allow_exited`: a sender that exited but is not
    reaped yet (a zombie keeps its pid) is still judged, by its start time (a datagram outlives
    its sender)."""
    if peer.pid is None or peer.pid <= 0:
        if exact_pidfd is not None:
            os.close(exact_pidfd)
        return PeerPin(peer, None, pinned=peer.pid is None)
    pidfd = exact_pidfd if exact_pidfd is not None else open_pidfd(peer.pid)
    info = proc_info(peer.pid)
    pin = PeerPin(peer, pidfd, pinned=True)
    if info is None:
        return _unpinned(pin, "gone before it could be pinned")
    if info.zombie or not pin.alive():
        if not (allow_exited and info.zombie):
            return _unpinned(pin, "gone before it could be pinned")
        pin.close()  # judged by its start time alone from here
    started = started_at_uptime(info)
    if exact_pidfd is None and seen_at is not None and started > seen_at + START_ROUNDING_S:
        return _unpinned(pin, "reused by a later process")
    # without any pidfd (a kernel before 5.3) the start time alone tells a later process apart
    pinned = Peer(peer.pid, peer.uid, peer.gid, start=info.start)
    return PeerPin(pinned, pin._pidfd, pinned=True)


def _unpinned(pin: PeerPin, why: str) -> PeerPin:
    logger.debug("peer %s not pinned: its pid was %s", pin.describe(), why)
    pin.close()
    return PeerPin(pin.peer, None, pinned=False)


def started_as_pinned(peer: Peer) -> bool:
    """Does `peer.pid` still name the process pinned with `peer.start`? (Ask after a decision
    about the pid: a later process under that number has a later start.)"""
    if peer.pid is None or peer.start is None:
        return peer.pid is None
    info = proc_info(peer.pid)
    return info is not None and info.start == peer.start


def now() -> float:
    """Now, in seconds since boot: a process that started after this moment is not the peer that
    was seen at it (`pin_process`'s `seen_at`)."""
    return uptime()


class KnownSenders:
    """Notify senders pinned before, by the identity of the kernel's pidfd for them: a heartbeat
    from a known sender costs an fstat and a poll, not a look at its process (a flood sends
    thousands a second). The identity is the pidfd's inode on pidfs (Linux >= 6.9), unique to one
    process for the life of the boot; where pidfds share an inode, nothing is kept. Each entry
    holds a pin (one fd); bounded, the oldest retired first."""

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._pins: OrderedDict[int, PeerPin] = OrderedDict()
        self._usable: bool | None = None

    def pin(self, pidfd: int, sender: Peer, seen_at: float) -> tuple[PeerPin, bool]:
        """Pin the sender behind `pidfd` (the kernel's own, taken) as `pin_process` would for a
        datagram, and whether the pin is kept here (alive, for the sender's next datagrams): a
        pin not kept is the caller's to close."""
        identity = self._identity(pidfd)
        known = self._pins.get(identity) if identity is not None else None
        if known is not None and known.peer.pid == sender.pid and known.alive():
            os.close(pidfd)
            assert identity is not None  # `known` was found under it
            self._pins.move_to_end(identity)
            return known, True
        pin = pin_process(sender, pidfd, seen_at, allow_exited=True)
        if identity is None or not pin.holds_process:
            return pin, False
        if (stale := self._pins.pop(identity, None)) is not None:
            stale.retire()
        for gone in [key for key, kept in self._pins.items() if not kept.alive()]:
            self._pins.pop(gone).retire()  # a new sender: the dead ones' fds go now, not later
        self._pins[identity] = pin
        while len(self._pins) > self._size:
            self._pins.popitem(last=False)[1].retire()
        return pin, True

    def _identity(self, pidfd: int) -> int | None:
        if not self._identities_are_unique():
            return None
        try:
            return os.fstat(pidfd).st_ino
        except OSError:
            return None

    def close(self) -> None:
        for pin in self._pins.values():
            pin.retire()
        self._pins.clear()

    def _identities_are_unique(self) -> bool:
        if self._usable is None:
            ours, init = open_pidfd(os.getpid()), open_pidfd(1)
            try:
                self._usable = (
                    ours is not None
                    and init is not None
                    and os.fstat(ours).st_ino != os.fstat(init).st_ino
                )
            finally:
                for fd in (ours, init):
                    if fd is not None:
                        os.close(fd)
        return self._usable
