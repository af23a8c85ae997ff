"""The `swapguard` command line.

Exit codes: 0 ok, 1 refused or failed, 2 usage or config, 3 unreachable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor import __version__
from supervisor.cli import console
from supervisor.errors import ConfigError, NotReachable, SwapguardError

if TYPE_CHECKING:
    from supervisor.config.schema import Config

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def _count(text: str) -> int:
    """A whole number >= 0 for -n, refused with a usage error otherwise."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, not {text!r}")
    return int(text)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def _client(args: argparse.Namespace) -> Any:
    from supervisor.client import Client, find_socket

    return Client(find_socket(args.socket, args.config))


# --- service and config ---------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from supervisor.daemon import footprint

    # Before the daemon's modules load: no libssl ever (no TLS), no database but SQLite.
    footprint.keep_out_of_process()
    footprint.load_on_first_use()
    from supervisor.config.schema import find_config, load_config
    from supervisor.daemon import service as daemon

    config = load_config(find_config(args.config))
    code = daemon.run(config)
    main = threading.main_thread()
    stuck = [t.name for t in threading.enumerate() if t is not main and not t.daemon]
    if stuck:  # a worker inside a call that never returns must not hold the exit: all is saved
        logging.getLogger(__name__).warning("exiting with work still running: %s", stuck)
        logging.shutdown()
        os._exit(code)
    return code


def cmd_check(args: argparse.Namespace) -> int:
    from supervisor.config.schema import find_config, load_config
    from supervisor.daemon.preflight import preflight

    path = find_config(args.config)
    config = load_config(path)
    preflight(config)  # what `run` would refuse, with the same message
    _advise(config)
    print(f"{path}: ok (host: {' '.join(config.host.command)})")
    return EXIT_OK


def _advise(config: Config) -> None:
    """Warnings of `check` and `init` (stderr): accepted, but likely not what the user means."""
    from supervisor.daemon.preflight import advice

    for line in advice(config):
        print(f"swapguard: warning: {line}", file=sys.stderr)


def cmd_init(args: argparse.Namespace) -> int:
    from supervisor.config.schema import load_config, render_init

    path = Path(args.config or "swapguard.toml")
    if path.exists() and not args.force:
        print(f"swapguard: {path} exists (use --force to overwrite)", file=sys.stderr)
        return EXIT_FAILED
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    path.write_text(render_init(command or None))
    print(f"wrote {path}; check it with: swapguard check --config {path}")
    with contextlib.suppress(SwapguardError):  # advice only: init has done its job
        _advise(load_config(path))
    return EXIT_OK


# --- status ----------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.check is not None:
        return _check(client.status(), args.check)
    if not args.watch:
        doc = client.status()
        _print_json(doc) if args.json else print(console.render_status(doc))
        return EXIT_OK
    tty = sys.stdout.isatty()
    try:
        while True:
            doc = client.status()
            if args.json:
                print(json.dumps(doc), flush=True)
            elif tty:
                sys.stdout.write("\x1b[H\x1b[2J" + console.render_status(doc) + "\n")
                sys.stdout.flush()
            else:
                print(console.render_status(doc), end="\n\n", flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _check(doc: dict[str, Any], probe: str) -> int:
    """A probe's verdict as an exit code: `live` once swapguard answers (it restarts the host
    itself), `ready` only while the host runs ready and no rollback waits for the operator."""
    if probe == "live":
        return EXIT_OK
    host, swap = doc["host"], doc.get("swap")
    if swap is not None and swap.get("state") == "failed":
        print(f"not ready: swap {swap['id']} failed to roll back", file=sys.stderr)
        return EXIT_FAILED
    if host.get("state") != "running" or not host.get("ready"):
        print(f"not ready: host {host.get('state')}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# --- swaps and host --------------------------------------------------------------------------


def cmd_swap(args: argparse.Namespace) -> int:
    client = _client(args)
    action = args.swap_action
    if action == "prepare":
        swap = client.prepare(args.summary or "")
        _print_json(swap) if args.json else print(swap["id"])
        return EXIT_OK
    if action == "list":
        rows = client.swaps(limit=args.limit)
        _print_json(rows) if args.json else print(console.render_swap_table(rows))
        return EXIT_OK
    if action == "show":
        doc = client.swap(args.id)
        _print_json(doc) if args.json else print(console.render_swap(doc))
        return EXIT_OK
    calls: dict[str, Callable[[], Any]] = {
        "activate": lambda: client.activate(args.id),
        "confirm": lambda: client.confirm(args.id),
        "extend": lambda: client.extend(args.id),
        "abort": lambda: client.abort(args.id),
        "rollback": lambda: client.rollback(args.id, reason=args.reason),
    }
    swap = calls[action]()
    if getattr(args, "wait", False) and swap.get("step") is not None:  # 202: under way
        swap = _settled(client, args.id)
    _print_json(swap) if args.json else print(console.render_swap_line(swap))
    if swap.get("step") is not None and not args.json:
        print(f"  under way; `swapguard swap show {args.id}` follows it (or use --wait)")
    return EXIT_FAILED if swap.get("state") == "failed" else EXIT_OK


SETTLE_POLL_S = 0.2


def _settled(client: Any, swap_id: str) -> dict[str, Any]:
    """The swap once no step is in flight (the documented way to wait for a 202), or once its
    rollback failed (it waits for the operator then)."""
    while (swap := client.swap(swap_id))["step"] is not None and swap["state"] != "failed":
        time.sleep(SETTLE_POLL_S)
    return dict(swap)


def cmd_host(args: argparse.Namespace) -> int:
    result = _client(args).host(args.host_action)
    _print_json(result) if args.json else print(f"host {result['state']} (pid {result['pid']})")
    return EXIT_OK


def cmd_notify(args: argparse.Namespace) -> int:
    """Like systemd-notify; through the control socket when we have one, for a real answer."""
    if not (args.ready or args.heartbeat or args.status is not None or args.confirm):
        print(
            "swapguard notify: say something (--ready, --heartbeat, --status, --confirm)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    socket = args.socket or os.environ.get("SWAPGUARD_SOCKET")
    if socket:
        from supervisor.client import Client

        client = Client(socket)
        if args.ready or args.heartbeat or args.status is not None:
            client.heartbeat(status=args.status, ready=args.ready)
        if args.confirm:
            client.confirm(args.confirm)
        return EXIT_OK
    from supervisor.notify import sd_notify

    lines = []
    if args.ready:
        lines.append("READY=1")
    if args.heartbeat:
        lines.append("WATCHDOG=1")
    if args.status is not None:
        lines.append(f"STATUS={args.status}")
    if args.confirm:
        lines.append(f"X_SWAPGUARD_CONFIRM={args.confirm}")
    if not sd_notify("\n".join(lines)):
        print(
            "swapguard notify: neither SWAPGUARD_SOCKET nor NOTIFY_SOCKET is set", file=sys.stderr
        )
        return EXIT_FAILED
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    from supervisor.cli import logs
    from supervisor.config.schema import find_config, load_config

    config = load_config(find_config(args.config))
    path = config.host.output
    if path is None:
        print(
            'swapguard logs: host.output is "inherit": the host\'s output goes where '
            "swapguard's does (journalctl -u swapguard)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if not path.exists():
        print(f"swapguard logs: {path} does not exist yet", file=sys.stderr)
        return EXIT_FAILED
    with contextlib.suppress(KeyboardInterrupt):
        logs.show(path, args.lines, args.follow)
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    from supervisor.cli import events

    with contextlib.suppress(KeyboardInterrupt):
        events.show(
            _client(args), last=args.lines, swap_id=args.swap, as_json=args.json, keep=args.follow
        )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from supervisor.demo import run_demo

    return run_demo(live=None if not args.plain else False)


# --- the parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: an option given before the subcommand is not reset by the subcommand's parser.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument(
        "--config", "-c", help="swapguard.toml (default: $SWAPGUARD_CONFIG, ./swapguard.toml)"
    )
    common.add_argument(
        "--socket", help="control socket (default: $SWAPGUARD_SOCKET, the config's)"
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    parser = argparse.ArgumentParser(
        prog="swapguard",
        description="Supervise a service that rewrites its own code.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"swapguard {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("SWAPGUARD_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        handler: Callable[[argparse.Namespace], int],
        text: str,
    ) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, parents=[common], help=text, description=text)
        cmd.set_defaults(handler=handler)
        return cmd

    add("run", cmd_run, "run the supervisor in the foreground")
    add("check", cmd_check, "validate the config")
    init = add("init", cmd_init, "write a commented swapguard.toml")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.add_argument("command", nargs=argparse.REMAINDER, help="the host's command (after --)")
    status = add("status", cmd_status, "show the supervisor, host and swap")
    status.add_argument("--watch", "-w", action="store_true", help="refresh until interrupted")
    status.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    status.add_argument(
        "--check",
        nargs="?",
        const="ready",
        choices=("ready", "live"),
        default=None,
        help="a probe: 0 if ready (with 'live': if swapguard answers), else 1; 3 unreachable",
    )

    swap = add("swap", cmd_swap, "prepare, activate, confirm, extend, roll back or abort swaps")
    swap_sub = swap.add_subparsers(dest="swap_action", required=True, metavar="ACTION")
    prepare = swap_sub.add_parser("prepare", parents=[common], help="checkpoint the code")
    prepare.add_argument("--summary", "-m", default="")
    listing = swap_sub.add_parser("list", parents=[common], help="recent swaps")
    listing.add_argument("--limit", type=int, default=20)
    for name in ("show", "activate", "confirm", "extend", "abort", "rollback"):
        one = swap_sub.add_parser(name, parents=[common], help=f"{name} a swap")
        one.add_argument("id")
        if name == "rollback":
            one.add_argument("--reason", default=None)
        if name in ("activate", "abort", "rollback"):
            one.add_argument(
                "--wait", action="store_true",
                help="until no step is in flight (the new version runs, or it rolled back)",
            )  # fmt: skip

    host = add("host", cmd_host, "operator control of the host")
    host.add_argument("host_action", choices=("start", "stop", "restart"))

    notify = add("notify", cmd_notify, "report readiness, heartbeat, status or a confirm")
    notify.add_argument("--ready", action="store_true")
    notify.add_argument("--heartbeat", action="store_true")
    notify.add_argument("--status", default=None)
    notify.add_argument("--confirm", metavar="SWAP_ID", default=None)

    logs = add("logs", cmd_logs, "show the host's output file (host.output)")
    logs.add_argument("--lines", "-n", type=_count, default=50, help="last N lines (default 50)")
    logs.add_argument("--follow", "-f", action="store_true", help="then what is appended")

    events = add("events", cmd_events, "show the audit log (swaps, host, hooks)")
    events.add_argument("--lines", "-n", type=_count, default=50, help="last N events")
    events.add_argument("--follow", "-f", action="store_true", help="then each new event")
    events.add_argument("--swap", metavar="SWAP_ID", default=None, help="only this swap's")

    demo = add("demo", cmd_demo, "a guided tour on a throwaway repository")
    demo.add_argument("--plain", action="store_true", help="plain lines even on a terminal")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # The parser is garbage once it has parsed (the daemon would carry ~0.1 MiB of it for good).
    args = build_parser().parse_args(argv)
    for name, default in (("config", None), ("socket", None), ("json", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        if args.command == "run"
        else "%(levelname)s: %(message)s",
    )
    logging.getLogger("peewee").setLevel(logging.INFO)  # at DEBUG it logs every SQL statement
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"swapguard: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except NotReachable as exc:
        print(f"swapguard: {exc.message}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except SwapguardError as exc:
        print(f"swapguard: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        return EXIT_OK
