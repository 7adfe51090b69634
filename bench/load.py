"""Load test: the app under gunicorn on PostgreSQL at N users, native pool vs PgBouncer, +replica.

    .venv/bin/python bench/load.py --users 1000000 [--repeat 3] [--modes native,pgbouncer,replica]
    make bench-load LOAD_USERS=1000000

What it builds (once per scale, kept under var/bench/load-<N>/ for the next run; --rebuild):
a private primary with pg_stat_statements and a streaming standby (ports 55171, 55172), the
schema by ``manage.py migrate``, the app's own roles (db_roles' code: the app connects as the
app role, so row-level security is on as in production), and rows made in SQL: N users (20
of them staff), N/100 organisations, N memberships, 1.2 N KYC checks, 3 N login events.
Sessions for 2,000 users and the staff are made with Django's SessionStore.

What it runs, per mode (``native``: Django's pool; ``pgbouncer``: a PgBouncer in transaction
mode on 55173; ``replica``: native pool plus POSTGRES_REPLICA_URLS=the standby), against
gunicorn (``--workers`` x ``--threads``, gthread, the dev profile with DEBUG off):

1. capacity: ``--clients`` (200) concurrent clients, closed loop, ``--seconds``: throughput,
   errors (anything but the expected status), PostgreSQL client connections at peak;
2. latency: an open loop at half that throughput for ``--seconds``: p50/p95/p99 per endpoint,
   measured from when each request was due (no coordinated omission), and the database time
   of the hottest statements (pg_stat_statements: mean and max; it keeps no percentiles).

The mix (weights): the self-service API (me 30, kyc 20, logins 20), the admin's user list (5),
a user search (5) and the login events list (5), and a staff login (5: a write: session row,
last_login).  ``--mix api`` leaves the admin pages out (before migration 0006 their full
scans saturated a small machine by themselves).  Each run's table goes to
bench/results/<date>-load-users<N>-<mix>.md and .json; with --repeat the cells are medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from dbmigration.preflight import conninfo_from_url  # noqa: E402
from dbmigration.roles import role_names, sync_roles  # noqa: E402
from propcore.pgserver import _as_postgres_user, find_pg_bin  # noqa: E402

RESULTS = ROOT / "bench" / "results"
HOST = "127.0.0.1"
DB = "propcore"
PASSWORD = "bench-load-password"
SECRET_KEY = "bench-load-secret-key-not-for-production-0123456789"
STAFF = 20
SESSIONS = 2000
MODES = ("native", "pgbouncer", "replica")
# (name, weight, who, method, path): "user" and "staff" requests carry a session
MIX = (
    ("api me", 30, "user", "GET", "/api/me/"),
    ("api kyc", 20, "user", "GET", "/api/me/kyc/"),
    ("api logins", 20, "user", "GET", "/api/me/logins/"),
    ("admin users", 5, "staff", "GET", "/admin/accounts/user/"),
    ("admin user search", 5, "staff", "GET", "/admin/accounts/user/?q={email}"),
    ("admin login events", 5, "staff", "GET", "/admin/accounts/loginevent/"),
    ("login (write)", 5, "anon", "POST", "/admin/login/"),
)
EXPECTED = {"POST": 302, "GET": 200}
# --mix api: the self-service API and logins only (what the API costs without the admin)
MIXES = {"full": MIX, "api": tuple(op for op in MIX if not op[4].startswith("/admin/accounts/"))}

ORGS_SQL = """
INSERT INTO accounts_organisation (id, name, kind, cro_number, vat_number, psra_licence, email,
    phone, address_line1, address_line2, town, county, eircode, website, metadata, created_at,
    updated_at)
SELECT md5('o' || i)::uuid, 'Organisation ' || i, 'estate_agent', '', '', '', '', '', '', '', '',
       'Dublin', '', '', '{}', now(), now()
  FROM generate_series(1, %(orgs)s) AS i
"""
USERS_SQL = """
INSERT INTO accounts_user (id, password, is_superuser, created_at, updated_at, email, first_name,
    last_name, phone, status, kyc_status, role, preferences, metadata, is_staff, is_active,
    organisation_id)
SELECT md5('u' || i)::uuid, %(password)s, i <= %(staff)s, now() - i * interval '1 minute', now(),
       'user' || i || '@example.ie', 'First' || (i %% 1000), 'Last' || (i %% 5000),
       '+3538700' || i, 'active', 'pending', 'buyer', '{}', '{}', i <= %(staff)s, true,
       md5('o' || (1 + i %% %(orgs)s))::uuid
  FROM generate_series(1, %(users)s) AS i
"""
MEMBERSHIPS_SQL = """
INSERT INTO accounts_membership (user_id, organisation_id, role, title, created_at, updated_at)
SELECT md5('u' || i)::uuid, md5('o' || (1 + i %% %(orgs)s))::uuid, 'member', '', now(), now()
  FROM generate_series(1, %(users)s) AS i
"""
KYC_SQL = """
INSERT INTO accounts_kycverification (id, user_id, document_type, document_reference,
    document_country, status, notes, created_at, updated_at)
SELECT md5('k' || i)::uuid, md5('u' || (1 + (i * 7919) %% %(users)s))::uuid, 'passport',
       'P' || i, 'IE', 'pending', '', now() - i * interval '1 second', now()
  FROM generate_series(1::bigint, %(kyc)s) AS i
"""
LOGINS_SQL = """
INSERT INTO accounts_loginevent (user_id, email_attempted, ip_address, user_agent, success,
    failure_reason, created_at)
SELECT md5('u' || (1 + (i * 104729) %% %(users)s))::uuid, '', '10.0.0.1', 'bench', true, '',
       now() - i * interval '1 second'
  FROM generate_series(1::bigint, %(logins)s) AS i
"""
SESSIONS_SCRIPT = """
import json, sys
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore
from accounts.models import User
from propcore.rls import db_identity
out = {}
with db_identity(role="staff"):
    for kind, ids in json.load(sys.stdin).items():
        keys = out.setdefault(kind, [])
        for user in User.objects.filter(pk__in=ids):
            s = SessionStore()
            s[SESSION_KEY], s[BACKEND_SESSION_KEY] = str(user.pk), "propcore.rls.RlsModelBackend"
            s[HASH_SESSION_KEY] = user.get_session_auth_hash()
            s.create()
            keys.append(s.session_key)
print(json.dumps(out))
"""


def say(message: str) -> None:
    print(message, flush=True)


# --- servers -------------------------------------------------------------------------------


def _pg(*cmd: str) -> None:
    subprocess.run(_as_postgres_user(list(cmd)), check=True, capture_output=True, timeout=3600)


def _chown(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres")


def start_server(data: Path, port: int, *extra: str) -> None:
    options = f"-p {port} -k {data.parent} -c listen_addresses={HOST} " + " ".join(extra)
    _pg(find_pg_bin("pg_ctl"), "-D", str(data), "-l", str(data.parent / f"{data.name}.log"),
        "-w", "-t", "600", "-o", options, "start")  # fmt: skip


def stop_server(data: Path) -> None:
    if (data / "postmaster.pid").exists():
        _pg(find_pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")


PRIMARY_OPTIONS = (
    "-c shared_preload_libraries=pg_stat_statements",
    "-c max_connections=300",
    "-c shared_buffers=1GB",
    "-c max_wal_size=4GB",
)


def url(port: int, user: str = "postgres") -> str:
    return f"postgres://{user}@{HOST}:{port}/{DB}"


def start_pair(root: Path, p_port: int, s_port: int) -> None:
    """The primary and its streaming standby (built by build() when missing)."""
    start_server(root / "primary", p_port, *PRIMARY_OPTIONS)
    start_server(root / "standby", s_port, *PRIMARY_OPTIONS, "-c hot_standby_feedback=on")


def migrate(p_port: int) -> None:
    """Bring the schema up to date (kept data from an older commit lacks newer indexes)."""
    env = {**os.environ, **django_env(url(p_port), pooling="native")}
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True
    )


def build(root: Path, users: int, p_port: int, s_port: int) -> None:
    """A primary holding the schema and the rows, then a standby from its base backup."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    _chown(root)
    primary = root / "primary"
    _pg(find_pg_bin("initdb"), "-D", str(primary), "-U", "postgres", "-A", "trust", "-E", "UTF8")
    start_server(primary, p_port, *PRIMARY_OPTIONS)
    admin = url(p_port).replace(f"/{DB}", "/postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {DB}")
    migrate(p_port)
    from django.contrib.auth.hashers import PBKDF2PasswordHasher

    # Django's default hasher and iterations: a login costs what it costs in production
    # (and a full-length salt: a short one makes Django re-hash the password at each login,
    # which changes the session hash and logs the user's other sessions out)
    hasher = PBKDF2PasswordHasher()
    hashed = hasher.encode(PASSWORD, hasher.salt())
    counts = {"users": users, "orgs": max(1, users // 100), "staff": STAFF}
    counts.update(kyc=users * 6 // 5, logins=users * 3, password=hashed)
    with psycopg.connect(url(p_port), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        for name, sql in (
            ("organisations", ORGS_SQL),
            ("users", USERS_SQL),
            ("memberships", MEMBERSHIPS_SQL),
            ("kyc checks", KYC_SQL),
            ("login events", LOGINS_SQL),
        ):
            t0 = time.perf_counter()
            conn.execute(sql, counts)
            say(f"  {name}: {time.perf_counter() - t0:.1f} s")
        conn.execute("VACUUM ANALYZE")
    sync_roles(conninfo=conninfo_from_url(url(p_port)), names=role_names())
    _pg(find_pg_bin("pg_basebackup"), "-h", HOST, "-p", str(p_port), "-U", "postgres",
        "-D", str(root / "standby"), "-R", "-X", "stream")  # fmt: skip
    start_server(root / "standby", s_port, *PRIMARY_OPTIONS, "-c hot_standby_feedback=on")
    (root / "built").write_text(json.dumps({"users": users}))


def make_sessions(p_port: int, users: int) -> dict[str, list[str]]:
    rng = random.Random(users)
    ids = {
        "user": [_uid(i) for i in rng.sample(range(STAFF + 1, users + 1), SESSIONS)],
        "staff": [_uid(i) for i in range(1, STAFF + 1)],
    }
    env = {**os.environ, **django_env(url(p_port), pooling="native")}
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", SESSIONS_SCRIPT],
        cwd=ROOT, env=env, input=json.dumps(ids), capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def _uid(i: int) -> str:
    import hashlib
    import uuid

    return str(uuid.UUID(hashlib.md5(f"u{i}".encode()).hexdigest()))


def start_pgbouncer(root: Path, port: int, p_port: int, pool: int) -> subprocess.Popen:
    app = role_names().app
    (root / "userlist.txt").write_text(f'"{app}" ""\n"postgres" ""\n')
    (root / "pgbouncer.ini").write_text(
        f"""[databases]
{DB} = host={HOST} port={p_port} dbname={DB}

[pgbouncer]
listen_addr = {HOST}
listen_port = {port}
unix_socket_dir =
pool_mode = transaction
server_reset_query =
max_client_conn = 1000
default_pool_size = {pool}
auth_type = trust
auth_file = {root / "userlist.txt"}
ignore_startup_parameters = extra_float_digits,options
"""
    )
    for path in (root / "userlist.txt", root / "pgbouncer.ini"):
        _chown(path)
    command = _as_postgres_user(["/usr/sbin/pgbouncer", str(root / "pgbouncer.ini")])
    log = (root / "pgbouncer.log").open("wb")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    wait_port(port, process)
    return process


def wait_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        if process.poll() is not None:
            raise SystemExit(f"process on port {port} exited with {process.returncode}")
        time.sleep(0.1)
    raise SystemExit(f"nothing answers on port {port}")


def stop(process: subprocess.Popen) -> None:
    """Stop the process group this bench started; the next mode needs its port free."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait)
            return


def django_env(db_url: str, *, pooling: str, replica: str = "", workers: int = 1) -> dict:
    # not the prod profile: it demands HTTPS (every plain-HTTP request becomes a redirect) and
    # TLS to PostgreSQL; dev with DEBUG off serves the same code without either
    return {
        "PROPCORE_ENV": "dev",
        "DEBUG": "false",
        "SECRET_KEY": SECRET_KEY,
        "POSTGRES_URL": db_url,
        "POSTGRES_POOLING": pooling,
        "POSTGRES_REPLICA_URLS": replica,
        "DATABASE_ACTIVE": "postgresql",
        "PROPCORE_DATABASE_DIR": str(ROOT / "var" / "bench" / "load-database"),
        "ALLOWED_HOSTS": HOST,
        "WEB_CONCURRENCY": str(workers),
    }


def start_gunicorn(port: int, env: dict, workers: int, threads: int, log: Path) -> subprocess.Popen:
    command = [
        str(Path(sys.executable).parent / "gunicorn"), "propcore.wsgi:application",
        "-b", f"{HOST}:{port}", "-w", str(workers), "-k", "gthread", "--threads", str(threads),
        "--backlog", "2048", "--timeout", "120",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, **env}, stdout=log.open("ab"),
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    wait_port(port, process)
    time.sleep(1)
    if process.poll() is not None:  # the port answered, but not this gunicorn
        raise SystemExit(f"gunicorn exited with {process.returncode}: see {log}")
    return process


# --- the load ------------------------------------------------------------------------------


class Client:
    """HTTP/1.1 with Connection: close over asyncio streams: cheap enough to run 200 at once."""

    def __init__(
        self, port: int, sessions: dict[str, list[str]], csrf: tuple[str, str], users: int
    ):
        self.port, self.sessions, self.csrf, self.users = port, sessions, csrf, users
        self.rng = random.Random(7)

    def request_for(self, op: tuple) -> tuple[str, str, dict, bytes]:
        name, _, who, method, path = op
        headers = {"Host": HOST}
        body = b""
        if "{email}" in path:
            path = path.format(email=f"user{self.rng.randint(STAFF + 1, self.users)}%40example.ie")
        if who in ("user", "staff"):
            headers["Cookie"] = f"sessionid={self.rng.choice(self.sessions[who])}"
        if method == "POST":
            cookie, token = self.csrf
            email = f"user{self.rng.randint(1, STAFF)}@example.ie"
            form = {"csrfmiddlewaretoken": token, "username": email, "password": PASSWORD}
            body = urlencode({**form, "next": "/admin/"}).encode()
            headers["Cookie"] = f"csrftoken={cookie}"
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            headers["Content-Length"] = str(len(body))
        return method, path, headers, body

    async def send(self, op: tuple) -> tuple[int, float]:
        method, path, headers, body = self.request_for(op)
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        t0 = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.port), 30)
            writer.write((head + "Connection: close\r\n\r\n").encode() + body)
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 60)
            await asyncio.wait_for(reader.read(), 60)
            writer.close()
            status = int(status_line.split()[1]) if status_line else 0
        except (TimeoutError, OSError, ValueError, IndexError):
            status = 0
        return status, time.perf_counter() - t0


def pick(rng: random.Random) -> tuple:
    return rng.choices(MIX, weights=[op[1] for op in MIX])[0]


async def closed_loop(client: Client, clients: int, seconds: float) -> dict:
    results: list[tuple[str, int, float]] = []
    deadline = time.perf_counter() + seconds

    async def one(seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            op = pick(rng)
            status, took = await client.send(op)
            results.append((op[0], status, took))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(clients)))
    return summarise(results, time.perf_counter() - t0)


async def open_loop(client: Client, rate: float, seconds: float) -> dict:
    results: list[tuple[str, int, float]] = []
    rng = random.Random(11)
    start = time.perf_counter()
    total = int(rate * seconds)

    async def one(op: tuple, due: float) -> None:
        status, _ = await client.send(op)
        results.append((op[0], status, time.perf_counter() - due))  # from when it was due

    tasks = []
    for n in range(total):
        due = start + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(pick(rng), due)))
    await asyncio.gather(*tasks)
    return summarise(results, time.perf_counter() - start)


def summarise(results: list[tuple[str, int, float]], seconds: float) -> dict:
    expected = {op[0]: EXPECTED[op[3]] for op in MIX}
    errors: dict[str, int] = {}
    per: dict[str, list[float]] = {}
    for name, status, took in results:
        if status != expected[name]:
            kind = f"{name}: {status or 'no answer'}"
            errors[kind] = errors.get(kind, 0) + 1
        per.setdefault(name, []).append(took * 1000)
    everything = [ms for values in per.values() for ms in values]
    return {
        "requests": len(results),
        "seconds": round(seconds, 1),
        "throughput": round(len(results) / seconds, 1),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "all": percentiles(everything),
        "endpoints": {name: percentiles(values) for name, values in per.items()},
    }


def percentiles(values: list[float]) -> dict:
    if len(values) < 2:
        return {"n": len(values), "p50": None, "p95": None, "p99": None}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "n": len(values),
        "p50": round(q[49], 1),
        "p95": round(q[94], 1),
        "p99": round(q[98], 1),
    }


class PeakConnections(threading.Thread):
    """Client backends on the primary, sampled every 0.25 s while the load runs."""

    def __init__(self, p_port: int):
        super().__init__(daemon=True)
        self.p_port, self.peak, self.done = p_port, 0, threading.Event()

    def run(self) -> None:
        with psycopg.connect(url(self.p_port), autocommit=True) as conn:
            while not self.done.wait(0.25):
                count = conn.execute(
                    "SELECT count(*) - 1 FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend'"
                ).fetchone()[0]
                self.peak = max(self.peak, count)


def warm_caches(p_port: int, s_port: int) -> None:
    """Read every table and index of the app into the OS cache on both servers.

    Without it the first mode measured after a start pays the cold cache, and the standby
    (its own copy of the files) starts cold while the primary is warm from the build.
    """
    with psycopg.connect(url(p_port), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    with psycopg.connect(url(s_port), autocommit=True) as conn:
        for _ in range(600):  # the extension must have replayed on the standby
            if conn.execute("SELECT pg_last_wal_replay_lsn() >= %s", [lsn]).fetchone()[0]:
                break
            time.sleep(0.1)
    for port in (p_port, s_port):
        with psycopg.connect(url(port), autocommit=True) as conn:
            pages = conn.execute(
                "SELECT coalesce(sum(pg_prewarm(c.oid::regclass, 'read')), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
                "AND c.relkind IN ('r', 'i') "
                "AND (c.relname LIKE 'accounts%%' OR c.relname LIKE 'django_session%%')"
            ).fetchone()[0]
        say(f"  warmed {pages * 8 // 1024:,} MB on port {port}")


def hot_statements(p_port: int, limit: int = 6) -> list[dict]:
    with psycopg.connect(url(p_port), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT calls, mean_exec_time, max_exec_time, total_exec_time, query "
            "FROM pg_stat_statements JOIN pg_database d ON d.oid = dbid "
            "WHERE d.datname = %s AND query !~* '^(BEGIN|COMMIT|ROLLBACK|SELECT set_config)' "
            "AND query !~ 'pg_stat_statements_reset' "
            "ORDER BY total_exec_time DESC LIMIT %s",
            [DB, limit],
        ).fetchall()
    return [
        {"calls": c, "mean_ms": round(mean, 2), "max_ms": round(mx, 1), "total_ms": round(total),
         "query": re.sub(r"\s+", " ", q)[:160]}
        for c, mean, mx, total, q in rows
    ]  # fmt: skip


def standby_commits(s_port: int) -> int:
    with psycopg.connect(url(s_port), autocommit=True) as conn:
        return conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", [DB]
        ).fetchone()[0]


def csrf_pair(port: int) -> tuple[str, str]:
    """One CSRF cookie and form token: Django accepts the pair for every later POST."""
    import http.client

    for attempt in range(10):  # a worker still starting may reset the first connection
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=60)
            conn.request("GET", "/admin/login/", headers={"Host": HOST})
            response = conn.getresponse()
            page = response.read().decode()
            break
        except OSError:
            if attempt == 9:
                raise
            time.sleep(2)
    cookie = re.search(r"csrftoken=([^;]+)", response.getheader("Set-Cookie") or "")[1]
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)[1]
    return cookie, token


def run_mode(mode: str, args, root: Path, sessions: dict) -> dict:
    p_port, s_port, b_port, g_port = args.port, args.port + 1, args.port + 2, args.port + 3
    app = role_names().app
    bouncer = None
    if mode == "pgbouncer":
        bouncer = start_pgbouncer(root, b_port, p_port, args.pgbouncer_pool)
        env = django_env(url(b_port, app), pooling="pgbouncer", workers=args.workers)
    else:
        replica = url(s_port, app) if mode == "replica" else ""
        env = django_env(url(p_port, app), pooling="native", replica=replica, workers=args.workers)
    gunicorn = start_gunicorn(g_port, env, args.workers, args.threads, root / "gunicorn.log")
    try:
        client = Client(g_port, sessions, csrf_pair(g_port), args.users)
        asyncio.run(closed_loop(client, 20, 3))  # warm the pools and caches
        peak = PeakConnections(p_port)
        peak.start()
        capacity = asyncio.run(closed_loop(client, args.clients, args.seconds))
        peak.done.set()
        peak.join()
        for port in (p_port, s_port) if mode == "replica" else (p_port,):
            with psycopg.connect(url(port), autocommit=True) as conn:
                conn.execute("SELECT pg_stat_statements_reset()")  # a standby's own counters
        before = standby_commits(s_port)
        rate = max(1.0, capacity["throughput"] / 2)
        latency = asyncio.run(open_loop(client, rate, args.seconds))
        return {
            "mode": mode,
            "capacity": capacity,
            "peak_connections": peak.peak,
            "rate": round(rate, 1),
            "latency": latency,
            "hot_statements": hot_statements(p_port),
            "standby_hot_statements": hot_statements(s_port) if mode == "replica" else [],
            "standby_commits": standby_commits(s_port) - before,
        }
    finally:
        stop(gunicorn)
        if bouncer:
            stop(bouncer)


# --- the table -----------------------------------------------------------------------------


def median_of(runs: list[dict], path: tuple) -> float | None:
    values = []
    for run in runs:
        value = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            values.append(value)
    return round(statistics.median(values), 1) if values else None


def render(by_mode: dict[str, list[dict]], meta: dict) -> str:
    lines = [
        f"Load test, {meta['users']:,} users, {meta['workers']} gunicorn workers x "
        f"{meta['threads']} threads, {meta['clients']} clients, mix {meta['mix']}, "
        f"{meta['seconds']} s per phase, "
        f"median of {meta['repeat']}; {meta['machine']}; load average {meta['load_before']} "
        f"before, {meta['load_after']} after",
        "",
        "| mode | capacity req/s | errors | PG connections at peak | open loop req/s | "
        "p50 ms | p95 ms | p99 ms | standby transactions |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, runs in by_mode.items():
        cells = [
            median_of(runs, ("capacity", "throughput")),
            sum(r["capacity"]["errors"] + r["latency"]["errors"] for r in runs),
            median_of(runs, ("peak_connections",)),
            median_of(runs, ("rate",)),
            median_of(runs, ("latency", "all", "p50")),
            median_of(runs, ("latency", "all", "p95")),
            median_of(runs, ("latency", "all", "p99")),
            median_of(runs, ("standby_commits",)),
        ]
        lines.append(f"| {mode} | " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "p95 ms per endpoint in the open loop (p50 / p95 / p99):", ""]
    modes = list(by_mode)
    lines.append("| endpoint | " + " | ".join(modes) + " |")
    lines.append("|---|" + "---:|" * len(modes))
    for op in MIX:
        cells = []
        for mode in modes:
            p = [
                median_of(by_mode[mode], ("latency", "endpoints", op[0], k))
                for k in ("p50", "p95", "p99")
            ]
            cells.append(" / ".join(str(x) for x in p))
        lines.append(f"| {op[0]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Hottest statements in the open loop (last run of each mode, pg_stat_statements):",
        "",
    ]
    for mode, runs in by_mode.items():
        lines.append(f"- {mode}:")
        for where, key in (("", "hot_statements"), ("standby: ", "standby_hot_statements")):
            for s in runs[-1].get(key, []):
                lines.append(
                    f"  - {where}{s['calls']} calls, mean {s['mean_ms']} ms, max {s['max_ms']} ms: "
                    f"`{s['query'][:110]}`"
                )
    errors = {
        k: v
        for mode in by_mode.values()
        for r in mode
        for part in ("capacity", "latency")
        for k, v in r[part]["error_kinds"].items()
    }
    if errors:
        lines += ["", f"Errors: {errors}"]
    return "\n".join(lines)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--pgbouncer-pool", type=int, default=20)
    parser.add_argument("--port", type=int, default=55171, help="primary; +1 standby, +2 "
                        "PgBouncer, +3 gunicorn")  # fmt: skip
    parser.add_argument("--mix", choices=sorted(MIXES), default="full")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the data even if kept")
    parser.add_argument("--drop", action="store_true", help="remove the servers' files at the end")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(
            f"unknown mode(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}"
        )

    global MIX
    MIX = MIXES[args.mix]
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "propcore.settings")
    root = ROOT / "var" / "bench" / f"load-{args.users}"
    p_port, s_port = args.port, args.port + 1
    load_before = load_average()
    try:
        built = json.loads((root / "built").read_text()) if (root / "built").exists() else None
        if built is None or args.rebuild:
            t0 = time.perf_counter()
            say(f"building {args.users:,} users in {root} ...")
            django_setup(p_port)
            build(root, args.users, p_port, s_port)
            say(f"built in {time.perf_counter() - t0:.0f} s")
        else:
            start_pair(root, p_port, s_port)
            migrate(p_port)
        sessions = make_sessions(p_port, args.users)
        warm_caches(p_port, s_port)
        by_mode: dict[str, list[dict]] = {m: [] for m in modes}
        for round_ in range(args.repeat):
            for mode in modes:  # modes alternate, so machine noise falls on each
                say(f"round {round_ + 1}/{args.repeat}: {mode} (load average {load_average()})")
                result = run_mode(mode, args, root, sessions)
                by_mode[mode].append(result)
                cap, lat = result["capacity"], result["latency"]
                say(
                    f"  capacity {cap['throughput']} req/s, {cap['errors']} errors, "
                    f"{result['peak_connections']} PG connections; open loop {result['rate']} "
                    f"req/s: p95 {lat['all']['p95']} ms, {lat['errors']} errors"
                )
        meta = {
            "users": args.users, "workers": args.workers, "threads": args.threads,
            "clients": args.clients, "seconds": args.seconds, "repeat": args.repeat,
            "mix": args.mix,
            "machine": f"{os.cpu_count()} cores", "load_before": load_before,
            "load_after": load_average(), "date": dt.datetime.now(dt.UTC).isoformat(),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                     capture_output=True, text=True).stdout.strip(),
        }  # fmt: skip
        table = render(by_mode, meta)
        say("\n" + table)
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = RESULTS / f"{dt.date.today()}-load-users{args.users}-{args.mix}"
        stem.with_suffix(".md").write_text(table + "\n")
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": by_mode}, indent=1))
        say(f"written to {stem}.md and .json")
    finally:
        for data in (root / "standby", root / "primary"):
            with contextlib.suppress(Exception):
                stop_server(data)
        if args.drop:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def django_setup(p_port: int) -> None:
    import django

    os.environ.update(django_env(url(p_port), pooling="native"))
    (ROOT / "var" / "bench" / "load-database").mkdir(parents=True, exist_ok=True)
    django.setup()


if __name__ == "__main__":
    sys.exit(main())
