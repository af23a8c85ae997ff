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
import select
import socket
import struct
import sys
from collections import OrderedDict

from supervisor.control.routes import Peer
from supervisor.process.proctree import (
    START_ROUNDING_S,
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
        # What its user concluded about this very process, and about what (for a notify sender:
        # the host it was judged against, and whether it is of that host's tree); good for as
        # long as the pin holds the process, since a process cannot be replaced under a pidfd.
        self.verdict: tuple[object, bool] | None = None

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
    """Notify senders pinned before, so that a heartbeat from a known sender costs a lookup and a
    poll, not a look at its process (a flood sends thousands a second).

    Why a sender is known by its pid alone: an entry is made only from the kernel's own pidfd
    for a datagram's sender (SCM_PIDFD), so it holds the very process C that sent that datagram,
    with pid P. While C lives, P names C; a datagram read later whose credentials say P was
    sent either by C or by a process that had P before C was born, and such a datagram was
    queued before C's first one (the socket's queue is first in, first out), so it was read
    before the entry existed. Hence: a later datagram from P, with C still alive when it is
    read (one poll on C's pidfd), is C's. An entry whose process exited is retired.

    Each entry holds a pin (one fd) and a poller made once for it; bounded, the oldest retired
    first. Loop thread only (a poller must not be polled from two threads at once), and one
    instance per socket (the argument needs the one queue)."""

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._known: OrderedDict[int, _Known] = OrderedDict()

    def known(self, pid: int) -> PeerPin | None:
        """The kept pin of the sender whose datagram's credentials say `pid`, if it is alive now:
        that process sent the datagram just read. None: not known, or exited (then `pin`)."""
        known = self._known.get(pid)
        if known is None or known.poller.poll(0):
            return None
        self._known.move_to_end(pid)
        return known.pin

    def pin(self, pidfd: int, sender: Peer, seen_at: float) -> tuple[PeerPin, bool]:
        """Pin the sender behind `pidfd` (the kernel's own for the datagram, taken) as
        `pin_process` would for a datagram, once `known` did not know it; and whether the pin
        is kept here (alive, for the sender's next datagrams): a pin not kept is the caller's
        to close."""
        pin = pin_process(sender, pidfd, seen_at, allow_exited=True)
        pid = pin.peer.pid
        if pid is None or not pin.holds_process:
            return pin, False
        if (stale := self._known.pop(pid, None)) is not None:
            stale.pin.retire()  # an exited process that had this pid
        for gone in [key for key, kept in self._known.items() if kept.poller.poll(0)]:
            self._known.pop(gone).pin.retire()  # a new sender: the dead ones' fds go now
        self._known[pid] = _Known(pin)
        while len(self._known) > self._size:
            self._known.popitem(last=False)[1].pin.retire()
        return pin, True

    def close(self) -> None:
        for known in self._known.values():
            known.pin.retire()
        self._known.clear()


class _Known:
    """A kept sender: its pin, and a poller on its pidfd (made once: a poll object per check
    would cost as much again as the poll)."""

    __slots__ = ("pin", "poller")

    def __init__(self, pin: PeerPin) -> None:
        assert pin._pidfd is not None, "only a pin that holds its process is kept"
        self.pin = pin
        self.poller = select.poll()
        self.poller.register(pin._pidfd, select.POLLIN)
