"""Generated files are not code: the built-in ignore list, `code.ignore` patterns, and a matcher.

Why: interpreters and tools write bytecode and caches beside the code (Python's `__pycache__`
above all). Were they code, the first import after a start would read as an undeclared change,
the drift guard would prepare a swap, the next start would go on probation and roll back, and
the bytecode would be written again: a loop. So they are neither drift nor checkpointed.

Rules of this module:
- One definition. The patterns (`GENERATED` then the user's `code.ignore`, gitignore syntax,
  relative to the code root) are handed to git as an excludes file for the checkpoints, and
  `IgnoreRules` matches the same patterns in the code watcher, with git's semantics for the
  syntax that validation lets through (tests compare it with git itself).
- "Unless declared": a path the user's index tracks is code whatever it matches (git never
  applies ignore rules to tracked files), a `.gitignore` negation (`!*.pyc`) re-includes, and so
  does a `!pattern` in `code.ignore` (it comes after the built-ins).
- Pure: no file is read here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

GENERATED: tuple[str, ...] = (
    # Python
    "__pycache__/",
    "*.py[co]",
    ".pytest_cache/",
    ".mypy_cache/",
    ".ruff_cache/",
    ".hypothesis/",
    ".coverage",
    ".coverage.*",
    # JavaScript tooling caches (node_modules itself is code when tracked or listed)
    "**/node_modules/.cache/",
    ".eslintcache",
    # editors and desktops: vim swap, backup and write-test files, emacs locks and autosaves
    ".*.sw[a-p]",
    "*~",
    "4913",
    ".#*",
    "\\#*#",
    ".DS_Store",
)
"""Bytecode, tool caches and editor files that are never code unless declared."""

CLEARED: tuple[str, ...] = ("__pycache__/", "*.py[co]", "**/node_modules/.cache/")
"""What a restore removes wherever it is untracked (outside excluded paths and folders already
ignored at the checkpoint): what an interpreter or a build tool loads. Editor and backup files
are left alone: they run nowhere, and a backup in a data folder is the user's."""

LOOKS_GENERATED: tuple[str, ...] = (
    "build/",
    "dist/",
    "out/",
    "target/",
    "coverage/",
    "htmlcov/",
    ".next/",
    ".nuxt/",
    ".tox/",
    ".nox/",
    ".venv/",
    "venv/",
    "node_modules/",
    "*.log",
    "*.o",
    "*.so",
    "*.class",
    "*.tmp",
)
"""Paths that often are build output, logs or environments, but may be what the host runs:
not ignored, only pointed out by `init` and `check` when untracked and not ignored (each change
there is drift, and a big folder makes every checkpoint slow)."""


def pattern_problem(text: str) -> str | None:
    """Why `text` is no `code.ignore` pattern swapguard accepts, or None. Kept to the gitignore
    syntax whose meaning is plain (and that `IgnoreRules` matches exactly as git does)."""
    if not text.strip():
        return "must not be blank"
    if any(char in text for char in "\0\r\n"):
        return "must be one line (no NUL, CR or LF)"
    if text != text.strip():
        return "must not start or end with whitespace (git would trim the end)"
    if text.startswith("#"):
        return r"starts with '#', a comment in gitignore syntax; write '\#' for a literal '#'"
    body = text[1:] if text.startswith("!") else text
    if not body.strip("/"):
        return "matches nothing (a pattern needs a name besides '/' and '!')"
    if body.endswith("\\"):
        return "must not end with a backslash"
    try:
        _translate(body.rstrip("/"))
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(frozen=True, slots=True)
class _Rule:
    regex: re.Pattern[str]
    negated: bool
    dir_only: bool
    anchored: bool  # matched against the whole path, else against the last name


class IgnoreRules:
    """Gitignore patterns relative to a root, matched like git: the last matching pattern
    decides, a pattern ending in `/` matches folders only, one with a `/` before its end is
    anchored at the root (else it matches a name at any depth), and whatever lies below an
    ignored folder is ignored (a negation cannot re-include it)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self._rules = tuple(_rule(p) for p in self.patterns)

    def matches(self, path: str, *, is_dir: bool = False) -> bool:
        """Whether `path` (relative, '/'-separated) or a folder above it is ignored."""
        parts = [part for part in path.split("/") if part]
        for depth in range(1, len(parts) + 1):
            if self._decides(
                "/".join(parts[:depth]), parts[depth - 1], is_dir or depth < len(parts)
            ):
                return True
        return False

    def _decides(self, path: str, name: str, is_dir: bool) -> bool:
        for rule in reversed(self._rules):
            if rule.dir_only and not is_dir:
                continue
            if rule.regex.fullmatch(path if rule.anchored else name):
                return not rule.negated
        return False


def _rule(pattern: str) -> _Rule:
    problem = pattern_problem(pattern)
    if problem is not None:
        raise ValueError(f"ignore pattern {pattern!r}: {problem}")
    negated = pattern.startswith("!")
    body = pattern[1:] if negated else pattern
    dir_only = body.endswith("/")
    body = body.rstrip("/")
    anchored = "/" in body
    regex = _translate(body.lstrip("/"))
    return _Rule(re.compile(regex, re.DOTALL), negated, dir_only, anchored)


def _translate(body: str) -> str:
    """A wildmatch pattern (git's, with WM_PATHNAME) as a Python regex over a '/' path."""
    out: list[str] = []
    i, n = 0, len(body)
    while i < n:
        char = body[i]
        if char == "\\":
            if i + 1 >= n:
                raise ValueError("must not end with a backslash")
            out.append(re.escape(body[i + 1]))
            i += 2
        elif char == "*":
            stars = 1
            while i + stars < n and body[i + stars] == "*":
                stars += 1
            at_start = i == 0 or body[i - 1] == "/"
            at_end = i + stars == n
            if stars >= 2 and at_start and i + stars < n and body[i + stars] == "/":
                out.append("(?:.*/)?")  # `**/`: zero or more folders
                i += stars + 1
                continue
            if stars >= 2 and at_start and at_end and i > 0:
                out.append(".*")  # `/**` at the end: everything inside
            else:
                out.append("[^/]*")  # any other run of stars is one star
            i += stars
        elif char == "?":
            out.append("[^/]")
            i += 1
        elif char == "[":
            regex, i = _bracket(body, i)
            out.append(regex)
        else:
            out.append(re.escape(char))
            i += 1
    return "".join(out)


def _bracket(body: str, start: int) -> tuple[str, int]:
    """`[...]` at `start`: a Python class that never matches '/', and the index after it."""
    i = start + 1
    negated = i < len(body) and body[i] in "!^"
    if negated:
        i += 1
    members: list[str] = []
    first = True
    while i < len(body) and (body[i] != "]" or first):
        if body.startswith("[:", i):
            raise ValueError("character classes like [:alpha:] are not supported; list the range")
        char = body[i]
        if char == "\\":
            if i + 1 >= len(body):
                raise ValueError("unterminated '['")
            char = body[i + 1]
            i += 1
        if i + 2 < len(body) and body[i + 1] == "-" and body[i + 2] != "]":
            high = body[i + 2]
            if high == "\\" and i + 3 < len(body):
                high = body[i + 3]
                i += 1
            if high < char:
                raise ValueError(f"range {char}-{high} is backwards")
            members.append(f"{re.escape(char)}-{re.escape(high)}")
            i += 3
        else:
            members.append(re.escape(char))
            i += 1
        first = False
    if i >= len(body):
        raise ValueError("unterminated '['")
    inner = "".join(members)
    return (f"[^/{inner}]" if negated else f"(?!/)[{inner}]"), i + 1
