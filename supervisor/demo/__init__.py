"""`swapguard demo`: a guided tour of swapguard on a throwaway repository, no config needed.

It builds a temp folder with a git repo holding the sample host (`sample_host.py`, shipped in this
package), starts the real supervisor on it as a child process, and narrates a crashing swap, an
unconfirmed swap and a self-confirming swap, checking every claim before printing it. Whatever
happens (a failed check, Ctrl-C, SIGTERM) the supervisor is stopped, no process of the demo is left,
and the folder is removed unless SWAPGUARD_DEMO_KEEP=1.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from types import FrameType

from supervisor.cli.console import duration
from supervisor.demo import sandbox as sb
from supervisor.demo.screen import Screen, bullet, make_screen
from supervisor.demo.tour import DemoFailed, Tour

TIME_LIMIT_S = 120.0  # the whole tour normally takes about 20 s
LOG_TAIL_LINES = 25

__all__ = ["run_demo"]


def run_demo(live: bool | None = None) -> int:
    """Run the tour; 0 when every step behaved as narrated, 1 when one did not, 130 on Ctrl-C.

    `live=None` shows the live status block when stdout is a terminal; `False` forces plain lines.
    """
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    screen = make_screen(live, sb.WINDOW_S)
    sandbox = sb.Sandbox(sb.make_root())
    supervisor = sb.SupervisorProcess(sandbox)
    began = time.monotonic()
    code = 1
    with _sigterm_as_interrupt():
        try:
            screen.say(f"swapguard demo: a throwaway sample service in {sandbox.root}")
            sb.populate(sandbox)
            supervisor.start()
            Tour(sandbox, supervisor, screen).run()
            elapsed = time.monotonic() - began
            if elapsed > TIME_LIMIT_S:
                raise DemoFailed(f"the tour took {duration(elapsed)}, over {TIME_LIMIT_S:.0f}s")
            screen.say(f"\nEvery step behaved as narrated ({duration(elapsed)}).")
            code = 0
        except DemoFailed as exc:
            screen.say(bullet(False, f"demo failed: {exc}"))
            _show_logs(screen, sandbox)
        except KeyboardInterrupt:
            screen.say("\ninterrupted: cleaning up")
            code = 130
        except Exception as exc:  # the demo's own bug or a broken environment: report, clean up
            screen.say(bullet(False, f"demo failed: {type(exc).__name__}: {exc}"))
            _show_logs(screen, sandbox)
        finally:
            code = _clean_up(screen, sandbox, supervisor, code)
    return code


def _clean_up(
    screen: Screen, sandbox: sb.Sandbox, supervisor: sb.SupervisorProcess, code: int
) -> int:
    """Stop all the demo started, remove its folder; a second Ctrl-C cannot cut this short."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        screen.close()
        forced = supervisor.stop()
        if forced:
            screen.say(
                bullet(False, "had to kill what swapguard left behind: " + "; ".join(forced))
            )
            code = code or 1
        left = supervisor.leftovers()
        if left:
            screen.say(bullet(False, f"processes still alive: {[proc.pid for proc in left]}"))
            code = code or 1
        if os.environ.get("SWAPGUARD_DEMO_KEEP") == "1":
            screen.say(f"kept the demo's folder (SWAPGUARD_DEMO_KEEP=1): {sandbox.root}")
        else:
            sb.remove(sandbox)
    finally:
        signal.signal(signal.SIGINT, previous)
    return code


def _show_logs(screen: Screen, sandbox: sb.Sandbox) -> None:
    """The tails of swapguard's and the host's output: what the operator would look at next."""
    for name, path in (("swapguard", sandbox.supervisor_log), ("host", sandbox.host_log)):
        if not path.exists():
            continue
        lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        screen.say(f"---- last lines of {name}'s output ({path.name}) ----")
        for line in lines:
            screen.say(line)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM cleans up like Ctrl-C does (only the main thread may set handlers)."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
