"""The control API as data: the route table, request validation and encoding. No I/O.

`ROUTES` is the whole API: an unknown path is 404, a known path with another method 405. Each route
names the `Backend` method it becomes and the values it is fed (path groups, whole-number query
parameters, the body's optional fields, the peer). Reads are open; every POST is a write, which the
server checks with `Backend.may_write(peer)`. `control.server` owns the socket and HTTP framing;
tests drive `resolve`, `parse_query` and `parse_body` directly, no socket needed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from supervisor import errors
from supervisor.core.ids import SWAP_ID_SYNTAX, is_swap_id

JSON_TYPE = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"
CALL_LIMIT_S = 60.0
"""The longest a request waits for the runtime before it is answered 503 `not_reachable`. A
write can take that long (a confirm waits for the activation's data to reach the disk), so a
client waits a little longer for any POST's answer."""
ABORT_WAIT_S = 20.0
"""How long an abort waits for the code to be restored before it answers 202 (well inside
CALL_LIMIT_S: an answer in time, never a 503 for an abort still under way)."""
MAX_NUMBER_CHARS = 64
"""No body field is a number: a longer one is refused before Python's int() limit raises."""


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a connection, as the kernel reports it (None: unknown)."""

    pid: int | None
    uid: int | None
    gid: int | None
    # the process's start time (psutil's create_time), taken while it was pinned: it tells the
    # peer from a later process with its pid (None where nothing could be pinned)
    start: float | None = field(default=None, compare=False)


class Backend(Protocol):
    """What the daemon provides; each method may raise an `errors.SwapguardError`."""

    def may_write(self, peer: Peer) -> bool: ...
    def status(self) -> dict[str, Any]: ...
    def events(self, after: int, limit: int) -> list[dict[str, Any]]: ...
    def metrics(self) -> str: ...
    def page(self) -> str: ...
    def host_action(self, action: str) -> dict[str, Any]: ...
    def heartbeat(self, status: str | None, ready: bool, peer: Peer) -> dict[str, Any]: ...
    def list_swaps(self, limit: int) -> list[dict[str, Any]]: ...
    def get_swap(self, swap_id: str) -> dict[str, Any]: ...
    def prepare_swap(self, summary: str) -> dict[str, Any]: ...
    def swap_action(self, swap_id: str, action: str, body: dict[str, Any]) -> dict[str, Any]: ...


# --- the route table ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IntParam:
    """A query parameter that must be a whole number in [low, high]."""

    name: str
    default: int
    low: int
    high: int


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint: `call` names the Backend method, fed the values named in `args`: the path's
    named groups, the query, the body's optional string fields, `body` (all of them) or `peer`."""

    method: str
    path: str  # a regular expression matched against the whole path
    call: str
    args: tuple[str, ...] = ()
    query: tuple[IntParam, ...] = ()
    # the body's optional fields and their defaults; a bool default makes a bool field
    body: tuple[tuple[str, str | bool | None], ...] = ()
    status: int = 200
    content_type: str = JSON_TYPE
    # a swap action: 202 Accepted instead of `status` while the swap answered has a step in flight
    accepted_while_step: bool = False

    def status_of(self, payload: Any) -> int:
        """Done: `status`. A swap action still under way (its swap's `step` is not null, e.g. an
        activation stopping the old version): 202, and the way to wait for it is the same for
        every action: GET /v1/swaps/{id} until `step` is null (`swapguard swap ... --wait`)."""
        under_way = isinstance(payload, dict) and payload.get("step") is not None
        return 202 if self.accepted_while_step and under_way else self.status


_ID = "(?P<swap_id>[^/]+)"
_SWAP_ACTION = f"/v1/swaps/{_ID}/(?P<action>activate|confirm|extend|abort)"
_ROLLBACK = f"/v1/swaps/{_ID}/(?P<action>rollback)"
_SWAP_ARGS = ("swap_id", "action", "body")
_EVENTS_QUERY = (IntParam("after", 0, 0, 2**63 - 1), IntParam("limit", 500, 1, 5000))
READ_ONLY_CALLS = frozenset({"status", "metrics", "page"})
"""What the TCP listener (`control.http_listen`) serves: a scraper and a browser's page, no more."""
ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/status", "status"),
    Route("GET", "/v1/events", "events", ("after", "limit"), query=_EVENTS_QUERY),
    Route("GET", "/metrics", "metrics", content_type=METRICS_TYPE),
    Route("GET", "/", "page", content_type=HTML_TYPE),
    Route("POST", "/v1/host/(?P<action>start|stop|restart)", "host_action", ("action",)),
    Route(
        "POST",
        "/v1/heartbeat",
        "heartbeat",
        ("status", "ready", "peer"),
        body=(("status", None), ("ready", False)),
    ),
    Route("GET", "/v1/swaps", "list_swaps", ("limit",), query=(IntParam("limit", 20, 1, 1000),)),
    Route("POST", "/v1/swaps", "prepare_swap", ("summary",), body=(("summary", ""),), status=201),
    Route("GET", f"/v1/swaps/{_ID}", "get_swap", ("swap_id",)),
    Route("POST", _SWAP_ACTION, "swap_action", _SWAP_ARGS, accepted_while_step=True),
    Route(
        "POST",
        _ROLLBACK,
        "swap_action",
        _SWAP_ARGS,
        body=(("reason", None),),
        accepted_while_step=True,
    ),
)


_MATCHERS = tuple((route, re.compile(route.path)) for route in ROUTES)
"""The table's paths compiled once: a status poll resolves thousands of times a minute."""


class WrongMethod(errors.MethodNotAllowed):
    """405 that knows which methods the path does accept (for the Allow header)."""

    def __init__(self, message: str, allow: tuple[str, ...]) -> None:
        super().__init__(message)
        self.allow = allow


# --- request validation and encoding ----------------------------------------------------------


def resolve(method: str, target: str) -> tuple[Route, dict[str, Any]]:
    """The route for a request target and the values from its path and query (404/405/400)."""
    parts = urlsplit(target)
    matches = [(route, m) for route, path in _MATCHERS if (m := path.fullmatch(parts.path))]
    if not matches:
        raise errors.NotFound(f"no such path: {parts.path}")
    chosen = next(((route, m) for route, m in matches if route.method == method), None)
    if chosen is None:
        allow = tuple(sorted({route.method for route, _ in matches}))
        raise WrongMethod(f"{method} is not allowed on {parts.path}; use {', '.join(allow)}", allow)
    route, match = chosen
    values: dict[str, Any] = match.groupdict()
    if "swap_id" in values and not is_swap_id(values["swap_id"]):
        raise errors.BadRequest(f"invalid swap id {values['swap_id']!r}: expected {SWAP_ID_SYNTAX}")
    return route, values | parse_query(parts.query, route.query)


def parse_query(query: str, spec: tuple[IntParam, ...]) -> dict[str, int]:
    """Whole-number query parameters with defaults; unknown or repeated names are errors."""
    if not query and not spec:
        return {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=len(spec) + 1)
    except ValueError:
        raise errors.BadRequest("too many query parameters") from None
    given, known = dict(pairs), {param.name for param in spec}
    if unknown := sorted(set(given) - known):
        allowed = ", ".join(sorted(known)) or "none"
        raise errors.BadRequest(f"unknown query parameter {unknown[0]!r} (allowed: {allowed})")
    if len(given) < len(pairs):
        raise errors.BadRequest("a query parameter is given twice")
    values = {}
    for param in spec:
        raw = given.get(param.name, str(param.default))
        number = int(raw) if re.fullmatch(r"[0-9]{1,19}", raw) else None
        if number is None or not param.low <= number <= param.high:
            raise errors.BadRequest(
                f"query parameter {param.name!r} must be a whole number from {param.low} "
                f"to {param.high}, got {raw!r}"
            )
        values[param.name] = number
    return values


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if duplicate := next((key for key in keys if keys.count(key) > 1), None):
        raise errors.BadRequest(f"malformed JSON: field {duplicate!r} appears twice")
    return dict(pairs)


def _no_constants(name: str) -> Any:
    raise errors.BadRequest(f"malformed JSON: {name} is not a JSON value")


def _bounded_number(text: str) -> Any:
    """No field takes a number; a huge one must still be refused before int() chokes on it."""
    if len(text) > MAX_NUMBER_CHARS:
        raise errors.BadRequest(f"malformed JSON: a number of {len(text)} characters")
    return float(text) if any(c in text for c in ".eE") else int(text)


def _check_text(value: Any, where: str) -> None:
    """Refuse lone UTF-16 surrogates (a cut emoji from JSON.stringify): stored, they could not be
    encoded again, and every later read of them would fail."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise errors.BadRequest(
                f"{where} holds a lone UTF-16 surrogate at character {err.start}"
            ) from None


def parse_body(raw: bytes, fields: tuple[tuple[str, str | bool | None], ...]) -> dict[str, Any]:
    """An empty body, or a JSON object of the route's optional fields (null = absent): strings,
    or booleans where the field's default is a boolean."""
    data: Any = {}
    if raw.strip():
        try:
            text = raw.decode("utf-8")
            data = json.loads(
                text,
                object_pairs_hook=_unique_object,
                parse_constant=_no_constants,
                parse_int=_bounded_number,
                parse_float=_bounded_number,
            )
        except UnicodeDecodeError as err:
            raise errors.BadRequest(f"body is not UTF-8 (byte {err.start})") from None
        except json.JSONDecodeError as err:
            where = f"line {err.lineno} column {err.colno}"
            raise errors.BadRequest(f"malformed JSON: {err.msg} at {where}") from None
        except RecursionError:
            raise errors.BadRequest("malformed JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise errors.BadRequest(f"body must be a JSON object, got {type(data).__name__}")
    defaults = dict(fields)
    for key, value in data.items():
        _check_text(key, "a field name")
        if key not in defaults:
            allowed = ", ".join(repr(name) for name in defaults) or "none"
            raise errors.BadRequest(f"unknown field {key!r} (allowed: {allowed})")
        wanted = bool if isinstance(defaults[key], bool) else str
        if value is not None and not isinstance(value, wanted):
            kind = "boolean" if wanted is bool else "string"
            raise errors.BadRequest(f"field {key!r} must be a {kind}, got {type(value).__name__}")
        _check_text(value, f"field {key!r}")
    return {key: value for key, value in data.items() if value is not None}


def encode_json(payload: Any) -> bytes:
    """UTF-8 JSON; a lone surrogate that got stored anyway (before 400 refused it, or from a
    datagram) is escaped as \\uXXXX rather than making the read fail."""
    text = json.dumps(payload, ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(payload, allow_nan=False).encode("ascii") + b"\n"


def encode_text(text: str) -> bytes:
    """A text answer (metrics) as UTF-8, a lone surrogate replaced rather than failing."""
    return text.encode("utf-8", "replace")


def error_document(code: str, message: str) -> bytes:
    return encode_json({"error": {"code": code, "message": message}})
