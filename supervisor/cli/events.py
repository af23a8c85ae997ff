"""`swapguard events [-n N] [-f] [--swap ID] [--json]`: the audit log, without curl.

Reads `GET /v1/events` page by page after a cursor, so -f shows each event once, in order, also
across a restart of swapguard (the cursor is the event id, which the store keeps).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

from supervisor.client import Client
from supervisor.errors import NotReachable

PAGE = 500
FOLLOW_POLL_S = 0.5


def _pages(client: Client, after: int) -> Iterator[dict[str, Any]]:
    while True:
        page = client.events(after=after, limit=PAGE)
        yield from page
        if len(page) < PAGE:
            return
        after = page[-1]["id"]


def render(event: Mapping[str, Any]) -> str:
    detail = " ".join(f"{key}={value}" for key, value in event.get("detail", {}).items())
    swap = f" swap={event['swap_id']}" if event.get("swap_id") else ""
    return f"{event['at']} #{event['id']} {event['event']}{swap} {detail}".rstrip()


def show(client: Client, *, last: int, swap_id: str | None, as_json: bool, keep: bool) -> None:
    """The last `last` events (of one swap if given), then with `keep` every new one."""
    tail: deque[dict[str, Any]] = deque(maxlen=max(last, 0))
    cursor = 0
    for event in _pages(client, 0):
        cursor = event["id"]
        if swap_id is None or event.get("swap_id") == swap_id:
            tail.append(event)
    for event in tail:
        _print(event, as_json)
    while keep:
        try:
            fresh = list(_pages(client, cursor))
        except NotReachable:
            fresh = []  # swapguard restarting: the cursor survives it
        for event in fresh:
            cursor = event["id"]
            if swap_id is None or event.get("swap_id") == swap_id:
                _print(event, as_json)
        if not fresh:
            time.sleep(FOLLOW_POLL_S)


def _print(event: Mapping[str, Any], as_json: bool) -> None:
    print(json.dumps(event, sort_keys=True) if as_json else render(event), flush=True)
