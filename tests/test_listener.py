"""The read-only TCP listener (`control.http_listen`) on a real swapguard: /metrics as Prometheus
parses it, /v1/status, the status page, nothing else and no write; and the page in a real headless
Chromium, where its countdown moves and a rollback reaches the timeline without a reload."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.support import WAIT, Supervisor, make_sample_repo, wait_for, write_app

prometheus = pytest.importorskip("prometheus_client.parser")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get(port: int, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        connection.request(method, path, body=b"{}" if method == "POST" else None)
        answer = connection.getresponse()
        return answer.status, answer.getheader("Content-Type") or "", answer.read()
    finally:
        connection.close()


def listening(repo: Path, **kwargs: Any) -> tuple[Supervisor, int]:
    port = free_port()
    sup = Supervisor(repo, control={"http_listen": f"127.0.0.1:{port}"}, **kwargs)
    return sup, port


def test_the_listener_serves_metrics_status_and_the_page_and_nothing_else(
    tmp_path: Path,
) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    sup, port = listening(repo, data=False)
    try:
        sup.start()
        status, kind, body = get(port, "/metrics")
        assert status == 200 and kind.startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in prometheus.text_string_to_metric_families(body.decode())}
        assert families["swapguard_host_up"].samples[0].value == 1
        assert "swapguard_heartbeats" in families  # counters lose _total in the parser's names
        status, kind, body = get(port, "/v1/status")
        assert status == 200 and json.loads(body)["host"]["ready"] is True
        status, kind, body = get(port, "/")
        assert status == 200 and kind.startswith("text/html") and b"swapguard" in body
        for path in ("/v1/swaps", "/v1/events", "/v1/swaps/x"):
            assert get(port, path)[0] == 404
        pid = sup.status()["host"]["pid"]
        for path in ("/v1/host/stop", "/v1/swaps", "/v1/heartbeat"):
            assert get(port, path, "POST")[0] in (404, 405)
        assert sup.status()["host"]["pid"] == pid and sup.status()["swap"] is None
    finally:
        sup.cleanup()


def dump(url: str, profile: Path, budget_ms: int) -> str:
    """The page's DOM after `budget_ms` of its scripts running in headless Chromium."""
    assert CHROMIUM is not None
    argv = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--dump-dom",
        f"--virtual-time-budget={budget_ms}", url,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def cell(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert match, f"#{element_id} not in the page"
    return match.group(1)


def seconds(text: str) -> float:
    minutes = re.match(r"(\d+)m ", text)
    rest = float(text.split(" ")[-1].rstrip("s"))
    return (int(minutes.group(1)) * 60 if minutes else 0) + rest


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (apt-get install chromium)")
def test_the_page_in_a_browser_counts_down_and_shows_a_rollback(tmp_path: Path) -> None:
    repo = make_sample_repo(tmp_path / "repo")
    sup, port = listening(repo, data=False, deadman={"window": "90s"})
    url = f"http://127.0.0.1:{port}/"
    try:
        sup.start(env={"SWAPGUARD_LOG_LEVEL": "DEBUG"})
        swap_id = sup.client.prepare("to v2")["id"]
        write_app(repo, {"version": "v2"})
        sup.client.activate(swap_id)
        wait_for(lambda: sup.status()["swap"]["step"] is None, what="the new version")

        dom = dump(url, tmp_path / "profile-1", 2500)
        # data-remaining: the seconds left when the page (or the script's last fetch of it) was
        # served; the script counts down from there between fetches, ten times a second
        match = re.search(r'data-remaining="([0-9.]+)"', dom)
        assert match is not None
        served, shown = float(match.group(1)), seconds(cell(dom, "countdown"))
        assert served - 1.5 < shown < served - 0.05, (served, shown)

        # A rollback while the page is open: it must reach the page without a reload. The page's
        # own fetches are counted in swapguard's debug log; once the script has fetched, roll back.
        page_fetches = lambda: sup.output().count("GET / -> 200")  # noqa: E731
        before = page_fetches()

        def roll_back_once_the_script_fetches() -> None:
            wait_for(lambda: page_fetches() >= before + 2, what="the page's script to fetch")
            sup.client.rollback(swap_id, reason="requested")

        roller = threading.Thread(target=roll_back_once_the_script_fetches)
        roller.start()
        dom = dump(url, tmp_path / "profile-2", 300_000)  # virtual ms: a fetch each
        roller.join(WAIT)
        assert cell(dom, "swap-id") == "none in flight", "the page never fetched again"
        assert re.search(rf"<td>{swap_id}</td><td class=\"state rolled_back\">rolled_back<", dom)
        sup.wait_swap(swap_id, "rolled_back")
    finally:
        sup.cleanup()
