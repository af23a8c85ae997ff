"""Liveness outside probation (`deadman.health_always`) and views that tell the truth, with a
real swapguard, real hosts, real git and a real health check: a confirmed version that keeps
heartbeating but fails its check is restarted; each exit says why; no heartbeat age is shown for
a host that never sent one; a swap's snapshot says how it is held; an abort answers once the code
is restored, and an action still under way answers 202."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest

from supervisor.cli import console
from tests.support import Supervisor, make_sample_repo, rows, supervised, wait_for, write_app

prometheus = pytest.importorskip("prometheus_client.parser")

SLEEPER = [sys.executable, "-c", "import time\nwhile True: time.sleep(1)"]


class UnixHTTPConnection(HTTPConnection):
    """http.client over the control socket: the status code, which the Client does not show."""

    def __init__(self, path: Path) -> None:
        super().__init__("swapguard", timeout=60)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self.path))


def post(sup: Supervisor, path: str) -> tuple[int, dict[str, Any]]:
    connection = UnixHTTPConnection(sup.socket)
    try:
        connection.request("POST", path, body=b"{}", headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


def metric_families(sup: Supervisor) -> dict[str, Any]:
    text = sup.client.metrics()
    return {family.name: family for family in prometheus.text_string_to_metric_families(text)}


def samples(families: dict[str, Any], name: str) -> dict[str, float]:
    """A family's samples by their one label value ("" for an unlabelled sample)."""
    return {
        next(iter(s.labels.values()), ""): s.value
        for s in families[name].samples
        if not s.name.endswith("_created")
    }


def exit_reasons(sup: Supervisor) -> list[str | None]:
    return [row[0] for row in rows(sup.state / "state.db", "SELECT exit_reason FROM host_run")]


def swapguard_cli(sup: Supervisor, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", *args, "--socket", str(sup.socket)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout


def test_a_confirmed_host_that_heartbeats_but_fails_its_health_check_is_restarted(
    tmp_path: Path,
) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    sick = tmp_path / "sick"  # outside the code root: creating it is no code change
    deadman = {
        "health_check": ["sh", "-c", f'test ! -e "{sick}"'],
        "health_interval": "500ms",
        "health_failures": 3,
        "health_always": True,
    }
    with supervised(repo, data=False, deadman=deadman, host={"heartbeat_timeout": "3s"}) as sup:
        sup.start()
        swap_id = sup.client.prepare("v2")["id"]
        write_app(repo, {"version": "v2", "behaviour": "ok"})
        sup.client.activate(swap_id)
        wait_for(lambda: (s := sup.status())["swap"] and s["swap"]["step"] is None
                 and s["host"]["ready"], what="v2 ready on probation")  # fmt: skip
        assert sup.client.confirm(swap_id)["state"] == "confirmed"
        confirmed = sup.wait_host(ready=True)
        assert confirmed["status_text"] == "version v2"
        wait_for(lambda: sup.status()["host"]["liveness_failures"] == 0, what="liveness on")
        sick.touch()
        def failing() -> int | bool:
            host = sup.status()["host"]
            return int(host["liveness_failures"] or 0) or host["pid"] != confirmed["pid"]

        seen = wait_for(failing, what="a failed check shown")
        assert seen in (1, 2, True)  # True: a stalled poll saw only the restart
        restarted = sup.wait_host(ready=True, pid_not=confirmed["pid"])
        sick.unlink()
        events = sup.client.events(after=0, limit=1000)
        unhealthy = [e for e in events if e["event"] == "host.unhealthy"]
        assert len(unhealthy) == 1 and unhealthy[0]["detail"]["failures"] == 3
        assert unhealthy[0]["detail"]["pid"] == confirmed["pid"]
        assert "host.heartbeat_lost" not in [e["event"] for e in events]  # it kept beating
        assert restarted["status_text"] == "version v2"  # the confirmed version, restarted
        assert restarted["last_exit"]["reason"] == "unhealthy"
        assert "(health check failed)" in console.describe_exit(restarted["last_exit"])
        assert exit_reasons(sup)[-2:] == ["unhealthy", None]  # the live run has none yet
        assert samples(metric_families(sup), "swapguard_host_exits")["unhealthy"] == 1
        assert sup.status()["swap"] is None


def test_without_health_always_a_failing_check_outside_probation_changes_nothing(
    tmp_path: Path,
) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    deadman = {"health_check": ["false"], "health_interval": "200ms"}
    with supervised(repo, data=False, deadman=deadman) as sup:
        host = sup.start().wait_host(ready=True)
        wait_for(lambda: sup.status()["host"]["uptime_s"] > 1.5, what="ten check intervals")
        assert sup.status()["host"]["pid"] == host["pid"]
        assert "host.unhealthy" not in sup.events()


def test_no_heartbeat_age_for_a_host_that_never_heartbeats_and_every_exit_says_why(
    tmp_path: Path,
) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    host = {"command": SLEEPER, "ready": "started", "min_uptime": "200ms"}
    with supervised(repo, data=False, host=host) as sup:
        first = sup.start().wait_host(ready=True)
        wait_for(lambda: sup.status()["host"]["uptime_s"] > 1.0, what="a second of running")
        status = sup.status()
        assert status["host"]["heartbeat_age_s"] is None
        assert status["host"]["last_heartbeat_at"] is None
        assert "Heartbeat: none since it started" in swapguard_cli(sup, "status")
        families = metric_families(sup)
        assert families["swapguard_heartbeat_age_seconds"].samples == []
        assert samples(families, "swapguard_heartbeats")[""] == 0
        assert samples(families, "swapguard_host_ready")[""] == 1
        assert families["swapguard_host_liveness_failures"].samples == []  # not configured
        assert status["host"]["liveness_failures"] is None

        sup.client.host("restart")
        second = sup.wait_host(ready=True, pid_not=first["pid"])
        assert second["last_exit"]["reason"] == "restart"
        os.kill(second["pid"], signal.SIGKILL)
        third = sup.wait_host(ready=True, pid_not=second["pid"])
        assert third["last_exit"] | {"at": None} == {
            "code": None, "signal": 9, "at": None, "reason": "crash"
        }  # fmt: skip
        assert "killed by signal 9 (crashed)" in swapguard_cli(sup, "status")
        sup.client.host("stop")
        stopped = sup.wait_host(ready=False, state="stopped")
        assert stopped["last_exit"]["reason"] == "stop"
        assert exit_reasons(sup) == ["restart", "crash", "stop"]
        exits = samples(metric_families(sup), "swapguard_host_exits")
        assert {reason: n for reason, n in exits.items() if n} == {
            "restart": 1, "crash": 1, "stop": 1
        }  # fmt: skip
        sup.client.host("start")
        sup.wait_host(ready=True)
        sup.kill9()  # the host outlives it; the next swapguard adopts it and recalls the exit
        sup.start()
        assert sup.status()["host"]["last_exit"]["reason"] == "stop"


def test_a_lost_heartbeat_is_the_reason_of_the_exit_it_caused(tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path / "repo", {"behaviour": "silent"})
    with supervised(repo, data=False, host={"heartbeat_timeout": "1s"}) as sup:
        first = sup.start().wait_host(ready=True)
        again = sup.wait_host(ready=True, pid_not=first["pid"])
        assert again["last_exit"]["reason"] == "heartbeat_lost"
        stopped = [e for e in sup.client.events(after=0) if e["event"] == "host.stopped"]
        assert stopped[0]["detail"]["reason"] == "heartbeat_lost"
        assert "(heartbeat lost)" in swapguard_cli(sup, "status")


def test_swap_show_says_how_each_snapshot_is_held_and_actions_answer_when_done(
    tmp_path: Path,
) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    with supervised(repo, host={"stop_timeout": "5s"}) as sup:
        sup.start()
        # an abort answers once the code is restored: nothing to wait for after it
        swap_id = sup.client.prepare("to be aborted")["id"]
        write_app(repo, {"version": "v9", "behaviour": "ok"})
        status, doc = post(sup, f"/v1/swaps/{swap_id}/abort")
        assert (status, doc["state"], doc["step"]) == (200, "aborted", None)
        assert json.loads((repo / "app.json").read_text())["version"] == "v1"

        swap_id = sup.client.prepare("v2")["id"]
        write_app(repo, {"version": "v2", "behaviour": "ok"})
        out = swapguard_cli(sup, "swap", "activate", swap_id, "--wait")
        assert out.startswith(f"{swap_id} probation ") and "under way" not in out
        assert sup.client.swap(swap_id)["step"] is None  # the new version runs
        data = sup.client.swap(swap_id)["data"]
        assert [(d["held"], d["sha256"], d["linked"]) for d in data] == [("linked", None, True)]
        shown = swapguard_cli(sup, "swap", "show", swap_id)
        assert "kept as the original file" in shown and "sha256 \n" not in shown + "\n"
        # an action still under way answers 202, with the swap at its step
        status, doc = post(sup, f"/v1/swaps/{swap_id}/rollback")
        assert (status, doc["state"], doc["step"]) == (202, "rolling_back", "stop_new")
        sup.wait_swap(swap_id, "rolled_back")
        status, _ = post(sup, f"/v1/swaps/{swap_id}/rollback")
        assert status == 409


@pytest.mark.skipif(shutil.which("systemd-notify") is None, reason="no systemd-notify binary")
def test_short_lived_senders_of_the_host_tree_are_never_counted_as_dropped(
    tmp_path: Path,
) -> None:
    """systemd-notify exits right after its send (and after BARRIER=1): a burst of them, each
    gone before swapguard reads its datagram, is all heartbeats and no drop."""
    script = (
        "systemd-notify --ready\n"
        "i=0; while [ $i -lt 150 ]; do systemd-notify WATCHDOG=1; i=$((i+1)); done\n"
        "touch sent; exec sleep 600\n"
    )
    repo = make_sample_repo(tmp_path / "repo")
    (tmp_path / "host.sh").write_text(script)
    host = {"command": ["/bin/sh", str(tmp_path / "host.sh")], "cwd": str(tmp_path)}
    with supervised(repo, data=False, host=host) as sup:
        sup.start()
        wait_for(lambda: (tmp_path / "sent").exists(), timeout=120, what="150 notifications")
        wait_for(
            lambda: samples(metric_families(sup), "swapguard_heartbeats")[""] >= 150,
            what="every heartbeat counted",
        )
        families = metric_families(sup)
        assert samples(families, "swapguard_notify_datagrams_dropped")[""] == 0
        assert sup.status()["host"]["heartbeat_age_s"] is not None


@pytest.mark.slow
def test_an_abort_that_cannot_restore_the_code_is_answered_with_why(tmp_path: Path) -> None:
    """git's objects gone (a disk that lost them): the restore fails at every attempt, the abort
    retries with backoff, then gives up; its answer is that failure (409), never
    `prepared (abort_restore)` as if it were done."""
    repo = make_sample_repo(tmp_path / "repo")
    with supervised(repo, data=False, code={"undeclared_changes": "ignore"}) as sup:
        sup.start()
        swap_id = sup.client.prepare("objects lost")["id"]
        write_app(repo, {"version": "v9", "behaviour": "ok"})
        objects = repo / ".git" / "objects"
        for folder in objects.iterdir():
            if len(folder.name) == 2:
                shutil.rmtree(folder)
        status, doc = post(sup, f"/v1/swaps/{swap_id}/abort")
        if status == 409:
            assert "gave up" in doc["error"]["message"], doc
        else:  # a slow machine: still retrying after ABORT_WAIT_S, the documented wait
            assert (status, doc["step"]) == (202, "abort_restore"), doc
        swap = wait_for(lambda: (s := sup.client.swap(swap_id))["step"] is None and s,
                        timeout=60, what="the abort to give up")  # fmt: skip
        assert swap["state"] == "prepared"
        assert swap["changes"] is None and "missing" in swap["changes_error"]  # not a 500
        assert "swap.abort_failed" in [e["event"] for e in swap["events"]]
