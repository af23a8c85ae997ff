"""swapguard's benchmark against supervisord 4.x and a bare fork/exec loop.

Run it with `scripts/bench [--quick] [--json]`: that script keeps supervisord in a venv of its own,
because supervisord's import package is also named `supervisor` and must never meet swapguard's.

Layout: `peers` starts and cleans up the contestants (swapguard, supervisord, throwaway git repos);
`measure` times restarts, heartbeats and idle cost; `rollback` times swaps, rollbacks and snapshots;
`report` is pure (percentiles, verdicts, the table and the JSON document).
"""
