"""The optional read-only TCP listener (`control.http_listen`): for Prometheus and a browser.

Why apart from the control socket: a TCP peer has no credentials to pin, so nothing said over TCP
can be a write. The listener speaks the same HTTP (one `SocketHTTPServer`, one handler) but serves
only `GET /metrics`, `GET /v1/status` and the status page at `/`; every other path is a 404 and no
write route exists on it at all. Off unless configured; bind it to loopback unless a scraper on
another machine must reach it (it tells anyone who connects the host's state).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading

from supervisor import errors
from supervisor.control.routes import READ_ONLY_CALLS, Backend
from supervisor.control.server import IDLE_POLL_S, IDLE_TIMEOUT_S, Limits, SocketHTTPServer

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 16


class _TCPHTTPServer(SocketHTTPServer):
    serves = READ_ONLY_CALLS
    allow_reuse_address = True  # a restart rebinds at once, not after TIME_WAIT

    def __init__(self, backend: Backend, limits: Limits, family: socket.AddressFamily) -> None:
        self.address_family = family
        super().__init__(backend, limits)


class ReadOnlyListener:
    """Bound and listening once constructed; `serve_in_thread` serves it until `close`."""

    def __init__(self, host: str, port: int, backend: Backend) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        limits = Limits(
            request_timeout=10.0,
            idle_timeout=IDLE_TIMEOUT_S,
            max_connections=MAX_CONNECTIONS,
            max_per_uid=MAX_CONNECTIONS,  # TCP peers have no uid: one shared allowance
            reserved=0,
        )
        self._server = _TCPHTTPServer(backend, limits, family)
        try:
            # the base is typed for a unix socket's path; this subclass binds an (host, port)
            self._server.server_address = (host, port)  # type: ignore[assignment]
            self._server.server_bind()
            self._server.server_activate()
        except OSError as err:
            self._server.server_close()
            message = f"cannot listen on {host}:{port}: {err.strerror or err}"
            raise errors.ConfigError(message, key="control.http_listen") from None
        self.address = self._server.socket.getsockname()[:2]
        self._thread: threading.Thread | None = None
        logger.info("read-only listener on %s:%d (/metrics, /v1/status, /)", *self.address)

    def serve_in_thread(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": IDLE_POLL_S},
            name="swapguard-http",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            with contextlib.suppress(OSError):  # wakes serve_forever's select at once
                self._server.socket.shutdown(socket.SHUT_RDWR)
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        for thread in self._server.end_connections():
            thread.join(1.0)
