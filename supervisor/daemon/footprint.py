"""The daemon's memory footprint: what it loads, and what glibc keeps of what it freed.

Why it looks like this (measured on the development machine: a 200-swap soak that grew 38 -> 46
MiB with the Python heap flat; `swapguard run` with one idle host at 33 MiB RSS, 24.3 MiB once the
imports below and elsewhere were cut, see README "Benchmarks"):
- The growth was free memory in glibc's per-thread arenas. glibc raises its mmap threshold to
  the size of the largest mmapped block freed so far (and its trim threshold to twice that), so
  after the first snapshot's 1 MiB hash buffer, every later one came out of the arena of the
  thread at hand and stayed there when freed; with up to 8 arenas a core, one per thread that
  ever allocated, the free megabytes piled up one arena at a time (16 arenas, 11 of 19 MiB free).
  Fixing both thresholds at glibc's own defaults turns the ratchet off: big blocks are mmapped
  and go back to the kernel when freed. Two arenas instead of sixteen keep the small free lists
  of short-lived threads (control connections, hashing, hooks) where the next thread reuses them.
  Python holds the GIL for almost every allocation, so two arenas cost no contention.
- No `malloc_trim(0)` after start-up: with the thresholds fixed it gave back 68 KiB, for a walk
  of the whole heap (7-12 ms of CPU, 30-50 ms on a busy machine) on the loop.
- `hashlib` maps OpenSSL's libcrypto on import: 3.5 MiB of RSS (3 MiB of it file pages). The
  snapshot code imports it at its first hash, and naming the cgroup at start-up uses CPython's
  own sha256 (`builtin_sha256_hex`); but peewee (the state store) imports hashlib itself, so
  libcrypto is mapped from start-up all the same.
  `ssl` (libssl, 4 MiB) is kept out for good: swapguard never speaks TLS.
- peewee's migrator (a new or older state store) imports its CockroachDB support, and with it
  playhouse's Postgres extensions and connection pool (0.4 MiB), only if it is there; swapguard
  speaks SQLite alone, so it is kept out too (`KEPT_OUT`).
Everything here is a no-op where it cannot apply (no glibc, a module already imported).
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import sys
import types

log = logging.getLogger(__name__)

ARENA_MAX = 2
MMAP_THRESHOLD = 128 * 1024  # glibc's default; setting it stops the dynamic raise
TRIM_THRESHOLD = 128 * 1024  # likewise
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # <malloc.h>


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (mallopt's parameters are glibc's)."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
        return ctypes.CDLL(None, use_errno=True)
    except (ValueError, OSError, AttributeError):  # no such confstr name, no libc handle
        return None


def tune_malloc() -> bool:
    """Bound what glibc keeps of freed memory. Call before the daemon starts its threads (an
    arena, once made, is kept). False where the C library is not glibc or refused a setting."""
    libc = _glibc()
    if libc is None:
        return False
    applied = True
    for option, value in (
        (_M_ARENA_MAX, ARENA_MAX),
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ):
        if libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) != 1:
            log.warning(
                "mallopt(%d, %d) refused: freed memory may stay in the process", option, value
            )
            applied = False
    return applied


KEPT_OUT = ("ssl", "playhouse.cockroachdb")
"""Modules the daemon's libraries import only if they are there, for what swapguard never does."""


def keep_out_of_process(names: tuple[str, ...] = KEPT_OUT) -> None:
    """Make `import name` fail (ImportError) for modules swapguard never needs; asyncio and
    http.client import `ssl` only if it is there. A module already imported stays."""
    for name in names:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


LOADED_ON_FIRST_USE = ("hashlib",)
"""Modules that the daemon's libraries import at their top for what a resting daemon never does,
loaded at their first use instead: hashlib (peewee hashes a migration's constraint names with it;
our snapshot digests need it) maps OpenSSL's libcrypto, 3 MiB of RSS."""


class _LoadedOnFirstUse(types.ModuleType):
    """Stands in `sys.modules` for a module until one of its attributes is read; from then on it
    hands out the real module's. (importlib's LazyLoader cannot serve: on CPython 3.11 a plain
    `import name` reads the module's `__spec__`, which loads it.)"""

    def __getattr__(self, attribute: str) -> object:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        return getattr(real, attribute)


def load_on_first_use(names: tuple[str, ...] = LOADED_ON_FIRST_USE) -> None:
    """Import each of `names` only when first used; one already imported stays as it is."""
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = _LoadedOnFirstUse(name)


def builtin_sha256_hex(data: bytes) -> str:
    """sha256 of a few bytes with CPython's own implementation, so that naming something by a hash
    at start-up does not load OpenSSL (see the module doc). Same digest as hashlib.sha256."""
    try:
        from _sha2 import sha256  # type: ignore[import-not-found]  # CPython >= 3.12
    except ImportError:
        try:
            from _sha256 import sha256  # type: ignore[import-not-found]  # CPython 3.11
        except ImportError:  # a build without the builtin hashes: OpenSSL's, then
            from hashlib import sha256
    return str(sha256(data).hexdigest())
