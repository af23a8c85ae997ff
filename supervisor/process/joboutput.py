"""A job's output: the tail kept for its result, its lines logged, and all of it in a file.

Build and hook output may hold secrets (a build that echoes its environment). With a file from
`new_output_file` (in a folder only swapguard's user can enter, never through a symlink) the whole
output is kept there and its lines are logged at DEBUG only; callers then name the file in what
they report (events), never its text.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from pathlib import Path

OUTPUT_FILES_KEPT = 50
"""Per kind (build, hook, ...): older output files are removed as new ones are made."""
OUTPUT_LIMIT = 64 * 1024
"""The tail of a job's merged output kept in `JobResult.output`."""
_LINE_LIMIT = 8 * 1024  # a "line" without a newline is logged in pieces of this size
_NEW_PRIVATE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def new_output_file(folder: Path, kind: str) -> Path:
    """A fresh name for one job's output in `folder` (created 0700, never through a symlink);
    the oldest files of that kind beyond OUTPUT_FILES_KEPT are removed."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(folder, 0o700)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise OSError(f"{folder} is not a private folder of swapguard's user; refusing it")
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = folder / f"{kind}-{stamp}-{os.urandom(3).hex()}.log"
    old = sorted(p for p in folder.glob(f"{kind}-*.log") if p.is_file())
    for stale in old[: max(0, len(old) - OUTPUT_FILES_KEPT + 1)]:
        stale.unlink(missing_ok=True)
    return path


class JobOutput:
    """The tail of the merged output, plus every complete line logged as it arrives (and, with
    a file, all of it written there)."""

    def __init__(self, job_log: logging.Logger, path: Path | None = None) -> None:
        self.log = job_log
        self._level = logging.INFO if path is None else logging.DEBUG
        self._tail = bytearray()
        self._partial = bytearray()
        self._fd: int | None = None
        if path is not None:
            try:
                self._fd = os.open(path, _NEW_PRIVATE_FILE, 0o600)
            except OSError as exc:
                job_log.warning("job output not kept: cannot create %s: %s", path, exc.strerror)

    def feed(self, chunk: bytes) -> None:
        if self._fd is not None:
            try:
                os.write(self._fd, chunk)
            except OSError as exc:  # a full disk must not stop the job's supervision
                self.log.warning("job output file: %s", exc.strerror)
                self.close()
        self._tail += chunk
        if len(self._tail) > OUTPUT_LIMIT:
            del self._tail[: len(self._tail) - OUTPUT_LIMIT]
        self._partial += chunk
        *lines, rest = self._partial.split(b"\n")
        for line in lines:
            self._emit(line)
        self._partial = bytearray(rest)
        while len(self._partial) > _LINE_LIMIT:
            self._emit(self._partial[:_LINE_LIMIT])
            del self._partial[:_LINE_LIMIT]

    def flush(self) -> None:
        if self._partial:
            self._emit(self._partial)
            self._partial = bytearray()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def text(self) -> str:
        return self._tail.decode(errors="replace")

    def _emit(self, line: bytes | bytearray) -> None:
        if self.log.isEnabledFor(self._level):
            self.log.log(self._level, "%s", bytes(line).decode(errors="replace").rstrip("\r"))
