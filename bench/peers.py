"""The contestants as real processes: swapguard and supervisord, each with its own folder
(circus and PM2 are in `rivals`).

Every process the bench starts carries `SWAPGUARD_BENCH_TAG=<run tag>` in its environment, and so
does everything those processes start (the hosts, their children): `kill_tagged()` finds whatever
is left by that mark, so nothing outlives a run even when a supervisor was killed with SIGKILL.
Folders live under one short /tmp root (unix socket paths are limited to 107 bytes).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from supervisor.client import Client
from supervisor.errors import SwapguardError

T = TypeVar("T")
TAG_VARIABLE = "SWAPGUARD_BENCH_TAG"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
}


class BenchError(Exception):
    """A measurement could not be taken; the message says which and why."""


def progress(text: str) -> None:
    """One line of progress on stderr (the report goes to stdout)."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


def wait_until(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.02
) -> T:
    """Poll `predicate` until it returns something truthy; BenchError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
        except (SwapguardError, OSError, xmlrpc.client.Error, http.client.HTTPException) as exc:
            last_error, value = exc, None
        if value:
            return value
        if time.monotonic() >= deadline:
            why = f" (last error: {last_error})" if last_error else ""
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}{why}")
        time.sleep(interval)


def timed_calls_ms(call: Callable[[], object], count: int) -> list[float]:
    """Latency of `count` calls of a no-argument callable, after one warm-up call."""
    call()
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def tagged_env(tag: str, **extra: str) -> dict[str, str]:
    """Our environment, marked with the run tag, without a notify socket of our own manager."""
    env = {**os.environ, TAG_VARIABLE: tag, **extra}
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "SWAPGUARD_SOCKET", "BASH_ENV"):
        env.pop(name, None)
    return env


def kill_tagged(tag: str) -> int:
    """SIGKILL every process marked with `tag` (but this one); returns how many were found."""
    found = 0
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(TAG_VARIABLE) == tag:
                proc.kill()
                found += 1
        except (psutil.Error, OSError):
            continue
    return found


def stop_process(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL after `timeout`; always reaped."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def make_repo(root: Path, files: Mapping[str, str]) -> Path:
    """A git repo holding `files` in one commit; `data/` (where [[data]] lives) is ignored."""
    root.mkdir(parents=True, exist_ok=True)
    for name, text in {".gitignore": "data/\n*.log\n", **files}.items():
        (root / name).write_text(text)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "bench")
    return root


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, **GIT_IDENTITY}
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"git {' '.join(args)} in {repo} failed: {done.stderr.strip()}")
    return done.stdout


# --- swapguard ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwapguardSetup:
    """What one swapguard instance supervises: [host] keys, [deadman] keys, [[data]] files."""

    repo: Path
    host: Mapping[str, Any]
    deadman: Mapping[str, Any] = field(default_factory=dict)
    code: Mapping[str, Any] = field(default_factory=dict)
    data: tuple[Path, ...] = ()


class Swapguard:
    """`swapguard run` from this interpreter (the project venv) as a child process."""

    def __init__(self, folder: Path, setup: SwapguardSetup, tag: str) -> None:
        self.folder = folder
        self.setup = setup
        self.tag = tag
        self.socket = folder / "c.sock"
        self.log = folder / "swapguard.log"
        self.config = folder / "swapguard.toml"
        self.process: subprocess.Popen[bytes] | None = None
        self.launched_at = 0.0  # time.time() just before the process was started
        self.client = Client(self.socket, timeout=30)

    def render_config(self) -> str:
        host = {
            "cwd": str(self.setup.repo),
            "stop_timeout": "5s",
            "output": str(self.folder / "host.log"),
            **self.setup.host,
        }
        lines = ["[host]", *_toml_pairs(host), "[code]", f"root = {_toml(str(self.setup.repo))}"]
        lines += _toml_pairs(self.setup.code)
        for path in self.setup.data:
            lines += ["[[data]]", f"path = {_toml(str(path))}", 'kind = "sqlite"']
        lines += ["[deadman]", *_toml_pairs(self.setup.deadman)]
        lines += ["[control]", f"socket = {_toml(str(self.socket))}"]
        lines += ["[state]", f"dir = {_toml(str(self.folder / 'state'))}"]
        return "\n".join(lines) + "\n"

    def start(self, *, wait_ready: bool = True) -> Swapguard:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.render_config())
        argv = [sys.executable, "-m", "supervisor", "run", "--config", str(self.config)]
        with self.log.open("ab") as out:
            self.launched_at = time.time()
            self.process = subprocess.Popen(
                argv,
                cwd=self.setup.repo,
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                env=tagged_env(self.tag),
                start_new_session=True,
            )
        wait_until(self._alive_and_answering, START_TIMEOUT_S, "swapguard's control socket")
        if wait_ready:
            self.wait_host_ready()
        return self

    def _alive_and_answering(self) -> dict[str, Any] | None:
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(f"swapguard exited with {self.process.returncode}: {self.log_tail()}")
        return self.client.status()

    @property
    def pid(self) -> int:
        assert self.process is not None, "start() first"
        return self.process.pid

    def wait_host_ready(self, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            host = self.client.status()["host"]
            return host if host["ready"] and host["state"] == "running" else None

        return wait_until(ready, timeout, "swapguard's host to be ready")

    def status_ms(self, count: int) -> list[float]:
        """GET /v1/status through the Python client (one kept connection)."""
        return timed_calls_ms(self.client.status, count)

    def metric(self, name: str) -> float:
        """One unlabelled sample of GET /metrics."""
        for line in self.client.metrics().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise BenchError(f"metric {name} is not in swapguard's /metrics")

    def log_tail(self, lines: int = 15) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        self.client.close()
        if self.process is not None:
            stop_process(self.process)


@contextlib.contextmanager
def running_swapguard(
    folder: Path, setup: SwapguardSetup, tag: str, *, wait_ready: bool = True
) -> Iterator[Swapguard]:
    guard = Swapguard(folder, setup, tag)
    try:
        yield guard.start(wait_ready=wait_ready)
    except Exception:
        print(f"--- swapguard log ({guard.log}) ---\n{guard.log_tail()}", file=sys.stderr)
        raise
    finally:
        guard.stop()


def _toml(value: Any) -> str:
    """JSON's strings, numbers, booleans and arrays are valid TOML values."""
    return json.dumps(value)


def _toml_pairs(values: Mapping[str, Any]) -> list[str]:
    return [f"{key} = {_toml(value)}" for key, value in values.items()]


# --- supervisord -------------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class UnixTransport(xmlrpc.client.Transport):
    """XML-RPC over a unix stream socket, keeping its HTTP/1.1 connection between calls."""

    def __init__(self, socket_path: Path, timeout: float = 10.0) -> None:
        super().__init__()
        self.socket_path = socket_path
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if self._connection and host == self._connection[0]:
            return self._connection[1]
        connection = _UnixHTTPConnection(self.socket_path, self.timeout)
        self._connection = host, connection
        return connection


class Supervisord:
    """supervisord 4.x (from its own venv) running one program, `host`, in the foreground."""

    def __init__(self, folder: Path, binary: Path, command: Sequence[str], tag: str) -> None:
        self.folder = folder
        self.binary = binary
        self.command = tuple(command)
        self.tag = tag
        self.socket = folder / "s.sock"
        self.log = folder / "supervisord.log"
        self.config = folder / "supervisord.conf"
        self.process: subprocess.Popen[bytes] | None = None
        self.launched_at = 0.0

    def render_config(self) -> str:
        command = shlex.join(self.command).replace("%", "%%")
        return f"""\
[unix_http_server]
file={self.socket}
chmod=0700

[supervisord]
nodaemon=true
logfile={self.log}
pidfile={self.folder / "supervisord.pid"}
childlogdir={self.folder}
loglevel=info

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[program:host]
command={command}
autostart=true
autorestart=true
startsecs=0
startretries=1000000
stopsignal=TERM
stopwaitsecs=5
redirect_stderr=true
stdout_logfile={self.folder / "host.log"}
"""

    def start(self) -> Supervisord:
        if not os.access(self.binary, os.X_OK):
            raise BenchError(f"no supervisord at {self.binary}: run scripts/bench to install it")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.render_config())
        with (self.folder / "stderr.log").open("ab") as err:
            self.launched_at = time.time()
            self.process = subprocess.Popen(
                [str(self.binary), "-n", "-c", str(self.config)],
                cwd=self.folder,
                stdout=subprocess.DEVNULL,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=tagged_env(self.tag),
                start_new_session=True,
            )
        wait_until(self._host_running, START_TIMEOUT_S, "supervisord's program to run")
        return self

    def _host_running(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(f"supervisord exited with {self.process.returncode}; see {self.log}")
        infos = self.proxy().supervisor.getAllProcessInfo()
        return any(info["statename"] in ("RUNNING", "EXITED", "STARTING") for info in infos)

    def proxy(self) -> xmlrpc.client.ServerProxy:
        """A new XML-RPC proxy; it keeps one connection for all its calls."""
        return xmlrpc.client.ServerProxy(
            "http://localhost/RPC2", transport=UnixTransport(self.socket), allow_none=True
        )

    @property
    def pid(self) -> int:
        assert self.process is not None, "start() first"
        return self.process.pid

    def status_ms(self, count: int) -> list[float]:
        """supervisor.getAllProcessInfo over the unix socket, one kept connection."""
        return timed_calls_ms(self.proxy().supervisor.getAllProcessInfo, count)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


@contextlib.contextmanager
def running_supervisord(
    folder: Path, binary: Path, command: Sequence[str], tag: str
) -> Iterator[Supervisord]:
    daemon = Supervisord(folder, binary, command, tag)
    try:
        yield daemon.start()
    finally:
        daemon.stop()
