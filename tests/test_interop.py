"""Real sd_notify clients nobody here wrote, each run as a host: readiness, heartbeats, status text,
an extension (EXTEND_TIMEOUT_USEC) and a confirm (X_SWAPGUARD_CONFIRM) on probation, with no
datagram of theirs dropped. systemd's `systemd-notify` binary from a shell host, PyPI `sdnotify`
(see test_fdstore for it across a kill -9) and npm `sd-notify` (native: it builds only where
libsystemd's headers are). The Python client and the Node helper have suites of their own
(test_python_client_host, test_node_host)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support import Supervisor, git, supervised, wait_for

SHELL_HOST = """\
#!/bin/sh
systemd-notify --ready --status="$(cat version.txt)"
extended=
while true; do
  systemd-notify WATCHDOG=1
  if [ -n "$SWAPGUARD_SWAP_ID" ]; then
    if [ -z "$extended" ]; then systemd-notify EXTEND_TIMEOUT_USEC=30000000; extended=1; fi
    if [ -e confirm-now ]; then
      systemd-notify "X_SWAPGUARD_CONFIRM=$SWAPGUARD_SWAP_ID"
      SWAPGUARD_SWAP_ID=
    fi
  fi
  sleep 0.2
done
"""

SDNOTIFY_HOST = """\
import os, pathlib, time
import sdnotify

notifier = sdnotify.SystemdNotifier()
notifier.notify("READY=1\\nSTATUS=" + pathlib.Path("version.txt").read_text().strip())
swap, extended = os.environ.get("SWAPGUARD_SWAP_ID"), False
while True:
    notifier.notify("WATCHDOG=1")
    if swap and not extended:
        notifier.notify("EXTEND_TIMEOUT_USEC=30000000")
        extended = True
    if swap and pathlib.Path("confirm-now").exists():
        notifier.notify("X_SWAPGUARD_CONFIRM=" + swap)
        swap = None
    time.sleep(0.2)
"""

NODE_HOST = """\
const notify = require(process.env.SD_NOTIFY_MODULE);
const fs = require("fs");
notify.ready();
notify.sendStatus(fs.readFileSync("version.txt", "utf8").trim());
let swap = process.env.SWAPGUARD_SWAP_ID;
let extended = false;
setInterval(() => {
  notify.watchdog();
  if (swap && !extended) {
    notify.sendState("EXTEND_TIMEOUT_USEC=30000000\\n");
    extended = true;
  }
  if (swap && fs.existsSync("confirm-now")) {
    notify.sendState("X_SWAPGUARD_CONFIRM=" + swap + "\\n");
    swap = undefined;
  }
}, 200);
"""


@pytest.fixture(scope="session")
def npm_sd_notify(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """npm's sd-notify, built here: skipped, with the reason, where it cannot be."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("npm sd-notify: node and npm are not installed")
    if not Path("/usr/include/systemd/sd-daemon.h").exists():
        pytest.skip("npm sd-notify: no libsystemd headers (apt-get install libsystemd-dev)")
    folder = tmp_path_factory.mktemp("npm-sd-notify")
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--foreground-scripts", "sd-notify@2"],
        cwd=folder, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    module = folder / "node_modules" / "sd-notify"
    if done.returncode != 0 or not (module / "build" / "Release" / "notify.node").exists():
        pytest.skip(f"npm sd-notify did not build here: {done.stderr.strip()[-300:]}")
    return module


def make_repo(root: Path, name: str, text: str) -> Path:
    root.mkdir()
    git(root, "init", "-q")
    (root / name).write_text(text)
    (root / name).chmod(0o755)
    (root / "version.txt").write_text("v1\n")
    (root / ".gitignore").write_text("confirm-now\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "v1")
    return root


def moment(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def metric(sup: Supervisor, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", sup.client.metrics(), re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def drive(repo: Path, host: dict[str, Any]) -> None:
    """Ready, heartbeats and status; then a swap extended and confirmed by the host itself."""
    deadman = {"window": "10s", "extend_by": "60s", "hard_cap": "120s"}
    host = {"heartbeat_timeout": "3s", **host}
    with supervised(repo, host=host, deadman=deadman, data=False) as sup:
        sup.start()
        # READY=1 and STATUS= may come as two datagrams (npm sd-notify): ready may be first
        wait_for(lambda: sup.status()["host"]["status_text"] == "v1", what="STATUS=v1")
        swap_id = sup.client.prepare("interop")["id"]
        (repo / "version.txt").write_text("v2\n")
        sup.client.activate(swap_id)
        wait_for(
            lambda: (s := sup.status())["host"]["ready"]
            and s["swap"]["step"] is None
            and s["host"]["status_text"] == "v2",
            what="the new version ready on probation",
        )
        def extended_swap() -> dict[str, Any] | None:
            # the event is written before the turn's state is published: wait for both
            doc = sup.client.swap(swap_id)
            extended = any(e["event"] == "swap.extended" for e in doc["events"])
            moved = moment(doc["deadline_at"]) - moment(doc["activated_at"]) > 20
            return doc if extended and moved else None

        extended = wait_for(extended_swap, what="the host's extension")
        window = moment(extended["deadline_at"]) - moment(extended["activated_at"])
        assert window > 20, "EXTEND_TIMEOUT_USEC=30 s moved the 10 s deadline"
        (repo / "confirm-now").touch()
        sup.wait_swap(swap_id, "confirmed")
        assert metric(sup, "swapguard_heartbeats_total") > 0
        assert metric(sup, "swapguard_notify_datagrams_dropped_total") == 0
        assert metric(sup, "swapguard_notify_datagrams_invalid_total") == 0
        assert "host.heartbeat_lost" not in sup.events()


@pytest.mark.skipif(shutil.which("systemd-notify") is None, reason="no systemd-notify binary")
def test_systemd_notify_from_a_shell_host(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", "host.sh", SHELL_HOST)
    drive(repo, {"command": ["/bin/sh", "host.sh"]})


def test_pypi_sdnotify(tmp_path: Path) -> None:
    pytest.importorskip("sdnotify")
    repo = make_repo(tmp_path / "repo", "host.py", SDNOTIFY_HOST)
    drive(repo, {"command": [sys.executable, "host.py"]})


def test_npm_sd_notify(tmp_path: Path, npm_sd_notify: Path) -> None:
    repo = make_repo(tmp_path / "repo", "host.js", NODE_HOST)
    node = shutil.which("node")
    assert node is not None
    drive(repo, {"command": [node, "host.js"], "env": {"SD_NOTIFY_MODULE": str(npm_sd_notify)}})
