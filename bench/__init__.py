"""swapguard's benchmark against supervisord 4.x, circus 0.19, PM2 and the physical limits.

Run it with `scripts/bench [--quick] [--json]`: that script gives each peer an environment of its
own under .bench-venv/ (supervisord's import package is also named `supervisor` and must never
meet swapguard's; circus has its own venv; PM2 is a private npm folder with a private PM2_HOME).

Layout: `peers` starts and cleans up swapguard and supervisord (and throwaway git repos), `rivals`
circus and PM2; `contest` runs them side by side (restarts, cold starts, status, idle);
`measure` holds the stamping child, the heartbeat load and the idle cost; `rollback` times swaps,
rollbacks and snapshots, `stress` loads the machine beside them; `treescale` grows the code tree;
`spawncost` breaks a restart's spawn path down; `report` is pure (percentiles, verdicts, the
tables and the JSON document).
"""
