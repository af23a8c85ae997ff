"""The control socket's client, for the CLI and for Python hosts.

One keep-alive connection is kept per `Client`, so `status --watch` and a host's heartbeats do not
reconnect each time. The server closes idle connections after its idle timeout (5 s); a request that
finds its reused connection closed is sent again once on a fresh one. Every failure surfaces as an
`errors.SwapguardError`: the server's own error (by its code, else by HTTP status), or
`errors.NotReachable` naming the socket when there is no answer at all.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import threading
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import quote

from supervisor import errors
from supervisor.control.routes import CALL_LIMIT_S

_CONNECTION_CLOSED = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    BrokenPipeError,
    ConnectionAbortedError,
)


def _error_classes() -> dict[str, type[errors.SwapguardError]]:
    """Error code -> class, for the classes of `supervisor.errors` (their constructors match)."""
    found: dict[str, type[errors.SwapguardError]] = {}
    pending: list[type[errors.SwapguardError]] = [errors.SwapguardError]
    while pending:
        cls = pending.pop(0)
        if cls.__module__ == errors.__name__:
            found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


_BY_CODE = _error_classes()
_BY_STATUS: dict[int, type[errors.SwapguardError]] = {
    cls.http_status: cls
    for cls in (
        errors.BadRequest,
        errors.Forbidden,
        errors.NotFound,
        errors.MethodNotAllowed,
        errors.Conflict,
        errors.PayloadTooLarge,
        errors.NotReachable,
    )
}


# Swap and host actions may wait on the runtime for up to CALL_LIMIT_S (a confirm, for the data
# an activation copied to reach the disk): their answers are worth waiting a little longer for.
_RUNTIME_WAIT_S = CALL_LIMIT_S + 5


class _UnixConnection(http.client.HTTPConnection):
    """http.client over a unix stream socket; the Host header is a fixed placeholder."""

    def __init__(self, socket_path: Path, timeout: float) -> None:
        super().__init__("swapguard", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.socket_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def idle_and_open(self) -> bool:
        """Connected, and the server has not hung up meanwhile (a readable idle socket is EOF)."""
        if self.sock is None:
            return False
        poller = select.poll()  # not select(): a host may hold more than FD_SETSIZE descriptors
        poller.register(self.sock, select.POLLIN)
        return not poller.poll(0)


class Client:
    """Talks to a running swapguard; thread-safe (one request at a time per client)."""

    def __init__(self, socket_path: str | Path, timeout: float = 10.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout
        self._connection = _UnixConnection(self.socket_path, timeout)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        wait: float | None = None,
    ) -> Any:
        """Parsed JSON (text for text answers); raises the server's error on a status >= 400.
        `wait` bounds the wait for the answer (default: the client's timeout)."""
        payload = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        wait = self.timeout if wait is None else max(self.timeout, wait)
        with self._lock:
            status, content_type, data = self._exchange(method, path, payload, headers, wait)
        if status >= 400:
            raise _server_error(status, data)
        try:
            if content_type.startswith("application/json"):
                return json.loads(data)
            return data.decode("utf-8")
        except ValueError as err:
            raise errors.SwapguardError(f"unreadable answer to {method} {path}: {err}") from None

    def _exchange(
        self, method: str, path: str, payload: bytes | None, headers: dict[str, str], wait: float
    ) -> tuple[int, str, bytes]:
        connection = self._connection
        reused = connection.idle_and_open()
        if not reused:
            connection.close()  # it was closed by the server, or never opened
        try:
            try:
                return _round_trip(connection, method, path, payload, headers, wait)
            except _CONNECTION_CLOSED:
                if not reused:
                    raise
                connection.close()  # the server closed the idle connection as we sent: once more
                return _round_trip(connection, method, path, payload, headers, wait)
        except TimeoutError:
            connection.close()
            raise errors.NotReachable(
                f"swapguard at {self.socket_path} did not answer within {wait:g} s"
            ) from None
        except (OSError, http.client.HTTPException) as err:
            connection.close()
            reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
            raise errors.NotReachable(
                f"cannot reach swapguard at {self.socket_path}: {reason}"
            ) from None

    # --- convenience ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/v1/status")

    def events(self, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/events?after={int(after)}&limit={int(limit)}")

    def metrics(self) -> str:
        return self.request("GET", "/metrics")

    def host(self, action: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/host/{quote(action, safe='')}", wait=_RUNTIME_WAIT_S)

    def heartbeat(self, status: str | None = None, ready: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {} if status is None else {"status": status}
        if ready:
            body["ready"] = True
        return self.request("POST", "/v1/heartbeat", body or None)

    def swaps(self, limit: int = 20) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/swaps?limit={int(limit)}")

    def swap(self, swap_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/swaps/{quote(swap_id, safe='')}")

    def prepare(self, summary: str = "") -> dict[str, Any]:
        return self.request("POST", "/v1/swaps", {"summary": summary}, wait=_RUNTIME_WAIT_S)

    def activate(self, swap_id: str) -> dict[str, Any]:
        return self._swap_action(swap_id, "activate")

    def confirm(self, swap_id: str) -> dict[str, Any]:
        return self._swap_action(swap_id, "confirm")

    def extend(self, swap_id: str) -> dict[str, Any]:
        return self._swap_action(swap_id, "extend")

    def rollback(self, swap_id: str, reason: str | None = None) -> dict[str, Any]:
        return self._swap_action(
            swap_id, "rollback", None if reason is None else {"reason": reason}
        )

    def abort(self, swap_id: str) -> dict[str, Any]:
        return self._swap_action(swap_id, "abort")

    def _swap_action(
        self, swap_id: str, action: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        # Quoting keeps an id with "/" or "?" from reaching another route; the server rejects it.
        path = f"/v1/swaps/{quote(swap_id, safe='')}/{action}"
        return self.request("POST", path, body, wait=_RUNTIME_WAIT_S)


def _round_trip(
    connection: _UnixConnection,
    method: str,
    path: str,
    payload: bytes | None,
    headers: dict[str, str],
    wait: float,
) -> tuple[int, str, bytes]:
    """One request and its answer; sending is bounded by the connection's timeout, the wait for
    the answer by `wait`."""
    if connection.sock is not None:
        connection.sock.settimeout(connection.timeout)
    connection.request(method, path, body=payload, headers=headers)
    if connection.sock is not None:
        connection.sock.settimeout(wait)
    response = connection.getresponse()
    data = response.read()  # on "Connection: close", http.client has closed the connection
    return response.status, response.getheader("Content-Type", ""), data


def _server_error(status: int, data: bytes) -> errors.SwapguardError:
    """The error the server described, as the matching SwapguardError subclass."""
    code, message = "", ""
    try:
        error = json.loads(data)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        message = data.decode("utf-8", "replace").strip()
    if not message:
        known = status in HTTPStatus.__members__.values()  # `int in HTTPStatus` raises on 3.11
        message = f"{status} {HTTPStatus(status).phrase if known else ''}".strip()
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status)
    if cls is None:
        cls = errors.BadRequest if 400 <= status < 500 else errors.SwapguardError
    return cls(message)


def find_socket(explicit: str | None, config_path: str | None = None) -> Path:
    """The control socket: --socket, else $SWAPGUARD_SOCKET, else the config's control.socket."""
    if explicit:
        return Path(explicit)
    if from_env := os.environ.get("SWAPGUARD_SOCKET"):
        return Path(from_env)
    from supervisor.config.schema import (  # written beside this; loaded lazily
        find_config,
        load_config,
    )

    return load_config(find_config(config_path)).control.socket
