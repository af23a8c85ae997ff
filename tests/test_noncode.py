"""The matcher of generated files agrees with git on the same patterns, and bad `code.ignore`
patterns are refused with the reason."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from supervisor.config.noncode import GENERATED, LOOKS_GENERATED, IgnoreRules, pattern_problem

FILES = [
    "app.py",
    "pkg/__init__.py",
    "pkg/__pycache__/__init__.cpython-311.pyc",
    "pkg/sub/__pycache__/m.cpython-311.opt-1.pyc",
    "legacy.pyc",
    "legacy.pyo",
    "legacy.pyd",
    "notes.txt~",
    ".app.py.swp",
    "pkg/.m.py.swo",
    "swp.swp",
    ".#app.py",
    "#app.py#",
    "4913",
    "x4913",
    ".DS_Store",
    ".pytest_cache/v/cache/lastfailed",
    "sub/.mypy_cache/3.11/x.json",
    ".coverage",
    ".coverage.host.123",
    "node_modules/.cache/babel/x.json",
    "node_modules/left-pad/index.js",
    "web/node_modules/.cache/x",
    "a/b/c/deep.log",
    "logs/today.log",
    "keep/me.log",
    "docs/build/index.html",
    "build/out.js",
    "abc/x/y.txt",
    "abc/keep.txt",
    "a/x/y/b",
    "a/b",
    "q1.txt",
    "qq.txt",
    "brackets/[x].txt",
    "brackets/x.txt",
    "dash-a.txt",
    "dash/a.txt",
    "star*name.txt",
    "only/dir/file",
    "only/dir",
]

PATTERN_SETS = [
    list(GENERATED),
    list(LOOKS_GENERATED),
    ["*.log", "!keep/*.log"],
    ["/build/", "abc/**", "!abc/keep.txt", "a/**/b"],
    ["q?.txt", "brackets/[[]x].txt", "dash[-_]a.txt", "star\\*name.txt"],
    ["**/deep.log", "only/dir", "dir/"],
    ["**/dir", "[!a-c]*.txt", "[^q]*"],
    [*GENERATED, "!__pycache__/", "!*.py[co]"],
]


def _git_ignored(root: Path, patterns: list[str]) -> set[str]:
    (root.parent / "excludes").write_text("\n".join(patterns) + "\n")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "-o", "-i", f"--exclude-from={root.parent / 'excludes'}"],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return set(filter(None, listed.split("\0")))


@pytest.mark.parametrize("patterns", PATTERN_SETS, ids=lambda p: " ".join(p)[:40])
def test_the_matcher_agrees_with_git(tmp_path: Path, patterns: list[str]) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    files = [f for f in FILES if not any(other.startswith(f + "/") for other in FILES)]
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    rules = IgnoreRules(patterns)
    ours = {name for name in files if rules.matches(name)}
    assert ours == _git_ignored(root, patterns)


def test_folders_match_folder_patterns() -> None:
    rules = IgnoreRules(GENERATED)
    assert rules.matches("pkg/__pycache__", is_dir=True)
    assert not rules.matches("pkg/__pycache__")  # a file of that name is code
    assert rules.matches("pkg/__pycache__/m.pyc")
    assert not rules.matches("pkg/app.py")
    assert not rules.matches("node_modules/left-pad/index.js")


@pytest.mark.parametrize(
    ("pattern", "says"),
    [
        ("", "blank"),
        ("   ", "blank"),
        ("# note", "comment"),
        ("dist ", "whitespace"),
        (" dist", "whitespace"),
        ("a\nb", "one line"),
        ("!", "matches nothing"),
        ("/", "matches nothing"),
        ("x\\", "backslash"),
        ("[abc", "unterminated"),
        ("[[:alpha:]]", "character classes"),
        ("[z-a]", "backwards"),
    ],
)
def test_a_bad_pattern_is_refused_with_the_reason(pattern: str, says: str) -> None:
    problem = pattern_problem(pattern)
    assert problem is not None and says in problem


def test_the_built_in_lists_are_valid() -> None:
    for pattern in (*GENERATED, *LOOKS_GENERATED, "\\#x", "!*.pyc", "a/**/b"):
        assert pattern_problem(pattern) is None, pattern
