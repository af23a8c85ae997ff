"""What every test of the suite may count on, however the suite was started."""

from __future__ import annotations

import signal


def pytest_configure() -> None:
    """Ctrl-C reaches the commands the tests start. A non-interactive shell starts a job put in
    the background (`scripts/test &`, a CI step) with SIGINT ignored, and every process below it
    inherits that: `swapguard logs -f`, `events -f`, `status --watch` and the demo would never
    see the SIGINT their tests send. A handled signal is reset to its default across exec."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
