"""The views as pure functions: the metrics table rendered and parsed by prometheus_client's own
parser, and the status' host document for a host that never sent a heartbeat."""

from __future__ import annotations

import pytest

from supervisor.clock import Instant
from supervisor.control import views
from supervisor.core import lifecycle as lc
from supervisor.core.supervisionrecord import Liveness
from supervisor.daemon.counters import Counters

prometheus = pytest.importorskip("prometheus_client.parser")
NOW = Instant(wall=1_800_000_000.0, boot=100.0, boot_id="b")


def reading(host: lc.Host, liveness: Liveness | None = None, **counts: int) -> views.Reading:
    return views.Reading(
        host=host, swap=None, liveness=liveness or Liveness(), counters=Counters(**counts),
        drifted=False, drift_checks=0,
        hook_events_dropped=0, boot_now=NOW.boot, now=NOW,
        disk_usage=None, keep_bytes=0, file_systems=(),
    )  # fmt: skip


def parsed(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    return {
        family.name: [(s.labels, s.value) for s in family.samples]
        for family in prometheus.text_string_to_metric_families(text)
    }


def test_every_metric_is_in_the_one_table_well_formed() -> None:
    names = [metric.name for metric in views.METRICS]
    assert len(names) == len(set(names)) and all(n.startswith("swapguard_") for n in names)
    for metric in views.METRICS:
        assert metric.help and metric.kind in ("gauge", "counter")
        assert metric.name.endswith("_total") == (metric.kind == "counter"), metric.name


def test_a_host_that_never_heartbeat_has_no_heartbeat_age() -> None:
    started = lc.Policy(ready_mode="started", min_uptime=1)
    host = lc.Host()
    for event in (lc.StartRequested(now=0), lc.Spawned(now=0, pid=7), lc.Tick(now=1)):
        host, _ = lc.step(host, event, started)
    assert host.ready
    families = parsed(views.render_metrics(views.METRICS, reading(host)))
    assert families["swapguard_heartbeat_age_seconds"] == []
    assert families["swapguard_heartbeats"] == [({}, 0.0)]
    assert families["swapguard_host_liveness_failures"] == []
    view = views.host_view(host, boot_now=NOW.boot, wall_now=NOW.wall, code_version=None)
    assert view["heartbeat_age_s"] is None and view["last_heartbeat_at"] is None
    host, _ = lc.step(host, lc.Heartbeat(now=99.5), started)
    families = parsed(views.render_metrics(views.METRICS, reading(host, heartbeats=1)))
    assert families["swapguard_heartbeat_age_seconds"] == [({}, 0.5)]


def test_labelled_metrics_have_a_sample_per_value_and_exits_say_why() -> None:
    host = lc.Host()
    live = Liveness(next_at=110.0, failures=2)
    text = views.render_metrics(views.METRICS, reading(host, live, exits={"unhealthy": 2}))
    families = parsed(text)
    exits = {labels["reason"]: value for labels, value in families["swapguard_host_exits"]}
    assert exits == {reason.value: 2.0 if reason.value == "unhealthy" else 0.0
                     for reason in lc.ExitReason}  # fmt: skip
    assert {labels["state"] for labels, _ in families["swapguard_swaps_finished"]} == {
        "confirmed", "rolled_back", "aborted"
    }  # fmt: skip
    assert families["swapguard_host_liveness_failures"] == [({}, 2.0)]


def test_the_exit_text_says_why() -> None:
    assert views.exit_text({"code": None, "signal": 15, "reason": "heartbeat_lost"}) == (
        "killed by signal 15 (heartbeat lost)"
    )
    assert views.exit_text({"code": 0, "signal": None, "reason": "stop"}) == "exit 0 (stopped)"
    assert views.exit_text({"code": 1, "signal": None}) == "exit 1"  # from an older swapguard


def test_disk_gauges_label_each_file_system_escaped_and_parse() -> None:
    from dataclasses import replace

    from supervisor.core.diskbudget import FileSystem
    from supervisor.data.diskusage import Usage

    host = lc.Host()
    odd = FileSystem(key="1:2", path='/srv/a "quoted"\\path', free=10, size=20)
    plain = FileSystem(key="3:4", path="/var/lib/swapguard", free=30, size=40)
    usage = Usage(held=(), snapshots=5, kept=6, measured_at=0.0)
    before = parsed(views.render_metrics(views.METRICS, reading(host)))
    assert before["swapguard_disk_used_bytes"] == []  # not measured yet: no sample, not a zero
    assert before["swapguard_fs_free_bytes"] == []
    measured = replace(reading(host), disk_usage=usage, keep_bytes=7, file_systems=(odd, plain))
    families = parsed(views.render_metrics(views.METRICS, measured))
    assert families["swapguard_disk_used_bytes"] == [
        ({"what": "snapshots"}, 5.0), ({"what": "kept_data"}, 6.0)
    ]
    assert families["swapguard_disk_budget_bytes"] == [({}, 7.0)]
    assert families["swapguard_fs_free_bytes"] == [({"path": odd.path}, 10.0),
                                                   ({"path": plain.path}, 30.0)]
    assert families["swapguard_fs_size_bytes"] == [({"path": odd.path}, 20.0),
                                                   ({"path": plain.path}, 40.0)]
