"""PostgreSQL and SQLite preflight checks, against real servers and files.

The shared server trusts every local connection (pg_hba 'trust'), so a wrong password
cannot fail there: those tests start a private cluster with scram-sha-256 auth.
"""

from __future__ import annotations

import sqlite3
from io import StringIO
from pathlib import Path

import psycopg
import pytest
from django.core.management import CommandError, call_command
from django.db import connections

from dbmigration.errors import SourceError, TargetError
from dbmigration.preflight import (
    check_postgresql,
    check_sqlite_source,
    check_target_is_ours,
    code_migrations,
    conninfo_from_settings,
    conninfo_from_url,
    required_extensions,
)
from propcore.pgserver import _free_port
from tests.clusters import PrivateCluster
from tests.sources import make_source

ADMIN_PW = "admin-pw-9f2"
GOOD_PW = "right-horse-battery"
NOPRIV_PW = "nopriv-pw-71"


@pytest.fixture(scope="module")
def scram_cluster():
    """A private PostgreSQL with password auth on 127.0.0.1, with two roles and a database."""
    with PrivateCluster(
        "propcore_scram_",
        superuser_password=ADMIN_PW,
        hba=["host all all 127.0.0.1/32 scram-sha-256"],
        conf={"max_connections": 20},
        tls=True,  # so that the SSL check sees a real TLS session
    ) as cluster:
        port = cluster.port
        admin = {"host": "127.0.0.1", "port": port, "user": "postgres", "password": ADMIN_PW}
        with psycopg.connect(**admin, dbname="postgres", autocommit=True) as conn:
            conn.execute(f"CREATE ROLE migrator LOGIN PASSWORD '{GOOD_PW}'")
            conn.execute(f"CREATE ROLE nopriv LOGIN PASSWORD '{NOPRIV_PW}'")
            conn.execute("CREATE DATABASE target OWNER migrator ENCODING 'UTF8' TEMPLATE template0")
        yield {"port": port, "admin": admin}


def _url(user: str, password: str, port: int, db: str = "target") -> str:
    return f"postgres://{user}:{password}@127.0.0.1:{port}/{db}"


def _run_test_command(*args) -> tuple[str, CommandError | None]:
    out = StringIO()
    try:
        call_command("db_test_postgresql", *args, stdout=out)
    except CommandError as exc:
        return out.getvalue(), exc
    return out.getvalue(), None


def test_all_checks_pass_for_the_owner(scram_cluster):
    url = _url("migrator", GOOD_PW, scram_cluster["port"])
    out, err = _run_test_command("--url", url, "--pool-max", "5")
    assert err is None, out
    for name in (
        "connect",
        "server_version",
        "ssl",
        "encoding",
        "privileges",
        "extensions",
        "max_connections",
    ):
        assert f"{name}: ok" in out
    assert "All checks passed" in out and GOOD_PW not in out


def test_ssl_is_reported_from_pg_stat_ssl(scram_cluster):
    url = _url("migrator", GOOD_PW, scram_cluster["port"])
    with_ssl = check_postgresql(conninfo=conninfo_from_url(url + "?sslmode=require"), pool_max=5)
    ssl = next(c for c in with_ssl.checks if c.name == "ssl")
    assert with_ssl.facts["ssl"] is True and ssl.detail.startswith("SSL in use (TLSv1")
    plain = check_postgresql(conninfo={**conninfo_from_url(url), "sslmode": "disable"}, pool_max=5)
    assert plain.facts["ssl"] is False
    assert next(c for c in plain.checks if c.name == "ssl").detail == "no SSL (local connection)"


def test_wrong_password_fails_with_a_fix(scram_cluster):
    out, err = _run_test_command("--url", _url("migrator", "wrong-pw", scram_cluster["port"]))
    assert err is not None and err.returncode == TargetError.returncode
    assert "refused the password for role 'migrator'" in out
    assert "Fix: put the right password in POSTGRES_URL" in out
    assert "wrong-pw" not in out and "wrong-pw" not in str(err)


def test_role_without_privileges_names_each_missing_grant(scram_cluster):
    out, err = _run_test_command("--url", _url("nopriv", NOPRIV_PW, scram_cluster["port"]))
    assert err is not None and "privileges" in str(err)
    line = next(x for x in out.splitlines() if x.strip().startswith("privileges"))
    assert "FAILED" in line and "role 'nopriv' lacks CREATE on schema public" in line
    assert 'GRANT CREATE ON SCHEMA public TO "nopriv"' in line
    assert NOPRIV_PW not in out


def test_unreachable_server_is_one_clear_line():
    port = _free_port()  # nothing listens there
    out, err = _run_test_command("--url", f"postgres://postgres:pw@127.0.0.1:{port}/x")
    assert err is not None and err.returncode == TargetError.returncode
    failed = [x for x in out.splitlines() if "FAILED" in x]
    assert len(failed) == 1 and "is not reachable" in failed[0]
    assert "start the server or correct POSTGRES_URL" in failed[0]
    assert ":pw@" not in out


def test_missing_database_is_fine_when_the_role_can_create_it(scram_cluster):
    report = check_postgresql(
        conninfo=conninfo_from_url(_url("postgres", ADMIN_PW, scram_cluster["port"], db="not_yet")),
        pool_max=5,
    )
    assert report.ok, [c.line() for c in report.checks]
    assert "will create it" in next(c.detail for c in report.checks if c.name == "database")


def test_pool_larger_than_max_connections_fails(scram_cluster):
    report = check_postgresql(
        conninfo=conninfo_from_url(_url("migrator", GOOD_PW, scram_cluster["port"])),
        pool_max=50,
    )
    assert [c.name for c in report.failed] == ["max_connections"]
    assert "lower the profile's pool_max" in report.failed[0].line()


def test_required_extensions_come_from_migrations(scram_cluster):
    assert required_extensions() == ["pg_trgm"]  # 0006: the admin's trigram search indexes
    report = check_postgresql(
        conninfo=conninfo_from_url(_url("migrator", GOOD_PW, scram_cluster["port"])),
        pool_max=5,
        extensions=["pg_trgm", "no_such_extension"],
    )
    ext = next(c for c in report.checks if c.name == "extensions")
    assert not ext.ok and "not available on the server: no_such_extension" in ext.detail


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_shared_test_database_passes_and_target_is_ours():
    conninfo = conninfo_from_settings(connections["postgresql"].settings_dict)
    report = check_postgresql(conninfo=conninfo, pool_max=10)
    assert report.ok, [c.line() for c in report.checks]
    assert report.facts["encoding"] == "UTF8" and report.facts["latency_ms"] > 0
    assert check_target_is_ours(conninfo=conninfo).ok


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_foreign_table_in_target_is_refused():
    conninfo = conninfo_from_settings(connections["postgresql"].settings_dict)
    with connections["postgresql"].cursor() as cur:
        cur.execute("CREATE TABLE legacy_crm_contacts (id int)")
    try:
        check = check_target_is_ours(conninfo=conninfo)
    finally:
        with connections["postgresql"].cursor() as cur:
            cur.execute("DROP TABLE legacy_crm_contacts")
    assert not check.ok and "legacy_crm_contacts" in check.detail
    assert "never overwrite foreign data" in check.line()


def test_sqlite_checks_find_fk_violations_and_unapplied_migrations(tmp_path):
    path = make_source(tmp_path / "s.sqlite3", migrations=code_migrations()[:-1])
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE parent (id INTEGER PRIMARY KEY);"
        "CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent(id));"
        "INSERT INTO child VALUES (1, 42);"
    )
    conn.close()
    report = check_sqlite_source(sqlite_path=path)
    failed = {c.name: c for c in report.failed}
    checks = {c.name: c for c in report.checks}
    # orphans are the copy's rejections (listed in phase 5, quarantinable), so only a warning
    assert set(failed) == {"migrations_applied"}
    assert checks["foreign_key_check"].warning
    assert "child rowid 1 -> parent" in checks["foreign_key_check"].detail
    assert code_migrations()[-1] in failed["migrations_applied"].detail
    line = failed["migrations_applied"].line()
    assert "manage.py migrate' while SQLite is the active backend" in line


def test_sqlite_integrity_failure_raises(tmp_path):
    from tests.sources import corrupt

    with pytest.raises(SourceError, match="corrupt|integrity_check"):
        check_sqlite_source(sqlite_path=corrupt(tmp_path / "c.sqlite3"))


def test_sqlite_check_never_writes(tmp_path):
    path = make_source(tmp_path / "s.sqlite3")
    before = path.read_bytes()
    check_sqlite_source(sqlite_path=path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["s.sqlite3"]


def test_squashed_migrations_are_judged_as_django_judges_them():
    from django.conf import settings
    from django.test import override_settings

    from dbmigration.preflight import known_migrations, unapplied_migrations

    shop = "tests.minimal_project.shop"  # 0001 and 0002 squashed, then 0003 and 0004
    with override_settings(INSTALLED_APPS=[*settings.INSTALLED_APPS, shop]):
        ours = [m for m in code_migrations() if not m.startswith("shop.")]
        later = ["shop.0003_source_write_probe", "shop.0004_featured"]
        assert code_migrations() == sorted([*ours, "shop.0001_squashed_0002_seed", *later])
        # a target migrated by Django records the replaced names beside the squashed one
        replaced = {"shop.0001_initial", "shop.0002_seed"}
        assert replaced | {"shop.0001_squashed_0002_seed"} <= known_migrations()
        # a source migrated before the squash existed has only the replaced names: applied
        assert unapplied_migrations([*ours, *replaced, *later]) == []
        # one replaced migration missing: the squashed one is not applied
        assert unapplied_migrations([*ours, "shop.0001_initial", *later]) == [
            "shop.0001_squashed_0002_seed"
        ]


# --- max_connections against workers x pool (the private cluster runs max_connections=20) ---


def _connections(report):
    return next(c for c in report.checks if c.name == "max_connections")


def _free_connections(port: int) -> tuple[int, int]:
    """(max_connections, free) as the check counts them, minus the check's own connection."""
    admin = {"host": "127.0.0.1", "port": port, "user": "postgres", "password": ADMIN_PW}
    with psycopg.connect(**admin, dbname="postgres") as conn:
        max_conn = int(conn.execute("SHOW max_connections").fetchone()[0])
        reserved = int(conn.execute("SHOW superuser_reserved_connections").fetchone()[0])
        used = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        ).fetchone()[0]
    return max_conn, max_conn - reserved - used  # the check's connection replaces this one


def test_workers_times_pool_over_max_connections_warns_with_the_number_needed(scram_cluster):
    conninfo = conninfo_from_url(_url("migrator", GOOD_PW, scram_cluster["port"]))
    max_conn, free = _free_connections(scram_cluster["port"])
    report = check_postgresql(conninfo=conninfo, pool_max=5, workers=4)
    check = _connections(report)
    # one process fits, four do not: the app starts, and fails only at its peak
    assert report.ok and check.warning, check.line()
    assert "too small for 4 worker(s) x a pool of up to 5: 21 needed at peak" in check.detail
    assert f"set max_connections to at least {max_conn + 21 - free}" in check.detail
    assert "POSTGRES_POOLING=pgbouncer" in check.detail
    # the control: two workers fit
    fits = _connections(check_postgresql(conninfo=conninfo, pool_max=5, workers=2))
    assert fits.ok and not fits.warning, fits.line()
    assert "2 worker(s) x a pool of up to 5: 11 needed at peak" in fits.detail


def test_through_pgbouncer_the_server_sees_pgbouncers_pool_not_the_workers(scram_cluster):
    conninfo = conninfo_from_url(_url("migrator", GOOD_PW, scram_cluster["port"]))
    small = _connections(
        check_postgresql(conninfo=conninfo, pool_max=50, workers=8, pgbouncer_pool=10)
    )
    assert small.ok and not small.warning, small.line()
    assert "PgBouncer's pool of 10" in small.detail
    large = _connections(check_postgresql(conninfo=conninfo, pool_max=5, pgbouncer_pool=45))
    assert large.ok and large.warning
    assert "46 needed at peak" in large.detail and "lower default_pool_size" in large.detail


def test_db_test_postgresql_warns_for_the_workers_and_still_exits_0(scram_cluster):
    url = _url("migrator", GOOD_PW, scram_cluster["port"])
    out, err = _run_test_command("--url", url, "--pool-max", "5", "--workers", "6")
    assert err is None, out
    line = next(x for x in out.splitlines() if x.strip().startswith("max_connections"))
    assert "max_connections: warning" in line and "6 worker(s) x a pool of up to 5" in line


def test_the_pgbouncer_pool_is_read_from_its_config(tmp_path):
    from propcore.pooling import pgbouncer_server_connections

    assert pgbouncer_server_connections(Path("deploy/pgbouncer.ini")) == 40 + 5
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text("[pgbouncer]\npool_mode = transaction ; a comment\n")
    assert pgbouncer_server_connections(ini) == 20  # PgBouncer's defaults: 20 + 0
