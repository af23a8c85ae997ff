"""The daemon's memory footprint: glibc's malloc settings, trims, refused imports.

The malloc tests run in a child interpreter each (mallopt settings are for the whole process and
cannot be undone), with threads and buffers shaped like the daemon's: a fresh thread per snapshot
with a 1 MiB hash buffer, several at once.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from supervisor.daemon import footprint
from supervisor.data.datacopy import tree_digest
from supervisor.state.models import SCHEMA_VERSION
from supervisor.state.store import CACHE_KIB, Store
from tests.support import make_sample_repo, supervised, write_app

MiB = 2**20

# Given to every child by run_python: the child's anonymous RSS in bytes.
ANON_BYTES = """
def anon_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
"""

# Eight threads alive at once each fill and free a 1 MiB buffer, after one such buffer freed on
# the main thread has raised glibc's mmap threshold. Prints the anonymous RSS they left behind.
ARENA_BURST = """
import sys, threading
from supervisor.daemon import footprint

if sys.argv[1] == "tuned":
    assert footprint.tune_malloc()
block = b"x" * (1 << 20)  # mmapped, then freed: glibc raises its threshold past 1 MiB
del block
before = anon_bytes()
barrier = threading.Barrier(8)

def burst():
    buffer = b"y" * (1 << 20)  # filled, so every page is resident
    barrier.wait()  # all eight at once: each thread takes an arena of its own
    del buffer

for _ in range(3):
    threads = [threading.Thread(target=burst) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
print(anon_bytes() - before)
"""


def run_python(source: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", ANON_BYTES + textwrap.dedent(source), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# --- glibc malloc ---------------------------------------------------------------------------


def test_tuned_malloc_gives_back_what_threads_freed() -> None:
    """The soak's growth in miniature: untuned, each thread's arena keeps its freed megabyte."""
    untuned = int(run_python(ARENA_BURST, "untuned"))
    tuned = int(run_python(ARENA_BURST, "tuned"))
    print(
        f"\nleft behind by 3 x 8 threads: untuned {untuned / MiB:.1f} MiB, tuned {tuned / MiB:.1f}"
    )
    assert tuned < 1 * MiB
    assert untuned > tuned + 2 * MiB  # else the test no longer shows what the tuning is for


def test_malloc_calls_report_whether_they_applied() -> None:
    """glibc here: the settings apply (elsewhere both calls are no-ops answering False)."""
    source = "from supervisor.daemon import footprint\nprint(footprint.tune_malloc())\n"
    assert run_python(source).split() == ["True"]


# --- refused imports -----------------------------------------------------------------------


def test_refusing_an_imported_module_changes_nothing() -> None:
    footprint.keep_out_of_process(("json",))
    assert sys.modules["json"] is json


def test_a_module_kept_out_cannot_be_imported() -> None:
    name = "footprint_probe_never"
    footprint.keep_out_of_process((name,))
    try:
        with pytest.raises(ImportError):
            __import__(name)
    finally:
        sys.modules.pop(name, None)


def test_a_new_store_is_made_without_peewees_other_databases(tmp_path: Path) -> None:
    """The daemon keeps playhouse's CockroachDB support out: the migrator a new store replays its
    steps with imports it (and Postgres' extensions, a connection pool) only if it is there."""
    source = (
        "import sys\n"
        "from pathlib import Path\n"
        "from supervisor.daemon import footprint\n"
        "footprint.keep_out_of_process()\n"
        "from supervisor.state.store import Store\n"
        "with Store.open(Path(sys.argv[1])) as store:\n"
        "    print(store._db.pragma('user_version'))\n"
        "assert 'playhouse.migrate' in sys.modules, 'no step was replayed'\n"
        "assert sys.modules['playhouse.cockroachdb'] is None\n"
        "assert 'playhouse.postgres_ext' not in sys.modules\n"
        "assert 'playhouse.pool' not in sys.modules\n"
    )
    assert run_python(source, str(tmp_path / "state")).split() == [str(SCHEMA_VERSION)]


def test_a_module_loaded_on_first_use_is_the_real_one_from_its_first_attribute() -> None:
    source = (
        "import sys\n"
        "from supervisor.daemon import footprint\n"
        "footprint.load_on_first_use(('hashlib',))\n"
        "import hashlib, peewee\n"
        "assert '_hashlib' not in sys.modules, 'loaded by peewee\\'s import'\n"
        "print(hashlib.sha256(b'x').hexdigest(), hashlib.md5(b'x').hexdigest())\n"
        "assert '_hashlib' in sys.modules and sys.modules['hashlib'] is not hashlib\n"
    )
    assert run_python(source).split() == [
        hashlib.sha256(b"x").hexdigest(),
        hashlib.md5(b"x").hexdigest(),
    ]


def test_builtin_sha256_is_hashlibs() -> None:
    for data in (b"", b"/var/lib/swapguard", bytes(range(256)) * 9):
        assert footprint.builtin_sha256_hex(data) == hashlib.sha256(data).hexdigest()


# --- the store's page cache -----------------------------------------------------------------


def test_the_store_bounds_its_page_cache(tmp_path: Path) -> None:
    with Store.open(tmp_path / "state") as store:
        # cache_size is the connection's own: ask the store's (private) database
        assert store._db.pragma("cache_size") == -CACHE_KIB
        assert store._db.pragma("journal_mode") == "wal"


# --- the daemon -----------------------------------------------------------------------------


def mapped(pid: int, library: str) -> bool:
    with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as maps:
        return any(f"/{library}" in line for line in maps)


def test_the_daemon_loads_openssl_only_to_hash_a_snapshot(tmp_path: Path) -> None:
    """At rest: neither libssl nor libcrypto (3 MiB), although peewee imports hashlib at its top;
    psutil is there, as the source of process facts. The first hashed snapshot (a `dir` data entry)
    imports hashlib for real, and its digest is hashlib's."""
    repo = make_sample_repo(tmp_path / "repo")
    assets = repo / "data" / "assets"
    assets.mkdir(parents=True)
    (assets / "a.bin").write_bytes(bytes(range(256)) * 64)
    (assets / "b.txt").write_text("assets\n")
    extra = f'[[data]]\npath = "{assets}"\nkind = "dir"\n'
    with supervised(repo, extra=extra) as sup:
        sup.start()
        assert sup.process is not None
        pid = sup.process.pid
        assert not mapped(pid, "libssl.so") and not mapped(pid, "libcrypto.so")
        assert mapped(pid, "_psutil_linux")  # process facts are psutil's (process.proctree)
        swap_id = sup.client.prepare("hash the assets")["id"]
        write_app(repo, {"version": "v2", "confirm": True})
        sup.client.activate(swap_id)
        doc = sup.wait_swap(swap_id, "confirmed")
        snapshot = next(item for item in doc["data"] if item["path"] == str(assets))
        index = [item["path"] for item in doc["data"]].index(str(assets))
        assert snapshot["sha256"] == tree_digest(sup.state / "snapshots" / swap_id / str(index))[1]
        assert mapped(pid, "libcrypto.so")
        assert not mapped(pid, "libssl.so")
