"""Measure pgBackRest through the commands: backups, restores to a time, the drill.

    .venv/bin/python bench/pitr.py --users 100000 --repeat 3   # the demo database, migrated
    .venv/bin/python bench/pitr.py --scale 8                   # pgbench instead (800k rows)

A private cluster on a free port under a temp dir (removed at the end).  With --users the
demo SQLite database is seeded, migrated with Django's schema and copied by migrate_data into
the cluster's database "propcore" (untimed).  Then each step is the real manage.py command in
a subprocess, timed from outside, --repeat times: db_backup (full, then diff after writes),
db_restore --to-time into a database beside the live one, db_pitr restore --to-time into a
scratch cluster, db_restore_drill.  Prints one line per step with the median and every run.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pg_bin(name: str) -> str:
    return shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1]


def as_postgres(*cmd: str) -> None:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*prefix, *cmd], check=True, capture_output=True, timeout=3600)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report(step: str, runs: list[float], extra: str = "") -> None:
    every = ", ".join(f"{s:.1f}" for s in runs)
    print(f"{step}: median {statistics.median(runs):.1f} s ({every}){extra}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, help="seed and migrate the demo database")
    parser.add_argument("--scale", type=int, default=8, help="pgbench scale (without --users)")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="propcore_bench_pitr_"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "live", free_port()
    state_dir = root / "state"
    dbname = "propcore"
    url = f"host=127.0.0.1 port={port} user=postgres dbname={dbname}"
    env = {
        **os.environ,
        "PROPCORE_DATABASE_DIR": str(state_dir),
        "POSTGRES_URL": f"postgres://postgres@127.0.0.1:{port}/{dbname}",
    }
    env.pop("SQLITE_PATH", None)
    state_dir.mkdir()
    state_dir.chmod(0o755)
    start_cmd = [
        pg_bin("pg_ctl"), "-D", str(data), "-l", str(root / "live.log"), "-w",
        "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start",
    ]  # fmt: skip

    def manage(*cmd: str, stdin: str | None = None) -> float:
        began = time.perf_counter()
        subprocess.run(
            [sys.executable, "manage.py", *cmd],
            cwd=ROOT,
            env=env,
            check=True,
            timeout=3600,
            input=stdin,
            text=True,
            stdout=subprocess.DEVNULL,
        )
        return time.perf_counter() - began

    def sql(query: str):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(query)
            return cur.fetchall() if cur.description else None

    def writes(rows: int) -> None:
        sql("CREATE TABLE IF NOT EXISTS bench_writes (id serial PRIMARY KEY, at timestamptz "
            "DEFAULT clock_timestamp(), pad text)")  # fmt: skip
        sql(f"INSERT INTO bench_writes (pad) SELECT md5(g::text) FROM generate_series(1, {rows}) g")

    try:
        as_postgres(pg_bin("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust")
        as_postgres(*start_cmd)
        as_postgres(pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                    dbname)  # fmt: skip
        began = time.perf_counter()
        if args.users:
            from dbmigration import state as state_mod

            manage("migrate", "--database", "sqlite", "-v", "0")
            manage("seed_demo", "--users", str(args.users), "-v", "0")
            manage("migrate", "--database", "postgresql", "-v", "0")
            state_mod.transition(state_dir / "state.json", "prepared", note="bench/pitr.py")
            manage("migrate_data", "--no-verify", "-v", "0")
            what = f"demo database, {args.users:,} users"
        else:
            as_postgres(pg_bin("pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        "-i", "-q", "-s", str(args.scale), dbname)  # fmt: skip
            what = f"pgbench scale {args.scale}"
        tables = [t for (t,) in sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        rows = sum(sql(f'SELECT count(*) FROM "{t}"')[0][0] for t in tables)
        size = sql("SELECT pg_database_size(current_database())")[0][0]
        print(f"{what}: {rows:,} rows, {size / 1e6:.0f} MB (built in "
              f"{time.perf_counter() - began:.0f} s, untimed)", flush=True)  # fmt: skip

        report("setup --apply", [manage("db_pitr", "setup", "--apply")], " (then a restart)")
        as_postgres(pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        as_postgres(*start_cmd)
        report("check", [manage("db_pitr", "check")])
        full, diff, beside, scratch, drill = [], [], [], [], []
        for number in range(args.repeat):
            full.append(manage("db_backup", "--backend", "postgresql", "--type", "full"))
            writes(20_000)  # writes after the full backup
            diff.append(manage("db_backup", "--backend", "postgresql", "--type", "diff"))
            writes(5_000)
            target = sql("SELECT clock_timestamp()")[0][0]
            time.sleep(1)
            writes(5_000)
            manage("db_pitr", "check")
            at = target.isoformat(sep=" ")
            beside.append(manage("db_restore", "--to-time", at, "--target-db", f"at_{number}"))
            # the next full backup must not carry this copy too (pgBackRest backs up clusters)
            as_postgres(pg_bin("dropdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                        f"at_{number}")  # fmt: skip
            restored = root / f"restored_{number}"
            scratch.append(
                manage("db_pitr", "restore", "--to-time", at, "--target-dir", str(restored))
            )
            as_postgres(pg_bin("pg_ctl"), "-D", str(restored), "-m", "immediate", "stop")
            shutil.rmtree(restored)
            drill.append(manage("db_restore_drill", "--scratch-dir", str(root)))
        import json

        stanza = json.loads(
            subprocess.run(
                [
                    "runuser",
                    "-u",
                    "postgres",
                    "--",
                    "pgbackrest",
                    f"--config={state_dir / 'pgbackrest' / 'pgbackrest.conf'}",
                    "--stanza=propcore",
                    "info",
                    "--output=json",
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout  # fmt: skip
        )[0]["backup"]
        fulls = [b for b in stanza if b["type"] == "full"]
        diffs = [b for b in stanza if b["type"] == "diff"]
        report(
            "db_backup --type full (+ pgbackrest verify)",
            full,
            f"; {fulls[-1]['info']['size'] / 1e6:.0f} MB cluster, "
            f"{fulls[-1]['info']['repository']['delta'] / 1e6:.1f} MB in the repository",
        )
        report(
            "db_backup --type diff after 20k rows (+ verify)",
            diff,
            f"; {diffs[-1]['info']['repository']['delta'] / 1e6:.1f} MB in the repository",
        )
        report("db_restore --to-time --target-db (scratch cluster, dump, load, count)", beside)
        report("db_pitr restore --to-time (scratch cluster: restore, WAL, start, count)", scratch)
        report("db_restore_drill (restore point, restore, counts, 5 checksums)", drill)
        print(f"load: {os.getloadavg()[0]:.1f} (1 min), {os.cpu_count()} cores", flush=True)
    finally:
        for cluster in root.iterdir():
            if (cluster / "postmaster.pid").exists():
                as_postgres(pg_bin("pg_ctl"), "-D", str(cluster), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
