"""`python -m bench.spawncost [--spawns N]`: where a restart's time goes, spawn path by spawn path.

Each way of starting the bench's stamping child runs N times in a Popen/wait-style loop, and the
exit -> next start gap is taken from the child's own stamps, as in the restart bench:
- bare: fork/exec of the child (the floor);
- stub: swapguard's spawn stub (`sh -c`, then exec) without the cgroup move;
- stub + cgroup.procs: the stub writing its pid into a cgroup v2 leaf first (what swapguard does);
- clone3 into the leaf: a child born in the leaf (CLONE_INTO_CGROUP, Linux >= 5.7), no move; a
  plain fork from ctypes (no CLONE_VM|CLONE_VFORK, which Python code cannot survive), so it also
  pays the page-table copy that Popen's vfork avoids: an upper bound for this path;
- the cgroup.procs write alone, timed in this process (a helper child moved in and out);
- swapguard's full process-table scan (`process_table()`), which its SIGCHLD handler runs to reap
  orphans whenever a child has exited, the host included: on the restart path.
The cgroup rows need a writable cgroup v2 hierarchy (root); they are skipped with the reason
otherwise. Prints one JSON object. Nothing here changes swapguard: it measures the options.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.measure import child_command, restart_gaps_ms
from bench.report import percentile

STUB = 'if [ -n "${CG-}" ]; then echo 0 > "$CG"; fi; exec "$@"'
CLONE_INTO_CGROUP = 0x200000000
SYS_CLONE3 = 435  # x86_64 and aarch64 alike
CLONE_ARGS_SIZE = 88  # struct clone_args, version 2 (with .cgroup)


def cgroup2_root() -> Path | None:
    """The mount point of the cgroup v2 hierarchy, or None."""
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    return None


def mount_options(root: Path) -> str:
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 3 and fields[1] == str(root):
                return fields[3]
    return ""


Spawn = Callable[[], Callable[[], object]]  # starts the child, returns how to wait for it


def _loop(spawn: Spawn, runs: int) -> None:
    """Start the child `runs` times, each after the previous one was reaped."""
    for _ in range(runs):
        spawn()()


def popen(argv: list[str], env: dict[str, str] | None = None) -> Spawn:
    return lambda: subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL).wait


def clone3_into(leaf: Path, argv: list[str]) -> Spawn:
    """fork/exec with the child born inside `leaf` (clone3 + CLONE_INTO_CGROUP)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    leaf_fd = os.open(leaf, os.O_RDONLY | os.O_DIRECTORY)
    args = (ctypes.c_uint64 * 11)(CLONE_INTO_CGROUP, 0, 0, 0, signal.SIGCHLD, 0, 0, 0, 0, 0, 0)
    args[10] = leaf_fd
    path = argv[0].encode()
    c_argv = (ctypes.c_char_p * (len(argv) + 1))(*[arg.encode() for arg in argv], None)
    execv = libc.execv

    def spawn() -> Callable[[], object]:
        pid = libc.syscall(SYS_CLONE3, ctypes.byref(args), CLONE_ARGS_SIZE)
        if pid == 0:  # the child: nothing but exec (no Python runs between clone and exec)
            execv(path, c_argv)
            os._exit(127)
        if pid < 0:
            raise OSError(ctypes.get_errno(), "clone3 with CLONE_INTO_CGROUP failed")
        return lambda: os.waitpid(pid, 0)

    return spawn


def interleaved_gaps(
    folder: Path, paths: dict[str, Callable[[list[str]], Spawn]], runs: int, rounds: int = 4
) -> dict[str, dict[str, float]]:
    """Gaps of each path, `runs` in all, taken in `rounds` interleaved rounds so that a change
    in the machine's load hits every path alike."""
    found: dict[str, list[float]] = {name: [] for name in paths}
    for number in range(rounds):
        for name, make in paths.items():
            where = folder / f"{name}-{number}"
            stamps = where / "stamps"
            _loop(make(child_command(where, stamps)), runs // rounds + 1)
            found[name] += restart_gaps_ms(stamps.read_text())
    return {name: _summary(values) for name, values in found.items()}


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "max": max(values),
        "n": len(values),
    }


def move_ms(leaf: Path, parent: Path, moves: int) -> dict[str, float]:
    """The cgroup.procs write alone: a sleeping helper moved into the leaf and back."""
    helper = subprocess.Popen(["sleep", "60"])
    times = []
    try:
        for _ in range(moves):
            for target in (leaf, parent):
                started = time.perf_counter()
                (target / "cgroup.procs").write_text(str(helper.pid))
                if target == leaf:
                    times.append((time.perf_counter() - started) * 1000)
    finally:
        helper.kill()
        helper.wait()
    return _summary(times)


def process_table_ms(count: int) -> dict[str, float]:
    """swapguard's process-table scan (every /proc/<pid>/stat), as its orphan reaper runs it."""
    from supervisor.process.proctree import process_table

    process_table()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        process_table()
        times.append((time.perf_counter() - started) * 1000)
    return {**_summary(times), "processes": len(process_table())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spawncost", description=__doc__)
    parser.add_argument("--spawns", type=int, default=40, help="restarts timed per path")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"kernel": platform.release(), "load_1m": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="sgspawn-", dir="/tmp") as scratch:
        folder = Path(scratch)
        stub = ["/bin/sh", "-c", STUB, "sh"]
        paths: dict[str, Callable[[list[str]], Spawn]] = {
            "bare": popen,
            "stub": lambda command: popen([*stub, *command]),
        }
        root = cgroup2_root()
        leaf = root / f"sgspawn-{os.getpid()}" if root else None
        try:
            if root is None or leaf is None:
                raise OSError("no cgroup v2 hierarchy is mounted")
            leaf.mkdir()
            out["cgroup_mount_options"] = mount_options(root)  # favordynmods shows here
            env = {**os.environ, "CG": str(leaf / "cgroup.procs")}
            paths["stub_cgroup_procs"] = lambda command: popen([*stub, *command], env)
            paths["clone3_into_cgroup"] = lambda command: clone3_into(leaf, command)
            out.update(interleaved_gaps(folder, paths, args.spawns))
            out["cgroup_procs_write_ms"] = move_ms(leaf, root, args.spawns)
        except OSError as exc:
            out["cgroup_skipped"] = str(exc)
            out.update(interleaved_gaps(folder, paths, args.spawns))
        finally:
            if leaf is not None and leaf.exists():
                leaf.rmdir()
    out["process_table_ms"] = process_table_ms(args.spawns)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
