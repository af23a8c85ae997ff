"""The notify protocol: a table and a property for the parser, real sockets for the rest."""

from __future__ import annotations

import array
import os
import re
import select
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.control.notifysocket import Datagram, NotifyServer
from supervisor.core.notifyproto import (
    MAX_DATAGRAM_BYTES,
    NotifyError,
    NotifyMessage,
    parse_datagram,
)
from supervisor.errors import BadRequest, ConfigError
from supervisor.notify import sd_notify, watchdog_interval

REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 10.0
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux credentials")


# --- parser: a table ----------------------------------------------------------------------------

PARSED = [
    (b"READY=1", NotifyMessage(ready=True)),
    (b"READY=1\n", NotifyMessage(ready=True)),
    (b"READY=0", NotifyMessage()),
    (b"READY=yes", NotifyMessage()),
    (b"WATCHDOG=1", NotifyMessage(watchdog=True)),
    (b"WATCHDOG=trigger", NotifyMessage(watchdog_trigger=True)),
    (b"WATCHDOG=0", NotifyMessage()),
    (b"STOPPING=1", NotifyMessage(stopping=True)),
    (b"RELOADING=1", NotifyMessage(reloading=True)),
    (b"STATUS=", NotifyMessage(status="")),
    (b"STATUS=  two spaces, a = sign  ", NotifyMessage(status="  two spaces, a = sign  ")),
    ("STATUS=migrating ✓".encode(), NotifyMessage(status="migrating ✓")),
    (b"EXTEND_TIMEOUT_USEC=0", NotifyMessage(extend_timeout_usec=0)),
    (b"EXTEND_TIMEOUT_USEC=30000000", NotifyMessage(extend_timeout_usec=30_000_000)),
    (b"EXTEND_TIMEOUT_USEC=18446744073709551615", NotifyMessage(extend_timeout_usec=2**64 - 1)),
    (
        b"X_SWAPGUARD_CONFIRM=20261124-060000-abc123",
        NotifyMessage(confirm_swap_id="20261124-060000-abc123"),
    ),
    (b"MAINPID=4242", NotifyMessage(mainpid=4242)),
    (b"FDSTORE=1\nERRNO=5\nBARRIER=1", NotifyMessage()),
    (b"X_UNKNOWN=\xe2\x9c\x93", NotifyMessage()),
    (b"STATUS=old\nSTATUS=new", NotifyMessage(status="new")),
    (b"\n\nREADY=1\n\n", NotifyMessage(ready=True)),
    (b"READY=1\r", NotifyMessage()),  # systemd compares the exact value too
    (
        b"READY=1\nWATCHDOG=1\nSTOPPING=1\nRELOADING=1\nSTATUS=up\nEXTEND_TIMEOUT_USEC=5\n"
        b"X_SWAPGUARD_CONFIRM=s1\nMAINPID=7\nX_OTHER=ignored\n",
        NotifyMessage(
            ready=True,
            watchdog=True,
            stopping=True,
            reloading=True,
            status="up",
            extend_timeout_usec=5,
            confirm_swap_id="s1",
            mainpid=7,
        ),
    ),
    (
        b"STATUS=" + b"x" * (MAX_DATAGRAM_BYTES - 7),
        NotifyMessage(status="x" * (MAX_DATAGRAM_BYTES - 7)),
    ),
]

REJECTED = [
    (b"", "empty"),
    (b"\n\n", "no KEY=VALUE"),
    (b"READY", "no '='"),
    (b"READY=1\ngarbage", "line 2"),
    (b"=1", "empty key"),
    (b"STATUS=\xff\xfe", "not UTF-8"),
    (b"READY=1\0", "NUL"),
    (b"STATUS=" + b"x" * MAX_DATAGRAM_BYTES, f"over {MAX_DATAGRAM_BYTES} bytes"),
    (b"EXTEND_TIMEOUT_USEC=-1", "EXTEND_TIMEOUT_USEC"),
    (b"EXTEND_TIMEOUT_USEC=", "EXTEND_TIMEOUT_USEC"),
    (b"EXTEND_TIMEOUT_USEC=1.5", "EXTEND_TIMEOUT_USEC"),
    (b"EXTEND_TIMEOUT_USEC=+5", "EXTEND_TIMEOUT_USEC"),
    (b"EXTEND_TIMEOUT_USEC= 5", "EXTEND_TIMEOUT_USEC"),
    (b"EXTEND_TIMEOUT_USEC=1_000", "EXTEND_TIMEOUT_USEC"),
    ("EXTEND_TIMEOUT_USEC=٣".encode(), "EXTEND_TIMEOUT_USEC"),  # an Arabic-Indic digit
    (b"EXTEND_TIMEOUT_USEC=18446744073709551616", "between"),
    (b"MAINPID=0", "MAINPID"),
    (b"MAINPID=abc", "MAINPID"),
    (b"X_SWAPGUARD_CONFIRM=", "X_SWAPGUARD_CONFIRM"),
    (b"X_SWAPGUARD_CONFIRM= s1", "X_SWAPGUARD_CONFIRM"),
    (b"READY=1\nEXTEND_TIMEOUT_USEC=soon", "EXTEND_TIMEOUT_USEC"),  # one bad key rejects it all
]


@pytest.mark.parametrize(("data", "expected"), PARSED)
def test_parse_datagram_accepts(data: bytes, expected: NotifyMessage) -> None:
    assert parse_datagram(data) == expected


@pytest.mark.parametrize(("data", "named"), REJECTED)
def test_parse_datagram_rejects_and_names_the_problem(data: bytes, named: str) -> None:
    with pytest.raises(NotifyError, match=re.escape(named)) as caught:
        parse_datagram(data)
    assert isinstance(caught.value, BadRequest)
    assert caught.value.http_status == 400


def test_error_message_quotes_untrusted_text_briefly() -> None:
    with pytest.raises(NotifyError) as caught:
        parse_datagram(b"x" * 3000)
    assert len(str(caught.value)) < 200


_KEYS = (
    *("READY", "WATCHDOG", "STOPPING", "RELOADING", "STATUS", "EXTEND_TIMEOUT_USEC"),
    *("X_SWAPGUARD_CONFIRM", "MAINPID", "OTHER", ""),
)
_lines = st.lists(
    st.tuples(
        st.sampled_from(_KEYS),
        st.sampled_from(["=", ""]),
        st.text(max_size=30),
    ).map(lambda parts: "".join(parts)),
    max_size=8,
).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=MAX_DATAGRAM_BYTES + 16), _lines))
def test_parse_datagram_on_any_bytes_returns_a_message_or_notify_error(data: bytes) -> None:
    try:
        message = parse_datagram(data)
    except NotifyError:
        return
    assert isinstance(message, NotifyMessage)


@settings(max_examples=200, deadline=None)
@given(
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\0"),
        max_size=200,
    )
)
def test_status_text_survives_verbatim(text: str) -> None:
    assert parse_datagram(b"STATUS=" + text.encode()).status == text


# --- server with real sockets -------------------------------------------------------------------


def _wait_for_datagrams(
    server: NotifyServer, count: int, timeout: float = WAIT_S
) -> list[Datagram]:
    """Block on the socket with select until `count` datagrams are in, or fail at the deadline."""
    received: list[Datagram] = []
    deadline = time.monotonic() + timeout
    while len(received) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"received {len(received)} of {count} datagrams within {timeout} s")
        readable, _, _ = select.select([server], [], [], remaining)
        if readable:
            received.extend(server.drain())
    return received


def _child_env(socket_path: Path) -> dict[str, str]:
    return {**os.environ, "NOTIFY_SOCKET": str(socket_path), "PYTHONPATH": str(REPO_ROOT)}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NotifyServer]:
    with NotifyServer(tmp_path / "notify.sock") as bound:
        yield bound


def test_server_socket_is_world_writable_and_close_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    server = NotifyServer(path)
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o666
    assert server.path.is_absolute()
    server.close()
    assert not path.exists()
    server.close()  # twice is harmless


def test_drain_returns_empty_list_when_idle(server: NotifyServer) -> None:
    assert server.drain() == []


@linux_only
def test_datagram_from_child_arrives_with_its_pid_uid_and_gid(server: NotifyServer) -> None:
    as_root = os.geteuid() == 0
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from supervisor.notify import sd_notify; assert sd_notify('READY=1\\nSTATUS=warm')",
        ],
        env=_child_env(server.path),
        group=65534 if as_root else None,  # a gid unlike ours shows whose credentials arrived
    )
    try:
        [datagram] = _wait_for_datagrams(server, 1)
    finally:
        assert child.wait(timeout=WAIT_S) == 0
    assert datagram.payload == b"READY=1\nSTATUS=warm"
    assert datagram.pid == child.pid
    assert datagram.uid == os.getuid()
    assert datagram.gid == (65534 if as_root else os.getgid())
    assert parse_datagram(datagram.payload) == NotifyMessage(ready=True, status="warm")
    assert server.drain() == []


def test_drain_honours_its_limit(server: NotifyServer) -> None:
    for number in range(5):
        assert sd_notify(f"STATUS={number}", str(server.path))
    first = server.drain(limit=3)
    rest = _wait_for_datagrams(server, 2)
    assert [d.payload for d in first + rest] == [f"STATUS={n}".encode() for n in range(5)]
    with pytest.raises(ValueError, match="limit"):
        server.drain(limit=0)


def test_oversized_datagram_arrives_oversized_so_the_parser_rejects_it(
    server: NotifyServer,
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"STATUS=" + b"x" * 9000, str(server.path))
    [datagram] = _wait_for_datagrams(server, 1)
    with pytest.raises(NotifyError, match="over"):
        parse_datagram(datagram.payload)


@linux_only
def test_passed_file_descriptors_are_not_leaked(server: NotifyServer) -> None:
    open_before = len(os.listdir("/proc/self/fd"))
    readable, writable = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendmsg(
                [b"FDSTORE=1"],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_bytes(readable, writable))],
                0,
                str(server.path),
            )
        [datagram] = _wait_for_datagrams(server, 1)
    finally:
        os.close(readable)
        os.close(writable)
    assert datagram.payload == b"FDSTORE=1"
    assert len(os.listdir("/proc/self/fd")) == open_before


def _fd_bytes(*fds: int) -> bytes:
    return array.array("i", fds).tobytes()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(path))
    stale.close()  # the file stays, as after a crash
    with NotifyServer(path) as server:
        assert sd_notify("READY=1", str(path))
        assert _wait_for_datagrams(server, 1)[0].payload == b"READY=1"


def test_a_regular_file_at_the_path_is_not_deleted(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    path.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        NotifyServer(path)
    assert path.read_text() == "precious"


def test_close_leaves_a_newer_servers_socket_alone(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    old = NotifyServer(path)
    with NotifyServer(path) as new:
        old.close()
        assert path.exists()
        assert sd_notify("WATCHDOG=1", str(path))
        assert _wait_for_datagrams(new, 1)[0].payload == b"WATCHDOG=1"


def test_too_long_socket_path_is_a_clear_error(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"notify socket .* is 1.. bytes; .*shorter state"):
        NotifyServer(deep / "notify.sock")


@linux_only
def test_burst_of_100k_datagrams_from_a_child_is_absorbed(server: NotifyServer) -> None:
    total = 100_000
    sender_code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
        "s.connect(sys.argv[1])\n"
        f"for n in range({total}):\n"
        "    s.send(b'WATCHDOG=1\\nSTATUS=%d' % n)\n"
    )
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, "-c", sender_code, str(server.path)])
    try:
        received = _wait_for_datagrams(server, total, timeout=60.0)
    except BaseException:
        child.kill()  # it would block forever on the full queue nobody drains
        raise
    finally:
        child.wait(timeout=WAIT_S)
    elapsed = time.monotonic() - started
    assert child.returncode == 0
    assert len(received) == total
    assert received[-1].payload == b"WATCHDOG=1\nSTATUS=%d" % (total - 1)
    assert {d.pid for d in received} == {child.pid}
    print(f"\nnotify burst: {total} datagrams in {elapsed:.2f} s = {total / elapsed:,.0f}/s")


# --- client -----------------------------------------------------------------------------------


def test_sd_notify_without_a_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sd_notify("READY=1") is False


def test_sd_notify_uses_notify_socket_from_environment(
    server: NotifyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(server.path))
    assert sd_notify("STOPPING=1") is True
    assert _wait_for_datagrams(server, 1)[0].payload == b"STOPPING=1"


def test_sd_notify_to_a_missing_socket_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sd_notify("READY=1", str(tmp_path / "gone.sock"))


@pytest.mark.parametrize("state", ["", "STATUS=" + "x" * MAX_DATAGRAM_BYTES])
def test_sd_notify_rejects_empty_or_oversized_state(tmp_path: Path, state: str) -> None:
    with pytest.raises(ValueError, match="sd_notify"):
        sd_notify(state, str(tmp_path / "unused.sock"))


@linux_only
def test_sd_notify_reaches_an_abstract_namespace_socket() -> None:
    name = f"swapguard-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(WAIT_S)
        assert sd_notify("READY=1\nSTATUS=abstract", "@" + name) is True
        assert receiver.recv(MAX_DATAGRAM_BYTES) == b"READY=1\nSTATUS=abstract"


# --- watchdog_interval --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "1"}, 0.0000005),
    ],
)
def test_watchdog_interval_follows_systemd(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"WATCHDOG_USEC": "0"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "ten"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "-5"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"}, "WATCHDOG_PID"),
    ],
)
def test_watchdog_interval_rejects_bad_values(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        watchdog_interval(env)


def test_watchdog_interval_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 1.0
