"""host.user / host.group: the host runs unprivileged under a root swapguard (issue 14, item 3).

Real: swapguard runs as root here, the host as `nobody` (65534), in a tree that user owns; its
sockets sit in a folder only it may enter; git works on the tree; a rollback gives every path back
the owner and mode the checkpoint recorded.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.code.checkpoint import CodeTree
from supervisor.control.notifysocket import NotifyServer
from supervisor.control.server import ControlServer
from supervisor.errors import ConfigError
from supervisor.process import host, identity, jobs, outputlog
from supervisor.state.lock import prepare_state_dir, share_with_host
from tests.support import git, supervised, wait_for
from tests.test_api import SwapBackend

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
REPO_ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534

HOST = r'''
import json, os, socket, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))

def notify(message):
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(os.environ["NOTIFY_SOCKET"])
            sock.sendall(message.encode())
    except OSError:
        pass  # swapguard restarting: it adopts us and hears the next one

app = json.load(open(os.path.join(HERE, "app.json")))
names = ("HOME", "USER", "LOGNAME", "SHELL", "NOTIFY_SOCKET", "SWAPGUARD_SOCKET")
facts = {"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
         "env": {name: os.environ.get(name) for name in names}, "version": app["version"],
         "cgroup": open("/proc/self/cgroup").read(), "swap": os.environ.get("SWAPGUARD_SWAP_ID")}
try:
    os.listdir(os.path.dirname(os.environ["NOTIFY_SOCKET"]) + "/..")
    facts["lists_state_dir"] = True
except OSError:
    facts["lists_state_dir"] = False
with open(os.path.join(HERE, "facts.jsonl"), "a") as out:
    out.write(json.dumps(facts) + "\n")
import sqlite3
os.makedirs(os.path.join(HERE, "data"), exist_ok=True)
db = sqlite3.connect(os.path.join(HERE, "data", "app.db"), isolation_level=None)
db.execute("PRAGMA journal_mode=wal")
db.execute("CREATE TABLE IF NOT EXISTS starts (version TEXT)")
db.execute("INSERT INTO starts VALUES (?)", (app["version"],))
notify("READY=1")
swap = os.environ.get("SWAPGUARD_SWAP_ID")
if swap and app.get("confirm"):
    from supervisor.client import Client
    with Client(os.environ["SWAPGUARD_SOCKET"], timeout=30) as client:
        client.confirm(swap)
beats = 0
while True:
    beats += 1
    notify(f"WATCHDOG=1\nSTATUS={app['version']} {beats} beats")
    time.sleep(0.2)
'''


def _python_for(uid: int) -> str | None:
    """An interpreter `uid` can run (ours may sit below a folder only root may enter)."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            done = subprocess.run(
                [candidate, "-c", "import sqlite3"], user=uid, group=uid, extra_groups=[],
                capture_output=True, timeout=30, cwd="/",
            )
        except OSError:
            continue
        if done.returncode == 0:
            return candidate
    return None


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A folder `nobody` may reach (pytest's tmp_path sits below a 0700 folder of root's)."""
    folder = Path(tempfile.mkdtemp(prefix="sg-user-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    subprocess.run(["rm", "-rf", str(folder)], check=False)


def _nobody_repo(folder: Path) -> Path:
    """A repo owned by nobody, but for one file of root's that the host may read only."""
    repo = folder / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "app.py").write_text(HOST)
    (repo / "app.json").write_text(json.dumps({"version": "v1"}))
    (repo / ".gitignore").write_text("facts.jsonl\ndata/\nbuilt.txt\n")
    (repo / "notes.txt").write_text("notes\n")
    (repo / "secret.txt").write_text("secret\n")
    (repo / "config.ini").write_text("[root's]\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "v1")
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(repo)], check=True)
    os.chown(repo / "config.ini", 0, 0)
    (repo / "secret.txt").chmod(0o600)
    return repo


def _facts(repo: Path) -> list[dict[str, Any]]:
    path = repo / "facts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _owner_mode(path: Path) -> tuple[int, int, int]:
    info = path.lstat()
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


# --- the host, end to end ------------------------------------------------------------------------


@ROOT_ONLY
def test_host_as_nobody_heartbeats_confirms_and_rolls_back_owners(public_dir: Path) -> None:
    python = _python_for(NOBODY)
    if python is None:
        pytest.skip("no Python interpreter that nobody may run")
    repo = _nobody_repo(public_dir)
    host = {"command": [python, "app.py"], "user": "nobody", "heartbeat_timeout": "10s",
            "env": {"PYTHONPATH": str(REPO_ROOT)}}
    build = [python, "-c", "import os; open('built.txt', 'a').write(f'{os.getuid()}\\n')"]
    with supervised(repo, host=host, code={"build": build}) as sup:
        sup.start()
        first = wait_for(lambda: _facts(repo), what="the host's facts")[0]
        entry = pwd.getpwnam("nobody")
        assert (first["uid"], first["gid"]) == (NOBODY, entry.pw_gid)
        assert first["groups"] == sorted(set(os.getgrouplist("nobody", entry.pw_gid)))
        assert first["env"]["HOME"] == entry.pw_dir
        assert first["env"]["USER"] == first["env"]["LOGNAME"] == "nobody"
        assert first["env"]["SHELL"] == entry.pw_shell
        host_dir = sup.state / "host"
        assert first["env"]["NOTIFY_SOCKET"] == str(host_dir / "notify.sock")
        assert first["env"]["SWAPGUARD_SOCKET"] == str(host_dir / "control.sock")
        assert first["lists_state_dir"] is False  # it passes through state.dir, nothing more
        if Path("/sys/fs/cgroup/unified/swapguard").exists() or Path(
            "/sys/fs/cgroup/swapguard"
        ).exists():
            assert "/swapguard/" in first["cgroup"]  # moved in by us before it ran
        # the state dir stays private; the host's folder is the host's alone
        assert _owner_mode(sup.state) == (0, entry.pw_gid, 0o710)
        assert _owner_mode(host_dir) == (NOBODY, entry.pw_gid, 0o700)
        wait_for(lambda: (sup.status()["host"]["status_text"] or "") >= "v1 3 beats",
                 what="heartbeats from the unprivileged host")

        # a swap the new version confirms itself, through its own control socket
        swap = sup.client.prepare("v2")
        (repo / "app.json").write_text(json.dumps({"version": "v2", "confirm": True}))
        sup.client.activate(swap["id"])
        sup.wait_swap(swap["id"], "confirmed", timeout=40)
        assert any(f["version"] == "v2" and f["swap"] == swap["id"] for f in _facts(repo))
        # its build ran as the host's user, not as root
        assert (repo / "built.txt").read_text().split() == [str(NOBODY)]
        assert _owner_mode(repo / "built.txt")[0] == NOBODY

        # a swap whose new version chowns, chmods and replaces files, then is rolled back
        before = {name: _owner_mode(repo / name)
                  for name in ("config.ini", "secret.txt", "notes.txt", "app.json", "data/app.db")}
        assert before["data/app.db"][:2] == (NOBODY, entry.pw_gid)
        swap = sup.client.prepare("v3")
        (repo / "app.json").write_text(json.dumps({"version": "v3"}))
        (repo / "config.ini").unlink()  # replaced by the host's own copy
        (repo / "config.ini").write_text("[nobody's]\n")
        os.chown(repo / "config.ini", NOBODY, NOBODY)
        (repo / "secret.txt").chmod(0o644)
        os.chown(repo / "notes.txt", 4242, 4242)
        sup.client.activate(swap["id"])
        sup.wait_swap(swap["id"], "probation")
        wait_for(lambda: any(f["version"] == "v3" for f in _facts(repo)), what="v3 to start")
        os.chown(repo / "data/app.db", 4242, 4242)  # what a new version of root's could do
        (repo / "data/app.db").chmod(0o666)
        sup.client.rollback(swap["id"], reason="test")
        sup.wait_swap(swap["id"], "rolled_back", timeout=40)
        after = {name: _owner_mode(repo / name) for name in before}
        assert after == before
        assert (repo / "config.ini").read_text() == "[root's]\n"
        kept = list((repo / "data").glob(f"app.db.rolled-back-{swap['id']}*"))
        assert kept, "the probation-time data is kept beside"
        sup.wait_host(ready=True)
        assert sup.stop() == 0


@ROOT_ONLY
def test_a_restarted_swapguard_adopts_the_unprivileged_host_and_hears_it(public_dir: Path) -> None:
    python = _python_for(NOBODY)
    if python is None:
        pytest.skip("no Python interpreter that nobody may run")
    repo = _nobody_repo(public_dir)
    host = {"command": [python, "app.py"], "user": "nobody", "heartbeat_timeout": "10s"}
    with supervised(repo, host=host, data=False) as sup:
        sup.start()
        pid = sup.status()["host"]["pid"]
        sup.kill9()
        sup.start(wait_ready=False)

        def beats() -> int:
            text = sup.status()["host"]["status_text"] or ""
            return int(text.split()[1]) if text.startswith("v1 ") else 0
        seen = wait_for(beats, what="a heartbeat heard by the new swapguard")
        wait_for(lambda: beats() > seen, what="heartbeats going on")
        host_now = sup.wait_host(ready=True)
        assert host_now["pid"] == pid and host_now["restarts"] == 0
        assert sup.stop() == 0


# --- the host's folder --------------------------------------------------------------------------


@ROOT_ONLY
def test_what_the_host_plants_in_its_folder_is_replaced_never_followed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    prepare_state_dir(state)
    share_with_host(state, state / "host", NOBODY, NOBODY)
    assert _owner_mode(state) == (0, NOBODY, 0o710)
    assert _owner_mode(state / "host") == (NOBODY, NOBODY, 0o700)
    victim = tmp_path / "victim"
    victim.write_text("root's\n")
    victim.chmod(0o600)
    for name in ("notify.sock", "control.sock"):  # the host's own doing, as nobody could
        (state / "host" / name).symlink_to(victim)
    notify = NotifyServer(state / "host" / "notify.sock", staging_dir=state)
    control = ControlServer(state / "host" / "control.sock", SwapBackend(), mode=0o666,
                            staging_dir=state)
    try:
        assert _owner_mode(victim) == (0, 0, 0o600)
        assert victim.read_text() == "root's\n"
        for name in ("notify.sock", "control.sock"):
            assert stat.S_ISSOCK((state / "host" / name).lstat().st_mode)
        assert not list(state.glob("*.sock~"))  # no staging name left behind
        # the socket bound under its staging name is known again (our manager's fd store)
        again = NotifyServer(state / "host" / "notify.sock", notify.bound_socket.dup(),
                             staging_dir=state)
        assert again.inherited
        again.close()
    finally:
        control.close()
        notify.close()
    share_with_host(state, None)  # host.user removed: the state dir is closed again
    assert _owner_mode(state)[2] == 0o700


@ROOT_ONLY
def test_the_hosts_control_socket_is_taken_back_only_where_it_was_renamed_in(
    tmp_path: Path,
) -> None:
    """From our manager's fd store (`hostcontrol`): taken back while its file is at the path,
    and never chmodded there (the folder is the host's); replaced by a symlink, bound anew."""
    state = tmp_path / "state"
    prepare_state_dir(state)
    share_with_host(state, state / "host", NOBODY, NOBODY)
    path = state / "host" / "control.sock"
    control = ControlServer(path, SwapBackend(), mode=0o666, staging_dir=state)
    try:
        inode = path.lstat().st_ino
        os.chmod(path, 0o640)  # a mode no take may touch: it would be a chmod through the folder
        again = ControlServer(path, SwapBackend(), mode=0o666, staging_dir=state,
                              inherited=control.listening_socket.dup())
        assert again.inherited
        assert path.lstat().st_ino == inode and _owner_mode(path)[2] == 0o640
        again.close()  # a clean stop: its file goes
        assert not path.exists()
        victim = tmp_path / "victim"
        victim.write_text("root's\n")
        victim.chmod(0o600)
        path.symlink_to(victim)  # the host's doing, where the stored socket was
        third = ControlServer(path, SwapBackend(), mode=0o666, staging_dir=state,
                              inherited=control.listening_socket.dup())
        try:
            assert not third.inherited
            assert stat.S_ISSOCK(path.lstat().st_mode) and _owner_mode(path)[2] == 0o666
            assert _owner_mode(victim) == (0, 0, 0o600) and victim.read_text() == "root's\n"
        finally:
            third.close()
    finally:
        control.close()


@ROOT_ONLY
def test_a_folder_the_host_left_where_a_socket_goes_is_moved_aside(tmp_path: Path) -> None:
    state = tmp_path / "state"
    prepare_state_dir(state)
    share_with_host(state, state / "host", NOBODY, NOBODY)
    for name in ("notify.sock", "control.sock"):  # non-empty folders, as nobody could leave
        (state / "host" / name / "deep").mkdir(parents=True)
        (state / "host" / name / "deep" / "keep").write_text(name)
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(state / "host" / name)],
                       check=True)
    notify = NotifyServer(state / "host" / "notify.sock", staging_dir=state)
    control = ControlServer(state / "host" / "control.sock", SwapBackend(), mode=0o666,
                            staging_dir=state)
    try:
        for name in ("notify.sock", "control.sock"):
            assert stat.S_ISSOCK((state / "host" / name).lstat().st_mode)
        aside = sorted((state / "host").glob(".obstacle-*"))
        assert sorted((p / "deep" / "keep").read_text() for p in aside) == [
            "control.sock", "notify.sock"]  # moved, never followed nor deleted
        assert all(_owner_mode(p)[0] == NOBODY for p in aside)
        assert not list(state.glob("*.sock~"))
    finally:
        control.close()
        notify.close()


def _hostile_logs(public_dir: Path) -> tuple[Path, Path]:
    """The host's tree, nobody's, and a folder of root's only (stands for /etc/cron.d)."""
    tree, victim = public_dir / "tree", public_dir / "root-only"
    tree.mkdir()
    os.chown(tree, NOBODY, NOBODY)
    victim.mkdir(mode=0o700)
    return tree, victim


@ROOT_ONLY
def test_the_hosts_output_is_opened_through_no_symlink(public_dir: Path) -> None:
    tree, victim = _hostile_logs(public_dir)
    (tree / "logs").symlink_to(victim)  # the hostile version's doing
    os.lchown(tree / "logs", NOBODY, NOBODY)
    user = identity.resolve("nobody")
    spec = host.SpawnSpec(argv=("/bin/sh", "-c", "echo '* * * * * root /tmp/evil'"), cwd=tree,
                          env={"PATH": "/usr/bin:/bin"}, output=tree / "logs" / "host.log",
                          user=user)
    with pytest.raises(host.SpawnError, match=r"logs is not a folder \(a symlink is not followed"):
        host.HostProcess.spawn(spec, None)
    assert list(victim.iterdir()) == []
    (tree / "logs").unlink()
    (tree / "logs").mkdir()
    (victim / "secret").write_text("root's\n")
    os.link(victim / "secret", tree / "logs" / "host.log")  # as fs.protected_hardlinks=0 allows
    with pytest.raises(OSError, match="single link"):
        outputlog.open_for(tree / "logs" / "host.log", user)
    assert (victim / "secret").read_text() == "root's\n"


@ROOT_ONLY
def test_the_output_logger_runs_as_the_host_and_follows_no_swapped_folder(
    public_dir: Path,
) -> None:
    tree, victim = _hostile_logs(public_dir)
    (tree / "logs").mkdir()
    os.chown(tree / "logs", NOBODY, NOBODY)
    path = tree / "logs" / "host.log"
    fd = outputlog.start(path, 10**9, 1, identity.resolve("nobody"))
    try:
        (pid,) = outputlog._live
        os.write(fd, b"before\n")
        wait_for(lambda: path.read_bytes() == b"before\n", what="the first line")
        logger = psutil.Process(pid)  # it dropped to nobody before it read a byte
        assert (logger.uids().real, logger.uids().effective, logger.uids().saved) == (NOBODY,) * 3
        assert logger.gids().effective == pwd.getpwnam("nobody").pw_gid
        # the hostile version: its log folder swapped for a link to a folder of root's
        (tree / "logs").rename(tree / "logs.old")
        (tree / "logs").symlink_to(victim)
        outputlog.reopen()
        os.write(fd, b"after\n")
        old = tree / "logs.old" / "host.log"
        wait_for(lambda: old.read_bytes() == b"before\nafter\n", what="the output kept")
        assert list(victim.iterdir()) == []  # nobody may not create a file there
    finally:
        os.close(fd)
    wait_for(lambda: not outputlog._live, what="the logger to exit")


# --- identity ------------------------------------------------------------------------------------


def test_an_unknown_user_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="unknown user 'no-such-user-sg'") as caught:
        identity.resolve("no-such-user-sg")
    assert caught.value.key == "host.user"
    with pytest.raises(ConfigError, match="unknown group") as caught:
        identity.resolve("nobody", "no-such-group-sg")
    assert caught.value.key == "host.group"


def test_a_uid_without_an_entry_needs_a_group() -> None:
    free = next(uid for uid in range(42420, 42520) if not _has_entry(uid))
    with pytest.raises(ConfigError, match=r"set host\.group") as caught:
        identity.resolve(str(free))
    assert caught.value.key == "host.user"
    if os.geteuid() == 0:
        found = identity.resolve(str(free), "4242")
        assert found is not None and (found.uid, found.gid, found.groups) == (free, 4242, ())


def _has_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_check_refuses_an_unknown_user(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    config = tmp_path / "swapguard.toml"
    config.write_text(f'[host]\ncommand = ["true"]\nuser = "no-such-user-sg"\n'
                      f'[code]\nroot = "{repo}"\n')
    done = subprocess.run([sys.executable, "-m", "supervisor", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "host.user" in done.stderr and "no-such-user-sg" in done.stderr


@ROOT_ONLY
def test_check_refuses_a_state_dir_the_host_cannot_reach(tmp_path: Path) -> None:
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    config = tmp_path / "swapguard.toml"
    config.write_text(f'[host]\ncommand = ["true"]\nuser = "nobody"\n[code]\nroot = "{repo}"\n'
                      f'[state]\ndir = "{hidden}/state"\n')
    done = subprocess.run([sys.executable, "-m", "supervisor", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "state.dir" in done.stderr and "cannot pass through" in done.stderr


@ROOT_ONLY
def test_unprivileged_swapguard_may_name_only_its_own_user(public_dir: Path) -> None:
    python = _python_for(NOBODY)
    if python is None:
        pytest.skip("no Python interpreter that nobody may run")
    probe = (
        "from supervisor.process import identity\n"
        "from supervisor.errors import ConfigError\n"
        "assert identity.resolve('nobody').popen_args() == {}\n"
        "try:\n    identity.resolve('root')\n"
        "except ConfigError as e:\n    print(e.key, e.message)\n"
    )
    done = subprocess.run([python, "-c", probe], user=NOBODY, group=NOBODY, extra_groups=[],
                          capture_output=True, text=True, timeout=60, cwd="/",
                          env={"PYTHONPATH": str(REPO_ROOT), "PATH": os.defpath})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("host.user ") and "needs swapguard to run as root" in done.stdout


@ROOT_ONLY
def test_a_job_of_the_hosts_user_runs_as_it_inside_its_own_leaf(public_dir: Path) -> None:
    python = _python_for(NOBODY)
    if python is None:
        pytest.skip("no Python interpreter that nobody may run")
    user = identity.resolve("nobody")
    probe = "import os; print(os.getuid(), os.environ['USER'], open('/proc/self/cgroup').read())"
    result = jobs.run_job([python, "-c", probe], cwd=public_dir, timeout=60, user=user)
    assert result.ok, result.output
    uid, name, cgroups = result.output.split(" ", 2)
    assert (int(uid), name) == (NOBODY, "nobody")
    if Path("/sys/fs/cgroup/unified/swapguard").exists() or Path(
        "/sys/fs/cgroup/swapguard"
    ).exists():
        assert "/swapguard/job-" in cgroups


# --- git on a tree another user owns ----------------------------------------------------------


@ROOT_ONLY
def test_git_works_on_a_tree_owned_by_another_uid(public_dir: Path) -> None:
    repo = _nobody_repo(public_dir)
    os.chown(repo, 0, 0)  # the folder root's, the repository nobody's: git (as root) would stop
    plain = subprocess.run(["git", "-C", str(repo), "status"], capture_output=True, text=True)
    assert "dubious ownership" in plain.stderr
    home = Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".gitconfig"
    config_before = home.read_bytes() if home.exists() else None
    tree = CodeTree(repo)
    tree.check_work_tree()
    cp = tree.take("one")
    (repo / "notes.txt").write_text("changed\n")
    os.chown(repo / "notes.txt", 4242, 4343)
    assert [c.path for c in tree.changes(cp)] == ["notes.txt"]
    tree.restore(cp, name="one")
    assert (repo / "notes.txt").read_text() == "notes\n"
    assert _owner_mode(repo / "notes.txt")[:2] == (NOBODY, NOBODY)
    assert _owner_mode(repo / "config.ini")[:2] == (0, 0)
    assert (home.read_bytes() if home.exists() else None) == config_before


# --- what the host could replace (review: a host-writable config or state.dir hands it root) ----


def _check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


@ROOT_ONLY
def test_check_refuses_a_config_state_dir_or_socket_folder_the_host_could_replace(
    public_dir: Path,
) -> None:
    repo = public_dir / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", str(repo)], check=True)
    (repo / ".swapguard").mkdir(mode=0o700)  # root's, in a tree nobody may rename it out of
    etc = public_dir / "etc"
    etc.mkdir(mode=0o755)
    state = public_dir / "state"

    def config_in(folder: Path, state_line: str, control: str = "") -> Path:
        path = folder / "swapguard.toml"
        path.write_text(f'[host]\ncommand = ["true"]\nuser = "nobody"\n[code]\nroot = "{repo}"\n'
                        f"{state_line}{control}")
        os.chown(path, 0, 0)
        return path

    # the config in the host's own tree: it could edit hooks.on_event (run as root)
    done = _check(config_in(repo, f'[state]\ndir = "{state}"\n'))
    assert done.returncode == 2
    assert "host.user" in done.stderr and f"config file {repo}/swapguard.toml" in done.stderr
    # the default state.dir, in the host's tree: `mv .swapguard old && mkdir .swapguard`
    done = _check(config_in(etc, f'[state]\ndir = "{repo}/.swapguard"\n'))
    assert done.returncode == 2
    assert "state.dir" in done.stderr and f"may write or replace {repo}," in done.stderr
    # a control socket in a folder the host's group may write
    shared = public_dir / "shared"
    shared.mkdir()
    os.chown(shared, 0, pwd.getpwnam("nobody").pw_gid)
    shared.chmod(0o1770)
    control = f'[control]\nsocket = "{shared}/c.sock"\n'
    done = _check(config_in(etc, f'[state]\ndir = "{state}"\n', control))
    assert done.returncode == 2
    assert "control.socket" in done.stderr and str(shared) in done.stderr
    assert not state.exists()  # refused before anything was made
    # all of it root's: accepted
    done = _check(config_in(etc, f'[state]\ndir = "{state}"\n'))
    assert done.returncode == 0, done.stderr
    # a rotated output in a folder the logger (as the host's user) could not rotate in
    rotated = f'output = "{etc}/host.log"\noutput_max_bytes = "1MB"\n'
    path = etc / "swapguard.toml"
    path.write_text(path.read_text().replace('user = "nobody"\n', f'user = "nobody"\n{rotated}'))
    done = _check(path)
    assert done.returncode == 2
    assert "host.output" in done.stderr and f"rotates in {etc}, which" in done.stderr


@ROOT_ONLY
def test_may_replace_reads_sticky_folders_groups_and_links(public_dir: Path) -> None:
    user = identity.resolve("nobody")
    assert user is not None
    ours = public_dir / "ours"
    ours.mkdir()
    assert user.may_replace(ours / "missing") is None  # root's all the way: made by swapguard
    sticky = public_dir / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "roots").mkdir()
    assert user.may_replace(sticky / "roots" / "x") is None  # root's entry in a sticky folder
    assert user.may_replace(sticky / "unmade") == sticky  # the host could make it first
    (sticky / "hosts").mkdir()
    os.chown(sticky / "hosts", NOBODY, NOBODY)
    assert user.may_replace(sticky / "hosts" / "x") == sticky
    (ours / "f").write_text("")
    (ours / "f").chmod(0o646)
    assert user.may_replace(ours / "f") == ours / "f"  # o+w
    (ours / "f").chmod(0o644)
    assert user.may_replace(ours / "f") is None
    (ours / "link").symlink_to(sticky / "hosts")  # a safe link to an unsafe place
    assert user.may_replace(ours / "link") == sticky
    assert identity.resolve("root").may_replace(sticky / "hosts") is None  # type: ignore[union-attr]


# --- a new version running as the tree's owner must not survive its rollback ---------------------


def _as_nobody(script: str) -> None:
    subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "sh", "-c", script],
        check=True,
    )


@ROOT_ONLY
def test_the_owner_can_read_but_never_rewrite_our_excludes_files(public_dir: Path) -> None:
    """A pattern the host's user could add to the excludes git reads would hide any file of the
    new version from the capture, so it would survive the rollback."""
    repo = _nobody_repo(public_dir)
    tree = CodeTree(repo)
    cp = tree.take("one")
    merged, ours, builtin = tree._git._prepare_excludes()
    for path in (merged, ours, builtin):
        assert _owner_mode(Path(path)) == (0, NOBODY, 0o640)
        assert _owner_mode(Path(path).parent)[0] == 0
        assert stat.S_IMODE(Path(path).parent.stat().st_mode) & 0o022 == 0
    with pytest.raises(subprocess.CalledProcessError):
        _as_nobody(f"echo json.py >> {merged}")
    _as_nobody(f"echo 'def dumps(x): return 1' > {repo}/json.py")
    assert [c.path for c in tree.changes(cp)] == ["json.py"]
    tree.restore(cp, name="one")
    assert not (repo / "json.py").exists()


@ROOT_ONLY
@pytest.mark.parametrize("attack", ["folder_0111", "modified_000", "added_000"])
def test_what_the_owner_made_unreadable_is_captured_and_restored(
    public_dir: Path, attack: str
) -> None:
    """git runs as the tree's owner and passes over what it cannot read: a package folder of
    mode 0111 would survive the rollback (shadowing the stdlib), a file of mode 000 would fail
    every restore."""
    repo = _nobody_repo(public_dir)
    tree = CodeTree(repo)
    cp = tree.take("one")
    if attack == "folder_0111":
        _as_nobody(f"mkdir {repo}/json && echo 'def dumps(x): return 1' > {repo}/json/__init__.py"
                   f" && chmod 0111 {repo}/json")  # fmt: skip
    elif attack == "modified_000":
        _as_nobody(f"echo new > {repo}/notes.txt && chmod 000 {repo}/notes.txt")
    else:
        _as_nobody(f"echo new > {repo}/added.txt && chmod 000 {repo}/added.txt")
    tree.restore(cp, name="one")
    assert not os.path.lexists(repo / "json")
    assert not os.path.lexists(repo / "added.txt")
    assert (repo / "notes.txt").read_text() == "notes\n"
    assert _owner_mode(repo / "notes.txt") == (NOBODY, NOBODY, 0o644)
    assert _owner_mode(repo / "secret.txt") == (NOBODY, NOBODY, 0o600)
    assert not tree.differs(cp)


@ROOT_ONLY
@pytest.mark.parametrize("victim_mode", [0o644, 0o600])
def test_a_restore_never_chowns_nor_chmods_a_file_outside_through_a_hard_link(
    public_dir: Path, victim_mode: int
) -> None:
    """The new version links a file of root's in place of a file of the same content (git sees
    no change) or of another: the restore must reach neither file outside the tree (one git
    may read is rewritten from the checkpoint; one it may not is unlinked first)."""
    repo = _nobody_repo(public_dir)
    same, other = public_dir / "same-victim", public_dir / "other-victim"
    same.write_text("notes\n")  # notes.txt's content
    other.write_text("root's\n")
    for victim in (same, other):
        victim.chmod(victim_mode)
    tree = CodeTree(repo)
    cp = tree.take("one")
    for name, victim in (("notes.txt", same), ("app.json", other)):
        (repo / name).unlink()
        os.link(victim, repo / name)  # (as root: fs.protected_hardlinks stops nobody here)
    tree.restore(cp, name="one")
    for victim in (same, other):
        assert _owner_mode(victim) == (0, 0, victim_mode)
        assert victim.stat().st_nlink == 1
    assert (repo / "notes.txt").read_text() == "notes\n"
    assert _owner_mode(repo / "notes.txt") == (NOBODY, NOBODY, 0o644)
    assert _owner_mode(repo / "app.json")[:2] == (NOBODY, NOBODY)
    assert not tree.differs(cp)


@ROOT_ONLY
def test_the_users_excludes_file_is_opened_only_if_regular(public_dir: Path) -> None:
    """core.excludesFile comes from a config the owner writes: a FIFO, a device or a folder
    there is never opened for reading (a device acts on open); a link to a file is followed."""
    repo = _nobody_repo(public_dir)
    (repo / "extra.txt").write_text("untracked\n")
    os.chown(repo / "extra.txt", NOBODY, NOBODY)
    fifo = public_dir / "fifo"
    os.mkfifo(fifo)
    os.chown(fifo, NOBODY, NOBODY)
    for named in (str(fifo), "/dev/zero", str(public_dir)):
        _set_excludes_file(repo, named)
        started = time.monotonic()
        assert "extra.txt" in _captured(CodeTree(repo))
        assert time.monotonic() - started < 30
    patterns = public_dir / "ignore"
    patterns.write_text("extra.txt\n")
    os.chown(patterns, NOBODY, NOBODY)
    (public_dir / "link").symlink_to(patterns)
    _set_excludes_file(repo, str(public_dir / "link"))
    assert "extra.txt" not in _captured(CodeTree(repo))


def _captured(tree: CodeTree) -> set[str]:
    commit = tree.take("cap").commit
    listed = tree._git.out("ls-tree", "-r", "-z", "--name-only", commit)
    return set(filter(None, listed.split("\0")))


def _set_excludes_file(repo: Path, path: str) -> None:
    config = ["git", "-c", f"safe.directory={repo}", "-C", str(repo), "config"]
    subprocess.run([*config, "core.excludesFile", path], check=True)
