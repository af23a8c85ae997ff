"""The control socket end to end: a real ControlServer on a real unix socket, driven by the Client
and by raw bytes. The backend is a small real object; the HTTP layer is what is under test."""

from __future__ import annotations

import grp
import http.client
import json
import logging
import os
import pwd
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from supervisor import __version__, errors
from supervisor.client import Client, find_socket
from supervisor.control.server import (
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    ControlServer,
    ControlSocketInUse,
    Peer,
)

WAIT_S = 10.0


class SwapBackend:
    """A backend with a dict of swaps and the smallest honest state machine behind it."""

    _NEXT: ClassVar[dict[tuple[str, str], str]] = {
        ("prepared", "activate"): "probation",
        ("prepared", "abort"): "aborted",
        ("probation", "confirm"): "confirmed",
        ("probation", "extend"): "probation",
        ("probation", "rollback"): "rolled_back",
    }

    def __init__(self, writers: set[int] | None = None) -> None:
        self.lock = threading.Lock()
        self.writers = {os.getuid()} if writers is None else writers
        self.asked: list[Peer] = []  # every peer may_write was asked about
        self.heartbeats: list[tuple[str | None, bool, Peer]] = []
        self.threads: list[threading.Thread] = []  # the handler thread of every call
        self.swaps: dict[str, dict[str, Any]] = {}
        self.host_state = "running"

    def _seen(self) -> None:
        self.threads.append(threading.current_thread())

    def may_write(self, peer: Peer) -> bool:
        with self.lock:
            self.asked.append(peer)
            return peer.uid in self.writers

    def status(self) -> dict[str, Any]:
        with self.lock:
            self._seen()
            current = [s for s in self.swaps.values() if s["state"] in ("prepared", "probation")]
            host = {"state": self.host_state, "pid": os.getpid()}
            return {
                "supervisor": {"pid": os.getpid()},
                "host": host,
                "swap": (current or [None])[0],
            }

    def events(self, after: int, limit: int) -> list[dict[str, Any]]:
        return [{"seq": seq, "event": "host.ready"} for seq in range(after + 1, 101)][:limit]

    def metrics(self) -> str:
        return "# TYPE swapguard_up gauge\nswapguard_up 1\n"

    def host_action(self, action: str) -> dict[str, Any]:
        with self.lock:
            self.host_state = {"start": "running", "stop": "stopped", "restart": "running"}[action]
            return {"host": {"state": self.host_state}}

    def heartbeat(self, status: str | None, ready: bool, peer: Peer) -> dict[str, Any]:
        with self.lock:
            self.heartbeats.append((status, ready, peer))
            return {"ok": True}

    def list_swaps(self, limit: int) -> list[dict[str, Any]]:
        with self.lock:
            return list(reversed(self.swaps.values()))[:limit]

    def get_swap(self, swap_id: str) -> dict[str, Any]:
        with self.lock:
            if swap_id not in self.swaps:
                raise errors.NotFound(f"no swap {swap_id!r}")
            return dict(self.swaps[swap_id])

    def prepare_swap(self, summary: str) -> dict[str, Any]:
        with self.lock:
            if any(s["state"] in ("prepared", "probation") for s in self.swaps.values()):
                raise errors.Conflict("a swap is already in flight")
            swap_id = f"swap-{len(self.swaps) + 1}"
            self.swaps[swap_id] = {"id": swap_id, "state": "prepared", "summary": summary}
            return dict(self.swaps[swap_id])

    def swap_action(self, swap_id: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            swap = self.swaps.get(swap_id)
            if swap is None:
                raise errors.NotFound(f"no swap {swap_id!r}")
            new_state = self._NEXT.get((swap["state"], action))
            if new_state is None:
                raise errors.Conflict(f"swap {swap_id} is {swap['state']}; cannot {action}")
            swap["state"] = new_state
            swap["reason"] = body.get("reason", swap.get("reason"))
            return dict(swap)


class BrokenBackend(SwapBackend):
    def status(self) -> dict[str, Any]:
        raise RuntimeError("secret detail of a bug")


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)  # poll interval under a deadline


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., tuple[ControlServer, Path]]]:
    """Start servers on tmp_path sockets; all are closed after the test."""
    servers: list[ControlServer] = []

    def start(backend: Any = None, **options: Any) -> tuple[ControlServer, Path]:
        path = options.pop("path", tmp_path / f"c{len(servers)}.sock")
        server = ControlServer(path, backend or SwapBackend(), **options)
        servers.append(server)
        server.serve_in_thread()
        return server, path

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def backend() -> SwapBackend:
    return SwapBackend()


@pytest.fixture
def client(serve: Any, backend: SwapBackend) -> Iterator[Client]:
    _server, path = serve(backend)
    with Client(path) as the_client:
        yield the_client


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    sock.connect(str(path))
    return sock


def read_response(sock: socket.socket, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    body = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def exchange(path: Path, raw: bytes, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    with connect(path) as sock:
        sock.sendall(raw)
        return read_response(sock, method)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; fails if it does not close in time."""
    data = b""
    deadline = time.monotonic() + WAIT_S
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            pytest.fail(f"server did not close the connection; got {data[:200]!r}")
        if not chunk:
            return data
        data += chunk


def request(method: str, target: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: swapguard"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    if body and "Content_Length" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def error_of(body: bytes) -> dict[str, str]:
    assert body.endswith(b"\n")
    document = json.loads(body)
    assert set(document) == {"error"} and set(document["error"]) == {"code", "message"}
    return document["error"]


# --- every route -------------------------------------------------------------------------------


def test_every_route_through_the_client(client: Client, backend: SwapBackend) -> None:
    assert client.status()["host"]["state"] == "running"
    assert [e["seq"] for e in client.events(after=95, limit=3)] == [96, 97, 98]
    assert len(client.events()) == 100
    assert "swapguard_up 1" in client.metrics()
    assert client.host("stop") == {"host": {"state": "stopped"}}
    assert client.host("start")["host"]["state"] == "running"
    assert client.host("restart")["host"]["state"] == "running"
    assert client.heartbeat() == {"ok": True}
    client.heartbeat("serving 3 users", ready=True)
    assert [(status, ready) for status, ready, _peer in backend.heartbeats] == [
        (None, False),
        ("serving 3 users", True),
    ]
    assert backend.heartbeats[0][2] == Peer(os.getpid(), os.getuid(), os.getgid())

    first = client.prepare("new parser")
    assert first["state"] == "prepared" and first["summary"] == "new parser"
    assert client.status()["swap"]["id"] == first["id"]
    assert client.activate(first["id"])["state"] == "probation"
    assert client.extend(first["id"])["state"] == "probation"
    assert client.confirm(first["id"])["state"] == "confirmed"
    second = client.prepare()
    assert second["summary"] == ""
    assert client.abort(second["id"])["state"] == "aborted"
    third = client.prepare("risky")
    client.activate(third["id"])
    rolled = client.rollback(third["id"], reason="looks wrong")
    assert rolled["state"] == "rolled_back" and rolled["reason"] == "looks wrong"
    assert [s["id"] for s in client.swaps(limit=2)] == [third["id"], second["id"]]
    assert client.swap(first["id"])["state"] == "confirmed"


def test_raw_success_answers_are_json_with_length_and_newline(serve: Any) -> None:
    _server, path = serve()
    status, headers, body = exchange(path, request("POST", "/v1/swaps", b'{"summary": "x"}'))
    assert status == 201
    assert headers["content-type"] == "application/json"
    assert headers["server"] == f"swapguard/{__version__}"  # no Python version
    assert headers["date"].endswith(" GMT")
    assert int(headers["content-length"]) == len(body) and body.endswith(b"}\n")
    assert json.loads(body)["summary"] == "x"
    status, headers, body = exchange(path, request("GET", "/metrics"))
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    status, _headers, body = exchange(path, request("POST", "/v1/host/stop"))  # no body at all
    assert status == 200 and json.loads(body)["host"]["state"] == "stopped"


# --- errors ----------------------------------------------------------------------------------

ERROR_CASES = [
    (request("POST", "/v1/swaps", b"{not json"), 400, "malformed JSON"),
    (request("POST", "/v1/swaps", b'{"summary": 5}'), 400, "'summary' must be a string"),
    (request("POST", "/v1/swaps", b'{"summry": "x"}'), 400, "unknown field 'summry'"),
    (request("POST", "/v1/swaps", b'{"summary": "a", "summary": "b"}'), 400, "twice"),
    (request("POST", "/v1/swaps", b"[1]"), 400, "must be a JSON object"),
    (request("POST", "/v1/heartbeat", b'{"status": NaN}'), 400, "NaN"),
    (request("POST", "/v1/heartbeat", b"\xff\xfe"), 400, "not UTF-8"),
    (request("POST", "/v1/heartbeat", b'{"ready": "yes"}'), 400, "must be a boolean"),
    (request("GET", "/v1/events?after=-1"), 400, "'after' must be a whole number"),
    (request("GET", "/v1/swaps?limit=abc"), 400, "'limit' must be a whole number"),
    (request("GET", "/v1/swaps?limit=0"), 400, "'limit' must be a whole number from 1"),
    (request("GET", "/v1/swaps?limt=3"), 400, "unknown query parameter 'limt'"),
    (request("GET", "/v1/swaps/..%2f..%2fetc"), 400, "invalid swap id"),
    (request("POST", "/v1/swaps/../confirm"), 400, "invalid swap id"),
    (request("GET", "/v1/nothing"), 404, "no such path: /v1/nothing"),
    (request("POST", "/v1/host/explode"), 404, "no such path"),
    (request("GET", "/v1/swaps/nope"), 404, "no swap 'nope'"),
    (request("POST", "/v1/swaps/nope/confirm"), 404, "no swap 'nope'"),
]


@pytest.mark.parametrize(("raw", "status", "text"), ERROR_CASES)
def test_errors_name_what_was_wrong(serve: Any, raw: bytes, status: int, text: str) -> None:
    _server, path = serve()
    got, headers, body = exchange(path, raw)
    assert got == status
    assert headers["content-type"] == "application/json"
    error = error_of(body)
    assert error["code"] == {400: "bad_request", 404: "not_found"}[status]
    assert text in error["message"]


WRONG_METHODS = [
    ("DELETE", "/v1/status", "GET"),
    ("POST", "/v1/status", "GET"),
    ("PUT", "/v1/swaps", "GET, POST"),
    ("GET", "/v1/swaps/s1/confirm", "POST"),
    ("GET", "/v1/heartbeat", "POST"),
]


@pytest.mark.parametrize(("method", "target", "allow"), WRONG_METHODS)
def test_wrong_method_is_405_with_allow(serve: Any, method: str, target: str, allow: str) -> None:
    _server, path = serve()
    status, headers, body = exchange(path, request(method, target))
    assert (status, headers["allow"]) == (405, allow)
    assert error_of(body)["code"] == "method_not_allowed"


def test_head_gets_405_without_a_body_and_the_connection_lives_on(serve: Any) -> None:
    _server, path = serve()
    with connect(path) as sock:
        sock.sendall(request("HEAD", "/v1/status"))
        status, headers, body = read_response(sock, "HEAD")
        assert (status, headers["allow"], body) == (405, "GET", b"")
        sock.sendall(request("GET", "/v1/status"))
        assert read_response(sock)[0] == 200


def test_conflict_from_the_backend_is_409(client: Client, serve: Any) -> None:
    swap = client.prepare("one")
    with pytest.raises(errors.Conflict, match="already in flight"):
        client.prepare("two")
    with pytest.raises(errors.Conflict, match="is prepared; cannot confirm"):
        client.confirm(swap["id"])


def test_client_raises_the_matching_error(client: Client) -> None:
    with pytest.raises(errors.NotFound, match="no swap"):
        client.swap("missing")
    with pytest.raises(errors.BadRequest, match="invalid swap id"):
        client.confirm("a/b")  # quoted, so it cannot reach another route
    with pytest.raises(errors.MethodNotAllowed):
        client.request("DELETE", "/v1/status")
    with pytest.raises(errors.BadRequest, match="'status' must be a string"):
        client.request("POST", "/v1/heartbeat", {"status": 5})
    with pytest.raises(errors.NotFound):
        client.host("explode")
    assert client.status()["host"]["state"] == "running"  # the connection survived all that


def test_body_over_64k_is_refused_by_content_length_alone(serve: Any) -> None:
    _server, path = serve()
    with connect(path) as sock:  # the body is never sent: the answer must not wait for it
        sock.sendall(request("POST", "/v1/swaps", Content_Length=str(10_000_000)))
        status, headers, body = read_response(sock)
        assert status == 413 and error_of(body)["code"] == "payload_too_large"
        assert headers["connection"] == "close"
    expect = request(
        "POST", "/v1/swaps", Expect="100-continue", Content_Length=str(MAX_BODY_BYTES + 1)
    )
    status, _headers, _body = exchange(path, expect)
    assert status == 413  # refused instead of "100 Continue"


def test_unexpected_exception_is_500_without_details(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _server, path = serve(BrokenBackend())
    status, _headers, body = exchange(path, request("GET", "/v1/status"))
    assert status == 500
    assert error_of(body) == {"code": "internal", "message": "internal error"}
    assert b"secret" not in body and b"Traceback" not in body
    logged = [r for r in caplog.records if r.name == "supervisor.control.server" and r.exc_info]
    assert logged and "secret detail" in str(logged[0].exc_info[1])


def test_chunked_bodies_are_refused(serve: Any) -> None:
    _server, path = serve()
    raw = request("POST", "/v1/swaps", Transfer_Encoding="chunked") + b"2\r\n{}\r\n0\r\n\r\n"
    status, headers, body = exchange(path, raw)
    assert status == 400 and "chunked not supported" in error_of(body)["message"]
    assert headers["connection"] == "close"


def test_expect_100_continue_gets_the_go_ahead_then_the_answer(serve: Any) -> None:
    _server, path = serve()
    body = b'{"summary": "after 100"}'
    with connect(path) as sock:
        sock.sendall(request("POST", "/v1/swaps", Expect="100-continue", Content_Length="24"))
        interim = b""
        while b"\r\n\r\n" not in interim:
            byte = sock.recv(1)  # one at a time: the final answer must wait for the body
            assert byte, f"closed after {interim!r}"
            interim += byte
        assert interim.startswith(b"HTTP/1.1 100 ")
        sock.sendall(body)
        status, _headers, answer = read_response(sock)
    assert status == 201 and json.loads(answer)["summary"] == "after 100"


def test_pipelined_requests_are_answered_in_order_and_http_1_0_closes(serve: Any) -> None:
    _server, path = serve()
    with connect(path) as sock:
        sock.sendall(
            request("GET", "/v1/nothing")
            + request("POST", "/v1/host/stop", b"{}")
            + b"GET /v1/status HTTP/1.0\r\n\r\n"
        )
        raw = read_until_closed(sock)  # HTTP/1.0: the last answer closes the connection
    statuses = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        statuses.append(int(head.split()[1]))
        raw = raw[int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1]) :]
    assert statuses == [404, 200, 200]


def _with_head_of(size: int) -> bytes:
    """A GET whose request line and header fields (up to the blank line) are `size` bytes."""
    bare = request("GET", "/v1/status", X_Pad="")
    return request("GET", "/v1/status", X_Pad="p" * (size - len(bare)))


def test_header_section_is_capped_at_64k_exactly(serve: Any) -> None:
    _server, path = serve()
    assert len(_with_head_of(MAX_HEADER_BYTES)) == MAX_HEADER_BYTES
    assert exchange(path, _with_head_of(MAX_HEADER_BYTES))[0] == 200
    status, headers, body = exchange(path, _with_head_of(MAX_HEADER_BYTES + 1))
    assert (status, headers["connection"]) == (431, "close")
    assert error_of(body)["code"] == "request_header_fields_too_large"


def test_the_daemon_never_imports_http_server_http_client_or_email() -> None:
    """They cost the daemon 2 MiB of RSS (email, through http.client); h11 does the framing."""
    code = (
        "import sys, supervisor.daemon.service, supervisor.control.server;"
        "print(sorted(m for m in ('http.server', 'http.client', 'email') if m in sys.modules))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "[]"


# --- peers and permissions ---------------------------------------------------------------------


def test_a_refused_writer_gets_403_naming_its_uid(serve: Any) -> None:
    backend = SwapBackend(writers=set())
    _server, path = serve(backend)
    with Client(path) as client:
        assert client.status()["host"]["state"] == "running"  # reads stay open
        with pytest.raises(errors.Forbidden, match=f"uid {os.getuid()} may not write"):
            client.heartbeat()
    # asked once at accept (which slots it may take) and once for the write
    assert set(backend.asked) == {Peer(os.getpid(), os.getuid(), os.getgid())}
    assert backend.asked[-1].start is not None  # pinned: the process, not just its pid
    assert backend.heartbeats == []


def _as_nobody(path: Path) -> dict[str, Any]:
    """Fork a child that drops to nobody, reads, then tries to write; returns what it saw."""
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            seen: dict[str, Any] = {"pid": os.getpid(), "uid": os.getuid()}
            with Client(path) as client:
                seen["read"] = client.status()["host"]["state"]
                try:
                    client.heartbeat("from nobody")
                    seen["write"] = "allowed"
                except errors.Forbidden as err:
                    seen["write"] = err.message
            os.write(write_end, json.dumps(seen).encode())
        except BaseException as err:
            os.write(write_end, json.dumps({"failed": repr(err)}).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    data = b""
    try:
        while True:
            readable, _, _ = select.select([read_end], [], [], WAIT_S)
            assert readable, "the child did not report in time"
            if not (chunk := os.read(read_end, 65536)):
                break
            data += chunk
    finally:
        os.close(read_end)
        if not data:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return json.loads(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as nobody")
def test_a_peer_under_another_uid_may_read_but_not_write(serve: Any) -> None:
    socket_dir = Path(tempfile.mkdtemp(prefix="sg-api-", dir="/tmp"))  # tmp_path is 0700
    try:
        socket_dir.chmod(0o755)
        backend = SwapBackend(writers={0})
        _server, path = serve(backend, path=socket_dir / "control.sock", mode=0o666)
        seen = _as_nobody(path)
        assert "failed" not in seen, seen
        nobody_uid = pwd.getpwnam("nobody").pw_uid
        assert seen["uid"] == nobody_uid and seen["read"] == "running"
        assert seen["write"] == f"uid {nobody_uid} may not write to swapguard (pid {seen['pid']})"
        assert {(p.pid, p.uid) for p in backend.asked} == {(seen["pid"], nobody_uid)}
        assert backend.heartbeats == []
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


# --- the socket file -------------------------------------------------------------------------


def _other_group() -> grp.struct_group:
    if os.geteuid() == 0:
        return next(g for g in grp.getgrall() if g.gr_gid != os.getgid())
    return grp.getgrgid(os.getgid())


def test_socket_file_gets_mode_and_group(serve: Any) -> None:
    group = _other_group()
    server, path = serve(mode=0o640, group=group.gr_name)
    info = os.stat(path)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o640
    assert info.st_gid == group.gr_gid
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging name left
    server.close()
    assert not path.exists()
    server.close()  # idempotent


def test_unknown_group_is_named_and_leaves_no_socket(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    with pytest.raises(errors.ConfigError, match="unknown group 'no-such-group'"):
        ControlServer(path, SwapBackend(), group="no-such-group")
    assert list(tmp_path.iterdir()) == []


def test_stale_socket_is_replaced_but_live_one_and_other_files_are_not(
    tmp_path: Path, serve: Any
) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(stale))  # a socket file nobody listens on, as after a crash
    _server, path = serve(path=stale)
    with Client(path) as client:
        assert client.status()["host"]["state"] == "running"
    with pytest.raises(ControlSocketInUse, match="another swapguard"):
        ControlServer(path, SwapBackend())
    with Client(path) as client:  # the live one is untouched
        assert client.status()["host"]["state"] == "running"
    plain = tmp_path / "plain"
    plain.write_text("keep me")
    with pytest.raises(errors.ConfigError, match="not a socket"):
        ControlServer(plain, SwapBackend())
    assert plain.read_text() == "keep me"


def test_close_ends_idle_connections_promptly(serve: Any) -> None:
    server, path = serve()
    with connect(path) as sock:
        sock.sendall(request("GET", "/v1/status"))
        assert read_response(sock)[0] == 200
        started = time.monotonic()
        server.close()
        assert time.monotonic() - started < 5
        assert read_until_closed(sock) == b""
    with pytest.raises(errors.NotReachable, match=str(path)):
        Client(path).status()


# --- connections, timeouts and bad bytes ---------------------------------------------------------


def test_keep_alive_reuses_one_connection(serve: Any, backend: SwapBackend) -> None:
    _server, path = serve(backend)
    with connect(path) as sock:
        for _ in range(2):
            sock.sendall(request("GET", "/v1/status"))
            assert read_response(sock)[0] == 200
    with Client(path) as client:
        for _ in range(3):
            client.status()
    assert backend.threads[0] is backend.threads[1]  # one handler thread per connection
    assert backend.threads[2] is backend.threads[3] is backend.threads[4]
    assert backend.threads[1] is not backend.threads[2]


def test_client_reconnects_after_the_server_closed_an_idle_connection(
    serve: Any, backend: SwapBackend
) -> None:
    server, path = serve(backend, request_timeout=0.5)
    with Client(path) as client:
        client.status()
        wait_for(lambda: server.open_connections == 0, "the idle connection to be closed")
        assert client.status()["host"]["state"] == "running"
    assert backend.threads[0] is not backend.threads[1]


@pytest.mark.parametrize(
    "partial",
    [b"GET /v1/sta", request("POST", "/v1/heartbeat", Content_Length="10") + b'{"st'],
    ids=["half a request line", "half a body"],
)
def test_stalled_client_is_cut_off_while_others_are_served(
    serve: Any, partial: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    _server, path = serve(request_timeout=0.5)
    with connect(path) as stalled:
        stalled.sendall(partial)  # then nothing
        with Client(path) as client:
            assert client.status()["host"]["state"] == "running"
        answer = read_until_closed(stalled)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert error_of(answer.partition(b"\r\n\r\n")[2])["code"] == "request_timeout"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_slow_drip_cannot_hold_a_connection(serve: Any) -> None:
    _server, path = serve(request_timeout=0.5)
    with connect(path) as drip:
        drip.sendall(b"GET /v1/status HTTP/1.1\r\nX-Slow: ")
        started, answer = time.monotonic(), b""
        while time.monotonic() - started < WAIT_S:
            readable, _, _ = select.select([drip], [], [], 0.05)
            try:
                if not readable:
                    drip.send(
                        b"a"
                    )  # one byte per 50 ms: each read succeeds, the request never ends
                elif chunk := drip.recv(65536):
                    answer += chunk
                else:
                    break
            except OSError:
                break
        assert time.monotonic() - started < 5
    assert answer.startswith(b"HTTP/1.1 408 ")


BAD_BYTES = [
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", True, 400),  # a TLS hello
    (b"GARBAGE\x00\xff\r\n\r\n", False, 400),
    (b"\r\n\r\n", False, 400),  # an empty request line
    (b"GET /v1/status HTTP/1.1\r\n\r\n", False, 400),  # HTTP/1.1 without a Host
    (b"GET /v1/status HTTP/1.1\r\nHost: x\r\n", True, 400),  # headers cut short
    (b"GET /v1/status\r\n", True, 400),  # HTTP/0.9
    (request("POST", "/v1/heartbeat", Content_Length="10") + b'{"st', True, 400),
    (request("POST", "/v1/heartbeat", Content_Length="ten"), False, 400),
    (request("POST", "/v1/heartbeat", Content_Length="-1"), False, 400),
    (b"GET /v1/status HTTP/9.9\r\nHost: x\r\n\r\n", False, 505),
    (b"BREW /v1/status HTTP/1.1\r\nHost: x\r\n\r\n", False, 501),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", False, 414),
    (request("GET", "/v1/status", X_A="a" * 40_000, X_B="b" * 40_000), False, 431),
    (request("GET", "/v1/status", **{f"X_{n}": "1" for n in range(120)}), False, 431),
]


@pytest.mark.parametrize(("raw", "hang_up", "status"), BAD_BYTES)
def test_junk_and_truncated_requests_get_an_error_or_a_close(
    serve: Any, raw: bytes, hang_up: bool, status: int | None
) -> None:
    _server, path = serve()
    with connect(path) as sock:
        try:
            sock.sendall(raw)
            if hang_up:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer and close before all of a long request is sent
        answer = read_until_closed(sock)
    if status is None:
        assert answer == b""
    else:
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()) or answer.startswith(
            f"HTTP/1.0 {status} ".encode()
        ), answer[:100]
        error_of(answer.partition(b"\r\n\r\n")[2])


def test_connections_over_the_limit_get_503_at_once(serve: Any) -> None:
    server, path = serve(max_connections=1)
    with connect(path) as held:
        held.sendall(request("GET", "/v1/status"))
        assert read_response(held)[0] == 200
        wait_for(lambda: server.open_connections == 1, "the held connection")
        with connect(path) as extra:
            status, headers, body = read_response(extra)
        assert status == 503 and error_of(body)["code"] == "busy"
        assert headers["retry-after"] == "1"
    wait_for(lambda: server.open_connections == 0, "the held connection to close")
    with Client(path) as client:
        assert client.status()["host"]["state"] == "running"


def test_concurrent_clients(serve: Any) -> None:
    _server, path = serve()
    failures: list[BaseException] = []

    def hammer() -> None:
        try:
            with Client(path) as client:
                for _ in range(20):
                    client.status()
                    client.heartbeat("ok")
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not failures and not any(t.is_alive() for t in threads)


def test_requests_are_logged_at_debug_only(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="supervisor.control.server")
    client.status()
    client.heartbeat()
    with pytest.raises(errors.NotFound):
        client.swap("nope")
    records = [r for r in caplog.records if r.name == "supervisor.control.server"]
    assert records and all(r.levelno == logging.DEBUG for r in records)


# --- finding the socket --------------------------------------------------------------------------


def test_find_socket_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAPGUARD_SOCKET", "/run/from-env.sock")
    assert find_socket("/run/explicit.sock") == Path("/run/explicit.sock")
    assert find_socket(None) == Path("/run/from-env.sock")
    monkeypatch.delenv("SWAPGUARD_SOCKET")
    pytest.importorskip("supervisor.config.schema")
    config = tmp_path / "swapguard.toml"
    config.write_text('[host]\ncommand = ["python3", "app.py"]\n[control]\nsocket = "run/c.sock"\n')
    assert find_socket(None, str(config)) == tmp_path / "run" / "c.sock"


def test_unreachable_socket_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nobody-home.sock"
    with pytest.raises(errors.NotReachable, match=f"{path}.*No such file"):
        Client(path, timeout=2).status()


# --- JSON that cannot poison reads (issue 13) --------------------------------------------------


class StoredSurrogateBackend(SwapBackend):
    """What an older version let into the store: a lone surrogate in a swap's summary."""

    def status(self) -> dict[str, Any]:
        document = super().status()
        document["swap"] = {"id": "s1", "summary": "cut \ud83d"}
        return document

    def metrics(self) -> str:
        return 'swapguard_host_status_info{text="\udfff"} 1\n'


def test_a_stored_lone_surrogate_is_escaped_not_a_500(serve: Any) -> None:
    _server, path = serve(StoredSurrogateBackend())
    status, _headers, body = exchange(path, request("GET", "/v1/status"))
    assert status == 200 and json.loads(body)["swap"]["summary"] == "cut \ud83d"
    status, _headers, body = exchange(path, request("GET", "/metrics"))
    assert status == 200 and body == b'swapguard_host_status_info{text="?"} 1\n'


@pytest.mark.parametrize(
    "body",
    [b'{"summary": "\\ud83d"}', b'{"status": "\\ud800"}', b'{"x": ' + b"1" * 5000 + b"}"],
)
def test_surrogates_and_giant_numbers_are_400_and_get_bodies_are_ignored(
    serve: Any, backend: SwapBackend, body: bytes
) -> None:
    _server, path = serve(backend)
    for target in ("/v1/swaps", "/v1/heartbeat"):
        status, _headers, answer = exchange(path, request("POST", target, body))
        assert status == 400 and error_of(answer)["code"] == "bad_request", answer
    for target in ("/v1/status", "/v1/swaps", "/v1/events?after=0"):
        status, _headers, answer = exchange(path, request("GET", target, body))
        assert status == 200, (target, answer)
    assert backend.swaps == {} and backend.heartbeats == []


# --- availability and write rights under a hostile reader (issue 13) ---------------------------


def test_a_reader_uid_gets_its_share_of_slots_and_a_writer_more(serve: Any) -> None:
    _server, path = serve(SwapBackend(writers=set()), max_connections=8, max_per_uid=2)
    held = [connect(path), connect(path)]
    try:
        for sock in held:
            sock.sendall(request("GET", "/v1/status"))
            assert read_response(sock)[0] == 200
        with connect(path) as extra:
            status, headers, body = read_response(extra)
        assert status == 503 and headers["retry-after"] == "1"
        assert f"from uid {os.getuid()} (limit 2)" in error_of(body)["message"]
    finally:
        for sock in held:
            sock.close()
    _server, writable = serve(SwapBackend(), max_connections=8, max_per_uid=2)
    writers = [connect(writable) for _ in range(8)]  # a writer is not held to the per-uid share
    try:
        for sock in writers:
            sock.sendall(request("GET", "/v1/status"))
            assert read_response(sock)[0] == 200
    finally:
        for sock in writers:
            sock.close()


def test_an_idle_kept_alive_connection_is_closed_after_the_idle_timeout(serve: Any) -> None:
    _server, path = serve(idle_timeout=0.3, request_timeout=10.0)
    with connect(path) as sock:
        sock.sendall(request("GET", "/v1/status"))
        assert read_response(sock)[0] == 200
        started = time.monotonic()
        assert read_until_closed(sock) == b""
        assert 0.2 <= time.monotonic() - started < 5.0


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="peers are pinned with pidfds (Linux)")
def test_a_connection_outliving_the_process_that_opened_it_cannot_write(serve: Any) -> None:
    """The opener hands the connection to its child and exits: the child may read, not write,
    even as a user that may write (the right was the opener's, not its uid's or pid's)."""
    backend = SwapBackend()
    _server, path = serve(backend)
    read_fd, write_fd = os.pipe()
    opener = os.fork()
    if opener == 0:  # pragma: no cover - the opener, then its child
        code = 1
        try:
            sock = connect(path)
            opener_fd = os.pidfd_open(os.getpid())
            if os.fork() == 0:
                # readable once the opener has exited
                assert select.select([opener_fd], [], [], WAIT_S)[0], "the opener did not exit"
                sock.sendall(request("GET", "/v1/status"))
                answers = [read_response(sock)[0]]
                sock.sendall(request("POST", "/v1/heartbeat", b"{}"))
                status, _headers, body = read_response(sock)
                answers += [status, error_of(body)["message"]]
                os.write(write_fd, json.dumps(answers).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    os.waitpid(opener, 0)
    with os.fdopen(read_fd, "rb") as pipe:
        ready, _, _ = select.select([pipe], [], [], WAIT_S)
        assert ready, "the inheriting child did not report"
        answers = json.loads(pipe.read())
    assert answers[:2] == [200, 403], answers
    assert f"(pid {opener}) has exited; its write right ended with it" in answers[2]
    assert backend.heartbeats == []
