"""The runbook on a live site: a real WSGI server (gunicorn, several sync workers) serves the
application while clients write through it (fast requests, slow ones that hold their
transaction past the drain, late ones that write after the fence is up) and a writer process
that is no web request writes through the ORM.  Meanwhile: migration_prepare, migrate_data,
migrate_data --sync, switch_to_postgresql, rollback_to_sqlite.  Every acknowledged write must
end exactly once in the active store, none may land on the inactive one, and the freeze the
clients saw is reported.  Everything listens on 127.0.0.1 only; processes die in finally."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connections

from accounts.models import Organisation
from dbmigration import cutover, fence, rollback
from dbmigration.state import read_state

pytestmark = [pytest.mark.slow, pytest.mark.django_db(databases="__all__", transaction=True)]
ROOT = Path(__file__).resolve().parent.parent
WORKERS = 4


@dataclasses.dataclass
class Request:
    key: str
    kind: str
    sent: float
    done: float
    status: int  # 0: no answer (connection refused or reset)


class Clients:
    """Threads that POST writes to the server until stopped, each keeping every answer."""

    def __init__(self, port: int):
        self.port = port
        self.stop = threading.Event()
        self.results: list[Request] = []
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()

    def start(
        self, kind: str, count: int, pause: float = 0.01, url: str = "/live/write/", **params
    ) -> None:
        """count threads sending url?params, waiting pause seconds between requests."""
        for _ in range(count):
            args = (f"{kind}{len(self.threads)}", kind, pause, url, params)
            thread = threading.Thread(target=self._loop, args=args)
            thread.start()
            self.threads.append(thread)

    def _loop(self, name: str, kind: str, pause: float, url: str, params: dict) -> None:
        sequence = 0
        while not self.stop.is_set():
            key = f"{name}-{sequence}"
            sequence += 1
            query = urllib.parse.urlencode({"key": key, **params})
            sent = time.monotonic()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                conn.request("POST", f"{url}?{query}")
                status = conn.getresponse().status
                conn.close()
            except OSError:
                status = 0
            with self.lock:
                self.results.append(Request(key, kind, sent, time.monotonic(), status))
            time.sleep(max(pause, 0.05) if status == 503 else pause)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=40)

    def acked(self, kind: str | None = None) -> list[str]:
        return [r.key for r in self.results if r.status == 201 and kind in (None, r.kind)]

    def count(self, status: int) -> int:
        return sum(1 for r in self.results if r.status == status)

    def longest_refusal(self, start: float, end: float) -> float:
        """The longest time, within [start, end], in which no fast write was acknowledged."""
        done = sorted(r.done for r in self.results if r.kind == "fast" and r.status == 201)
        marks = [start, *(t for t in done if start < t < end), end]
        return round(max(b - a for a, b in zip(marks, marks[1:], strict=False)), 2)

    def in_flight_at(self, moment: float, kind: str) -> list[Request]:
        return [r for r in self.results if r.kind == kind and r.sent < moment < r.done]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(port: int, proc: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"gunicorn did not listen on 127.0.0.1:{port} within {seconds} s")


def names(alias: str) -> collections.Counter:
    return collections.Counter(
        Organisation._base_manager.using(alias).values_list("name", flat=True)
    )


def session_keys(alias: str) -> collections.Counter:
    """The keys /live/session/ stored, one per session row."""
    from django.contrib.sessions.models import Session

    rows = Session.objects.using(alias).all()
    return collections.Counter(row.get_decoded().get("key") for row in rows)


def run(name: str, *args: str) -> str:
    out = StringIO()
    call_command(name, *args, stdout=out, stderr=StringIO())
    return out.getvalue()


@pytest.fixture
def site(settings, tmp_path):
    """The runbook's files in tmp_path; the server's environment points at the test databases."""
    settings.STATE_FILE = tmp_path / "state.json"
    settings.BACKUP_DIR = tmp_path / "backups"
    settings.REPORT_DIR = tmp_path / "reports"
    settings.LOG_DIR = tmp_path / "logs"
    settings.SQLITE_PATH = Path(connections.settings["sqlite"]["NAME"])
    pg = connections.settings["postgresql"]
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.live_settings",
        "PROPCORE_DATABASE_DIR": str(tmp_path),
        "SQLITE_PATH": str(settings.SQLITE_PATH),
        "POSTGRES_URL": f"postgres://{pg['USER']}@{pg['HOST']}:{pg['PORT'] or 5432}/{pg['NAME']}",
    }
    return env


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("wb")
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_live_runbook_loses_no_acknowledged_write(site, tmp_path):
    # PROPCORE_LIVE_USERS=20000 gives the README's figures; the suite runs on a few rows
    users = int(os.environ.get("PROPCORE_LIVE_USERS", "0"))
    if users:
        run("seed_demo", "--users", str(users))
    for number in range(20):
        Organisation.objects.using("sqlite").create(name=f"seed-{number}", kind="estate_agent")
    port = free_port()
    gunicorn = [str(Path(sys.executable).with_name("gunicorn")), "propcore.wsgi:application"]
    server = start(
        [*gunicorn, "--bind", f"127.0.0.1:{port}", "--workers", str(WORKERS), "--preload",
         "--timeout", "60", "--graceful-timeout", "2"],
        site, tmp_path / "gunicorn.log",
    )  # fmt: skip
    acked_file, stop_file = tmp_path / "orm_acked.txt", tmp_path / "orm_stop"
    worker = start(
        [sys.executable, "-m", "tests.live_site", str(acked_file), str(stop_file)],
        site, tmp_path / "orm_writer.log",
    )  # fmt: skip
    clients = Clients(port)
    moments: dict[str, float] = {}

    def mark(message: str) -> None:
        if message == "write freeze on":
            moments.setdefault(f"freeze_{len(moments)}", time.monotonic())

    try:
        wait_for_server(port, server)
        # (the pauses let others take SQLite's write lock: its busy wait is no queue)
        clients.start("fast", 3)
        clients.start("slow", 1, pause=0.3, hold=1.0)  # holds its transaction open for 1 s
        clients.start("late", 1, late=1.0)  # writes a second after passing the middleware
        # sessions saved by SessionMiddleware 3 s after passing the freeze check: some meet a
        # fence, raised outside any view (a 503 then, never a 500)
        clients.start("session", 2, url="/live/session/", late=3.0)
        time.sleep(1.5)

        # the online runbook: nothing pauses the writers
        run("migration_prepare")
        run("migrate_data")
        run("migrate_data", "--sync")
        copies = [json.loads(p.read_text()) for p in (tmp_path / "reports").glob("*.json")]
        read_from = {
            r["facts"]["mode"]: r["facts"]["read_from"] for r in copies if "mode" in r["facts"]
        }
        assert read_from["copy"].startswith(str(settings.BACKUP_DIR))  # the prepare's snapshot
        assert ".migrate_data-" in read_from["sync"]  # a fresh one, removed afterwards
        assert not list(settings.SQLITE_PATH.parent.glob("*.migrate_data-*"))

        # a session saved after the view, by a request that passed the freeze check before
        # the switch and saves once it is over: SQLite's fence refuses it (503, retried)
        switched_marker = tmp_path / "switched"
        clients.start("straggler", 1, url="/live/session/", until=str(switched_marker))
        time.sleep(0.5)
        switch_start = time.monotonic()
        switched = cutover.switch_to_postgresql(drain_seconds=10, progress=mark)
        switch_end = time.monotonic()
        switched_marker.touch()
        on_sqlite = names("sqlite")  # fenced: this is final
        assert fence.sqlite_fence(settings.SQLITE_PATH) is not None
        clients.start("stuck", 1, pause=0.3, hold=4.0)  # past the rollback's 2 s drain bound
        time.sleep(2)  # writes go on, on PostgreSQL

        rolled_marker = tmp_path / "rolled_back"  # the same, at the rollback (PG's fence)
        clients.start("straggler", 1, url="/live/session/", until=str(rolled_marker))
        time.sleep(0.5)
        back_start = time.monotonic()
        rolled = rollback.rollback_to_sqlite(drain_seconds=2, progress=mark)
        back_end = time.monotonic()
        rolled_marker.touch()
        on_postgres = names("postgresql")  # fenced: this is final
        time.sleep(2)  # writes go on, on SQLite again
    finally:
        clients.finish()
        stop_file.touch()  # the ORM writer ends its loop; stop() ends it if it does not
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.wait(timeout=5)
        for proc in (worker, server):
            stop(proc)

    state = read_state(settings.STATE_FILE)
    assert (state.phase, state.active_backend) == ("rolled_back", "sqlite")
    orm_acked = acked_file.read_text().split()
    sessions = clients.acked("session") + clients.acked("straggler")
    acked = [k for k in clients.acked() if k not in set(sessions)] + orm_acked
    final = names("sqlite")
    lost = [key for key in acked if final[key] != 1]
    final_sessions = session_keys("sqlite")
    lost += [key for key in sessions if final_sessions[key] != 1]
    assert not lost, f"{len(lost)} acknowledged writes missing or doubled: {lost[:10]}"
    ours = ("fast", "slow", "stuck", "late", "orm-", "seed-")  # (demo data may repeat names)
    assert not [k for k, n in final.items() if k.startswith(ours) and n != 1]  # none twice
    # after each flip, nothing landed on the store being left
    assert not set(on_sqlite) - set(on_postgres), set(on_sqlite) - set(on_postgres)
    assert not set(names("postgresql")) - set(final)
    assert orm_acked and all(k.startswith("orm-") for k in orm_acked)
    # every kind of write got through, and the slow ones outlived the freeze's start
    for kind in ("fast", "slow", "stuck", "late", "session", "straggler"):
        assert any(r.kind == kind and r.status == 201 for r in clients.results), kind
    # each straggler's first request met a fence after the view (none answered 500: below)
    stragglers = [r for r in clients.results if r.kind == "straggler"]
    first = {r.key.split("-")[0]: r.status for r in reversed(stragglers)}
    assert list(first.values()) == [503, 503], stragglers[:4]
    freezes = sorted(moments.values())
    drained = [
        len(clients.in_flight_at(t, "slow") + clients.in_flight_at(t, "stuck")) for t in freezes
    ]
    assert clients.count(500) == 0, [r for r in clients.results if r.status == 500][:5]
    figures = {
        "users": users,
        "acknowledged": len(acked) + len(sessions),
        "acknowledged_http": len(clients.acked()),
        "acknowledged_sessions": len(sessions),
        "refused_503_sessions": sum(
            1 for r in clients.results if r.kind in ("session", "straggler") and r.status == 503
        ),
        "acknowledged_orm_process": len(orm_acked),
        "lost": len(lost),
        "refused_503": clients.count(503),
        "no_answer": clients.count(0),
        "slow_requests_in_flight_at_freeze": drained,
        "switch": {
            "runbook_freeze_s": switched.freeze_seconds,
            "client_freeze_s": clients.longest_refusal(switch_start, switch_end),
        },
        "rollback": {
            "runbook_freeze_s": rolled.freeze_seconds,
            "client_freeze_s": clients.longest_refusal(back_start, back_end),
        },
    }
    print("live cutover:", json.dumps(figures))
    (tmp_path / "live_figures.json").write_text(json.dumps(figures, indent=2))
