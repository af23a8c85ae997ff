"""The commented `swapguard.toml` of `swapguard init`, and the defaults parsed from it.

The template is the one source of the defaults: `DEFAULTS` is read from it, so what `swapguard
init` writes and what `supervisor.config.schema` assumes cannot drift apart, and both pass the same
validation as what a user writes. Pure: no file is read or written here.
"""

from __future__ import annotations

import json
import shlex
import tomllib
from collections.abc import Sequence

from supervisor.errors import ConfigError

PLACEHOLDER_COMMAND = ("python3", "app.py")

_COMMAND_SLOT = "{command}"
_TEMPLATE = """\
# swapguard.toml: configuration of the swapguard supervisor. `swapguard check` validates it.
# Every key but host.command is optional; the values shown are the defaults.
# Relative paths resolve against this file's folder.
# Durations: a number of seconds or a string like "250ms", "1.5s", "90s", "2m", "1h".

# The service swapguard runs, takes the heartbeat of, and restarts.
[host]
command = {command}  # argv; a string is split like a shell would, but no shell runs
cwd = "."                 # working directory of the host
env = {}                  # added to swapguard's own environment, e.g. { PORT = "8080" }
inherit_env = true        # true: the host inherits swapguard's whole environment; or only
                          # these names of it, e.g. ["PATH", "HOME", "LANG"] (env and the
                          # NOTIFY_SOCKET/SWAPGUARD_* variables are always given)
ready = "notify"          # "notify": ready at READY=1 | "started": ready once up for min_uptime
start_timeout = "60s"     # not ready by then: restart (on probation: roll back)
min_uptime = "1s"         # an exit sooner than this is a failed start
heartbeat_timeout = "0"   # > 0: once ready, a heartbeat (WATCHDOG=1) is due at least this often
stop_signal = "SIGTERM"   # asks the host to stop: a name ("SIGTERM", "INT") or a number
stop_timeout = "10s"      # then SIGKILL to every process of the host's tree
restart = "always"        # when the host exits: "always" | "on-failure" | "no"
restart_delay = "100ms"   # first delay after a failure; doubles per failure, with jitter
restart_delay_max = "30s"    # the restart delay never grows past this
restart_reset_after = "60s"  # ready this long: delay and failure count reset
output = "inherit"        # "inherit" (swapguard's own stdout/stderr) or a log file path
output_max_bytes = "0"    # > 0: rotate the output file at this size, e.g. "10MB"
output_backups = 5        # rotated files kept: output.1 (newest) ... output.5
user = ""                 # run the host as this user (a name or a uid; needs swapguard as root);
                          # its groups, HOME, USER, LOGNAME and SHELL come from the user database
group = ""                # and this group (name or gid); "": the user's primary group

# The code tree that a swap changes and a rollback restores.
[code]
root = "."                # the git working tree that holds the host's code
extra_paths = []          # git-ignored paths under root to capture too, e.g. ["dist"]
build = []                # argv run in root before a new version starts and after a rollback
build_timeout = "10m"     # a longer build fails (and a new version rolls back)
undeclared_changes = "guard"  # edits while no swap is prepared: "guard" | "warn" | "ignore"
ignore = []               # gitignore patterns that are never code (not drift, not captured),
                          # besides the built-in generated files: __pycache__/, *.py[co],
                          # .pytest_cache/, .mypy_cache/, node_modules/.cache/, editor swap
                          # files, ...; e.g. ["tmp/", "*.cache"]; "!pattern" re-includes

# Data restored together with the code on rollback; repeat the block for each entry.
# [[data]]
# path = "data/app.db"    # a file or folder the host writes, snapshotted at each activation
# kind = "sqlite"         # "sqlite" (minds -wal/-shm/-journal) | "file" | "dir"

# The clock of a swap on probation.
[deadman]
window = "2m"             # deadline = new version spawned + window
extend_by = "2m"          # an extension: deadline = now + extend_by, never sooner ...
hard_cap = "10m"          # ... never past activation + hard_cap
max_crashes = 2           # crashes of the new version that roll back at once
health_check = []         # argv run every health_interval on probation; exit 0 = healthy
health_interval = "10s"   # how often health_check runs
health_failures = 3       # consecutive failed health checks that roll back at once
auto_confirm_after = "0"  # > 0: confirm once ready, heartbeating and healthy this long
health_always = false     # true: health_check runs outside probation too; health_failures
                          # failures in a row restart the host (event host.unhealthy)
stall_limit = "5s"        # swapguard's own loop stuck this long: log where, exit 70 to be restarted

# The control socket: HTTP/1.1 + JSON for the CLI, curl and the host itself.
[control]
socket = ".swapguard/control.sock"  # where the CLI and curl --unix-socket reach swapguard
mode = "0660"             # permission bits of the socket file, an octal string
group = ""                # group owner of the socket file ("": swapguard's own group)
allow_users = []          # beside root, swapguard's own user and the host's tree: who may write
allow_groups = []         # members of these groups may write too
http_listen = ""          # e.g. "127.0.0.1:9187": read-only TCP for /metrics, /v1/status, /

# swapguard's own state; never inside anything the host writes.
[state]
dir = ".swapguard"        # state store, snapshots, notify socket; created 0700
keep_swaps = 20           # finished swaps whose snapshots (and kept data) are kept
keep_bytes = "0"          # > 0: disk budget of snapshots + kept data, e.g. "2GiB"; oldest go first

# A command run on events, e.g. to page someone when a rollback fails.
[hooks]
on_event = []             # argv; runs per event with the event JSON on stdin, 10 s limit;
                          # a run that fails or times out is retried: 4 runs, 1-8 s apart
events = ["swap.*", "host.crash_loop", "rollback.failed"]  # event names, fnmatch globs
"""
# The template is the one source of the defaults, so `swapguard init` cannot drift from them.
DEFAULTS: dict[str, dict[str, object]] = tomllib.loads(_TEMPLATE.replace(_COMMAND_SLOT, "[]"))
del DEFAULTS["host"]["command"]  # the one required key


def render_init(command: Sequence[str] | None = None) -> str:
    """The commented file of `swapguard init`: every key at its default, accepted by load_config."""
    if isinstance(command, str):
        command = shlex.split(command)
    argv = tuple(command) if command else PLACEHOLDER_COMMAND
    return _TEMPLATE.replace(_COMMAND_SLOT, "[" + ", ".join(map(_toml_string, argv)) + "]")


def _toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's too; DEL must be escaped as well."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{text!r} is not valid text", key="host.command") from None
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
