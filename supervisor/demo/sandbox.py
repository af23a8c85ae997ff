"""The demo's throwaway world: a temp folder with a git repo, a config, and `swapguard run` in it.

Everything the demo writes lives under one short folder in /tmp (a unix socket path must fit in
107 bytes), so cleaning up is one `rmtree`. git runs with an explicit identity and without the
user's global or system config, so a `commit.gpgsign` or a missing `user.email` cannot break it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import psutil
import tenacity

APP_VERSION_1: dict[str, Any] = {"version": "v1", "behaviour": "ok", "confirm": False}
WINDOW_S = 6.0  # [deadman] window: short, so the tour takes well under a minute
HARD_CAP_S = 20.0
STOP_TIMEOUT = 20.0  # the supervisor stops the host first (stop_timeout 5 s), then itself

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "swapguard demo",
    "GIT_AUTHOR_EMAIL": "demo@swapguard.invalid",
    "GIT_COMMITTER_NAME": "swapguard demo",
    "GIT_COMMITTER_EMAIL": "demo@swapguard.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",
}


@dataclass(frozen=True, slots=True)
class Sandbox:
    """Where each of the demo's files lives; all of them under `root`."""

    root: Path

    @property
    def repo(self) -> Path:
        return self.root / "app"

    @property
    def app_json(self) -> Path:
        return self.repo / "app.json"

    @property
    def database(self) -> Path:
        return self.repo / "data" / "app.db"

    @property
    def config(self) -> Path:
        return self.root / "swapguard.toml"

    @property
    def socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def host_log(self) -> Path:
        return self.root / "host.log"

    @property
    def supervisor_log(self) -> Path:
        return self.root / "swapguard.log"

    def kept_copy(self, swap_id: str) -> Path:
        """Where a rollback keeps the probation-time database (snapshot.py's naming)."""
        return self.database.with_name(f"{self.database.name}.rolled-back-{swap_id}")


def make_root() -> Path:
    """A fresh folder with a short path: /tmp when it exists, else the system's temp dir."""
    base = "/tmp" if os.path.isdir("/tmp") else None
    return Path(tempfile.mkdtemp(prefix="sgdemo-", dir=base)).resolve()


def git(sandbox: Sandbox, *args: str) -> str:
    """Run git in the demo repo, hermetically; its stdout, or RuntimeError with its stderr."""
    done = subprocess.run(
        ["git", "-C", str(sandbox.repo), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **_GIT_ENV},
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def json_bytes(app: dict[str, Any]) -> bytes:
    return (json.dumps(app, indent=1) + "\n").encode()


def write_app(sandbox: Sandbox, app: dict[str, Any]) -> None:
    """The sample host's "code" for a version."""
    sandbox.app_json.write_bytes(json_bytes(app))


def populate(sandbox: Sandbox) -> None:
    """The repo with v1 of the sample host committed, and the config beside it."""
    sandbox.repo.mkdir()
    git(sandbox, "init", "-q", "-b", "main")
    sample = resources.files(__package__).joinpath("sample_host.py").read_bytes()
    (sandbox.repo / "app.py").write_bytes(sample)
    write_app(sandbox, APP_VERSION_1)
    (sandbox.repo / ".gitignore").write_text("data/\n")
    git(sandbox, "add", "-A")
    git(sandbox, "commit", "-q", "-m", "v1 of the sample host")
    sandbox.config.write_text(render_config(sandbox))


def render_config(sandbox: Sandbox) -> str:
    """swapguard.toml with a short deadman clock, so the whole tour takes well under a minute."""

    def value(item: Any) -> str:
        return json.dumps(str(item) if isinstance(item, Path) else item)  # JSON strings are TOML

    sections: list[tuple[str, dict[str, Any]]] = [
        (
            "[host]",
            {
                "command": [sys.executable, str(sandbox.repo / "app.py")],
                "cwd": sandbox.repo,
                "ready": "notify",
                "heartbeat_timeout": "3s",
                "restart_delay": "100ms",
                "stop_timeout": "5s",
                "output": sandbox.host_log,
            },
        ),
        ("[code]", {"root": sandbox.repo}),
        ("[[data]]", {"path": sandbox.database, "kind": "sqlite"}),
        (
            "[deadman]",
            {"window": f"{WINDOW_S:g}s", "hard_cap": f"{HARD_CAP_S:g}s", "max_crashes": 2},
        ),
        ("[control]", {"socket": sandbox.socket}),
        ("[state]", {"dir": sandbox.state_dir}),
    ]
    lines = ["# written by `swapguard demo`; everything lives in this folder"]
    for header, keys in sections:
        lines += ["", header, *(f"{key} = {value(item)}" for key, item in keys.items())]
    return "\n".join(lines) + "\n"


def table_names(database: Path) -> set[str]:
    """The tables of a SQLite file, opened read-only (the host may be writing it)."""
    with _read_only(database) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def host_starts(database: Path) -> list[tuple[str, str | None, str | None]]:
    """(version, swap id, rolled-back swap id) of each start the sample host recorded."""
    with _read_only(database) as conn:
        rows = conn.execute("SELECT version, swap, rolled_back FROM starts ORDER BY id").fetchall()
    return [(str(version), swap, rolled_back) for version, swap, rolled_back in rows]


def _read_only(database: Path) -> contextlib.closing[sqlite3.Connection]:
    """A read-only connection, closed (not just committed) on leaving the `with` block."""
    if not database.exists():
        raise FileNotFoundError(f"{database} does not exist")
    return contextlib.closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=5))


class SupervisorProcess:
    """`python -m supervisor run` as a child in its own session, its output in a log file."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.process: subprocess.Popen[bytes] | None = None
        self.host_pids: set[int] = set()  # every host pid the demo saw, checked at the end

    def start(self) -> None:
        env = {**os.environ, **_GIT_ENV, "PYTHONDONTWRITEBYTECODE": "1"}
        for inherited in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "SWAPGUARD_SOCKET"):
            env.pop(inherited, None)  # we are not its service manager, nor its host
        env.pop("SWAPGUARD_CONFIG", None)
        with self.sandbox.supervisor_log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "run", "--config", str(self.sandbox.config)],
                cwd=self.sandbox.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
            )

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self) -> list[str]:
        """SIGTERM (it stops the host first), SIGKILL if it hangs; then no process of ours stays.

        Returns what had to be killed by force, for the report.
        """
        forced: list[str] = []
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                forced.append(f"swapguard (pid {self.process.pid}) ignored SIGTERM")
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        for proc in self.leftovers():
            try:
                forced.append(f"pid {proc.pid} ({' '.join(proc.cmdline())[:80]})")
                proc.kill()
                proc.wait(5)
            except psutil.Error:
                continue
        return forced

    def leftovers(self) -> list[psutil.Process]:
        """Live processes of this demo: a host pid we saw, or a command line naming our folder."""
        root = str(self.sandbox.root)
        found: list[psutil.Process] = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            if proc.info["pid"] == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            names_root = any(root in part for part in proc.info["cmdline"] or [])
            if names_root or (proc.info["pid"] in self.host_pids and _still_host(proc, root)):
                found.append(proc)
        return found


def _still_host(proc: psutil.Process, root: str) -> bool:
    """The pid is still the host we saw (not a reused pid of someone else's process)."""
    try:
        return any(root in part for part in proc.cmdline()) or proc.cwd().startswith(root)
    except psutil.Error:
        return False


def remove(sandbox: Sandbox, attempts: int = 5) -> None:
    """rmtree, retried briefly: a process that just died may still be closing files."""
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(
            lambda exc: isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)
        ),
        wait=tenacity.wait_fixed(0.2),
        stop=tenacity.stop_after_attempt(attempts),
        reraise=True,
    )
    with contextlib.suppress(FileNotFoundError):  # gone already, or went while we removed it
        retrying(shutil.rmtree, sandbox.root)
