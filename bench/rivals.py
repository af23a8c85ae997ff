"""circus and PM2 as real processes, each from an environment of its own, driven like the others.

circus lives in a venv of its own (`.bench-venv/circus`, like supervisord's), PM2 in a private npm
folder (`.bench-venv/pm2`) with a private PM2_HOME per run, so the bench never touches a user's
`~/.pm2` or a God daemon it did not start. Their status calls are timed by their own client
libraries (circus's `CircusClient` in circus's venv, `pm2.list` in node), by a small helper script
that prints the latencies as one JSON list.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from bench.peers import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    BenchError,
    stop_process,
    tagged_env,
    wait_until,
)

INSTALL_LOGS = Path(__file__).resolve().parents[1] / ".bench-venv"
CIRCUS_SETTINGS = (
    "check_delay 0.1 (it respawns only from this periodic check; 5 s by default), "
    "warmup_delay 0, max_retry -1, copy_env"
)
PM2_SETTINGS = (
    "fork mode, interpreter none, restart_delay 0, min_uptime 0, max_restarts 1e8, "
    "autorestart, vizion/pmx/automation off, logs to /dev/null"
)

CIRCUS_STATUS = """\
# Times circus's `stats` command (pid, cpu, memory of each process) through its own client.
import json, sys, time
from circus.client import CircusClient

client = CircusClient(endpoint=sys.argv[1], timeout=10)
count = int(sys.argv[2])


def call():
    answer = client.call({"command": "stats", "properties": {}})
    if answer.get("status") != "ok":
        raise SystemExit(f"circus answered {answer}")


call()
latencies = []
for _ in range(count):
    started = time.perf_counter()
    call()
    latencies.append((time.perf_counter() - started) * 1000)
print(json.dumps(latencies))
"""

PM2_STATUS = """\
// Times pm2.list (pid, cpu, memory, state of each process) through PM2's own API.
const pm2 = require(process.argv[2]);
const count = Number(process.argv[3]);
const fail = (err) => { console.error(String(err && err.message || err)); process.exit(1); };
pm2.connect((err) => {
  if (err) fail(err);
  const latencies = [];
  const call = (left) => {
    const started = process.hrtime.bigint();
    pm2.list((err) => {
      if (err) fail(err);
      latencies.push(Number(process.hrtime.bigint() - started) / 1e6);
      if (left > 0) { call(left - 1); return; }
      pm2.disconnect();
      console.log(JSON.stringify(latencies.slice(1)));  // the first call warms up
    });
  };
  call(count);
});
"""


def _latencies(argv: Sequence[str], env: dict[str, str], what: str) -> list[float]:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)
    if done.returncode != 0:
        raise BenchError(f"{what} failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    try:
        values = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise BenchError(f"{what} printed no latencies: {done.stdout[-200:]!r}") from exc
    return [float(value) for value in values]


def not_installed(name: str, where: Path) -> str:
    """The skip reason of a peer that is not installed, with the last line of its install log
    (scripts/bench keeps it as .bench-venv/<name>-install.log)."""
    reason = f"{name} is not installed at {where}"
    log = INSTALL_LOGS / f"{name}-install.log"
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return f"{reason} (scripts/bench installs it)"
    return f"{reason}: {lines[-1][-200:]}" if lines else reason


def supervisord_version(supervisord: Path) -> str | None:
    try:
        done = subprocess.run(
            [str(supervisord), "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except OSError:
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def stop_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process and everything under it; reaped."""
    left = _descendants(process.pid)
    if process.poll() is None:
        process.kill()
    process.wait()
    _kill(left)


# --- circus ------------------------------------------------------------------------------------


def circus_version(circusd: Path) -> str | None:
    """The installed circus version, from its own venv's interpreter; None when not installed."""
    python = circusd.parent / "python"
    try:
        done = subprocess.run(
            [str(python), "-c", "import circus; print(circus.__version__)"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except OSError:
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


class Circus:
    """circusd (from its own venv) running one watcher, `host`, in the foreground."""

    def __init__(self, folder: Path, circusd: Path, command: Sequence[str], tag: str) -> None:
        self.folder, self.circusd, self.command, self.tag = folder, circusd, tuple(command), tag
        self.endpoint = f"ipc://{folder / 'ctl.sock'}"
        self.config = folder / "circus.ini"
        self.process: subprocess.Popen[bytes] | None = None
        self.launched_at = 0.0

    def render_config(self) -> str:
        args = " ".join(json.dumps(arg) for arg in self.command[1:])
        return f"""\
[circus]
check_delay = 0.1
endpoint = {self.endpoint}
pubsub_endpoint = ipc://{self.folder / "pub.sock"}
statsd = false
loglevel = WARNING

[watcher:host]
cmd = {self.command[0]}
args = {args}
numprocesses = 1
warmup_delay = 0
respawn = true
max_retry = -1
copy_env = true
graceful_timeout = 5
"""

    def start(self) -> Circus:
        if not os.access(self.circusd, os.X_OK):
            raise BenchError(f"no circusd at {self.circusd}: run scripts/bench to install it")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.render_config())
        with (self.folder / "circusd.log").open("ab") as log:
            self.launched_at = time.time()
            self.process = subprocess.Popen(
                [str(self.circusd), str(self.config)],
                cwd=self.folder,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=tagged_env(self.tag),
                start_new_session=True,
            )
        wait_until(self._listening, START_TIMEOUT_S, "circusd's control socket")
        return self

    def _listening(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise BenchError(f"circusd exited with {self.process.returncode}; see {self.folder}")
        return (self.folder / "ctl.sock").exists()

    @property
    def pid(self) -> int:
        assert self.process is not None, "start() first"
        return self.process.pid

    def status_ms(self, count: int) -> list[float]:
        script = self.folder / "status.py"
        script.write_text(CIRCUS_STATUS)
        argv = [str(self.circusd.parent / "python"), str(script), self.endpoint, str(count)]
        return _latencies(argv, tagged_env(self.tag), "circus's stats")

    def stop(self) -> None:
        """SIGINT is circusd's clean quit (it ignored SIGTERM here while respawning); then kill."""
        if self.process is None:
            return
        children = _descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            stop_process(self.process, 5)
        _kill(children)


# --- PM2 ---------------------------------------------------------------------------------------


def pm2_version(package: Path) -> str | None:
    """The version of the PM2 package in its private folder (read from package.json: running
    `pm2 --version` would start a God daemon in ~/.pm2)."""
    try:
        return str(json.loads((package / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


class Pm2:
    """PM2's CLI and God daemon with a private PM2_HOME, running one app, `host`."""

    def __init__(self, folder: Path, package: Path, command: Sequence[str], tag: str) -> None:
        self.folder, self.package, self.command, self.tag = folder, package, tuple(command), tag
        self.home = folder / "home"
        self.ecosystem = folder / "ecosystem.json"
        self.launched_at = 0.0
        self.daemon_pid: int | None = None

    def _env(self) -> dict[str, str]:
        return tagged_env(self.tag, PM2_HOME=str(self.home))

    def _cli(self, *args: str, timeout: float = START_TIMEOUT_S) -> None:
        argv = ["node", str(self.package / "bin" / "pm2"), *args]
        with (self.folder / "pm2-cli.log").open("ab") as log:
            done = subprocess.run(
                argv,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=self._env(),
                cwd=self.folder,
                timeout=timeout,
                check=False,
            )
        if done.returncode != 0:
            raise BenchError(f"pm2 {args[0]} exited with {done.returncode}; see {self.folder}")

    def start(self) -> Pm2:
        if not (self.package / "bin" / "pm2").exists():
            raise BenchError(f"no PM2 at {self.package}: run scripts/bench to install it")
        self.folder.mkdir(parents=True, exist_ok=True)
        app = {
            "name": "host",
            "script": self.command[0],
            "args": list(self.command[1:]),
            "interpreter": "none",
            "exec_mode": "fork",
            "autorestart": True,
            "restart_delay": 0,
            "min_uptime": 0,
            "max_restarts": 100_000_000,
            "vizion": False,
            "pmx": False,
            "automation": False,
            "out_file": "/dev/null",
            "error_file": "/dev/null",
            "kill_timeout": 5000,
        }
        self.ecosystem.write_text(json.dumps({"apps": [app]}))
        self.launched_at = time.time()
        self._cli("start", str(self.ecosystem))
        self.daemon_pid = int(wait_until(self._daemon_pid, START_TIMEOUT_S, "PM2's God daemon"))
        return self

    def _daemon_pid(self) -> int | None:
        text = (self.home / "pm2.pid").read_text().strip()
        return int(text) if text.isdigit() else None

    @property
    def pid(self) -> int:
        assert self.daemon_pid is not None, "start() first"
        return self.daemon_pid

    def status_ms(self, count: int) -> list[float]:
        script = self.folder / "status.js"
        script.write_text(PM2_STATUS)
        argv = ["node", str(script), str(self.package), str(count)]
        return _latencies(argv, self._env(), "pm2.list")

    def stop(self) -> None:
        """`pm2 kill` (stops the apps, then the God daemon); whatever is left is SIGKILLed."""
        if self.daemon_pid is None:
            self.daemon_pid = self._daemon_pid_or_none()
        left: list[psutil.Process] = []
        if self.daemon_pid is not None:
            left = _descendants(self.daemon_pid)
            with contextlib.suppress(psutil.Error):
                left.append(psutil.Process(self.daemon_pid))
        with contextlib.suppress(BenchError, subprocess.TimeoutExpired):
            self._cli("kill", timeout=STOP_TIMEOUT_S)  # what it leaves is killed below
        _kill(left)

    def _daemon_pid_or_none(self) -> int | None:
        try:
            return self._daemon_pid()
        except (OSError, ValueError):
            return None


def _descendants(pid: int) -> list[psutil.Process]:
    """The process tree under `pid`, as psutil handles (a kill through one never hits a reused
    pid: psutil checks the start time)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill(processes: Sequence[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            continue
