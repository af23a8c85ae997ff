"""The control socket's server: HTTP/1.1 + JSON over a unix stream socket.

Theory of operation. This module knows sockets, deadlines and peer credentials, not the runtime: a
valid request becomes one call on a `Backend`, which the daemon implements (thread-safe: it
marshals each call to its loop, but for reads of the store or of what the loop publishes whole).
What is valid is `supervisor.control.routes` (the route table, query and body validation, encoding;
re-exported here). Reads are open to whoever can connect; every POST is a write, checked by
`Backend.may_write(peer)` against the kernel-reported peer credentials. h11 does the HTTP
framing: a connection's thread reads with `recv`, feeds h11, and writes what h11 returns.

Nothing is read without a bound: a kept-alive connection is closed after `idle_timeout` (5 s)
without a request, a whole request must come within `request_timeout` of its first byte; the
header section is capped at 64 KiB and 100 fields, bodies at 64 KiB (by Content-Length, before
reading). A request that cannot be read to its end (bad framing, chunked, a limit, a hang-up or a
timeout inside it) is answered, then the connection closes; other errors keep it alive. Requests
log at DEBUG.

No one who can merely read can take the socket away (issue 13). Each peer is pinned at accept
(`control.peers`: a pidfd and a start time), and a write needs that very process alive around the
`Backend.may_write` check, so a connection handed on by a process that then exited stays
read-only whatever now holds its pid. Slots: past `max_connections`, past `max_per_uid` for a uid
that may not write, or into the slots kept for writers, a connection gets 503 at once, without a
thread, and is closed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import h11

from supervisor import __version__, errors
from supervisor.config.schema import socket_path_problem, staging_socket_path
from supervisor.control.peers import PeerPin, pin_connection
from supervisor.control.routes import (
    JSON_TYPE,
    Backend,
    WrongMethod,
    encode_json,
    encode_text,
    error_document,
    parse_body,
    resolve,
)

# Re-exported, so that the whole control API stays importable from here.
from supervisor.control.routes import METRICS_TYPE as METRICS_TYPE
from supervisor.control.routes import ROUTES as ROUTES
from supervisor.control.routes import IntParam as IntParam
from supervisor.control.routes import Peer as Peer
from supervisor.control.routes import Route as Route
from supervisor.control.routes import parse_query as parse_query
from supervisor.control.socketfile import ControlSocketInUse as ControlSocketInUse
from supervisor.control.socketfile import (
    bind_into,
    clear_stale_socket,
    listening_at,
    socket_folder_problem,
    socket_group_id,
)

logger = logging.getLogger(__name__)
IDLE_POLL_S = 300.0
IDLE_TIMEOUT_S = 5.0
"""How long a kept-alive connection may sit between requests: a reader holds no slot for long."""
MAX_PER_UID = 16
"""Connections one uid may hold unless it may write: one user cannot take every slot."""
RESERVED_SLOTS = 16
"""Of `max_connections`, the ones only writers (allowed users, the host's tree) may take."""

MAX_BODY_BYTES = 64 * 1024
MAX_HEADER_BYTES = 64 * 1024  # the request line and the header fields together
MAX_HEADER_FIELDS = 100
_RECV_BYTES = 64 * 1024
# Methods this server knows (405 where a path does not take them); any other is 501.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
_SERVER = f"swapguard/{__version__}".encode("ascii")
_WEEKDAYS = b"Mon Tue Wed Thu Fri Sat Sun".split()
_MONTHS = b"Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
_RETRY_HEAD = ((b"Retry-After", b"1"),)
_CLOSE_JOIN_S = 5.0
_REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


class _ProtocolError(errors.SwapguardError):
    """A refusal at the HTTP level (408, 414, 431, 501, 505, ...), coded by the status's name."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = status
        self.code = HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")


# --- requests and answers, without I/O -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Answer:
    """One response: status, body and what goes with them; `close` ends the connection after."""

    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: tuple[tuple[bytes, bytes], ...] = ()
    close: bool = False


def _error_answer(err: errors.SwapguardError, *, close: bool = False) -> _Answer:
    allow = ((b"Allow", ", ".join(err.allow).encode()),) if isinstance(err, WrongMethod) else ()
    return _Answer(err.http_status, error_document(err.code, err.message), JSON_TYPE, allow, close)


def _response(http: h11.Connection, answer: _Answer, *, head_only: bool = False) -> bytes:
    """An answer's bytes, framed by h11 (which adds `Connection: close` where it must)."""
    headers = [
        (b"Content-Type", answer.content_type.encode("ascii")),
        (b"Content-Length", b"%d" % len(answer.body)),
        (b"Server", _SERVER),
        (b"Date", _http_date(int(time.time()))),
        *answer.headers,
    ]
    if answer.close:
        headers.append((b"Connection", b"close"))
    status, reason = answer.status, _REASONS[answer.status]
    events: list[h11.Event] = [h11.Response(status_code=status, headers=headers, reason=reason)]
    if not head_only:  # h11 knows that the answer to a HEAD has no body
        events.append(h11.Data(data=answer.body))
    events.append(h11.EndOfMessage())
    return b"".join(http.send(event) or b"" for event in events)


@functools.lru_cache(maxsize=2)
def _http_date(seconds: int) -> bytes:
    """The Date header's IMF-fixdate, free of the locale that strftime's %a and %b follow; made
    once a second, not once a request."""
    t = time.gmtime(seconds)
    day, month = _WEEKDAYS[t.tm_wday], _MONTHS[t.tm_mon - 1]
    fields = (day, t.tm_mday, month, t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)
    return b"%s, %02d %s %d %02d:%02d:%02d GMT" % fields


def _body_length(request: h11.Request) -> int:
    """The body size a request announces, once h11 has parsed it; refuses what this server will
    not read: an unknown method, another HTTP version, too many fields, chunked, over 64 KiB."""
    if (method := request.method.decode("latin-1")) not in _KNOWN_METHODS:
        raise _ProtocolError(501, f"method {method} is not implemented")
    if request.http_version not in (b"1.0", b"1.1"):
        version = request.http_version.decode("ascii")
        raise _ProtocolError(505, f"HTTP/{version} is not supported; use HTTP/1.1")
    if len(request.headers) > MAX_HEADER_FIELDS:
        count = len(request.headers)
        raise _ProtocolError(431, f"{count} header fields, over the limit of {MAX_HEADER_FIELDS}")
    length = 0
    for name, value in request.headers:  # h11 lowercased the names, merged equal lengths
        if name == b"transfer-encoding":
            raise errors.BadRequest("chunked not supported: send the body with a Content-Length")
        if name == b"content-length":
            length = int(value)  # h11 checked it: 1-20 digits, one value
    if length > MAX_BODY_BYTES:
        raise errors.PayloadTooLarge(f"body of {length} bytes is over {MAX_BODY_BYTES} bytes")
    return length


def _protocol_error(err: h11.RemoteProtocolError, unread: bytes) -> _ProtocolError:
    """h11's complaint about the bytes, as an answer; a head too long names the part that is."""
    status, message = err.error_status_hint, str(err)
    if status == 431 and b"\n" not in unread:
        status, message = 414, f"the request line is over {MAX_HEADER_BYTES} bytes"
    elif status == 431:
        message = f"the header section is over {MAX_HEADER_BYTES} bytes"
    return _ProtocolError(status, message)


def _answer_and_close(request: socket.socket, answer: _Answer) -> None:
    """Answer a connection that gets no thread, without waiting on it: drain what it sent (so
    closing does not reset the peer), then write what fits the socket buffer."""
    with contextlib.suppress(OSError):
        request.setblocking(False)
        while request.recv(65536):
            pass
    with contextlib.suppress(OSError):
        # a fresh h11 may answer before a request; the answer fits the socket buffer: no wait
        request.sendall(_response(h11.Connection(h11.SERVER), answer))


@dataclass(frozen=True, slots=True)
class Limits:
    request_timeout: float
    idle_timeout: float
    max_connections: int
    max_per_uid: int
    reserved: int


# --- one connection (one thread each) ------------------------------------------------------------


class _Connection(socketserver.BaseRequestHandler):
    """Turns one connection's requests into backend calls; knows framing and deadlines, not the
    runtime. h11 never holds more than 64 KiB of a request's head: reads are sized to stop there."""

    server: SocketHTTPServer
    request: socket.socket

    def setup(self) -> None:
        self.pin = self.server.pin_of(self.request)  # pinned at accept
        self.peer = self.pin.peer
        self.who = self.pin.describe()  # unix peers have no address
        self.timeout = self.server.request_timeout
        self.idle_timeout = self.server.idle_timeout
        # h11 refuses a head that is incomplete past this size; reads stop one byte later.
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES - 1)
        self.deadline: float | None = None  # set by the request's first byte
        self.buffered = 0  # bytes h11 holds of the request head being read
        self.body = bytearray()  # of the request being read
        self.length = 0  # the size its Content-Length announced

    def handle(self) -> None:
        try:
            while self._serve_one():
                self.http.start_next_cycle()
        except OSError as err:  # reset or broken pipe: the client is gone
            logger.debug("control %s: connection lost: %s", self.who, err)

    def _serve_one(self) -> bool:
        """Read one request, answer it, log it; whether the connection may carry another."""
        self.buffered = len(self.http.trailing_data[0])  # pipelined bytes, already in
        self.deadline = time.monotonic() + self.timeout if self.buffered else None
        request: h11.Request | None = None
        try:
            event = self._next_event()
            if not isinstance(event, h11.Request):
                return False  # closed or idle between requests: nothing to answer
            request, started = event, time.monotonic()
            raw_body = self._read_body(request)
        except errors.SwapguardError as err:  # the request cannot be read to its end
            answer = _error_answer(err, close=True)
            what = err.message if request is None else _request_line(request)
            logger.debug("control %s: %s -> %d", self.who, what, answer.status)
        else:
            answer = self._answer(request, raw_body)
            if logger.isEnabledFor(logging.DEBUG):  # the hot path builds no log line for nothing
                elapsed_ms = (time.monotonic() - started) * 1000
                line = _request_line(request)
                logger.debug(
                    "control %s: %s -> %d in %.1f ms", self.who, line, answer.status, elapsed_ms
                )
        head_only = request is not None and request.method == b"HEAD"
        self._write(_response(self.http, answer, head_only=head_only))
        return not answer.close and self.http.our_state is self.http.their_state is h11.DONE

    def _next_event(self) -> Any:
        """h11's next event, reading as it needs; None when the peer left between requests."""
        try:
            while (event := self.http.next_event()) is h11.NEED_DATA:
                if not self._receive():
                    return None
            return event
        except h11.RemoteProtocolError as err:
            raise _protocol_error(err, self.http.trailing_data[0]) from None

    def _receive(self) -> bool:
        """Feed h11 one read, bounded by the deadline; False for a clean end between requests."""
        in_head = self.http.their_state is h11.IDLE
        size = max(1, MAX_HEADER_BYTES - self.buffered) if in_head else _RECV_BYTES
        wait = self.idle_timeout if self.deadline is None else self.deadline - time.monotonic()
        try:
            if wait <= 0:
                raise TimeoutError
            self._timeout(wait)
            data = self.request.recv(size)
        except TimeoutError:
            if self.deadline is None:
                return False  # idle past the keep-alive timeout
            raise _ProtocolError(408, "request not complete in time") from None
        if not data:
            if self.deadline is None:
                return False
            if in_head:
                raise errors.BadRequest("the request ended inside its headers")
            raise errors.BadRequest(f"body ended after {len(self.body)} of {self.length} bytes")
        if self.deadline is None:
            self.deadline = time.monotonic() + self.timeout
        self.buffered += len(data)
        self.http.receive_data(data)
        return True

    def _read_body(self, request: h11.Request) -> bytes:
        """The whole body, after its framing was checked (a refusal comes before it is sent)."""
        self.length = _body_length(request)
        if self.http.they_are_waiting_for_100_continue:
            go_on = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            self._write(self.http.send(go_on) or b"")
        self.body = bytearray()
        while isinstance(event := self._next_event(), h11.Data):
            self.body += event.data
        assert isinstance(event, h11.EndOfMessage), event  # a cut body raised in _receive
        return bytes(self.body)

    def _answer(self, request: h11.Request, raw_body: bytes) -> _Answer:
        """Validate the request fully, then make the one backend call it stands for."""
        method, target = request.method.decode("latin-1"), request.target.decode("latin-1")
        if target.startswith("//"):  # not a network path here: '//v1/status' is '/v1/status'
            target = "/" + target.lstrip("/")
        try:
            route, values = resolve(method, target)
            if self.server.serves is not None and route.call not in self.server.serves:
                raise errors.NotFound(f"{method} {target} is not served here (read-only listener)")
            backend = self.server.backend
            if route.method == "POST":
                self._check_write_right(backend)
            # a GET's body means nothing to its route: never parsed, never refused
            body = {} if route.method == "GET" else parse_body(raw_body, route.body)
            values |= {name: body.get(name, default) for name, default in route.body}
            values |= {"body": body, "peer": self.peer}
            payload = getattr(backend, route.call)(*(values[name] for name in route.args))
            if route.content_type == JSON_TYPE:
                return _Answer(route.status_of(payload), encode_json(payload))
            return _Answer(route.status, encode_text(payload), route.content_type)
        except errors.SwapguardError as err:
            return _error_answer(err)
        except Exception:
            logger.exception("control request %s %s failed", method, target)
            return _error_answer(errors.SwapguardError("internal error"))

    def _check_write_right(self, backend: Backend) -> None:
        """The right belongs to the process pinned at accept, alive before and after the check
        (so the pid the backend looked at named that very process throughout)."""
        if not self.pin.alive():
            raise errors.Forbidden(
                f"the process that opened this connection (pid {self.peer.pid}) has exited; "
                f"its write right ended with it"
            )
        allowed = backend.may_write(self.peer)
        if not self.pin.alive():
            raise errors.Forbidden(f"the peer process (pid {self.peer.pid}) exited meanwhile")
        if not allowed:
            who = "a peer of unknown uid" if self.peer.uid is None else f"uid {self.peer.uid}"
            raise errors.Forbidden(f"{who} may not write to swapguard (pid {self.peer.pid})")

    def _write(self, data: bytes) -> None:
        self._timeout(self.timeout)  # reading may have left a short one; writing gets it all
        self.request.sendall(data)

    def _timeout(self, seconds: float) -> None:
        # settimeout is a system call; between keep-alive requests the value does not change.
        if self.request.gettimeout() != seconds:
            self.request.settimeout(seconds)


def _request_line(request: h11.Request) -> str:
    return f"{request.method.decode('latin-1')} {request.target.decode('latin-1')}"


# --- the server ---------------------------------------------------------------------------------


class SocketHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A thread per connection, bounded; knows its live connections so `close` can end them.

    Slots, so that no reader can lock anyone out: a uid that may not write holds at most
    `max_per_uid` connections, and readers together leave `reserved` of `max_connections` to
    writers (root, swapguard's user, allowed users, the host's tree). Each peer is pinned at
    accept (`control.peers`); its class is decided then, by `Backend.may_write`."""

    daemon_threads = True
    block_on_close = False  # ControlServer.close joins with a time limit instead
    serves: frozenset[str] | None = None  # the calls it serves (None: every route)

    def __init__(self, backend: Backend, limits: Limits) -> None:
        self.backend = backend
        self.request_timeout = limits.request_timeout
        self.idle_timeout = limits.idle_timeout
        self.limits = limits
        self.request_queue_size = max(5, limits.max_connections)
        self.lock = threading.Lock()
        self.live: dict[socket.socket, threading.Thread] = {}
        self.pins: dict[socket.socket, PeerPin] = {}
        self.readers: dict[socket.socket, int | None] = {}  # uid of each connection of a reader
        super().__init__("", _Connection, bind_and_activate=False)

    def pin_of(self, request: socket.socket) -> PeerPin:
        with self.lock:
            return self.pins[request]

    def process_request(self, request: Any, client_address: Any) -> None:
        pin = pin_connection(request)
        writer = pin.alive() and self._may_write(pin)
        uid = pin.peer.uid
        with self.lock:
            refusal = self._refusal(writer, uid)
            thread = None
            if refusal is None:
                thread = threading.Thread(
                    target=self.process_request_thread,
                    args=(request, client_address),
                    name="swapguard-control-connection",
                    daemon=True,
                )
                self.live[request] = thread
                self.pins[request] = pin
                if not writer:
                    self.readers[request] = uid
        if thread is not None:
            thread.start()
            return
        pin.close()
        logger.debug("control: refused %s: %s", pin.describe(), refusal)
        document = error_document("busy", f"{refusal}; retry shortly")
        busy = _Answer(503, document, headers=_RETRY_HEAD, close=True)
        _answer_and_close(request, busy)
        super().shutdown_request(request)

    def _may_write(self, pin: PeerPin) -> bool:
        try:
            return bool(self.backend.may_write(pin.peer))
        except Exception:  # a slot decision must not end the accept loop
            logger.exception("control: cannot classify %s", pin.describe())
            return False

    def _refusal(self, writer: bool, uid: int | None) -> str | None:
        """Why a new connection gets no slot, or None (called with the lock held)."""
        limits = self.limits
        if len(self.live) >= limits.max_connections:
            return f"too many control connections (limit {limits.max_connections})"
        if writer:
            return None
        if len(self.readers) >= limits.max_connections - limits.reserved:
            kept = limits.max_connections - limits.reserved
            return f"too many read-only control connections (limit {kept}; the rest are writers')"
        held = sum(1 for other in self.readers.values() if other == uid)
        if held >= limits.max_per_uid:
            return f"too many control connections from uid {uid} (limit {limits.max_per_uid})"
        return None

    def shutdown_request(self, request: Any) -> None:
        with self.lock:
            self.live.pop(request, None)
            self.readers.pop(request, None)
            pin = self.pins.pop(request, None)
        if pin is not None:
            pin.close()
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
        idle_timeout: float = IDLE_TIMEOUT_S,
        max_connections: int = 64,
        max_per_uid: int = MAX_PER_UID,
        inherited: socket.socket | None = None,
        staging_dir: Path | None = None,
    ) -> None:
        """`inherited`: the listening socket from our manager's fd store, taken instead of binding
        anew when it still listens at `path` (clients queued in its backlog across our restart
        are answered). `staging_dir`: `path`'s folder is somebody else's (the host's), so the
        socket is bound in `staging_dir` and renamed in (`socketfile.bind_into`)."""
        if not 0 <= mode <= 0o777:
            raise errors.ConfigError(f"mode {mode:#o} is not a permission mode", key="control.mode")
        if min(request_timeout, idle_timeout) <= 0 or min(max_connections, max_per_uid) < 1:
            raise ValueError(
                f"need timeouts > 0 ({request_timeout}, {idle_timeout}), "
                f"max_connections and max_per_uid >= 1 ({max_connections}, {max_per_uid})"
            )
        self.path = Path(path)
        self._staging_dir = staging_dir
        gid = socket_group_id(group)
        # Bound under a short temporary name, given its mode and group, then renamed into place:
        # no client ever sees the socket with looser permissions than configured.
        problem = socket_path_problem(self.path, staged=True) or socket_folder_problem(self.path)
        if problem is not None:
            raise errors.ConfigError(problem, key="control.socket")
        reserved = min(RESERVED_SLOTS, max_connections // 4)
        limits = Limits(request_timeout, idle_timeout, max_connections, max_per_uid, reserved)
        self._server = SocketHTTPServer(backend, limits)
        self.inherited = inherited is not None and listening_at(inherited, self.path, staging_dir)
        if self.inherited:
            assert inherited is not None
            self._take(inherited, mode, gid, group)
        else:
            if inherited is not None:
                logger.warning("the stored control socket does not listen at %s", self.path)
                inherited.close()
            self._bind(mode, gid, group)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        logger.debug("control socket listening on %s (mode %#o)", self.path, mode)

    def _take(self, inherited: socket.socket, mode: int, gid: int, group: str) -> None:
        self._server.socket.close()
        self._server.socket = inherited
        self._server.server_address = str(self.path)
        try:
            if self._staging_dir is None:  # the config may have changed
                self._apply_mode(self.path, mode, gid, group)
            # else the folder is the host's: a chmod there could follow what it put in place of
            # the socket; the mode was set before the rename in (`bind_into`) and never changes
            self._inode = os.lstat(self.path).st_ino
        except BaseException:
            self._server.server_close()
            raise

    def _apply_mode(self, path: Path, mode: int, gid: int, group: str) -> None:
        os.chmod(path, mode)
        if gid >= 0:
            try:
                os.chown(path, -1, gid)
            except OSError as err:
                message = f"cannot give the control socket to group {group!r}: {err}"
                raise errors.ConfigError(message, key="control.group") from None

    def _bind(self, mode: int, gid: int, group: str) -> None:
        staging = staging_socket_path(self.path)
        try:
            if self._staging_dir is None:
                clear_stale_socket(self.path)
        except BaseException:
            self._server.server_close()
            raise
        try:
            if self._staging_dir is not None:
                bind_into(self._server.socket, self.path, self._staging_dir, mode)
            else:
                staging.unlink(missing_ok=True)
                self._server.socket.bind(str(staging))
                try:
                    self._apply_mode(staging, mode, gid, group)
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

    @property
    def listening_socket(self) -> socket.socket:
        """The socket itself, for our manager's fd store."""
        return self._server.socket

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
