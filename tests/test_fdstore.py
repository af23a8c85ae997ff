"""A host whose sd_notify client connects once (PyPI `sdnotify`) keeps its heartbeat and confirms
across a kill -9 of swapguard when swapguard runs under a manager with an fd store; without one,
its datagrams go nowhere after the restart (the README tells such hosts to reconnect on error)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.client import Client
from supervisor.daemon import service
from supervisor.errors import NotReachable, SwapguardError
from tests.support import WAIT, Supervisor, git, gone, wait_for
from tests.test_host_user import NOBODY, ROOT_ONLY, _python_for

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
    host = {"command": [sys.executable, "host.py"], "heartbeat_timeout": "2s"}
    with standin(repo, store=store, host=host) as (sup, _manager):
        yield sup


@contextmanager
def standin(
    repo: Path, *, store: bool, host: dict[str, Any]
) -> Iterator[tuple[Supervisor, subprocess.Popen[bytes]]]:
    """swapguard under the stand-in manager (with its fd store or not), and the manager."""
    sup = Supervisor(repo, host=host, deadman={"window": "60s", "hard_cap": "120s"}, data=False)
    argv = [sys.executable, str(STANDIN), str(sup.state.parent / (sup.state.name + ".m.sock"))]
    argv += [] if store else ["--no-store"]
    argv += ["--", sys.executable, "-m", "supervisor", "run", "--config", str(sup.config)]
    env = {**os.environ, "SWAPGUARD_LOG_LEVEL": "INFO"}
    env.pop("NOTIFY_SOCKET", None)
    with sup.log.open("ab") as out:
        manager = subprocess.Popen(argv, cwd=repo, stdout=out, stderr=out, env=env)
    try:
        wait_for(sup.status, what="swapguard under the stand-in manager")
        yield sup, manager
    except BaseException:
        print("---- swapguard log ----\n" + sup.output()[-6000:], file=sys.stderr)
        raise
    finally:
        manager.send_signal(signal.SIGCONT)  # were it left stopped by a test
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


def test_every_status_across_a_restart_tells_the_truth(tmp_path: Path) -> None:
    """Issue 14 item 6: polled without a pause while swapguard is killed and restarted, the
    status never shows the live host as stopped (or `starting`) with pid null, nor the swap on
    probation as gone: the next swapguard answers only once it has adopted the host."""
    repo = make_repo(tmp_path / "repo")
    with under_standin(repo, store=True) as sup:
        swap_id, host_pid = on_probation(sup, repo)
        seen: list[tuple[int, str, int | None, str | None]] = []
        done = threading.Event()

        def poll() -> None:
            with Client(sup.socket, timeout=30) as client:
                while not done.is_set():
                    try:
                        status = client.status()
                    except SwapguardError:  # not reachable while none runs, say
                        continue
                    host, swap = status["host"], status["swap"]
                    seen.append((status["supervisor"]["pid"], host["state"], host["pid"],
                                 swap and swap["state"]))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            wait_for(lambda: len(seen) >= 20, what="answers before the kill")
            kill9_and_wait_for_the_next(sup)
            after = sup.status()["supervisor"]["pid"]
            wait_for(lambda: sum(pid == after for pid, *_ in seen) >= 20, what="answers")
        finally:
            done.set()
            poller.join(WAIT)
        wrong = [answer for answer in seen if answer[1:] != ("running", host_pid, "probation")]
        assert not wrong, wrong[:10]
        assert len({pid for pid, *_ in seen}) == 2  # answers from both sides of the restart
        assert sup.client.swap(swap_id)["state"] == "probation"


# --- the host's own control socket (host.user): kept in the store as `hostcontrol` ---------------

ASKING_HOST = r'''
import http.client, json, os, pathlib, socket, time

def notify(message):
    try:  # never blocks: while swapguard is down its socket's queue fills up
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.sendto(message.encode(), os.environ["NOTIFY_SOCKET"])
    except OSError:
        pass

def ask(method, target):
    """One request on its own connection; what came of it, in answer.json (written whole)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(90)
    try:
        sock.connect(os.environ["SWAPGUARD_SOCKET"])
    except OSError as exc:
        return {"refused": exc.strerror}
    pathlib.Path("connected").write_text(str(os.getpid()))
    conn = http.client.HTTPConnection("swapguard", timeout=90)
    conn.sock = sock
    conn.request(method, target, body=b"" if method == "POST" else None)
    answer = conn.getresponse()
    return {"status": answer.status, "body": json.loads(answer.read())}

notify("READY=1")
while True:
    notify("WATCHDOG=1")
    asked = pathlib.Path("ask-now")
    if asked.exists():
        method, target = asked.read_text().split()
        asked.unlink()
        pathlib.Path("answer.tmp").write_text(json.dumps(ask(method, target)))
        os.replace("answer.tmp", "answer.json")
    time.sleep(0.1)
'''


@pytest.fixture
def nobody_repo() -> Iterator[tuple[Path, str]]:
    """A repo `nobody` owns, in a folder it may reach, and an interpreter it may run."""
    python = _python_for(NOBODY)
    if python is None:
        pytest.skip("no Python interpreter that nobody may run")
    folder = Path(tempfile.mkdtemp(prefix="sg-fdhost-", dir="/tmp"))
    folder.chmod(0o755)
    repo = folder / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "host.py").write_text(ASKING_HOST)
    (repo / "version.txt").write_text("v1\n")
    (repo / ".gitignore").write_text("ask-now\nconnected\nanswer.*\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v1")
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(repo)], check=True)
    yield repo, python
    subprocess.run(["rm", "-rf", str(folder)], check=False)


def _ask_while_swapguard_is_down(
    sup: Supervisor, manager: subprocess.Popen[bytes], repo: Path, request: str
) -> tuple[int, bool]:
    """Kill -9 swapguard with its manager held (SIGSTOP), so that nothing answers until it
    resumes; the host asks `request` meanwhile. Returns the dead pid and whether the host's
    connect succeeded while no swapguard ran."""
    before = sup.status()["supervisor"]["pid"]
    manager.send_signal(signal.SIGSTOP)
    try:
        os.kill(before, signal.SIGKILL)
        wait_for(lambda: gone(before), what="swapguard dead")
        (repo / "ask-now").write_text(request)
        wait_for(lambda: (repo / "connected").exists() or (repo / "answer.json").exists(),
                 what="the host's connect while swapguard is down")
        connected = (repo / "connected").exists()
        assert not connected or not (repo / "answer.json").exists()  # nobody to answer yet
    finally:
        manager.send_signal(signal.SIGCONT)
    return before, connected


def _answer(repo: Path) -> dict[str, Any]:
    path = repo / "answer.json"
    found: dict[str, Any] = wait_for(lambda: path.exists() and json.loads(path.read_text()),
                                     what="the host's answer")
    return found


@ROOT_ONLY
def test_the_hosts_own_control_socket_keeps_a_request_across_a_restart(
    nobody_repo: tuple[Path, str]
) -> None:
    """A host as `nobody` confirms its swap through its own control socket while swapguard is
    dead: the socket listens on in the store, and the next swapguard answers the confirm."""
    repo, python = nobody_repo
    host = {"command": [python, "host.py"], "user": "nobody"}
    with standin(repo, store=True, host=host) as (sup, manager):
        swap_id, host_pid = on_probation(sup, repo)
        host_socket = sup.state / "host" / "control.sock"
        inode = host_socket.lstat().st_ino
        before, connected = _ask_while_swapguard_is_down(
            sup, manager, repo, f"POST /v1/swaps/{swap_id}/confirm")
        assert connected, _answer(repo)
        answer = _answer(repo)
        assert answer["status"] == 200, answer
        assert answer["body"]["state"] == "confirmed"
        status = sup.status()
        assert status["supervisor"]["pid"] != before
        assert status["host"]["pid"] == host_pid  # adopted, not restarted
        assert sup.client.swap(swap_id)["state"] == "confirmed"
        assert host_socket.lstat().st_ino == inode  # the very socket file: not bound anew
        assert "does not listen at" not in sup.output()
        # a clean stop takes it out of the store (FDSTOREREMOVE=1): the next start binds anew,
        # with no stored socket to find unbound
        after = status["supervisor"]["pid"]
        os.kill(after, signal.SIGTERM)
        wait_for(lambda: sup.status()["supervisor"]["pid"] not in (before, after),
                 what="the manager to start swapguard again")
        sup.wait_host(ready=True)
        assert host_socket.lstat().st_ino != inode
        assert "does not listen at" not in sup.output()
        assert "unexpected name" not in sup.output()


def test_a_stored_host_socket_is_closed_and_forgotten_once_host_user_is_gone() -> None:
    """host.user removed from the config: what the store handed back is closed and removed from
    it, not left listening for a host that no longer has a folder."""
    left, peer = socket.socketpair()
    forgotten: list[str] = []

    class Manager:
        def __init__(self) -> None:
            self.handed_back = {"hostcontrol": left}

        def forget_socket(self, name: str) -> bool:
            forgotten.append(name)
            return True

    class NoHostUser:
        def host_socket_dir(self) -> None:
            return None

    manager = Manager()
    try:
        assert service._host_control(NoHostUser(), None, manager) is None  # type: ignore[arg-type]
        assert left.fileno() == -1 and forgotten == ["hostcontrol"]
        assert manager.handed_back == {}
    finally:
        left.close()
        peer.close()


@ROOT_ONLY
def test_without_a_store_the_hosts_control_socket_is_bound_anew(
    nobody_repo: tuple[Path, str]
) -> None:
    """No store: while swapguard is down the host's connect is refused; the next one binds a new
    socket at the same path, which answers."""
    repo, python = nobody_repo
    host = {"command": [python, "host.py"], "user": "nobody"}
    with standin(repo, store=False, host=host) as (sup, manager):
        sup.wait_host(ready=True)
        host_socket = sup.state / "host" / "control.sock"
        inode = host_socket.lstat().st_ino
        before, connected = _ask_while_swapguard_is_down(sup, manager, repo, "GET /v1/status")
        assert not connected
        assert "refused" in _answer(repo)
        wait_for(lambda: sup.status()["supervisor"]["pid"] != before, what="the next swapguard")
        wait_for(lambda: host_socket.lstat().st_ino != inode, what="a new socket at the path")
        (repo / "answer.json").unlink()
        (repo / "ask-now").write_text("GET /v1/status")
        answer = _answer(repo)
        assert answer["status"] == 200 and answer["body"]["supervisor"]["pid"] != before


@ROOT_ONLY
def test_a_socket_bound_anew_replaces_the_stale_one_in_the_store(
    nobody_repo: tuple[Path, str]
) -> None:
    """The host removed its control socket's file while swapguard was down: the stored socket is
    not taken back (nothing connects to it any more) and a new one is bound, which replaces the
    stale one in the store (systemd keeps every fd sent under a name). At the next restart the
    new one comes back, and a request the host made meanwhile is answered."""
    repo, python = nobody_repo
    host = {"command": [python, "host.py"], "user": "nobody"}
    with standin(repo, store=True, host=host) as (sup, manager):
        sup.wait_host(ready=True)
        host_socket = sup.state / "host" / "control.sock"
        first = sup.status()["supervisor"]["pid"]
        manager.send_signal(signal.SIGSTOP)
        try:
            os.kill(first, signal.SIGKILL)
            wait_for(lambda: gone(first), what="swapguard dead")
            host_socket.unlink()  # what the host may do in its folder
        finally:
            manager.send_signal(signal.SIGCONT)
        wait_for(lambda: sup.status()["supervisor"]["pid"] != first, what="the next swapguard")
        assert sup.output().count("does not listen at") == 1
        _, connected = _ask_while_swapguard_is_down(sup, manager, repo, "GET /v1/status")
        assert connected
        answer = _answer(repo)
        assert answer["status"] == 200 and answer["body"]["supervisor"]["pid"] != first
        assert sup.output().count("does not listen at") == 1  # the new one was taken back
