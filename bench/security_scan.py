"""How long security_scan takes over a million users' login events.

    .venv/bin/python -m bench.security_scan --users 1000000 [--repeat 3] [--keep]

One scratch database (``propcore_bench_scan_<pid>``, migrated by ``manage.py migrate``):
N users made in SQL (2 % deleted, 2 % suspended), ~5 sign-ins per active user over the last
30 days streamed in with COPY (10 % failed, plus failed attempts on addresses with no
account), and planted attacks: 20 brute-forced accounts, 5 spraying IPs, 10 successes right
after a run of failures, 10 sign-ins to deleted accounts.  Then ``manage.py security_scan
--database postgresql --no-record --json`` runs as its own process, ``--repeat`` times for
each look-back (24h and 30d); the median wall time, the engine's own seconds per part and
the process's peak RSS are printed, with the findings per kind (which must be exactly the
planted ones: the bench fails otherwise) and written to
``bench/results/<date>-security-scan-users<N>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

from bench.measure import run_measured
from bench.pg import database_url, drop_database, recreate_database

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DB = f"propcore_bench_scan_{os.getpid()}"
AUTH_KINDS = ("brute_force", "spraying", "success_after_failures", "inactive_account_login")
PLANTED = {"brute_force": 20, "spraying": 5, "success_after_failures": 10,
           "inactive_account_login": 10}  # fmt: skip

USERS_SQL = """
INSERT INTO accounts_user (id, password, is_superuser, created_at, updated_at, deleted_at,
    email, first_name, last_name, phone, status, kyc_status, role, preferences, metadata,
    is_staff, is_active)
SELECT md5('u' || i)::uuid, '!', false, now() - interval '400 days', now() - interval '40 days',
       CASE WHEN i %% 50 = 0 THEN now() - interval '40 days' END,
       'user' || i || '@example.ie', 'First', 'Last', '',
       (CASE i %% 50 WHEN 0 THEN 'closed' WHEN 1 THEN 'suspended' ELSE 'active' END)::user_status,
       'pending', 'buyer', '{}', '{}', false, i %% 50 > 1
  FROM generate_series(1, %(users)s) AS i
"""
COLUMNS = "user_id, email_attempted, ip_address, user_agent, success, failure_reason, created_at"


def user_id(i: int) -> str:
    return str(uuid.UUID(hashlib.md5(f"u{i}".encode()).hexdigest()))


def _ip(rng: random.Random) -> str:
    bits = rng.getrandbits(32)
    return f"{(bits >> 24) % 200 + 20}.{bits >> 16 & 255}.{bits >> 8 & 255}.{bits & 255}"


def login_lines(users: int, now: dt.datetime, seed: int):
    """COPY text lines: quiet traffic first, then the planted attacks."""
    rng = random.Random(seed)
    span = 30 * 86400

    def line(uid, email, ip, ok, at):
        reason = "" if ok else "bad_password"
        return (
            f"{uid or chr(92) + 'N'}\t{email}\t{ip}\tbench\t{'t' if ok else 'f'}\t{reason}\t"
            f"{at.isoformat()}\n"
        )

    for i in range(1, users + 1):
        if i % 50 in (0, 1):
            continue  # inactive: their history ended before they were
        uid, email = user_id(i), f"user{i}@example.ie"
        for _ in range(int(rng.random() * 11)):
            at = now - dt.timedelta(seconds=rng.random() * span)
            yield line(uid, email, _ip(rng), rng.random() < 0.9, at)
        if rng.random() < 0.05:
            at = now - dt.timedelta(seconds=rng.random() * span)
            yield line(None, f"nobody{i}@example.org", _ip(rng), False, at)
    start = now - dt.timedelta(hours=2)
    for k in range(20):  # brute force: 15 failures in 10 minutes
        i = 1000 + k * 7 + 2
        for n in range(15):
            at = start + dt.timedelta(seconds=k * 60 + n * 40)
            yield line(user_id(i), f"user{i}@example.ie", f"198.51.100.{k + 1}", False, at)
    for k in range(5):  # spraying: one IP, 40 accounts, one try each in 30 minutes
        for n in range(40):
            i = 5000 + k * 100 + n * 2 + 2
            at = now - dt.timedelta(hours=3) + dt.timedelta(seconds=n * 45)
            yield line(user_id(i), f"user{i}@example.ie", f"203.0.113.{k + 1}", False, at)
    for k in range(10):  # six failures, then the right password
        i = 9000 + k * 3 + 2
        at = now - dt.timedelta(hours=4, minutes=k)
        ip = f"192.0.2.{k + 100}"  # one address each: ten accounts from one would be spraying
        for _ in range(6):
            yield line(user_id(i), f"user{i}@example.ie", ip, False, at)
            at += dt.timedelta(seconds=30)
        yield line(user_id(i), f"user{i}@example.ie", ip, True, at)
    for k in range(10):  # deleted accounts that still sign in
        i = 50 * (k + 1)
        at = now - dt.timedelta(hours=1, minutes=k)
        yield line(user_id(i), f"user{i}@example.ie", "192.0.2.50", True, at)


def build(url: str, users: int, seed: int) -> int:
    recreate_database(url)
    env = {**os.environ, "POSTGRES_URL": url}
    import subprocess

    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--database", "postgresql", "-v", "0"],
        cwd=ROOT, env=env, check=True,
    )  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    rows = 0
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(USERS_SQL, {"users": users})
        with (
            conn.cursor() as cur,
            cur.copy(f"COPY accounts_loginevent ({COLUMNS}) FROM STDIN") as copy,
        ):
            block = []
            for text in login_lines(users, now, seed):
                block.append(text)
                if len(block) == 20000:
                    copy.write("".join(block))
                    rows += len(block)
                    block = []
            copy.write("".join(block))
            rows += len(block)
        conn.execute("VACUUM ANALYZE accounts_user, accounts_loginevent")
    return rows


def scan_once(url: str, since: str, workdir: Path) -> dict:
    env = {**os.environ, "POSTGRES_URL": url, "PROPCORE_DATABASE_DIR": str(workdir)}
    log = workdir / f"scan-{since}.log"
    command = [sys.executable, "manage.py", "security_scan", "--database", "postgresql",
               "--since", since, "--no-record", "--json"]  # fmt: skip
    measured = run_measured(command, env=env, cwd=ROOT, log=log)
    text = log.read_text()
    document = json.loads(text[text.index("{") : text.rindex("}") + 1])
    found = {kind: 0 for kind in AUTH_KINDS}
    for finding in document["findings"]:
        if finding["kind"] in found:
            found[finding["kind"]] += 1
    return {"seconds": measured.seconds, "peak_mb": measured.peak_mb,
            "engine": document["seconds"], "found": found}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    args = parser.parse_args(argv)
    url = database_url(DB)
    results, ok = [], True
    try:
        t0 = time.perf_counter()
        rows = build(url, args.users, args.seed)
        print(f"built {args.users:,} users, {rows:,} login events in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="propcore_bench_scan_") as workdir:
            for since in ("24h", "30d"):
                runs = [scan_once(url, since, Path(workdir)) for _ in range(args.repeat)]
                median = statistics.median(r["seconds"] for r in runs)
                middle = min(runs, key=lambda r: abs(r["seconds"] - median))
                row = {"since": since, "median_s": median, "runs_s": [r["seconds"] for r in runs],
                       "peak_mb": max(r["peak_mb"] for r in runs), "engine_s": middle["engine"],
                       "found": middle["found"]}  # fmt: skip
                results.append(row)
                ok = ok and all(r["found"] == PLANTED for r in runs)
                print(f"--since {since}: median {median:.2f} s of {row['runs_s']}, peak "
                      f"{row['peak_mb']} MB, engine {row['engine_s']}, found {row['found']}",
                      flush=True)  # fmt: skip
    finally:
        if not args.keep:
            drop_database(url)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{dt.date.today()}-security-scan-users{args.users}.json"
    out.write_text(json.dumps({"users": args.users, "login_events": rows, "load": os.getloadavg(),
                               "results": results}, indent=2))  # fmt: skip
    print(f"written to {out.relative_to(ROOT)}")
    if not ok:
        print(f"FAILED: the findings differ from the planted attacks {PLANTED}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
