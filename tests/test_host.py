"""The host's process layer with real processes, signals, pidfds and a real cgroup v2 leaf."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from supervisor import clock
from supervisor.process import host as host_module
from supervisor.process import jobs, proctree
from supervisor.process.host import (
    CgroupLeaf,
    ExitStatus,
    HostProcess,
    SpawnError,
    SpawnSpec,
    become_subreaper,
    is_in_tree,
    kill_tree,
    process_stats,
    reap_orphans,
)
from supervisor.process.proctree import StartStamp
from tests.support import gone, wait_for

PY = sys.executable
WAIT = 10.0
LINUX = sys.platform.startswith("linux")

# A host that ignores SIGTERM and starts (a) a grandchild that calls setsid and (b) a double-forked
# daemon; every process writes its pid to a file in argv[1] and then waits for a signal forever.
TREE_HOST = """
import os, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
out = sys.argv[1]

def report(name):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, os.path.join(out, name))

def park():
    while True:
        signal.pause()

if os.fork() == 0:
    os.setsid()
    report("setsid")
    park()
middle = os.fork()
if middle == 0:
    os.setsid()
    if os.fork() == 0:
        report("daemon")
        park()
    os._exit(0)
os.waitpid(middle, 0)
if os.fork() == 0:
    report("child")
    park()
report("host")
park()
"""






def read_pids(folder: Path, *names: str) -> dict[str, int]:
    for name in names:
        wait_for((folder / name).exists, what=f"{name} to report its pid")
    return {name: int((folder / name).read_text()) for name in names}


def wait_exit(host: HostProcess) -> ExitStatus:
    """Block on the pidfd (event-driven) and then poll; plain polling where there is no pidfd."""
    if host.exit_fd is not None:
        assert select.select([host.exit_fd], [], [], WAIT)[0], "host did not exit"
    wait_for(lambda: host.poll() is not None, what="the host's exit")
    status = host.poll()
    assert status is not None
    return status


def python_spec(tmp_path: Path, code: str, *args: str, **kwargs) -> SpawnSpec:
    return SpawnSpec(
        argv=(PY, "-S", "-c", code, *args),
        cwd=kwargs.pop("cwd", tmp_path),
        env=kwargs.pop("env", {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}),
        output=kwargs.pop("output", None),
    )


@pytest.fixture
def hosts() -> Iterator[list[HostProcess]]:
    """Every host a test starts is killed with its whole tree at teardown, even on failure."""
    started: list[HostProcess] = []
    yield started
    for host in started:
        kill_tree(host, None, timeout=WAIT)
        host.close()
    reap_orphans()


@pytest.fixture
def strays() -> Iterator[list[subprocess.Popen]]:
    """Helper processes a test starts itself; killed and reaped at teardown."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(WAIT)


@pytest.fixture
def cgroup_leaf() -> Iterator[CgroupLeaf]:
    leaf = CgroupLeaf.create(f"test-{uuid.uuid4().hex[:8]}")
    if leaf is None:
        pytest.skip("no writable cgroup v2 here")
    yield leaf
    leaf.kill()
    wait_for(lambda: not leaf.pids(), what="the test cgroup to empty")
    leaf.remove()
    assert not leaf.path.exists()
    with contextlib.suppress(OSError):
        leaf.path.parent.rmdir()  # only if no other leaf lives there


@pytest.fixture
def subreaper() -> None:
    if not become_subreaper():
        pytest.skip("no child subreaper on this platform")


def test_spawn_passes_env_and_cwd_appends_output_and_starts_a_new_session(
    tmp_path: Path, hosts
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    log_file = tmp_path / "host.log"
    code = (
        "import os, sys\n"
        "print('cwd', os.getcwd())\n"
        "print('token', os.environ['HOST_TOKEN'], 'has PATH', 'PATH' in os.environ)\n"
        "print(f'sid {os.getsid(0)} pid {os.getpid()}', flush=True)\n"
        "print('on stderr', file=sys.stderr)\n"
    )
    spec = python_spec(tmp_path, code, cwd=workdir, env={"HOST_TOKEN": "t0k"}, output=log_file)
    for _run in range(2):
        host = HostProcess.spawn(spec, None)
        hosts.append(host)
        assert host.is_child
        assert host.start.wall == pytest.approx(psutil.Process(host.pid).create_time())
        if LINUX:  # its own start since boot, on the clock of the runtime's boot clock
            assert host.start.boot_id == clock.BOOT_ID
            assert host.start.since_boot is not None
            assert 0 <= proctree.uptime() - host.start.since_boot < WAIT
        assert wait_exit(host) == ExitStatus(0, None)
    text = log_file.read_text()
    assert text.count(f"cwd {workdir}") == 2  # appended, not truncated
    assert "token t0k has PATH False" in text  # the env given, nothing of ours
    assert "on stderr" in text
    session = re.search(r"sid (\d+) pid (\d+)", text)
    assert session is not None
    assert int(session[1]) == int(session[2]) != os.getsid(0)
    assert log_file.stat().st_mode & 0o777 & ~0o640 == 0


def test_watchdog_pid_placeholder_becomes_the_hosts_own_pid(tmp_path: Path, hosts) -> None:
    log_file = tmp_path / "out.log"
    code = "import os\nprint(os.getpid(), os.environ['WATCHDOG_PID'], os.environ['WATCHDOG_USEC'])"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "WATCHDOG_USEC": "5000000"}
    spec = python_spec(tmp_path, code, env={**env, "WATCHDOG_PID": "0"}, output=log_file)
    host = HostProcess.spawn(spec, None)
    hosts.append(host)
    assert wait_exit(host) == ExitStatus(0, None)
    assert log_file.read_text().split() == [str(host.pid), str(host.pid), "5000000"]
    missing = SpawnSpec(("no-such-program-xyz",), tmp_path, {**env, "WATCHDOG_PID": "0"})
    with pytest.raises(SpawnError, match="no-such-program-xyz"):
        HostProcess.spawn(missing, None)
    bad_cwd = SpawnSpec((PY,), tmp_path / "gone", {**env, "WATCHDOG_PID": "0"})
    with pytest.raises(SpawnError, match="gone"):
        HostProcess.spawn(bad_cwd, None)


def test_spawn_joins_the_cgroup_before_exec(tmp_path: Path, hosts, cgroup_leaf) -> None:
    code = (
        "import os, signal, sys\n"
        "first = open('/proc/self/cgroup').read()\n"  # the very first thing the host does
        "child = os.fork()\n"
        "if child == 0:\n"
        "    signal.pause()\n"
        "print(child, first, flush=True)\n"
        "signal.pause()\n"
    )
    log_file = tmp_path / "out.log"
    started = time.perf_counter()
    host = HostProcess.spawn(python_spec(tmp_path, code, output=log_file), cgroup_leaf)
    spawn_ms = (time.perf_counter() - started) * 1000
    hosts.append(host)
    wait_for(lambda: log_file.read_text().strip(), what="the host's report")
    child_pid, cgroup_line = log_file.read_text().split(maxsplit=1)
    leaf_name = f"/swapguard/{cgroup_leaf.path.name}"
    assert leaf_name in cgroup_line
    assert {host.pid, int(child_pid)} <= set(cgroup_leaf.pids())
    assert host.tree_pids() >= {host.pid, int(child_pid)}
    started = time.perf_counter()
    hosts.append(HostProcess.spawn(python_spec(tmp_path, "pass"), None))
    plain_ms = (time.perf_counter() - started) * 1000
    print(f"\nspawn: {spawn_ms:.1f} ms joining a cgroup (fork), {plain_ms:.1f} ms without (vfork)")
    assert spawn_ms < 2000


def test_exit_fd_reports_a_fast_exit_within_milliseconds(tmp_path: Path, hosts) -> None:
    if not LINUX:
        pytest.skip("pidfd is Linux-only")
    stamp = tmp_path / "exited-at"
    code = "import sys, time\nopen(sys.argv[1], 'w').write(repr(time.monotonic()))\nsys.exit(3)"
    host = HostProcess.spawn(python_spec(tmp_path, code, str(stamp)), None)
    hosts.append(host)
    assert host.exit_fd is not None
    assert select.select([host.exit_fd], [], [], WAIT)[0], "exit_fd never became readable"
    status = host.poll()
    seen = time.monotonic()
    assert status == ExitStatus(3, None)
    assert status.describe() == "exit 3"
    assert host.pid not in jobs.registered()  # reaped, so no longer protected from the reaper
    latency_ms = (seen - float(stamp.read_text())) * 1000
    print(f"\nexit seen {latency_ms:.1f} ms after the child's last line (incl. its shutdown)")
    assert latency_ms < 5000


def test_describe_names_the_signal() -> None:
    assert ExitStatus(None, signal.SIGKILL).describe() == "killed by SIGKILL"
    assert ExitStatus(1, None).describe() == "exit 1"
    assert ExitStatus(None, None).describe() == "exited (status unknown)"


@pytest.mark.parametrize("use_cgroup", [True, False], ids=["cgroup", "subreaper-only"])
def test_kill_tree_leaves_no_survivor(tmp_path: Path, hosts, request, use_cgroup: bool) -> None:
    cgroup = request.getfixturevalue("cgroup_leaf") if use_cgroup else None
    if not use_cgroup and not become_subreaper():
        pytest.skip("no child subreaper on this platform")
    host = HostProcess.spawn(python_spec(tmp_path, TREE_HOST, str(tmp_path)), cgroup)
    hosts.append(host)
    pids = read_pids(tmp_path, "host", "child", "setsid", "daemon")
    assert pids["host"] == host.pid
    if not use_cgroup:  # the daemon's parent exited: it was reparented to us
        wait_for(lambda: psutil.Process(pids["daemon"]).ppid() == os.getpid(), what="reparenting")
    assert host.tree_pids() >= set(pids.values())
    for pid in pids.values():
        assert is_in_tree(pid, host, cgroup)

    host.signal_tree(signal.SIGTERM)  # ignored everywhere: an ignored signal is dropped at once
    assert host.poll() is None
    assert all(not gone(pid) for pid in pids.values())

    started = time.perf_counter()
    killed = kill_tree(host, cgroup, timeout=WAIT)
    print(
        f"\nkill_tree ({'cgroup' if use_cgroup else 'sweeps'}): {killed} processes in "
        f"{(time.perf_counter() - started) * 1000:.1f} ms"
    )
    assert killed >= len(pids)
    for name, pid in pids.items():
        assert gone(pid), f"{name} ({pid}) survived kill_tree"
    assert host.poll() == ExitStatus(None, signal.SIGKILL)
    assert host.tree_pids() == set()


def test_without_proc_and_pidfd_the_fallbacks_still_kill_the_tree(
    tmp_path: Path, hosts, subreaper, monkeypatch
) -> None:
    """macOS has neither pidfd nor /proc/self/task/*/children: run psutil's children and the
    polling paths here instead."""
    monkeypatch.setattr(host_module, "_own_children", lambda: None)
    monkeypatch.setattr(proctree, "open_pidfd", lambda pid: None)
    monkeypatch.setattr(host_module, "open_pidfd", lambda pid: None)
    host = HostProcess.spawn(python_spec(tmp_path, TREE_HOST, str(tmp_path)), None)
    hosts.append(host)
    assert host.exit_fd is None
    pids = read_pids(tmp_path, "host", "child", "setsid", "daemon")
    wait_for(lambda: psutil.Process(pids["daemon"]).ppid() == os.getpid(), what="reparenting")
    assert all(is_in_tree(pid, host, None) for pid in pids.values())
    assert host.tree_pids() >= set(pids.values())
    assert host.poll() is None
    assert kill_tree(host, None, timeout=WAIT) >= len(pids)
    assert all(gone(pid) for pid in pids.values())
    assert host.poll() == ExitStatus(None, signal.SIGKILL)


# A host that leaves two processes and exits: a child in its process group and, below that child,
# a grandchild in a session of its own; the host waits until both reported their pids.
LEAVING_HOST = """
import os, signal, sys, time
out = sys.argv[1]

def report(name):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, os.path.join(out, name))

if os.fork() == 0:
    if os.fork() == 0:
        os.setsid()
        report("setsid")
    else:
        report("child")
    while True:
        signal.pause()
while not all(os.path.exists(os.path.join(out, n)) for n in ("child", "setsid")):
    time.sleep(0.01)
"""


def test_kill_tree_after_the_host_left_finds_what_it_left(tmp_path: Path, hosts, subreaper) -> None:
    """The host exited first. What it left is found without a cgroup: among our own children (as
    subreaper) and by the host's process group, which no live process's pid names any more."""
    host = HostProcess.spawn(python_spec(tmp_path, LEAVING_HOST, str(tmp_path)), None)
    hosts.append(host)
    pids = read_pids(tmp_path, "child", "setsid")
    assert wait_exit(host) == ExitStatus(0, None)
    assert host._owns_group({})  # the group outlives its leader
    assert host.tree_pids() == set(pids.values())
    assert kill_tree(host, None, timeout=WAIT) == 2
    assert all(gone(pid) for pid in pids.values())
    assert not host._owns_group({})


def test_adopt_a_process_that_is_not_our_child(tmp_path: Path, strays) -> None:
    launcher_code = (
        "import subprocess, sys\n"
        "sleeper = subprocess.Popen([sys.executable, '-S', '-c', 'import signal; signal.pause()'],"
        " start_new_session=True)\n"
        "print(sleeper.pid, flush=True)\n"
        "sys.stdin.read()\n"  # stays the adoptee's parent until the test closes our stdin
    )
    launcher = subprocess.Popen(
        [PY, "-S", "-c", launcher_code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    strays.append(launcher)
    assert launcher.stdout is not None and launcher.stdin is not None
    assert select.select([launcher.stdout], [], [], WAIT)[0], "launcher said nothing"
    pid = int(launcher.stdout.readline())
    info = proctree.proc_info(pid)
    assert info is not None
    live = proctree.start_stamp(info)
    since_boot = proctree.started_at_uptime(info)
    hour = 3600.0
    try:
        # a pid reused by another process: another start since boot, whatever the wall says
        assert HostProcess.adopt(pid, StartStamp(live.wall, clock.BOOT_ID, since_boot + 30)) is None
        assert HostProcess.adopt(pid, StartStamp(live.wall, clock.BOOT_ID, since_boot - 30)) is None
        # a run recorded before v5 (no start since boot): the wall start decides, as it did
        assert HostProcess.adopt(pid, StartStamp(live.wall + 30, clock.BOOT_ID, None)) is None
        if LINUX:  # the same pid and start, in another boot: never this process
            assert HostProcess.adopt(pid, StartStamp(live.wall, "another-boot", since_boot)) is None
        legacy = HostProcess.adopt(pid, StartStamp(live.wall, clock.BOOT_ID, None))
        assert legacy is not None
        legacy.close()
        # the wall clock stepped by an hour while we were down: the start since boot decides
        recorded = StartStamp(live.wall - hour, clock.BOOT_ID, since_boot if LINUX else None)
        host = HostProcess.adopt(pid, recorded if LINUX else live)
        assert host is not None
        assert host.start == live
        assert not host.is_child
        assert host.poll() is None
        assert host.tree_pids() >= {pid}
        os.kill(pid, signal.SIGKILL)
        if host.exit_fd is not None:
            assert select.select([host.exit_fd], [], [], WAIT)[0], "exit_fd stayed quiet"
        wait_for(lambda: host.poll() is not None, what="the adopted host's exit")
        assert host.poll() == ExitStatus(None, None)
        assert host.poll().describe() == "exited (status unknown)"
        host.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        launcher.stdin.close()
        launcher.wait(WAIT)
    assert HostProcess.adopt(pid, live) is None  # gone for good


def test_adopt_refuses_a_pid_that_does_not_exist() -> None:
    assert HostProcess.adopt(0, StartStamp(0.0, clock.BOOT_ID, None)) is None
    assert HostProcess.adopt(2**22 + 17, StartStamp(time.time(), clock.BOOT_ID, 1.0)) is None


BOOT = "4156751c-5394-4b7c-bfd4-b26ebe38b960"


@pytest.mark.parametrize(
    ("recorded", "live", "same"),
    [
        (StartStamp(1000.0, BOOT, 50.0), StartStamp(1000.0, BOOT, 50.0), True),
        # the wall clock stepped (NTP, a resumed VM, `date -s`): the start since boot decides
        (StartStamp(1000.0, BOOT, 50.0), StartStamp(4600.0, BOOT, 50.0), True),
        (StartStamp(1000.0, BOOT, 50.0), StartStamp(-2600.0, BOOT, 50.0), True),
        (StartStamp(1000.0, BOOT, 50.0), StartStamp(1000.0, BOOT, 50.01), True),  # one tick
        # another process under the pid: another start, even with the very same wall start
        (StartStamp(1000.0, BOOT, 50.0), StartStamp(1000.0, BOOT, 50.03), False),
        (StartStamp(1000.0, BOOT, 50.0), StartStamp(1000.0, BOOT, 49.5), False),
        # another boot: same pid, same starts, a stranger all the same
        (StartStamp(1000.0, BOOT, 50.0), StartStamp(1000.0, "other", 50.0), False),
        (StartStamp(1000.0, BOOT, None), StartStamp(1000.0, "other", 50.0), False),
        # recorded before v5: the wall start within a second, as before
        (StartStamp(1000.0, BOOT, None), StartStamp(1000.9, BOOT, 50.0), True),
        (StartStamp(1000.0, BOOT, None), StartStamp(1001.2, BOOT, 50.0), False),
    ],
)
def test_a_recorded_start_names_the_process_by_boot_and_start_since_boot(
    recorded: StartStamp, live: StartStamp, same: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clock, "BOOT_ID_FROM_KERNEL", True)
    assert recorded.names_same_process(live) is same


def test_without_a_kernel_boot_id_the_wall_start_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS: the boot id stand-in moves with the wall clock, and the wall start does not."""
    monkeypatch.setattr(clock, "BOOT_ID_FROM_KERNEL", False)
    recorded = StartStamp(1000.0, "boot-1", None)
    assert recorded.names_same_process(StartStamp(1000.5, "boot-2", None))
    assert not recorded.names_same_process(StartStamp(1002.0, "boot-1", None))


@pytest.mark.skipif(not LINUX or os.geteuid() != 0, reason="reusing a pid on purpose needs root")
def test_adopt_refuses_a_reused_pid_even_with_the_recorded_wall_start(strays) -> None:
    """The recorded run's process is gone and another took its pid: its start since boot differs
    (here the wall start is made to match, as a wall-clock step could make it)."""
    first = subprocess.Popen(["sleep", "60"])
    strays.append(first)
    info = proctree.proc_info(first.pid)
    assert info is not None
    recorded = proctree.start_stamp(info)
    first.kill()
    first.wait(WAIT)
    time.sleep(0.05)  # the next clock tick (see the test below): a real reuse comes far later
    second = _take_pid_again(first.pid, strays)
    if second is None:
        pytest.skip(f"pid {first.pid} was taken by other processes every time")
    now_there = proctree.proc_info(second.pid)
    assert now_there is not None
    wall_matches = StartStamp(now_there.start, recorded.boot_id, recorded.since_boot)
    assert HostProcess.adopt(second.pid, wall_matches) is None
    assert HostProcess.adopt(second.pid, recorded) is None
    adopted = HostProcess.adopt(second.pid, proctree.start_stamp(now_there))
    assert adopted is not None  # its own record would name it
    adopted.close()


def test_reap_orphans_reaps_orphans_but_not_jobs_or_our_own_children(
    tmp_path: Path, subreaper, strays
) -> None:
    # A job: registered under SPAWN_LOCK like run_job does; it exits 7 and stays unreaped.
    with jobs.SPAWN_LOCK:
        job = subprocess.Popen([PY, "-S", "-c", "raise SystemExit(7)"], start_new_session=True)
        jobs.register(job.pid)
    strays.append(job)
    # A plain child of ours in our own session (like a `git` run by another module): exits 5.
    sibling = subprocess.Popen([PY, "-S", "-c", "raise SystemExit(5)"])
    strays.append(sibling)
    # An orphan: forked by a launcher that exits at once, so it is reparented to us.
    orphan_code = (
        "import os, sys\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    print(os.getpid(), flush=True)\n"
        "    sys.stdin.read()\n"
        "    os._exit(3)\n"
        "os._exit(0)\n"
    )
    launcher = subprocess.Popen(
        [PY, "-S", "-c", orphan_code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    strays.append(launcher)
    assert launcher.wait(WAIT) == 0
    assert launcher.stdout is not None and launcher.stdin is not None
    assert select.select([launcher.stdout], [], [], WAIT)[0]
    orphan = int(launcher.stdout.readline())
    wait_for(lambda: psutil.Process(orphan).ppid() == os.getpid(), what="the orphan to reach us")
    launcher.stdin.close()  # the orphan reads EOF and exits
    try:
        for pid in (job.pid, sibling.pid, orphan):
            wait_for(lambda pid=pid: gone(pid), what=f"{pid} to exit")
        reaped = reap_orphans()
        assert orphan in reaped
        assert job.pid not in reaped and sibling.pid not in reaped
        assert not psutil.pid_exists(orphan)
        assert job.wait(WAIT) == 7  # its status was not stolen
        assert sibling.wait(WAIT) == 5
    finally:
        jobs.unregister(job.pid)
    assert reap_orphans() == []


def test_is_in_tree(tmp_path: Path, subreaper, hosts, strays, cgroup_leaf) -> None:
    host = HostProcess.spawn(python_spec(tmp_path, TREE_HOST, str(tmp_path)), None)
    hosts.append(host)
    pids = read_pids(tmp_path, "host", "child", "setsid", "daemon")
    # The daemon's parent exited: it is now an orphan of ours, still the host's tree.
    wait_for(lambda: psutil.Process(pids["daemon"]).ppid() == os.getpid(), what="reparenting")
    sibling = subprocess.Popen(["sleep", "60"])
    strays.append(sibling)
    timings = []
    for name in ("host", "child", "setsid", "daemon"):
        for _ in range(2):  # the second answer comes from the cache
            started = time.perf_counter()
            assert is_in_tree(pids[name], host, None), name
            timings.append(time.perf_counter() - started)
    assert not is_in_tree(os.getpid(), host, None)
    assert not is_in_tree(sibling.pid, host, None)
    assert not is_in_tree(1, host, None)
    assert not is_in_tree(0, host, None)
    print(f"\nis_in_tree: slowest {max(timings) * 1e6:.0f} us, fastest {min(timings) * 1e6:.0f} us")

    # A process outside the ancestry but inside the host's cgroup counts too.
    stranger = subprocess.Popen(["sleep", "60"])
    strays.append(stranger)
    assert not is_in_tree(stranger.pid, None, cgroup_leaf)
    (cgroup_leaf.path / "cgroup.procs").write_text(str(stranger.pid))  # moved in by hand
    assert is_in_tree(stranger.pid, None, cgroup_leaf)


def test_spawn_errors_name_what_was_wrong(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    missing = tmp_path / "no-such-program"
    with pytest.raises(SpawnError, match="no-such-program"):
        HostProcess.spawn(SpawnSpec((str(missing),), tmp_path, env), None)
    with pytest.raises(SpawnError, match="not-a-dir"):
        HostProcess.spawn(SpawnSpec(("true",), tmp_path / "not-a-dir", env), None)
    not_executable = tmp_path / "plain.txt"
    not_executable.write_text("hi")
    with pytest.raises(SpawnError, match=r"plain\.txt"):
        HostProcess.spawn(SpawnSpec((str(not_executable),), tmp_path, env), None)
    with pytest.raises(SpawnError, match="missing-dir"):
        HostProcess.spawn(SpawnSpec(("true",), tmp_path, env, tmp_path / "missing-dir" / "x"), None)
    assert SpawnError("x").code == "spawn_failed"
    with pytest.raises(ValueError, match="argv"):
        SpawnSpec((), tmp_path, env)
    with pytest.raises(TypeError, match="env"):
        SpawnSpec(("true",), tmp_path, {"A": 1})  # type: ignore[dict-item]


def test_cgroup_leaf_is_reused_and_validated(cgroup_leaf: CgroupLeaf) -> None:
    again = CgroupLeaf.create(cgroup_leaf.path.name)
    assert again == cgroup_leaf
    assert cgroup_leaf.pids() == []
    assert cgroup_leaf.kill()  # an empty leaf: nothing to do, still supported
    with pytest.raises(ValueError, match="name"):
        CgroupLeaf.create("../escape")


def test_process_stats_sums_rss_and_cpu(strays) -> None:
    rss, cpu = process_stats([os.getpid()])
    assert rss > 1_000_000 and cpu > 0
    done = subprocess.Popen(["true"])
    done.wait(WAIT)
    assert process_stats([done.pid]) == (0, 0.0)  # vanished: counts nothing, no error
    assert process_stats([]) == (0, 0.0)


def _take_pid_again(pid: int, strays: list[subprocess.Popen]) -> subprocess.Popen | None:
    """A new process that gets `pid` (freed) once more, through /proc/sys/kernel/ns_last_pid (root);
    None when other processes took it first every time."""
    for _ in range(50):
        try:
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        except OSError:
            return None
        proc = subprocess.Popen(["sleep", "60"])
        strays.append(proc)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait(WAIT)
    return None


@pytest.mark.skipif(not LINUX or os.geteuid() != 0, reason="reusing a pid on purpose needs root")
def test_a_reused_pid_is_a_new_process_and_the_old_handle_signals_nothing(strays) -> None:
    """A process's identity is psutil's handle (pid and start time): a later look at the table
    names the new process, and a handle on the old one, kept from an earlier look, never signals
    the process that got its pid."""
    first = subprocess.Popen(["sleep", "60"])
    strays.append(first)
    old = proctree.subtree_table([os.getpid()])[first.pid].process
    first.kill()
    first.wait(WAIT)
    # Start times count in clock ticks (10 ms): a pid taken again within the same tick would
    # carry the same start, and only a pidfd held from before tells the two apart. A real reuse
    # comes after the pid space wrapped, far later; here the next tick is made to come first.
    time.sleep(0.05)
    second = _take_pid_again(first.pid, strays)
    if second is None:
        pytest.skip(f"pid {first.pid} was taken by other processes every time")
    fresh = proctree.subtree_table([os.getpid()])[second.pid].process
    assert fresh != old and fresh == psutil.Process(second.pid)
    assert proctree.signal_verified(old, signal.SIGKILL) == (False, None)
    sent, pidfd = proctree.signal_verified(fresh, signal.SIGKILL)
    assert sent
    if pidfd is not None:
        proctree.await_exits([pidfd], time.monotonic() + WAIT)
    assert second.wait(WAIT) == -signal.SIGKILL


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not LINUX or os.geteuid() != 0, reason="reusing a pid on purpose needs root")
def test_a_remembered_answer_lasts_as_long_as_its_process(strays) -> None:
    """is_in_tree's memory: asked again about the same live process it answers without looking;
    once that process is gone its answer is never given for the next process under its pid; it
    holds at most `size` pidfds and closes them all when the host goes."""
    verdicts = proctree.ProcessVerdicts(2)
    looked_at: list[int] = []

    def work(info: proctree.ProcInfo) -> bool:
        looked_at.append(info.process.pid)
        return len(looked_at) == 1  # yes for the first process asked about, no for any other

    fds_before = _open_fds()
    first = subprocess.Popen(["sleep", "60"])
    strays.append(first)
    assert verdicts.answer(first.pid, work) and verdicts.answer(first.pid, work)
    assert looked_at == [first.pid]
    first.kill()
    first.wait(WAIT)
    assert not verdicts.answer(first.pid, work)  # gone: no answer for it
    second = _take_pid_again(first.pid, strays)
    if second is None:
        pytest.skip(f"pid {first.pid} was taken by other processes every time")
    assert not verdicts.answer(second.pid, work)  # looked at anew, not first's answer
    assert looked_at == [first.pid, second.pid]
    others = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    strays.extend(others)
    for other in others:
        verdicts.answer(other.pid, work)
    assert _open_fds() == fds_before + 2  # the two kept pidfds
    verdicts.close()
    assert _open_fds() == fds_before
    assert not verdicts.answer(others[0].pid, work)  # still answers, keeps nothing
    assert _open_fds() == fds_before


# A tree whose every process notes a SIGTERM in a file and exits: the host, its child, and a
# daemon that double-forked and setsid'd away (its parent exited, it has no link to the host).
NOTING_HOST = """
import os, signal, sys
out = sys.argv[1]

def write(name, text):
    tmp = os.path.join(out, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, name))

def run(name):
    def noted(signum, frame):
        write(name + ".term", "")
        os._exit(0)
    signal.signal(signal.SIGTERM, noted)
    write(name, str(os.getpid()))
    while True:
        signal.pause()

middle = os.fork()
if middle == 0:
    os.setsid()
    if os.fork() == 0:
        run("daemon")
    os._exit(0)
os.waitpid(middle, 0)
if os.fork() == 0:
    run("child")
run("host")
"""


def _no_scan(*args: object) -> dict[int, proctree.ProcInfo]:
    raise AssertionError("signal_tree looked at every process below us")


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="the leaf's path needs pidfds")
def test_signal_tree_reaches_a_daemon_that_left_by_the_cgroup_alone(
    tmp_path: Path, hosts, cgroup_leaf, monkeypatch
) -> None:
    """With a leaf, its member list is the tree: the double-forked, setsid'd daemon is signalled
    though nothing links it to the host, and no process below us is looked at."""
    host = HostProcess.spawn(python_spec(tmp_path, NOTING_HOST, str(tmp_path)), cgroup_leaf)
    hosts.append(host)
    pids = read_pids(tmp_path, "host", "child", "daemon")
    assert set(pids.values()) <= set(cgroup_leaf.pids())
    assert host_module._leaf_tree(host, cgroup_leaf) is not None  # the leaf vouches
    with monkeypatch.context() as patch:
        patch.setattr(host_module, "_tree_table", _no_scan)
        patch.setattr(host_module, "subtree_table", _no_scan)
        started = time.thread_time()
        host.signal_tree(signal.SIGTERM)
        cpu_ms = (time.thread_time() - started) * 1000
    for name, pid in pids.items():
        wait_for((tmp_path / f"{name}.term").exists, what=f"{name} ({pid}) to get SIGTERM")
        wait_for(lambda pid=pid: gone(pid), what=f"{name} to exit")
    print(f"\nsignal_tree by the leaf: {cpu_ms:.2f} ms CPU for {len(pids)} processes")


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="the leaf's path needs pidfds")
def test_signal_tree_looks_below_us_when_the_leaf_cannot_vouch(
    tmp_path: Path, hosts, subreaper, cgroup_leaf, strays
) -> None:
    """An orphan of the tree moved out of the leaf (root can) is still signalled: the leaf no
    longer names the whole tree, so the look below us runs. A stranger moved in is a member;
    one moved out is not."""
    host = HostProcess.spawn(python_spec(tmp_path, NOTING_HOST, str(tmp_path)), cgroup_leaf)
    hosts.append(host)
    pids = read_pids(tmp_path, "host", "child", "daemon")
    wait_for(lambda: psutil.Process(pids["daemon"]).ppid() == os.getpid(), what="reparenting")
    outside = cgroup_leaf.path.parent.parent / "cgroup.procs"  # the cgroup we run in
    try:
        outside.write_text(str(pids["daemon"]))
    except OSError as exc:
        pytest.skip(f"cannot move a process out of the leaf here: {exc}")
    assert not cgroup_leaf.holds(pids["daemon"])
    assert host_module._leaf_tree(host, cgroup_leaf) is None
    host.signal_tree(signal.SIGTERM)
    for name, pid in pids.items():
        wait_for((tmp_path / f"{name}.term").exists, what=f"{name} ({pid}) to get SIGTERM")
    stranger = subprocess.Popen(["sleep", "60"])
    strays.append(stranger)
    assert not cgroup_leaf.holds(stranger.pid)
    cgroup_leaf.add(stranger.pid)
    assert cgroup_leaf.holds(stranger.pid)
