"""The benchmark's pieces at tiny scale: measurement, schema capture/diff, the whole run."""

import json
import os
import sys

import psycopg
import pytest

from bench import pg as bench_pg
from bench import run
from bench.measure import run_measured


def pg_url(name: str) -> str:
    return bench_pg.database_url(name)


def test_run_measured_sees_peak_memory_of_the_whole_process_tree_and_the_exit_code():
    # regression: wait4's ru_maxrss counted this process's memory, copied by the fork before
    # the child's exec, so a big test process made a 90 MB child weigh 300 MB
    ballast = b"\x01" * (250 * 2**20)
    hold = "import time; x = bytearray(90 * 2**20); time.sleep(0.6)"
    single = run_measured([sys.executable, "-c", hold + "; raise SystemExit(3)"])
    assert len(ballast) == 250 * 2**20
    assert single.returncode == 3 and not single.ok
    assert 90 <= single.peak_mb < 200
    two = run_measured(
        ["bash", "-c", f'{sys.executable} -c "{hold}" & {sys.executable} -c "{hold}"; wait']
    )
    assert two.ok and two.peak_mb >= 180  # two children at once count together
    assert two.seconds >= 0.6


def test_pgloader_missing_is_reported_not_crashed(tmp_path):
    sc = run.Scenario(users=1, seed=1, workdir=tmp_path, prefix="test_propcore_bench_unused")
    result = run.run_pgloader(sc, rows=1, repeat=1, binary=str(tmp_path / "no-pgloader"))
    assert not result.ok and not result.runs
    assert "pgloader is not installed" in result.notes[0]
    assert "apt-get install -y pgloader" in result.notes[0]


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_compare_columns_names_lost_not_nulls_and_text_types(pg):
    reference = pg_url(pg.settings_dict["NAME"])
    scratch = pg_url(f"{pg.settings_dict['NAME']}_cols")
    bench_pg.recreate_database(scratch)
    try:
        with psycopg.connect(scratch, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE accounts_user (id text, email text NOT NULL, preferences text, "
                "created_at timestamptz)"
            )
        diff = bench_pg.compare_columns(
            bench_pg.column_types(reference), bench_pg.column_types(scratch)
        )
    finally:
        bench_pg.drop_database(scratch)
    assert "accounts_user.id" in diff.not_null_lost
    assert "accounts_user.email" not in diff.not_null_lost
    assert "accounts_user.id" in diff.type_changes["uuid -> text"]
    assert "accounts_user.preferences" in diff.type_changes["jsonb -> text"]
    assert "accounts_user.phone" in diff.missing_columns
    assert any("NOT NULL lost" in line for line in diff.summary())


def test_render_checks_each_target_and_says_missed():
    results = [
        run.MethodResult(key="limit", label="limit", rows=1000, runs=[2.0], peaks_mb=[40]),
        run.MethodResult(key="copy", label="copy", rows=1000, runs=[4.0], peaks_mb=[250]),
        run.MethodResult(key="pgloader", label="pgloader", rows=1000, runs=[12.0]),
        run.MethodResult(key="dumpdata", label="dd", rows=1000, runs=[100.0], peaks_mb=[90]),
    ]
    meta = {
        "users": 10,
        "rows": 1000,
        "repeat": 1,
        "date": "2026-11-24T00:00:00Z",
        "machine": {"cpu": "x", "cores": 2, "memory_gb": 24, "postgresql": "15"},
    }
    text = run.render(results, meta)
    assert "| copy | 4.0 | 250 | 2.00 | 250 | yes |" in text
    assert "copy / limit = 2.00 (target <= 1.5): MISSED" in text
    assert "pgloader / copy = 3.00 (target >= 2): met" in text
    assert "dumpdata+loaddata / copy = 25 (target >= 50, extrapolated): MISSED" in text
    assert "copy peak 250 MB (target < 200): MISSED" in text


@pytest.mark.slow
def test_whole_benchmark_runs_at_tiny_scale(tmp_path):
    """Every method on 60 users: same rows everywhere, results written, pgloader's flaws named."""
    prefix = f"test_propcore{os.environ.get('PROPCORE_TEST_SUFFIX', '')}_bench"
    argv = ["--users", "60", "--dumpdata-users", "20", "--workdir", str(tmp_path / "work")]
    argv += ["--results", str(tmp_path / "results"), "--db-prefix", prefix]
    assert run.main(argv) == 0
    [written] = list((tmp_path / "results").glob("*.json"))
    payload = json.loads(written.read_text())
    methods = {m["key"]: m for m in payload["methods"]}
    assert set(methods) == {"limit", "copy", "verify", "copy_verify", "pgloader", "dumpdata"}
    for key in ("limit", "copy", "verify", "copy_verify", "dumpdata"):
        assert methods[key]["ok"], methods[key]["notes"]
        assert methods[key]["seconds"] > 0 and methods[key]["peak_mb"] > 10
    assert methods["limit"]["details"]["row_counts_equal"]
    assert methods["limit"]["details"]["schema_equal"]  # same indexes and constraints rebuilt
    assert methods["copy_verify"]["details"]["row_counts_equal"]
    assert methods["dumpdata"]["extrapolated_from"] < payload["rows"]
    assert payload["source_rows"]["accounts_user"] == 60
    if run.pgloader_version("pgloader"):
        assert methods["pgloader"]["details"]["not_null_lost"] > 0
        assert methods["pgloader"]["details"]["type_changes"]["uuid -> text"] > 0
    else:
        assert "not installed" in methods["pgloader"]["notes"][0]
    assert written.with_suffix(".md").read_text().startswith("60 users")
    with psycopg.connect(pg_url("postgres")) as conn:  # scratch databases dropped
        left = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname LIKE %s", [prefix + "_%"]
        ).fetchone()[0]
    assert left == 0


@pytest.mark.slow
def test_freeze_methods_run_at_tiny_scale(tmp_path):
    """--sync, the switch with writes during its stage 1, the rollback after writes on
    PostgreSQL: each changes rows, finishes, and reports its write freeze."""
    prefix = f"test_propcore{os.environ.get('PROPCORE_TEST_SUFFIX', '')}_benchfz"
    argv = ["--users", "60", "--only", "freezes", "--workdir", str(tmp_path / "work")]
    argv += ["--results", str(tmp_path / "results"), "--db-prefix", prefix]
    assert run.main(argv) == 0
    [written] = list((tmp_path / "results").glob("*.json"))
    methods = {m["key"]: m for m in json.loads(written.read_text())["methods"]}
    assert set(methods) == {"sync", "switch_freeze", "rollback_freeze"}
    for key, method in methods.items():
        assert method["ok"], (key, method["notes"])
        assert method["rows"] > 0 and method["seconds"] > 0 and method["peak_mb"] > 10
    for key in ("switch_freeze", "rollback_freeze"):
        assert 0 < methods[key]["details"]["freeze_seconds"] < methods[key]["seconds"]
    text = written.with_suffix(".md").read_text()
    assert "| rollback_to_sqlite after 1% of rows written on PostgreSQL | " in text
    assert "write freeze" in text and "(target <= 5)" in text


def test_the_switch_writer_changes_one_percent_of_rows(tmp_path):
    import sqlite3

    path = tmp_path / "db.sqlite3"
    conn = sqlite3.connect(path)
    for table, *_ in run.CHANGES:
        conn.execute(
            f"CREATE TABLE {table} (id INTEGER PRIMARY KEY AUTOINCREMENT, first_name TEXT, "
            "address_line2 TEXT, title TEXT, notes TEXT, user_agent TEXT)"
        )
        conn.executemany(f"INSERT INTO {table} (first_name) VALUES (?)", [("x",)] * 20_000)
    conn.commit()
    conn.close()
    changed = run.change_sqlite(path, 1)
    total = 5 * 20_000
    assert 0.009 * total <= changed <= 0.011 * total
