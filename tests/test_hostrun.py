"""The host runner's own paths that the e2e tests cannot reach on purpose: a spawn that the
store refuses to record (a full or failing state disk at the worst instant)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from supervisor.config.schema import parse_config
from supervisor.daemon.counters import Counters
from supervisor.daemon.hostrun import HostRunner
from supervisor.state.store import Store, StoreError
from tests.support import wait_for


class RefusingStore(Store):
    """A real store whose spawn records are refused, as a full state disk would."""

    def record_spawn(self, *args: object, **kwargs: object) -> int:  # type: ignore[override]
        raise StoreError("disk I/O error (refused by the test)")


def test_a_spawn_the_store_refuses_is_killed_without_holding_the_loop(tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    script = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    document = {
        "host": {"command": ["python3", "-c", script], "cwd": str(tmp_path)},
        "code": {"root": str(tmp_path)},
        "state": {"dir": str(tmp_path / "state")},
    }
    config = parse_config(document, source=tmp_path / "swapguard.toml")
    (tmp_path / "state").mkdir(mode=0o700)
    store = RefusingStore.open(tmp_path / "state", reserve=False)
    workers = ThreadPoolExecutor(max_workers=1)

    async def scenario() -> tuple[object, float, int]:
        runner = HostRunner(
            config, store, None, Counters(), on_exit=lambda e: None,
            on_tree_gone=lambda killed: None, emit=lambda kind, detail: None,
            schedule=lambda coro: None, workers=workers,
        )  # fmt: skip
        started = time.monotonic()
        result = runner.spawn({}, code_version=None, swap_id=None)
        took = time.monotonic() - started
        pid = getattr(result, "pid", None) or 0
        return result, took, pid

    try:
        result, took, _ = asyncio.run(scenario())
    finally:
        workers.shutdown(wait=True)
        store.close()
    assert type(result).__name__ == "SpawnFailed" and "not recorded" in result.error  # type: ignore[attr-defined]
    assert took < 1.0  # the kill's wait ran on a worker, not here
    wait_for(lambda: not _running(str(marker)), 10.0, what="the unrecorded host to be gone")


def _running(token: str) -> list[int]:
    """Live (not zombie) processes whose command line holds `token`."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] != psutil.STATUS_ZOMBIE and token in " ".join(
            process.info["cmdline"] or ()
        ):
            found.append(process.pid)
    return found
