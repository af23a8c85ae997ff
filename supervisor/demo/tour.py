"""The tour: v1 under supervision, then three swaps, each claim checked against reality first.

Nothing is printed as a fact before it was observed: the status document, the swap's own events,
the rows the sample host wrote (read-only), the files in the tree and `git status`. A step that does
not behave as narrated raises `DemoFailed` naming what was expected and what was seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import psutil

from supervisor.cli.console import duration
from supervisor.client import Client
from supervisor.core.instant import wall_of
from supervisor.core.swaps import AT_REST
from supervisor.demo import sandbox as sb
from supervisor.demo.screen import Screen, arrow, bullet, countdown, heading
from supervisor.errors import NotReachable

T = TypeVar("T")
WAIT_S = 30.0  # any one wait; the normal path needs a few seconds
POLL_S = 0.1
PLAIN_COUNTDOWN_EVERY_S = 1.5
FINISHED = frozenset(state.value for state in AT_REST)  # failed too: it waits for the operator


class DemoFailed(Exception):
    """A step did not behave as narrated."""


@dataclass(frozen=True, slots=True)
class Version:
    """One version of the sample host, i.e. one `app.json`."""

    name: str
    behaviour: str
    summary: str
    confirm: bool = False

    def app(self) -> dict[str, Any]:
        return {"version": self.name, "behaviour": self.behaviour, "confirm": self.confirm}


V2 = Version("v2", "crash", "v2: a migration that crashes at start")
V3 = Version("v3", "ok", "v3: runs fine, but nobody confirms it")
V4 = Version("v4", "ok", "v4: confirms itself once ready", confirm=True)


def expect(condition: object, failure: str) -> None:
    if not condition:
        raise DemoFailed(failure)


def event_of(swap: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
    """The swap's first event of `kind`; DemoFailed when it has none."""
    for event in swap.get("events", ()):
        if event["event"] == kind:
            return event
    seen = ", ".join(event["event"] for event in swap.get("events", ()))
    raise DemoFailed(f"swap {swap['id']} has no {kind} event (it has: {seen or 'none'})")


class Tour:
    """Drives the running supervisor through the scenario; one method per narrated step."""

    def __init__(
        self, sandbox: sb.Sandbox, supervisor: sb.SupervisorProcess, screen: Screen
    ) -> None:
        self.sandbox = sandbox
        self.supervisor = supervisor
        self.screen = screen
        self.client = Client(sandbox.socket, timeout=30)
        self.v1_json = sandbox.app_json.read_bytes()
        self.head = ""

    def run(self) -> None:
        for step in (self.v1_running, self.crashing_swap, self.unconfirmed_swap, self.kept_swap):
            began = time.monotonic()
            step()
            self.screen.say(f"  ({duration(time.monotonic() - began)})")

    # --- the steps -----------------------------------------------------------------------------

    def v1_running(self) -> None:
        say = self.screen.say
        say(heading("1. v1 of the sample host, under supervision"))
        # code.head is filled in once swapguard's first checkpoint of the tree is taken
        doc = self.wait(
            lambda d: (
                d
                if d["host"]["ready"] and d["host"]["last_heartbeat_at"] and d["code"]["head"]
                else None
            ),
            "v1 to be ready and heartbeating",
        )
        host = doc["host"]
        pid = self.check_host_process(host["pid"], "v1")
        say(arrow(f"swapguard (pid {doc['supervisor']['pid']}) started the host: app.py, v1"))
        say(
            bullet(
                True,
                f"v1 is running: pid {pid}, ready (it sent READY=1), heartbeat "
                f"{duration(host['heartbeat_age_s'])} ago (due every 3s)",
            )
        )
        starts = sb.host_starts(self.sandbox.database)
        expect(starts == [("v1", None, None)], f"data/app.db starts: expected one v1, got {starts}")
        say(bullet(True, "data/app.db (WAL-mode SQLite) recorded the start: starts = [v1]"))
        self.head = sb.git(self.sandbox, "rev-parse", "HEAD").strip()
        expect(
            doc["code"]["head"] == self.head,
            f"status code.head {doc['code']['head']} is not HEAD {self.head}",
        )
        self.expect_clean_tree()
        say(bullet(True, f"code: git HEAD {self.head[:10]} (commit 'v1'), working tree clean"))

    def crashing_swap(self) -> None:
        self.screen.say(heading("2. swap to v2, which crashes at start"))
        swap_id = self.begin_swap(V2)
        final = self.wait_finished(swap_id)
        expect(
            (final["state"], final["reason"]) == ("rolled_back", "crash_loop"),
            f"swap {swap_id}: expected rolled_back (crash_loop), got "
            f"{final['state']} ({final['reason']})",
        )
        crashed = self.sandbox.host_log.read_text(errors="replace").count("v2: migration failed")
        expect(final["crashes"] >= 2, f"swap {swap_id} counted {final['crashes']} crashes, not 2")
        rolled = event_of(final, "swap.rolled_back")
        self.screen.say(
            bullet(
                True,
                f"v2 crashed {final['crashes']} times (host.log shows {crashed} failed "
                "migrations); max_crashes = 2, so swapguard rolled back: reason crash_loop",
            )
        )
        self.screen.say(
            bullet(
                True,
                f"the rollback took {duration(rolled['detail']['duration_s'])} "
                "(stop v2, restore the code, restore the data, start v1)",
            )
        )
        self.verify_restored(final, V2)

    def unconfirmed_swap(self) -> None:
        self.screen.say(heading("3. swap to v3, which runs but is never confirmed"))
        swap_id = self.begin_swap(V3)

        def on_probation(doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
            swap, host = doc.get("swap"), doc["host"]
            if not swap or swap["id"] != swap_id or swap["deadline_at"] is None:
                return None
            return doc if host["ready"] and swap["step"] is None else None

        doc = self.wait(on_probation, "v3 to run on probation")
        pid = self.check_host_process(doc["host"]["pid"], "v3")
        starts = sb.host_starts(self.sandbox.database)
        expect(starts[-1] == ("v3", swap_id, None), f"last start is {starts[-1]}, not v3")
        self.screen.say(
            bullet(
                True,
                f"v3 runs on probation: pid {pid}, ready, started with SWAPGUARD_SWAP_ID "
                f"(recorded in starts); deadline in {duration(doc['swap']['remaining_s'])}",
            )
        )
        self.screen.say(arrow("nobody confirms it; the deadline counts down:"))
        final = self.wait_finished(swap_id, on_status=self.plain_countdown())
        expect(
            (final["state"], final["reason"]) == ("rolled_back", "deadline"),
            f"swap {swap_id}: expected rolled_back (deadline), got "
            f"{final['state']} ({final['reason']})",
        )
        started = wall_of(event_of(final, "swap.rollback_started")["at"])
        late = started - wall_of(final["deadline_at"])
        expect(late <= 1.0, f"the rollback began {late:.2f}s after the deadline (limit: 1s)")
        rolled = event_of(final, "swap.rolled_back")
        self.screen.say(
            bullet(
                True,
                f"deadline passed: the rollback began {max(0.0, late):.2f}s after it "
                f"(guaranteed within 1s), reason deadline, and took "
                f"{duration(rolled['detail']['duration_s'])}",
            )
        )
        self.verify_restored(final, V3)

    def kept_swap(self) -> None:
        self.screen.say(heading("4. swap to v4, which confirms itself"))
        swap_id = self.begin_swap(V4)
        final = self.wait_finished(swap_id)
        expect(
            final["state"] == "confirmed",
            f"swap {swap_id}: expected confirmed, got {final['state']} ({final['reason']})",
        )
        confirmed_at = wall_of(event_of(final, "swap.confirmed")["at"])
        self.screen.say(
            bullet(
                True,
                "v4 sent X_SWAPGUARD_CONFIRM once ready (the demo never called confirm): "
                f"confirmed {confirmed_at - wall_of(final['activated_at']):.1f}s after activation",
            )
        )

        def still_running(doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
            host, beat = doc["host"], doc["host"]["last_heartbeat_at"]
            fresh = beat is not None and wall_of(beat) > confirmed_at + 1.0
            return doc if host["ready"] and fresh and doc["swap"] is None else None

        doc = self.wait(still_running, "v4 to keep running and heartbeating after its confirm")
        pid = self.check_host_process(doc["host"]["pid"], "v4")
        starts = sb.host_starts(self.sandbox.database)
        expect(starts[-1] == ("v4", swap_id, None), f"last start is {starts[-1]}, not v4")
        expect(
            len([row for row in starts if row[0] == "v4"]) == 1,
            f"v4 started more than once: {starts}",
        )
        self.screen.say(
            bullet(
                True,
                f"v4 keeps running: pid {pid}, one start, heartbeat "
                f"{duration(doc['host']['heartbeat_age_s'])} ago; no swap in flight",
            )
        )
        tables = sb.table_names(self.sandbox.database)
        expect("migrated_v4" in tables, f"data/app.db has no migrated_v4 table: {sorted(tables)}")
        app = self.sandbox.app_json.read_bytes()
        expect(app == sb.json_bytes(V4.app()), "app.json is not v4 any more")
        porcelain = sb.git(self.sandbox, "status", "--porcelain").splitlines()
        expect(porcelain == [" M app.json"], f"git status: expected ' M app.json', got {porcelain}")
        self.screen.say(
            bullet(
                True,
                "kept: app.json is v4 (git status: M app.json, yours to commit), "
                "data/app.db has migrated_v4",
            )
        )

    # --- shared parts of the steps ---------------------------------------------------------

    def begin_swap(self, version: Version) -> str:
        """prepare, write the new app.json, activate; each claim checked on the way."""
        say = self.screen.say
        swap = self.client.prepare(version.summary)
        swap_id = swap["id"]
        expect(swap["state"] == "prepared", f"prepare gave a {swap['state']} swap")
        say(arrow(f"prepare: swap {swap_id} ({version.summary!r}) checkpoints the code"))
        sb.write_app(self.sandbox, version.app())
        changes = self.client.swap(swap_id)["changes"]
        expect(
            {"path": "app.json", "change": "modified"} in changes,
            f"swap {swap_id} does not see app.json modified: {changes}",
        )
        flags = f"behaviour {version.behaviour}" + (", confirm true" if version.confirm else "")
        say(arrow(f"write app.json: {version.name}, {flags} (swapguard sees: app.json modified)"))
        activated = self.client.activate(swap_id)
        expect(activated["state"] == "probation", f"activate gave a {activated['state']} swap")
        say(
            arrow(
                f"activate: swapguard stops the old host, snapshots data/app.db, starts "
                f"{version.name} on probation "
                f"(window {sb.WINDOW_S:g}s, hard cap {sb.HARD_CAP_S:g}s)"
            )
        )
        return swap_id

    def verify_restored(self, final: Mapping[str, Any], version: Version) -> None:
        """After a rollback: code, data and the running host are v1 again; nothing was lost."""
        swap_id, say = final["id"], self.screen.say
        expect(self.sandbox.app_json.read_bytes() == self.v1_json, "app.json is not v1 again")
        head = sb.git(self.sandbox, "rev-parse", "HEAD").strip()
        expect(head == self.head, f"HEAD moved: {head} (was {self.head})")
        self.expect_clean_tree()
        say(bullet(True, "code: app.json is v1 again; git status clean, HEAD unchanged"))
        doc = self.wait(
            lambda d: d if d["host"]["ready"] and d["swap"] is None else None,
            "v1 to be ready again",
        )
        pid = self.check_host_process(doc["host"]["pid"], "v1")
        starts = sb.host_starts(self.sandbox.database)
        expect(
            starts[-1] == ("v1", None, swap_id),
            f"last start is {starts[-1]}, not v1 with SWAPGUARD_ROLLED_BACK={swap_id}",
        )
        say(
            bullet(
                True,
                f"v1 runs again: pid {pid}, started with SWAPGUARD_ROLLED_BACK={swap_id} "
                "(recorded in starts)",
            )
        )
        table = f"migrated_{version.name}"
        tables = sb.table_names(self.sandbox.database)
        expect(table not in tables, f"data/app.db still has {table} after the rollback")
        expect(
            all(row[0] != version.name for row in starts),
            f"data/app.db still has starts of {version.name}: {starts}",
        )
        kept = self.sandbox.kept_copy(swap_id)
        expect(kept.exists(), f"the probation-time copy {kept.name} is missing")
        kept_tables = sb.table_names(kept)
        expect(table in kept_tables, f"{kept.name} has no {table}: {sorted(kept_tables)}")
        kept_starts = [row for row in sb.host_starts(kept) if row[0] == version.name]
        say(
            bullet(
                True,
                f"data: app.db has no {table} table and no {version.name} start; "
                f"{kept.name} keeps them ({table}, {len(kept_starts)} start(s))",
            )
        )

    def expect_clean_tree(self) -> None:
        porcelain = sb.git(self.sandbox, "status", "--porcelain")
        expect(porcelain.strip() == "", f"git status is not clean:\n{porcelain}")

    def check_host_process(self, pid: int | None, version: str) -> int:
        """The pid is a live sample host, and host.log shows that pid starting `version`."""
        expect(pid is not None, "the host has no pid")
        assert pid is not None
        self.supervisor.host_pids.add(pid)
        try:
            cmdline = psutil.Process(pid).cmdline()
        except psutil.Error as exc:
            raise DemoFailed(f"host pid {pid} is not a live process: {exc}") from None
        app = str(self.sandbox.repo / "app.py")
        expect(app in cmdline, f"pid {pid} runs {cmdline}, not {app}")
        log = self.sandbox.host_log.read_text(errors="replace")
        expect(
            f"sample host {version} " in log and f"pid {pid}\n" in log,
            f"host.log does not show {version} starting as pid {pid}",
        )
        return pid

    # --- waiting -----------------------------------------------------------------------------

    def wait(
        self,
        check: Callable[[Mapping[str, Any]], T | None],
        what: str,
        timeout: float = WAIT_S,
        on_status: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> T:
        """Poll the status until `check` returns something; the live block follows along."""
        deadline = time.monotonic() + timeout
        doc: Mapping[str, Any] | None = None
        while True:
            code = self.supervisor.exit_code()
            expect(code is None, f"swapguard exited (code {code}) while waiting for {what}")
            try:
                doc = self.client.status()
            except NotReachable:
                doc = None
            if doc is not None:
                if doc["host"]["pid"]:
                    self.supervisor.host_pids.add(doc["host"]["pid"])
                self.screen.show(doc)
                found = check(doc)
                if found:
                    return found
                if on_status is not None:
                    on_status(doc)
            if time.monotonic() > deadline:
                raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(POLL_S)

    def wait_finished(
        self, swap_id: str, on_status: Callable[[Mapping[str, Any]], None] | None = None
    ) -> Mapping[str, Any]:
        """The swap document (with its events) once it is confirmed, rolled back or failed."""

        def finished(doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
            swap = doc.get("swap")
            if swap is not None and swap["id"] == swap_id:
                return None
            record = self.client.swap(swap_id)
            return record if record["state"] in FINISHED else None

        return self.wait(finished, f"swap {swap_id} to finish", on_status=on_status)

    def plain_countdown(self) -> Callable[[Mapping[str, Any]], None]:
        """In plain mode, a countdown line every 1.5 s; live mode has the redrawn block."""
        last_shown = 0.0

        def show(doc: Mapping[str, Any]) -> None:
            nonlocal last_shown
            swap = doc.get("swap")
            if self.screen.live or swap is None or swap.get("remaining_s") is None:
                return
            if time.monotonic() - last_shown < PLAIN_COUNTDOWN_EVERY_S:
                return
            last_shown = time.monotonic()
            self.screen.say(f"     {swap['state']}: {countdown(swap, sb.WINDOW_S)}")

        return show
