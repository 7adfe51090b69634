"""Benchmark migrate_data against the physical limit, pgloader and dumpdata + loaddata.

    .venv/bin/python bench/run.py --users 100000 [--repeat 3]

Builds the demo SQLite database at the given scale (cached under var/bench/), then
measures every method in one run on the same data and server, each in its own child
process (wall time, peak memory), and writes the table to bench/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file
    sys.path.insert(0, str(ROOT))

from bench import pg  # noqa: E402
from bench.measure import Measurement, run_measured  # noqa: E402

ACCOUNT_TABLES = (
    "accounts_organisation",
    "accounts_user",
    "accounts_membership",
    "accounts_kycverification",
    "accounts_loginevent",
)
METHODS = (
    "copy",
    "verify",
    "copy_verify",
    "limit",
    "pgloader",
    "dumpdata",
    "sync",
    "switch_freeze",
    "rollback_freeze",
)
DEFAULT_METHODS = ("copy", "verify", "copy_verify", "limit", "pgloader", "dumpdata")
ALIASES = {
    "migrate_data": ("copy", "verify", "copy_verify"),
    "freezes": ("sync", "switch_freeze", "rollback_freeze"),
}
TARGETS = {
    "copy_vs_limit": 1.5,  # migrate_data copy within 1.5x of the limit
    "pgloader_vs_copy": 2.0,  # at least 2x faster than pgloader
    "dumpdata_vs_copy": 50.0,  # at least 50x faster than dumpdata + loaddata
    "peak_mb": 200.0,  # peak memory of migrate_data under 200 MB
}
LABELS = {
    "limit": "physical limit (binary COPY from files + rebuild)",
    "copy": "migrate_data --no-verify (copy only)",
    "verify": "migrate_data --verify-only (verify alone, after the copy)",
    "copy_verify": "migrate_data (copy + verify)",
    "pgloader": "pgloader",
    "dumpdata": "dumpdata + loaddata",
    "sync": "migrate_data --sync after 1% of rows changed in SQLite",
    "switch_freeze": "switch_to_postgresql, 1% of rows changed in SQLite during its stage 1",
    "rollback_freeze": "rollback_to_sqlite after 1% of rows written on PostgreSQL",
}
FREEZE_TARGETS = {  # seconds: (what is checked, target)
    "sync": ("wall", None),  # "in seconds" at 1M users; peak memory is the checked part
    "switch_freeze": ("freeze", 2.0),
    "rollback_freeze": ("freeze", 5.0),
}


def say(message: str = "") -> None:
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


@dataclasses.dataclass
class MethodResult:
    key: str
    label: str
    rows: int
    runs: list[float] = dataclasses.field(default_factory=list)
    peaks_mb: list[float] = dataclasses.field(default_factory=list)
    ok: bool = True
    notes: list[str] = dataclasses.field(default_factory=list)
    details: dict = dataclasses.field(default_factory=dict)
    extrapolated_from: int | None = None  # rows actually measured, when extrapolated

    @property
    def seconds(self) -> float | None:
        return statistics.median(self.runs) if self.runs else None

    @property
    def peak_mb(self) -> float | None:
        return statistics.median(self.peaks_mb) if self.peaks_mb else None

    @property
    def rows_per_second(self) -> float | None:
        return self.rows / self.seconds if self.seconds else None


@dataclasses.dataclass
class Scenario:
    """Where one scale's files live and which databases it uses."""

    users: int
    seed: int
    workdir: Path
    prefix: str

    def dir(self, name: str) -> Path:
        return self.workdir / name

    def url(self, name: str) -> str:
        return pg.database_url(f"{self.prefix}_{name}")

    def env(self, name: str, database: str) -> dict:
        env = dict(os.environ)
        env.update(
            PROPCORE_DATABASE_DIR=str(self.dir(name)),
            POSTGRES_URL=self.url(database),
            PROPCORE_ENV="dev",
            DATABASE_ACTIVE="sqlite",
        )
        env.pop("SQLITE_PATH", None)
        return env


def manage(*args: str, env: dict, log: Path | None = None) -> Measurement:
    """Run manage.py in a child process, measured."""
    command = [sys.executable, str(ROOT / "manage.py"), *args]
    return run_measured(command, env=env, cwd=ROOT, log=log)


def must(measurement: Measurement, what: str) -> Measurement:
    if not measurement.ok:
        raise SystemExit(
            f"{what} failed (exit {measurement.returncode}):\n{measurement.output_tail}"
        )
    return measurement


def build_sqlite(sc: Scenario, name: str, users: int, *, rebuild: bool = False) -> Path:
    """Seed (or reuse) the demo SQLite database of `users` users in workdir/name."""
    directory = sc.dir(name)
    marker = directory / "seeded.json"
    wanted = {"users": users, "seed": sc.seed}
    sqlite_path = directory / "propcore.sqlite3"
    if not rebuild and marker.exists() and json.loads(marker.read_text()) == wanted:
        say(f"  reusing {sqlite_path} ({users:,} users)")
        return sqlite_path
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    env = sc.env(name, "unused")
    must(manage("migrate", "--database", "sqlite", "-v", "0", env=env), "migrate sqlite")
    m = must(
        manage(
            "seed_demo",
            "--users",
            str(users),
            "--seed",
            str(sc.seed),
            env=env,
            log=directory / "seed.log",
        ),
        "seed_demo",
    )
    say(f"  seeded {users:,} users in {m.seconds:.1f}s (peak {m.peak_mb:.0f} MB)")
    marker.write_text(json.dumps(wanted))
    return sqlite_path


def fresh_django_target(url: str, env: dict) -> None:
    """An empty database with Django's schema (migrate), as a real cutover starts from."""
    pg.recreate_database(url)
    must(manage("migrate", "--database", "postgresql", "-v", "0", env=env), "migrate postgresql")


# --- migrate_data ---------------------------------------------------------------------


def prepare_state(sc: Scenario, *, full: bool = False) -> Path:
    """Put the runbook in phase 'prepared' once (untimed) and keep that state for every run.

    By default the state file is written directly: migration_prepare's backups and dry
    run are not what is measured, and take minutes at a million users.  full=True runs it.
    """
    from dbmigration import state as state_mod

    env = sc.env("full", "target")
    snapshot = sc.dir("full") / "state.prepared.json"
    state = sc.dir("full") / "state.json"
    state.unlink(missing_ok=True)
    if full:
        fresh_django_target(sc.url("target"), env)
        m = manage("migration_prepare", "--keep", "1", env=env, log=sc.dir("full") / "prepare.log")
        must(m, "migration_prepare")
        say(f"  migration_prepare (untimed) {m.seconds:.1f}s")
    else:
        state_mod.transition(state, "prepared", note="bench/run.py: migration_prepare skipped")
    shutil.copyfile(state, snapshot)
    return snapshot


def run_migrate_data(
    sc: Scenario, *, verify: bool, rows: int, repeat: int, verify_alone: MethodResult | None = None
) -> MethodResult:
    """Time migrate_data; with verify_alone, also `--verify-only` right after each copy."""
    key = "copy_verify" if verify else "copy"
    result = MethodResult(key=key, label=LABELS[key], rows=rows)
    env = sc.env("full", "target")
    snapshot = sc.dir("full") / "state.prepared.json"
    for i in range(repeat):
        fresh_django_target(sc.url("target"), env)
        shutil.copyfile(snapshot, sc.dir("full") / "state.json")
        args = ["migrate_data", "-v", "1"] + ([] if verify else ["--no-verify"])
        m = manage(*args, env=env, log=sc.dir("full") / f"{key}_{i}.log")
        _record(result, m, f"{LABELS[key]} run {i + 1}")
        if verify_alone is not None and m.ok:
            alone = manage(
                "migrate_data", "--verify-only", "-v", "1", env=env,
                log=sc.dir("full") / f"verify_{i}.log",
            )  # fmt: skip
            _record(verify_alone, alone, f"{LABELS['verify']} run {i + 1}")
    if result.ok:
        counts = pg.table_counts(sc.url("target"), list(sc_source_counts(sc)))
        lost = {t: (n, counts.get(t)) for t, n in sc_source_counts(sc).items() if counts[t] != n}
        result.details["row_counts_equal"] = not lost
        if lost:
            result.ok = False
            result.notes.append(f"row counts differ: {lost}")
    return result


def must_ok(result: MethodResult) -> MethodResult:
    if not result.ok:
        raise SystemExit(f"{result.label} failed: {'; '.join(result.notes)}")
    return result


def _record(result: MethodResult, m: Measurement, what: str) -> None:
    say(f"  {what}: {m.seconds:.1f}s, peak {m.peak_mb:.0f} MB, exit {m.returncode}")
    if m.ok:
        result.runs.append(m.seconds)
        result.peaks_mb.append(m.peak_mb)
    else:
        result.ok = False
        result.notes.append(f"exit {m.returncode}: {m.output_tail[-300:]}")


_COUNTS: dict[Path, dict[str, int]] = {}


def sc_source_counts(sc: Scenario, name: str = "full") -> dict[str, int]:
    """Rows per table of the SQLite source that exist as tables in PostgreSQL too."""
    path = sc.dir(name) / "propcore.sqlite3"
    if path not in _COUNTS:
        _COUNTS[path] = pg.sqlite_counts(path)
    return _COUNTS[path]


# --- the physical limit ---------------------------------------------------------------


def prepare_limit_files(sc: Scenario, schema: pg.Schema) -> Path:
    """Binary COPY files of exactly the rows migrate_data wrote (untimed, made beforehand)."""
    files = sc.dir("limit_files")
    shutil.rmtree(files, ignore_errors=True)
    counts = pg.table_counts(sc.url("target"), schema.tables)
    source = sc_source_counts(sc)
    differ = {t: (source.get(t), n) for t, n in counts.items() if source.get(t) != n}
    if differ:
        raise SystemExit(f"The target does not hold the source's rows; cannot make files: {differ}")
    tables = [t for t in schema.tables if counts[t]]
    sizes = pg.dump_tables(sc.url("target"), files, tables)
    say(f"  limit files: {len(tables)} tables, {sum(sizes.values()) / 2**20:.0f} MB")
    return files


def run_limit(sc: Scenario, *, rows: int, repeat: int, workers: int) -> MethodResult:
    result = MethodResult(key="limit", label=LABELS["limit"], rows=rows)
    env = sc.env("full", "limit")
    url = sc.url("limit")
    fresh_django_target(url, env)
    schema = pg.capture_schema(url)
    schema_file = sc.dir("full") / "limit_schema.json"
    schema_file.write_text(json.dumps(schema.to_dict(), indent=1))
    files = prepare_limit_files(sc, schema)
    result.details["rebuilt"] = {
        "indexes": len(schema.indexes),
        "keys": len(schema.keys),
        "foreign_keys": len(schema.foreign_keys),
    }
    phases = []
    for i in range(repeat):
        if i:
            fresh_django_target(url, env)
        pg.truncate_all(url, schema.tables)
        pg.strip_schema(url, schema)
        log = sc.dir("full") / f"limit_{i}.log"
        command = [sys.executable, "-m", "bench.limit", "--url", url, "--files", str(files)]
        command += ["--schema", str(schema_file), "--workers", str(workers)]
        m = run_measured(command, cwd=ROOT, log=log)
        _record(result, m, f"limit run {i + 1}")
        if m.ok:
            phases.append(json.loads(log.read_text().strip().splitlines()[-1]))
    if phases:
        result.details["copy_seconds"] = statistics.median(p["copy_seconds"] for p in phases)
        result.details["rebuild_seconds"] = statistics.median(p["rebuild_seconds"] for p in phases)
        counts = pg.table_counts(url, schema.tables)
        source = sc_source_counts(sc)
        result.details["row_counts_equal"] = all(source.get(t, 0) == n for t, n in counts.items())
        rebuilt = pg.capture_schema(url)
        result.details["schema_equal"] = all(
            sorted(getattr(rebuilt, part)) == sorted(getattr(schema, part))
            for part in ("tables", "indexes", "keys", "foreign_keys")
        )
        if not (result.details["row_counts_equal"] and result.details["schema_equal"]):
            result.ok = False
            result.notes.append("the limit's rows or rebuilt schema differ from the source's")
    return result


# --- pgloader ---------------------------------------------------------------------------


def pgloader_version(binary: str) -> str | None:
    if not shutil.which(binary):
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout.splitlines() or ["pgloader"])[0].strip()


def run_pgloader(
    sc: Scenario, *, rows: int, repeat: int, binary: str, with_option: str | None = None
) -> MethodResult:
    version = pgloader_version(binary)
    key = "pgloader_tuned" if with_option else "pgloader"
    result = MethodResult(key=key, label=LABELS["pgloader"], rows=rows)
    if version is None:
        result.ok = False
        result.notes.append(
            f"pgloader is not installed ({binary!r} not found): apt-get install -y pgloader"
        )
        say(f"  {result.notes[-1]}")
        return result
    result.label = "pgloader " + version.replace("pgloader version ", "").strip('"')
    if with_option:
        result.label += f' --with "{with_option}"'
    url = sc.url("pgloader")
    source = sc.dir("full") / "propcore.sqlite3"
    options = ["--with", with_option] if with_option else []
    exits = []
    for i in range(repeat):
        pg.recreate_database(url)
        log = sc.dir("full") / f"{key}_{i}.log"
        m = run_measured([binary, *options, f"sqlite://{source}", url], log=log)
        exits.append(m.returncode)
        say(f"  {result.label} run {i + 1}: {m.seconds:.1f}s, {m.peak_mb:.0f} MB, exit {exits[-1]}")
        result.runs.append(m.seconds)  # timed even when it fails: it is what a user waits for
        result.peaks_mb.append(m.peak_mb)
        if m.returncode and "Heap exhausted" in log.read_text(errors="replace"):
            result.notes.append(
                f"run {i + 1}: SBCL heap exhausted (1 GB), loaded nothing of the big tables"
            )
    result.details["exit_codes"] = exits
    result.ok = all(code == 0 for code in exits)
    result.details.update(analyse_pgloader(sc, url))
    return result


def analyse_pgloader(sc: Scenario, url: str) -> dict:
    """What pgloader got wrong: lost rows, lost NOT NULLs, changed types, vs Django's schema."""
    reference = pg.column_types(sc.url("limit"))
    found = pg.column_types(url)
    diff = pg.compare_columns(reference, found)
    tables = sorted({t for t, _c in found})
    counts = pg.table_counts(url, tables)
    source = sc_source_counts(sc)
    missing_rows = {
        t: {"sqlite": n, "pgloader": counts.get(t)} for t, n in source.items() if counts.get(t) != n
    }
    return {
        "schema_problems": diff.summary(),
        "not_null_lost": len(diff.not_null_lost),
        "type_changes": {k: len(v) for k, v in diff.type_changes.items()},
        "rows_missing_or_extra": missing_rows,
    }


# --- dumpdata + loaddata ----------------------------------------------------------------


def run_dumpdata(sc: Scenario, *, users: int, full_rows: int, repeat: int) -> MethodResult:
    result = MethodResult(
        key="dumpdata",
        label=f"{LABELS['dumpdata']} (extrapolated from {users:,} users)",
        rows=full_rows,
    )
    build_sqlite(sc, "small", users)
    counts = sc_source_counts(sc, "small")
    excluded = ("django_content_type", "auth_permission", "django_migrations")
    rows = sum(n for t, n in counts.items() if t not in excluded)
    result.extrapolated_from = rows
    env = sc.env("small", "loaddata")
    dump = sc.dir("small") / "dump.json"
    measured, peaks = [], []
    for i in range(repeat):
        dumped = manage(
            # --all: the default managers hide soft-deleted rows, so plain dumpdata loses
            # them; no --natural-foreign: User's natural key lookup hides them too
            "dumpdata",
            "--all",
            "--database",
            "sqlite",
            "--exclude",
            "contenttypes",
            "--exclude",
            "auth.permission",
            "-o",
            str(dump),
            env=env,
            log=sc.dir("small") / f"dumpdata_{i}.log",
        )
        fresh_django_target(sc.url("loaddata"), env)
        loaded = manage(
            "loaddata",
            str(dump),
            "--database",
            "postgresql",
            env=env,
            log=sc.dir("small") / f"loaddata_{i}.log",
        )
        seconds = dumped.seconds + loaded.seconds
        say(
            f"  dumpdata {dumped.seconds:.1f}s + loaddata {loaded.seconds:.1f}s for {rows:,} rows "
            f"(peak {max(dumped.peak_mb, loaded.peak_mb):.0f} MB)"
        )
        if not (dumped.ok and loaded.ok):
            result.ok = False
            result.notes.append((dumped if not dumped.ok else loaded).output_tail[-300:])
            continue
        loaded_counts = pg.table_counts(sc.url("loaddata"), list(ACCOUNT_TABLES))
        if any(loaded_counts[t] != counts.get(t) for t in ACCOUNT_TABLES):
            result.ok = False
            result.notes.append(f"loaddata rows differ from the source: {loaded_counts}")
        measured.append(seconds)
        peaks.append(max(dumped.peak_mb, loaded.peak_mb))
    if measured:
        scale = full_rows / rows
        result.runs = [s * scale for s in measured]
        result.peaks_mb = peaks
        result.details.update(
            measured_seconds=statistics.median(measured), measured_rows=rows, scale=round(scale, 2)
        )
        result.notes.append(
            f"measured {statistics.median(measured):.1f}s on {rows:,} rows, x{scale:.1f} "
            f"(linear); peak MB measured at the small scale and grows with the fixture"
        )
    return result


# --- write freezes: --sync, the switch's freeze, the rollback's freeze (issue 16) -------------

FREEZE_METHODS = ("sync", "switch_freeze", "rollback_freeze")
# 1% of rows changed, spread over the account tables: (table, key, share updated, deleted,
# inserted) in hundredths of a percent; only leaf tables lose or gain rows, so every change
# can arrive on the other side (no foreign key left dangling)
CHANGES = (
    ("accounts_user", "id", 100, 0, 0),
    ("accounts_organisation", "id", 100, 0, 0),
    ("accounts_membership", "id", 50, 50, 0),
    ("accounts_kycverification", "id", 50, 50, 0),
    ("accounts_loginevent", "id", 40, 30, 30),
)
UPDATES = {  # a value change each engine accepts (no choice, length or unique constraint)
    "accounts_user": "first_name = substr(first_name, 1, 140) || ' b{k}'",
    "accounts_organisation": "address_line2 = 'bench {k}'",
    "accounts_membership": "title = 'bench {k}'",
    "accounts_kycverification": "notes = 'bench {k}'",
    "accounts_loginevent": "user_agent = 'bench {k}'",
}


def change_sqlite(path: Path, round_: int) -> int:
    """Change 1% of the rows of the SQLite file (updates, deletes, inserts); rows changed."""
    import sqlite3

    conn = sqlite3.connect(path, timeout=60, isolation_level=None)
    changed = 0
    try:
        conn.execute("BEGIN IMMEDIATE")
        for table, _key, upd, dele, ins in CHANGES:
            # rowid buckets of 10,000: a different slice per round
            pick = "rowid % 10000 BETWEEN {lo} AND {hi}"
            base = (round_ * 211) % 9000
            lo = base
            for kind, share in (("update", upd), ("delete", dele), ("insert", ins)):
                if not share:
                    continue
                where = pick.format(lo=lo, hi=lo + share - 1)
                lo += share
                if kind == "update":
                    sql = f"UPDATE {table} SET {UPDATES[table].format(k=round_)} WHERE {where}"
                elif kind == "delete":
                    sql = f"DELETE FROM {table} WHERE {where}"
                else:
                    cols = [
                        r[1] for r in conn.execute(f"PRAGMA table_info({table})") if r[1] != "id"
                    ]
                    names = ", ".join(f'"{c}"' for c in cols)
                    sql = f"INSERT INTO {table} ({names}) SELECT {names} FROM {table} WHERE {where}"
                changed += conn.execute(sql).rowcount
        conn.execute("COMMIT")
    finally:
        conn.close()
    return changed


def change_postgresql(url: str, round_: int) -> int:
    """Change 1% of the rows on PostgreSQL, as the application would after the switch."""
    import psycopg

    changed = 0
    with psycopg.connect(url) as conn:
        for table, key, upd, dele, ins in CHANGES:
            base = (round_ * 307 + 5000) % 9000
            lo = base
            for kind, share in (("update", upd), ("delete", dele), ("insert", ins)):
                if not share:
                    continue
                where = f"abs(hashtext({key}::text)) % 10000 BETWEEN {lo} AND {lo + share - 1}"
                lo += share
                if kind == "update":
                    sql = f"UPDATE {table} SET {UPDATES[table].format(k=round_)} WHERE {where}"
                elif kind == "delete":
                    sql = f"DELETE FROM {table} WHERE {where}"
                else:
                    cols = [
                        r[0]
                        for r in conn.execute(
                            "SELECT column_name FROM information_schema.columns "
                            "WHERE table_name = %s AND column_name <> 'id' "
                            "ORDER BY ordinal_position",
                            [table],
                        )
                    ]
                    names = ", ".join(f'"{c}"' for c in cols)
                    sql = f"INSERT INTO {table} ({names}) SELECT {names} FROM {table} WHERE {where}"
                changed += conn.execute(sql).rowcount
    return changed


def copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of the cached database (backup API: its -wal included)."""
    import sqlite3

    target.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    conn = sqlite3.connect(target)
    conn.execute("PRAGMA journal_mode=WAL").fetchone()  # as the site runs it
    conn.close()


def report_facts(log: Path) -> dict:
    """The facts of the run report a command's log names ('Report: <path>')."""
    text = log.read_text(errors="replace")
    if "Report: " not in text:
        return {}
    path = Path(text.rsplit("Report: ", 1)[1].split()[0])
    try:
        return json.loads(path.read_text()).get("facts", {})
    except (OSError, ValueError):
        return {}


def setup_freeze_runs(sc: Scenario) -> tuple[dict, Path]:
    """A scratch copy of the data migrated and verified on PostgreSQL (untimed)."""
    from dbmigration import state as state_mod

    directory = sc.dir("freeze")
    shutil.rmtree(directory, ignore_errors=True)
    copy_sqlite(sc.dir("full") / "propcore.sqlite3", directory / "propcore.sqlite3")
    env = sc.env("freeze", "freeze")
    env["PYTHONUNBUFFERED"] = "1"
    state_mod.transition(directory / "state.json", "prepared", note="bench/run.py")
    fresh_django_target(sc.url("freeze"), env)
    m = must(manage("migrate_data", "-v", "1", env=env, log=directory / "migrate.log"), "migrate")
    say(f"  migrate_data + verify (untimed setup) {m.seconds:.1f}s")
    migrated = directory / "state.migrated.json"
    shutil.copyfile(directory / "state.json", migrated)
    return env, migrated


def run_freezes(sc: Scenario, *, only: list[str], repeat: int, drain: float) -> list[MethodResult]:
    """Per round: 1% changed in SQLite then --sync; a switch with 1% changed in SQLite during
    its stage 1; 1% written on PostgreSQL, then the rollback.  Each timed, each its freeze."""
    env, migrated = setup_freeze_runs(sc)
    directory = sc.dir("freeze")
    sqlite_path = directory / "propcore.sqlite3"
    results = {k: MethodResult(key=k, label=LABELS[k], rows=0) for k in FREEZE_METHODS}
    for key in FREEZE_METHODS:
        results[key].details.update(freezes=[], changed=[], loads=[])
    for i in range(repeat):
        shutil.copyfile(migrated, directory / "state.json")
        if "sync" in only:
            r = results["sync"]
            r.details["changed"].append(change_sqlite(sqlite_path, 3 * i))
            r.details["loads"].append(os.getloadavg())
            m = manage(
                "migrate_data", "--sync", "-v", "1", env=env, log=directory / f"sync_{i}.log"
            )
            _record(r, m, f"{LABELS['sync']} run {i + 1} ({r.details['changed'][-1]:,} rows)")
        # a switch needs the rollback after it (and the rollback a switch) to run again
        if "switch_freeze" in only or "rollback_freeze" in only:
            r = results["switch_freeze"]
            r.details["loads"].append(os.getloadavg())
            log = directory / f"switch_{i}.log"
            changed: list[int] = []

            def during_stage_1(log=log, changed=changed, round_=3 * i + 1) -> None:
                # the application writes while the switch's stage 1 runs: 1% of the rows,
                # committed before the freeze, so only the frozen catch-up can carry them
                deadline = time.monotonic() + 3600
                while time.monotonic() < deadline:
                    if log.exists() and "pre-sync" in log.read_text(errors="replace"):
                        changed.append(change_sqlite(sqlite_path, round_))
                        return
                    time.sleep(0.05)

            writer = threading.Thread(target=during_stage_1, daemon=True)
            writer.start()
            m = manage(
                "switch_to_postgresql", "--noinput", "--drain-seconds", str(drain), "-v", "2",
                env=env, log=log,
            )  # fmt: skip
            writer.join(timeout=1)
            r.details["changed"].append(changed[0] if changed else 0)
            if not changed:
                r.notes.append(f"run {i + 1}: the writer never saw stage 1 begin")
            facts = report_facts(log)
            r.details["freezes"].append(facts.get("write_freeze_seconds"))
            _record(r, m, f"{LABELS['switch_freeze']} run {i + 1}, froze "
                    f"{facts.get('write_freeze_seconds')} s")  # fmt: skip
            if not m.ok:
                break
            r = results["rollback_freeze"]
            r.details["changed"].append(change_postgresql(sc.url("freeze"), 3 * i + 2))
            r.details["loads"].append(os.getloadavg())
            log = directory / f"rollback_{i}.log"
            m = manage(
                "rollback_to_sqlite", "--noinput", "--drain-seconds", str(drain), "-v", "2",
                env=env, log=log,
            )  # fmt: skip
            facts = report_facts(log)
            r.details["freezes"].append(facts.get("write_freeze_seconds"))
            froze = facts.get("write_freeze_seconds")
            what = f"{LABELS['rollback_freeze']} run {i + 1} ({r.details['changed'][-1]:,} rows)"
            _record(r, m, f"{what}, froze {froze} s")
            if not m.ok:
                break
    out = []
    for key in FREEZE_METHODS:
        r = results[key]
        if key in only:
            freezes = [f for f in r.details["freezes"] if f is not None]
            r.details["freeze_seconds"] = statistics.median(freezes) if freezes else None
            r.rows = statistics.median(r.details["changed"]) if r.details["changed"] else 0
            out.append(r)
    return out


# --- report -----------------------------------------------------------------------------


def machine() -> dict:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
            "",
        )
    except OSError:
        pass
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    import psycopg

    with psycopg.connect(pg.database_url("postgres")) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 2**20, 1),
        "postgresql": server,
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
    }


def render(results: list[MethodResult], meta: dict) -> str:
    """Markdown table plus the target checks."""
    by_key = {r.key: r for r in results}
    limit = by_key.get("limit")
    lines = [
        f"{meta['users']:,} users, {meta['rows']:,} rows, median of {meta['repeat']} run(s), "
        f"{meta['date']} on {meta['machine']['cpu']} ({meta['machine']['cores']} cores, "
        f"{meta['machine']['memory_gb']} GB), PostgreSQL {meta['machine']['postgresql']}",
        f"load average at start {_load(meta)}; commit {meta.get('commit', '?')}",
        "",
        "| method | wall s | rows/s | x limit | peak MB | ok |",
        "|---|---:|---:|---:|---:|---|",
    ]
    copies = [r for r in results if r.key not in FREEZE_METHODS]
    freezes = [r for r in results if r.key in FREEZE_METHODS]
    if not copies:
        lines = lines[:3]
    for r in copies:
        ratio = f"{r.seconds / limit.seconds:.2f}" if r.seconds and limit and limit.seconds else "-"
        speed = _num(r.rows_per_second, 0) if r.ok else "failed"
        lines.append(
            f"| {r.label} | {_num(r.seconds, 1)} | {speed} | {ratio} | "
            f"{_num(r.peak_mb, 0)} | {'yes' if r.ok else 'NO'} |"
        )
    if freezes:
        lines += render_freezes(freezes)
    lines.append("")
    for r in results:
        for note in r.notes:
            lines.append(f"- {r.label}: {note}")
        if r.key.startswith("pgloader"):
            for problem in r.details.get("schema_problems", []):
                lines.append(f"- pgloader schema vs Django's: {problem}")
            if r.details.get("rows_missing_or_extra"):
                lines.append(f"- pgloader rows differ: {r.details['rows_missing_or_extra']}")
        if r.key == "limit" and "copy_seconds" in r.details:
            lines.append(
                f"- limit = COPY {r.details['copy_seconds']:.1f}s + rebuild "
                f"{r.details['rebuild_seconds']:.1f}s ({r.details['rebuilt']})"
            )
    lines += ["", "Targets:"] + [f"- {line}" for line in check_targets(by_key)]
    return "\n".join(lines)


def render_freezes(results: list[MethodResult]) -> list[str]:
    """The write-freeze table: rows changed, whole command, freeze, memory, load."""
    lines = [
        "",
        "| method | rows changed | wall s | freeze s | peak MB | load (1 min) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        loads = r.details.get("loads") or []
        load = "-".join(f"{x[0]:.1f}" for x in loads[:1] + loads[-1:]) if loads else "?"
        freeze = r.details.get("freeze_seconds")
        lines.append(
            f"| {r.label} | {_num(r.rows, 0)} | {_num(r.seconds, 1)} | "
            f"{_num(freeze, 2) if r.key != 'sync' else '-'} | {_num(r.peak_mb, 0)} | {load} |"
        )
    return lines


def check_targets(by_key: dict[str, MethodResult]) -> list[str]:
    out = []
    copy, limit = by_key.get("copy"), by_key.get("limit")
    loader, dump = by_key.get("pgloader"), by_key.get("dumpdata")
    if loader and not loader.ok and loader.runs:
        out.append(f"{loader.label} failed (exit codes {loader.details.get('exit_codes')})")
        loader = by_key.get("pgloader_tuned")

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    if copy and copy.seconds and limit and limit.seconds:
        ratio = copy.seconds / limit.seconds
        out.append(f"copy / limit = {ratio:.2f} (target <= 1.5): {verdict(ratio <= 1.5)}")
    both, alone = by_key.get("copy_verify"), by_key.get("verify")
    if both and both.seconds and limit and limit.seconds:
        ratio = both.seconds / limit.seconds
        out.append(f"copy + verify / limit = {ratio:.2f} (target <= 2): {verdict(ratio <= 2.0)}")
    if alone and alone.seconds and copy and copy.seconds:
        ratio = alone.seconds / copy.seconds
        out.append(
            f"verify alone / copy = {ratio:.2f} (target <= 1, verification no slower than "
            f"the copy): {verdict(ratio <= 1.0)}"
        )
    if copy and copy.seconds and loader and loader.seconds and loader.ok:
        ratio = loader.seconds / copy.seconds
        out.append(f"{loader.label} / copy = {ratio:.2f} (target >= 2): {verdict(ratio >= 2)}")
    if copy and copy.seconds and dump and dump.seconds:
        ratio = dump.seconds / copy.seconds
        out.append(
            f"dumpdata+loaddata / copy = {ratio:.0f} (target >= 50, extrapolated): "
            f"{verdict(ratio >= 50)}"
        )
    for key, (_what, target) in FREEZE_TARGETS.items():
        r = by_key.get(key)
        if r is None or not r.runs:
            continue
        if target is not None:
            freeze = r.details.get("freeze_seconds")
            ok = freeze is not None and freeze <= target
            out.append(f"{r.label}: write freeze {_num(freeze, 2)} s (target <= {target:g}): "
                       f"{verdict(ok)}")  # fmt: skip
        else:
            out.append(f"{r.label}: {r.seconds:.1f} s")
    for key in ("copy", "verify", "copy_verify", *FREEZE_METHODS):
        r = by_key.get(key)
        if r and r.peak_mb:
            out.append(
                f"{r.label} peak {r.peak_mb:.0f} MB (target < 200): {verdict(r.peak_mb < 200)}"
            )
    return out


def _load(meta: dict) -> str:
    load = meta["machine"].get("load_average_at_start")
    return " ".join(f"{x:.1f}" for x in load) if load else "?"


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return out.stdout.strip()[:100]


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def write_results(results: list[MethodResult], meta: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['date'].replace(':', '').replace('-', '')}-users{meta['users']}"
    payload = {
        **meta,
        "methods": [
            {
                **dataclasses.asdict(r),
                "seconds": r.seconds,
                "peak_mb": r.peak_mb,
                "rows_per_second": r.rows_per_second,
            }
            for r in results
        ],
    }
    (directory / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
    (directory / f"{stem}.md").write_text(render(results, meta) + "\n")
    return directory / f"{stem}.md"


# --- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, required=True, help="Scale: demo users to seed.")
    parser.add_argument("--seed", type=int, default=2026, help="seed_demo --seed (default 2026).")
    parser.add_argument("--repeat", type=int, default=1, help="Runs per method; medians shown.")
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_METHODS),
        help=f"Comma-separated methods to run (default: {','.join(DEFAULT_METHODS)}; "
        "migrate_data means copy,verify,copy_verify; freezes means "
        f"{','.join(FREEZE_METHODS)}: 1%% of the rows changed, then migrate_data --sync, the "
        "switch (changes made during its stage 1) and the rollback (changes made on "
        "PostgreSQL after the switch), each with its write freeze; they run on a scratch "
        "copy of the cached database, migrated and verified beforehand, untimed).",
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=2.0,
        help="The switch's and the rollback's --drain-seconds in the freeze methods.",
    )
    parser.add_argument(
        "--dumpdata-users",
        type=int,
        default=None,
        help="Scale of the dumpdata+loaddata run, extrapolated (default 2%% of --users, "
        "at most 2000: it runs at a few hundred rows/s).",
    )
    parser.add_argument("--workers", type=int, default=2, help="Connections for the limit.")
    parser.add_argument("--pgloader", default="pgloader", help="pgloader binary.")
    parser.add_argument(
        "--pgloader-retry-with",
        default="prefetch rows = 10000",
        help="When pgloader with its defaults fails (heap exhausted at 1M users), run it "
        "again with this --with option ('' to skip).",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="Default var/bench/users-<N> (cached)."
    )
    parser.add_argument("--db-prefix", default="propcore_bench", help="Scratch database names.")
    parser.add_argument("--rebuild", action="store_true", help="Re-seed even if cached.")
    parser.add_argument(
        "--prepare",
        choices=("state", "full"),
        default="state",
        help="Reach phase 'prepared' by writing the state file (default) or by running "
        "migration_prepare (backups and dry run, minutes at 1M users); untimed either way.",
    )
    parser.add_argument("--keep", action="store_true", help="Keep the scratch databases.")
    parser.add_argument(
        "--results", type=Path, default=ROOT / "bench" / "results", help="Output directory."
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = []
    for name in (m.strip() for m in args.only.split(",") if m.strip()):
        only.extend(ALIASES.get(name, (name,)))
    unknown = set(only) - set(METHODS)
    if unknown:
        raise SystemExit(f"Unknown method(s) {sorted(unknown)}; choose from {METHODS}.")
    workdir = args.workdir or ROOT / "var" / "bench" / f"users-{args.users}"
    sc = Scenario(users=args.users, seed=args.seed, workdir=workdir, prefix=args.db_prefix)
    started = time.perf_counter()
    started_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    # the code measured is the code at the start (others may commit during a long run)
    commit = _git("rev-parse", "--short", "HEAD")
    copy_commit = _git("log", "-1", "--format=%h %s", "--", "dbmigration/copy.py")
    dirty = _git("status", "--porcelain", "--", "dbmigration")
    say(f"Building the demo SQLite database ({args.users:,} users) in {workdir}")
    build_sqlite(sc, "full", args.users, rebuild=args.rebuild)
    counts = sc_source_counts(sc)
    rows = sum(counts.values())
    say(f"  {rows:,} rows in {len(counts)} tables")
    results: list[MethodResult] = []
    if "copy" in only or "copy_verify" in only:
        say("migrate_data")
        prepare_state(sc, full=args.prepare == "full")
        alone = None
        if "verify" in only:
            alone = MethodResult(key="verify", label=LABELS["verify"], rows=rows)
        for verify in (False, True):
            if ("copy_verify" if verify else "copy") in only or (alone and not verify):
                result = run_migrate_data(
                    sc,
                    verify=verify,
                    rows=rows,
                    repeat=args.repeat,
                    verify_alone=None if verify else alone,
                )
                if ("copy_verify" if verify else "copy") in only:
                    results.append(result)
                if alone is not None and not verify:
                    results.append(alone)
    if "limit" in only:
        say("physical limit")
        if not any(r.key.startswith("copy") and r.ok for r in results):
            say("  (the limit's files are dumped from migrate_data's result: running it once)")
            prepare_state(sc)
            must_ok(run_migrate_data(sc, verify=False, rows=rows, repeat=1))
        results.insert(0, run_limit(sc, rows=rows, repeat=args.repeat, workers=args.workers))
    if "pgloader" in only:
        say("pgloader")
        if "limit" not in only:
            fresh_django_target(sc.url("limit"), sc.env("full", "limit"))  # reference schema
        loader = run_pgloader(sc, rows=rows, repeat=args.repeat, binary=args.pgloader)
        results.append(loader)
        if not loader.ok and loader.runs and args.pgloader_retry_with:
            say(f'  retrying with --with "{args.pgloader_retry_with}" (pgloader\'s advice)')
            results.append(
                run_pgloader(
                    sc,
                    rows=rows,
                    repeat=args.repeat,
                    binary=args.pgloader,
                    with_option=args.pgloader_retry_with,
                )
            )
    if "dumpdata" in only:
        small = args.dumpdata_users or max(50, min(2000, args.users * 2 // 100))
        say(f"dumpdata + loaddata at {small:,} users")
        results.append(run_dumpdata(sc, users=small, full_rows=rows, repeat=args.repeat))
    if any(m in only for m in FREEZE_METHODS):
        say("write freezes: --sync, switch, rollback")
        results += run_freezes(sc, only=only, repeat=args.repeat, drain=args.drain_seconds)
    meta = {
        "users": args.users,
        "rows": rows,
        "repeat": args.repeat,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "source_rows": counts,
        "total_seconds": round(time.perf_counter() - started, 1),
        "started_at": started_at,
        "commit": commit + (" + uncommitted dbmigration changes" if dirty else ""),
        "copy_py_commit": copy_commit,
    }
    path = write_results(results, meta, args.results)
    say("")
    say(render(results, meta))
    say(f"\nwritten: {path} (+ .json); whole run {meta['total_seconds']:.0f}s")
    if not args.keep:
        for name in ("target", "limit", "pgloader", "loaddata", "freeze"):
            pg.drop_database(sc.url(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
