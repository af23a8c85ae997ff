"""Smoke test of the benchmark (scripts/bench): one cheap real measurement end to end, and the pure
parts (stamp parsing, swap timings, verdicts, table and JSON) on made-up numbers. The full bench is
far too slow for the suite and is run by hand."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from bench import measure, peers, report, rollback

FAKE = {
    "restart_latency_ms": {"swapguard": 4.0, "supervisord": 1200.0, "limit": 2.0, "ratio": 300.0},
    "deadline_lateness_ms": {"p50": 5.0, "p99": 80.0},
    "rollback_s": {"small": 0.2, "large": 0.22, "copy_large": 2.0, "growth": 1.1},
    "activation_downtime_s": {"small": 0.1, "large": 3.0},
    "snapshot": {"mib_s": 300.0, "copy_mib_s": 500.0, "ratio": math.inf},
    "heartbeat": {
        "msgs_s": 30_000.0,
        "status_p50_ms": 0.8,
        "status_p99_ms": 3.0,
        "supervisord_status_p50_ms": 1.0,
    },
}
MACHINE = {"cpu": "Test CPU", "cores": 2, "kernel": "Linux 6.1", "python": "3.11.7"}


@pytest.mark.skipif(shutil.which("bash") is None, reason="the restart child is a bash script")
def test_fork_exec_loop_measures_real_restarts(tmp_path: Path) -> None:
    stamps = tmp_path / "stamps"
    command = measure.child_command(tmp_path, stamps)
    gaps = measure.limit_gaps_ms(command, stamps, 3, tag="test-bench-smoke")
    assert len(gaps) == 3
    assert all(0 < gap < 5000 for gap in gaps), gaps
    assert stamps.read_text().count("s ") == 4  # exits + 1 children started


def test_restart_gaps_pair_each_exit_with_the_next_start() -> None:
    text = "s 100.000\ne 100.010\ns 100.015\ne 100.020\ns 100.045\n"
    assert [round(gap, 3) for gap in measure.restart_gaps_ms(text)] == [5.0, 25.0]
    with pytest.raises(peers.BenchError, match=r"bash older than 5\.0"):
        measure.restart_gaps_ms("s \n")


def test_swap_timing_reads_the_audit_log() -> None:
    swap = {
        "id": "sw1",
        "deadline_at": "2026-01-01T00:00:10.000Z",
        "events": [
            {"at": "2026-01-01T00:00:10.007Z", "event": "swap.rollback_started"},
            {"at": "2026-01-01T00:00:10.250Z", "event": "swap.rolled_back"},
        ],
    }
    log = [
        {"id": 7, "at": "2026-01-01T00:00:08.000Z", "event": "swap.activated", "swap_id": "sw1"},
        {"id": 8, "at": "2026-01-01T00:00:08.100Z", "event": "host.stopped", "swap_id": None},
        {"id": 9, "at": "2026-01-01T00:00:08.400Z", "event": "host.started", "swap_id": None},
        {"id": 10, "at": "2026-01-01T00:00:10.300Z", "event": "host.started", "swap_id": None},
    ]
    timing = rollback.swap_timing(swap, log)
    assert timing.lateness_ms == pytest.approx(7.0, abs=0.01)
    assert timing.rollback_s == pytest.approx(0.25, abs=0.001)
    assert timing.activation_downtime_s == pytest.approx(0.3, abs=0.001)
    with pytest.raises(peers.BenchError, match=r"no swap\.rolled_back"):
        rollback.swap_timing({**swap, "events": swap["events"][:1]}, log)


def test_percentile_interpolates_and_refuses_nonsense() -> None:
    assert report.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert report.percentile([1.0, 2.0], 100) == 2.0
    with pytest.raises(ValueError, match="no values"):
        report.percentile([], 50)
    assert report.ratio(1.0, 0.0) == math.inf


def test_verdicts_table_and_json_on_fake_numbers() -> None:
    words = {v.section: v.word for v in report.verdicts(FAKE)}
    assert words == {
        "restart_latency_ms": "PASS",
        "deadline_lateness_ms": "MISS",  # p99 80 ms > 50 ms
        "rollback_s": "PASS",
        "activation_downtime_s": "-",  # no target
        "snapshot": "PASS",
        "heartbeat": "PASS",
        "idle": "n/a",  # not measured
    }
    table = report.render_table(FAKE, MACHINE, ["idle: supervisord would not start"])
    assert table.splitlines()[0].startswith("machine: Test CPU, 2 cores, kernel Linux 6.1")
    assert "300.0x" in table and "not measured" in table
    assert "error: idle: supervisord would not start" in table
    document = json.loads(report.render_json(FAKE, MACHINE, [], quick=True))
    assert set(report.SECTIONS) <= set(document)
    assert document["idle"] is None
    assert document["snapshot"]["ratio"] is None  # infinity is not JSON
    assert document["restart_latency_ms"] == FAKE["restart_latency_ms"]
    assert document["verdicts"]["deadline_lateness_ms"]["verdict"] == "MISS"
    assert document["quick"] is True and document["machine"]["cores"] == 2
