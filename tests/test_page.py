"""The status page as rendered without scripts: what it shows, and that nothing the host or a
request wrote can become markup."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

from supervisor.control.page import TIMELINE_LENGTH, render

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def status(swap: dict[str, Any] | None = None, **host: Any) -> dict[str, Any]:
    return {
        "supervisor": {"pid": 1, "version": "0.1.0"},
        "host": {"state": "running", "ready": True, "pid": 42, "restarts": 3,
                 "status_text": None, **host},
        "swap": swap,
        "code": {"root": "/app", "head": "abc", "drift": False},
    }  # fmt: skip


class Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.by_id: dict[str, str] = {}
        self._current: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self._current = dict(attrs).get("id")

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._current and data.strip():
            self.by_id.setdefault(self._current, data.strip())


def parse(page: str) -> Collect:
    collect = Collect()
    collect.feed(page)
    return collect


def test_the_page_shows_host_swap_countdown_and_timeline() -> None:
    swap = {"id": "s1", "state": "probation", "summary": "new prompt", "remaining_s": 87.25}
    history = [{"id": f"s{n}", "state": "rolled_back", "reason": "deadline", "summary": "x",
                "created_at": "2026-12-07T00:00:00Z"} for n in range(30)]  # fmt: skip
    page = parse(render(status(swap), history))
    assert page.by_id["host-state"] == "running (ready)"
    assert page.by_id["host-pid"] == "42"
    assert page.by_id["swap-id"] == "s1" and page.by_id["swap-state"] == "probation"
    assert page.by_id["countdown"] == "1m 27.2s"
    assert page.tags.count("tr") == 6 + 4 + 1 + TIMELINE_LENGTH
    assert page.tags.count("script") == 1  # ours, inline; no external asset
    assert "refresh" in render(status(), [])  # updates itself without scripts too


def test_nothing_the_host_or_a_request_wrote_becomes_markup() -> None:
    swap = {"id": "s1", "state": "probation", "summary": HOSTILE, "remaining_s": 5}
    history = [{"id": "s0", "state": HOSTILE, "reason": HOSTILE, "summary": HOSTILE}]
    page = parse(render(status(swap, status_text=HOSTILE, state="running"), history))
    assert page.tags.count("script") == 1 and "img" not in page.tags
    assert HOSTILE in "".join(page.text)  # shown as text


def test_the_page_says_why_the_host_last_exited_and_shows_no_heartbeat_it_never_had() -> None:
    last_exit = {"code": None, "signal": 15, "at": "2026-12-07T07:00:00Z", "reason": "unhealthy"}
    page = parse(render(status(last_exit=last_exit, heartbeat_age_s=None), []))
    assert page.by_id["host-last-exit"] == (
        "killed by signal 15 (health check failed) at 2026-12-07T07:00:00Z"
    )
    assert page.by_id["host-heartbeat"] == "none since it started"
    page = parse(render(status(heartbeat_age_s=0.25), []))
    assert page.by_id["host-heartbeat"] == "0.2s ago" and page.by_id["host-last-exit"] == "-"


def test_no_swap_in_flight() -> None:
    page = parse(render(status(None, state="backoff", ready=False, pid=None), []))
    assert page.by_id["swap-id"] == "none in flight"
    assert page.by_id["countdown"] == "-" and page.by_id["host-pid"] == "-"
