"""`swapguard run`: wire the pieces together and keep the loop going until told to stop.

Start-up order is chosen so that nothing half-starts: the state lock first (never two supervisors
on one state, hence never two hosts), then the store, the process-tree containment (subreaper,
cgroup), the control sockets (bound before anything starts, so a clash fails early), the runtime
(which adopts a live host or starts one and resumes a swap), then the sockets are served (requests
made meanwhile wait in their backlog, so no answer predates what the store and adoption tell),
the code watcher, and last READY=1 to our own manager when there is one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import os
import pwd
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from supervisor import clock
from supervisor.code.checkpoint import Checkpoint
from supervisor.config.schema import Config
from supervisor.control import page, peers, views
from supervisor.control.routes import CALL_LIMIT_S
from supervisor.control.server import Backend, ControlServer, Peer
from supervisor.core import lifecycle, swaps
from supervisor.daemon import footprint, preflight
from supervisor.daemon.manager import ServiceManager
from supervisor.daemon.runtime import Runtime
from supervisor.daemon.stall import StallDetector
from supervisor.errors import BadRequest, NotFound, NotReachable, SwapguardError
from supervisor.process import host, identity, outputlog
from supervisor.state.lock import share_with_host
from supervisor.state.store import StateLock, Store

if TYPE_CHECKING:
    from supervisor.code.watch import CodeWatcher

log = logging.getLogger(__name__)
T = TypeVar("T")
_CANCEL_GRACE_S = 5.0  # a timed-out call under way: how long its cancellation may take
SHUTDOWN_GRACE_S = 10.0
"""After SIGTERM, swapguard is gone within `host.stop_timeout` plus this, whatever its workers
are doing: the host's stop takes stop_timeout and a tree kill, the rest (hooks cut short, sockets
closed) seconds. A worker stuck in a call that never returns (a hung file system) is abandoned:
every record is saved before its step's work is ordered, so nothing is lost."""


class LoopBackend(Backend):
    """The control socket's view of the runtime: every call is marshalled onto the loop thread,
    but for the status and `may_write`, read from values the loop replaces whole
    (`Runtime.published`, the host's process), and the store's reads."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.loop = runtime.loop
        control = runtime.config.control
        users, groups = control.allow_users, control.allow_groups
        self.allowed_uids = {os.getuid(), 0} | {
            preflight.user_id(name, key="control.allow_users") for name in users
        }
        self.allowed_gids = {
            preflight.group_id(name, key="control.allow_groups") for name in groups
        }
        self._figures: tuple[int | None, float, dict[str, Any]] | None = None
        self._figures_lock = threading.Lock()
        self.call_limit = CALL_LIMIT_S

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` on the loop thread (awaiting it if it is a coroutine) and wait for it.

        A call answered 503 never takes effect later: one that has not reached the loop by then
        is refused when it does; a coroutine under way is cancelled at its await (the runtime's
        commands commit nothing before their last await), and if it finished first anyway its
        own answer is given instead of the 503."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        tasks: list[asyncio.Future[Any]] = []

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return  # answered 503 before it reached the loop: never run
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
                return
            if not asyncio.iscoroutine(result):
                future.set_result(result)
                return
            task = asyncio.ensure_future(result)
            tasks.append(task)
            task.add_done_callback(lambda done: _settle(future, done))

        try:
            self.loop.call_soon_threadsafe(run)
        except RuntimeError as exc:  # loop closed under us: we are shutting down
            raise NotReachable("swapguard is shutting down") from exc
        limit = self.call_limit
        try:
            return future.result(timeout=limit)
        except concurrent.futures.TimeoutError:
            if future.cancel():
                raise NotReachable(
                    f"swapguard did not answer within {limit:g} s; the request was not applied"
                ) from None
        # under way on the loop: cancel it there, then report what it came to
        try:
            self.loop.call_soon_threadsafe(lambda: [task.cancel() for task in tasks])
            return future.result(timeout=_CANCEL_GRACE_S)
        except (concurrent.futures.CancelledError, RuntimeError):
            raise NotReachable(
                f"swapguard did not finish within {limit:g} s; the request was cancelled"
            ) from None
        except concurrent.futures.TimeoutError:
            raise NotReachable(f"swapguard's loop is stuck past {limit:g} s") from None

    def may_write(self, peer: Peer) -> bool:
        """Root, our own user, the allowed users and groups, and the host's tree. Asked at accept
        (which slots a connection may take) and at each write, on the caller's thread: the tree
        is read from values the loop replaces whole, and the server checks that the pinned peer
        was alive around the call, so `peer.pid` named that very process (its `start`)."""
        if peer.uid is None:  # no credentials on this platform: only the file mode protects
            return True
        if peer.uid in self.allowed_uids or (
            peer.gid is not None and peer.gid in self.allowed_gids
        ):
            return True
        if self.allowed_gids and _user_gids(peer.uid) & self.allowed_gids:
            return True
        if peer.pid is None:
            return False
        if not host.is_in_tree(peer.pid, self.runtime.process, self.runtime.cgroup):
            return False
        return peers.started_as_pinned(peer)  # the pid named the pinned process throughout

    def status(self) -> dict:
        document = views.status(self.runtime)  # on this thread: see Runtime.published
        document["host"].update(self._tree_figures())
        return document

    def _tree_figures(self) -> dict[str, Any]:
        """Memory, CPU and process count of the host's tree, at most once a second: a walk of
        /proc per request would cost more than the rest of a status call together."""
        process, cgroup = self.runtime.process, self.runtime.cgroup
        key = None if process is None else process.pid
        now = time.monotonic()
        with self._figures_lock:
            if self._figures is not None and self._figures[0] == key and now < self._figures[1]:
                return self._figures[2]
            if process is None:
                pids: set[int] = set()
            elif cgroup is not None:
                pids = {process.pid, *cgroup.pids()}
            else:
                pids = process.tree_pids()
            rss, cpu = host.process_stats(pids)
            figures = {"memory_bytes": rss, "cpu_s": round(cpu, 3), "processes": len(pids)}
            self._figures = (key, now + 1.0, figures)
            return figures

    def events(self, after: int, limit: int) -> list[dict]:
        up_to = self.runtime.published_event_id  # no event ahead of the status it tells of
        return [
            event.to_json() for event in self.runtime.store.events_after(after, limit, up_to=up_to)
        ]

    def metrics(self) -> str:
        return str(self._call(views.metrics, self.runtime))

    def page(self) -> str:
        return page.render(self.status(), self.list_swaps(page.TIMELINE_LENGTH))

    def host_action(self, action: str) -> dict:
        Asked = lifecycle.StartRequested | lifecycle.StopRequested | lifecycle.RestartRequested
        events: dict[str, type[Asked]] = {
            "start": lifecycle.StartRequested,
            "stop": lifecycle.StopRequested,
            "restart": lifecycle.RestartRequested,
        }
        if action not in events:
            raise BadRequest(f"unknown host action {action!r}")

        def act() -> dict:
            self.runtime.request_host(events[action](now=clock.boot_clock()))
            return views.status(self.runtime)["host"]

        return dict(self._call(act))

    def heartbeat(self, status: str | None, ready: bool, peer: Peer) -> dict:
        def beat() -> dict:
            if ready:
                self.runtime.feed_host(lifecycle.Ready(now=clock.boot_clock()))
            self.runtime.counters.heartbeats += 1
            self.runtime.heartbeat(status)
            return {"ok": True}

        return dict(self._call(beat))

    def list_swaps(self, limit: int) -> list[dict]:
        now = clock.now()
        return [
            swaps.Swap.from_json(record).view(now)
            for record in self.runtime.store.list_swaps(limit)
        ]

    def get_swap(self, swap_id: str) -> dict:
        record = self.runtime.store.load_swap(swap_id)
        if record is None:
            raise NotFound(f"no swap {swap_id!r}")
        swap = swaps.Swap.from_json(record)
        document = swap.view(clock.now())
        try:
            document["changes"] = self._changes(swap)
        except SwapguardError as exc:  # git cannot tell now: say so, never a 500 for a read
            document["changes"], document["changes_error"] = None, exc.message
        document["data"] = [
            {
                "path": item.get("path"),
                "bytes": item.get("bytes"),
                "sha256": item.get("sha256") or None,  # None: linked, or nothing existed
                "linked": bool(item.get("linked", False)),
                "held": _held(item),
            }
            for item in swap.data
        ]
        document["events"] = [
            {"at": event.to_json()["at"], "event": event.kind, "detail": event.detail}
            for event in self.runtime.store.events_after(
                0, 1000, swap_id=swap_id, up_to=self.runtime.published_event_id
            )
        ]
        return document

    def _changes(self, swap: Any) -> list[dict]:
        saved = self.runtime.store.get_value(f"changes:{swap.id}")
        if isinstance(saved, list):
            return saved
        if swap.state in swaps.TERMINAL or not swap.checkpoint:
            return []
        changes = self.runtime.code.changes(Checkpoint.from_json(dict(swap.checkpoint)))
        return [{"path": c.path, "change": c.change} for c in changes]

    def prepare_swap(self, summary: str) -> dict:
        swap = self._call(self.runtime.prepare, summary)
        return dict(swap.view(clock.now()))

    def swap_action(self, swap_id: str, action: str, body: dict) -> dict:
        swap = self._call(self.runtime.command_swap, swap_id, action, body)
        return dict(swap.view(clock.now()))


def _held(item: Mapping[str, Any]) -> str:
    """How a data entry's snapshot is held: `copy` (with its sha256), `linked` (the original
    file itself; the new version ran on a copy, so nothing was hashed), `absent` (nothing was
    there at activation: a rollback moves aside what the new version created)."""
    if item.get("existed") is False:
        return "absent"
    return "linked" if item.get("linked") else "copy"


def _settle(future: concurrent.futures.Future[Any], task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        future.set_exception(concurrent.futures.CancelledError())
    elif (error := task.exception()) is not None:
        future.set_exception(error)
    else:
        future.set_result(task.result())


def _user_gids(uid: int) -> set[int]:
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return set()
    return set(os.getgrouplist(entry.pw_name, entry.pw_gid))


def cgroup_name(config: Config) -> str:
    """Stable per state dir, so a restarted supervisor finds the leaf of the host it adopts."""
    return footprint.builtin_sha256_hex(str(config.state.dir).encode())[:16]


def _lead_a_session_as_pid_1() -> None:
    """As a container's PID 1, every orphan in the container is ours to reap. The reaper tells an
    orphan from the children our own modules wait for by its session (`host.is_orphan`), so PID 1
    must lead a session of its own, as runc's init does (one started by `unshare --fork` does not).
    """
    if os.getpid() == 1 and os.getsid(0) != 1:
        with contextlib.suppress(OSError):
            os.setsid()
            log.info("PID 1 of a PID namespace: leading a session of our own to reap its orphans")


def run(config: Config) -> int:
    """The service, in the foreground. Returns the process exit code."""
    footprint.tune_malloc()  # before any thread: see supervisor.daemon.footprint
    _lead_a_session_as_pid_1()
    preflight.preflight(config)  # what `check` refuses too, before anything is created
    lock = StateLock.acquire(config.state.dir)
    try:
        _share_state_dir(config)
    except BaseException:
        lock.release()
        raise
    store = Store.open(config.state.dir, reserve=False)  # made once the host is started
    try:
        if not host.become_subreaper():
            log.info("no child subreaper here: orphans of the host are found by scanning only")
        cgroup = host.CgroupLeaf.create(cgroup_name(config))
        if cgroup is None:
            log.info("no writable cgroup v2: the host's tree is killed by scanning")
        asyncio.run(_serve(config, store, cgroup))
        if cgroup is not None:
            cgroup.remove()
        return 0
    finally:
        store.close()
        lock.release()


def _share_state_dir(config: Config) -> None:
    """With host.user: the host's own folder in state.dir, for the sockets it talks to."""
    user = identity.resolve(config.host.user, config.host.group)
    if user is None:
        share_with_host(config.state.dir, None)
    else:
        share_with_host(config.state.dir, config.host_socket_dir(), user.uid, user.gid)


def _host_control(
    config: Config, runtime: Runtime, manager: ServiceManager
) -> ControlServer | None:
    """The host's own listener of the control API, in its folder (host.user only): the
    operators' socket may be where the host cannot reach. Same API, same peer rules. Kept in
    our manager's fd store as `hostcontrol`, like the operators' socket: a host's request made
    while swapguard restarts waits in its backlog instead of being refused."""
    inherited = manager.handed_back.pop("hostcontrol", None)
    if config.host_socket_dir() is None:
        if inherited is not None:  # host.user was removed: nothing listens for a host now
            inherited.close()
            manager.forget_socket("hostcontrol")
        return None
    server = ControlServer(
        config.host_control_socket(),
        LoopBackend(runtime),
        mode=0o666,  # the folder (the host's alone) is what keeps others out
        staging_dir=config.state.dir,
        inherited=inherited,
    )
    manager.store_socket("hostcontrol", server.listening_socket, taken_back=server.inherited)
    return server


async def _serve(config: Config, store: Store, cgroup: host.CgroupLeaf | None) -> None:
    loop = asyncio.get_running_loop()
    stall = StallDetector(loop, config.deadman.stall_limit)
    stall.start()
    manager = ServiceManager()
    runtime = Runtime(config, store, cgroup=cgroup, manager=manager)
    server = ControlServer(
        config.control.socket,
        LoopBackend(runtime),
        mode=config.control.mode,
        group=config.control.group,
        inherited=manager.handed_back.pop("control", None),
    )
    manager.store_socket("control", server.listening_socket, taken_back=server.inherited)
    host_server = _host_control(config, runtime, manager)
    listener = None
    if config.control.http_listen is not None:
        from supervisor.control.listener import ReadOnlyListener  # only where one is configured

        listener = ReadOnlyListener(*config.control.http_listen, LoopBackend(runtime))
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reopen_logs)
    await runtime.start()
    # Served once the runtime has loaded its record and adopted the host (a few ms; requests
    # wait in the backlog meanwhile): the first status answered is the truth, never "stopped",
    # pid null and no swap while a host lives and its swap is on probation; and a request the
    # host queued while we restarted is its tree's write.
    for serving in (server, host_server, listener):
        if serving is not None:
            serving.serve_in_thread()
    runtime.pool.submit(store.keep_reserve)  # 4 MiB and an fsync at a first start: not before
    # Started on a thread of its own: watchdog's import and one inotify watch per folder take
    # from tens of ms to seconds (a large tree), and the loop meanwhile takes the host's exits
    # and beats; not queued behind the baseline and the other start-up work of the pool.
    watcher = await asyncio.to_thread(_start_watcher, config, runtime)
    if watcher is not None:
        # what changed while no watcher ran (an adopted host's code)
        runtime.drift_guard.on_tree_changed()
    # What start-up made lives as long as the process: the collector's full passes (each a
    # pause of the loop and of the control thread) need not walk it again. Status p99 under
    # 1k heartbeats/s, quick bench: 0.77-0.86 ms with, 0.78-1.36 ms without.
    gc.freeze()
    manager.notify(f"READY=1\nSTATUS=supervising {config.host.command[0]}\nMAINPID={os.getpid()}")
    manager.start_watchdog(loop)
    log.info(
        "swapguard %s supervising %s (control %s)",
        os.getpid(),
        " ".join(config.host.command),
        config.control.socket,
    )
    await stop.wait()
    _exit_by(config.host.stop_timeout + SHUTDOWN_GRACE_S, lambda: runtime.process is None)
    manager.notify("STOPPING=1")
    manager.stop_watchdog()
    if watcher is not None:
        watcher.stop()
    await runtime.shutdown()
    stall.stop()
    manager.forget_socket("control")
    server.close()
    if host_server is not None:
        manager.forget_socket("hostcontrol")
        host_server.close()
    if listener is not None:
        listener.close()
    log.info("swapguard stopped")


def _exit_by(limit: float, host_gone: Callable[[], bool]) -> None:
    """A shutdown that has not ended after `limit` seconds ends here: the threads still running
    are logged (what was abandoned), and the process exits, 0 if the host was stopped, else 1."""

    def watch() -> None:
        time.sleep(limit)
        mine = (threading.main_thread(), threading.current_thread())
        left = [t.name for t in threading.enumerate() if t not in mine]
        log.critical(
            "swapguard did not finish stopping within %gs; exiting now, abandoning: %s",
            limit,
            ", ".join(left) or "(the main thread)",
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(0 if host_gone() else 1)

    threading.Thread(target=watch, name="swapguard-exit-by", daemon=True).start()


def _reopen_logs() -> None:
    """SIGHUP, as logrotate's postrotate sends it: the host's output loggers reopen their file.
    The config is not reloaded: restart swapguard for that (the host is adopted)."""
    log.info("SIGHUP: reopening the host's output file")
    outputlog.reopen()


def _start_watcher(config: Config, runtime: Runtime) -> CodeWatcher | None:
    """Runs in a worker thread; the watcher calls back onto the loop."""
    if config.code.undeclared_changes == "ignore" or not (config.code.root / ".git").exists():
        return None
    # watchdog is loaded here, once the host is started: a cold start does not wait for it
    from supervisor.code.watch import CodeWatcher

    loop = runtime.loop
    watcher = CodeWatcher(
        config.code.root,
        lambda: loop.call_soon_threadsafe(runtime.drift_guard.on_tree_changed),
        ignore=config.non_code_paths(),
        patterns=config.non_code_patterns(),
        wanted=lambda: runtime.published.swap is None,  # the drift guard ignores the rest
    )
    try:
        watcher.start()
    except OSError as exc:  # inotify limits: drift detection is lost, supervision is not
        log.warning("cannot watch %s: %s", config.code.root, exc)
        return None
    return watcher
