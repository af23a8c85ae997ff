"""A catalogue of hostile new versions, each one small function, driven end to end by one harness.

Each case runs v1 (the sample host) under a real swapguard, prepares a swap, writes v2 into the
tree and activates it; once v2 runs on probation the case does its one hostile thing to the file
system, as the new version would, and nobody confirms. The harness then checks the contract
(issue 12): the rollback begins by min(deadline, hard cap) + 1 s and ends `rolled_back`; code and
data are exact (bytes, modes of files and folders, symlinks, HEAD, branch, index); v1 alone runs;
nothing outside the tree was touched; swapguard still answers at once.

Cases that need a small file system mount a tmpfs (root only; they skip cleanly elsewhere).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import py_compile
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from supervisor.core.instant import wall_of
from tests.support import (
    Supervisor,
    git,
    make_sample_repo,
    report_figure,
    rows,
    supervised,
    wait_for,
)
from tests.test_env_faults import tmpfs
from tests.test_hostile_hosts import (
    ROLLBACK_START_SLACK_S,
    assert_data_exact,
    repo_processes,
    rollback_lateness,
)
from tests.test_swap_e2e import db_dump, new_version, tree_state

WINDOW = "1500ms"
SPARSE_BYTES = 2**30


@dataclass
class Scene:
    """Where a case acts: the repo, its database, and a folder outside the tree."""

    repo: Path
    outside: Path
    db: Path
    swap_id: str = ""
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    attack: Callable[[Scene], None]
    kept: bool = True  # the new version's database is kept beside the restored one
    window: str = WINDOW  # long enough for the attack to be over before the deadline
    end_within: float = 60.0  # seconds from the attack to rolled_back, at the most
    after: Callable[[Supervisor, Scene], None] | None = None  # checks of its own, at the end

    @property
    def id(self) -> str:
        return self.attack.__name__


# --- the hostile versions ------------------------------------------------------------------------


def folder_to_symlink_out_of_the_tree(scene: Scene) -> None:
    shutil.rmtree(scene.repo / "lib")
    (scene.repo / "lib").symlink_to(scene.outside)


def file_to_folder(scene: Scene) -> None:
    (scene.repo / "lib/mod.py").unlink()
    (scene.repo / "lib/mod.py").mkdir()
    (scene.repo / "lib/mod.py/__init__.py").write_text("X = 'a folder now'\n")


def folder_to_file(scene: Scene) -> None:
    shutil.rmtree(scene.repo / "lib/sub")
    (scene.repo / "lib/sub").write_text("a file now\n")


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _unix_socket(path: Path) -> None:
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


def _symlink_out(scene: Scene, path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(scene.outside / "precious.txt")


def fifo_at_the_database(scene: Scene) -> None:
    _fifo(scene.db)


def socket_at_the_database(scene: Scene) -> None:
    _unix_socket(scene.db)


def symlink_at_the_database(scene: Scene) -> None:
    _symlink_out(scene, scene.db)


def fifo_at_the_wal(scene: Scene) -> None:
    _fifo(Path(f"{scene.db}-wal"))


def socket_at_the_wal(scene: Scene) -> None:
    _unix_socket(Path(f"{scene.db}-wal"))


def symlink_at_the_wal(scene: Scene) -> None:
    _symlink_out(scene, Path(f"{scene.db}-wal"))


def data_folder_moved_away_with_a_symlink_left(scene: Scene) -> None:
    moved = scene.outside.parent / "moved-data"
    (scene.repo / "data").rename(moved)
    (scene.repo / "data").symlink_to(moved)
    scene.cleanup.append(lambda: shutil.rmtree(moved, ignore_errors=True))


def chmod_000_on_a_code_folder(scene: Scene) -> None:
    (scene.repo / "lib/sub").chmod(0)
    (scene.repo / "lib/mod.py").chmod(0)


def chmod_000_on_the_data_folder(scene: Scene) -> None:
    (scene.repo / "data").chmod(0)


def files_100k_added(scene: Scene) -> None:
    started = time.monotonic()
    for top in range(100):
        folder = scene.repo / "generated" / f"{top:02}"
        folder.mkdir(parents=True)
        seed = folder / "000.txt"
        seed.write_text(f"generated {top}\n")
        for name in range(1, 1000):
            os.link(seed, folder / f"{name:03}.txt")  # as many paths; git reads every one
    scene.notes["attack_s"] = time.monotonic() - started
    print(f"\n100k files added in {scene.notes['attack_s']:.1f}s")


def index_lock_held_through_the_deadline(scene: Scene) -> None:
    lock = scene.repo / ".git/index.lock"
    lock.write_bytes(b"DIRC a git of the new version, killed mid-write")
    scene.notes["lock"] = lock


def merge_left_in_conflict(scene: Scene) -> None:
    repo = scene.repo
    git(repo, "checkout", "-q", "-b", "side", "HEAD~1")
    (repo / "lib/mod.py").write_text("X = 'side'\n")
    git(repo, "commit", "-qm", "side", "--", "lib/mod.py")
    git(repo, "checkout", "-q", "main")
    (repo / "lib/mod.py").write_text("X = 'main'\n")
    git(repo, "commit", "-qm", "main", "--", "lib/mod.py")
    with contextlib.suppress(subprocess.CalledProcessError):
        git(repo, "merge", "side")
    assert (repo / ".git/MERGE_HEAD").exists()


def _lock_reported_then_released(sup: Supervisor, scene: Scene) -> None:
    lock = scene.notes["lock"]
    assert sup.status()["code"]["index_locked"] == str(lock)
    assert "code.index_locked" in sup.events()
    assert lock.read_bytes().startswith(b"DIRC a git")  # never stolen
    lock.unlink()  # its owner, or an operator, lets go: the index comes back
    wait_for(lambda: sup.status()["code"]["index_locked"] is None, what="the index put back")


def sparse_file_grown(scene: Scene) -> None:
    with open(scene.notes["sparse"], "r+b") as handle:
        handle.seek(SPARSE_BYTES // 2)
        handle.write(b"the new version was here")


def bytecode_shadowing_the_stdlib(scene: Scene) -> None:
    """A sourceless `json.pyc` beside the script (the old version imports json), and an
    unchecked-hash `.pyc` of a module it never changed: generated, never code, and the old
    version would run them."""
    evil = scene.outside.parent / "evil"
    evil.mkdir()
    (evil / "json.py").write_text("raise SystemExit('the new version ran')\n")
    py_compile.compile(str(evil / "json.py"), cfile=str(scene.repo / "json.pyc"), doraise=True)
    (evil / "mod.py").write_text("X = 'the new version ran'\n")
    cached = scene.repo / "lib/__pycache__" / f"mod.{sys.implementation.cache_tag}.pyc"
    unchecked = py_compile.PycInvalidationMode.UNCHECKED_HASH
    py_compile.compile(str(evil / "mod.py"), cfile=str(cached), invalidation_mode=unchecked)
    shutil.rmtree(evil)


def package_folder_0111_shadowing_the_stdlib(scene: Scene) -> None:
    """A folder git's user cannot list is passed over in silence: neither captured nor removed."""
    (scene.repo / "json").mkdir()
    (scene.repo / "json/__init__.py").write_text("raise SystemExit('the new version ran')\n")
    (scene.repo / "json").chmod(0o111)


_SHADOW = "raise SystemExit('the new version ran')\n"


def json_package_hidden_by_its_own_gitignore(scene: Scene) -> None:
    """A `json` package beside the script whose `.gitignore` says `*`: `git add -A` never sees
    it, and `read-tree` never removes an ignored file (review H1)."""
    (scene.repo / "json").mkdir()
    (scene.repo / "json/__init__.py").write_text(_SHADOW)
    (scene.repo / "json/.gitignore").write_text("*\n")


def json_module_hidden_by_info_exclude(scene: Scene) -> None:
    """`.git/info/exclude` is the host's too, and no restore puts it back."""
    with open(scene.repo / ".git/info/exclude", "a") as handle:
        handle.write("json.py\n")
    (scene.repo / "json.py").write_text(_SHADOW)


def json_module_hidden_by_the_tracked_gitignore(scene: Scene) -> None:
    """The drift is seen (.gitignore is tracked) but the ignored file used to survive."""
    with open(scene.repo / ".gitignore", "a") as handle:
        handle.write("json.py\n")
    (scene.repo / "json.py").write_text(_SHADOW)


def _hidden_code_kept_aside(sup: Supervisor, scene: Scene) -> None:
    """Removed from the tree, its content kept in the abandoned tree (v1 runs: `import json`
    was the stdlib's, else the harness would not have seen v1's row)."""
    assert not (scene.repo / "json").exists() and not (scene.repo / "json.py").exists()
    ref = f"refs/swapguard/abandoned/{scene.swap_id}"
    names = git(scene.repo, "ls-tree", "-r", "--name-only", ref).split("\n")
    assert {"json/__init__.py", "json.py"} & set(names), names


def changes_hidden_behind_index_flags(scene: Scene) -> None:
    """assume-unchanged makes `git add` take the index's word for a file, skip-worktree makes
    it refuse the file: a capture through a copy of the index would not see the new script,
    and the restore would leave it (or fail on it)."""
    (scene.repo / "app.py").write_text(_SHADOW)
    git(scene.repo, "update-index", "--assume-unchanged", "app.py")
    (scene.repo / "notes.txt").write_text("the new version was here\n")
    git(scene.repo, "update-index", "--skip-worktree", "notes.txt")


def conversions_planted_in_git_metadata(scene: Scene) -> None:
    """The repo's own metadata, the new version's to write: info/attributes outranks the tree's
    (`eol=crlf` would end every restored line in CR LF, a smudge filter writes what it likes),
    and a sparse checkout would leave what its patterns leave out."""
    (scene.repo / ".git/info/attributes").write_text("* text eol=crlf\n*.py filter=evil\n")
    git(scene.repo, "config", "filter.evil.smudge", "sed s/v1/v2/")
    git(scene.repo, "config", "core.sparseCheckout", "true")
    (scene.repo / ".git/info/sparse-checkout").write_text("/notes.txt\n")
    (scene.repo / "app.py").write_text(_SHADOW)


def gitattributes_that_fail_every_capture(scene: Scene) -> None:
    """An encoding git does not know: every `git add` of the tree fails on it."""
    (scene.repo / ".gitattributes").write_text("* working-tree-encoding=NONSENSE\n")
    (scene.repo / "app.py").write_text(_SHADOW)


def hard_link_to_a_file_outside(scene: Scene) -> None:
    """A file outside, of the same content as a code file of mode 0600: git sees no change, and
    putting the mode back would chmod the file outside."""
    (scene.repo / "lib/sub/secret.txt").unlink()
    os.link(scene.outside / "twin.txt", scene.repo / "lib/sub/secret.txt")


def state_file_system_filled(scene: Scene) -> None:
    filler = scene.notes["state_fs"] / "filler"
    with open(filler, "wb") as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 2**20)
            handle.flush()
            os.fsync(handle.fileno())
    scene.notes["filler"] = filler


CASES = [
    Case(folder_to_symlink_out_of_the_tree),
    pytest.param(Case(file_to_folder), marks=pytest.mark.slow),
    pytest.param(Case(folder_to_file), marks=pytest.mark.slow),
    Case(fifo_at_the_database),
    pytest.param(Case(socket_at_the_database), marks=pytest.mark.slow),
    pytest.param(Case(symlink_at_the_database), marks=pytest.mark.slow),
    pytest.param(Case(fifo_at_the_wal), marks=pytest.mark.slow),
    pytest.param(Case(socket_at_the_wal), marks=pytest.mark.slow),
    Case(symlink_at_the_wal),
    Case(data_folder_moved_away_with_a_symlink_left, kept=False),
    Case(chmod_000_on_a_code_folder),
    pytest.param(Case(chmod_000_on_the_data_folder), marks=pytest.mark.slow),
    pytest.param(
        Case(files_100k_added, window="40s", end_within=150),
        marks=[pytest.mark.slow, pytest.mark.timeout(600)],
    ),
    Case(index_lock_held_through_the_deadline, after=_lock_reported_then_released),
    Case(merge_left_in_conflict),
    Case(bytecode_shadowing_the_stdlib),
    Case(package_folder_0111_shadowing_the_stdlib),
    Case(hard_link_to_a_file_outside),
    Case(changes_hidden_behind_index_flags),
    pytest.param(Case(conversions_planted_in_git_metadata), marks=pytest.mark.slow),
    pytest.param(Case(gitattributes_that_fail_every_capture), marks=pytest.mark.slow),
    Case(json_package_hidden_by_its_own_gitignore, after=_hidden_code_kept_aside),
    Case(json_module_hidden_by_info_exclude, after=_hidden_code_kept_aside),
    Case(json_module_hidden_by_the_tracked_gitignore, after=_hidden_code_kept_aside),
]


# --- the harness ---------------------------------------------------------------------------------


def hostile_repo(root: Path) -> Path:
    """The sample repo with a code folder two deep, committed."""
    repo = make_sample_repo(root)
    (repo / "lib/sub").mkdir(parents=True)
    (repo / "lib/mod.py").write_text("X = 1\n")
    (repo / "lib/sub/deep.txt").write_text("deep\n")
    (repo / "lib/sub/secret.txt").write_text("only mine\n")
    (repo / "lib/sub/secret.txt").chmod(0o600)
    git(repo, "add", "lib")
    git(repo, "commit", "-qm", "lib")
    return repo


def folder_modes(root: Path, skip: tuple[str, ...] = (".git",)) -> dict[str, int]:
    """Mode bits of every real folder under root (git keeps none of them)."""
    found = {}
    for folder, dirs, _ in os.walk(root):
        dirs[:] = [d for d in dirs if not (Path(folder) == root and d in skip)]
        for name in dirs:
            path = Path(folder) / name
            if not path.is_symlink():
                found[path.relative_to(root).as_posix()] = stat.S_IMODE(path.lstat().st_mode)
    return found


def listing(root: Path) -> dict[str, tuple[int, str]]:
    """Everything under a folder outside the tree: mode and content digest (or link target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            content = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            content = ""
        found[str(path.relative_to(root))] = (info.st_mode, content)
    return found


def make_outside(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "precious.txt").write_text("not the host's\n")
    (root / "mod.py").write_text("X = 'outside'\n")
    (root / "sub").mkdir()
    (root / "sub/deep.txt").write_text("outside\n")
    (root / "twin.txt").write_text("only mine\n")  # lib/sub/secret.txt's content, mode 0644
    (root / "twin.txt").chmod(0o644)
    return root


def _holds(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except AssertionError:
        return False


def run_case(
    sup: Supervisor, scene: Scene, case: Case, *, v1_pid: int | None = None, label: str = ""
) -> dict[str, Any]:
    """One hostile version, activated, attacking, rolled back: every check; a line to report."""
    repo, db = scene.repo, scene.db
    before_tree, before_modes = tree_state(repo), folder_modes(repo)
    before_db, before_outside = db_dump(db), listing(scene.outside)
    before_data_mode = stat.S_IMODE((repo / "data").lstat().st_mode)
    began = time.monotonic()
    scene.swap_id = swap_id = sup.client.prepare(f"hostile {case.id}")["id"]
    new_version(repo, {"version": "v2", "behaviour": "ok"})
    sup.client.activate(swap_id)
    wait_for(
        lambda: (
            (s := sup.status())["swap"]["state"] == "probation"
            and s["swap"]["step"] is None
            and s["host"]["ready"]
        ),
        what="v2 on probation",
    )
    case.attack(scene)
    assert sup.client.swap(swap_id)["state"] == "probation", "the attack outlasted the window"
    doc = wait_for(
        lambda: (d := sup.client.swap(swap_id))["state"] in ("rolled_back", "failed") and d,
        timeout=case.end_within,
        what="the rollback to end",
    )
    took = time.monotonic() - began
    if doc["state"] != "rolled_back":
        report_figure(f"{case.id}: NOT rolled back: {doc['state']}")
    assert doc["state"] == "rolled_back", [e for e in doc["events"] if "fail" in e["event"]]
    since_activation, late = rollback_lateness(sup, doc)
    rolled = [wall_of(e["at"]) for e in doc["events"] if e["event"] == "swap.rolled_back"]
    rollback_s = rolled[0] - (wall_of(doc["activated_at"]) + since_activation)
    running = sup.wait_host(ready=True, pid_not=v1_pid)
    wait_for(
        lambda: (
            rows(db, "SELECT version, rolled_back FROM starts ORDER BY id DESC LIMIT 1")
            == [("v1", swap_id)]
        ),
        what="v1 back, told of it",
    )
    if case.after is not None:
        case.after(sup, scene)
    # exact: code (bytes, modes, links, HEAD, branch, index), folders' modes, data; each check
    # is reported before it is asserted, so the figures say what was not exact
    kept = db.with_name(f"app.db.rolled-back-{swap_id}")
    checks = {
        "code": lambda: tree_state(repo) == before_tree,
        "folder modes": lambda: folder_modes(repo) == before_modes,
        "data folder mode": lambda: (
            stat.S_IMODE((repo / "data").lstat().st_mode) == before_data_mode
        ),
        "data": lambda: assert_data_exact(db, before_db, swap_id) is None,
        "kept copy": lambda: os.path.lexists(kept) == case.kept,
        "outside the tree": lambda: listing(scene.outside) == before_outside,
    }
    wrong = [name for name, check in checks.items() if not _holds(check)]
    # one host, and swapguard answers at once
    wait_for(lambda: repo_processes(sup) == {running["pid"]}, what="v1 alone in the repo")
    asked = time.monotonic()
    sup.status()
    answer_s = time.monotonic() - asked
    line = (
        f"{label}{case.id}: rollback began {since_activation:.2f}s after activation "
        f"({late:+.2f}s against the deadline), took {rollback_s:.2f}s to rolled_back "
        f"({took:.1f}s from prepare), {'NOT exact: ' + ', '.join(wrong) if wrong else 'exact'}, "
        f"status answered in {answer_s * 1000:.0f} ms"
    )
    report_figure(line)
    assert not wrong, wrong
    assert late <= ROLLBACK_START_SLACK_S, late
    assert answer_s < 1.0
    return {"pid": running["pid"], "line": line}


@contextlib.contextmanager
def catalogue_supervisor(
    tmp_path: Path, *, extra: str = "", state_parent: Path | None = None, window: str = WINDOW
) -> Iterator[tuple[Supervisor, Scene]]:
    repo = hostile_repo(tmp_path / "repo")
    scene = Scene(repo=repo, outside=make_outside(tmp_path / "outside"), db=repo / "data/app.db")
    host = {
        "stop_timeout": "500ms",
        "env": {"WATCHDOG_USEC": "200000"},  # the sample host then stops within 0.1 s
        "output": str(tmp_path / "host.log"),
    }
    deadman = {"window": window, "hard_cap": "90s", "max_crashes": 2}
    try:
        with supervised(
            repo, host=host, deadman=deadman, extra=extra, state_parent=state_parent
        ) as sup:
            sup.start()
            wait_for(
                lambda: rows(scene.db, "SELECT count(*) FROM starts")[0][0] >= 1,
                what="v1's first row",
            )
            yield sup, scene
    finally:
        for undo in scene.cleanup:
            undo()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_version_is_rolled_back_on_time_and_exact(tmp_path: Path, case: Case) -> None:
    with catalogue_supervisor(tmp_path, window=case.window) as (sup, scene):
        run_case(sup, scene, case)


@pytest.mark.slow
def test_a_sparse_data_file_on_a_small_file_system(tmp_path: Path) -> None:
    """1 GiB, sparse, on a 300 MiB tmpfs: neither the snapshot nor the restore fills the holes."""
    with tmpfs(tmp_path / "small", "size=300m") as small:
        sparse = small / "big.bin"
        with open(sparse, "wb") as handle:
            handle.write(b"head")
            handle.truncate(SPARSE_BYTES)
        digest = hashlib.sha256(sparse.read_bytes()).hexdigest()
        extra = f'[[data]]\npath = "{sparse}"\nkind = "file"\n'
        # state.dir on the same file system: the snapshot is a hard link, the working copy the
        # new version writes to a copy of the data alone, holes kept
        with catalogue_supervisor(tmp_path, extra=extra, state_parent=small) as (sup, scene):
            scene.notes["sparse"] = sparse
            run_case(sup, scene, Case(sparse_file_grown))
            assert hashlib.sha256(sparse.read_bytes()).hexdigest() == digest
            assert sparse.stat().st_blocks * 512 < 64 * 2**20, "the holes were filled"


@pytest.mark.slow
def test_the_state_file_system_full(tmp_path: Path) -> None:
    """The new version fills the file system of state.dir: the rollback still ends exact (the
    filler is the new version's, left where it put it; swapguard needs no space it did not
    hold before)."""
    mount = Path(tempfile.mkdtemp(prefix="sgfs", dir="/tmp"))
    with (
        tmpfs(mount, "size=32m") as state_fs,
        catalogue_supervisor(tmp_path, state_parent=state_fs) as (sup, scene),
    ):
        scene.notes["state_fs"] = state_fs
        run_case(sup, scene, Case(state_file_system_filled))
        assert scene.notes["filler"].exists()


ROUNDS = 5
ROUND_CASES = [
    Case(folder_to_symlink_out_of_the_tree),
    Case(fifo_at_the_database),
    Case(symlink_at_the_wal),
    Case(chmod_000_on_a_code_folder),
    Case(index_lock_held_through_the_deadline, after=_lock_reported_then_released),
]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_hostile_versions_five_times_in_a_row_in_one_supervisor(tmp_path: Path) -> None:
    """No worker, thread or file descriptor leaks from one hostile rollback to the next."""
    with catalogue_supervisor(tmp_path) as (sup, scene):
        assert sup.process is not None
        pid = None
        threads: list[int] = []
        for round_ in range(ROUNDS):
            for case in ROUND_CASES:
                label = f"round {round_ + 1}/{ROUNDS} "
                pid = run_case(sup, scene, case, v1_pid=pid, label=label)["pid"]
            threads.append(len(os.listdir(f"/proc/{sup.process.pid}/task")))
        report_figure(f"five rounds in one supervisor: swapguard's threads after each: {threads}")
        assert threads[-1] <= threads[0] + 2
