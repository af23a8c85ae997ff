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
- Before each datagram the timer gets its chance (`Timer.due`): a flood must not hold the
  deadman clock back by a whole batch.
- Heartbeats in a row (WATCHDOG=1 and STATUS, nothing else) are one heartbeat: N in one batch
  say what the last says, so the runtime hears them once, with the last status, when the run
  ends (at anything else, at the timer, at the end of the batch). Each is counted all the same.
- A sender's verdict (of the host's tree or not) is kept on its pin (`PeerPin.verdict`) for the
  host it was judged against: a known sender's next datagrams cost no look at its process.
- A host's refused request is logged once, not at every repeat; it is never an error of ours.
- It reaches the runtime only through `NotifyTarget` (the runtime's public face), the timer
  and the `Counters` record it is given.
"""

from __future__ import annotations

import logging
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


class Timer(Protocol):
    """The runtime's timer, as far as the input needs it (`daemon.timer.WakeTimer`)."""

    def due(self) -> bool: ...

    def wake_now(self) -> None: ...


_PARSED_KEPT = 64
"""Payloads whose parse is remembered: a host repeats the same few (WATCHDOG=1) thousands of times
a second, and a parse costs more than all the rest of a datagram's way in."""
_PARSED_MAX_BYTES = 256  # longer ones (a long STATUS) are parsed each time, not kept


class NotifyInput:
    """Register `on_readable` as the loop's reader of the notify socket."""

    def __init__(
        self, server: NotifyServer, counters: Counters, target: NotifyTarget, *, timer: Timer
    ) -> None:
        self.server = server
        self.counters = counters
        self.target = target
        self._timer = timer
        self._last_refusal: str | None = None  # a host repeating a refused request: logged once
        # payload -> (message, it asks nothing, it is a heartbeat only)
        self._parsed: dict[bytes, tuple[notifyproto.NotifyMessage, bool, bool]] = {}
        self._beating = False  # heartbeats taken that the runtime has not heard yet
        self._beat_status: str | None = None  # the last status among them

    def on_readable(self) -> None:
        """The socket has datagrams: take a batch and act on those from the host's tree."""
        timer = self._timer
        try:
            for datagram in self.server.drain():
                if timer.due():
                    self._flush_beats()  # the timer judges with every heartbeat read so far
                    timer.wake_now()
                self._take(datagram)
        finally:
            self._flush_beats()

    def _take(self, datagram: Datagram) -> None:
        self.counters.datagrams += 1
        parsed = self._parsed.get(datagram.payload)
        if parsed is None:
            try:
                parsed = self._parse(datagram.payload)
            except notifyproto.NotifyError:
                self.counters.datagrams_invalid += 1
                return
        message, asks_nothing, beat_only = parsed
        if asks_nothing:
            return  # e.g. systemd-notify's BARRIER=1, sent by a process already gone
        if datagram.pid is not None and not self._from_tree(datagram):
            self.counters.datagrams_dropped += 1
            return
        if beat_only:
            if message.watchdog:
                self.counters.heartbeats += 1
            if message.status is not None:
                self._beat_status = message.status
            self._beating = True
            return
        self._flush_beats()  # in order: what came before this message is heard before it
        self._on_message(message)

    def _parse(self, payload: bytes) -> tuple[notifyproto.NotifyMessage, bool, bool]:
        """Parse and remember (bounded: a host whose every STATUS differs gets no memory)."""
        message = notifyproto.parse_datagram(payload)
        parsed = message, message.asks_nothing, message.heartbeat_only
        if len(payload) <= _PARSED_MAX_BYTES:
            if len(self._parsed) >= _PARSED_KEPT:
                self._parsed.clear()
            self._parsed[payload] = parsed
        return parsed

    def _flush_beats(self) -> None:
        """The heartbeats taken since the last flush, as one, at this moment."""
        if not self._beating:
            return
        status, self._beating, self._beat_status = self._beat_status, False, None
        self.target.heartbeat(status, clock.boot_clock())

    def _from_tree(self, datagram: Datagram) -> bool:
        """Was the sender, the very process pinned at receipt, part of the host's tree? Its pid
        must still name that process after the check (a later one has a later start)."""
        if not datagram.pinned:
            return False  # gone, or its pid already named another process, when received
        process, pin = self.target.process, datagram.sender
        if pin is not None:
            verdict = pin.verdict
            if verdict is not None and verdict[0] is process:
                return verdict[1]  # about this very process (the pin holds it) and this host
            if pin.alive():
                # The sender itself, alive before and after the check: its pid named it
                # throughout, so the verdict is about the sender.
                in_tree = host.is_in_tree(datagram.pid or 0, process, self.target.cgroup)
                if not pin.alive():
                    return False
                if process is not None:
                    pin.verdict = (process, in_tree)
                return in_tree
        if not host.is_in_tree(datagram.pid or 0, process, self.target.cgroup):
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
