"""Smoke test of the benchmark (scripts/bench): one cheap real measurement end to end, and the pure
parts (stamp parsing, swap timings, verdicts, table and JSON) on made-up numbers. The full bench is
far too slow for the suite and is run by hand."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import contest, measure, peers, report, rollback, treescale

FAKE = {
    "restart_latency_ms": {
        "swapguard": 4.0,
        "supervisord": 1200.0,
        "circus": 59.0,
        "pm2": None,
        "floor": 2.5,
        "p90": {"swapguard": 6.0, "supervisord": 1300.0, "circus": 95.0, "floor": 3.0},
        "best_peer": "circus",
        "best_peer_ms": 59.0,
        "ratio_to_best_peer": 4.0 / 59.0,
        "ratio_to_floor": 1.6,
        "limit": 2.5,
        "ratio": 300.0,
        "skipped": {"pm2": "node is not installed (PM2 needs node and npm)"},
    },
    "cold_start_ms": {
        "swapguard": 189.0,
        "supervisord": 1095.0,
        "circus": 126.0,
        "pm2": None,
        "floor": 39.0,
        "best_peer": "circus",
        "best_peer_ms": 126.0,
        "skipped": {"pm2": "node is not installed (PM2 needs node and npm)"},
    },
    "status_p50_ms": {
        "swapguard": 0.21,
        "supervisord": 0.31,
        "circus": 1.8,
        "pm2": None,
        "p99": {"swapguard": 0.34, "supervisord": 0.59, "circus": 2.51},
        "skipped": {"pm2": "node is not installed (PM2 needs node and npm)"},
    },
    "idle": {
        "cpu_s_per_min": {"swapguard": 0.0, "supervisord": 0.013, "circus": 0.42, "pm2": None},
        "rss_mib": {"swapguard": 23.7, "supervisord": 24.6, "circus": 30.5, "pm2": None},
        "supervisord_cpu_s_per_min": 0.013,
        "supervisord_rss_mib": 24.6,
        "skipped": {"pm2": "node is not installed (PM2 needs node and npm)"},
    },
    "deadline_lateness_ms": {"p50": 5.0, "p99": 8.0, "stressed_p99": 80.0},
    "rollback_s": {"small": 0.05, "large": 0.055, "copy_large": 2.0, "growth": 1.1},
    "activation_downtime_s": {"small": 0.1, "large": 3.0, "copy_large": 2.0},
    "snapshot": {"mib_s": 300.0, "copy_mib_s": 500.0, "ratio": math.inf},
    "heartbeat": {
        "msgs_s": 30_000.0,
        "cpu_us_per_datagram": 15.0,
        "status_p50_ms": 0.8,
        "status_p99_ms": 0.9,
        "supervisord_status_p50_ms": 0.31,
        "status_at_rest_p50_ms": 0.21,
    },
}
PEERS = {
    "swapguard": {"version": "0.1.0", "settings": "restart_delay 0", "skipped": None},
    "supervisord": {"version": "4.3.0", "settings": "startsecs 0", "skipped": None},
    "circus": {"version": "0.19.0", "settings": "check_delay 0.1", "skipped": None},
    "pm2": {"version": None, "settings": "fork mode", "skipped": "node is not installed"},
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
        "restart_latency_ms": "PASS",  # pm2 skipped: judged against the peers that ran
        "cold_start_ms": "MISS",  # 189 ms > circus's 126 ms
        "status_p50_ms": "PASS",
        "heartbeat": "PASS",
        "idle": "PASS",
        "deadline_lateness_ms": "MISS",  # stressed p99 80 ms > 50 ms
        "rollback_s": "PASS",
        "activation_downtime_s": "MISS",  # 3.0 s > 1.2 x 2.0 s
        "snapshot": "PASS",
        "tree_scale": "n/a",  # not measured
    }
    table = report.render_table(FAKE, MACHINE, ["tree: git failed"], PEERS)
    lines = table.splitlines()
    assert lines[0].startswith("machine: Test CPU, 2 cores, kernel Linux 6.1")
    assert "pm2: skipped: node is not installed" in table
    assert "circus 0.19.0: check_delay 0.1" in table
    restart = next(line for line in lines if line.startswith("exit -> next start, p50"))
    assert "4.00 ms" in restart and "59.0 ms" in restart and "0.07x (circus)" in restart
    assert "1.60x" in restart and restart.rstrip().endswith("PASS")
    cold = next(line for line in lines if line.startswith("cold start -> child running"))
    assert "1.50x (circus)" in cold and cold.rstrip().endswith("MISS")
    assert "not measured" in table and "error: tree: git failed" in table
    assert "30,000 datagrams/s (15.0 us CPU each)" in table
    document = json.loads(report.render_json(FAKE, MACHINE, [], quick=True, peers=PEERS))
    assert set(report.SECTIONS) <= set(document)
    assert document["tree_scale"] is None
    assert document["snapshot"]["ratio"] is None  # infinity is not JSON
    assert document["restart_latency_ms"]["pm2"] is None
    assert document["restart_latency_ms"]["skipped"]["pm2"].startswith("node is not installed")
    assert document["restart_latency_ms"]["best_peer"] == "circus"
    assert document["idle"]["rss_mib"]["circus"] == 30.5
    assert document["peers"]["pm2"]["skipped"] == "node is not installed"
    assert document["verdicts"]["deadline_lateness_ms"]["verdict"] == "MISS"
    assert document["quick"] is True and document["machine"]["cores"] == 2


def test_peer_figures_pick_the_best_peer_that_ran() -> None:
    samples = {
        "swapguard": [10.0, 12.0],
        "supervisord": [1000.0],
        "circus": [60.0, 50.0],
        "floor": [2.0, 3.0],
    }
    skipped = {"pm2": "failed in round 1: pm2 start exited with 1"}
    figures = contest.versus(samples, skipped, compat=True)
    assert figures["swapguard"] == 11.0 and figures["pm2"] is None
    assert figures["best_peer"] == "circus" and figures["best_peer_ms"] == 55.0
    assert figures["ratio_to_best_peer"] == pytest.approx(0.2)
    assert figures["ratio_to_floor"] == pytest.approx(4.4)
    assert figures["limit"] == 2.5 and figures["ratio"] == pytest.approx(1000 / 11)
    assert figures["skipped"] == skipped
    alone = contest.versus({"swapguard": [1.0], "floor": [1.0]}, {}, compat=False)
    assert alone["best_peer"] is None and alone["ratio_to_best_peer"] is None
    assert report.verdicts({"cold_start_ms": alone})[1].word == "PASS"


def test_tree_scale_renders_its_growth() -> None:
    scale = {
        "files": [1000, 10_000],
        "prepare_s": [0.05, 0.3],
        "git_limit_s": [0.04, 0.25],
        "rollback_s": [0.1, 0.4],
        "rss_mib": [24.0, 26.0],
        "prepare_growth": 6.0,
        "git_limit_growth": 6.25,
        "rollback_growth": 4.0,
        "watcher_cpu_s_per_min": 0.0,
        "watcher_rss_mib": 26.0,
    }
    assert report.verdicts({"tree_scale": scale})[-1].word == "PASS"
    table = report.render_table({"tree_scale": scale}, MACHINE, [])
    assert "10k: prepare 0.30 s vs git 0.25 s, rollback 0.40 s" in table
    slow = {**scale, "prepare_s": [0.05, 0.4]}  # 0.4 > 1.5 x 0.25
    assert report.verdicts({"tree_scale": slow})[-1].word == "MISS"


@pytest.mark.skipif(shutil.which("git") is None, reason="the tree is a git repo")
def test_git_floor_of_a_small_tree(tmp_path: Path) -> None:
    repo = treescale.make_tree(tmp_path / "repo", 250)
    assert (repo / "d00002" / "f49.txt").read_text() == "file 249\n"
    assert 0 < treescale.git_floor_s(repo, tmp_path / "scratch") < 30
    assert not (tmp_path / "scratch" / "index").exists()


def test_peers_not_installed_are_skipped_with_the_reason(tmp_path: Path) -> None:
    installs = contest.Installs(
        supervisord=tmp_path / "sd" / "bin" / "supervisord",
        circusd=tmp_path / "circus" / "bin" / "circusd",
        pm2=tmp_path / "pm2" / "node_modules" / "pm2",
    )
    lineup = {peer.name: peer for peer in contest.lineup(installs)}
    assert list(lineup) == list(report.PEERS)
    assert lineup["swapguard"].skipped is None
    for name in ("supervisord", "circus", "pm2"):
        reason = lineup[name].skipped
        assert reason, name
        assert "is not installed" in reason, reason


def test_an_idle_process_is_quiet_at_once() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert treescale.busy_for_s(sleeper.pid, limit_s=10) < 1.0
    finally:
        sleeper.kill()
        sleeper.wait()
