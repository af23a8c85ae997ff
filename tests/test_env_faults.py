"""Faults of the environment around the real daemon: a read-only state dir, a full disk during a
snapshot, git without an identity, a stale `.git/index.lock` (before a prepare and in the middle
of a rollback), and the wall clock jumping during probation.

Mounts need root and a kernel that allows them here; each test that needs one skips cleanly
without it. The clock test needs libfaketime: the test extra installs python-libfaketime, which
ships the preload library; a system libfaketime (apt-get install faketime) serves as well.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from supervisor.errors import SwapguardError
from tests.support import Supervisor, git, make_sample_repo, rows, supervised, wait_for
from tests.test_hostile_input import observe
from tests.test_swap_e2e import db_dump, new_version, tree_state

SYSTEM_FAKETIME_LIBS = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/local/lib/faketime/libfaketimeMT.so.1",
)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_sample_repo(tmp_path / "repo")


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `where` for the block; skip the test where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


@contextlib.contextmanager
def environment(**changes: str | None) -> Iterator[None]:
    """Set (or, with None, remove) variables for what is started inside the block."""
    saved = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def host_processes(repo: Path) -> list[psutil.Process]:
    found: list[str] = []
    for proc in psutil.process_iter(["cwd", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["cwd"] == str(repo) and "app.py" in (proc.info["cmdline"] or []):
                found.append(proc)
    return found


def wait_on_probation(sup: Supervisor) -> dict:
    """The swap once the new version runs on probation (its deadline is set then)."""
    return wait_for(
        lambda: (
            (s := sup.status()["swap"]) and s["state"] == "probation" and s["step"] is None and s
        ),
        what="the new version on probation",
    )


def swap_events(sup: Supervisor, swap_id: str) -> list[dict]:
    return sup.client.swap(swap_id)["events"]


# --- the state dir -------------------------------------------------------------------------------


@pytest.mark.parametrize("inside", [True, False], ids=["state-dir-below-ro-mount", "ro-mount"])
def test_unwritable_state_dir_refuses_to_start_and_touches_nothing(
    repo: Path, tmp_path: Path, inside: bool
) -> None:
    before = tree_state(repo)
    with tmpfs(tmp_path / "ro", "ro,size=1m,mode=0700") as readonly:
        state = readonly / "state" if inside else readonly
        config = tmp_path / "swapguard.toml"
        config.write_text(
            f'[host]\ncommand = ["{sys.executable}", "app.py"]\ncwd = "{repo}"\n'
            f'[code]\nroot = "{repo}"\n[control]\nsocket = "{tmp_path / "c.sock"}"\n'
            f'[state]\ndir = "{state}"\n'
        )
        run = subprocess.run(
            [sys.executable, "-m", "supervisor", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode not in (0, None), run.stderr
        last = run.stderr.strip().splitlines()[-1]
        assert "Read-only file system" in last and str(readonly) in last, run.stderr
        assert list(readonly.iterdir()) == []
    assert not (tmp_path / "c.sock").exists()
    assert not (repo / "data").exists()  # the host never started
    assert host_processes(repo) == []
    assert tree_state(repo) == before


# --- a full disk during the snapshot ------------------------------------------------------------


def big_database(db: Path) -> Path:
    """3 MiB of data in WAL mode: more than the 2 MiB tmpfs the snapshots get."""
    db.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=wal")
        conn.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB)")
        conn.executemany(
            "INSERT INTO blobs (data) VALUES (?)", [(os.urandom(64 * 1024),) for _ in range(48)]
        )
    return db


def test_disk_full_during_the_snapshot_fails_the_activation_cleanly(repo: Path) -> None:
    """The space check before the host stops passes (3 MiB of data, 12 MiB free); then the
    old version writes 12 MiB more as it stops: the snapshot step, checking again before it
    copies a byte (or the copy, at ENOSPC, where something else fills the disk meanwhile), fails
    the activation, and the old version runs again on its data as it left it."""
    db = big_database(repo / "data" / "app.db")
    config = json.loads((repo / "app.json").read_text())
    (repo / "app.json").write_text(json.dumps({**config, "flush_on_stop_bytes": 12 << 20}))
    git(repo, "commit", "-qam", "v1 flushes at stop")
    with supervised(repo) as sup:  # noqa: SIM117 - the mount point is inside the state dir
        with tmpfs(sup.state / "snapshots", "size=12m,mode=0700") as snapshots:
            sup.start()
            old_pid = sup.status()["host"]["pid"]
            swap = sup.client.prepare("too big to snapshot once the old version flushed")
            before_tree = tree_state(repo)
            new_version(repo, {"version": "v2"})
            sup.client.activate(swap["id"])
            doc = sup.wait_swap(swap["id"], "rolled_back", timeout=40)
            assert doc["reason"] == "activation_failed"
            started = next(e for e in doc["events"] if e["event"] == "swap.rollback_started")
            error = started["detail"]["error"].lower()
            assert "no space left on device" in error or "not enough disk space" in error, started
            assert str(db) in started["detail"]["error"], started
            assert tree_state(repo) == before_tree
            host = sup.wait_host(ready=True, pid_not=old_pid)
            wait_for(
                lambda: (
                    rows(db, "SELECT version, rolled_back FROM starts ORDER BY id DESC LIMIT 1")
                    == [("v1", swap["id"])]
                ),
                what="v1 to run again",
            )
            after = db_dump(db)
            assert len(after["blobs"]) == 48  # the data as the old version left it
            assert all(row[1] == "v1" for row in after["starts"])  # v2 never ran
            assert [p.pid for p in host_processes(repo)] == [host["pid"]]
            # nothing half-written is left to fill the disk for the next swap
            wait_for(
                lambda: shutil.disk_usage(snapshots).used < 256 * 1024,
                what="the partial snapshot to be removed",
            )
            assert sup.stop() == 0


def test_disk_full_message_names_the_file_that_did_not_fit(tmp_path: Path) -> None:
    from supervisor.data.snapshot import SnapshotStore
    from supervisor.errors import SnapshotError

    db = big_database(tmp_path / "data" / "app.db")
    with (
        tmpfs(tmp_path / "snapshots", "size=2m,mode=0700") as snapshots,
        pytest.raises(SnapshotError) as full,
    ):
        SnapshotStore(snapshots).take("s1", [(db, "sqlite")])
    message = full.value.message
    assert "no space left on device" in message and str(db) in message
    assert "(None)" not in message, message


# --- git without an identity ---------------------------------------------------------------------


def test_prepare_and_rollback_need_no_git_identity(repo: Path, tmp_path: Path) -> None:
    home = tmp_path / "empty-home"
    home.mkdir()
    git(repo, "config", "user.useConfigOnly", "true")  # no guessing from the host name either
    identityless = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": None,
        "GIT_AUTHOR_EMAIL": None,
        "GIT_COMMITTER_NAME": None,
        "GIT_COMMITTER_EMAIL": None,
        "EMAIL": None,
    }
    with environment(**identityless):
        tree = subprocess.run(
            ["git", "-C", str(repo), "write-tree"], capture_output=True, text=True, check=True
        ).stdout.strip()
        bare = subprocess.run(
            ["git", "-C", str(repo), "commit-tree", "-m", "x", tree], capture_output=True, text=True
        )
        assert bare.returncode != 0, "this environment still gives git an identity"
        with supervised(repo) as sup:
            sup.start()
            before = tree_state(repo)
            swap = sup.client.prepare("no identity anywhere")
            new_version(repo, {"version": "v2"})
            sup.client.activate(swap["id"])
            sup.wait_swap(swap["id"], "probation")
            sup.client.rollback(swap["id"])
            sup.wait_swap(swap["id"], "rolled_back", timeout=40)
            assert tree_state(repo) == before
            assert "new version" in git(repo, "log", "--all", "--format=%s")


# --- a stale index.lock --------------------------------------------------------------------------


def test_stale_index_lock_refuses_prepare_and_changes_nothing(repo: Path) -> None:
    with supervised(repo) as sup:
        sup.start()
        before_tree, before = tree_state(repo), observe(sup)
        lock = repo / ".git" / "index.lock"
        lock.write_text("")
        with pytest.raises(SwapguardError) as refused:
            sup.client.prepare("while git is busy")
        assert "index.lock" in refused.value.message, refused.value.message
        assert type(refused.value).http_status in (409, 500)
        after = observe(sup)
        assert after["code"].pop("foreign_locks") == [str(lock)]  # reported, and nothing else
        before["code"].pop("foreign_locks")
        assert after == before
        assert lock.exists() and lock.read_text() == ""  # not ours to remove
        lock.unlink()
        assert tree_state(repo) == before_tree
        sup.client.prepare("once git is done")  # and nothing was left half-done


def test_an_index_lock_held_during_probation_does_not_hold_the_rollback(repo: Path) -> None:
    """Issue 12: the old code comes back without git's index while somebody else holds
    index.lock; the lock is reported, never removed, and the index follows once it goes."""
    with supervised(repo, deadman={"window": "2s", "hard_cap": "30s"}) as sup:
        sup.start()
        before_tree, db = tree_state(repo), repo / "data" / "app.db"
        swap = sup.client.prepare("rollback meets a stale lock")
        new_version(repo, {"version": "v2"})
        sup.client.activate(swap["id"])
        wait_on_probation(sup)
        lock = repo / ".git" / "index.lock"
        lock.write_text("")  # before the deadline: the rollback's restore_code will meet it
        doc = sup.wait_swap(swap["id"], "rolled_back", timeout=40)
        assert doc["reason"] == "deadline"
        assert "code.index_locked" in [e["event"] for e in doc["events"]]
        assert sup.status()["code"]["index_locked"] == str(lock)
        assert lock.exists() and lock.read_text() == ""  # not ours to remove
        sup.wait_host(ready=True)
        wait_for(
            lambda: (
                rows(db, "SELECT version, rolled_back FROM starts ORDER BY id DESC LIMIT 1")
                == [("v1", swap["id"])]
            ),
            what="v1 to run again",
        )
        assert "migrated_v2" not in db_dump(db)
        lock.unlink()
        wait_for(lambda: sup.status()["code"]["index_locked"] is None, what="the index back")
        assert tree_state(repo) == before_tree


# --- the wall clock jumps during probation -------------------------------------------------------


def faketime_libraries() -> list[str]:
    """Preload libraries to try: python-libfaketime's own first (the test extra installs it, so
    CI has it too), then a system libfaketime's."""
    found: list[str] = []
    with contextlib.suppress(ImportError, RuntimeError):
        import libfaketime  # python-libfaketime: ships a built libfaketime.so.1

        _, additions = libfaketime.get_reload_information()
        directory = additions.get("LD_LIBRARY_PATH")
        name = additions.get("LD_PRELOAD", "").split(":")[0]
        if directory and name:
            found.append(str(Path(directory) / name))
    return found + [lib for lib in SYSTEM_FAKETIME_LIBS if Path(lib).exists()]


def fakes_the_clock(library: str) -> bool:
    """Whether `library` loads here and moves a child's wall clock (a bundled build may be for
    another architecture, which the loader ignores with a warning)."""
    if not Path(library).is_file():
        return False
    probe = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"],
        env={**os.environ, "LD_PRELOAD": library, "FAKETIME": "+100d", "DONT_FAKE_MONOTONIC": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    with contextlib.suppress(ValueError):
        return probe.returncode == 0 and float(probe.stdout) > time.time() + 50 * 86400
    return False


@pytest.mark.slow  # ~10 s: it waits out a real 8 s deadline on a daemon slowed by libfaketime
def test_wall_clock_jumps_do_not_move_the_deadline(repo: Path, tmp_path: Path) -> None:
    library = next((lib for lib in faketime_libraries() if fakes_the_clock(lib)), None)
    if library is None:
        pytest.skip(
            "no working libfaketime: neither python-libfaketime (the test extra) nor "
            "a system one (apt-get install faketime)"
        )
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    faked = {
        "LD_PRELOAD": library,
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_CACHE_DURATION": "1",  # re-read the offset once a second, not per call
        "DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_SKIP_CMDS": "git",
    }  # git needs no fake clock, and is slow with one
    # Only the daemon runs on the faked clock: libfaketime breaks time.sleep (EINVAL) in the host
    host = {"env": {"LD_PRELOAD": ""}}
    # the window leaves room for the jumps and their checks on a loaded machine, where the daemon
    # on the fake clock may take a second or two to answer
    with supervised(repo, host=host, deadman={"window": "8s", "hard_cap": "60s"}) as sup:
        with environment(**faked):
            sup.start()
        daemon = psutil.Process(sup.process.pid if sup.process else 0)
        assert daemon.environ().get("LD_PRELOAD") == library
        swap = sup.client.prepare("clock jumps")
        new_version(repo, {"version": "v2"})
        sup.client.activate(swap["id"])
        wait_on_probation(sup)
        running, asked, answered = _timed_swap(sup)
        # the real deadline, by our own clock: the daemon counted remaining_s between asked and
        # answered, so it is due between these two instants
        due = (asked + running["remaining_s"], answered + running["remaining_s"])
        wall_before = time.time()
        offset.write_text("+3600\n")  # an hour forward: the deadline must not pass now
        wait_for(lambda: _daemon_wall(sup) > wall_before + 3000, what="the jump forward")
        _assert_due_at(sup, due)
        offset.write_text("-3600\n")  # and an hour back: the deadline must not move away
        wait_for(lambda: _daemon_wall(sup) < time.time() - 3000, what="the jump back")
        _assert_due_at(sup, due)
        changed = wait_for(
            lambda: sup.client.swap(swap["id"])["state"] != "probation" and time.monotonic(),
            timeout=30,
            interval=0.02,
            what="the rollback at the real deadline",
        )
        assert changed >= due[0] - 0.3, f"rolled back {due[0] - changed:.2f}s before the deadline"
        assert changed <= due[1] + 5, f"rolled back {changed - due[1]:.2f}s after the deadline"
        # exactly, by the daemon's own record: both instants on the boot clock, which never jumps
        record = _stored_swap(sup, swap["id"])
        late = record["rollback_started_at"]["boot"] - record["deadline"]["boot"]
        assert record["reason"] == "deadline" and 0 <= late <= 1.0, late


def _stored_swap(sup: Supervisor, swap_id: str) -> dict:
    found = rows(sup.state / "state.db", f"SELECT record FROM swap WHERE id = '{swap_id}'")
    return json.loads(found[0][0])


def _timed_swap(sup: Supervisor) -> tuple[dict, float, float]:
    """The swap from one status call, with our clock just before and just after the call: a
    loaded daemon may answer a while after it counted the time left."""
    asked = time.monotonic()
    swap = sup.status()["swap"]
    return swap, asked, time.monotonic()


def _assert_due_at(sup: Supervisor, due: tuple[float, float]) -> None:
    """Still on probation, with the time left counted on the real clock: within 1 s, beyond
    what we cannot know of when the daemon counted it."""
    swap, asked, answered = _timed_swap(sup)
    assert swap["state"] == "probation", swap
    earliest, latest = due[0] - answered, due[1] - asked
    assert earliest - 1.0 < swap["remaining_s"] < latest + 1.0, (swap, earliest, latest)


def _daemon_wall(sup: Supervisor) -> float:
    """The daemon's idea of the wall clock, from the Date header of its answer."""
    import http.client
    import socket
    from email.utils import parsedate_to_datetime

    class Connection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(str(sup.socket))

    connection = Connection("swapguard")
    try:
        connection.request("GET", "/v1/status")
        response = connection.getresponse()
        response.read()
        return parsedate_to_datetime(response.getheader("Date", "")).timestamp()
    finally:
        connection.close()
