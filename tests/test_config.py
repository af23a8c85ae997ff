"""swapguard.toml: defaults, every accepted form, and errors naming key and file for bad ones."""

from __future__ import annotations

import math
import os
import re
import signal
import tomllib
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.config.noncode import GENERATED
from supervisor.config.schema import (
    CodeConfig,
    Config,
    ControlConfig,
    DataEntry,
    DeadmanConfig,
    HooksConfig,
    HostConfig,
    StateConfig,
    find_config,
    load_config,
    parse_config,
    parse_duration,
    render_init,
)
from supervisor.errors import ConfigError

HOST = '[host]\ncommand = ["python3", "app.py"]\n'

# The keys of the README's "Configuration reference", written out so the module can't grade itself.
CONTRACT_KEYS = {
    "host": [
        "command", "cwd", "env", "inherit_env", "ready", "start_timeout", "min_uptime",
        "heartbeat_timeout", "stop_signal", "stop_timeout", "restart", "restart_delay",
        "restart_delay_max", "restart_reset_after", "output", "output_max_bytes", "output_backups",
        "user", "group",
    ],
    "code": ["root", "extra_paths", "build", "build_timeout", "undeclared_changes", "ignore"],
    "data": ["path", "kind"],
    "deadman": [
        "window", "extend_by", "hard_cap", "max_crashes", "health_check", "health_interval",
        "health_failures", "auto_confirm_after", "health_always", "stall_limit",
    ],
    "control": ["socket", "mode", "group", "allow_users", "allow_groups", "http_listen"],
    "state": ["dir", "keep_swaps", "keep_bytes"],
    "hooks": ["on_event", "events"],
}  # fmt: skip


def write(folder: Path, text: str, name: str = "swapguard.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def expected_defaults(folder: Path, command: tuple[str, ...]) -> Config:
    """The contract's defaults, spelled out independently of the module's template."""
    return Config(
        source=folder / "swapguard.toml",
        host=HostConfig(
            command=command,
            cwd=folder,
            env=MappingProxyType({}),
            inherit_env=None,
            ready="notify",
            start_timeout=60.0,
            min_uptime=1.0,
            heartbeat_timeout=0.0,
            stop_signal=signal.SIGTERM,
            stop_timeout=10.0,
            restart="always",
            restart_delay=0.1,
            restart_delay_max=30.0,
            restart_reset_after=60.0,
            output=None,
            output_max_bytes=0,
            output_backups=5,
            user="",
            group="",
        ),
        code=CodeConfig(
            root=folder, extra_paths=(), build=(), build_timeout=600.0, undeclared_changes="guard"
        ),
        data=(),
        deadman=DeadmanConfig(
            window=120.0,
            extend_by=120.0,
            hard_cap=600.0,
            max_crashes=2,
            health_check=(),
            health_interval=10.0,
            health_failures=3,
            auto_confirm_after=0.0,
            health_always=False,
            stall_limit=5.0,
        ),
        control=ControlConfig(
            socket=folder / ".swapguard" / "control.sock",
            mode=0o660,
            group="",
            allow_users=(),
            allow_groups=(),
            http_listen=None,
        ),
        state=StateConfig(dir=folder / ".swapguard", keep_swaps=20, keep_bytes=0),
        hooks=HooksConfig(on_event=(), events=("swap.*", "host.crash_loop", "rollback.failed")),
    )


def test_non_code_paths_are_state_socket_output_and_data_with_sidecars(tmp_path: Path) -> None:
    text = HOST + 'output = "logs/host.log"\n[[data]]\npath = "data/app.db"\nkind = "sqlite"\n'
    config = load_config(write(tmp_path, text))
    db = tmp_path / "data" / "app.db"
    assert config.non_code_paths() == [
        tmp_path / ".swapguard",
        config.control.socket,
        tmp_path / "logs" / "host.log",
        db,
        *(db.with_name(f"app.db{suffix}") for suffix in ("-wal", "-shm", "-journal")),
        db.with_name(".app.db.swapguard-reserve"),  # the room a rollback's copy needs
    ]


# --- defaults and init --------------------------------------------------------------------------


def test_non_code_patterns_are_the_built_in_list_then_code_ignore(tmp_path: Path) -> None:
    text = HOST + '[code]\nextra_paths = ["dist"]\nignore = ["tmp/", "dist/", "!dist"]\n'
    config = load_config(write(tmp_path, text))
    assert config.code.ignore == ("tmp/", "dist/", "!dist")  # re-included: an extra path may be
    assert config.non_code_patterns() == (*GENERATED, "tmp/", "dist/", "!dist")


def test_only_the_command_gives_the_contract_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, HOST))
    assert config == expected_defaults(tmp_path, ("python3", "app.py"))
    assert isinstance(config.host.env, MappingProxyType)


def test_render_init_round_trips_to_the_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, render_init()))
    assert config == expected_defaults(tmp_path, ("python3", "app.py"))


def test_render_init_with_a_command_keeps_it_exactly(tmp_path: Path) -> None:
    awkward = ["node", "dist/index.js", '--name=a "quoted" \\ value', "tab\there", "del\x7f", "é"]
    config = load_config(write(tmp_path, render_init(awkward)))
    assert config.host.command == tuple(awkward)
    assert load_config(write(tmp_path, render_init("npm run 'start prod'"))).host.command == (
        "npm",
        "run",
        "start prod",
    )


def test_render_init_documents_every_contract_key_with_a_comment() -> None:
    text = render_init()
    for section, keys in CONTRACT_KEYS.items():
        header = "# [[data]]" if section == "data" else f"[{section}]"
        assert header in text.splitlines()
        for key in keys:
            lines = [line for line in text.splitlines() if re.match(rf"(# )?{key} = ", line)]
            assert lines, f"{section}.{key} missing from render_init()"
            assert any("#" in line.split(" = ", 1)[1] for line in lines), f"{key} has no comment"
    # The TOML document holds exactly the contract's keys, [[data]] being an example only.
    document = tomllib.loads(text)
    assert {name: list(table) for name, table in document.items()} == {
        name: keys for name, keys in CONTRACT_KEYS.items() if name != "data"
    }


# --- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (5, 5.0),
        (1.5, 1.5),
        ("0", 0.0),
        ("10", 10.0),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("90s", 90.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        (" 2m ", 120.0),
        ("3 s", 3.0),
        ("8760h", 8760 * 3600.0),
    ],
)
def test_every_duration_form(value: object, seconds: float) -> None:
    assert math.isclose(parse_duration(value, key="host.stop_timeout", file="f.toml"), seconds)


@pytest.mark.parametrize(
    "value",
    [-1, -0.5, "-1s", "1d", "1H", "abc", "", "ms", "1.5.5s", "1e3", "1hh", "1h30m", True, False,
     None, [], {}, math.nan, math.inf, "8761h", 10**30, "\u0661\u0665s"],
)  # fmt: skip
def test_bad_durations_name_key_and_file(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_duration(value, key="host.stop_timeout", file="/etc/swapguard.toml")
    assert caught.value.key == "host.stop_timeout"
    assert "/etc/swapguard.toml" in str(caught.value)
    assert "host.stop_timeout" in str(caught.value)


def test_durations_in_every_section_use_the_same_parser(tmp_path: Path) -> None:
    text = HOST + 'start_timeout = 90\nstop_timeout = "250ms"\n[deadman]\nwindow = "1.5s"\n'
    config = load_config(write(tmp_path, text + 'hard_cap = "1h"\n[code]\nbuild_timeout = 2.5\n'))
    assert (config.host.start_timeout, config.host.stop_timeout) == (90.0, 0.25)
    assert (config.deadman.window, config.deadman.hard_cap) == (1.5, 3600.0)
    assert config.code.build_timeout == 2.5


# --- finding the file, paths ---------------------------------------------------------------------


def test_find_config_prefers_flag_then_environment_then_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWAPGUARD_CONFIG", "/etc/from-env.toml")
    assert find_config("/srv/flag.toml") == Path("/srv/flag.toml")
    assert find_config(None) == Path("/etc/from-env.toml")
    monkeypatch.setenv("SWAPGUARD_CONFIG", "")
    assert find_config(None) == tmp_path / "swapguard.toml"
    monkeypatch.delenv("SWAPGUARD_CONFIG")
    assert find_config(None) == tmp_path / "swapguard.toml"
    assert find_config("relative.toml") == tmp_path / "relative.toml"
    assert not (tmp_path / "swapguard.toml").exists()  # looked up, never created


def test_relative_paths_resolve_against_the_config_folder_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "deploy" / "conf"
    text = (
        HOST
        + 'cwd = "../app/"\noutput = "logs/../logs/host.log"\n'
        + '[code]\nroot = "../app"\nextra_paths = ["dist/", "./build//out"]\n'
        + '[[data]]\npath = "../app/data/app.db"\nkind = "sqlite"\n'
        + '[[data]]\npath = "/var/lib/app/uploads"\nkind = "dir"\n'
        + '[control]\nsocket = "run/ctl.sock"\n[state]\ndir = "/var/lib/swapguard"\n'
    )
    write(folder, text)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("..") / "deploy" / "conf" / "swapguard.toml")
    app = tmp_path / "deploy" / "app"
    assert config.source == folder / "swapguard.toml"
    assert config.host.cwd == app
    assert config.host.output == folder / "logs" / "host.log"
    assert config.code.root == app
    assert config.code.extra_paths == ("dist", "build/out")
    assert config.data == (
        DataEntry(app / "data" / "app.db", "sqlite"),
        DataEntry(Path("/var/lib/app/uploads"), "dir"),
    )
    assert config.control.socket == folder / "run" / "ctl.sock"
    assert config.state.dir == Path("/var/lib/swapguard")
    assert not (folder / "run").exists() and not (folder / ".swapguard").exists()


# --- argv, signals, modes, env -------------------------------------------------------------------


def test_argv_is_a_list_or_a_string_split_like_a_shell_would(tmp_path: Path) -> None:
    text = (
        "[host]\ncommand = \"node 'dist/my app.js' --port=80 # not a comment to shlex\"\n"
        '[code]\nbuild = ["npm", "run", "build"]\n'
        '[deadman]\nhealth_check = "curl -fsS http://127.0.0.1:8080/health"\n'
        '[hooks]\non_event = ""\n'
    )
    config = load_config(write(tmp_path, text))
    assert config.host.command == (
        "node", "dist/my app.js", "--port=80", "#", "not", "a", "comment", "to", "shlex",
    )  # fmt: skip
    assert config.code.build == ("npm", "run", "build")
    assert config.deadman.health_check == ("curl", "-fsS", "http://127.0.0.1:8080/health")
    assert config.hooks.on_event == ()


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ('"SIGTERM"', signal.SIGTERM),
        ('"TERM"', signal.SIGTERM),
        ('"sigint"', signal.SIGINT),
        ('"quit"', signal.SIGQUIT),
        ("9", signal.SIGKILL),
        ('"15"', signal.SIGTERM),
        ('"SIGHUP"', signal.SIGHUP),
    ],
)
def test_stop_signal_by_name_or_number(
    tmp_path: Path, written: str, expected: signal.Signals
) -> None:
    config = load_config(write(tmp_path, HOST + f"stop_signal = {written}\n"))
    assert config.host.stop_signal is expected


@pytest.mark.parametrize(
    ("written", "mode"),
    [('"0660"', 0o660), ('"0600"', 0o600), ('"0o640"', 0o640), ('"777"', 0o777)],
)
def test_socket_mode_is_an_octal_string(tmp_path: Path, written: str, mode: int) -> None:
    config = load_config(write(tmp_path, HOST + f"[control]\nmode = {written}\n"))
    assert config.control.mode == mode


def test_env_is_a_read_only_copy(tmp_path: Path) -> None:
    text = HOST + 'env = { PORT = "8080", "DOTTED.NAME" = "x y", EMPTY = "" }\n'
    env = load_config(write(tmp_path, text)).host.env
    assert dict(env) == {"PORT": "8080", "DOTTED.NAME": "x y", "EMPTY": ""}
    with pytest.raises(TypeError):
        env["PORT"] = "1"  # type: ignore[index]


def test_a_sensible_full_config_loads(tmp_path: Path) -> None:
    text = (
        HOST
        + 'ready = "started"\nmin_uptime = "2s"\nstart_timeout = "5s"\nrestart = "on-failure"\n'
        + 'heartbeat_timeout = "30s"\nrestart_delay = "1s"\nrestart_delay_max = "1s"\n'
        + '[code]\nundeclared_changes = "warn"\n'
        + '[deadman]\nwindow = "1m"\nhard_cap = "1m"\nauto_confirm_after = "30s"\n'
        + "max_crashes = 1\nhealth_failures = 10000\n"
        + '[control]\ngroup = "ops"\nallow_users = ["deploy"]\nallow_groups = ["wheel"]\n'
        + '[state]\nkeep_swaps = 1\n[hooks]\nevents = ["*"]\n'
    )
    config = load_config(write(tmp_path, text))
    assert config.host.ready == "started" and config.host.restart == "on-failure"
    assert config.deadman.auto_confirm_after == 30.0 and config.deadman.hard_cap == 60.0
    assert config.control.allow_users == ("deploy",) and config.hooks.events == ("*",)


# --- every bad input names its key and the file ----------------------------------------------

D = '[[data]]\npath = "data/app.db"\nkind = "sqlite"\n'

BAD_INPUTS: list[tuple[str, str]] = [
    # top level
    ("", "host"),
    ("[hostt]\n" + HOST, "hostt"),
    (HOST + "[extra]\nx = 1\n", "extra"),
    (HOST + "stray = 1\n[code]\n", "host.stray"),
    ("host = 1\n", "host"),
    # [host]
    ("[host]\ncwd = '.'\n", "host.command"),
    ("[host]\ncommand = []\n", "host.command"),
    ("[host]\ncommand = ''\n", "host.command"),
    ("[host]\ncommand = 5\n", "host.command"),
    ("[host]\ncommand = ['python3', 1]\n", "host.command[1]"),
    ("[host]\ncommand = ['', 'x']\n", "host.command"),
    ('[host]\ncommand = "python3 \'unclosed"\n', "host.command"),
    ('[host]\ncommand = ["a\\u0000b"]\n', "host.command[0]"),
    (HOST + "bogus = 1\n", "host.bogus"),
    (HOST + "cwd = 1\n", "host.cwd"),
    (HOST + "cwd = ''\n", "host.cwd"),
    (HOST + "env = []\n", "host.env"),
    (HOST + "env = { PORT = 8080 }\n", "host.env.PORT"),
    (HOST + "env = { 'A=B' = 'x' }\n", 'host.env."A=B"'),
    (HOST + "ready = 'yes'\n", "host.ready"),
    (HOST + "ready = true\n", "host.ready"),
    (HOST + "start_timeout = '0'\n", "host.start_timeout"),
    (HOST + "start_timeout = 'soon'\n", "host.start_timeout"),
    (HOST + "min_uptime = -1\n", "host.min_uptime"),
    (HOST + "ready = 'started'\nmin_uptime = '90s'\n", "host.min_uptime"),
    (HOST + "heartbeat_timeout = '1d'\n", "host.heartbeat_timeout"),
    (HOST + "stop_signal = 'SIGNOPE'\n", "host.stop_signal"),
    (HOST + "stop_signal = 0\n", "host.stop_signal"),
    (HOST + "stop_signal = true\n", "host.stop_signal"),
    (HOST + "stop_signal = 'STOP'\n", "host.stop_signal"),
    (HOST + "stop_signal = 1.5\n", "host.stop_signal"),
    (HOST + "stop_timeout = []\n", "host.stop_timeout"),
    (HOST + "restart = 'sometimes'\n", "host.restart"),
    (HOST + "restart = false\n", "host.restart"),
    (HOST + "restart_delay = '1m'\n", "host.restart_delay"),
    (HOST + "restart_delay_max = 'x'\n", "host.restart_delay_max"),
    (HOST + "restart_reset_after = -5\n", "host.restart_reset_after"),
    (HOST + "output = 1\n", "host.output"),
    (HOST + "output = ''\n", "host.output"),
    # [code]
    (HOST + "code = 'x'\n", "host.code"),
    (HOST + "[code]\nbogus = 1\n", "code.bogus"),
    (HOST + "[code]\nroot = 1\n", "code.root"),
    (HOST + "[code]\nextra_paths = 'dist'\n", "code.extra_paths"),
    (HOST + "[code]\nextra_paths = [1]\n", "code.extra_paths[0]"),
    (HOST + "[code]\nextra_paths = ['../x']\n", "code.extra_paths[0]"),
    (HOST + "[code]\nextra_paths = ['dist/../../x']\n", "code.extra_paths[0]"),
    (HOST + "[code]\nextra_paths = ['/abs']\n", "code.extra_paths[0]"),
    (HOST + "[code]\nextra_paths = ['.']\n", "code.extra_paths[0]"),
    (HOST + "[code]\nextra_paths = ['']\n", "code.extra_paths[0]"),
    (HOST + "[code]\nextra_paths = ['.git/hooks']\n", "code.extra_paths[0]"),
    (HOST + "[code]\nextra_paths = ['dist', 'dist/x']\n", "code.extra_paths[1]"),
    (HOST + "[code]\nextra_paths = ['ok', '.swapguard']\n", "code.extra_paths[1]"),
    (HOST + "[code]\nbuild = 1\n", "code.build"),
    (HOST + '[code]\nbuild = "make \'x"\n', "code.build"),
    (HOST + "[code]\nbuild_timeout = 0\n", "code.build_timeout"),
    (HOST + "[code]\nundeclared_changes = 'panic'\n", "code.undeclared_changes"),
    # [[data]]
    ("data = 1\n" + HOST, "data"),
    ("data = [1]\n" + HOST, "data[0]"),
    (HOST + "[data]\npath = 'a'\nkind = 'file'\n", "data"),
    (HOST + D + "[[data]]\npath = 'b'\nkind = 'x'\n", "data[1].kind"),
    (HOST + "[[data]]\nkind = 'file'\n", "data[0].path"),
    (HOST + "[[data]]\npath = 'a'\n", "data[0].kind"),
    (HOST + "[[data]]\npath = 1\nkind = 'file'\n", "data[0].path"),
    (HOST + D.replace("sqlite", "dir") + "bogus = 1\n", "data[0].bogus"),
    (HOST + "[[data]]\npath = 'data'\nkind = 'dir'\n" + D, "data[1].path"),
    (HOST + D + D, "data[1].path"),
    (HOST + "[[data]]\npath = '.swapguard/x.db'\nkind = 'sqlite'\n", "data[0].path"),
    (HOST + "[[data]]\npath = '.'\nkind = 'dir'\n", "data[0].path"),
    (HOST + "[[data]]\npath = '..'\nkind = 'dir'\n", "data[0].path"),
    # [deadman]
    (HOST + "[deadman]\nbogus = 1\n", "deadman.bogus"),
    (HOST + "[deadman]\nwindow = 0\n", "deadman.window"),
    (HOST + "[deadman]\nwindow = 'x'\n", "deadman.window"),
    (HOST + "[deadman]\nextend_by = '0s'\n", "deadman.extend_by"),
    (HOST + "[deadman]\nhard_cap = '1m'\n", "deadman.hard_cap"),
    (HOST + "[deadman]\nmax_crashes = 0\n", "deadman.max_crashes"),
    (HOST + "[deadman]\nmax_crashes = true\n", "deadman.max_crashes"),
    (HOST + "[deadman]\nmax_crashes = '2'\n", "deadman.max_crashes"),
    (HOST + "[deadman]\nmax_crashes = 10001\n", "deadman.max_crashes"),
    (HOST + "[deadman]\nhealth_check = 1\n", "deadman.health_check"),
    (HOST + "[deadman]\nhealth_interval = 0\n", "deadman.health_interval"),
    (HOST + "[deadman]\nhealth_failures = 1.5\n", "deadman.health_failures"),
    (HOST + "[deadman]\nauto_confirm_after = '10m'\n", "deadman.auto_confirm_after"),
    (HOST + "[deadman]\nauto_confirm_after = -1\n", "deadman.auto_confirm_after"),
    (HOST + "[deadman]\nhealth_always = 1\n", "deadman.health_always"),
    (HOST + "[deadman]\nhealth_always = true\n", "deadman.health_always"),  # no check to run
    # [control]
    (HOST + "[control]\nbogus = 1\n", "control.bogus"),
    (HOST + "[control]\nsocket = 1\n", "control.socket"),
    (HOST + "[control]\nsocket = '" + "s" * 120 + ".sock'\n", "control.socket"),
    (HOST + "[control]\nmode = 0o660\n", "control.mode"),
    (HOST + "[control]\nmode = '0999'\n", "control.mode"),
    (HOST + "[control]\nmode = '01777'\n", "control.mode"),
    (HOST + "[control]\nmode = '0400'\n", "control.mode"),
    (HOST + "[control]\ngroup = 1\n", "control.group"),
    (HOST + "[control]\nallow_users = 'root'\n", "control.allow_users"),
    (HOST + "[control]\nallow_users = ['']\n", "control.allow_users[0]"),
    (HOST + "[control]\nallow_groups = ['ops', 1]\n", "control.allow_groups[1]"),
    (HOST + "[code]\nignore = 'tmp/'\n", "code.ignore"),
    (HOST + "[code]\nignore = ['tmp/', '# a comment']\n", "code.ignore[1]"),
    (HOST + "[code]\nignore = ['tmp/ ']\n", "code.ignore[0]"),
    (HOST + "[code]\nignore = ['[[:alpha:]]']\n", "code.ignore[0]"),
    (HOST + "[code]\nignore = ['!']\n", "code.ignore[0]"),
    (HOST + "[code]\nextra_paths = ['out', 'dist']\nignore = ['dist/']\n", "code.extra_paths[1]"),
    (HOST + "[code]\nextra_paths = ['node_modules/.cache']\n", "code.extra_paths[0]"),
    # [state]
    (HOST + "[state]\nbogus = 1\n", "state.bogus"),
    (HOST + "[state]\ndir = 1\n", "state.dir"),
    (HOST + "[state]\ndir = '.'\n", "state.dir"),
    (HOST + "[state]\ndir = '..'\n", "state.dir"),
    (HOST + "[state]\nkeep_swaps = 0\n", "state.keep_swaps"),
    (HOST + "[state]\nkeep_swaps = true\n", "state.keep_swaps"),
    (HOST + "[state]\nkeep_bytes = -1\n", "state.keep_bytes"),
    (HOST + "[state]\nkeep_bytes = '2 gigs'\n", "state.keep_bytes"),
    # [hooks]
    (HOST + "[hooks]\nbogus = 1\n", "hooks.bogus"),
    (HOST + "[hooks]\non_event = 1\n", "hooks.on_event"),
    (HOST + "[hooks]\nevents = 'swap.*'\n", "hooks.events"),
    (HOST + "[hooks]\nevents = ['']\n", "hooks.events[0]"),
    (HOST + "[hooks]\nevents = [1]\n", "hooks.events[0]"),
]


@pytest.mark.parametrize(("text", "key"), BAD_INPUTS, ids=[key for _text, key in BAD_INPUTS])
def test_bad_input_names_the_key_and_the_file(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == key
    assert caught.value.file == str(path)
    assert key in str(caught.value) and str(path) in str(caught.value)


def test_messages_say_what_would_be_accepted(tmp_path: Path) -> None:
    def message(text: str) -> str:
        with pytest.raises(ConfigError) as caught:
            load_config(write(tmp_path, text))
        return str(caught.value)

    assert "did you mean 'start_timeout'" in message(HOST + "start_timout = '1s'\n")
    assert '"always" | "on-failure" | "no"' in message(HOST + "restart = 'never'\n")
    assert "8760h" in message(HOST + "stop_timeout = '9000h'\n")
    assert "107" in message(HOST + "[control]\nsocket = '" + "s" * 120 + "'\n")
    assert "boolean true" in message(HOST + "[deadman]\nmax_crashes = true\n")


def test_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, HOST + "start_timeout = \n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value) and "line 3" in str(caught.value)


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    for target in (tmp_path / "missing.toml", tmp_path):
        with pytest.raises(ConfigError) as caught:
            load_config(target)
        assert caught.value.file == str(target)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'[host]\ncommand = ["\xff"]\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(binary)


# --- whatever the document, only ConfigError ------------------------------------------------------

SOURCE = Path("/srv/app/swapguard.toml")

toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=12),
    st.datetimes(),
    st.dates(),
    st.times(),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
plausible = st.sampled_from(
    ["0", "1s", "250ms", "2m", "1h", "-1s", "", ".", "..", "data/app.db", ".swapguard", "SIGTERM",
     "KILL", "always", "no", "notify", "started", "sqlite", "dir", "file", "guard", "0660", "0777",
     "python3 app.py", "'unbalanced", 0, 1, 3, -1, 0.5, True, ["python3", "app.py"], ["dist"], [],
     {}, {"PORT": "80"}, ["swap.*"]]
)  # fmt: skip


def weighted(*choices: tuple[int, st.SearchStrategy[object]]) -> st.SearchStrategy[object]:
    """Pick a strategy by weight (hypothesis's one_of does not promise an even split)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(pool) - 1).flatmap(lambda index: pool[index])


values = weighted((3, plausible), (1, toml_values))  # mostly near the valid ones
key_names = {
    name: weighted((12, st.sampled_from(keys)), (1, st.text(max_size=8)))
    for name, keys in CONTRACT_KEYS.items()
}


def table_of(section: str) -> st.SearchStrategy[dict[str, object]]:
    return st.dictionaries(key_names[section], values, max_size=5)


host_tables = st.tuples(
    weighted((6, st.just(["python3", "app.py"])), (1, values)), table_of("host")
).map(lambda pair: {"command": pair[0], **pair[1]})
well_formed = st.fixed_dictionaries(
    {"host": host_tables},
    optional={
        **{name: table_of(name) for name in CONTRACT_KEYS if name not in ("host", "data")},
        "data": weighted((4, st.lists(table_of("data"), max_size=3)), (1, values)),
    },
)
anything = st.dictionaries(st.sampled_from([*CONTRACT_KEYS, "bogus"]), values, max_size=3)
documents = weighted((6, well_formed), (1, anything))


@settings(max_examples=300, deadline=None)
@given(documents)
def test_any_document_loads_or_raises_config_error(document: dict[str, object]) -> None:
    try:
        config = parse_config(document, source=SOURCE)
    except ConfigError as error:
        assert error.key and error.file == str(SOURCE)
        assert error.key.split(".")[0].split("[")[0] in document or error.key == "host"
        return
    assert isinstance(config, Config)
    assert all(path.is_absolute() for path in (config.host.cwd, config.code.root, config.state.dir))
    assert all(entry.path.is_absolute() for entry in config.data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.text(alphabet=st.sampled_from("[]=\"'\n =.#a1s{}-,_") | st.characters(), max_size=80)
)
def test_any_file_text_loads_or_raises_config_error(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    path = tmp_path_factory.getbasetemp() / f"fuzz-{os.getpid()}.toml"
    try:
        path.write_text(HOST + text, encoding="utf-8", errors="surrogatepass")
    except UnicodeEncodeError:
        return
    try:
        load_config(path)
    except ConfigError as error:
        assert error.file == str(path)


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), (4096, 4096), ('"10MB"', 10_000_000), ('"512KiB"', 524_288),
     ('"1.5GiB"', 1_610_612_736), ('"64 kb"', 64_000), ('"7B"', 7)],
)  # fmt: skip
def test_sizes(tmp_path: Path, text: object, size: int) -> None:
    doc = HOST + f'output = "out.log"\noutput_max_bytes = {text}\n'
    value = size if size == 0 or size >= 4096 else None
    if value is None:
        with pytest.raises(ConfigError, match=r"host\.output_max_bytes"):
            load_config(write(tmp_path, doc))
        return
    assert load_config(write(tmp_path, doc)).host.output_max_bytes == size


@pytest.mark.parametrize("bad", ['"10 MiBs"', '"-1"', "-5", '"1e3"', "true", '"1 PB2"'])
def test_bad_sizes_name_the_key(tmp_path: Path, bad: str) -> None:
    doc = HOST + f'output = "out.log"\noutput_max_bytes = {bad}\n'
    with pytest.raises(ConfigError, match=r"host.output_max_bytes.*must be a size"):
        load_config(write(tmp_path, doc))


def test_rotation_needs_an_output_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"host\.output_max_bytes.*host\.output"):
        load_config(write(tmp_path, HOST + 'output_max_bytes = "1MB"\n'))


@pytest.mark.parametrize(
    ("text", "address"),
    [('"127.0.0.1:9187"', ("127.0.0.1", 9187)), ('"[::1]:0"', ("::1", 0)),
     ('"localhost:80"', ("localhost", 80)), ('""', None)],
)  # fmt: skip
def test_http_listen(tmp_path: Path, text: str, address: tuple[str, int] | None) -> None:
    doc = HOST + f"[control]\nhttp_listen = {text}\n"
    assert load_config(write(tmp_path, doc)).control.http_listen == address


@pytest.mark.parametrize("bad", ['"9187"', '"::1:9187"', '"host:70000"', '":80"', '"h:x"'])
def test_bad_http_listen_names_the_key(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match=r"control\.http_listen.*host:port"):
        load_config(write(tmp_path, HOST + f"[control]\nhttp_listen = {bad}\n"))
