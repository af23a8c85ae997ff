"""swapguard as PID 1 of a container (a new PID namespace, as tini and dumb-init are tested): it
reaps every orphan that lands on it, stops the host and exits on SIGTERM within stop_timeout, and
its probes (`status --check`) say live and ready as Kubernetes would ask."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.support import WAIT, gone, make_sample_repo, supervised, wait_for

needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None,
    reason="a new PID namespace needs root and util-linux's unshare and nsenter",
)


def probe(config: Path, *args: str) -> int:
    argv = [sys.executable, "-m", "supervisor", "status", "--check", *args, "--config", str(config)]
    return subprocess.run(argv, capture_output=True, timeout=WAIT).returncode


@needs_namespaces
def test_as_pid_1_it_reaps_orphans_and_stops_within_stop_timeout(tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    with supervised(repo, data=False, host={"stop_timeout": "3s"}) as sup:
        argv = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
        argv += [sys.executable, "-m", "supervisor", "run", "--config", str(sup.config)]
        env = {**os.environ, "SWAPGUARD_LOG_LEVEL": "INFO"}
        env.pop("NOTIFY_SOCKET", None)
        with sup.log.open("ab") as out:
            outer = subprocess.Popen(argv, cwd=repo, stdout=out, stderr=out, env=env)
        try:
            status = wait_for(sup.status, what="swapguard in its own PID namespace")
            assert status["supervisor"]["pid"] == 1
            sup.wait_host(ready=True)
            init = wait_for(lambda: psutil.Process(outer.pid).children(), what="PID 1")[0]
            host = next(p for p in init.children() if "app.py" in p.cmdline())  # pid as seen here

            # something run in the container (as `docker exec` would) leaves an orphan behind
            enter = ["nsenter", "--target", str(init.pid), "--pid", "--mount", "--"]
            subprocess.run([*enter, "sh", "-c", "sleep 0.3 & exit 0"], check=True, timeout=WAIT)
            orphan = wait_for(
                lambda: [p for p in init.children() if p.name() == "sleep"],
                what="the orphan reparented to PID 1",
            )[0]
            wait_for(lambda: not psutil.pid_exists(orphan.pid), what="the orphan reaped")
            assert probe(sup.config) == 0 and probe(sup.config, "live") == 0

            began = time.monotonic()
            init.send_signal(signal.SIGTERM)
            assert outer.wait(3 + WAIT / 2) == 0
            assert time.monotonic() - began < 3 + 5, "not within stop_timeout plus a few seconds"
            wait_for(lambda: gone(host.pid), what="the host stopped with its PID 1")
            assert "host stopped" in sup.output() or "host.stopped" in sup.output()
        finally:
            if outer.poll() is None:
                outer.kill()
                outer.wait(WAIT)


def test_probes_say_ready_only_while_the_host_runs_ready(tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    with supervised(repo, data=False) as sup:
        sup.start()
        assert probe(sup.config) == 0
        sup.client.host("stop")
        sup.wait_host(ready=False, state="stopped")
        assert probe(sup.config, "ready") == 1
        assert probe(sup.config, "live") == 0
        sup.stop()
        assert probe(sup.config, "live") == 3
