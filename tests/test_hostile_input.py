"""Hostile input against the real daemon: raw HTTP bytes, random requests, slow clients, junk
notify datagrams and a peer without write rights.

Every input must get an error (a 4xx answer, or a datagram dropped and counted) and change nothing:
the host (pid, state, restarts), the swap in flight, the swap list and the audit log are compared
before and after each example. A prepared swap is in flight throughout, so that a write slipping
through (an activate, an abort, a host stop) would show at once.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from supervisor import errors
from supervisor.client import Client
from supervisor.control import routes
from supervisor.control.server import IDLE_TIMEOUT_S, MAX_BODY_BYTES, MAX_PER_UID
from supervisor.core import notifyproto
from tests.support import Supervisor, make_sample_repo, supervised, wait_for

FUZZ = settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
REQUEST_TIMEOUT_S = 10.0  # ControlServer's default, which `swapguard run` keeps
# Statuses an attack may get: any client error, 501 for a method the server does not know (or a
# Transfer-Encoding h11 does not), 505 for an HTTP version >= 2. Never a 2xx, a 3xx or a 500.
ERROR_STATUSES = frozenset(range(400, 500)) | {501, 505}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_sample_repo(tmp_path / "repo")


@contextlib.contextmanager
def hostile_target(repo: Path) -> Iterator[tuple[Supervisor, str]]:
    """A running daemon with a ready host and a prepared swap: the state an attack must not move."""
    with supervised(repo) as sup:
        sup.start()
        swap = sup.client.prepare("hostile target")
        yield sup, swap["id"]


# --- observing the state ---------------------------------------------------------------------


def observe(sup: Supervisor) -> dict[str, Any]:
    """What no rejected input may change. Reads only: they must not add to the event log either."""
    status = sup.status()
    host = status["host"]
    return {
        "host": {key: host[key] for key in ("pid", "state", "ready", "restarts", "last_exit")},
        "swap": status["swap"],
        "code": status["code"],
        "swaps": sup.client.swaps(limit=1000),
        "events": [(e["id"], e["event"]) for e in sup.client.events(after=0, limit=5000)],
    }


def counters(sup: Supervisor) -> dict[str, int]:
    text = sup.client.metrics()
    found = dict(re.findall(r"^swapguard_notify_datagrams_(\w+)_total (\d+)$", text, re.M))
    total = re.search(r"^swapguard_notify_datagrams_total (\d+)$", text, re.M)
    assert total is not None
    return {"datagrams": int(total.group(1))} | {name: int(value) for name, value in found.items()}


def asks_something(payload: bytes) -> bool:
    """A datagram swapguard would act on, were it from the host's tree."""
    try:
        return not notifyproto.parse_datagram(payload).asks_nothing
    except notifyproto.NotifyError:
        return False


# --- raw HTTP over the unix socket -----------------------------------------------------------


def exchange(path: Path, data: bytes, *, timeout: float = 15.0) -> bytes:
    """Send raw bytes, half-close, and read all the server answers until it hangs up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        return _read_to_eof(sock)


def _read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def responses(raw: bytes) -> list[int]:
    """The statuses of the answers in `raw`, checking each is well framed and errors are JSON."""
    statuses: list[int] = []
    rest = raw
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        assert sep, f"an answer cut inside its head: {raw[:300]!r}"
        status_line, *header_lines = head.split(b"\r\n")
        match = re.fullmatch(rb"HTTP/1\.[01] (\d{3})(?: .*)?", status_line)
        assert match, f"not an HTTP status line: {status_line[:200]!r}"
        status = int(match[1])
        if status == 100:
            continue
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get(b"content-length", b"0"))
        body, rest = rest[:length], rest[length:]
        assert len(body) == length, f"answer body cut short: {raw[:300]!r}"
        if status >= 400:
            error = json.loads(body)["error"]
            assert error["code"] and error["message"], body
        statuses.append(status)
    return statuses


def request_bytes(method: str, target: str, body: bytes = b"", headers: str = "") -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: swapguard\r\n{headers}"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return head.encode("latin-1") + body


def harmful_writes(swap_id: str) -> list[bytes]:
    """Complete, valid writes that would change the state: only their broken forms may be sent."""
    return [
        request_bytes("POST", "/v1/host/stop", b"{}"),
        request_bytes("POST", "/v1/host/restart", b"{}"),
        request_bytes("POST", f"/v1/swaps/{swap_id}/activate", b"{}"),
        request_bytes("POST", f"/v1/swaps/{swap_id}/abort", b"{}"),
    ]


# --- strategies --------------------------------------------------------------------------------

_LATIN1_NO_SPACE = st.characters(
    min_codepoint=0x21,
    max_codepoint=0xFF,
    exclude_characters="".join(chr(c) for c in range(0x21, 0x100) if chr(c).isspace()),
)
_HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\r\n\x85"),
    max_size=40,
)


def _bad_content_length() -> st.SearchStrategy[tuple[str, bytes]]:
    """Content-Length headers (as text) that cannot frame the body `{}` of a write."""
    junk = _HEADER_TEXT.filter(lambda s: not re.fullmatch(r"[0-9]{1,12}", s.strip()))
    return st.one_of(
        junk.map(lambda s: f"Content-Length: {s}\r\n"),
        st.integers(3, MAX_BODY_BYTES).map(lambda n: f"Content-Length: {n}\r\n"),  # body cut short
        st.integers(MAX_BODY_BYTES + 1, 10**12 - 1).map(lambda n: f"Content-Length: {n}\r\n"),
        st.integers(10**12, 10**30).map(lambda n: f"Content-Length: {n}\r\n"),
        st.sampled_from(["0", "1"]).map(lambda n: f"Content-Length: 2\r\nContent-Length: {n}\r\n"),
        st.sampled_from(["", "Content-Length: 2\r\n"]).map(
            lambda extra: f"Transfer-Encoding: chunked\r\n{extra}"
        ),
    ).map(lambda header: (header, b"{}"))


def _huge_headers() -> st.SearchStrategy[str]:
    """Header sections over a limit: one line over 64 KiB, over 100 lines, or over 64 KiB in all."""
    return st.one_of(
        st.integers(65_537, 70_000).map(lambda n: f"X-Big: {'a' * n}\r\n"),
        st.integers(101, 300).map(lambda n: "".join(f"X-{i}: v\r\n" for i in range(n))),
        st.integers(66, 90).map(lambda n: "".join(f"X-{i}: {'b' * 1000}\r\n" for i in range(n))),
    )


def raw_attacks(swap_id: str) -> st.SearchStrategy[tuple[str, bytes]]:
    """(kind, bytes): random bytes, request lines, truncated writes, huge or bad framing headers."""
    writes = harmful_writes(swap_id)
    truncated = st.sampled_from(writes).flatmap(
        lambda full: st.integers(1, len(full) - 1).map(lambda cut: full[:cut])
    )
    line = st.tuples(
        st.one_of(
            st.sampled_from(["GET", "POST", "PUT", "DELETE", "BREW", "get", "CONNECT", "TRACE"]),
            st.text(_LATIN1_NO_SPACE, min_size=1, max_size=8),
        ),
        st.text(_LATIN1_NO_SPACE, min_size=1, max_size=80),
        st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1.1", "HTTPS/1.1", "HTTP/x"]),
    ).map(lambda parts: (" ".join(parts) + "\r\n\r\n").encode("latin-1"))
    target = f"/v1/swaps/{swap_id}/activate"
    return st.one_of(
        st.tuples(st.just("bytes"), st.binary(min_size=1, max_size=2048)),
        st.tuples(st.just("truncated"), truncated),
        st.tuples(st.just("request line"), line),
        st.tuples(
            st.just("long request line"),
            st.integers(65_537, 70_000).map(
                lambda n: f"POST /v1/host/stop?{'x' * n} HTTP/1.1\r\n\r\n".encode()
            ),
        ),
        st.tuples(
            st.just("huge headers"),
            _huge_headers().map(
                lambda h: f"POST {target} HTTP/1.1\r\n{h}Content-Length: 2\r\n\r\n{{}}".encode()
            ),
        ),
        st.tuples(
            st.just("bad content-length"),
            _bad_content_length().map(
                lambda hb: (
                    f"POST {target} HTTP/1.1\r\nHost: x\r\n{hb[0]}\r\n".encode("latin-1") + hb[1]
                )
            ),
        ),
    )


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
_FIELD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=30), st.lists(st.integers())
)
_KNOWN_FIELDS = st.dictionaries(
    st.sampled_from(["summary", "reason", "status", "ready", "Summary", "extra"]),
    _FIELD_VALUES,
    max_size=3,
)


# (path, the method it is meant for); {} stands for an id or an action
_ROUTE_TEMPLATES = [
    tuple(line.split())
    for line in """
    /v1/status GET
    /v1/events GET
    /metrics GET
    /v1/swaps GET
    /v1/swaps/{} GET
    //v1/status GET
    /v1/swaps POST
    /v1/heartbeat POST
    /v1/host/{} POST
    /v1/host/stop POST
    /v1/host/restart POST
    /v1/swaps/{}/activate POST
    /v1/swaps/{}/confirm POST
    /v1/swaps/{}/extend POST
    /v1/swaps/{}/rollback POST
    /v1/swaps/{}/abort POST
    /v1/swaps/{}/{} POST
    /v1/swaps/{}/activate/ POST
    /v1//swaps POST
    """.strip().splitlines()
]
_ODD_QUERIES = [
    "?", "?limit=0", "?limit=1001", "?limit=5", "?after=-1", "?x=1", "?after=1&after=2",
    "?limit=%31", "?after=0&limit=1", "?limit=99999999999999999999",
]  # fmt: skip
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Pick a strategy by weight: one_of's split between branches is not even."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda index: table[index])


_ODD_BODIES = [b"{", b"[]", b'{"summary": NaN}', b'{"a":1,"a":2}', b"[" * 5000]
# what once poisoned reads: a lone surrogate stored (a cut emoji), a number int() cannot take
_POISON_BODIES = [
    b'{"summary": "\\ud83d cut"}',
    b'{"status": "\\ud800"}',
    b'{"reason": "\\udfff"}',
    b'{"\\ud800": "x"}',
    b'{"summary": ' + b"9" * 5000 + b"}",
    b'{"summary": 1e999999}',
    b'{"ready": -' + b"1" * 400 + b".5e7}",
]
_ODD_BODIES += _POISON_BODIES
_ODD_BODIES.append(b'{"summary": "x"}' + b" " * MAX_BODY_BYTES)  # over the limit: 413


def bodies() -> st.SearchStrategy[bytes]:
    return weighted(
        (1, st.just(b"")),
        (3, _JSON.map(lambda value: json.dumps(value).encode())),
        (3, _KNOWN_FIELDS.map(lambda value: json.dumps(value).encode())),
        (1, st.binary(max_size=200)),
        (1, st.text(max_size=100).map(lambda s: s.encode("utf-8"))),
        (1, st.sampled_from(_ODD_BODIES)),
        (
            1,
            st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1).map(
                lambda s: json.dumps({"summary": s, "status": s}).encode()
            ),
        ),
        (1, st.integers(20, 6000).map(lambda n: b'{"summary": ' + b"7" * n + b"}")),
    )


def requests(swap_id: str) -> st.SearchStrategy[tuple[str, str, bytes]]:
    """(method, target, body): known routes, mostly with their own method and the real swap id,
    with random ids, queries, methods and bodies mixed in; and random paths."""
    ids = weighted(
        (3, st.just(swap_id)),
        (1, st.text(_LATIN1_NO_SPACE.filter(lambda c: c not in "/?#"), min_size=1, max_size=70)),
        (1, st.sampled_from([".", "..", "...", "-", "a" * 65, "%2e%2e", swap_id + "x", "stop"])),
    )
    queries = weighted(
        (3, st.just("")),
        (1, st.sampled_from(_ODD_QUERIES)),
        (1, st.text(_LATIN1_NO_SPACE.filter(lambda c: c != "#"), max_size=40).map("?".__add__)),
    )

    def build(template: tuple[str, str], first: str, second: str, query: str) -> str:
        return template[0].replace("{}", first, 1).replace("{}", second, 1) + query

    known = st.tuples(st.sampled_from(_ROUTE_TEMPLATES), ids, ids, queries).flatmap(
        lambda t: st.tuples(
            weighted((3, st.just(t[0][1])), (1, st.sampled_from(_METHODS))),
            st.just(build(*t)),
            bodies(),
        )
    )
    random_path = st.tuples(
        st.sampled_from(_METHODS),
        st.text(_LATIN1_NO_SPACE, min_size=1, max_size=80).map("/".__add__),
        bodies(),
    )
    return weighted((4, known), (1, random_path))


# --- the expected answer, from the API's own pure validation ----------------------------------


def predicted(method: str, target: str, body: bytes, swap_id: str) -> set[int] | None:
    """The statuses the daemon may give; None for a valid write that would change the state."""
    # The request line is parsed before the body is looked at: a bad target is 400 at any size.
    if not re.fullmatch(r"[\x21-\x7e]+", target):  # a request target is visible ASCII (RFC 9112)
        return {400}
    if len(body) > MAX_BODY_BYTES:
        return {413}
    if target.startswith("//"):  # the server reduces a leading '//' to '/'
        target = "/" + target.lstrip("/")
    try:
        route, values = routes.resolve(method, target)
        if route.method != "GET":  # a GET's body is never parsed
            routes.parse_body(body, route.body)
    except errors.SwapguardError as err:
        return {err.http_status}
    if route.method == "GET":
        if route.call == "get_swap" and values["swap_id"] != swap_id:
            return {404}
        return {200}
    if route.call == "swap_action" and values["swap_id"] != swap_id:
        return {404}
    if route.call == "prepare_swap" or values.get("action") in ("confirm", "extend", "rollback"):
        return {409}  # a swap is in flight, and it is only prepared
    return None


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.slow  # ~11 s, the daemon's fixed request timeout; test_api covers both with 0.5 s
def test_raw_http_fuzz_while_slow_clients_hold_connections(repo: Path) -> None:
    """Random bytes, truncated and oversized requests, bad framing: each gets an error and changes
    nothing; meanwhile slow clients hold connections open and block no one, and are cut off by
    the per-connection timeout."""
    with hostile_target(repo) as (sup, swap_id):
        baseline = observe(sup)
        slow = SlowClients(sup.socket)
        slow.start()
        seen: dict[str, int] = {}

        @settings(FUZZ, max_examples=150)  # free: the slow clients take 10 s anyway
        @given(raw_attacks(swap_id))
        def attack(case: tuple[str, bytes]) -> None:
            kind, data = case
            started = time.monotonic()
            statuses = responses(exchange(sup.socket, data))
            assert time.monotonic() - started < 5.0, f"{kind}: slow answer while slow clients wait"
            assert set(statuses) <= ERROR_STATUSES, (kind, statuses, data[:200])
            if kind != "bytes":
                assert statuses, (kind, data[:200])  # each framing attack gets an answer
            seen[kind] = seen.get(kind, 0) + 1
            event(f"{kind}: {statuses}")
            assert observe(sup) == baseline

        attack()
        assert len(seen) == 6, seen
        outcome = slow.finish()
        # the idle connection is closed without an answer; a half-sent request gets 408
        assert outcome["idle"] == [], outcome
        assert outcome["partial"] == [408] and outcome["drip"] == [408], outcome
        for name, elapsed in slow.cut_after.items():
            limit = IDLE_TIMEOUT_S if name == "idle" else REQUEST_TIMEOUT_S
            assert limit - 1.5 <= elapsed <= limit + 8, (name, elapsed)
        assert observe(sup) == baseline


class SlowClients:
    """An idle connection, a request stalled mid-header, and one that drips a byte at a time."""

    DRIP = b"POST /v1/host/stop HTTP/1.1\r\nHost: swapguard\r\nContent-Length: 2\r\n\r\n{}"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sockets: dict[str, socket.socket] = {}
        self.cut_after: dict[str, float] = {}
        self.started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drip, name="drip", daemon=True)

    def start(self) -> None:
        for name in ("idle", "partial", "drip"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(30)
            sock.connect(str(self.path))
            self.sockets[name] = sock
        self.started = time.monotonic()
        self.sockets["partial"].sendall(b"POST /v1/host/stop HTTP/1.1\r\nContent-Le")
        self._thread.start()

    def _drip(self) -> None:
        sock = self.sockets["drip"]
        for index in range(len(self.DRIP)):
            try:
                sock.send(self.DRIP[index : index + 1])
            except OSError:
                return  # cut off by the server
            if self._stop.wait(0.25):  # the pace of the slow client, not a wait for a condition
                return

    def finish(self) -> dict[str, list[int]]:
        """Block (with a bound) on each socket until the server answers or hangs up."""
        answers: dict[str, list[int]] = {}
        deadline = self.started + REQUEST_TIMEOUT_S + 15
        for name, sock in self.sockets.items():
            raw = b""
            while True:
                ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
                assert ready, f"the server kept the {name} connection open past its timeout"
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    break
                raw += chunk
                if name != "idle" and b"\r\n\r\n" in raw and raw.endswith(b"}\n"):
                    break  # the whole error document is in; the close follows
            self.cut_after[name] = time.monotonic() - self.started
            answers[name] = responses(raw)
            sock.close()
        self._stop.set()
        self._thread.join(5)
        return answers


def test_random_requests_get_the_predicted_error_and_change_nothing(repo: Path) -> None:
    """Random methods, paths, ids, queries and bodies against every route, each answered as the
    route table says; no write slips through and no read adds to the event log."""
    with hostile_target(repo) as (sup, swap_id):
        baseline = observe(sup)
        posts = 0

        @FUZZ
        @given(requests(swap_id))
        def attack(case: tuple[str, str, bytes]) -> None:
            nonlocal posts
            method, target, body = case
            expected = predicted(method, target, body, swap_id)
            assume(expected is not None)
            statuses = responses(exchange(sup.socket, request_bytes(method, target, body)))
            assert len(statuses) == 1 and statuses[0] in expected, (
                method,
                target,
                body[:100],
                statuses,
                expected,
            )
            posts += method == "POST"
            event(f"{method} -> {statuses[0]}")
            assert observe(sup) == baseline

        attack()
        assert posts >= 5, f"only {posts} writes among the random requests"  # ~28 on average


def test_poisoned_bodies_get_400_and_every_read_still_answers(repo: Path) -> None:
    """Lone surrogates and giant numbers are refused with the contract's 400 document, on every
    write route; GETs ignore a body; nothing stored can make a later read fail."""
    read_targets = ["/v1/status", "/v1/swaps", "/v1/events?after=0", "/metrics"]
    with hostile_target(repo) as (sup, swap_id):
        baseline = observe(sup)
        read_targets.append(f"/v1/swaps/{swap_id}")
        writes = ["/v1/swaps", "/v1/heartbeat", f"/v1/swaps/{swap_id}/rollback", "/v1/host/stop"]
        for body in _POISON_BODIES:
            for target in writes:
                raw = exchange(sup.socket, request_bytes("POST", target, body))
                assert responses(raw) == [400], (target, body[:60], raw[:300])
                document = json.loads(raw.partition(b"\r\n\r\n")[2])
                assert document["error"]["code"] == "bad_request", document
            for target in read_targets:
                raw = exchange(sup.socket, request_bytes("GET", target, body))
                assert responses(raw) == [200], (target, body[:60], raw[:300])
        assert observe(sup) == baseline


def test_peer_without_write_rights_gets_403_on_every_write(repo: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to act as another user")
    import pwd

    nobody = pwd.getpwnam("nobody")
    with hostile_target(repo) as (sup, swap_id):
        os.chmod(sup.state, 0o755)
        os.chmod(sup.socket, 0o666)
        writes = [
            ("/v1/swaps", {"summary": "not yours"}),
            *[(f"/v1/swaps/{swap_id}/{a}", {}) for a in ("activate", "confirm", "extend", "abort")],
            (f"/v1/swaps/{swap_id}/rollback", {"reason": "not yours"}),
            *[(f"/v1/host/{action}", {}) for action in ("start", "stop", "restart")],
            ("/v1/heartbeat", {"status": "not yours", "ready": True}),
        ]
        # every POST route of the table is among them: a new write endpoint must be added here
        for route in routes.ROUTES:
            if route.method == "POST":
                assert any(re.fullmatch(route.path, path) for path, _ in writes), route.path
        baseline = observe(sup)
        requests = [request_bytes("GET", "/v1/status")] + [
            request_bytes("POST", path, json.dumps(body).encode()) for path, body in writes
        ]
        answers = _as_user(nobody.pw_uid, nobody.pw_gid, sup.socket, requests)
        assert answers[0] == [200], answers  # reading is open to anyone who can connect
        assert answers[1:] == [[403]] * len(writes), list(zip(writes, answers[1:], strict=True))
        assert observe(sup) == baseline


def _as_user(uid: int, gid: int, path: Path, requests: list[bytes]) -> list[list[int]]:
    """Send each request on its own connection from a forked child running as uid:gid."""
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        os.close(read_fd)
        code = 1
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            answers = [
                exchange(path, request, timeout=20).decode("latin-1") for request in requests
            ]
            os.write(write_fd, json.dumps(answers).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the unprivileged client failed"
    return [responses(raw.encode("latin-1")) for raw in json.loads(data)]


# --- availability under a hostile reader --------------------------------------------------------


def _in_child_as(uid: int, gid: int, work: Any, *, before: Any = None) -> Any:
    """Fork a child that (after `before`) drops to uid:gid and runs `work(report)`, where
    `report(value)` sends one JSON value back; returns (pid, a reader of the reports)."""
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        os.close(read_fd)
        code = 1
        try:
            if before is not None:
                before()
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            work(lambda value: os.write(write_fd, json.dumps(value).encode() + b"\n"))
            code = 0
        except BaseException as err:
            os.write(write_fd, json.dumps({"failed": repr(err)}).encode() + b"\n")
        finally:
            os._exit(code)
    os.close(write_fd)
    return child, os.fdopen(read_fd, "r")


def _hold(path: Path, count: int) -> Any:
    def get(sock: socket.socket) -> int:
        sock.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read()
        return response.status

    def work(report: Any) -> None:
        held, refused = [], 0
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(str(path))
            try:
                status = get(sock)
            except OSError:  # answered 503 and closed at accept, before our request went out
                status = 503
            if status == 200:
                held.append(sock)
            else:
                refused += 1
        report([len(held), refused])
        report(sum(get(sock) == 200 for sock in held))  # keeps them alive
        report(sum(get(sock) == 200 for sock in held))
        signal.pause()  # holding them until killed

    return work


def test_a_reader_holding_64_connections_locks_out_neither_root_nor_the_host(repo: Path) -> None:
    """nobody opens 64 connections and keeps them busy; root's status and a heartbeat from the
    host's tree (running as nobody too, a writer only by tree membership) still get through."""
    if os.getuid() != 0:
        pytest.skip("needs root to act as nobody")
    import pwd

    nobody = pwd.getpwnam("nobody")
    with hostile_target(repo) as (sup, _swap_id):
        os.chmod(sup.state, 0o755)
        os.chmod(sup.socket, 0o666)
        procs = _cgroup_procs(sup.status()["host"]["pid"])
        holder, reports = _in_child_as(nobody.pw_uid, nobody.pw_gid, _hold(sup.socket, 64))
        try:
            assert json.loads(reports.readline()) == [MAX_PER_UID, 64 - MAX_PER_UID]
            assert json.loads(reports.readline()) == MAX_PER_UID  # kept alive, still held
            assert sup.client.status()["host"]["state"] == "running"  # root is not locked out

            def heartbeat(report: Any) -> None:
                with Client(sup.socket) as client:
                    report(client.heartbeat("from the tree"))

            beat, answers = _in_child_as(
                nobody.pw_uid, nobody.pw_gid, heartbeat, before=lambda: procs.write_text("0")
            )
            with answers:
                assert json.loads(answers.readline()) == {"ok": True}
            assert os.waitstatus_to_exitcode(os.waitpid(beat, 0)[1]) == 0
            assert json.loads(reports.readline()) == MAX_PER_UID  # and the reader still reads
        finally:
            os.kill(holder, signal.SIGKILL)
            os.waitpid(holder, 0)
            reports.close()


# --- notify datagrams ----------------------------------------------------------------------------

_SENDER = """
import socket, struct, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.connect(sys.argv[1])
source, sink = sys.stdin.buffer, sys.stdout.buffer
while len(head := source.read(4)) == 4:
    payload = source.read(struct.unpack("!I", head)[0])
    try:
        sock.send(payload)
        sink.write(b"k")
    except OSError:
        sink.write(b"e")
    sink.flush()
"""


class TreeSender:
    """A process that joined the host's cgroup and sends the datagrams it is given: to the daemon
    it is part of the host's tree."""

    def __init__(self, host_pid: int, notify_path: Path) -> None:
        procs = _cgroup_procs(host_pid)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SENDER, str(notify_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=lambda: procs.write_text("0"),
        )

    def send(self, payload: bytes) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(struct.pack("!I", len(payload)) + payload)
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], 10)
        assert ready and self.process.stdout.read(1) == b"k", "the in-tree sender failed"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def _cgroup_procs(host_pid: int) -> Path:
    lines = Path(f"/proc/{host_pid}/cgroup").read_text().splitlines()
    leaf = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), None)
    for mount in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
        if leaf and leaf != "/" and (procs := mount / leaf.lstrip("/") / "cgroup.procs").exists():
            return procs
    pytest.skip("the host has no cgroup v2 leaf here to join")


_NOTIFY_KEYS = st.sampled_from([
    "READY", "WATCHDOG", "STATUS", "STOPPING", "RELOADING", "EXTEND_TIMEOUT_USEC",
    "X_SWAPGUARD_CONFIRM", "MAINPID", "ERRNO", "FDSTORE", "WATCHDOG_USEC", "",
])  # fmt: skip
_NOTIFY_VALUES = st.one_of(
    st.sampled_from(["1", "0", "", "trigger", "-1", "+5", " 5", "99999999999999999999999", "٣"]),
    st.integers(0, 2**70).map(str),
    st.text(max_size=30),
)
_NOTIFY_LINES = st.lists(
    st.tuples(
        _NOTIFY_KEYS | st.text(max_size=10), st.sampled_from(["=", "", "=="]), _NOTIFY_VALUES
    ).map("".join),
    min_size=1,
    max_size=5,
).map(lambda lines: "\n".join(lines).encode())
DATAGRAMS = st.one_of(
    st.binary(max_size=300),
    _NOTIFY_LINES,
    st.binary(
        min_size=notifyproto.MAX_DATAGRAM_BYTES + 1, max_size=notifyproto.MAX_DATAGRAM_BYTES + 64
    ),
    st.sampled_from([b"READY=1\x00", b"\xff\xfe", b"\n\n", b"=1", b"STATUS=\xc3"]),
)


def _is_invalid(payload: bytes) -> bool:
    try:
        notifyproto.parse_datagram(payload)
    except notifyproto.NotifyError:
        return True
    return False


def test_junk_datagrams_from_the_hosts_tree_are_counted_and_change_nothing(repo: Path) -> None:
    with hostile_target(repo) as (sup, swap_id):
        baseline = observe(sup)
        sender = TreeSender(baseline["host"]["pid"], sup.state / "notify.sock")
        try:

            @FUZZ
            @given(st.lists(DATAGRAMS, min_size=1, max_size=4))
            def attack(batch: list[bytes]) -> None:
                for payload in batch:
                    if not _is_invalid(payload):
                        message = notifyproto.parse_datagram(payload)
                        # the host's own tree may legitimately fail itself or confirm its swap
                        assume(not message.watchdog_trigger and message.confirm_swap_id != swap_id)
                before = counters(sup)
                for payload in batch:
                    sender.send(payload)
                sender.send(b"\xff")  # an invalid marker: once counted, all before it were seen
                invalid = before["invalid"] + sum(map(_is_invalid, batch)) + 1
                wait_for(
                    lambda: counters(sup)["invalid"] >= invalid,
                    timeout=10,
                    what="the datagrams to be counted",
                    interval=0.005,
                )
                after = counters(sup)
                assert after["invalid"] == invalid and after["dropped"] == before["dropped"]
                assert observe(sup) == baseline

            attack()
        finally:
            sender.close()


def test_datagrams_from_outside_the_tree_are_dropped_whatever_they_say(repo: Path) -> None:
    with hostile_target(repo) as (sup, swap_id):
        baseline = observe(sup)
        hostile = [
            b"WATCHDOG=trigger",
            f"X_SWAPGUARD_CONFIRM={swap_id}".encode(),
            b"STOPPING=1",
            b"EXTEND_TIMEOUT_USEC=60000000",
            b"READY=1\nSTATUS=hijacked",
            b"MAINPID=1",
        ]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(str(sup.state / "notify.sock"))

            @settings(FUZZ, max_examples=40)
            @given(st.lists(st.one_of(DATAGRAMS, st.sampled_from(hostile)), min_size=1, max_size=6))
            def attack(batch: list[bytes]) -> None:
                before = counters(sup)
                for payload in batch:
                    sock.send(payload)
                wait_for(
                    lambda: counters(sup)["datagrams"] >= before["datagrams"] + len(batch),
                    timeout=10,
                    what="the datagrams to be read",
                    interval=0.005,
                )
                after = counters(sup)
                # each one invalid, or asking nothing (ignored), or dropped: none acted on
                invalid = after["invalid"] - before["invalid"]
                dropped = after["dropped"] - before["dropped"]
                acting = sum(1 for payload in batch if asks_something(payload))
                assert dropped == acting and invalid <= len(batch) - acting
                assert observe(sup) == baseline

            attack()
        assert sup.status()["host"]["status_text"] != "hijacked"
