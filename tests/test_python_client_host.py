"""A Python host under swapguard: `examples/python/host.py` with the client and sd_notify, for real.

The host lives in a real git repo under a real `swapguard run`. Its "via" setting picks the path:
`supervisor.client.Client` over the control socket, or `supervisor.notify.sd_notify` datagrams to
NOTIFY_SOCKET. Each test runs both: readiness and heartbeats one way, the swap the other way.
"""

from __future__ import annotations

import json
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from supervisor.errors import Conflict, NotFound
from tests.support import Supervisor, beats, git, host_log, supervised, wait_for, write_app

PROJECT = Path(__file__).resolve().parents[1]
EXAMPLE = PROJECT / "examples" / "python" / "host.py"


def make_python_repo(root: Path, app: dict[str, Any]) -> Path:
    """A git repo holding the Python host; its log file is ignored by git."""
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    shutil.copy(EXAMPLE, root / "host.py")
    write_app(root, app)
    (root / ".gitignore").write_text("*.log\n__pycache__/\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "v1")
    return root


def python_host() -> dict[str, Any]:
    # PYTHONPATH: the host imports `supervisor` even where swapguard is not installed
    return {
        "command": [sys.executable, "host.py"],
        "ready": "notify",
        "heartbeat_timeout": "3s",
        "env": {"PYTHONPATH": str(PROJECT)},
    }






def new_version(sup: Supervisor, app: dict[str, Any]) -> str:
    """Prepare a swap, write the new version and commit it, activate: the swap's id."""
    swap = sup.client.prepare("to " + app["version"])
    write_app(sup.repo, app)
    git(sup.repo, "commit", "-qam", app["version"])
    sup.client.activate(swap["id"])
    return swap["id"]


@pytest.mark.parametrize(
    ("first", "then"),
    # notify-then-http is slow: the deadline test below has a notify v1 and an http v2 already
    [("http", "notify"), pytest.param("notify", "http", marks=pytest.mark.slow)],
)
def test_python_host_is_ready_heartbeats_and_confirms_itself(
    tmp_path: Path, first: str, then: str
) -> None:
    repo = make_python_repo(tmp_path / "repo", {"version": "v1", "via": first})
    with supervised(repo, host=python_host(), data=False) as sup:
        sup.start()  # ready, by Client.heartbeat(ready=True) or sd_notify("READY=1")
        host = wait_for(
            lambda: beats(h := sup.status()["host"], "python host v1: ") >= 3 and h,
            what="three heartbeats with their status text",
        )
        assert host["ready"] and host["restarts"] == 0 and host["state"] == "running"
        age = datetime.now(UTC) - datetime.fromisoformat(host["last_heartbeat_at"])
        assert age.total_seconds() < 2.5  # beats every 1 s; the timeout is 3 s

        swap_id = new_version(sup, {"version": "v2", "confirm": True, "via": then})
        doc = sup.wait_swap(swap_id, "confirmed")
        assert doc["reason"] is None
        confirmed = wait_for(
            lambda: next((line for line in host_log(repo) if line["event"] == "confirmed"), None),
            what="the host to note its confirm",
        )
        assert confirmed["version"] == "v2" and confirmed["via"] == then
        assert confirmed["probation"]["swapId"] == swap_id
        assert confirmed["probation"]["deadline"] == doc["deadline_at"]
        wait_for(lambda: beats(sup.status()["host"], "python host v2: ") >= 1,
                 what="v2's heartbeats")
        with pytest.raises(Conflict):  # what a host's late confirm gets over HTTP
            sup.client.rollback(swap_id)
        with pytest.raises(NotFound):
            sup.client.confirm("no-such-swap")


def test_python_host_that_does_not_confirm_is_rolled_back_at_the_deadline(tmp_path: Path) -> None:
    repo = make_python_repo(tmp_path / "repo", {"version": "v1", "via": "notify"})
    with supervised(repo, host=python_host(), data=False, deadman={"window": "2s"}) as sup:
        sup.start()
        swap_id = new_version(sup, {"version": "v2", "confirm": False, "via": "http"})
        doc = sup.wait_swap(swap_id, "rolled_back", timeout=40)
        assert doc["reason"] == "deadline"
        rollback = next(e for e in doc["events"] if e["event"] == "swap.rollback_started")
        assert rollback["at"] >= doc["deadline_at"]  # same RFC 3339 shape: text order is time order
        assert json.loads((repo / "app.json").read_text())["version"] == "v1"

        again = wait_for(
            lambda: next(
                (line for line in host_log(repo) if line["version"] == "v1" and line["rolledBack"]),
                None,
            ),
            what="v1 to start with SWAPGUARD_ROLLED_BACK",
        )
        assert again["rolledBack"] == {"swapId": swap_id, "reason": "deadline"}
        assert again["probation"] is None
        on_probation = next(line for line in host_log(repo) if line["version"] == "v2")
        assert on_probation["probation"] == {"swapId": swap_id, "deadline": doc["deadline_at"]}
        sup.wait_host(ready=True)
        wait_for(
            lambda: beats(sup.status()["host"], "python host v1: ") >= 1,
            what="the rolled-back v1 to heartbeat by datagram",
        )
