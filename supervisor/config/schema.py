"""Load and validate `swapguard.toml` into frozen dataclasses.

Rules of this module:
- Pure: it reads the config file and nothing else; no directory is created, no path is probed, so
  `swapguard check` is safe anywhere and the runtime owns every side effect.
- The commented template of `swapguard init` is the one source of the defaults: they are parsed from
  it, so the two cannot drift apart, and they pass the same validation as what a user writes. It
  lives in `supervisor.config.defaults` (`render_init` is re-exported here).
- Anything a user can get wrong is a `ConfigError` naming the dotted key (`data[0].kind`) and the
  file, and saying what would be accepted. swapguard refuses to start rather than guess.
- Paths are made absolute against the config file's folder and normalized lexically; symlinks are
  not followed (that would be I/O; the runtime checks what it opens).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import shlex
import signal
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

from supervisor.config.defaults import DEFAULTS
from supervisor.config.defaults import PLACEHOLDER_COMMAND as PLACEHOLDER_COMMAND  # re-exported
from supervisor.config.defaults import render_init as render_init  # re-exported
from supervisor.config.noncode import GENERATED, IgnoreRules, pattern_problem
from supervisor.errors import ConfigError

ReadyMode = Literal["notify", "started"]
RestartPolicy = Literal["always", "on-failure", "no"]
UndeclaredChanges = Literal["guard", "warn", "ignore"]
DataKind = Literal["sqlite", "file", "dir"]

DEFAULT_FILE_NAME = "swapguard.toml"
CONFIG_ENV_VAR = "SWAPGUARD_CONFIG"

# Bounds a user would want enforced; each error message states the bound it broke.
MAX_DURATION_S = 365 * 24 * 3600.0  # longer than a year is a typo, and overflows some timers
MAX_COUNT = 10_000
MIN_STALL_LIMIT_S = 1.0
MIN_OUTPUT_ROTATE_BYTES = 4096
# sun_path holds 108 bytes on Linux, 104 on macOS, both including the terminating NUL. The one
# definition of the limit: the control and notify sockets and `check` all ask socket_path_problem.
MAX_SOCKET_PATH_BYTES = 103 if sys.platform == "darwin" else 107
NOTIFY_SOCKET_NAME = "notify.sock"
HOST_SOCKET_DIR_NAME = "host"
"""With host.user: the folder of state.dir that holds the host's own sockets (see Config)."""
HOST_CONTROL_SOCKET_NAME = "control.sock"

_SECTIONS = ("host", "code", "data", "deadman", "control", "state", "hooks")
_KEYS = {section: tuple(DEFAULTS.get(section, ())) for section in _SECTIONS}
_KEYS["host"] = ("command", *_KEYS["host"])
_KEYS["data"] = ("path", "kind")  # an entry is nothing without both

_DURATION_PATTERN = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+) ?(?P<unit>ms|s|m|h)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_DURATION_FORMS = 'a duration: seconds >= 0, or a string like "250ms", "1.5s", "90s", "2m", "1h"'
_SIZE_PATTERN = re.compile(
    r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+) ?(?P<unit>[KMGTkmgt]i?[Bb]|[Bb])?"
)
_UNIT_BYTES = {
    "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip
_SIZE_FORMS = 'a size: bytes >= 0, or a string like "512KiB", "10MB", "1GiB"'
MAX_SIZE_BYTES = 2**50
_MODE_PATTERN = re.compile(r"(?:0o|0)?(?P<digits>[0-7]{1,3})")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class HostConfig:
    command: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str]
    inherit_env: tuple[str, ...] | None  # None: all of swapguard's environment
    ready: ReadyMode
    start_timeout: float
    min_uptime: float
    heartbeat_timeout: float
    stop_signal: signal.Signals
    stop_timeout: float
    restart: RestartPolicy
    restart_delay: float
    restart_delay_max: float
    restart_reset_after: float
    output: Path | None  # None: inherit swapguard's own stdout/stderr
    output_max_bytes: int  # > 0: a logger process rotates the output file at this size
    output_backups: int
    user: str  # "": swapguard's own; a name or a uid, resolved by `process.identity`
    group: str  # "": the user's primary group


@dataclass(frozen=True, slots=True)
class CodeConfig:
    root: Path
    extra_paths: tuple[str, ...]  # relative to root, normalized, inside root
    build: tuple[str, ...]
    build_timeout: float
    undeclared_changes: UndeclaredChanges
    ignore: tuple[str, ...] = ()  # gitignore patterns, after the built-in GENERATED ones


SQLITE_SIDECARS = ("-wal", "-shm", "-journal")
"""The files SQLite keeps beside a database: part of it, wherever the database goes."""


def reserve_path(target: str | Path) -> Path:
    """Where a take keeps the room a rollback's copy of `target` needs (data on another file
    system than state.dir): one fixed name per entry, as one swap is in flight at a time."""
    folder, name = os.path.split(os.fspath(target))
    return Path(folder) / f".{name}.swapguard-reserve"


@dataclass(frozen=True, slots=True)
class DataEntry:
    path: Path
    kind: DataKind


@dataclass(frozen=True, slots=True)
class DeadmanConfig:
    window: float
    extend_by: float
    hard_cap: float
    max_crashes: int
    health_check: tuple[str, ...]
    health_interval: float
    health_failures: int
    auto_confirm_after: float
    health_always: bool  # the health check runs outside probation too (liveness)
    stall_limit: float


@dataclass(frozen=True, slots=True)
class ControlConfig:
    socket: Path
    mode: int
    group: str
    allow_users: tuple[str, ...]
    allow_groups: tuple[str, ...]
    http_listen: tuple[str, int] | None  # (host, port) of the read-only TCP listener


@dataclass(frozen=True, slots=True)
class StateConfig:
    dir: Path
    keep_swaps: int
    keep_bytes: int = 0  # > 0: the disk budget of snapshots and kept probation data


@dataclass(frozen=True, slots=True)
class HooksConfig:
    on_event: tuple[str, ...]
    events: tuple[str, ...]  # fnmatch-style globs over event names


@dataclass(frozen=True, slots=True)
class Config:
    source: Path
    host: HostConfig
    code: CodeConfig
    data: tuple[DataEntry, ...]
    deadman: DeadmanConfig
    control: ControlConfig
    state: StateConfig
    hooks: HooksConfig

    def host_socket_dir(self) -> Path | None:
        """With host.user: `<state.dir>/host`, the one folder of state.dir the host's user may
        enter (it owns it, mode 0700), holding the sockets the host talks to; state.dir itself
        only lets the host's group pass through (0710). None: the host runs as swapguard's user
        and its sockets sit where they always did."""
        return self.state.dir / HOST_SOCKET_DIR_NAME if self.host.user else None

    def notify_socket(self) -> Path:
        """The host's NOTIFY_SOCKET."""
        return (self.host_socket_dir() or self.state.dir) / NOTIFY_SOCKET_NAME

    def host_control_socket(self) -> Path:
        """The host's SWAPGUARD_SOCKET: the control socket, or with host.user a second listener
        of the same API in the host's folder (the operators' socket may be out of its reach)."""
        folder = self.host_socket_dir()
        return self.control.socket if folder is None else folder / HOST_CONTROL_SOCKET_NAME

    def non_code_paths(self) -> list[Path]:
        """What is never code, though it may sit in the code root: swapguard's state and
        socket, the host's output, each data entry and its SQLite sidecars. Checkpoints leave
        them out; the code watcher ignores them (a busy database would wake it at every write)."""
        paths = [self.state.dir, self.control.socket]
        if self.host.output is not None:
            paths.append(self.host.output)
        for entry in self.data:
            paths.append(entry.path)
            paths.extend(entry.path.with_name(entry.path.name + s) for s in SQLITE_SIDECARS)
            paths.append(reserve_path(entry.path))
        return paths

    def non_code_patterns(self) -> tuple[str, ...]:
        """The rest of the same rule, by pattern: generated files (bytecode, tool caches, editor
        files) and `code.ignore`, in gitignore syntax relative to code.root. Checkpoints leave
        untracked files that match them out; the code watcher ignores them."""
        return (*GENERATED, *self.code.ignore)


# --- entry points ---------------------------------------------------------------------------


def find_config(explicit: str | None) -> Path:
    """`--config`, else `$SWAPGUARD_CONFIG`, else `./swapguard.toml`; absence is load_config's."""
    chosen = explicit or os.environ.get(CONFIG_ENV_VAR) or DEFAULT_FILE_NAME
    return Path(os.path.abspath(chosen))


def load_config(path: str | Path) -> Config:
    """Read and validate one config file; any problem is a ConfigError naming the file."""
    source = Path(os.path.abspath(path))
    file = str(source)
    try:
        raw = source.read_bytes()
    except FileNotFoundError:
        raise ConfigError("config file not found", file=file) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", file=file) from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", file=file) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", file=file) from None
    return parse_config(document, source=source)


def parse_config(document: Mapping[str, object], *, source: Path) -> Config:
    """Validate a parsed TOML document; relative paths resolve against the folder of `source`."""
    top = _Table(document, "", str(source), source.parent, {})
    _reject_unknown(top, _SECTIONS, what="section")
    config = Config(
        source=source,
        host=_parse_host(top.section("host", required=True)),
        code=_parse_code(top.section("code")),
        data=_parse_data(top),
        deadman=_parse_deadman(top.section("deadman")),
        control=_parse_control(top.section("control")),
        state=_parse_state(top.section("state")),
        hooks=_parse_hooks(top.section("hooks")),
    )
    state = document.get("state")
    state_dir_given = isinstance(state, Mapping) and "dir" in state
    _check_layout(config, top.file, state_dir_given=state_dir_given)
    return config


def parse_duration(value: object, *, key: str, file: str) -> float:
    """Seconds from a number or "250ms"/"1.5s"/"2m"/"1h"; a bare "0" or "10" counts as seconds."""
    seconds: float | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = float(min(value, 2 * int(MAX_DURATION_S)))  # a huge int would overflow a float
    elif isinstance(value, float) and not math.isnan(value):
        seconds = value
    elif isinstance(value, str):
        match = _DURATION_PATTERN.fullmatch(value.strip())
        if match:
            seconds = float(match["number"]) * _UNIT_SECONDS[match["unit"]]
    if seconds is None or seconds < 0:
        raise ConfigError(f"must be {_DURATION_FORMS}; got {_show(value)}", file=file, key=key)
    if seconds > MAX_DURATION_S:
        raise ConfigError(f"must be at most 8760h (a year); got {_show(value)}", file=file, key=key)
    return seconds


def parse_size(value: object, *, key: str, file: str) -> int:
    """Bytes from a whole number or a string like "512KiB", "10MB", "1.5GiB" (SI and IEC units)."""
    size: float | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str):
        match = _SIZE_PATTERN.fullmatch(value.strip())
        if match:
            size = float(match["number"]) * _UNIT_BYTES[(match["unit"] or "B").upper()]
    if size is None or size < 0:
        raise ConfigError(f"must be {_SIZE_FORMS}; got {_show(value)}", file=file, key=key)
    if size > MAX_SIZE_BYTES:
        raise ConfigError(f"must be at most 1 PiB; got {_show(value)}", file=file, key=key)
    return int(size)


# --- reading one table ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Table:
    """One TOML table being read: its values, dotted name, defaults, and the file it came from."""

    values: Mapping[str, object]
    name: str  # "" for the whole document, "host", "data[0]", "host.env"
    file: str
    base: Path  # the config file's folder, for relative paths
    defaults: Mapping[str, object]

    def key(self, field: str, index: int | None = None) -> str:
        shown = field if _BARE_KEY.fullmatch(field) else json.dumps(field, ensure_ascii=False)
        dotted = f"{self.name}.{shown}" if self.name else shown
        return dotted if index is None else f"{dotted}[{index}]"

    def fail(self, field: str, message: str, index: int | None = None) -> ConfigError:
        return ConfigError(message, file=self.file, key=self.key(field, index))

    def raw(self, field: str) -> object:
        if field in self.values:
            return self.values[field]
        if field not in self.defaults:
            raise self.fail(field, "is required")
        return self.defaults[field]

    def section(self, name: str, *, required: bool = False) -> _Table:
        """A sub-table whose unknown keys have been rejected already."""
        values = self.values.get(name, {})
        if name not in self.values and required:
            raise ConfigError(f"section [{name}] is required", file=self.file, key=name)
        if not isinstance(values, Mapping):
            raise self.fail(name, f"must be a table ([{name}]); got {_show(values)}")
        table = _Table(values, self.key(name), self.file, self.base, DEFAULTS.get(name, {}))
        _reject_unknown(table, _KEYS[name])
        return table

    def text(self, field: str) -> str:
        value = self.raw(field)
        if not isinstance(value, str):
            raise self.fail(field, f"must be a string; got {_show(value)}")
        if "\0" in value:
            raise self.fail(field, "must not contain a NUL character")
        return value

    def choice(self, field: str, options: tuple[str, ...]) -> Any:
        """One of a Literal's values (typed Any so the dataclass sees its Literal)."""
        value = self.text(field)
        if value not in options:
            shown = " | ".join(f'"{option}"' for option in options)
            raise self.fail(field, f"must be one of {shown}; got {value!r}")
        return value

    def duration(self, field: str, *, positive: bool = False) -> float:
        seconds = parse_duration(self.raw(field), key=self.key(field), file=self.file)
        if positive and seconds <= 0:
            raise self.fail(field, f"must be greater than 0; got {_show(self.raw(field))}")
        return seconds

    def flag(self, field: str) -> bool:
        value = self.raw(field)
        if not isinstance(value, bool):
            raise self.fail(field, f"must be true or false; got {_show(value)}")
        return value

    def size(self, field: str) -> int:
        return parse_size(self.raw(field), key=self.key(field), file=self.file)

    def count(self, field: str, *, minimum: int = 1) -> int:
        value = self.raw(field)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(field, f"must be an integer; got {_show(value)}")
        if not minimum <= value <= MAX_COUNT:
            raise self.fail(field, f"must be between {minimum} and {MAX_COUNT}; got {value}")
        return value

    def strings(self, field: str, *, nonempty: bool = False) -> tuple[str, ...]:
        value = self.raw(field)
        if not isinstance(value, list):
            raise self.fail(field, f"must be an array of strings; got {_show(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(field, f"must be a string; got {_show(item)}", index)
            if "\0" in item or (nonempty and not item.strip()):
                raise self.fail(field, "must not be empty or contain a NUL character", index)
        return tuple(value)

    def argv(self, field: str, *, required: bool = False) -> tuple[str, ...]:
        """An array of strings, or one string split by shlex (no shell runs); empty = none."""
        value = self.raw(field)
        if isinstance(value, str):
            try:
                argv = tuple(shlex.split(self.text(field)))
            except ValueError as exc:
                raise self.fail(field, f"cannot split the command string: {exc}") from None
        elif isinstance(value, list):
            argv = self.strings(field)
        else:
            raise self.fail(field, f"must be an array of strings or a string; got {_show(value)}")
        if required and not argv:
            raise self.fail(field, "must name a program to run; got an empty command")
        if argv and not argv[0]:
            raise self.fail(field, "the program (first item) must not be an empty string")
        return argv

    def path(self, field: str) -> Path:
        text = self.text(field)
        if not text.strip():
            raise self.fail(field, 'must be a path; got an empty string ("." is this folder)')
        return Path(os.path.normpath(os.path.join(self.base, text)))


def _reject_unknown(table: _Table, allowed: Sequence[str], *, what: str = "key") -> None:
    for field in table.values:
        if field not in allowed:
            import difflib  # only on this error path: the running daemon need not hold it

            close = difflib.get_close_matches(field, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise table.fail(field, f"unknown {what}; {hint}expected one of: {', '.join(allowed)}")


def _show(value: object) -> str:
    """The TOML type and a short rendering of a bad value, for error messages."""
    kinds = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
    kind = next((name for cls, name in kinds.items() if isinstance(value, cls)), None)
    kind = kind or ("table" if isinstance(value, Mapping) else type(value).__name__)
    text = str(value).lower() if isinstance(value, bool) else repr(value)
    return f"{kind} {text[:60] + '...' if len(text) > 60 else text}"


def _env(table: _Table) -> Mapping[str, str]:
    value = table.raw("env")
    if not isinstance(value, Mapping):
        raise table.fail("env", f"must be a table of strings; got {_show(value)}")
    env = _Table(value, table.key("env"), table.file, table.base, {})
    for name, item in value.items():
        if not name or "=" in name or "\0" in name:
            raise env.fail(name, "is not a valid variable name (empty, or has '=' or NUL)")
        if not isinstance(item, str):
            raise env.fail(name, f'must be a string (quote numbers: "8080"); got {_show(item)}')
        if "\0" in item:
            raise env.fail(name, "must not contain a NUL character")
    return MappingProxyType(dict(value))


def _inherit_env(table: _Table) -> tuple[str, ...] | None:
    """true: everything swapguard has; an array: only these variable names of it."""
    if table.raw("inherit_env") is True:
        return None
    if table.raw("inherit_env") is False:
        raise table.fail("inherit_env", "must be true or an array of names (use [] for none)")
    names = table.strings("inherit_env", nonempty=True)
    for index, name in enumerate(names):
        if "=" in name:
            raise table.fail("inherit_env", "is not a valid variable name (has '=')", index)
    return names


def _account(table: _Table, field: str) -> str:
    """A user or group: a name or a numeric id, checked against the user database at start (and
    by `swapguard check`), not here (pure)."""
    text = table.text(field).strip()
    if text.startswith("-") or any(ch.isspace() or ch in ":/" for ch in text):
        raise table.fail(field, f"must be a {field} name or a numeric id; got {text!r}")
    return text


def _signal(table: _Table) -> signal.Signals:
    value = table.raw("stop_signal")
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value)
    found: signal.Signals | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        found = next((sig for sig in signal.Signals if sig.value == value), None)
    elif isinstance(value, str):
        name = value.strip().upper()
        found = signal.Signals.__members__.get(name if name.startswith("SIG") else f"SIG{name}")
    if found is None:
        message = f'must be a signal name ("SIGTERM", "INT") or number; got {_show(value)}'
        raise table.fail("stop_signal", message)
    if found == signal.SIGSTOP:
        raise table.fail("stop_signal", "SIGSTOP would only freeze the host; use SIGTERM or SIGINT")
    return found


def _mode(table: _Table) -> int:
    value = table.raw("mode")
    match = _MODE_PATTERN.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise table.fail("mode", f'must be an octal string like "0660"; got {_show(value)}')
    mode = int(match["digits"], 8)
    if mode & 0o600 != 0o600:
        raise table.fail("mode", f"must let the owner read and write (0600 and up); got {value!r}")
    return mode


def _extra_paths(table: _Table) -> tuple[str, ...]:
    """Relative, normalized, inside the root, outside .git, and not nested in each other."""
    clean_paths: list[str] = []
    for index, text in enumerate(table.strings("extra_paths")):
        clean = posixpath.normpath(text) if text.strip() else ""
        first = clean.split("/")[0]
        if not clean or clean == "." or posixpath.isabs(clean) or first == "..":
            message = f"must be a path inside code.root, relative to it; got {text!r}"
            raise table.fail("extra_paths", message, index)
        if first == ".git":
            message = "must not point into .git; git's own files are not captured"
            raise table.fail("extra_paths", message, index)
        earlier = next((old for old in clean_paths if _overlap(Path(clean), Path(old))), None)
        if earlier:
            raise table.fail("extra_paths", f"overlaps {earlier!r}, listed before", index)
        clean_paths.append(clean)
    return tuple(clean_paths)


# --- sections and the checks across them -------------------------------------------------------


def _parse_host(table: _Table) -> HostConfig:
    host = HostConfig(
        command=table.argv("command", required=True),
        cwd=table.path("cwd"),
        env=_env(table),
        inherit_env=_inherit_env(table),
        ready=table.choice("ready", get_args(ReadyMode)),
        start_timeout=table.duration("start_timeout", positive=True),
        min_uptime=table.duration("min_uptime"),
        heartbeat_timeout=table.duration("heartbeat_timeout"),
        stop_signal=_signal(table),
        stop_timeout=table.duration("stop_timeout"),
        restart=table.choice("restart", get_args(RestartPolicy)),
        restart_delay=table.duration("restart_delay"),
        restart_delay_max=table.duration("restart_delay_max"),
        restart_reset_after=table.duration("restart_reset_after"),
        output=None if table.text("output") == "inherit" else table.path("output"),
        output_max_bytes=table.size("output_max_bytes"),
        output_backups=table.count("output_backups", minimum=0),
        user=_account(table, "user"),
        group=_account(table, "group"),
    )
    if host.group and not host.user:
        raise table.fail("group", "needs host.user: the host runs as swapguard's own user")
    if host.output_max_bytes and host.output is None:
        raise table.fail("output_max_bytes", 'rotates the output file: set host.output to a path')
    if 0 < host.output_max_bytes < MIN_OUTPUT_ROTATE_BYTES:
        message = f"must be 0 (off) or at least {MIN_OUTPUT_ROTATE_BYTES} bytes"
        raise table.fail("output_max_bytes", message)
    if host.restart_delay > host.restart_delay_max:
        message = f"must not exceed host.restart_delay_max ({host.restart_delay_max:g}s)"
        raise table.fail("restart_delay", message)
    if host.ready == "started" and host.min_uptime >= host.start_timeout:
        message = 'must be shorter than host.start_timeout when ready = "started"'
        raise table.fail("min_uptime", message)
    return host


def _parse_code(table: _Table) -> CodeConfig:
    code = CodeConfig(
        root=table.path("root"),
        extra_paths=_extra_paths(table),
        build=table.argv("build"),
        build_timeout=table.duration("build_timeout", positive=True),
        undeclared_changes=table.choice("undeclared_changes", get_args(UndeclaredChanges)),
        ignore=_ignore_patterns(table),
    )
    _check_extra_paths_are_code(table, code)
    return code


def _check_extra_paths_are_code(table: _Table, code: CodeConfig) -> None:
    """An extra path that an ignore pattern matches would be listed and then left out."""
    rules = IgnoreRules((*GENERATED, *code.ignore))
    for index, extra in enumerate(code.extra_paths):
        if rules.matches(extra, is_dir=True) or rules.matches(extra):
            message = (
                f"{extra!r} is matched by code.ignore or the built-in generated files, so it "
                f"would never be captured; remove it, or re-include it with \"!{extra}\" in "
                "code.ignore"
            )
            raise table.fail("extra_paths", message, index)


def _ignore_patterns(table: _Table) -> tuple[str, ...]:
    """gitignore patterns of files that are never code; each a plain one-line pattern."""
    patterns = table.strings("ignore")
    for index, pattern in enumerate(patterns):
        if (problem := pattern_problem(pattern)) is not None:
            raise table.fail("ignore", f"{problem}; got {pattern!r}", index)
    return patterns


def _parse_data(top: _Table) -> tuple[DataEntry, ...]:
    entries = top.values.get("data", [])
    if not isinstance(entries, list):
        raise top.fail("data", f"must be an array of tables ([[data]]); got {_show(entries)}")
    parsed: list[DataEntry] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise top.fail("data", f"must be a table ([[data]]); got {_show(entry)}", index)
        table = _Table(entry, f"data[{index}]", top.file, top.base, {})
        _reject_unknown(table, _KEYS["data"])
        path, kind = table.path("path"), table.choice("kind", get_args(DataKind))
        for other_index, other in enumerate(parsed):
            if _overlap(path, other.path):
                raise table.fail("path", f"overlaps data[{other_index}].path ({other.path})")
        parsed.append(DataEntry(path, kind))
    return tuple(parsed)


def _parse_deadman(table: _Table) -> DeadmanConfig:
    deadman = DeadmanConfig(
        window=table.duration("window", positive=True),
        extend_by=table.duration("extend_by", positive=True),
        hard_cap=table.duration("hard_cap", positive=True),
        max_crashes=table.count("max_crashes"),
        health_check=table.argv("health_check"),
        health_interval=table.duration("health_interval", positive=True),
        health_failures=table.count("health_failures"),
        auto_confirm_after=table.duration("auto_confirm_after"),
        health_always=table.flag("health_always"),
        stall_limit=table.duration("stall_limit"),
    )
    if deadman.stall_limit < MIN_STALL_LIMIT_S:
        message = f"must be at least {MIN_STALL_LIMIT_S:g}s: a busy machine pauses a loop that long"
        raise table.fail("stall_limit", message)
    if deadman.health_always and not deadman.health_check:
        raise table.fail("health_always", "needs deadman.health_check: there is no check to run")
    if deadman.hard_cap < deadman.window:
        raise table.fail("hard_cap", f"must be at least deadman.window ({deadman.window:g}s)")
    if deadman.auto_confirm_after >= deadman.hard_cap:
        message = "must be shorter than deadman.hard_cap (or 0 = off): no swap could reach it"
        raise table.fail("auto_confirm_after", message)
    return deadman


def staging_socket_path(path: Path) -> Path:
    """The temporary name a socket is bound under before it is renamed into place (same folder,
    always this long): no client ever sees it with looser permissions than configured."""
    return path.with_name(f".{os.urandom(4).hex()}.sock~")


def socket_path_problem(path: Path, *, staged: bool = False) -> str | None:
    """Why `path` cannot be a unix socket's address, or None; `staged`: it is first bound under
    `staging_socket_path`, which must fit too."""
    length = len(os.fsencode(path))
    if length > MAX_SOCKET_PATH_BYTES:
        return f"{path} is {length} bytes; unix socket paths allow {MAX_SOCKET_PATH_BYTES}"
    if staged:
        staging = staging_socket_path(path)
        if (length := len(os.fsencode(staging))) > MAX_SOCKET_PATH_BYTES:
            return (
                f"{path} is bound first under a temporary name of {length} bytes "
                f"(.<8 hex digits>.sock~ beside it); unix socket paths allow "
                f"{MAX_SOCKET_PATH_BYTES}"
            )
    return None


def _parse_control(table: _Table) -> ControlConfig:
    socket_path = table.path("socket")
    if (problem := socket_path_problem(socket_path, staged=True)) is not None:
        raise table.fail("socket", problem)
    return ControlConfig(
        socket=socket_path,
        mode=_mode(table),
        group=table.text("group"),
        allow_users=table.strings("allow_users", nonempty=True),
        allow_groups=table.strings("allow_groups", nonempty=True),
        http_listen=_listen_address(table),
    )


def _listen_address(table: _Table) -> tuple[str, int] | None:
    """ "host:port" or "[v6 address]:port" (port 0: any free one); "" for none."""
    text = table.text("http_listen").strip()
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # a bare v6 address: its port is ambiguous
    if not (sep and host and port.isascii() and port.isdigit() and int(port) <= 65535):
        message = f'must be "host:port" (e.g. "127.0.0.1:9187", "[::1]:9187"); got {_show(text)}'
        raise table.fail("http_listen", message)
    return host, int(port)


def _parse_state(table: _Table) -> StateConfig:
    state_dir = table.path("dir")
    if (problem := socket_path_problem(state_dir / NOTIFY_SOCKET_NAME)) is not None:
        raise table.fail("dir", f"its notify socket {problem}; use a shorter state.dir")
    keep_swaps, keep_bytes = table.count("keep_swaps"), table.size("keep_bytes")
    return StateConfig(dir=state_dir, keep_swaps=keep_swaps, keep_bytes=keep_bytes)


def _parse_hooks(table: _Table) -> HooksConfig:
    events = table.strings("events", nonempty=True)
    return HooksConfig(on_event=table.argv("on_event"), events=events)


def _nested(inner: Path, outer: Path) -> bool:
    """True when inner is outer or lies below it (lexically; both are normalized)."""
    return inner == outer or outer in inner.parents


def _overlap(first: Path, second: Path) -> bool:
    return _nested(first, second) or _nested(second, first)


def _check_layout(config: Config, file: str, *, state_dir_given: bool) -> None:
    """Keep the state store, the code tree and the data entries from stepping on each other.
    A clash with the default state.dir blames code.root: the key the user wrote."""
    state_dir, root = config.state.dir, config.code.root
    if config.host_socket_dir() is not None:
        for path in (config.notify_socket(), config.host_control_socket()):
            if (problem := socket_path_problem(path)) is not None:
                message = f"the host's socket {problem} (host.user is set); use a shorter one"
                raise ConfigError(message, file=file, key="state.dir")
    if _nested(root, state_dir):
        if state_dir_given:
            message = f"{state_dir} is or holds code.root; a restore of the code would overwrite it"
            raise ConfigError(message, file=file, key="state.dir")
        message = f"{root} is or lies inside state.dir ({state_dir}); set state.dir elsewhere"
        raise ConfigError(message, file=file, key="code.root")
    for index, extra in enumerate(config.code.extra_paths):
        if _overlap(root / extra, state_dir):
            message = f"{extra!r} overlaps state.dir ({state_dir}), which is never captured"
            raise ConfigError(message, file=file, key=f"code.extra_paths[{index}]")
    for index, entry in enumerate(config.data):
        if _overlap(entry.path, state_dir):
            message = f"{entry.path} overlaps state.dir ({state_dir}); data must live outside it"
            raise ConfigError(message, file=file, key=f"data[{index}].path")
        if _nested(root, entry.path):
            message = f"{entry.path} is or holds code.root ({root}), which git restores"
            raise ConfigError(message, file=file, key=f"data[{index}].path")
