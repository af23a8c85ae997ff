"""The service files in packaging/: the settings that adoption and the deadman clock rely on.

A unit that systemd silently "ignores" a line of (an unknown key, a bad value) would quietly drop
e.g. KillMode=process and let every crash of swapguard kill the host. So besides asserting the
settings, each unit goes through `systemd-analyze verify`, whose warnings are failures here.
"""

from __future__ import annotations

import json
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from supervisor.cli.main import build_parser
from supervisor.config.schema import load_config

PACKAGING = Path(__file__).resolve().parents[1] / "packaging"
SYSTEM_UNIT = PACKAGING / "systemd" / "swapguard.service"
USER_UNIT = PACKAGING / "systemd" / "swapguard-user.service"
PLIST = PACKAGING / "launchd" / "dev.swapguard.plist"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
VERIFY_TIMEOUT = 60.0

# Settings that would make the file system read-only for the host (it rewrites its own code) or
# make the delegated cgroup unwritable.
FORBIDDEN_HARDENING = ("ProtectSystem", "ProtectHome", "ReadOnlyPaths", "ProtectControlGroups")


# --- a small unit-file reader ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnitFile:
    """Sections of key -> every value in order: keys such as ExecStart= may repeat, and an empty
    assignment resets the list, as systemd reads them."""

    sections: Mapping[str, Mapping[str, list[str]]]

    def values(self, section: str, key: str) -> list[str]:
        return list(self.sections.get(section, {}).get(key, []))

    def get(self, section: str, key: str) -> str:
        """The one effective value of a single-valued key; fails naming the key otherwise."""
        found = self.values(section, key)
        assert len(found) == 1, f"[{section}] {key}= should be set once, found {found}"
        return found[0]


def parse_unit(text: str) -> UnitFile:
    """systemd's syntax: [Section], Key=Value, '#'/';' comments, trailing '\\' continues a line."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise ValueError(f"line {number}: unclosed section header {line!r}")
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"line {number}: expected Key=Value, got {line!r}")
        if current is None:
            raise ValueError(f"line {number}: {key.strip()}= comes before any [Section]")
        entries = current.setdefault(key.strip(), [])
        if value.strip():
            entries.append(value.strip())
        else:
            entries.clear()
    return UnitFile(sections)


_TIMESPAN_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}


def timespan_seconds(text: str) -> float:
    """systemd time spans as used in these units: "30s", "1min", "5min 30s", a bare number (s)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text.strip())
    if not parts or "".join(number + unit for number, unit in parts) != text.replace(" ", ""):
        raise ValueError(f"not a systemd time span: {text!r}")
    return sum(float(number) * _TIMESPAN_UNITS[unit or "s"] for number, unit in parts)


def load_unit(path: Path) -> UnitFile:
    return parse_unit(path.read_text())


def default_stop_timeout(tmp_path: Path) -> float:
    """The host's stop_timeout when the config leaves it out, as swapguard itself reads it."""
    config = tmp_path / "swapguard.toml"
    config.write_text('[host]\ncommand = ["true"]\n')
    return load_config(config).host.stop_timeout


def assert_runs_swapguard(argv: list[str], config_path: str) -> None:
    """`<binary> run --config PATH`, and swapguard's own CLI accepts exactly that."""
    assert Path(argv[0]).name == "swapguard", argv
    assert argv[1:] == ["run", "--config", config_path], argv
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run" and args.config == config_path


# --- the reader itself -------------------------------------------------------------------------


def test_parse_unit_repeats_resets_and_continues() -> None:
    unit = parse_unit(
        "# comment\n[Service]\nExecStart=/bin/a\n; another\nExecStart=\nExecStart=/bin/b \\\n"
        "  --flag\nEnvironment=A=1\nEnvironment=B=2\n[Install]\nWantedBy=x.target\n"
    )
    assert unit.values("Service", "ExecStart") == ["/bin/b --flag"]
    assert unit.values("Service", "Environment") == ["A=1", "B=2"]
    assert unit.get("Install", "WantedBy") == "x.target"
    with pytest.raises(ValueError, match="before any"):
        parse_unit("Type=notify\n")
    with pytest.raises(ValueError, match="Key=Value"):
        parse_unit("[Service]\nnot a setting\n")


def test_timespan_seconds() -> None:
    assert timespan_seconds("30s") == 30
    assert timespan_seconds("5min") == 300
    assert timespan_seconds("1min 30s") == 90
    assert timespan_seconds("45") == 45
    with pytest.raises(ValueError, match="time span"):
        timespan_seconds("soon")


# --- the units' settings -----------------------------------------------------------------------


@pytest.mark.parametrize("path", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_unit_supervises_for_adoption(path: Path, tmp_path: Path) -> None:
    unit = load_unit(path)
    service = "Service"
    assert unit.get(service, "Type") == "notify"
    assert unit.get(service, "NotifyAccess") == "main"
    assert timespan_seconds(unit.get(service, "WatchdogSec")) == 30
    assert unit.get(service, "Restart") == "always"
    assert int(unit.get(service, "FileDescriptorStoreMax")) >= 2  # notify and control
    assert timespan_seconds(unit.get(service, "RestartSec")) == 1
    assert unit.get("Unit", "StartLimitIntervalSec") == "0"
    # A crash of swapguard must leave the host running for the next swapguard to adopt.
    assert unit.get(service, "KillMode") == "process"
    assert unit.get(service, "Delegate") == "yes"
    assert unit.get(service, "NoNewPrivileges") == "yes"
    # On SIGTERM swapguard waits up to stop_timeout + 10 s for the host: leave room beyond that.
    stop_window = timespan_seconds(unit.get(service, "TimeoutStopSec"))
    assert stop_window >= default_stop_timeout(tmp_path) + 20
    assert unit.get(service, "WorkingDirectory")
    for key in FORBIDDEN_HARDENING:
        assert not unit.values(service, key), f"{path.name}: {key}= would get in the host's way"


def test_system_unit_paths_and_install() -> None:
    unit = load_unit(SYSTEM_UNIT)
    argv = shlex.split(unit.get("Service", "ExecStart"))
    assert argv[0] == "/usr/local/bin/swapguard"
    assert_runs_swapguard(argv, "/etc/swapguard/swapguard.toml")
    assert Path(unit.get("Service", "WorkingDirectory")).is_absolute()
    assert unit.get("Install", "WantedBy") == "multi-user.target"
    # Runs as root by default; User=/Group= are offered as commented examples only.
    assert not unit.values("Service", "User") and not unit.values("Service", "Group")
    text = SYSTEM_UNIT.read_text()
    assert re.search(r"^#\s*User=\S+", text, re.MULTILINE)
    assert re.search(r"^#\s*Group=\S+", text, re.MULTILINE)
    # The config example in the unit's comments points at the directories systemd creates.
    assert unit.get("Service", "StateDirectory") == "swapguard"
    assert unit.get("Service", "RuntimeDirectory") == "swapguard"


def test_user_unit_paths_and_install() -> None:
    unit = load_unit(USER_UNIT)
    argv = shlex.split(unit.get("Service", "ExecStart"))
    assert argv[0] == "%h/.local/bin/swapguard"
    assert_runs_swapguard(argv, "%h/.config/swapguard/swapguard.toml")
    assert unit.get("Service", "WorkingDirectory") == "%h"
    assert unit.get("Install", "WantedBy") == "default.target"
    assert not unit.values("Service", "User"), "a user manager cannot switch users"


# --- systemd-analyze verify --------------------------------------------------------------------


def existing_swapguard() -> str:
    """An executable that exists here, to stand in for the unit's /usr/local/bin/swapguard."""
    beside_python = Path(sys.executable).parent / "swapguard"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("swapguard") or sys.executable


def with_existing_exec_start(text: str, executable: str) -> str:
    """The unit with ExecStart='s program replaced (arguments kept): verify checks it exists."""
    pattern = re.compile(r"^(ExecStart=[-@:+!]*)(\S+)", re.MULTILINE)
    replaced, count = pattern.subn(lambda match: match[1] + executable, text)
    assert count == 1, f"expected one ExecStart= line, found {count}"
    return replaced


def unit_problems(output: str, unit_name: str, unit_path: Path) -> list[str]:
    """Lines of verify's output about our unit: "<path>:<line>: ..." parse warnings (unknown
    key, bad value, which systemd merely ignores) or "<unit>: ..." errors (bad setting, missing
    executable). Lines about other units or the environment are not ours."""
    prefixes = (f"{unit_path}:", f"{unit_name}:")
    return [line for line in output.splitlines() if line.startswith(prefixes)]


def run_verify(
    unit_path: Path, *, user: bool, runtime_dir: Path
) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_LEVEL": "info"}
    if user:  # a user manager needs a runtime dir, which a root shell without a session lacks
        env["XDG_RUNTIME_DIR"] = str(runtime_dir)
    command = [SYSTEMD_ANALYZE, *(["--user"] if user else []), "verify", "--man=no", str(unit_path)]
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=VERIFY_TIMEOUT, check=False
    )


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize(
    ("source", "user"), [(SYSTEM_UNIT, False), (USER_UNIT, True)], ids=["system", "user"]
)
def test_systemd_analyze_verify(source: Path, user: bool, tmp_path: Path) -> None:
    unit_name = "swapguard.service"  # the name it is installed under, for either file
    unit_path = tmp_path / unit_name
    unit_path.write_text(with_existing_exec_start(source.read_text(), existing_swapguard()))
    runtime_dir = tmp_path / "runtime"
    runtime_dir.mkdir(mode=0o700)
    result = run_verify(unit_path, user=user, runtime_dir=runtime_dir)
    output = result.stdout + result.stderr
    problems = unit_problems(output, unit_name, unit_path)
    assert not problems, f"systemd-analyze verify {source.name}:\n" + "\n".join(problems)
    if result.returncode != 0:
        # Nothing said about the unit, yet verify failed: the manager could not be set up here
        # (no runtime dir, no cgroup access, a container without systemd).
        pytest.skip(f"systemd-analyze cannot verify here: {output.strip()[:300]}")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_verify_catches_what_systemd_would_ignore(tmp_path: Path) -> None:
    """The check above must not pass a unit whose bad lines systemd only warns about."""
    broken = with_existing_exec_start(SYSTEM_UNIT.read_text(), existing_swapguard())
    broken = broken.replace("KillMode=process", "KillMode=procses")
    broken = broken.replace("Delegate=yes", "Delegate=yes\nDelegated=yes")
    unit_path = tmp_path / "swapguard.service"
    unit_path.write_text(broken)
    result = run_verify(unit_path, user=False, runtime_dir=tmp_path)
    problems = unit_problems(result.stdout + result.stderr, unit_path.name, unit_path)
    if not problems and result.returncode != 0:
        pytest.skip(f"systemd-analyze cannot verify here: {result.stderr.strip()[:300]}")
    joined = "\n".join(problems)
    assert "procses" in joined, joined
    assert "Delegated" in joined, joined


# --- launchd -----------------------------------------------------------------------------------


def load_plist() -> dict[str, Any]:
    with PLIST.open("rb") as handle:
        document = plistlib.load(handle)
    assert isinstance(document, dict), "the plist's top level must be a dict"
    return document


def test_launchd_plist(tmp_path: Path) -> None:
    plist = load_plist()
    assert plist["Label"] == "dev.swapguard" == PLIST.stem
    assert_runs_swapguard(plist["ProgramArguments"], "/usr/local/etc/swapguard/swapguard.toml")
    assert Path(plist["ProgramArguments"][0]).is_absolute(), "launchd does not search PATH"
    assert plist["KeepAlive"] is True
    assert plist["RunAtLoad"] is True
    # launchd must leave the host's processes alone when swapguard exits: adoption.
    assert plist["AbandonProcessGroup"] is True
    assert isinstance(plist["ExitTimeOut"], int)
    assert plist["ExitTimeOut"] >= default_stop_timeout(tmp_path) + 20
    for key in ("StandardOutPath", "StandardErrorPath", "WorkingDirectory"):
        assert Path(plist[key]).is_absolute(), f"{key} must be an absolute path"
    assert "/usr/local/bin" in plist["EnvironmentVariables"]["PATH"].split(":")
    assert 1 <= plist["ThrottleInterval"] <= 10


CONTAINER = Path(__file__).resolve().parent.parent / "packaging" / "container"


def _exec_form(line: str) -> list[str]:
    """The JSON array of a Dockerfile instruction in exec form (`CMD ["a", "b"]`)."""
    return json.loads(line[line.index("[") :])


def test_container_example_runs_swapguard_as_pid_1_with_real_probes(tmp_path: Path) -> None:
    dockerfile = (CONTAINER / "Dockerfile").read_text().splitlines()
    entry = next(line for line in dockerfile if line.startswith("ENTRYPOINT"))
    assert _exec_form(entry) == ["swapguard", "run"]  # exec form: swapguard itself is PID 1
    assert "STOPSIGNAL SIGTERM" in dockerfile
    health = next(line for line in dockerfile if line.startswith("HEALTHCHECK"))
    probes = [_exec_form(health[health.index("CMD") :])]
    pod = (CONTAINER / "kubernetes.yaml").read_text()
    probes += [json.loads(m) for m in re.findall(r"command: (\[.*\])", pod)]
    assert len(probes) == 3
    for argv in probes:
        assert argv[0] == "swapguard"
        args = build_parser().parse_args(argv[1:])  # flags the CLI really has
        assert args.command == "status" and args.check in ("live", "ready")
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", pod).group(1))
    assert grace >= default_stop_timeout(tmp_path) + 5
