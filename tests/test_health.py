"""dbmigration.health: the checks, the db_health_check command, and /health/."""

import json
from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connections

from dbmigration import freeze as fz
from dbmigration import health
from dbmigration.state import MigrationState, write_state
from propcore import middleware
from tests.clusters import streaming_pair

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)


@pytest.fixture
def state_file(settings, tmp_path):
    settings.STATE_FILE = tmp_path / "state.json"
    settings.BACKUP_DIR = tmp_path / "backups"
    return settings.STATE_FILE


def set_state(state_file, phase="nothing", backend="sqlite"):
    write_state(state_file, MigrationState(phase=phase, active_backend=backend))


def make_backup(backup_dir, *, age_hours: float, verified=True, kind="sqlite"):
    """A backup directory as db_backup leaves it (manifest only: the check reads nothing else)."""
    from dbmigration.backup import MANIFEST, BackupInfo

    created = (datetime.now(UTC) - timedelta(hours=age_hours)).isoformat()
    path = backup_dir / created.replace(":", "")
    path.mkdir(parents=True)
    info = BackupInfo(path=path, kind=kind, created_at=created, verified=verified)
    (path / MANIFEST).write_text(json.dumps(info.to_manifest()))
    return path


def test_active_backend_answers_on_each_engine(state_file):
    set_state(state_file, backend="sqlite")
    result = health.run_check("active_backend")
    assert (result.status, result.details["backend"]) == (health.OK, "sqlite")
    set_state(state_file, "switched", "postgresql")
    assert health.run_check("active_backend").status == health.OK


def test_active_backend_down_names_backend_and_cause(state_file, postgres_down):
    set_state(state_file, "switched", "postgresql")
    result = health.run_check("active_backend")
    assert result.status == health.DOWN
    assert result.message.startswith("postgresql does not answer")


def test_process_backend_stale_is_down(state_file):
    set_state(state_file, "switched", "postgresql")
    assert middleware.watcher.backend == "sqlite"
    result = health.run_check("process_backend")
    assert result.status == health.DOWN and "stale" in result.message
    assert result.details["stale"] is True


def test_process_backend_override_is_degraded(state_file, monkeypatch):
    set_state(state_file, "switched", "sqlite")
    monkeypatch.setenv("DATABASE_ACTIVE", "sqlite")
    assert health.run_check("process_backend").status == health.OK
    set_state(state_file, "switched", "postgresql")
    result = health.run_check("process_backend")
    assert result.status == health.DEGRADED and "DATABASE_ACTIVE" in result.message


def test_phase_reports_write_freeze(state_file):
    set_state(state_file, "data_migrated")
    assert health.run_check("migration_phase").status == health.OK
    fz.freeze_on(fz.freeze_path_for(state_file), reason="switch_to_postgresql")
    result = health.run_check("migration_phase")
    assert result.status == health.DEGRADED and "writes frozen" in result.message


def test_backup_age(settings, state_file):
    assert "no verified sqlite backup" in health.run_check("backup_age").message
    make_backup(settings.BACKUP_DIR, age_hours=50)
    make_backup(settings.BACKUP_DIR, age_hours=1, verified=False)
    result = health.run_check("backup_age")
    assert result.status == health.DEGRADED and "old (limit 26 h)" in result.message
    make_backup(settings.BACKUP_DIR, age_hours=2)
    result = health.run_check("backup_age")
    assert result.status == health.OK and 1.9 < result.details["age_hours"] < 2.1


def test_backup_age_after_the_switch_counts_only_postgresql_backups(settings, state_file):
    make_backup(settings.BACKUP_DIR, age_hours=1)  # the SQLite snapshot taken before the switch
    set_state(state_file, "switched", "postgresql")
    result = health.run_check("backup_age")
    assert result.status == health.DEGRADED, result.message
    assert "no verified postgresql backup" in result.message and "run db_backup" in result.message
    make_backup(settings.BACKUP_DIR, age_hours=3, kind="postgresql")
    result = health.run_check("backup_age")
    assert result.status == health.OK and result.details["backend"] == "postgresql"
    assert 2.9 < result.details["age_hours"] < 3.1  # the PostgreSQL one, not the newer SQLite one


def test_a_live_postgresql_without_its_tables_is_down(state_file, empty_postgres_database):
    set_state(state_file, "switched", "postgresql")
    result = health.run_check("active_backend")
    assert result.status == health.DOWN, result.message
    assert result.message.startswith("postgresql answers but lacks")
    assert "accounts_organisation" in result.details["missing_tables"]
    assert "pg_restore" in result.message
    with pytest.raises(CommandError, match="down: active_backend") as exc:
        call_command("db_health_check", "--check", "active_backend", stdout=StringIO())
    assert exc.value.returncode == 2


@pytest.fixture
def sqlite_missing(tmp_path):
    """The sqlite (and default) aliases pointed at a file that does not exist."""
    missing = tmp_path / "gone" / "propcore.sqlite3"
    missing.parent.mkdir()
    aliases = [
        a for a in ("sqlite", "default") if connections.settings[a]["ENGINE"].endswith("sqlite3")
    ]
    saved = {a: connections.settings[a]["NAME"] for a in aliases}
    for alias in aliases:
        connections[alias].close()
        connections.settings[alias]["NAME"] = str(missing)
    yield missing
    for alias in aliases:
        connections[alias].close()
        connections.settings[alias]["NAME"] = saved[alias]


def test_health_page_with_the_sqlite_file_missing_creates_nothing(
    client, state_file, sqlite_missing
):
    set_state(state_file, "nothing", "sqlite")
    response = client.get("/health/", {"format": "json"})
    assert not sqlite_missing.exists()  # Django's SQLite backend would have created it
    assert list(sqlite_missing.parent.iterdir()) == []
    assert response.status_code == 500  # the active backend is gone: the site is down
    checks = response.json()["checks"]
    failing = {k: v for k, v in checks.items() if v["status"] == "down"}
    assert any("sqlite" in key for key in failing), checks
    assert any("does not exist" in v["message"] for v in failing.values()), failing


def test_health_page_after_the_switch_only_warns_about_a_missing_sqlite_file(
    client, state_file, sqlite_missing
):
    set_state(state_file, "switched", "postgresql")
    middleware.watcher.backend = "postgresql"  # this process follows the state file
    try:
        body = client.get("/health/", {"format": "json"}).json()
    finally:
        middleware.watcher.backend = "sqlite"
    assert not sqlite_missing.exists()
    sqlite_checks = {k: v for k, v in body["checks"].items() if k == "database_sqlite"}
    assert sqlite_checks and all(v["status"] == "degraded" for v in sqlite_checks.values()), body


def test_db_health_check_with_the_sqlite_file_missing_creates_nothing(state_file, sqlite_missing):
    set_state(state_file, "nothing", "sqlite")
    with pytest.raises(CommandError) as exc:
        call_command("db_health_check", stdout=StringIO())
    assert exc.value.returncode == 2
    # the worst first, the milder ones named as such
    assert str(exc.value) == ("database health is down: active_backend (also degraded: backup_age)")
    assert list(sqlite_missing.parent.iterdir()) == []


def test_pool_usage(settings, state_file):
    connections["postgresql"].ensure_connection()  # takes one connection from the pool
    result = health.run_check("pool")
    assert result.status == health.OK
    assert result.details["postgresql"]["used"] == 1
    settings.HEALTH_POOL_USAGE_WARN = 0.05  # 1 of 10 is over 5%
    assert health.run_check("pool").status == health.DEGRADED


def test_replication_without_replica(state_file):
    result = health.run_check("replication")
    assert (result.status, result.message) == (health.OK, "no replica")


def test_slow_queries_counted(settings, state_file):
    settings.SLOW_QUERY_MS = 0.0  # every query is slow now
    settings.HEALTH_SLOW_QUERY_WARN = 5
    for _ in range(6):
        connections["sqlite"].cursor().execute("SELECT 1")
    result = health.run_check("slow_queries")
    assert result.status == health.DEGRADED and result.details["count"] >= 6


def test_command_exit_codes_and_json(settings, state_file, postgres_down):
    set_state(state_file, "nothing", "sqlite")
    make_backup(settings.BACKUP_DIR, age_hours=1)
    out = StringIO()
    # PostgreSQL unreachable while SQLite is active: not an outage
    call_command("db_health_check", "--json", stdout=out)
    body = json.loads(out.getvalue())
    assert body["status"] == "ok" and body["ok"] is True
    assert {c["name"] for c in body["checks"]} == set(health.CHECKS)
    set_state(state_file, "switched", "postgresql")
    with pytest.raises(CommandError, match="down: active_backend, process_backend") as exc:
        call_command("db_health_check", stdout=StringIO())
    assert exc.value.returncode == 2


def test_command_degraded_exits_1(state_file):
    out = StringIO()
    with pytest.raises(CommandError, match="degraded: backup_age") as exc:
        call_command("db_health_check", "--check", "backup_age", stdout=out)
    assert exc.value.returncode == 1
    assert "no verified sqlite backup" in out.getvalue()


def test_health_page_degraded_is_200_and_shows_backend(client, state_file):
    set_state(state_file, "nothing", "sqlite")
    response = client.get("/health/", {"format": "json"})
    assert response.status_code == 200, response.content
    checks = response.json()["checks"]
    assert checks["process_backend"]["message"] == "process uses sqlite; not stale"
    assert checks["backup_age"]["status"] == "degraded"


def test_health_page_down_is_500(client, state_file, postgres_down):
    set_state(state_file, "nothing", "sqlite")
    response = client.get("/health/", {"format": "json"})
    assert response.status_code == 500
    checks = response.json()["checks"]
    assert checks["database_postgresql"]["status"] == "down", checks


# --- replication lag against a real streaming replica (private primary + standby) ---


@pytest.fixture(scope="module")
def replica_pair():
    """Start a primary and a streaming standby on free ports; yield their ports."""
    with streaming_pair("propcore_replica_") as (_, p_port, s_port):
        yield p_port, s_port


@pytest.fixture
def point_at():
    """Point the postgresql alias's settings at another server for one check."""
    cfg = connections.settings["postgresql"]
    saved = cfg["HOST"], cfg["PORT"], cfg["NAME"]

    def _point(port: int) -> None:
        cfg["HOST"], cfg["PORT"], cfg["NAME"] = "127.0.0.1", port, "postgres"

    yield _point
    cfg["HOST"], cfg["PORT"], cfg["NAME"] = saved


def test_primary_reports_its_replica_and_lag(replica_pair, point_at, settings):
    primary, _ = replica_pair
    point_at(primary)
    result = health.run_check("replication")
    assert result.status == health.OK, result.message
    assert result.message.startswith("1 replica(s), max lag")
    assert result.details["replicas"][0]["state"] == "streaming"
    settings.HEALTH_REPLICA_LAG_WARN_SECONDS = -1  # any lag is too much now
    assert health.run_check("replication").status == health.DEGRADED


def test_standby_reports_replay_lag(replica_pair, point_at):
    _, standby = replica_pair
    point_at(standby)
    result = health.run_check("replication")
    assert result.status == health.OK, result.message
    assert result.details["replicas"][0]["name"] == "this server (replica)"
