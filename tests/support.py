"""Real-process test harness: a sample host in a real git repo, and `swapguard run` as a child."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psutil

from supervisor.client import Client
from supervisor.errors import NotReachable

T = TypeVar("T")
SAMPLE_HOST = Path(__file__).resolve().parents[1] / "supervisor" / "demo" / "sample_host.py"
WAIT = 20.0  # generous: the suite must pass on a loaded 2-core machine


def wait_for(predicate: Callable[[], T], timeout: float = WAIT, what: str = "condition",
             interval: float = 0.02) -> T:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (NotReachable, OSError, sqlite3.Error) as exc:
            last_error = exc
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_error})" if last_error else ""))


def report_figure(line: str) -> None:
    """A measured figure: printed, and appended to the file $SWAPGUARD_TEST_FIGURES names when it
    is set, so that one run gives the issue note its tables."""
    print("\n" + line)
    if path := os.environ.get("SWAPGUARD_TEST_FIGURES"):
        with open(path, "a", encoding="utf-8") as figures:
            figures.write(line + "\n")


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie (it runs no code; its parent has yet to reap it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, env=env).stdout


def make_sample_repo(root: Path, app: dict[str, Any] | None = None) -> Path:
    """A git repo holding the sample host, two commits, and a dirty tree."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q", "-b", "main")
    shutil.copy(SAMPLE_HOST, root / "app.py")
    write_app(root, {"version": "v1", "behaviour": "ok", **(app or {})})
    (root / ".gitignore").write_text("data/\n*.log\n")
    (root / "README.txt").write_text("sample\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "v1")
    (root / "notes.txt").write_text("second commit\n")
    git(root, "add", "notes.txt")
    git(root, "commit", "-qm", "notes")
    # a dirty tree before any swap: unstaged edit, staged new file, untracked file
    (root / "README.txt").write_text("sample, edited\n")
    (root / "staged.txt").write_text("staged\n")
    git(root, "add", "staged.txt")
    (root / "scratch.txt").write_text("untracked\n")
    return root


def write_app(root: Path, app: dict[str, Any]) -> None:
    (root / "app.json").write_text(json.dumps(app, indent=1) + "\n")


def host_log(repo: Path) -> list[dict[str, Any]]:
    """What each start of an example host was told, as it wrote it down (host.log, JSON lines)."""
    log = repo / "host.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def beats(host: dict[str, Any], prefix: str) -> int:
    """The heartbeat count in an example host's status text ("<prefix>3 beats")."""
    text = host["status_text"] or ""
    if not (text.startswith(prefix) and text.endswith(" beats")):
        return 0
    return int(text[len(prefix) : -len(" beats")])


def rows(db: Path, sql: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


class Supervisor:
    """`swapguard run` in a child process, with a client and wait helpers."""

    def __init__(self, repo: Path, *, host: dict[str, Any] | None = None,
                 deadman: dict[str, Any] | None = None, data: bool = True,
                 code: dict[str, Any] | None = None, control: dict[str, Any] | None = None,
                 extra: str = "", state_parent: Path | None = None) -> None:
        self.repo = repo
        self.state = Path(tempfile.mkdtemp(prefix="sg", dir=str(state_parent or "/tmp")))
        self.socket = self.state / "c.sock"
        self.log = self.state.parent / (self.state.name + ".log")
        host_cfg = {"command": [sys.executable, "app.py"], "cwd": str(repo), "ready": "notify",
                    "restart_delay": "50ms", "stop_timeout": "5s",
                    "output": str(self.state.parent / (self.state.name + ".host.log")),
                    **(host or {})}
        lines = ["[host]"] + [f"{k} = {toml_value(v)}" for k, v in host_cfg.items()]
        lines += ["[code]", f'root = "{repo}"'] + [f"{k} = {toml_value(v)}"
                                                  for k, v in (code or {}).items()]
        if data:
            lines += ["[[data]]", f'path = "{repo}/data/app.db"', 'kind = "sqlite"']
        lines += ["[deadman]"] + [f"{k} = {toml_value(v)}" for k, v in (deadman or {}).items()]
        lines += ["[control]", f'socket = "{self.socket}"']
        lines += [f"{k} = {toml_value(v)}" for k, v in (control or {}).items()]
        lines += ["[state]", f'dir = "{self.state}"']
        self.config = self.state.parent / (self.state.name + ".toml")
        self.config.write_text("\n".join(lines) + "\n" + extra)
        self.process: subprocess.Popen[bytes] | None = None
        self.client = Client(self.socket, timeout=30)

    def start(self, *, wait_ready: bool = True, env: dict[str, str] | None = None) -> Supervisor:
        base = {**os.environ, "SWAPGUARD_LOG_LEVEL": "INFO"}
        base.pop("NOTIFY_SOCKET", None)  # the test runner's manager is not swapguard's
        env = {**base, **(env or {})}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "supervisor", "run", "--config", str(self.config)],
                cwd=self.repo, stdout=out, stderr=out, env=env, start_new_session=True)
        wait_for(self._status_while_alive, what="the control socket")
        if wait_ready:
            self.wait_host(ready=True)
            # the code baseline is taken once the host is spawned: a test that changes the tree
            # next means a change to the code the host started on
            wait_for(lambda: self.status()["host"]["code_version"]
                     or "no code baseline" in self.output(), what="the code baseline")
        return self

    def status(self) -> dict[str, Any]:
        return self.client.status()

    def _status_while_alive(self) -> dict[str, Any]:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"swapguard exited with {self.process.returncode}:\n"
                                 + self.output()[-3000:])
        return self.client.status()

    def wait_host(self, *, ready: bool = True, state: str | None = None, pid_not: int | None = None,
                  timeout: float = WAIT) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            host = self.status()["host"]
            if ready and not host["ready"]:
                return None
            if state is not None and host["state"] != state:
                return None
            if pid_not is not None and host["pid"] in (None, pid_not):
                return None
            return host
        return wait_for(check, timeout, what=f"host ready={ready} state={state}")

    def wait_swap(self, swap_id: str, state: str, timeout: float = WAIT) -> dict[str, Any]:
        return wait_for(lambda: (doc := self.client.swap(swap_id))["state"] == state and doc,
                        timeout, what=f"swap {swap_id} to be {state}")

    def events(self) -> list[str]:
        return [e["event"] for e in self.client.events(after=0, limit=1000)]

    def stop(self, timeout: float = WAIT) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(WAIT)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def cleanup(self) -> None:
        """Leave nothing running: the supervisor, the host and anything the host started."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT)
        for proc in psutil.process_iter(["environ"]):
            try:
                environ = proc.info.get("environ") or {}
            except (psutil.Error, OSError):
                continue
            given = environ.get("SWAPGUARD_SOCKET", "")
            if given == str(self.socket) or given.startswith(f"{self.state}/"):  # host.user
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        shutil.rmtree(self.state, ignore_errors=True)
        # the host's cgroup leaf outlives a killed supervisor by design (adoption); not a test's
        leaf = hashlib.sha256(str(self.state).encode()).hexdigest()[:16]
        for parent in (Path("/sys/fs/cgroup/unified/swapguard"), Path("/sys/fs/cgroup/swapguard")):
            with contextlib.suppress(OSError):
                (parent / leaf).rmdir()


@contextmanager
def supervised(repo: Path, **kwargs: Any) -> Iterator[Supervisor]:
    sup = Supervisor(repo, **kwargs)
    try:
        yield sup
    except BaseException:
        print("---- swapguard log ----\n" + sup.output()[-6000:], file=sys.stderr)
        raise
    finally:
        sup.cleanup()
