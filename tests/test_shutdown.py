"""Graceful shutdown and rolling restarts of the documented server (deploy/gunicorn.conf.py).

gunicorn with several sync workers serves the application on the test PostgreSQL database
(test-only write endpoint in tests/live_site.py).  SIGTERM while slow requests hold their
transactions open: every one of them completes and commits, a new connection is refused at
once, and no session of the application is left in pg_stat_activity.  SIGHUP (a rolling
restart) under a steady load of concurrent clients: every request sent gets its answer.
Everything listens on 127.0.0.1 only; processes die in finally.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from django.db import connections

from accounts.models import Organisation
from dbmigration.state import MigrationState, write_state

pytestmark = [pytest.mark.slow, pytest.mark.django_db(databases="__all__", transaction=True)]
ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "deploy" / "gunicorn.conf.py"
WORKERS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admin_sql(query: str, *params):
    """A query on the test server, outside the application (and outside the test's alias)."""
    pg = connections.settings["postgresql"]
    url = f"host={pg['HOST']} port={pg['PORT'] or 5432} user={pg['USER']} dbname=postgres"
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, params or None).fetchall()


class Site:
    """The application under gunicorn with deploy/gunicorn.conf.py, on the test database."""

    def __init__(self, tmp_path: Path):
        pg = connections.settings["postgresql"]
        self.app_name = f"propcore_shutdown_{os.getpid()}_{tmp_path.name}"[:63]  # its sessions
        self.port = free_port()
        self.log = tmp_path / "gunicorn.log"
        write_state(
            tmp_path / "state.json", MigrationState(phase="switched", active_backend="postgresql")
        )
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.live_settings",
            "PROPCORE_DATABASE_DIR": str(tmp_path),
            "SQLITE_PATH": str(tmp_path / "unused.sqlite3"),
            "POSTGRES_URL": f"postgres://{pg['USER']}@{pg['HOST']}:{pg['PORT'] or 5432}/"
            f"{pg['NAME']}?application_name={self.app_name}",
            "GUNICORN_BIND": f"127.0.0.1:{self.port}",
            "GUNICORN_WORKERS": str(WORKERS),
            "GUNICORN_GRACEFUL_TIMEOUT": "20",
            "GUNICORN_ACCESS_LOG": "",
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        gunicorn = str(Path(sys.executable).with_name("gunicorn"))
        self.proc = subprocess.Popen(
            [gunicorn, "-c", str(CONFIG)],
            env=self.env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
            start_new_session=True,  # its own process group: stop() reaches orphaned workers
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:  # a real request: the workers have loaded Django
                if post(self.port, "warm-up") == 201:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"gunicorn did not serve within 60 s: {self.log.read_text()[-2000:]}")

    def sessions(self, state: str | None = None) -> int:
        query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        if state:
            return admin_sql(query + " AND state = %s", self.app_name, state)[0][0]
        return admin_sql(query, self.app_name)[0][0]

    def booted(self) -> int:
        return self.log.read_text().count("Booting worker with pid")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # workers a killed master left behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def post(port: int, key: str, *, hold: float = 0, timeout: float = 60) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", f"/live/write/?key={key}&hold={hold}")
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.fixture
def site(tmp_path):
    running = Site(tmp_path)
    try:
        yield running
    finally:
        running.stop()


def test_sigterm_finishes_requests_in_flight_refuses_new_ones_and_closes_every_session(site):
    site.start()
    answers: dict[str, int | str] = {}

    def slow(key: str) -> None:
        try:
            answers[key] = post(site.port, key, hold=3)
        except OSError as exc:
            answers[key] = repr(exc)

    keys = [f"in-flight-{n}" for n in range(WORKERS)]
    threads = [threading.Thread(target=slow, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30  # every worker inside its transaction, holding it
    while site.sessions("idle in transaction") < WORKERS and time.monotonic() < deadline:
        time.sleep(0.05)
    assert site.sessions("idle in transaction") == WORKERS, site.log.read_text()[-2000:]

    site.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the slow requests still have ~2.5 s to go
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", site.port), timeout=5).close()
    for thread in threads:
        thread.join(timeout=30)
    assert site.proc.wait(timeout=30) == 0, site.log.read_text()[-2000:]

    assert answers == dict.fromkeys(keys, 201)
    committed = set(
        Organisation._base_manager.using("postgresql")
        .filter(name__startswith="in-flight-")
        .values_list("name", flat=True)
    )
    assert committed == set(keys)
    assert site.sessions() == 0  # at once: the workers closed them, nobody waited for it
    log = site.log.read_text()
    assert log.count("closed its database pools: ['default'") >= WORKERS, log[-3000:]


def test_sighup_rolling_restart_drops_no_request_under_load(site):
    site.start()
    stop = threading.Event()
    sent, answered, failures, spans = [], [], [], []
    lock = threading.Lock()

    def client(number: int) -> None:
        sequence = 0
        while not stop.is_set():
            key = f"load-{number}-{sequence}"
            sequence += 1
            with lock:
                sent.append(key)
            began = time.monotonic()
            try:
                status = post(site.port, key, timeout=60)
            except OSError as exc:
                status = repr(exc)
            with lock:
                (answered if status == 201 else failures).append((key, status))
                spans.append((began, time.monotonic()))

    clients = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for thread in clients:
        thread.start()
    hups = []
    try:
        time.sleep(1.5)
        for restart in (1, 2):  # two rolling restarts, each replacing every worker
            hups.append(time.monotonic())
            site.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 90
            while site.booted() < (restart + 1) * WORKERS and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1)  # the new workers serve under load
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=40)
    assert not failures, (failures[:5], site.log.read_text()[-4000:])  # the worker's traceback
    assert len(sent) == len(answered) > 10, (len(sent), len(answered))
    for moment in hups:  # the restarts happened under load: requests were in flight
        assert any(began < moment < done for began, done in spans), (moment, spans)
    assert site.booted() >= 3 * WORKERS, site.log.read_text()[-3000:]
    committed = set(
        Organisation._base_manager.using("postgresql")
        .filter(name__startswith="load-")
        .values_list("name", flat=True)
    )
    assert committed == {key for key, _ in answered}

    site.proc.send_signal(signal.SIGTERM)
    assert site.proc.wait(timeout=30) == 0
    assert site.sessions() == 0


def test_close_database_connections_closes_the_pool_of_the_process(site):
    """The worker_exit hook's function, in a process of its own with Django's pool."""
    script = (
        "import django, psycopg, sys; django.setup()\n"
        "from django.db import connections\n"
        "from propcore.shutdown import close_database_connections\n"
        "connections['default'].cursor().execute('SELECT 1')\n"
        "count = 'SELECT count(*) FROM pg_stat_activity WHERE application_name = %s'\n"
        "def sessions():\n"
        "    with psycopg.connect(sys.argv[1], autocommit=True) as conn:\n"
        "        return conn.execute(count, [sys.argv[2]]).fetchone()[0]\n"
        "before = sessions()\n"
        "connections['default'].close()  # what Django does after each request\n"
        "after_request = sessions()\n"
        "closed = close_database_connections()\n"
        "print(before, after_request, sessions(), closed)\n"
    )
    pg = connections.settings["postgresql"]
    admin = f"host={pg['HOST']} port={pg['PORT'] or 5432} user={pg['USER']} dbname=postgres"
    out = subprocess.run(
        [sys.executable, "-c", script, admin, site.app_name],
        env=site.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split(maxsplit=3)
    before, after_request, after_close, closed = out
    assert int(before) >= 1 and int(after_request) >= 1  # the pool keeps its connections
    assert int(after_close) == 0, out
    assert "default" in closed
