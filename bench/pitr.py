"""Measure pgBackRest through db_pitr: setup, full and diff backups, restore to a time, drill.

    .venv/bin/python bench/pitr.py --scale 8      # pgbench scale 8: 800k rows (~767k rows of
                                                  # the 100k-user demo), ~120 MB
A private cluster on a free port under a temp dir (removed at the end); each step is the
real manage.py command in a subprocess, timed from outside.  Prints one line per step.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pg_bin(name: str) -> str:
    return shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1]


def as_postgres(*cmd: str) -> None:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    subprocess.run([*prefix, *cmd], check=True, capture_output=True, timeout=3600)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=8)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="propcore_bench_pitr_"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "live", free_port()
    env = {
        **os.environ,
        "PROPCORE_DATABASE_DIR": str(root / "state"),
        "POSTGRES_URL": f"postgres://postgres@127.0.0.1:{port}/postgres",
    }
    (root / "state").mkdir()
    (root / "state").chmod(0o755)
    start_cmd = [
        pg_bin("pg_ctl"), "-D", str(data), "-l", str(root / "live.log"), "-w",
        "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start",
    ]  # fmt: skip

    def manage(*cmd: str) -> float:
        began = time.perf_counter()
        subprocess.run(
            [sys.executable, "manage.py", *cmd], cwd=ROOT, env=env, check=True, timeout=3600
        )
        return time.perf_counter() - began

    def pgbench(*cmd: str) -> None:
        as_postgres(pg_bin("pgbench"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", *cmd)

    try:
        as_postgres(pg_bin("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust")
        as_postgres(*start_cmd)
        began = time.perf_counter()
        pgbench("-i", "-q", "-s", str(args.scale), "postgres")
        print(f"pgbench -i -s {args.scale}: {time.perf_counter() - began:.1f} s")
        print(f"setup --apply: {manage('db_pitr', 'setup', '--apply'):.1f} s (then a restart)")
        as_postgres(pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        as_postgres(*start_cmd)
        print(f"check: {manage('db_pitr', 'check'):.1f} s")
        print(f"full backup + verify: {manage('db_pitr', 'backup', '--type', 'full'):.1f} s")
        pgbench("-n", "-t", "2000", "postgres")  # writes after the full backup
        print(f"diff backup + verify: {manage('db_pitr', 'backup', '--type', 'diff'):.1f} s")
        pgbench("-n", "-t", "500", "postgres")
        target = datetime.now(UTC)
        time.sleep(1)
        pgbench("-n", "-t", "500", "postgres")
        manage("db_pitr", "check")
        restored = root / "restored"
        seconds = manage(
            "db_pitr", "restore", "--to-time", target.isoformat(), "--target-dir", str(restored)
        )
        print(f"restore to a time (diff + WAL, start, count rows): {seconds:.1f} s")
        as_postgres(pg_bin("pg_ctl"), "-D", str(restored), "-m", "immediate", "stop")
        print(f"restore drill: {manage('db_restore_drill', '--scratch-dir', str(root)):.1f} s")
    finally:
        for cluster in root.iterdir():
            if (cluster / "postmaster.pid").exists():
                as_postgres(pg_bin("pg_ctl"), "-D", str(cluster), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
