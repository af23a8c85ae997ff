"""`swapguard logs [-n N] [-f]`: the host's output file, as `tail` shows it, across rotations.

The host writes its output file itself (no pipe through swapguard), so this reads the file: the
last N lines, then, with -f, what is appended. A rotation (the file renamed away and a new one
created, or the file cut short) is followed to the new file, as `tail -F` does.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import BinaryIO

FOLLOW_POLL_S = 0.25
_CHUNK = 64 * 1024


def last_lines(stream: BinaryIO, count: int) -> bytes:
    """The last `count` lines of `stream` (read backwards in chunks: a big file costs no more)."""
    if count <= 0:
        stream.seek(0, os.SEEK_END)
        return b""
    end = stream.seek(0, os.SEEK_END)
    position, data = end, b""
    while position > 0 and data.count(b"\n") <= count:
        step = min(_CHUNK, position)
        position -= step
        stream.seek(position)
        data = stream.read(step) + data
    stream.seek(end)
    lines = data.splitlines(keepends=True)
    return b"".join(lines[-count:])


def follow(path: Path, stream: BinaryIO, out: BinaryIO) -> None:
    """Copy what is appended to `path` to `out` until interrupted, reopening after a rotation."""
    current = os.fstat(stream.fileno())
    while True:
        chunk = stream.read(_CHUNK)
        if chunk:
            out.write(chunk)
            out.flush()
            continue
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None  # renamed away, the new one not there yet
        rotated = now is not None and (now.st_ino, now.st_dev) != (current.st_ino, current.st_dev)
        if rotated:
            # what was written to the old file before the new one appeared: it may have come
            # after the read above came back empty
            while chunk := stream.read(_CHUNK):
                out.write(chunk)
            out.flush()
            stream.close()
            stream = path.open("rb")
            current = os.fstat(stream.fileno())
            continue
        if now is not None and now.st_size < stream.tell():  # cut short (copytruncate)
            stream.seek(0)
            continue
        time.sleep(FOLLOW_POLL_S)


def show(path: Path, lines: int, keep_following: bool) -> None:
    out = sys.stdout.buffer
    with path.open("rb") as stream:
        out.write(last_lines(stream, lines))
        out.flush()
        if keep_following:
            follow(path, stream, out)
