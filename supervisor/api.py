"""The control socket's server: HTTP/1.1 + JSON over a unix stream socket.

Theory of operation. This module knows sockets, HTTP framing and peer credentials, not the
runtime: a valid request becomes one call on a `Backend`, which the daemon implements (thread-safe:
it marshals each call to its loop). What is valid is `supervisor.routes` (the route table, query and
body validation, encoding; re-exported here). Reads are open to whoever can connect; every POST is a
write, checked by `Backend.may_write(peer)` against the kernel-reported peer credentials.

Nothing is read without a bound: a request's first byte must come within `request_timeout` (idle
keep-alive), the whole request within `request_timeout` of that byte; headers and bodies are capped
at 64 KiB (bodies by Content-Length, before reading). Past `max_connections` a connection gets
503 at once, without a thread, and is closed. A framing error (bad Content-Length, chunked, body cut
short) closes the connection after the answer; other errors keep it alive. Requests log at DEBUG.
"""

from __future__ import annotations

import contextlib
import grp
import io
import logging
import os
import re
import socket
import socketserver
import stat
import struct
import threading
import time
from http import HTTPStatus
from http.client import LineTooLong
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from supervisor import __version__, errors
from supervisor.routes import (
    JSON_TYPE,
    Backend,
    Peer,
    WrongMethod,
    encode_json,
    error_document,
    parse_body,
    resolve,
)

# Re-exported, so that the whole control API stays importable from here.
from supervisor.routes import METRICS_TYPE as METRICS_TYPE
from supervisor.routes import ROUTES as ROUTES
from supervisor.routes import SWAP_ID as SWAP_ID
from supervisor.routes import IntParam as IntParam
from supervisor.routes import Route as Route
from supervisor.routes import parse_query as parse_query

logger = logging.getLogger(__name__)
IDLE_POLL_S = 300.0

MAX_BODY_BYTES = 64 * 1024
MAX_HEADER_BYTES = 64 * 1024
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux (103 on macOS)
_CLOSE_JOIN_S = 5.0


class ControlSocketInUse(errors.SwapguardError):
    """A live swapguard already answers on the control socket path."""

    code = "socket_in_use"


# --- peer credentials and bounded reading -----------------------------------------------------

_UCRED = "iII"  # struct ucred: pid, uid, gid (Linux)
_XUCRED = "IIh16I"  # struct xucred: version, uid, ngroups, groups[16] (macOS, FreeBSD)


def peer_credentials(sock: socket.socket) -> Peer:
    """The connecting process's pid/uid/gid from the kernel; Nones where the OS cannot say."""
    try:
        if (so_peercred := getattr(socket, "SO_PEERCRED", None)) is not None:
            raw = sock.getsockopt(socket.SOL_SOCKET, so_peercred, struct.calcsize(_UCRED))
            return Peer(*struct.unpack(_UCRED, raw))
        if (local_peercred := getattr(socket, "LOCAL_PEERCRED", None)) is not None:
            sol_local = getattr(socket, "SOL_LOCAL", 0)
            raw = sock.getsockopt(sol_local, local_peercred, struct.calcsize(_XUCRED))
            _version, uid, ngroups, *groups = struct.unpack(_XUCRED, raw)
            pid = None
            if (local_peerpid := getattr(socket, "LOCAL_PEERPID", None)) is not None:
                pid = struct.unpack("i", sock.getsockopt(sol_local, local_peerpid, 4))[0]
            return Peer(pid, uid, groups[0] if ngroups > 0 else None)
    except (OSError, struct.error) as err:
        logger.debug("peer credentials unavailable: %s", err)
    return Peer(None, None, None)


class _DeadlineSocket(io.RawIOBase):
    """Socket reads that give up at a deadline, so a slow drip cannot hold a thread forever.

    Waiting for a request's first byte is bounded by `timeout` (idle keep-alive); once it has
    come, the whole request must be in within `timeout` of it.
    """

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__()
        self._sock = sock
        self._timeout = timeout
        self.deadline: float | None = None
        self.timed_out = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        wait = self._timeout if self.deadline is None else self.deadline - time.monotonic()
        try:
            if wait <= 0:
                raise TimeoutError("request not complete in time")
            self._sock.settimeout(wait)
            count = self._sock.recv_into(buffer)
        except TimeoutError:
            self.timed_out = True
            raise
        if count and self.deadline is None:
            self.deadline = time.monotonic() + self._timeout
        return count


class _RequestReader(io.BufferedReader):
    """The handler's rfile: deadline-bound, with a byte budget for the header section."""

    raw: _DeadlineSocket

    def start_request(self) -> None:
        self.raw.deadline = None
        self.raw.timed_out = False
        self.lines = 0
        self.header_budget = MAX_HEADER_BYTES
        self.cut_short = False  # a line ended without a newline: the peer hung up mid-request

    def readline(self, limit: int | None = -1) -> bytes:
        line = super().readline(limit)
        self.lines += 1
        self.cut_short = self.cut_short or not line.endswith(b"\n")
        if self.lines > 1:  # the request line has its own limit (414)
            self.header_budget -= len(line)
            if self.header_budget < 0:  # raised inside parse_headers: http.server answers 431
                raise LineTooLong(f"header section over {MAX_HEADER_BYTES} bytes")
        return line


# --- the request handler (one thread per connection) ------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Turns one connection's requests into backend calls; knows HTTP framing, not the runtime."""

    server: _UnixHTTPServer
    rfile: _RequestReader
    protocol_version = "HTTP/1.1"
    server_version = f"swapguard/{__version__}"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # makefile()'s reader would keep the socket open past close()
        self.rfile = _RequestReader(_DeadlineSocket(self.connection, self.server.request_timeout))
        self.peer = peer_credentials(self.connection)

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def address_string(self) -> str:
        """Unix peers have no address; name them by their credentials instead."""
        return f"pid {self.peer.pid} uid {self.peer.uid}"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("control %s: " + format, self.address_string(), *args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Each answer is logged once, by `_dispatch` or `send_error`."""

    def handle_one_request(self) -> None:
        self.rfile.start_request()
        try:
            super().handle_one_request()
            if self.rfile.raw.timed_out and self.rfile.raw.deadline is not None:
                self.send_error(HTTPStatus.REQUEST_TIMEOUT, "request not complete in time")
        except OSError as err:  # reset or broken pipe: the client is gone
            logger.debug("control %s: connection lost: %s", self.address_string(), err)
            self.close_connection = True

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it."""
        try:
            self._content_length()
        except errors.SwapguardError as err:
            self.close_connection = True
            self._send(err.http_status, error_document(err.code, err.message), JSON_TYPE)
            return False
        return super().handle_expect_100()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own protocol errors, in the API's JSON shape; the connection closes."""
        status = HTTPStatus(code)
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # so that the answer carries a status line
        text = (message or status.phrase) + (f" ({explain})" if explain else "")
        logger.debug("control %s: %d %s", self.address_string(), code, text)
        self.close_connection = True
        code_name = status.phrase.lower().replace(" ", "_").replace("-", "_")
        self._send(status, error_document(code_name, text), JSON_TYPE)

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def _dispatch(self) -> None:
        started = time.monotonic()
        extra: dict[str, str] = {}
        try:  # an OSError while reading (timeout, reset) ends the connection without an answer
            status, content_type, body = self._answer(self._request_body())
        except errors.SwapguardError as err:
            if isinstance(err, WrongMethod):
                extra["Allow"] = ", ".join(err.allow)
            status, content_type = err.http_status, JSON_TYPE
            body = error_document(err.code, err.message)
        self._send(status, body, content_type, extra)
        elapsed_ms = (time.monotonic() - started) * 1000
        who = self.address_string()
        logger.debug(
            "control %s: %s %s -> %d in %.1f ms", who, self.command, self.path, status, elapsed_ms
        )

    def _answer(self, raw_body: bytes) -> tuple[int, str, bytes]:
        """Validate the request fully, then make the one backend call it stands for."""
        try:
            route, values = resolve(self.command, self.path)
            backend = self.server.backend
            if route.method == "POST" and not backend.may_write(self.peer):
                who = "a peer of unknown uid" if self.peer.uid is None else f"uid {self.peer.uid}"
                raise errors.Forbidden(f"{who} may not write to swapguard (pid {self.peer.pid})")
            body = parse_body(raw_body, route.body)
            values |= {name: body.get(name, default) for name, default in route.body}
            values |= {"body": body, "peer": self.peer}
            payload = getattr(backend, route.call)(*(values[name] for name in route.args))
            if route.content_type == JSON_TYPE:
                return route.status, JSON_TYPE, encode_json(payload)
            return route.status, route.content_type, payload.encode("utf-8")
        except errors.SwapguardError:
            raise
        except Exception:
            logger.exception("control request %s %s failed", self.command, self.path)
            raise errors.SwapguardError("internal error") from None

    def _content_length(self) -> int:
        """The announced body size; a framing error marks the connection for closing."""
        if self.headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            raise errors.BadRequest("chunked not supported: send the body with a Content-Length")
        values = {value.strip() for value in self.headers.get_all("Content-Length", [])}
        if not values:
            return 0  # a missing Content-Length is an empty body
        value = values.pop()
        if values or not re.fullmatch(r"[0-9]{1,12}", value):
            self.close_connection = True
            raise errors.BadRequest(f"invalid Content-Length {value!r}")
        if (length := int(value)) > MAX_BODY_BYTES:
            self.close_connection = True
            raise errors.PayloadTooLarge(f"body of {length} bytes is over {MAX_BODY_BYTES} bytes")
        return length

    def _request_body(self) -> bytes:
        """The whole body, once the request is known to be complete and well framed."""
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
            raise errors.BadRequest("HTTP/0.9 requests are not supported")
        if self.rfile.cut_short:
            self.close_connection = True
            raise errors.BadRequest("the request ended inside its headers")
        length = self._content_length()
        raw = self.rfile.read(length) if length else b""
        if len(raw) < length:
            self.close_connection = True
            raise errors.BadRequest(f"body ended after {len(raw)} of {length} bytes")
        return raw

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        # Reading may have left a short timeout on the socket; writing gets a full one.
        self.connection.settimeout(self.server.request_timeout)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if getattr(self, "command", None) != "HEAD":
            self.wfile.write(body)


# --- the server ---------------------------------------------------------------------------------


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A thread per connection, bounded; knows its live connections so `close` can end them."""

    daemon_threads = True
    block_on_close = False  # ControlServer.close joins with a time limit instead

    def __init__(self, backend: Backend, request_timeout: float, max_connections: int) -> None:
        self.backend = backend
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.request_queue_size = max(5, max_connections)
        self.lock = threading.Lock()
        self.live: dict[socket.socket, threading.Thread] = {}
        super().__init__("", _Handler, bind_and_activate=False)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            thread = None
            if len(self.live) < self.max_connections:
                thread = threading.Thread(
                    target=self.process_request_thread,
                    args=(request, client_address),
                    name="swapguard-control-connection",
                    daemon=True,
                )
                self.live[request] = thread
        if thread is not None:
            thread.start()
            return
        logger.debug("control: refused a connection, %d are open", len(self.live))
        message = f"too many control connections (limit {self.max_connections}); retry shortly"
        body = error_document("busy", message)
        head = (
            f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {JSON_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            request.setblocking(False)
            while request.recv(65536):  # drain what came, so closing does not reset the peer
                pass
        with contextlib.suppress(OSError):
            request.sendall(head.encode("ascii") + body)  # fits the socket buffer: no wait
        self.shutdown_request(request)

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.live.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.exception("control connection failed")

    def end_connections(self) -> list[threading.Thread]:
        """Wake every handler blocked on its socket; return their threads to join."""
        with self.lock:
            live = list(self.live.items())
        for request, _thread in live:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)
        return [thread for _request, thread in live]


def _group_id(group: str) -> int:
    if not group:
        return -1
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        message = f"unknown group {group!r} for the control socket"
        raise errors.ConfigError(message, key="control.group") from None


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file nobody answers on; refuse to touch a live one or a non-socket."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            message = f"{path} exists and is not a socket; refusing to replace it"
            raise errors.ConfigError(message, key="control.socket")
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            logger.info("removing stale control socket %s", path)
            path.unlink(missing_ok=True)
            return
        except TimeoutError:
            pass  # a listener with a full backlog is alive too
        except OSError as err:
            message = f"cannot check the existing socket {path}: {err.strerror or err}"
            raise errors.ConfigError(message, key="control.socket") from None
    raise ControlSocketInUse(f"another swapguard is answering on {path}")


class ControlServer:
    """The control socket: bound and listening once constructed; `serve_in_thread` serves it."""

    def __init__(
        self,
        path: Path,
        backend: Backend,
        *,
        mode: int = 0o660,
        group: str = "",
        request_timeout: float = 10.0,
        max_connections: int = 64,
    ) -> None:
        if not 0 <= mode <= 0o777:
            raise errors.ConfigError(f"mode {mode:#o} is not a permission mode", key="control.mode")
        if request_timeout <= 0 or max_connections < 1:
            raise ValueError(f"need request_timeout > 0 ({request_timeout}), max_connections >= 1")
        self.path = Path(path)
        gid = _group_id(group)
        # Bound under a short temporary name, given its mode and group, then renamed into place:
        # no client ever sees the socket with looser permissions than configured.
        staging = self.path.with_name(f".{os.urandom(4).hex()}.sock~")
        if max(len(os.fsencode(self.path)), len(os.fsencode(staging))) > _SUN_PATH_MAX:
            message = f"socket path {self.path} is too long for a unix socket address"
            raise errors.ConfigError(message, key="control.socket")
        _clear_stale_socket(self.path)
        self._server = _UnixHTTPServer(backend, request_timeout, max_connections)
        try:
            staging.unlink(missing_ok=True)
            self._server.socket.bind(str(staging))
            try:
                os.chmod(staging, mode)
                if gid >= 0:
                    try:
                        os.chown(staging, -1, gid)
                    except OSError as err:
                        message = f"cannot give the control socket to group {group!r}: {err}"
                        raise errors.ConfigError(message, key="control.group") from None
                os.replace(staging, self.path)
            finally:
                staging.unlink(missing_ok=True)
            self._server.server_address = str(self.path)
            self._server.server_activate()
            self._inode = os.lstat(self.path).st_ino
        except OSError as err:
            self._server.server_close()
            message = f"cannot listen on {self.path}: {err.strerror or err}"
            raise errors.ConfigError(message, key="control.socket") from None
        except errors.ConfigError:
            self._server.server_close()
            raise
        self._thread: threading.Thread | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        logger.debug("control socket listening on %s (mode %#o)", self.path, mode)

    @property
    def open_connections(self) -> int:
        """Connections being served right now (for metrics and tests)."""
        with self._server.lock:
            return len(self._server.live)

    def serve_in_thread(self) -> threading.Thread:
        """Serve until `close`, on a daemon thread."""
        if self._thread is not None or self._closed:
            raise RuntimeError("the control server is already serving or closed")
        # A long poll: close() wakes the select by shutting the socket down, so the thread
        # need not wake twice a second (the default) for nothing while swapguard idles.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": IDLE_POLL_S},
            name="swapguard-control",
            daemon=True,
        )
        self._thread.start()
        return self._thread

    def close(self) -> None:
        """Stop accepting, end open connections, remove the socket file (if still ours)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        if self._thread is not None:
            with contextlib.suppress(OSError):  # wakes serve_forever's select at once
                self._server.socket.shutdown(socket.SHUT_RDWR)
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(self.path).st_ino == self._inode:
                self.path.unlink()
        deadline = time.monotonic() + _CLOSE_JOIN_S
        for thread in self._server.end_connections():
            if thread is threading.current_thread():
                continue  # closed from a handler (a backend call): it ends after answering
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("control handler %s still busy after close", thread.name)
