"""A Node.js host under swapguard: the example host and its dependency-free helper, for real.

The host (`examples/node/host.mjs`) lives in a real git repo and talks to a real `swapguard run`
through `examples/node/swapguard.mjs`: readiness and heartbeats over HTTP, a self-confirm through
`notify()` (which spawns `swapguard notify`), and a rollback at the deadline that the old version
sees as SWAPGUARD_ROLLED_BACK.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support import Supervisor, beats, git, host_log, supervised, wait_for, write_app

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not on PATH")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "node"
# `swapguard notify` for the helper to spawn: the console script installed beside this Python
SWAPGUARD_BIN = shutil.which("swapguard", path=str(Path(sys.executable).parent))


def make_node_repo(root: Path, app: dict[str, Any]) -> Path:
    """A git repo holding the Node host and its helper; its log file is ignored by git."""
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    for name in ("host.mjs", "swapguard.mjs"):
        shutil.copy(EXAMPLE / name, root / name)
    write_app(root, app)
    (root / ".gitignore").write_text("*.log\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "v1")
    return root


def node_host(path: str) -> dict[str, Any]:
    return {
        "command": ["node", "host.mjs"],
        "ready": "notify",
        "heartbeat_timeout": "3s",
        "env": {"PATH": path},
    }






def seconds_since(stamp: str) -> float:
    return (datetime.now(UTC) - datetime.fromisoformat(stamp)).total_seconds()


def new_version(sup: Supervisor, app: dict[str, Any]) -> str:
    """Prepare a swap, write the new version and commit it, activate: the swap's id."""
    swap = sup.client.prepare("to " + app["version"])
    write_app(sup.repo, app)
    git(sup.repo, "commit", "-qam", app["version"])
    sup.client.activate(swap["id"])
    return swap["id"]


def run_helper(repo: Path, script: str, env: dict[str, str]) -> Any:
    """Run `script` (an ES module using `sg`, the helper) with node; what it printed, as JSON."""
    assert NODE is not None
    code = f"import * as sg from './swapguard.mjs';\n{script}"
    done = subprocess.run(
        [NODE, "--input-type=module", "-e", code],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


HELPER_CHECKS = """
const failure = async (promise) => {
  try { await promise; return null; } catch (err) {
    return {name: err.name, code: err.code, status: err.status, message: err.message};
  }
};
const status = await sg.status();
console.log(JSON.stringify({
  pid: status.host.pid,
  notFound: await failure(sg.confirm('no-such-swap')),
  noSwapId: await failure(sg.confirm()),
  badKey: await failure(sg.notify('STOPPING=1')),
  fallback: await sg.notify('WATCHDOG=1'),
  noSocket: await failure(sg.status({socketPath: ''})),
  gone: await failure(sg.status({socketPath: '/nonexistent/sg.sock'})),
}));
"""

LATE_CONFIRM = """
const err = await sg.confirm(SWAP_ID).then(() => null, (e) => e);
console.log(JSON.stringify({code: err?.code, status: err?.status}));
"""


def test_node_host_is_ready_heartbeats_and_confirms_itself(tmp_path: Path) -> None:
    if SWAPGUARD_BIN is None:
        pytest.skip("the swapguard command is not installed beside this Python")
    repo = make_node_repo(tmp_path / "repo", {"version": "v1"})
    path = os.pathsep.join([str(Path(SWAPGUARD_BIN).parent), os.environ.get("PATH", "")])
    with supervised(repo, host=node_host(path), data=False) as sup:
        sup.start()  # ready: the host said so over HTTP
        host = wait_for(
            lambda: beats(h := sup.status()["host"], "node host v1: ") >= 3 and h,
            what="three heartbeats with their status text",
        )
        assert host["ready"] and host["restarts"] == 0 and host["state"] == "running"
        assert seconds_since(host["last_heartbeat_at"]) < 2.5  # beats every 1 s; timeout is 3 s

        # the helper's answers and errors, from outside the host, without swapguard on PATH
        env = {"PATH": str(Path(NODE or "node").parent), "SWAPGUARD_SOCKET": str(sup.socket)}
        seen = run_helper(repo, HELPER_CHECKS, env)
        assert seen["pid"] == host["pid"]
        assert seen["notFound"]["code"] == "not_found" and seen["notFound"]["status"] == 404
        assert (
            seen["notFound"]["name"] == "SwapguardError"
            and "no-such-swap" in seen["notFound"]["message"]
        )
        assert seen["noSwapId"]["code"] == "bad_request" and seen["noSwapId"]["status"] is None
        assert seen["badKey"]["code"] == "bad_request" and "STOPPING=1" in seen["badKey"]["message"]
        assert seen["fallback"] == "http"
        assert seen["noSocket"]["code"] == "no_socket"
        assert seen["gone"]["code"] == "not_reachable" and seen["gone"]["status"] is None

        v1_version = wait_for(lambda: sup.status()["host"]["code_version"], what="a baseline")
        # a new version that confirms itself through notify(), i.e. `swapguard notify --confirm`
        swap_id = new_version(sup, {"version": "v2", "confirm": True, "via": "notify"})
        doc = sup.wait_swap(swap_id, "confirmed")
        assert doc["reason"] is None
        assert "swap.confirmed" in [event["event"] for event in doc["events"]]
        wait_for(
            lambda: (sup.status()["host"]["status_text"] or "").startswith("node host v2: "),
            what="the new version's heartbeats through notify()",
        )
        confirmed = wait_for(
            lambda: next((line for line in host_log(repo) if line["event"] == "confirmed"), None),
            what="the host to note its confirm",
        )
        assert confirmed["version"] == "v2" and confirmed["swapId"] == swap_id
        assert confirmed["probation"]["swapId"] == swap_id
        assert confirmed["via"] == "swapguard-notify"
        assert sup.status()["host"]["restarts"] == 0
        # the confirmed tree becomes the baseline; the host's writes right after the confirm
        # (host.log) must not read as an undeclared change against the old version
        wait_for(lambda: sup.status()["host"]["code_version"] != v1_version,
                 what="the confirmed version to become the baseline")
        assert sup.status()["swap"] is None
        assert sup.client.swaps()[0]["id"] == swap_id


def test_node_host_that_does_not_confirm_is_rolled_back_at_the_deadline(tmp_path: Path) -> None:
    repo = make_node_repo(tmp_path / "repo", {"version": "v1"})
    with supervised(
        repo, host=node_host(os.environ.get("PATH", "")), data=False, deadman={"window": "2s"}
    ) as sup:
        sup.start()
        swap_id = new_version(sup, {"version": "v2", "confirm": False})
        doc = sup.wait_swap(swap_id, "rolled_back", timeout=40)
        assert doc["reason"] == "deadline"
        rollback = next(e for e in doc["events"] if e["event"] == "swap.rollback_started")
        assert rollback["at"] >= doc["deadline_at"]  # same RFC 3339 shape: text order is time order
        assert json.loads((repo / "app.json").read_text())["version"] == "v1"

        def rolled_back_start() -> dict[str, Any] | None:
            return next(
                (line for line in host_log(repo) if line["version"] == "v1" and line["rolledBack"]),
                None,
            )

        again = wait_for(rolled_back_start, what="v1 to start with SWAPGUARD_ROLLED_BACK")
        assert again["rolledBack"] == {"swapId": swap_id, "reason": "deadline"}
        assert again["probation"] is None
        on_probation = next(line for line in host_log(repo) if line["version"] == "v2")
        assert on_probation["probation"] == {"swapId": swap_id, "deadline": doc["deadline_at"]}
        assert on_probation["rolledBack"] is None
        sup.wait_host(ready=True)
        # a confirm that comes too late is refused with 409, through the helper too
        env = {"PATH": os.environ.get("PATH", ""), "SWAPGUARD_SOCKET": str(sup.socket)}
        late = run_helper(repo, LATE_CONFIRM.replace("SWAP_ID", json.dumps(swap_id)), env)
        assert late == {"code": "conflict", "status": 409}
