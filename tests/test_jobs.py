"""run_job with real processes: exit codes, output, stdin, timeouts and cancels that leave no
process behind, and the registry that keeps the orphan reaper off a job's exit status."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from supervisor.process import jobs
from supervisor.process.jobs import (
    OUTPUT_FILES_KEPT,
    OUTPUT_LIMIT,
    CancelToken,
    JobResult,
    new_output_file,
    run_job,
)
from tests.support import gone, wait_for

PY = sys.executable
WAIT = 10.0






def read_pid(path: Path) -> int:
    wait_for(lambda: path.exists() and path.read_text().strip(), what=f"{path.name} to be written")
    return int(path.read_text())


@pytest.fixture
def pid_files(tmp_path: Path):
    """Pid files a test's job writes; whatever they name is SIGKILLed at teardown."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        if path.exists() and path.read_text().strip():
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(int(path.read_text())).kill()


def test_success_logs_output_and_uses_cwd_and_env(tmp_path: Path, caplog) -> None:
    code = (
        "import os, sys\n"
        "print('hello from', os.getcwd())\n"
        "print('token', os.environ['JOB_TOKEN'])\n"
        "print('to stderr', file=sys.stderr)\n"
    )
    with caplog.at_level(logging.INFO, logger="supervisor.process.jobs.build"):
        result = run_job(
            [PY, "-S", "-c", code],
            cwd=tmp_path,
            env={"JOB_TOKEN": "s3cret"},
            timeout=WAIT,
            log_name="build",
        )
    assert result.ok, result
    assert result.returncode == 0 and not result.timed_out
    assert f"hello from {tmp_path}" in result.output
    assert "token s3cret" in result.output
    assert "to stderr" in result.output
    assert result.argv == (PY, "-S", "-c", code)
    logged = [r.getMessage() for r in caplog.records if r.name == "supervisor.process.jobs.build"]
    assert f"hello from {tmp_path}" in logged
    assert "to stderr" in logged
    assert result.describe() == "exit 0"


def test_failure_code_is_reported_not_raised(tmp_path: Path) -> None:
    result = run_job(
        [PY, "-S", "-c", "import sys; print('bad'); sys.exit(3)"], cwd=tmp_path, timeout=WAIT
    )
    assert not result.ok
    assert result.returncode == 3
    assert not result.timed_out
    assert "bad" in result.output
    assert result.describe() == "exit 3"


def test_missing_binary_gives_127_with_the_os_error(tmp_path: Path) -> None:
    result = run_job([str(tmp_path / "no-such-tool"), "--flag"], cwd=tmp_path, timeout=WAIT)
    assert result.returncode == 127
    assert not result.ok
    assert "No such file" in result.output
    assert "no-such-tool" in result.output


def test_bad_cwd_gives_127(tmp_path: Path) -> None:
    result = run_job(["true"], cwd=tmp_path / "missing-dir", timeout=WAIT)
    assert result.returncode == 127
    assert "missing-dir" in result.output


def test_stdin_is_delivered_even_beyond_a_pipe_buffer(tmp_path: Path) -> None:
    payload = b"0123456789" * 50_000  # 500 KB: more than the pipe holds, so writes must interleave
    code = (
        "import hashlib, sys\n"
        "data = sys.stdin.buffer.read()\n"
        "print(len(data), hashlib.sha256(data).hexdigest())\n"
    )
    result = run_job([PY, "-S", "-c", code], cwd=tmp_path, timeout=WAIT, stdin=payload)
    assert result.ok, result
    assert result.output.split() == [str(len(payload)), hashlib.sha256(payload).hexdigest()]


def test_a_job_that_ignores_stdin_still_finishes(tmp_path: Path) -> None:
    result = run_job(["true"], cwd=tmp_path, timeout=WAIT, stdin=b"x" * 1_000_000)
    assert result.ok, result


def test_output_keeps_the_last_64_kib(tmp_path: Path) -> None:
    code = "for i in range(20000): print(f'line {i:05d} ' + 'x' * 20)\nprint('THE END')"
    result = run_job([PY, "-S", "-c", code], cwd=tmp_path, timeout=WAIT)
    assert result.ok
    assert len(result.output.encode()) <= OUTPUT_LIMIT
    assert result.output.endswith("THE END\n")
    assert "line 19999" in result.output
    assert "line 00000" not in result.output


def test_timeout_kills_the_job_and_its_background_children(tmp_path: Path, pid_files) -> None:
    bg, detached = tmp_path / "bg.pid", tmp_path / "detached.pid"
    pid_files.extend([bg, detached])
    script = (
        f"sleep 300 & echo $! > {bg}\n"  # same process group
        f"setsid sleep 300 & echo $! > {detached}\n"  # a session of its own: killpg misses it
        "wait\n"
    )
    started = time.monotonic()
    result = run_job(["sh", "-c", script], cwd=tmp_path, timeout=2.0)
    elapsed = time.monotonic() - started
    assert result.timed_out
    assert not result.ok
    assert result.returncode is not None and result.returncode < 0
    assert result.describe().startswith("timed out after")
    assert elapsed < 2.0 + 5.0
    for path in (bg, detached):
        pid = read_pid(path)
        wait_for(lambda pid=pid: gone(pid), what=f"{path.name} ({pid}) to be killed")


def test_leftovers_of_a_finished_job_are_killed_and_do_not_hold_it(
    tmp_path: Path, pid_files
) -> None:
    bg = tmp_path / "bg.pid"
    pid_files.append(bg)
    started = time.monotonic()
    result = run_job(
        ["sh", "-c", f"sleep 300 & echo $! > {bg}; echo done"], cwd=tmp_path, timeout=60
    )
    assert result.ok, result
    assert time.monotonic() - started < 10  # did not wait for the background sleep's pipe
    assert "done" in result.output
    pid = read_pid(bg)
    wait_for(lambda: gone(pid), what=f"leftover {pid} to be killed")


def test_cancel_stops_a_job_in_flight(tmp_path: Path, pid_files) -> None:
    child = tmp_path / "child.pid"
    pid_files.append(child)
    token = CancelToken()
    results: list[JobResult] = []
    runner = threading.Thread(
        target=lambda: results.append(
            run_job(
                ["sh", "-c", f"sleep 300 & echo $! > {child}; wait"],
                cwd=tmp_path,
                timeout=60,
                cancel=token,
            )
        )
    )
    runner.start()
    try:
        pid = read_pid(child)
        token.cancel()
        runner.join(WAIT)
        assert not runner.is_alive()
        (result,) = results
        assert result.cancelled and not result.timed_out and not result.ok
        assert result.describe() == "cancelled"
        wait_for(lambda: gone(pid), what=f"the cancelled job's child {pid} to be killed")
    finally:
        token.cancel()
        runner.join(WAIT)
        token.close()


def test_cancel_all_stops_every_job_in_flight(tmp_path: Path) -> None:
    code = "import os, signal, sys\nopen(sys.argv[1], 'w').write(str(os.getpid()))\nsignal.pause()"
    results: list[JobResult] = []
    runners = [
        threading.Thread(
            target=lambda n=n: results.append(
                run_job(
                    [PY, "-S", "-c", code, str(tmp_path / f"{n}.pid")], cwd=tmp_path, timeout=60
                )
            )
        )
        for n in range(2)
    ]
    for runner in runners:
        runner.start()
    try:
        pids = [read_pid(tmp_path / f"{n}.pid") for n in range(2)]
        assert jobs.cancel_all() == 2
    finally:
        for runner in runners:
            jobs.cancel_all()
            runner.join(WAIT)
    assert len(results) == 2 and all(result.cancelled for result in results)
    assert all(gone(pid) for pid in pids)
    assert jobs.cancel_all() == 0


def test_a_job_ordered_before_cancel_all_never_starts(tmp_path: Path) -> None:
    """A build or health check still queued for a worker when the swap moved on is cancelled
    too: started later, a build would run on the tree a rollback just restored."""
    marker = tmp_path / "ran"
    argv = [PY, "-S", "-c", "import sys; open(sys.argv[1], 'w').close()", str(marker)]
    ordered = jobs.epoch()
    jobs.cancel_all()
    result = run_job(argv, cwd=tmp_path, timeout=60, ordered_at=ordered)
    assert result.cancelled and not result.ok and result.describe() == "cancelled"
    assert not marker.exists()
    assert run_job(argv, cwd=tmp_path, timeout=60, ordered_at=jobs.epoch()).ok  # ordered since
    assert marker.exists()
    marker.unlink()
    hook = run_job(argv, cwd=tmp_path, timeout=60, ordered_at=ordered, with_the_swap=False)
    assert hook.ok and marker.exists()  # a hook is not the swap's: cancel_all never touches it


def test_a_running_job_is_registered_and_unregistered_after(tmp_path: Path) -> None:
    pid_file = tmp_path / "job.pid"
    code = (
        f"import os, signal\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\nsignal.pause()"
    )
    token = CancelToken()
    results: list[JobResult] = []
    runner = threading.Thread(
        target=lambda: results.append(
            run_job([PY, "-S", "-c", code], cwd=tmp_path, timeout=60, cancel=token)
        )
    )
    runner.start()
    try:
        pid = read_pid(pid_file)
        assert pid in jobs.registered()
    finally:
        token.cancel()
        runner.join(WAIT)
        token.close()
    assert results and results[0].cancelled
    assert pid not in jobs.registered()


def test_bad_arguments_are_rejected_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="argv is empty"):
        run_job([], cwd=tmp_path, timeout=1)
    with pytest.raises(TypeError, match="one string"):
        run_job("ls -l", cwd=tmp_path, timeout=1)
    with pytest.raises(ValueError, match="timeout"):
        run_job(["true"], cwd=tmp_path, timeout=0)


def test_output_to_a_private_file_is_kept_whole_and_logged_at_debug_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "output"
    path = new_output_file(folder, "build")
    with caplog.at_level(logging.INFO, logger="supervisor.process.jobs.build"):
        result = run_job(
            [sys.executable, "-c", "print('DB_PASSWORD=s3cret'); print('x' * 100000)"],
            cwd=tmp_path,
            timeout=WAIT,
            log_name="build",
            output_to=path,
        )
    assert result.ok
    assert path.read_text().startswith("DB_PASSWORD=s3cret\n") and path.stat().st_size > 100000
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert not any("s3cret" in record.getMessage() for record in caplog.records)


def test_output_files_are_pruned_and_a_foreign_folder_refused(tmp_path: Path) -> None:
    folder = tmp_path / "output"
    made = [new_output_file(folder, "hook") for _ in range(OUTPUT_FILES_KEPT + 5)]
    for path in made:
        path.write_text("x")
    new_output_file(folder, "hook").write_text("x")
    assert len(list(folder.glob("hook-*.log"))) == OUTPUT_FILES_KEPT
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(OSError, match="not a private folder"):
        new_output_file(loose, "build")


_LEAVES_A_DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()  # detach: a session of its own
    time.sleep(float(sys.argv[3]))  # a slow detach (seen by the sampling without a cgroup)
    if os.fork() == 0:  # the daemon, reparented to the subreaper once its parent exits
        with open(sys.argv[1] + "~", "w") as out:
            out.write(str(os.getpid()))
        os.replace(sys.argv[1] + "~", sys.argv[1])
        while True:
            time.sleep(1)
    os._exit(0)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
"""


@pytest.mark.parametrize("use_cgroup", [True, False], ids=["cgroup", "sampled"])
def test_a_daemon_a_job_leaves_is_never_the_hosts_and_is_stopped_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    use_cgroup: bool,
) -> None:  # fmt: skip
    from supervisor.process import host
    from supervisor.process.cgroup import CgroupLeaf

    if not host.become_subreaper():
        pytest.skip("no child subreaper on this platform")
    if use_cgroup and CgroupLeaf.create("test-probe") is None:
        pytest.skip("no writable cgroup v2 here")
    if not use_cgroup:
        monkeypatch.setattr(jobs.CgroupLeaf, "create", classmethod(lambda cls, name: None))
    pid_file, go = tmp_path / "daemon.pid", tmp_path / "go"
    results: list[JobResult] = []
    argv = [PY, "-c", _LEAVES_A_DAEMON, str(pid_file), str(go), "0" if use_cgroup else "0.3"]
    worker = threading.Thread(
        target=lambda: results.append(run_job(argv, cwd=tmp_path, timeout=30, log_name="hook"))
    )
    with caplog.at_level(logging.WARNING, logger="supervisor.process.jobs.hook"):
        worker.start()
        daemon = read_pid(pid_file)
        wait_for(lambda: psutil.Process(daemon).ppid() == os.getpid(), what="the reparenting")
        assert jobs.is_job_process(daemon)
        assert not host.is_in_tree(daemon, None, None)  # not the host's, though an orphan of ours
        assert daemon not in host._live_tree(None, None, host._tree_table(None, None))
        go.write_text("")
        worker.join(WAIT)
    assert not worker.is_alive() and results[0].ok, results
    assert results[0].left_behind == 1
    assert gone(daemon)
    assert any(f"left 1 processes running ({daemon})" in r.getMessage() for r in caplog.records)
