"""Swaps end to end: a real host in a real git repo writing a real WAL-mode SQLite database.

Every rollback must end exact: the code tree (listing, modes, symlinks, HEAD, branch, git status),
the database (no trace of the new version, integrity ok, the kept probation copy has it), and the
old version running again with SWAPGUARD_ROLLED_BACK.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.core.instant import wall_of
from supervisor.errors import Conflict, NotReachable
from tests.support import (
    Supervisor,
    git,
    gone,
    make_sample_repo,
    rows,
    supervised,
    wait_for,
    write_app,
)


def tree_state(repo: Path) -> dict[str, Any]:
    """Everything a user would call 'the code': files with modes and links, HEAD, branch, status."""
    listing = {}
    for path in sorted(repo.rglob("*")):
        rel = path.relative_to(repo).as_posix()
        if rel.startswith((".git/", "data/")) or rel == ".git" or rel == "data":
            continue
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            listing[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            listing[rel] = ("dir", "")
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            listing[rel] = (oct(info.st_mode & 0o777), digest)
    return {
        "files": listing,
        "head": git(repo, "rev-parse", "HEAD").strip(),
        "branch": git(repo, "symbolic-ref", "--short", "HEAD").strip(),
        "status": git(repo, "status", "--porcelain=v2", "--untracked-files=all"),
        "staged": git(repo, "diff", "--cached"),
    }


def db_dump(db: Path) -> dict[str, Any]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        dump = {t: conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in tables}
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    return dump


def new_version(repo: Path, app: dict[str, Any]) -> None:
    """What an agent would do: rewrite code, add and delete files, chmod, symlink, commit."""
    write_app(repo, app)
    (repo / "feature.py").write_text("print('new feature')\n")
    (repo / "notes.txt").unlink()
    (repo / "README.txt").chmod(0o755)
    (repo / "latest").symlink_to("feature.py")
    git(repo, "add", "feature.py")
    git(repo, "commit", "-qm", "new version")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_sample_repo(tmp_path / "repo")


def start_v1(sup: Supervisor) -> tuple[dict[str, Any], dict[str, Any]]:
    sup.start()
    db = sup.repo / "data" / "app.db"
    wait_for(lambda: db.exists() and rows(db, "SELECT count(*) FROM starts")[0][0] >= 1,
             what="v1 to write its first row")
    return tree_state(sup.repo), {}


def prepare_and_activate(sup: Supervisor, app: dict[str, Any]) -> tuple[str, dict, dict]:
    before_tree = tree_state(sup.repo)
    swap = sup.client.prepare("to " + app["version"])
    assert swap["state"] == "prepared"
    new_version(sup.repo, app)
    sup.client.activate(swap["id"])
    doc = sup.wait_swap(swap["id"], "probation")
    return swap["id"], before_tree, doc


def assert_rolled_back(sup: Supervisor, swap_id: str, before_tree: dict, before_db: dict,
                       reason: str, new: str) -> dict:
    doc = sup.wait_swap(swap_id, "rolled_back", timeout=40)
    assert doc["reason"] == reason
    assert tree_state(sup.repo) == before_tree
    db = sup.repo / "data" / "app.db"
    sup.wait_host(ready=True)
    # the old version runs again and knows it was rolled back
    wait_for(lambda: rows(db, "SELECT version, rolled_back FROM starts ORDER BY id DESC LIMIT 1")
             == [("v1", swap_id)], what="v1 to start with SWAPGUARD_ROLLED_BACK")
    after = db_dump(db)
    assert f"migrated_{new}" not in after
    # everything v1 wrote before the swap is there, exactly; the new version's rows are not
    assert after["starts"][: len(before_db["starts"])] == before_db["starts"]
    assert all(row[1] != new for row in after["starts"])
    kept = db.with_name(f"app.db.rolled-back-{swap_id}")
    assert f"migrated_{new}" in db_dump(kept) or new == "v2-crash-before-db"
    for suffix in ("-journal",):
        assert not db.with_name("app.db" + suffix).exists()
    events = [e["event"] for e in doc["events"]]
    assert "swap.rollback_started" in events and "swap.rolled_back" in events
    return doc


def _db_before(sup: Supervisor) -> dict:
    return db_dump(sup.repo / "data" / "app.db")


def test_requested_rollback_restores_code_and_data_exactly(repo: Path) -> None:
    with supervised(repo) as sup:
        sup.start()
        swap_id, before_tree, _ = prepare_and_activate(sup, {"version": "v2"})
        before_db = None
        host = sup.wait_host(ready=True)
        env = psutil.Process(host["pid"]).environ()
        assert env["SWAPGUARD_SWAP_ID"] == swap_id and env["SWAPGUARD_DEADLINE"].endswith("Z")
        doc = sup.client.swap(swap_id)
        assert {"path": "feature.py", "change": "added"} in doc["changes"]
        assert {"path": "notes.txt", "change": "deleted"} in doc["changes"]
        assert doc["data"][0]["linked"] and doc["data"][0]["bytes"] > 0
        # integrity_check of the snapshot runs after the new version started, off the downtime
        wait_for(lambda: "snapshot.verified" in [e["event"] for e in sup.client.swap(swap_id)[
            "events"]], what="the snapshot to be verified")
        before_db = _snapshot_db(sup, doc)
        sup.client.rollback(swap_id, reason="operator said so")
        final = assert_rolled_back(sup, swap_id, before_tree, before_db, "operator said so", "v2")
        assert final["finished_at"]
        assert {"path": "feature.py", "change": "added"} in final["changes"]  # kept after rollback
        # the new version's commit is not lost
        refs = git(repo, "for-each-ref", "refs/swapguard/")
        assert "abandoned" in refs
        abandoned = git(repo, "log", "--all", "--format=%s")
        assert "new version" in abandoned


def _snapshot_db(sup: Supervisor, doc: dict) -> dict:
    """The data as it was at activation, read back from swapguard's own snapshot."""
    snaps = list((sup.state / "snapshots").rglob("*"))
    candidates = [p for p in snaps if p.is_file() and p.read_bytes()[:16] == b"SQLite format 3\x00"]
    assert candidates, snaps
    return db_dump(candidates[0])


@pytest.mark.parametrize("app,deadman,host,reason", [
    ({"version": "v2", "behaviour": "crash"}, {"max_crashes": 2}, {}, "crash_loop"),
    ({"version": "v2", "behaviour": "hang"}, {}, {"start_timeout": "1s"}, "not_ready"),
    ({"version": "v2", "behaviour": "silent"}, {}, {"heartbeat_timeout": "1s"}, "heartbeat_lost"),
    ({"version": "v2"}, {"window": "2s", "hard_cap": "5s"}, {}, "deadline"),
], ids=["crash_loop", "not_ready", "heartbeat_lost", "deadline"])
def test_each_trigger_rolls_back_exactly(repo: Path, app: dict, deadman: dict, host: dict,
                                         reason: str) -> None:
    with supervised(repo, deadman=deadman, host=host) as sup:
        sup.start()
        before_tree = tree_state(repo)
        swap = sup.client.prepare("bad version")
        new_version(repo, app)
        sup.client.activate(swap["id"])
        doc = sup.wait_swap(swap["id"], "rolled_back", timeout=40)
        assert doc["reason"] == reason
        assert tree_state(repo) == before_tree
        db = repo / "data" / "app.db"
        sup.wait_host(ready=True)
        wait_for(lambda: rows(db, "SELECT version, rolled_back FROM starts ORDER BY id DESC "
                                  "LIMIT 1") == [("v1", swap["id"])], what="v1 rolled back")
        after = db_dump(db)
        assert "migrated_v2" not in after and all(r[1] != "v2" for r in after["starts"])
        assert "migrated_v2" in db_dump(db.with_name(f"app.db.rolled-back-{swap['id']}"))
        if reason == "deadline":
            events = {e["event"]: e["at"] for e in doc["events"]}
            started = wall_of(events["swap.rollback_started"])
            assert started - wall_of(doc["deadline_at"]) <= 1.0


def test_health_check_failures_roll_back(repo: Path) -> None:
    check = [sys.executable, "-c",
             "import json,sys; sys.exit(json.load(open('app.json'))['version'] != 'v1')"]
    deadman = {"health_check": check, "health_interval": "300ms", "health_failures": 2}
    with supervised(repo, deadman=deadman) as sup:
        sup.start()
        before = tree_state(repo)
        swap = sup.client.prepare("unhealthy")
        new_version(repo, {"version": "v2"})
        sup.client.activate(swap["id"])
        doc = sup.wait_swap(swap["id"], "rolled_back", timeout=40)
        assert doc["reason"] == "health_failed" and tree_state(repo) == before


def test_failed_build_rolls_back_and_rebuilds_the_old_version(repo: Path) -> None:
    (repo / "build.py").write_text(
        "import json, sys\nv = json.load(open('app.json'))['version']\n"
        "open('build.log', 'a').write(v + '\\n')\nsys.exit(v == 'v2')\n")
    git(repo, "add", "build.py")
    git(repo, "commit", "-qm", "build script")
    with supervised(repo, code={"build": [sys.executable, "build.py"]}) as sup:
        sup.start()
        before = tree_state(repo)
        swap = sup.client.prepare("breaks the build")
        new_version(repo, {"version": "v2"})
        sup.client.activate(swap["id"])
        doc = sup.wait_swap(swap["id"], "rolled_back", timeout=40)
        assert doc["reason"] == "build_failed"
        state = tree_state(repo)
        state["files"].pop("build.log", None)
        before["files"].pop("build.log", None)
        assert state["files"] == before["files"] and state["head"] == before["head"]
        # build.log (ignored by *.log) was new with the v2 build: a path ignored since the take
        # could hide code, so the rollback keeps it in the abandoned state, then the v1 build
        # writes a fresh one
        assert (repo / "build.log").read_text().split() == ["v1"]
        kept = git(repo, "show", f"refs/swapguard/abandoned/{swap['id']}:build.log")
        assert kept.split() == ["v2"]


def test_confirm_keeps_the_new_version(repo: Path) -> None:
    with supervised(repo) as sup:
        sup.start()
        swap = sup.client.prepare("good version")
        new_version(repo, {"version": "v2", "confirm": True})
        after_tree = tree_state(repo)
        sup.client.activate(swap["id"])
        doc = sup.wait_swap(swap["id"], "confirmed")
        assert "swap.confirmed" in [e["event"] for e in doc["events"]]
        assert tree_state(repo) == after_tree
        assert "migrated_v2" in db_dump(repo / "data" / "app.db")
        with pytest.raises(Conflict):
            sup.client.rollback(swap["id"])
        assert sup.status()["swap"] is None


def test_the_new_version_works_on_a_copy_and_the_original_file_comes_back(repo: Path) -> None:
    """The snapshot is the database file itself (no durable copy in the downtime); a confirm at
    once waits for the new version's copy to be on disk; a rollback puts the original back."""
    with supervised(repo) as sup:
        start_v1(sup)
        db = repo / "data" / "app.db"
        original, v1_pid = db.stat().st_ino, sup.status()["host"]["pid"]
        first, _, _ = prepare_and_activate(sup, {"version": "v2"})
        wait_for(lambda: sup.client.swap(first)["step"] is None, what="v2 to be spawned")
        assert (sup.state / "snapshots" / first / "0").stat().st_ino == original
        assert db.stat().st_ino != original
        assert sup.client.confirm(first)["state"] == "confirmed"
        sup.wait_host(ready=True, pid_not=v1_pid)  # v2 migrated before READY; v3 stops it next
        copy = db.stat().st_ino
        # v2 may be confirmed before it migrated: what the rollback of v3 keeps must hold it
        wait_for(lambda: "migrated_v2" in db_dump(db), what="v2 to migrate its copy")

        before_tree = tree_state(repo)
        second = sup.client.prepare("to v3")["id"]
        write_app(repo, {"version": "v3"})
        sup.client.activate(second)
        wait_for(lambda: sup.client.swap(second)["step"] is None, what="v3 to be spawned")
        assert (sup.state / "snapshots" / second / "0").stat().st_ino == copy
        sup.client.rollback(second)
        sup.wait_swap(second, "rolled_back", timeout=40)
        assert db.stat().st_ino == copy and tree_state(repo) == before_tree
        assert "migrated_v2" in db_dump(db) and "migrated_v3" not in db_dump(db)


def power_cut(sup: Supervisor, *, data_on_disk: bool) -> None:
    """Everything dies at once, and the next start is in another boot: swapguard and the host by
    SIGKILL; every moment in the store moves to a boot id that is not this one; the new version's
    copy of the database is torn unless it was on disk."""
    host_pid = sup.status()["host"]["pid"]
    sup.kill9()
    with contextlib.suppress(psutil.Error):
        psutil.Process(host_pid).kill()
    wait_for(lambda: gone(host_pid), what="the host to die")
    with contextlib.closing(sqlite3.connect(sup.state / "state.db", isolation_level=None)) as con:
        boot = con.execute("SELECT boot_id FROM host_run LIMIT 1").fetchone()[0]
        for table, column in (("swap", "record"), ("host_run", "boot_id")):
            con.execute(f"UPDATE {table} SET {column} = replace({column}, ?, 'a-boot-before')",
                        (boot,))
        if not data_on_disk:
            (record,) = con.execute("SELECT record FROM swap WHERE state = 'probation'").fetchone()
            record = json.loads(record) | {"data_unsynced": True}
            con.execute("UPDATE swap SET record = ? WHERE state = 'probation'",
                        (json.dumps(record),))
            db = sup.repo / "data" / "app.db"
            os.truncate(db, db.stat().st_size // 2)


@pytest.mark.parametrize("data_on_disk", [False, True], ids=["torn", "synced"])
def test_a_power_cut_on_probation_rolls_back_only_if_the_data_copy_was_not_on_disk(
    repo: Path, data_on_disk: bool
) -> None:
    with supervised(repo) as sup:
        before_tree, _ = start_v1(sup)
        before_db = _db_before(sup)
        swap_id, _, _ = prepare_and_activate(sup, {"version": "v2"})
        wait_for(lambda: sup.client.swap(swap_id)["step"] is None, what="v2 to be spawned")
        if data_on_disk:
            wait_for(lambda: sup.client.swap(swap_id)["data_on_disk"], what="v2's data on disk")
        power_cut(sup, data_on_disk=data_on_disk)
        sup.start(wait_ready=False)
        if data_on_disk:  # the new version goes on, its deadline by the wall clock
            sup.wait_host(ready=True)
            assert sup.client.confirm(swap_id)["state"] == "confirmed"
            assert "migrated_v2" in db_dump(repo / "data" / "app.db")
            return
        doc = sup.wait_swap(swap_id, "rolled_back", timeout=40)
        assert doc["reason"] == "activation_failed" and tree_state(repo) == before_tree
        started = [e for e in doc["events"] if e["event"] == "swap.rollback_started"]
        assert "machine restarted" in started[-1]["detail"]["error"]
        sup.wait_host(ready=True)
        after = db_dump(repo / "data" / "app.db")  # the torn copy is kept aside, not restored
        assert after["starts"][: len(before_db["starts"])] == before_db["starts"]
        assert "migrated_v2" not in after


def test_confirm_and_rollback_race_exactly_one_wins(repo: Path) -> None:
    with supervised(repo) as sup:
        sup.start()
        swap = sup.client.prepare("race")
        new_version(repo, {"version": "v2"})
        sup.client.activate(swap["id"])
        sup.wait_swap(swap["id"], "probation")
        sup.wait_host(ready=True)
        results: dict[str, str] = {}

        def attempt(name: str) -> None:
            from supervisor.client import Client

            client = Client(sup.socket)
            try:
                getattr(client, name)(swap["id"])
                results[name] = "ok"
            except Conflict:
                results[name] = "409"

        threads = [threading.Thread(target=attempt, args=(n,)) for n in ("confirm", "rollback")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results.values()) == ["409", "ok"], results
        final = "confirmed" if results["confirm"] == "ok" else "rolled_back"
        sup.wait_swap(swap["id"], final, timeout=40)


def test_activation_by_the_host_exiting_on_its_own(repo: Path) -> None:
    with supervised(repo) as sup:
        sup.start()
        old_pid = sup.status()["host"]["pid"]
        swap = sup.client.prepare("host applies its own change")
        new_version(repo, {"version": "v2", "confirm": True})
        os.kill(old_pid, signal.SIGTERM)  # the host exits on its own after applying the change
        sup.wait_swap(swap["id"], "confirmed")
        db = repo / "data" / "app.db"
        assert rows(db, "SELECT version FROM starts ORDER BY id DESC LIMIT 1") == [("v2",)]
        host = sup.status()["host"]
        assert host["pid"] != old_pid and host["failures"] == 0


def test_an_exit_with_unchanged_code_is_an_ordinary_crash(repo: Path) -> None:
    with supervised(repo) as sup:
        sup.start()
        old_pid = sup.status()["host"]["pid"]
        swap = sup.client.prepare("nothing changed yet")
        os.kill(old_pid, signal.SIGKILL)
        sup.wait_host(ready=True, pid_not=old_pid)
        assert sup.client.swap(swap["id"])["state"] == "prepared"


def test_extend_is_capped_and_deadline_survives_a_supervisor_kill(repo: Path) -> None:
    with supervised(repo, deadman={"window": "30s", "extend_by": "60s", "hard_cap": "40s"}) as sup:
        sup.start()
        swap = sup.client.prepare("slow to confirm")
        new_version(repo, {"version": "v2"})
        sup.client.activate(swap["id"])
        doc = sup.wait_swap(swap["id"], "probation")
        host = sup.wait_host(ready=True)
        extended = sup.client.extend(swap["id"])
        assert extended["deadline_at"] == extended["hard_cap_at"]  # capped
        sup.kill9()
        assert psutil.pid_exists(host["pid"])
        sup.start(wait_ready=False)
        again = sup.wait_host(ready=True)
        assert again["pid"] == host["pid"]  # adopted, not restarted
        resumed = sup.client.swap(swap["id"])
        assert resumed["state"] == "probation"
        assert resumed["deadline_at"] == extended["deadline_at"]
        assert resumed["hard_cap_at"] == doc["hard_cap_at"]
        sup.client.confirm(swap["id"])
        sup.wait_swap(swap["id"], "confirmed")


def test_a_host_extends_its_probation_by_the_time_it_names(repo: Path) -> None:
    """EXTEND_TIMEOUT_USEC=90 s from the new version: deadline = then + 90 s, not + extend_by."""
    deadman = {"window": "30s", "extend_by": "120s", "hard_cap": "300s"}
    with supervised(repo, deadman=deadman) as sup:
        sup.start()
        swap = sup.client.prepare("asks for 90 s")
        new_version(repo, {"version": "v2", "extend_usec": 90_000_000})
        sup.client.activate(swap["id"])
        wait_for(lambda: "swap.extended" in sup.events(), what="the host's extension")
        doc = sup.client.swap(swap["id"])
        deadline = wall_of(doc["deadline_at"]) - wall_of(doc["activated_at"])
        assert 85 <= deadline <= 100, doc  # spawn + ready take a moment after activation
        sup.client.confirm(swap["id"])
        sup.wait_swap(swap["id"], "confirmed")


CRASH_STEPS = ["probation/stop_old", "probation/snapshot", "probation/spawn_new",
               "rolling_back/stop_new", "rolling_back/restore_code", "rolling_back/restore_data",
               "rolling_back/spawn_old"]  # fmt: skip


# test_crash_points' chain crashes at all of these in the default run: one stays here, the rest slow
@pytest.mark.parametrize("crash_at", [
    step if step == "rolling_back/restore_data" else pytest.param(step, marks=pytest.mark.slow)
    for step in CRASH_STEPS
])  # fmt: skip
def test_a_crash_at_each_step_resumes_and_ends_exact(repo: Path, crash_at: str) -> None:
    with supervised(repo, deadman={"window": "3s", "hard_cap": "20s"}) as sup:
        os.environ["SWAPGUARD_CRASH_AT"] = crash_at
        try:
            sup.start()
        finally:
            del os.environ["SWAPGUARD_CRASH_AT"]
        before_tree = tree_state(repo)
        swap = sup.client.prepare("crash test")
        new_version(repo, {"version": "v2"})
        with contextlib.suppress(NotReachable):
            sup.client.activate(swap["id"])
        assert sup.process is not None
        sup.process.wait(60)
        assert sup.process.returncode == 86, sup.output()[-2000:]
        sup.start(wait_ready=False)
        doc = sup.wait_swap(swap["id"], "rolled_back", timeout=60)
        assert doc["reason"] == "deadline"
        assert tree_state(repo) == before_tree
        sup.wait_host(ready=True)
        db_after = db_dump(repo / "data" / "app.db")
        assert "migrated_v2" not in db_after
        hosts = [p for p in psutil.process_iter(["cwd", "cmdline"])
                 if p.info["cwd"] == str(repo) and "app.py" in (p.info["cmdline"] or [])]
        assert len(hosts) == 1  # never two hosts


def test_undeclared_change_is_guarded(repo: Path) -> None:
    with supervised(repo) as sup:
        sup.start()
        wait_for(lambda: sup.status()["host"]["code_version"], what="a baseline checkpoint")
        before = tree_state(repo)
        write_app(repo, {"version": "v2"})  # nobody declared this
        auto = wait_for(lambda: sup.status()["swap"], what="a guard swap")
        assert auto["state"] == "prepared"
        assert sup.status()["code"]["drift"] is True
        assert "code.drift" in sup.events()
        sup.client.host("restart")  # the next start of the host is on probation
        sup.wait_swap(auto["id"], "probation")
        sup.client.rollback(auto["id"])
        sup.wait_swap(auto["id"], "rolled_back", timeout=40)
        assert tree_state(repo) == before


def test_hooks_get_each_matching_event(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "hook.jsonl"
    hook = [sys.executable, "-c", f"import sys; open({str(out)!r}, 'a').write(sys.stdin.read())"]
    extra = f"[hooks]\non_event = {json.dumps(hook)}\nevents = [\"swap.*\"]\n"
    with supervised(repo, extra=extra) as sup:
        sup.start()
        swap = sup.client.prepare("hooked")
        sup.client.abort(swap["id"])
        sup.wait_swap(swap["id"], "aborted")
        events = wait_for(lambda: out.exists() and [json.loads(line)["event"] for line in
                                                    out.read_text().splitlines()]
                          if out.exists() and "swap.aborted" in out.read_text() else None,
                          what="the hook to see swap.aborted")
        assert events[0] == "swap.prepared" and "swap.aborted" in events
        assert not any(e.startswith("host.") for e in events)


def test_cli_swap_commands(repo: Path) -> None:
    with supervised(repo) as sup:
        sup.start()
        cli = [sys.executable, "-m", "supervisor", "--socket", str(sup.socket)]
        prepared = subprocess.run([*cli, "swap", "prepare", "--summary", "cli"],
                                  capture_output=True, text=True, timeout=30)
        assert prepared.returncode == 0, prepared.stderr
        swap_id = prepared.stdout.strip()
        new_version(repo, {"version": "v2"})
        assert subprocess.run([*cli, "swap", "activate", swap_id], timeout=30).returncode == 0
        sup.wait_swap(swap_id, "probation")
        sup.wait_host(ready=True)
        status = subprocess.run([*cli, "status"], capture_output=True, text=True, timeout=30)
        assert "probation" in status.stdout and "left" in status.stdout
        confirm = subprocess.run([*cli, "swap", "confirm", swap_id], capture_output=True,
                                 text=True, timeout=30)
        assert confirm.returncode == 0, confirm.stderr
        again = subprocess.run([*cli, "swap", "confirm", swap_id], capture_output=True,
                               text=True, timeout=30)
        assert again.returncode == 1 and again.stderr
        listing = subprocess.run([*cli, "swap", "list"], capture_output=True, text=True,
                                 timeout=30)
        assert swap_id in listing.stdout and "confirmed" in listing.stdout


def test_host_control_waits_while_a_swap_step_changes_the_tree(repo: Path) -> None:
    """A `host start` during a build would start a host on a half-built tree: 409 instead."""
    build = [sys.executable, "-c", "import pathlib, time\n"
             "while not pathlib.Path('go.log').exists(): time.sleep(0.02)"]
    with supervised(repo, code={"build": build}) as sup:
        (repo / "go.log").write_text("")
        sup.start()
        (repo / "go.log").unlink()
        swap = sup.client.prepare("slow build")
        new_version(repo, {"version": "v2", "confirm": True})
        sup.client.activate(swap["id"])
        wait_for(lambda: sup.client.swap(swap["id"])["step"] == "build_new", what="the build step")
        for action in ("start", "restart"):
            with pytest.raises(Conflict):
                sup.client.host(action)
        (repo / "go.log").write_text("")
        sup.wait_swap(swap["id"], "confirmed")
