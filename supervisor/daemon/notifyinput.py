"""The host's notify datagrams as input: who may speak, and what each message asks of the runtime.

Why it exists: `core.notifyproto` parses the protocol and `control.notifysocket` owns the socket;
neither decides anything.
Here a batch of datagrams is taken off the socket, a sender outside the host's tree is dropped,
a datagram that does not parse is counted and ignored, and each message becomes calls on the
runtime: READY and WATCHDOG=trigger feed the host machine, WATCHDOG=1 and STATUS are heartbeats,
EXTEND_TIMEOUT_USEC extends the swap, and SWAPGUARD_CONFIRM confirms it (the machine makes a
confirm wait while the new version's data copies are being flushed).

Rules it keeps:
- Loop thread only.
- Before each datagram the timer gets its chance (`before_each`): a flood must not hold the
  deadman clock back by a whole batch.
- A host's refused request is logged once, not at every repeat; it is never an error of ours.
- It reaches the runtime only through `NotifyTarget` (the runtime's public face), the callable
  and the `Counters` record it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from supervisor import clock
from supervisor.control import peers
from supervisor.control.notifysocket import Datagram, NotifyServer
from supervisor.control.routes import Peer
from supervisor.core import lifecycle, notifyproto, swaps
from supervisor.errors import Conflict
from supervisor.process import host

if TYPE_CHECKING:
    from supervisor.daemon.counters import Counters

log = logging.getLogger(__name__)


class NotifyTarget(Protocol):
    """What the datagrams act on: the runtime, called on its loop thread."""

    @property
    def swap(self) -> swaps.Swap | None: ...

    @property
    def process(self) -> host.HostProcess | None: ...

    @property
    def cgroup(self) -> host.CgroupLeaf | None: ...

    def feed_host(self, event: lifecycle.Event) -> None: ...

    def heartbeat(self, status: str | None, boot: float | None = None) -> None: ...

    def feed_swap(self, event: swaps.Event) -> None: ...


class NotifyInput:
    """Register `on_readable` as the loop's reader of the notify socket."""

    def __init__(
        self,
        server: NotifyServer,
        counters: Counters,
        target: NotifyTarget,
        *,
        before_each: Callable[[], None],
    ) -> None:
        self.server = server
        self.counters = counters
        self.target = target
        self._before_each = before_each
        self._last_refusal: str | None = None  # a host repeating a refused request: logged once

    def on_readable(self) -> None:
        """The socket has datagrams: take a batch and act on those from the host's tree."""
        for datagram in self.server.drain():
            self._take(datagram)

    def _take(self, datagram: Datagram) -> None:
        self._before_each()
        self.counters.datagrams += 1
        try:
            message = notifyproto.parse_datagram(datagram.payload)
        except notifyproto.NotifyError:
            self.counters.datagrams_invalid += 1
            return
        if message.asks_nothing:
            return  # e.g. systemd-notify's BARRIER=1, sent by a process already gone
        if datagram.pid is not None and not self._from_tree(datagram):
            self.counters.datagrams_dropped += 1
            return
        self._on_message(message)

    def _from_tree(self, datagram: Datagram) -> bool:
        """Was the sender, the very process pinned at receipt, part of the host's tree? Its pid
        must still name that process after the check (a later one has a later start)."""
        if not datagram.pinned:
            return False  # gone, or its pid already named another process, when received
        pin = datagram.sender
        if pin is not None and pin.alive():
            # The sender itself, alive before and after the check: its pid named it throughout,
            # so the verdict is about the sender.
            in_tree = host.is_in_tree(datagram.pid or 0, self.target.process, self.target.cgroup)
            return in_tree and pin.alive()
        if not host.is_in_tree(datagram.pid or 0, self.target.process, self.target.cgroup):
            return False
        sender = Peer(datagram.pid, datagram.uid, datagram.gid, start=datagram.start)
        return peers.started_as_pinned(sender)

    def _on_message(self, message: notifyproto.NotifyMessage) -> None:
        target = self.target
        boot = clock.boot_clock()
        if message.ready:
            target.feed_host(lifecycle.Ready(now=boot))
        if message.watchdog_trigger:
            target.feed_host(lifecycle.WatchdogTriggered(now=boot))
        if message.watchdog or message.status is not None:
            self.counters.heartbeats += 1  # what moves the heartbeat clock is counted
            target.heartbeat(message.status, boot)
        if message.extend_timeout_usec is not None:
            by = message.extend_timeout_usec / 1e6
            self._swap_command(swaps.ExtendRequested(now=clock.now(), by=by))
        swap = target.swap
        if swap is not None and message.confirm_swap_id == swap.id:
            self._swap_command(swaps.ConfirmRequested(now=clock.now()))

    def _swap_command(self, event: swaps.Event) -> None:
        try:
            self.target.feed_swap(event)
        except Conflict as exc:
            if exc.message != self._last_refusal:
                log.warning("notify: %s", exc.message)
                self._last_refusal = exc.message
