"""A host whose sd_notify client connects once (PyPI `sdnotify`) keeps its heartbeat and confirms
across a kill -9 of swapguard when swapguard runs under a manager with an fd store; without one,
its datagrams go nowhere after the restart (the README tells such hosts to reconnect on error)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from supervisor.errors import NotReachable
from tests.support import WAIT, Supervisor, git, gone, wait_for

pytest.importorskip("sdnotify")
STANDIN = Path(__file__).with_name("standin_manager.py")

HOST = """\
import os, pathlib, time
import sdnotify

notifier = sdnotify.SystemdNotifier()  # connects to NOTIFY_SOCKET once, here
version = pathlib.Path("version.txt").read_text().strip()
notifier.notify("READY=1")
swap = os.environ.get("SWAPGUARD_SWAP_ID")
while True:
    notifier.notify(f"WATCHDOG=1\\nSTATUS={version}")
    if swap and pathlib.Path("confirm-now").exists():
        notifier.notify(f"X_SWAPGUARD_CONFIRM={swap}")
        swap = None
    time.sleep(0.1)
"""


def make_repo(root: Path) -> Path:
    root.mkdir()
    git(root, "init", "-q")
    (root / "host.py").write_text(HOST)
    (root / "version.txt").write_text("v1\n")
    (root / ".gitignore").write_text("confirm-now\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "v1")
    return root


@contextmanager
def under_standin(repo: Path, *, store: bool) -> Iterator[Supervisor]:
    sup = Supervisor(
        repo,
        host={"command": [sys.executable, "host.py"], "heartbeat_timeout": "2s"},
        deadman={"window": "60s", "hard_cap": "120s"},
        data=False,
    )
    argv = [sys.executable, str(STANDIN), str(sup.state.parent / (sup.state.name + ".m.sock"))]
    argv += [] if store else ["--no-store"]
    argv += ["--", sys.executable, "-m", "supervisor", "run", "--config", str(sup.config)]
    env = {**os.environ, "SWAPGUARD_LOG_LEVEL": "INFO"}
    env.pop("NOTIFY_SOCKET", None)
    with sup.log.open("ab") as out:
        manager = subprocess.Popen(argv, cwd=repo, stdout=out, stderr=out, env=env)
    try:
        wait_for(sup.status, what="swapguard under the stand-in manager")
        yield sup
    except BaseException:
        print("---- swapguard log ----\n" + sup.output()[-6000:], file=sys.stderr)
        raise
    finally:
        manager.terminate()
        manager.wait(WAIT * 2)
        sup.cleanup()
        Path(argv[2]).unlink(missing_ok=True)


def kill9_and_wait_for_the_next(sup: Supervisor) -> None:
    before = sup.status()["supervisor"]["pid"]
    os.kill(before, signal.SIGKILL)

    def the_next() -> bool:
        try:
            return sup.status()["supervisor"]["pid"] != before
        except NotReachable:
            return False

    wait_for(the_next, what="the manager to restart swapguard")


def on_probation(sup: Supervisor, repo: Path) -> tuple[str, int]:
    sup.wait_host(ready=True)
    swap_id = sup.client.prepare("connect once")["id"]
    (repo / "version.txt").write_text("v2\n")
    sup.client.activate(swap_id)
    wait_for(
        lambda: (s := sup.status())["swap"]["step"] is None and s["host"]["ready"],
        what="the new version ready on probation",
    )
    return swap_id, sup.status()["host"]["pid"]


def test_a_connect_once_client_is_heard_across_a_restart_with_the_fd_store(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    with under_standin(repo, store=True) as sup:
        swap_id, host_pid = on_probation(sup, repo)
        kill9_and_wait_for_the_next(sup)
        restarted = sup.status()["supervisor"]["started_at"]
        # heard by the new swapguard: a heartbeat after its start, the same host (adopted)
        def heard_since_the_restart() -> bool:
            host = sup.status()["host"]
            beat = host["last_heartbeat_at"]  # None until the restarted swapguard hears one
            return beat is not None and beat > restarted and host["ready"]

        wait_for(heard_since_the_restart, what="a heartbeat heard by the restarted swapguard")
        (repo / "confirm-now").touch()
        doc = sup.wait_swap(swap_id, "confirmed")
        assert doc["state"] == "confirmed"
        host = sup.status()["host"]
        assert host["pid"] == host_pid and host["status_text"] == "v2"
        assert "host.heartbeat_lost" not in sup.events()


def test_without_a_store_the_connect_once_client_goes_unheard(tmp_path: Path) -> None:
    """What the README warns of: the same host, no fd store, a lost heartbeat and a rollback."""
    repo = make_repo(tmp_path / "repo")
    with under_standin(repo, store=False) as sup:
        swap_id, _ = on_probation(sup, repo)
        kill9_and_wait_for_the_next(sup)
        doc = sup.wait_swap(swap_id, "rolled_back", timeout=WAIT * 2)
        assert doc["reason"] == "heartbeat_lost"


def test_a_request_made_while_swapguard_is_down_is_answered_by_the_next(tmp_path: Path) -> None:
    """The control socket is in the store too: it keeps listening while swapguard restarts, and a
    client that connects in between waits in its backlog instead of being refused."""
    repo = make_repo(tmp_path / "repo")
    with under_standin(repo, store=True) as sup:
        sup.wait_host(ready=True)
        before = sup.status()["supervisor"]["pid"]
        os.kill(before, signal.SIGKILL)
        wait_for(lambda: not psutil.pid_exists(before) or gone(before), what="swapguard dead")
        status = sup.client.status()  # connects at once: the socket listens in the store
        assert status["supervisor"]["pid"] != before
        assert sup.output().count("removing stale control socket") == 0
