"""Load beside swapguard: two CPU-bound processes and a disk writer, for the stressed lateness.

Each is a plain Python process of its own, tagged like everything the bench starts, so it is
killed at the end whatever happens. The writer rewrites one 256 MiB file in 4 MiB blocks with an
fsync after each: steady write-back and journal commits on the file system swapguard's state
lives on.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from bench.peers import tagged_env
from bench.rivals import stop_tree

SPINNER = "while True:\n    pass\n"
WRITER = """\
import os, sys
block = os.urandom(4 << 20)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)
while True:
    for offset in range(0, 256 << 20, len(block)):
        os.pwrite(fd, block, offset)
        os.fsync(fd)
"""


@contextlib.contextmanager
def stressed(folder: Path, tag: str, spinners: int = 2) -> Iterator[None]:
    """`spinners` CPU-bound processes and one disk writer run while the block runs."""
    folder.mkdir(parents=True, exist_ok=True)
    argvs = [[sys.executable, "-S", "-c", SPINNER] for _ in range(spinners)]
    argvs.append([sys.executable, "-S", "-c", WRITER, str(folder / "disk-writer.bin")])
    started: list[subprocess.Popen[bytes]] = []
    try:
        for argv in argvs:
            started.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=tagged_env(tag)))
        yield
    finally:
        for process in started:
            stop_tree(process)
        (folder / "disk-writer.bin").unlink(missing_ok=True)
