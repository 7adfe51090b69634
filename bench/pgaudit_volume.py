"""What pgaudit writes: server-log lines and bytes, and time, per workload and configuration.

    .venv/bin/python -m bench.pgaudit_volume [--users 100000] [--requests 2000]

One private cluster preloading pgaudit (tests/clusters.py), a two-table schema (accounts_user
holds personal data, accounts_membership does not), db_roles applied (the auditor's grants).
Each configuration is set, the server restarted, then three workloads run and the log growth
is measured for each:

- runbook: COPY --users rows into each table, then count and read them back in 100 ranges
- requests: --requests web requests as app_service, each: the user by id, their memberships,
  an UPDATE of the user (3 statements)
- row by row: 10,000 single-row INSERTs into accounts_membership (a save() loop, loaddata)

Configurations: pgaudit loaded but logging nothing; deploy/postgresql-audit.conf as documented
(DDL + ROLE for everyone, reads and writes of personal-data tables through ``auditor``); and
session audit of everything (``pgaudit.log = 'all'``), the setting that floods logs.
Prints a table and writes ``bench/results/<date>-pgaudit.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path

import psycopg

from dbmigration.roles import role_names, sync_roles
from tests.clusters import PrivateCluster

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CONF = ROOT / "deploy" / "postgresql-audit.conf"
NAMES = role_names()
CONFIGS = {
    "off (loaded, logs nothing)": {"pgaudit.log": "none", "pgaudit.role": ""},
    "documented (deploy/postgresql-audit.conf)": {},
    "everything (pgaudit.log = 'all')": {"pgaudit.log": "all", "pgaudit.role": ""},
}


def _runbook(cluster: PrivateCluster, users: int) -> None:
    with psycopg.connect(**cluster.admin_conninfo("propcore"), autocommit=True) as conn:
        conn.execute("TRUNCATE accounts_user, accounts_membership")
        with conn.cursor().copy("COPY accounts_user (id, email, password) FROM STDIN") as copy:
            for n in range(1, users + 1):
                copy.write_row((n, f"user{n}@example.ie", "pbkdf2_sha256$x"))
        with conn.cursor().copy("COPY accounts_membership (id, user_id, role) FROM STDIN") as copy:
            for n in range(1, users + 1):
                copy.write_row((n, n, "member"))
        step = max(users // 100, 1)
        for table in ("accounts_user", "accounts_membership"):
            conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            for low in range(1, users + 1, step):
                conn.execute(
                    f"SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM {table} t "
                    "WHERE id >= %s AND id < %s",
                    [low, low + step],
                ).fetchone()


def _requests(cluster: PrivateCluster, users: int, requests: int) -> None:
    with psycopg.connect(cluster.url(user=NAMES.app, database="propcore")) as conn:
        for n in range(requests):
            user_id = 1 + (n * 7919) % users
            with conn.transaction():
                conn.execute("SELECT * FROM accounts_user WHERE id = %s", [user_id]).fetchone()
                conn.execute(
                    "SELECT * FROM accounts_membership WHERE user_id = %s", [user_id]
                ).fetchall()
                conn.execute("UPDATE accounts_user SET last_login = now() WHERE id = %s", [user_id])


def _row_by_row(cluster: PrivateCluster, users: int) -> None:
    with psycopg.connect(cluster.url(user=NAMES.app, database="propcore"), autocommit=True) as conn:
        for n in range(users + 1, users + 10_001):
            conn.execute(
                "INSERT INTO accounts_membership (id, user_id, role) VALUES (%s, %s, %s)",
                [n, 1, "member"],
            )


def measure(cluster: PrivateCluster, name: str, work) -> dict:
    before = cluster.log.stat().st_size
    lines_before = cluster.log_text().count("AUDIT: ")
    started = time.perf_counter()
    work()
    seconds = time.perf_counter() - started
    return {
        "workload": name,
        "seconds": round(seconds, 2),
        "log_bytes": cluster.log.stat().st_size - before,
        "audit_lines": cluster.log_text().count("AUDIT: ") - lines_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=2_000)
    args = parser.parse_args()
    results = []
    with PrivateCluster("propcore_bench_pgaudit_") as cluster:
        cluster.include(CONF)
        cluster.restart()
        cluster.sql("CREATE DATABASE propcore")
        cluster.sql(
            "CREATE TABLE accounts_user (id bigint PRIMARY KEY, email varchar(254), "
            "password varchar(128), last_login timestamptz); "
            "CREATE TABLE accounts_membership (id bigint PRIMARY KEY, user_id bigint, "
            "role varchar(20)); CREATE INDEX ON accounts_membership (user_id)",
            database="propcore",
        )
        sync_roles(conninfo=cluster.admin_conninfo("propcore"), names=NAMES)
        for config, overrides in CONFIGS.items():
            cluster.include(CONF)  # back to the documented file, then this config's changes
            cluster.configure(**overrides)
            cluster.restart()
            for name, work in (
                ("runbook", lambda: _runbook(cluster, args.users)),
                ("requests", lambda: _requests(cluster, args.users, args.requests)),
                ("row by row", lambda: _row_by_row(cluster, args.users)),
            ):
                results.append({"config": config, **measure(cluster, name, work)})
                print(results[-1], flush=True)
    print(f"\n{args.users:,} users, {args.requests:,} requests, load {os.getloadavg()[0]:.1f}\n")
    print("| configuration | workload | AUDIT lines | log bytes | seconds |")
    print("|---|---|---:|---:|---:|")
    for row in results:
        print(
            f"| {row['config']} | {row['workload']} | {row['audit_lines']:,} | "
            f"{row['log_bytes']:,} | {row['seconds']} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{dt.date.today()}-pgaudit.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
