"""The status page at `/`: one HTML document, no build, no assets.

Rendered here from the documents the API serves (the status and the last swaps), so it reads right
with scripts off (and refreshes itself every few seconds through a <noscript> meta refresh). With
scripts on, a small inline script fetches the page again every second and swaps its live part in,
and moves the deadline countdown ten times a second between fetches. Everything the host or a
request wrote (status text, summaries, reasons) is escaped here, so the page never needs more of
the API than itself (the read-only TCP listener serves nothing else but /v1/status and /metrics).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from supervisor.control.views import exit_text

TIMELINE_LENGTH = 20
"""Swaps shown on the timeline, newest first (the script asks for as many)."""

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem;color:#222}
h1{font-size:1.3rem}table{border-collapse:collapse;width:100%}
td,th{text-align:left;padding:.25rem .5rem;border-bottom:1px solid #ddd;vertical-align:top}
.state{font-weight:600}.running,.confirmed{color:#17702c}.backoff,.failed,.rolled_back{color:#a4161a}
.probation,.rolling_back,.starting,.stopping,.prepared{color:#9a6700}
#countdown{font-size:2rem;font-variant-numeric:tabular-nums}
"""

_SCRIPT = """
(function () {
  var remaining = null, fetchedAt = 0;
  function seconds(s) {
    s = Math.max(0, s);
    var m = Math.floor(s / 60), r = s - 60 * m;
    return (m ? m + "m " : "") + r.toFixed(1) + "s";
  }
  function tick() {
    var clock = document.getElementById("countdown");
    var left = remaining - (Date.now() - fetchedAt) / 1000;
    if (remaining !== null) clock.textContent = seconds(left);
  }
  function adopt(live) {
    var value = live.getAttribute("data-remaining");
    remaining = value === "" ? null : parseFloat(value);
    fetchedAt = Date.now();
    tick();
  }
  function refresh() {
    fetch("/", {cache: "no-store"})
      .then(function (answer) { return answer.text(); })
      .then(function (html) {
        // The server escaped every value; a parsed document runs none of its scripts.
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("live");
        var live = document.getElementById("live");
        live.replaceWith(document.importNode(fresh, true));
        adopt(fresh);
        document.getElementById("reach").textContent = "live";
      })
      .catch(function () { document.getElementById("reach").textContent = "not reachable"; });
  }
  adopt(document.getElementById("live"));
  setInterval(refresh, 1000);
  setInterval(tick, 100);
})();
"""


def render(status: Mapping[str, Any], swaps: Sequence[Mapping[str, Any]]) -> str:
    """The page as it is now: the host, the swap in flight and its deadline, the last swaps."""
    host, swap = status["host"], status.get("swap")
    remaining = swap.get("remaining_s") if swap and swap.get("state") == "probation" else None
    rows = "\n".join(
        _row([s.get("id"), s.get("state"), s.get("reason"), s.get("summary"),
              s.get("finished_at") or s.get("created_at")], str(s.get("state")))
        for s in swaps[:TIMELINE_LENGTH]
    )  # fmt: skip
    host_state = f"{host['state']}{' (ready)' if host.get('ready') else ''}"
    remaining_attr = "" if remaining is None else f"{float(remaining):.3f}"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<noscript><meta http-equiv="refresh" content="5"></noscript>
<title>swapguard: host {_e(host["state"])}</title><style>{_STYLE}</style></head>
<body>
<h1>swapguard {_e(status["supervisor"].get("version"))} <small id="reach"></small></h1>
<div id="live" data-remaining="{remaining_attr}">
<h2>Host</h2>
<table>
<tr><th>state</th><td id="host-state" class="state {_e(host["state"])}">{_e(host_state)}</td></tr>
<tr><th>pid</th><td id="host-pid">{_e(host.get("pid"))}</td></tr>
<tr><th>restarts</th><td id="host-restarts">{_e(host.get("restarts"))}</td></tr>
<tr><th>heartbeat</th><td id="host-heartbeat">{_e(_heartbeat(host))}</td></tr>
<tr><th>last exit</th><td id="host-last-exit">{_e(_last_exit(host))}</td></tr>
<tr><th>status</th><td id="host-status">{_e(host.get("status_text"))}</td></tr>
</table>
<h2>Swap in flight</h2>
<table>
<tr><th>swap</th><td id="swap-id">{_e(swap["id"] if swap else "none in flight")}</td></tr>
<tr><th>state</th><td id="swap-state" class="state {_e(swap["state"] if swap else "")}">{
        _e(swap["state"] if swap else None)}</td></tr>
<tr><th>summary</th><td id="swap-summary">{_e(swap.get("summary") if swap else None)}</td></tr>
<tr><th>deadline in</th><td id="countdown">{_e(_seconds(remaining))}</td></tr>
</table>
<h2>Last swaps</h2>
<table><thead><tr><th>swap</th><th>outcome</th><th>reason</th><th>summary</th><th>at</th></tr>
</thead><tbody id="timeline">
{rows}
</tbody></table>
</div>
<script>{_SCRIPT}</script>
</body></html>
"""
    return page


def _heartbeat(host: Mapping[str, Any]) -> str:
    age = host.get("heartbeat_age_s")
    return "none since it started" if age is None else f"{_seconds(age)} ago"


def _last_exit(host: Mapping[str, Any]) -> str | None:
    last = host.get("last_exit")
    return None if not last else f"{exit_text(last)} at {last.get('at')}"


def _row(cells: Sequence[Any], state: str) -> str:
    tds = "".join(
        f'<td class="state {_e(state)}">{_e(v)}</td>' if i == 1 else f"<td>{_e(v)}</td>"
        for i, v in enumerate(cells)
    )
    return f"<tr>{tds}</tr>"


def _e(value: Any) -> str:
    # Imported at first use: `html` loads its entity table (0.4 MiB of RSS), which a daemon that
    # nobody asks for the page should not carry.
    import html

    return "-" if value is None or value == "" else html.escape(str(value), quote=True)


def _seconds(value: float | None) -> str | None:
    if value is None:
        return None
    value = max(0.0, float(value))
    minutes, rest = divmod(value, 60)
    return (f"{int(minutes)}m " if minutes else "") + f"{rest:.1f}s"

