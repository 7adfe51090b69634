"""What row-level security costs: a user lookup and a user's KYC list, p95, RLS on vs off.

    .venv/bin/python -m bench.rls --users 1000000 [--samples 2000] [--keep]

In one run, on one scratch database (``propcore_bench_rls_<pid>``, migrated by ``manage.py
migrate``, rows generated in SQL: N users, 1.2 N KYC checks spread over them), as the run's
own app_service role (db_roles' code, suffix ``_bench<pid>``), each query in its own
transaction with the identity set as the middleware sets it:

- lookup: ``SELECT * FROM accounts_user WHERE id = %s``
- kyc list: ``SELECT * FROM accounts_kycverification WHERE user_id = %s ORDER BY created_at DESC``
- kyc, as the API asks: ``SELECT * FROM accounts_kycverification ORDER BY created_at DESC``
  (no WHERE: the policy alone filters; RLS on only, off it would return every row)

"RLS off" is the same role and the same queries after ``DISABLE ROW LEVEL SECURITY`` on the
two tables.  Rounds alternate on and off so machine noise falls on both.  Prints a table of
p50/p95 in milliseconds and writes ``bench/results/<date>-rls-users<N>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from bench.pg import database_url, drop_database, recreate_database
from dbmigration.preflight import conninfo_from_url
from dbmigration.roles import drop_roles, role_names, sync_roles

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DB = f"propcore_bench_rls_{os.getpid()}"

USERS_SQL = """
INSERT INTO accounts_user (id, password, is_superuser, created_at, updated_at, email, first_name,
    last_name, phone, status, kyc_status, role, preferences, metadata, is_staff, is_active)
SELECT md5('u' || i)::uuid, '!', false, now() - i * interval '1 minute', now(),
       'user' || i || '@example.ie', 'First', 'Last', '+3538700' || i, 'active', 'pending',
       'buyer', '{}', '{}', false, true
  FROM generate_series(1, %(users)s) AS i
"""
KYC_SQL = """
INSERT INTO accounts_kycverification (id, user_id, document_type, document_reference,
    document_country, status, notes, created_at, updated_at)
SELECT md5('k' || i)::uuid, md5('u' || (1 + (i * 7919) %% %(users)s))::uuid, 'passport',
       'P' || i, 'IE', 'pending', '', now() - i * interval '1 second', now()
  FROM generate_series(1::bigint, %(kyc)s) AS i
"""
QUERIES = {
    "lookup": "SELECT * FROM accounts_user WHERE id = %s",
    "kyc list": "SELECT * FROM accounts_kycverification WHERE user_id = %s "
    "ORDER BY created_at DESC",
    "kyc as the API asks": "SELECT * FROM accounts_kycverification ORDER BY created_at DESC",
}
TABLES = ("accounts_user", "accounts_kycverification")


def build(url: str, users: int) -> None:
    recreate_database(url)
    env = {**os.environ, "POSTGRES_URL": url}
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--database", "postgresql", "-v", "0"],
        cwd=ROOT, env=env, check=True,
    )  # fmt: skip
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(USERS_SQL, {"users": users})
        conn.execute(KYC_SQL, {"users": users, "kyc": users * 6 // 5})
        conn.execute("VACUUM ANALYZE accounts_user, accounts_kycverification")


def sample_ids(url: str, count: int, seed: int) -> list:
    with psycopg.connect(url) as conn:
        ids = [row[0] for row in conn.execute("SELECT id FROM accounts_user")]
    return random.Random(seed).sample(ids, min(count, len(ids)))


def time_queries(conn, user_ids: list, *, rls: bool) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {name: [] for name in QUERIES}
    for user_id in user_ids:
        for name, query in QUERIES.items():
            if not rls and "API" in name:
                continue
            t0 = time.perf_counter()
            with conn.transaction():
                conn.execute(
                    "SELECT set_config('app.user_id', %s, true), set_config('app.role', '', true)",
                    [str(user_id)],
                )
                rows = conn.execute(query, [user_id] if "%s" in query else []).fetchall()
            timings[name].append((time.perf_counter() - t0) * 1000)
            if rls and not rows and name == "lookup":
                raise SystemExit(f"RLS hid the user's own row ({user_id}): the bench is wrong")
    return timings


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if values else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=2000, help="users looked up per mode")
    parser.add_argument("--rounds", type=int, default=4, help="alternating on/off rounds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args(argv)

    url = database_url(DB)
    names = role_names(suffix=f"_bench{os.getpid()}")
    admin = conninfo_from_url(url)
    try:
        t0 = time.perf_counter()
        build(url, args.users)
        print(f"built {args.users:,} users in {time.perf_counter() - t0:.1f} s", flush=True)
        sync_roles(conninfo=admin, names=names)
        user_ids = sample_ids(url, args.samples, args.seed)
        per_round = max(1, len(user_ids) // args.rounds)
        results: dict[str, dict[str, list[float]]] = {"on": {}, "off": {}}
        with (
            psycopg.connect(**{**admin, "user": names.app}) as conn,
            psycopg.connect(url, autocommit=True) as su,
        ):
            for start in range(0, len(user_ids), per_round):
                chunk = user_ids[start : start + per_round]
                for mode in ("on", "off"):
                    switch = "ENABLE" if mode == "on" else "DISABLE"
                    for table in TABLES:
                        su.execute(f"ALTER TABLE {table} {switch} ROW LEVEL SECURITY")
                    for name, values in time_queries(conn, chunk, rls=mode == "on").items():
                        results[mode].setdefault(name, []).extend(values)
            for table in TABLES:
                su.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    finally:
        drop_roles(conninfo=admin, names=names, new_owner=admin.get("user") or "postgres")
        if not args.keep:
            drop_database(url)

    rows = []
    print(f"\n{args.users:,} users, {len(user_ids)} users sampled per mode, ms per transaction")
    print(f"{'query':<22}{'RLS':>5}{'p50':>9}{'p95':>9}{'n':>7}")
    for name in QUERIES:
        for mode in ("on", "off"):
            values = results[mode].get(name, [])
            if not values:
                continue
            row = {"query": name, "rls": mode, "p50_ms": round(p(values, 50), 3),
                   "p95_ms": round(p(values, 95), 3), "n": len(values)}  # fmt: skip
            rows.append(row)
            print(f"{name:<22}{mode:>5}{row['p50_ms']:>9.3f}{row['p95_ms']:>9.3f}{row['n']:>7}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{dt.date.today()}-rls-users{args.users}.json"
    out.write_text(
        json.dumps({"users": args.users, "samples": len(user_ids), "rows": rows}, indent=2)
    )
    print(f"\nwritten to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
