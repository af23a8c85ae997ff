"""Issue 13 beyond the HTTP layer: timed-out requests, the state directory, check vs run, jobs."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from supervisor.client import Client
from supervisor.daemon.service import LoopBackend
from supervisor.errors import NotReachable
from supervisor.state.store import StateLock, Store, StoreError
from tests.support import git, make_sample_repo, supervised, wait_for, write_app

WAIT_S = 10.0


class RecordingRuntime:
    """The part of the runtime LoopBackend calls: a prepare that commits after its last await."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.config = SimpleNamespace(control=SimpleNamespace(allow_users=(), allow_groups=()))
        self.committed: list[str] = []
        self.checkpointed: asyncio.Event | None = None

    async def prepare(self, summary: str) -> Any:
        self.checkpointed = asyncio.Event()
        await self.checkpointed.wait()  # the checkpoint in a worker thread
        self.committed.append(summary)
        raise AssertionError("a timed-out prepare went on to commit")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(WAIT_S)
    loop.close()


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(_call(fn), loop).result(WAIT_S)


async def _call(fn: Any) -> Any:
    return fn()


def test_a_request_that_timed_out_before_the_loop_took_it_is_never_run(
    loop: asyncio.AbstractEventLoop,
) -> None:
    runtime = RecordingRuntime(loop)
    backend = LoopBackend(runtime)  # type: ignore[arg-type]
    backend.call_limit = 0.2
    stuck = threading.Event()
    loop.call_soon_threadsafe(stuck.wait, WAIT_S)  # the loop is busy (a stall)
    with pytest.raises(NotReachable, match="was not applied"):
        backend.prepare_swap("late")
    stuck.set()
    assert _on_loop(loop, lambda: runtime.checkpointed) is None  # prepare was never called
    assert runtime.committed == []


def test_a_request_that_timed_out_under_way_is_cancelled_and_never_commits(
    loop: asyncio.AbstractEventLoop,
) -> None:
    runtime = RecordingRuntime(loop)
    backend = LoopBackend(runtime)  # type: ignore[arg-type]
    backend.call_limit = 0.2
    with pytest.raises(NotReachable, match="was cancelled"):
        backend.prepare_swap("slow checkpoint")
    event = _on_loop(loop, lambda: runtime.checkpointed)
    assert event is not None  # it had started
    _on_loop(loop, event.set)  # the checkpoint ends after the answer
    _on_loop(loop, lambda: None)  # one more turn of the loop
    assert runtime.committed == []


# --- a state directory nobody else controls ----------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as nobody")


def _nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


@needs_root
def test_a_state_dir_owned_by_another_user_is_refused_and_its_symlink_not_written(
    tmp_path: Path,
) -> None:
    """The attack: nobody owns state.dir and plants lock -> victim; root swapguard must not
    truncate the victim (it did, writing its pid into it)."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "lock").symlink_to(victim)
    os.lchown(state / "lock", _nobody().pw_uid, _nobody().pw_gid)
    os.chown(state, _nobody().pw_uid, _nobody().pw_gid)
    with pytest.raises(StoreError, match=f"state dir {state} is owned by uid {_nobody().pw_uid}"):
        StateLock.acquire(state)
    with pytest.raises(StoreError, match="not by swapguard's user"):
        Store.open(state)
    assert victim.read_text() == "precious\n"


def test_a_planted_symlink_in_an_own_state_dir_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    for name in ("lock", "state.db", "state.db-wal", "state.db-journal"):
        state = tmp_path / f"state-{name}"
        state.mkdir(mode=0o700)
        (state / name).symlink_to(victim)
        with (
            pytest.raises(StoreError, match=f"{state / name} is a symlink"),
            StateLock.acquire(state),
        ):
            Store.open(state).close()
        assert victim.read_text() == "precious\n"
    hard = tmp_path / "state-hard"
    hard.mkdir(mode=0o700)
    os.link(victim, hard / "lock")
    with pytest.raises(StoreError, match="2 hard links"):
        StateLock.acquire(hard)
    assert victim.read_text() == "precious\n"


def test_state_dirs_and_parents_get_safe_modes_under_umask_000(tmp_path: Path) -> None:
    state = tmp_path / "a" / "b" / "state"
    old = os.umask(0)
    try:
        with StateLock.acquire(state):
            Store.open(state).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o755
    assert stat.S_IMODE((state / "lock").stat().st_mode) == 0o600


# --- write rights belong to the peer process, not to its pid number ----------------------------


@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
@pytest.mark.parametrize("pinning", ["peerpidfd", "pidfd_open"])
def test_pid_reuse_gives_no_write_right(pinning: str) -> None:
    """A reader's connection, inherited by its child after the reader exits, stays read-only
    even once a process of the host's tree holds the reader's old pid."""
    root = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m",
             "tests.pid_reuse_attack", pinning],
            cwd=root, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the attack did not finish: {exc.stderr!r}")
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"no new pid namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["tree_pid"] == seen["reader"], "the host's child did not land on the reader's pid"
    assert seen["answer"].startswith("HTTP/1.1 403 "), seen
    assert "has exited; its write right ended with it" in seen["body"], seen
    assert seen["actions"] == []


@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_a_datagram_from_a_pid_now_in_the_tree_is_dropped() -> None:
    """The sender exited and a process of the host's tree took its pid before the datagram was
    read: SCM_PIDFD pins the sender, so the datagram is judged by it (dropped), not by its pid."""
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m",
         "tests.pid_reuse_attack", "notify"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"no new pid namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["tree_pid"] == seen["reader"], "the host's child did not land on the sender's pid"
    assert seen["received"] == 1 and seen["dropped"] == 1 and seen["fed"] == [], seen


@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_a_remembered_sender_is_judged_afresh_once_its_pid_is_someone_elses() -> None:
    """Known senders are remembered by pid while they live. A stranger that takes an exited tree
    sender's pid is dropped; a tree process that takes an exited stranger's pid is heard."""
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m",
         "tests.pid_reuse_attack", "notify-known"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"no new pid namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["stranger"] == seen["first_tree"], "the stranger did not land on the tree's pid"
    assert seen["second_tree"] == seen["other"], "the tree did not land on the stranger's pid"
    first, second = seen["first_tree"], seen["second_tree"]
    assert seen["after_a"] == {"fed": [f"tree{first}"], "dropped": 1}, seen
    assert seen["fed"] == [f"tree{first}", f"tree{second}"], seen
    assert seen["received"] == 4 and seen["dropped"] == 2, seen


# --- check refuses what run would refuse ---------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _git_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    return path


def _config(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    tables = {
        "host": {"command": ["sleep", "600"]},
        "code": {"root": str(tmp_path / "repo")},
        "control": {"socket": str(tmp_path / "c.sock")},
        "state": {"dir": str(tmp_path / "state")},
    }
    for name, values in sections.items():
        tables[name] = tables.get(name, {}) | values
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path = tmp_path / "swapguard.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _swapguard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _long_dir(tmp_path: Path, total: int) -> Path:
    """A folder whose path is `total` bytes long."""
    room = total - len(os.fsencode(tmp_path)) - 1
    assert room > 2, tmp_path
    return tmp_path / ("d" * room)


def _case(tmp_path: Path, case: str) -> tuple[Path, str]:
    """(config, the words the refusal must contain) for each thing `run` refuses."""
    _git_repo(tmp_path / "repo")
    if case == "staging socket name":
        folder = _long_dir(tmp_path, 100)
        folder.mkdir()
        return _config(tmp_path, control={"socket": str(folder / "c.sock")}), "temporary name"
    if case == "notify socket":
        state = _long_dir(tmp_path, 100)
        return _config(tmp_path, state={"dir": str(state)}), "notify socket"
    if case == "socket folder open to others":
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        return _config(tmp_path, control={"socket": str(shared / "c.sock")}), "sticky bit"
    if case == "unknown user":
        return _config(tmp_path, control={"allow_users": ["nosuchuser"]}), "unknown user"
    if case == "unknown group":
        return _config(tmp_path, control={"allow_groups": ["nosuchgroup"]}), "unknown group"
    if case == "not a git work tree":
        plain = tmp_path / "plain"
        plain.mkdir()
        return _config(tmp_path, code={"root": str(plain)}), "key 'code.root'"
    assert case == "state dir of another user"
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, _nobody().pw_uid, _nobody().pw_gid)
    return _config(tmp_path), "not by swapguard's user"


@pytest.mark.parametrize(
    "case",
    [
        "staging socket name",
        "notify socket",
        "socket folder open to others",
        "unknown user",
        "unknown group",
        "not a git work tree",
        pytest.param("state dir of another user", marks=needs_root),
    ],
)
def test_check_refuses_what_run_refuses_with_the_same_message(tmp_path: Path, case: str) -> None:
    config, words = _case(tmp_path, case)
    check = _swapguard("check", "--config", str(config))
    run = _swapguard("run", "--config", str(config))
    assert check.returncode == run.returncode == 2, (check, run)
    assert words in check.stderr and "Traceback" not in check.stderr + run.stderr, check.stderr
    assert check.stderr.strip() == run.stderr.strip().splitlines()[-1].strip(), (check, run)
    assert not (tmp_path / "c.sock").exists()


# --- no secrets to readers -----------------------------------------------------------------------


def _read_everything_as_nobody(socket_path: Path, swap_id: str) -> str:
    """Every read endpoint, as nobody, in a forked child; the answers as one text."""
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        code = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(_nobody().pw_gid)
            os.setuid(_nobody().pw_uid)
            with Client(socket_path) as client:
                seen = [client.status(), client.swaps(), client.swap(swap_id)]
                seen.append(client.events(after=0, limit=5000))
                seen.append(client.metrics())
            os.write(write_fd, json.dumps(seen).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0, "nobody could not read"
    return data.decode()


@needs_root
def test_a_build_that_prints_a_secret_leaks_it_to_no_reader(tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    (repo / "build.py").write_text(
        "import json, sys\nv = json.load(open('app.json'))['version']\n"
        "print('DB_PASSWORD=s3cret-' + v)\nsys.exit(v == 'v2')\n"
    )
    git(repo, "add", "build.py")
    git(repo, "commit", "-qm", "build script")
    with supervised(repo, code={"build": [sys.executable, "build.py"]}) as sup:
        sup.start()
        os.chmod(sup.state, 0o755)
        os.chmod(sup.socket, 0o666)
        swap = sup.client.prepare("a build that echoes its secrets")
        write_app(repo, {"version": "v2", "behaviour": "ok"})
        sup.client.activate(swap["id"])
        doc = sup.wait_swap(swap["id"], "rolled_back", timeout=40)
        assert doc["reason"] == "build_failed"
        seen = _read_everything_as_nobody(sup.socket, swap["id"])
        assert "s3cret" not in seen and "DB_PASSWORD" not in seen
        failed = [e for e in doc["events"] if "build exit 1" in json.dumps(e["detail"])]
        assert failed, doc["events"]
        name = re.search(r"output in (build-[0-9-]+-[0-9a-f]+\.log)", json.dumps(failed[0]))
        assert name is not None, failed[0]
        kept = sup.state / "output" / name[1]
        assert "DB_PASSWORD=s3cret-v2" in kept.read_text()
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
        assert "s3cret" not in sup.output()  # not in swapguard's own log either (DEBUG only)


@needs_root
def test_a_health_check_that_prints_a_secret_leaks_it_to_no_reader(tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    check = [
        sys.executable,
        "-c",
        "import json, sys\nv = json.load(open('app.json'))['version']\n"
        "print('API_TOKEN=s3cret-' + v)\nsys.exit(v != 'v1')\n",
    ]
    deadman = {"health_check": check, "health_interval": "300ms", "health_failures": 2}
    with supervised(repo, deadman=deadman) as sup:
        sup.start()
        os.chmod(sup.state, 0o755)
        os.chmod(sup.socket, 0o666)
        swap = sup.client.prepare("an unhealthy version whose check echoes a secret")
        write_app(repo, {"version": "v2", "behaviour": "ok"})
        sup.client.activate(swap["id"])
        doc = sup.wait_swap(swap["id"], "rolled_back", timeout=40)
        assert doc["reason"] == "health_failed"
        seen = _read_everything_as_nobody(sup.socket, swap["id"])
        assert "s3cret" not in seen and "API_TOKEN" not in seen
        assert re.search(r"exit 1; output in health-[0-9-]+-[0-9a-f]+\.log", seen), seen[-2000:]
        kept = sorted((sup.state / "output").glob("health-*.log"))
        assert any("API_TOKEN=s3cret-v2" in path.read_text() for path in kept)


def test_the_host_gets_only_the_allowed_environment(tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    dump = tmp_path / "env.json"
    host = {
        "inherit_env": ["PATH"],
        "env": {"PORT": "8080"},
        "ready": "started",
        "min_uptime": "0.1s",
        "command": [
            sys.executable,
            "-c",
            "import json, os, sys, time\n"
            f"json.dump(dict(os.environ), open({str(dump)!r} + '~', 'w'))\n"
            f"os.replace({str(dump)!r} + '~', {str(dump)!r})\n"
            "time.sleep(600)\n",
        ],
    }
    with supervised(repo, host=host, data=False) as sup:
        sup.start(env={"DB_PASSWORD": "s3cret"})
        env = json.loads(wait_for(lambda: (dump.exists() and dump.read_text()) or None))
    assert "DB_PASSWORD" not in env and env["PORT"] == "8080" and "PATH" in env
    assert env["SWAPGUARD_SOCKET"] == str(sup.socket) and "NOTIFY_SOCKET" in env
