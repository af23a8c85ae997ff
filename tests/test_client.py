"""The client's waits: a read gives up at the client's timeout, a swap action waits for the
runtime as long as the server itself would (a confirm waits for the activation's data flush)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from supervisor import errors
from supervisor.client import Client
from supervisor.control.server import ControlServer, Peer

CLIENT_TIMEOUT_S = 0.3


class SlowBackend:
    """Status and swap actions block until the test releases them."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def _block(self) -> None:
        self.entered.set()
        self.release.wait(20)

    def may_write(self, peer: Peer) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        self._block()
        return {"ok": True}

    def swap_action(self, swap_id: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        self._block()
        return {"id": swap_id, "state": "confirmed"}


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[tuple[SlowBackend, Path]]:
    backend = SlowBackend()
    server = ControlServer(tmp_path / "c.sock", backend)  # type: ignore[arg-type]
    server.serve_in_thread()
    try:
        yield backend, tmp_path / "c.sock"
    finally:
        backend.release.set()
        server.close()


def test_a_read_gives_up_at_the_client_timeout(slow: tuple[SlowBackend, Path]) -> None:
    backend, path = slow
    with (
        Client(path, timeout=CLIENT_TIMEOUT_S) as client,
        pytest.raises(errors.NotReachable, match=f"did not answer within {CLIENT_TIMEOUT_S:g} s"),
    ):
        client.status()
    assert backend.entered.is_set()


def test_a_confirm_waits_past_the_client_timeout_for_the_runtime(
    slow: tuple[SlowBackend, Path],
) -> None:
    backend, path = slow
    with Client(path, timeout=CLIENT_TIMEOUT_S) as client, ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.confirm, "s1")
        assert backend.entered.wait(10)
        # Several client timeouts go by with the runtime still busy: the client keeps waiting.
        with pytest.raises(TimeoutError):
            answer.result(timeout=4 * CLIENT_TIMEOUT_S)
        backend.release.set()
        assert answer.result(timeout=10) == {"id": "s1", "state": "confirmed"}


@pytest.mark.parametrize(
    ("status_line", "error", "message"),
    [
        ("502 Bad Gateway", errors.SwapguardError, "502 Bad Gateway"),
        ("599 Whatever", errors.SwapguardError, "599"),  # not an HTTPStatus member
        ("418 Teapot", errors.BadRequest, "418 I'm a Teapot"),
    ],
)
def test_an_answer_with_no_body_becomes_an_error_named_by_its_status(
    tmp_path: Path, status_line: str, error: type[errors.SwapguardError], message: str
) -> None:
    """Whatever answers on the socket (a proxy, an older swapguard), the client raises its own
    error, never a TypeError of its own making."""
    path = tmp_path / "c.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def answer_once() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(f"HTTP/1.1 {status_line}\r\nContent-Length: 0\r\n\r\n".encode())

        server = threading.Thread(target=answer_once, daemon=True)
        server.start()
        with Client(path, timeout=5) as client, pytest.raises(error) as raised:
            client.status()
        server.join(5)
    assert str(raised.value) == message
