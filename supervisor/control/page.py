"""The status page at `/` of the read-only listener: one HTML document, no build, no assets.

Rendered here from the same documents the API serves (`GET /v1/status`, `GET /v1/swaps`), so it
reads right with scripts off (and refreshes itself every few seconds through a <noscript> meta
refresh). With scripts on, a small inline script fetches both documents every second, moves the
deadline countdown ten times a second, and redraws the timeline. Everything the host or a request
wrote (status text, summaries, reasons) is escaped here and set as text by the script, never as
markup.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

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
  var fetchedAt = 0, remaining = null;
  function text(id, value) { document.getElementById(id).textContent = value; }
  function seconds(s) {
    if (s === null || s === undefined) return "-";
    s = Math.max(0, s);
    var m = Math.floor(s / 60), r = s - 60 * m;
    return (m ? m + "m " : "") + r.toFixed(1) + "s";
  }
  function tick() {
    if (remaining === null) { text("countdown", "-"); return; }
    text("countdown", seconds(remaining - (Date.now() - fetchedAt) / 1000));
  }
  function row(cells, cls) {
    var tr = document.createElement("tr");
    cells.forEach(function (value, i) {
      var td = document.createElement("td");
      td.textContent = value === null || value === undefined ? "-" : String(value);
      if (i === 1) td.className = "state " + cls;
      tr.appendChild(td);
    });
    return tr;
  }
  function draw(status, swaps) {
    var host = status.host, swap = status.swap;
    text("host-state", host.state + (host.ready ? " (ready)" : ""));
    document.getElementById("host-state").className = "state " + host.state;
    text("host-pid", host.pid === null ? "-" : host.pid);
    text("host-restarts", host.restarts);
    text("host-status", host.status_text || "-");
    text("swap-id", swap ? swap.id : "none in flight");
    text("swap-state", swap ? swap.state : "-");
    document.getElementById("swap-state").className = "state " + (swap ? swap.state : "");
    text("swap-summary", swap ? swap.summary || "-" : "-");
    remaining = swap && swap.state === "probation" ? swap.remaining_s : null;
    fetchedAt = Date.now();
    tick();
    var body = document.getElementById("timeline");
    while (body.firstChild) body.removeChild(body.firstChild);
    swaps.forEach(function (s) {
      var at = s.finished_at || s.created_at;
      body.appendChild(row([s.id, s.state, s.reason, s.summary, at], s.state));
    });
  }
  function refresh() {
    Promise.all([fetch("/v1/status"), fetch("/v1/swaps?limit=LIMIT")])
      .then(function (r) { return Promise.all([r[0].json(), r[1].json()]); })
      .then(function (docs) { draw(docs[0], docs[1].swaps || docs[1]); text("live", "live"); })
      .catch(function () { text("live", "not reachable"); });
  }
  refresh();
  setInterval(refresh, 1000);
  setInterval(tick, 100);
})();
"""


def render(status: Mapping[str, Any], swaps: Sequence[Mapping[str, Any]]) -> bytes:
    """The page as it is now: the host, the swap in flight and its deadline, the last swaps."""
    host, swap = status["host"], status.get("swap")
    remaining = swap.get("remaining_s") if swap and swap.get("state") == "probation" else None
    rows = "\n".join(
        _row([s.get("id"), s.get("state"), s.get("reason"), s.get("summary"),
              s.get("finished_at") or s.get("created_at")], str(s.get("state")))
        for s in swaps[:TIMELINE_LENGTH]
    )  # fmt: skip
    host_state = f"{host['state']}{' (ready)' if host.get('ready') else ''}"
    script = _SCRIPT.replace("LIMIT", str(TIMELINE_LENGTH))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<noscript><meta http-equiv="refresh" content="5"></noscript>
<title>swapguard: host {_e(host["state"])}</title><style>{_STYLE}</style></head>
<body>
<h1>swapguard <small id="live">{_e(status["supervisor"].get("version"))}</small></h1>
<h2>Host</h2>
<table>
<tr><th>state</th><td id="host-state" class="state {_e(host["state"])}">{_e(host_state)}</td></tr>
<tr><th>pid</th><td id="host-pid">{_e(host.get("pid"))}</td></tr>
<tr><th>restarts</th><td id="host-restarts">{_e(host.get("restarts"))}</td></tr>
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
<script>{script}</script>
</body></html>
"""
    return page.encode("utf-8")


def _row(cells: Sequence[Any], state: str) -> str:
    tds = "".join(
        f'<td class="state {_e(state)}">{_e(v)}</td>' if i == 1 else f"<td>{_e(v)}</td>"
        for i, v in enumerate(cells)
    )
    return f"<tr>{tds}</tr>"


def _e(value: Any) -> str:
    return "-" if value is None or value == "" else html.escape(str(value), quote=True)


def _seconds(value: float | None) -> str | None:
    if value is None:
        return None
    value = max(0.0, float(value))
    minutes, rest = divmod(value, 60)
    return (f"{int(minutes)}m " if minutes else "") + f"{rest:.1f}s"

