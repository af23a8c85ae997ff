"""Generated files in a real git tree: never captured, never drift, cleared by a restore,
unless declared (tracked, re-included); the user's repo and ignore rules stay as they were."""

from __future__ import annotations

import os
import pwd
import py_compile
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from supervisor.cli.main import main
from supervisor.code import generated
from supervisor.code.checkpoint import CodeTree
from supervisor.config.noncode import GENERATED
from tests.test_checkpoint import commit_all, git, init_repo, write

PYC = "pkg/__pycache__/mod.cpython-311.pyc"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A plain Python app with no .gitignore at all."""
    repo = tmp_path / "repo"
    init_repo(repo)
    write(repo / "app.py", "import pkg.mod\n")
    write(repo / "pkg/__init__.py", "")
    write(repo / "pkg/mod.py", "VERSION = 1\n")
    commit_all(repo, "v1")
    return repo


def captured(tree: CodeTree, name: str = "cp") -> set[str]:
    commit = tree.take(name).commit
    return set(filter(None, git(tree.root, "ls-tree", "-r", "--name-only", commit).split("\n")))


def write_generated(repo: Path) -> None:
    write(repo / PYC, "bytecode")
    write(repo / "legacy.pyc", "bytecode")
    write(repo / ".pytest_cache/v/cache/lastfailed", "{}")
    write(repo / "web/node_modules/.cache/babel/x.json", "{}")
    write(repo / ".app.py.swp", "vim")
    (repo / ".#app.py").symlink_to("user@host.1234")  # emacs' lock: a dangling link


def test_generated_files_are_neither_captured_nor_drift(repo: Path) -> None:
    tree = CodeTree(repo)
    before = tree.take("before")
    write_generated(repo)
    assert not tree.differs(before)
    assert tree.changes(before) == []
    assert captured(tree) == {"app.py", "pkg/__init__.py", "pkg/mod.py"}
    write(repo / "pkg/mod.py", "VERSION = 2\n")  # code still is
    assert [c.path for c in tree.changes(before)] == ["pkg/mod.py"]
    assert not (repo / ".gitignore").exists()
    assert git(repo, "config", "--local", "--list").count("excludesfile") == 0
    assert "?? pkg/__pycache__/" in git(repo, "status", "--porcelain")  # the user's view: unchanged


def test_declared_generated_files_are_code(repo: Path) -> None:
    write(repo / "vendor/fast.pyc", "tracked bytecode")
    git(repo, "add", "-f", "vendor/fast.pyc")
    git(repo, "commit", "-q", "-m", "vendor bytecode")
    write(repo / "keep/data.pyc", "re-included")
    write(repo / "tmp/scratch.txt", "scratch")
    tree = CodeTree(repo, ignore=(*GENERATED, "tmp/", "!keep/*.pyc"))
    before = tree.take("before")
    files = captured(tree, "again")
    assert {"vendor/fast.pyc", "keep/data.pyc"} <= files  # tracked; re-included
    assert "tmp/scratch.txt" not in files  # code.ignore
    write(repo / "vendor/fast.pyc", "changed bytecode")
    assert [c.path for c in tree.changes(before)] == ["vendor/fast.pyc"]


def test_extra_paths_leave_their_generated_files_out(repo: Path) -> None:
    write(repo / ".gitignore", "node_modules/\n")
    write(repo / "node_modules/left-pad/index.js", "module.exports = 1\n")
    write(repo / "node_modules/.cache/babel/x.json", "{}")
    write(repo / "node_modules/left-pad/__pycache__/x.pyc", "odd, but generated")
    files = captured(CodeTree(repo, extra_paths=["node_modules"]))
    assert "node_modules/left-pad/index.js" in files
    assert not any(".cache" in f or "__pycache__" in f for f in files)


def test_an_older_checkpoint_holding_generated_files_is_no_drift(repo: Path) -> None:
    write(repo / PYC, "bytecode")
    write(repo / "scratch/x.txt", "x")
    old = CodeTree(repo, ignore=()).take("old")  # as an earlier swapguard took it
    assert PYC in git(repo, "ls-tree", "-r", "--name-only", old.commit)
    assert not CodeTree(repo).differs(old)
    assert not CodeTree(repo, ignore=(*GENERATED, "scratch/")).differs(old)  # a pattern added


def test_the_users_global_excludes_still_apply(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_home = tmp_path / "xdg"
    write(config_home / "git/ignore", "*.secret\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    write(repo / "token.secret", "s3cr3t")
    write(repo / PYC, "bytecode")
    assert captured(CodeTree(repo)) == {"app.py", "pkg/__init__.py", "pkg/mod.py"}


def test_a_restore_clears_untracked_generated_files(repo: Path) -> None:
    """Bytecode is the new version's output: a rollback leaves none of it, for a module it
    rewrote or not; tracked bytecode, tool caches and the user's own `code.ignore` files stay
    (nothing loads them as code)."""
    write(repo / "vendor/fast.pyc", "tracked bytecode")
    git(repo, "add", "-f", "vendor/fast.pyc")
    commit_all(repo, "vendor bytecode")
    tree = CodeTree(repo, ignore=(*GENERATED, "tmp/"))
    write(repo / "pkg/__pycache__/__init__.cpython-311.pyc", "init bytecode")
    write(repo / "tmp/scratch.txt", "the user's, ignored by code.ignore")
    checkpoint = tree.take("v1")
    # the new version: a module of the same size, compiled; a new package, compiled; caches
    write(repo / "pkg/mod.py", "VERSION = 2\n")
    write(repo / PYC, "bytecode of v2")
    write(repo / "newpkg/__init__.py", "")
    write(repo / "newpkg/__pycache__/__init__.cpython-311.pyc", "new bytecode")
    write(repo / ".pytest_cache/v/cache/lastfailed", "{}")
    (repo / "outside.pyc").symlink_to("/etc/passwd")  # a link: removed, never followed
    tree.restore(checkpoint, name="v1")
    assert (repo / "pkg/mod.py").read_text() == "VERSION = 1\n"
    assert not (repo / PYC).exists()
    assert not (repo / "pkg/__pycache__").exists()  # an untouched module's too
    assert not (repo / "newpkg").exists()
    assert (repo / ".pytest_cache/v/cache/lastfailed").exists()
    assert not os.path.lexists(repo / "outside.pyc") and Path("/etc/passwd").exists()
    assert (repo / "vendor/fast.pyc").read_text() == "tracked bytecode"  # declared: code
    assert (repo / "tmp/scratch.txt").exists()  # code.ignore: the user's, as documented
    assert not tree.differs(checkpoint)


def test_the_old_version_never_runs_the_new_versions_bytecode(tmp_path: Path) -> None:
    """The new version drops a sourceless `json.pyc` beside the script (it shadows the stdlib)
    and an unchecked-hash `.pyc` of a module it never changed: the old version must run its own
    code after the rollback."""
    repo = tmp_path / "repo"
    init_repo(repo)
    write(repo / "app.py", "import json, helper\nprint(helper.X, json.dumps(1))\n")
    write(repo / "helper.py", "X = 'old'\n")
    commit_all(repo, "v1")

    def run() -> str:
        done = subprocess.run([sys.executable, "app.py"], cwd=repo, capture_output=True, text=True)
        return done.stdout.strip()

    assert run() == "old 1"
    tree = CodeTree(repo)
    checkpoint = tree.take("v1")
    write(repo / "app.py", "print('new')\n")
    evil = tmp_path / "evil"
    write(evil / "json.py", "def dumps(x): return 'EVIL'\n")
    write(evil / "helper.py", "X = 'EVIL'\n")
    py_compile.compile(str(evil / "json.py"), cfile=str(repo / "json.pyc"))
    py_compile.compile(
        str(evil / "helper.py"),
        cfile=str(repo / "__pycache__" / f"helper.{sys.implementation.cache_tag}.pyc"),
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
    assert [c.path for c in tree.changes(checkpoint)] == ["app.py"]  # bytecode: no drift
    tree.restore(checkpoint, name="v1")
    assert run() == "old 1"


def test_a_restore_repeated_after_a_crash_still_clears_generated_files(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after git rewrote the tree, before the generated files went: the restore that
    runs again finds nothing to rewrite, and must clear them all the same."""
    tree = CodeTree(repo)
    checkpoint = tree.take("v1")
    write(repo / "pkg/mod.py", "VERSION = 2\n")
    write(repo / PYC, "bytecode of v2")

    def crash(*args: object, **kwargs: object) -> list[str]:
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as patch:
        patch.setattr(generated, "clear_generated", crash)
        with pytest.raises(KeyboardInterrupt):
            tree.restore(checkpoint, name="v1")
    assert (repo / "pkg/mod.py").read_text() == "VERSION = 1\n" and (repo / PYC).exists()
    CodeTree(repo).restore(checkpoint, name="v1")
    assert not (repo / PYC).exists()


def test_a_restore_needs_no_room_from_generated_files(repo: Path) -> None:
    """The new version turned the file `tool` into a package and ran it: the restore must put
    the file back where a folder of bytecode now is."""
    write(repo / "tool", "#!/bin/sh\n")
    commit_all(repo, "tool")
    tree = CodeTree(repo)
    checkpoint = tree.take("v1")
    os.unlink(repo / "tool")
    write(repo / "tool/__init__.py", "")
    write(repo / "tool/__pycache__/__init__.cpython-311.pyc", "bytecode")
    tree.restore(checkpoint, name="v1")
    assert (repo / "tool").read_text() == "#!/bin/sh\n"
    assert not tree.differs(checkpoint)


def test_init_and_check_point_out_untracked_files_that_look_generated(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write(repo / "build/out.js", "built")
    write(repo / "app.log", "log")
    write(repo / PYC, "bytecode")  # generated, and handled: nothing to say
    write(repo / "dist/bundle.js", "tracked: the host's")
    git(repo, "add", "dist/bundle.js")
    monkeypatch.chdir(repo)
    assert main(["init", "--", "python3", "app.py"]) == 0
    said = capsys.readouterr().err
    assert "looks generated: app.log, build/ (in" in said and "code.ignore" in said
    assert main(["check"]) == 0
    assert "looks generated: app.log, build/ (in" in capsys.readouterr().err
    (repo / "swapguard.toml").write_text(
        (repo / "swapguard.toml").read_text().replace("ignore = []", 'ignore = ["*.log", "build/"]')
    )
    assert main(["check"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
def test_as_root_a_root_only_file_named_as_excludes_file_is_never_read(tmp_path: Path) -> None:
    """The tree's owner (or a new version) can point core.excludesFile anywhere; swapguard, as
    root, must not copy a file that owner could not read into one the owner can."""
    nobody = pwd.getpwnam("nobody")
    shared = Path(tempfile.mkdtemp(prefix="swapguard-test-"))
    try:
        shared.chmod(0o755)
        secret = shared / "root-only"
        secret.write_text("*.txt\n")
        secret.chmod(0o600)
        repo = shared / "repo"
        init_repo(repo)
        write(repo / "app.py", "v1\n")
        commit_all(repo, "v1")
        git(repo, "config", "core.excludesFile", str(secret))
        write(repo / "notes.txt", "code")
        subprocess.run(["chown", "-R", f"{nobody.pw_uid}:{nobody.pw_gid}", str(repo)], check=True)
        assert "notes.txt" in captured(CodeTree(repo))  # its pattern never applied
        secret.chmod(0o644)  # readable by all: git as the owner would have read it too
        assert "notes.txt" not in captured(CodeTree(repo), "again")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_restore_keeps_backups_in_an_undeclared_ignored_data_folder(tmp_path: Path) -> None:
    """Editor and backup names are no code: a rollback leaves them, and it never walks into a
    folder that was ignored at the checkpoint (review M1)."""
    repo = tmp_path / "repo"
    init_repo(repo)
    write(repo / ".gitignore", "data/\n")
    write(repo / "app.py", "print('v1')\n")
    commit_all(repo, "v1")
    write(repo / "data/ledger.db~", "the operator's backup\n")
    write(repo / "data/.coverage.host1", "x\n")
    write(repo / "data/__pycache__/old.cpython-311.pyc", "bytecode in a data folder\n")
    write(repo / "notes.txt~", "an editor's backup\n")
    tree = CodeTree(repo)
    checkpoint = tree.take("v1")
    write(repo / "app.py", "print('v2')\n")
    write(repo / "__pycache__/app.cpython-311.pyc", "v2 bytecode\n")
    tree.restore(checkpoint, name="v1")
    assert (repo / "data/ledger.db~").read_text() == "the operator's backup\n"
    assert (repo / "data/.coverage.host1").exists()
    assert (repo / "data/__pycache__/old.cpython-311.pyc").exists()
    assert (repo / "notes.txt~").exists()
    assert not (repo / "__pycache__").exists()
