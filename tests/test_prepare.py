"""migration_prepare end to end on real SQLite files and the real PostgreSQL test database."""

from __future__ import annotations

import json
import os
import sqlite3
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connections
from django.test import override_settings

from accounts.models import Organisation, User
from dbmigration import state as state_mod
from dbmigration.backup import list_backups
from dbmigration.errors import DataError, PhaseError, SourceError, TargetError
from dbmigration.prepare import run_prepare
from dbmigration.sqlite_source import file_sha256
from propcore.pgserver import _free_port
from tests.sources import corrupt

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)

PHASES = [
    "1_safety_checks",
    "2_backup",
    "3_postgresql_checks",
    "4_schema",
    "5_validation",
    "read_only_proof",
]


def migrated_source(tmp_path: Path, *, users: int = 3) -> Path:
    """A copy of the migrated SQLite test database holding a few real rows."""
    org = Organisation.objects.using("sqlite").create(name="Ó Briain Homes", kind="developer")
    for i in range(users):
        User.objects.db_manager("sqlite").create_user(
            f"user{i}@example.ie", "pw", first_name="Séan", organisation=org
        )
    path = tmp_path / "source.sqlite3"
    src = sqlite3.connect(connections["sqlite"].settings_dict["NAME"])
    dest = sqlite3.connect(path)
    src.backup(dest)
    dest.close()
    src.close()
    return path


def dirs(tmp_path: Path) -> dict:
    return {
        "state_file": tmp_path / "db" / "state.json",
        "backup_dir": tmp_path / "db" / "backups",
        "report_dir": tmp_path / "db" / "reports",
        "log_dir": tmp_path / "db" / "logs",
    }


def as_settings(tmp_path: Path, source: Path):
    d = dirs(tmp_path)
    return override_settings(
        SQLITE_PATH=source,
        STATE_FILE=d["state_file"],
        BACKUP_DIR=d["backup_dir"],
        REPORT_DIR=d["report_dir"],
        LOG_DIR=d["log_dir"],
    )


def test_prepare_runs_phases_1_to_5_and_is_idempotent(tmp_path):
    source = migrated_source(tmp_path)
    sha = file_sha256(source)
    seen = []
    result = run_prepare(sqlite_path=source, progress=seen.append, **dirs(tmp_path))
    assert result.ok and [p.name for p in result.phases] == PHASES
    assert all(p.status in ("ok", "warning") for p in result.phases)
    assert result.rows_scanned >= 4 and result.rejections == []
    assert result.conversion_rows_per_s > 0 and result.estimated_copy_seconds >= 0
    assert any(m.startswith("phase 5:") for m in seen)

    report = json.loads(result.report_path.read_text())
    assert report["status"] == "ok"
    assert [s["name"] for s in report["steps"]] == PHASES
    assert report["facts"]["source_sha256_before"] == report["facts"]["source_sha256_after"] == sha
    (backup,) = report["facts"]["backups"]
    assert backup["verified"] and backup["row_counts"]["accounts_user"] == 3
    assert all(len(f["sha256"]) == 64 for f in backup["files"])
    validation = report["steps"][4]["details"]
    assert validation["rows_scanned"]["accounts_user"] == 3
    assert validation["schema_problems"] == []
    log = result.log_path.read_text()
    assert all(f"step {name}: ok" in log or f"step {name}: warning" in log for name in PHASES)

    st = state_mod.read_state(dirs(tmp_path)["state_file"])
    assert st.phase == "prepared" and st.last_report == str(result.report_path)
    assert st.source_fingerprint["sha256"] == sha
    assert st.last_backup == str(result.backup.path)
    assert st.extra["target"]["system_identifier"] and st.extra["target"]["database_oid"]
    assert file_sha256(source) == sha

    # again, through the command: same outcome, one more backup, one more transition
    out = StringIO()
    with as_settings(tmp_path, source):
        call_command("migration_prepare", "--noinput", stdout=out)  # accepted like the others
    assert "Prepared. Next: migrate_data" in out.getvalue() and "Report:" in out.getvalue()
    st = state_mod.read_state(dirs(tmp_path)["state_file"])
    assert [h["to"] for h in st.history] == ["prepared", "prepared"]
    assert len(list_backups(dirs(tmp_path)["backup_dir"])) == 2
    assert file_sha256(source) == sha


def _source_with_a_nul_byte(tmp_path) -> tuple[Path, str]:
    source = migrated_source(tmp_path)
    conn = sqlite3.connect(source)
    conn.execute("UPDATE accounts_user SET last_name = 'Nul' || char(0) || 'Byte' WHERE rowid = 1")
    pk = conn.execute("SELECT id FROM accounts_user WHERE rowid = 1").fetchone()[0]
    conn.commit()
    conn.close()
    return source, pk


def test_rows_that_would_be_rejected_are_listed_and_the_choice_left_to_the_operator(tmp_path):
    source, pk = _source_with_a_nul_byte(tmp_path)
    result = run_prepare(sqlite_path=source, **dirs(tmp_path))
    (rejection,) = result.rejections
    assert rejection.table == "accounts_user" and rejection.column == "last_name"
    assert pk.replace("-", "") in rejection.pk.replace("-", "")
    report = json.loads(result.report_path.read_text())
    validation = report["steps"][4]
    assert validation["status"] == "warning"
    assert "1 source rows would be rejected" in validation["warnings"][0]
    assert validation["details"]["rejections"][0]["column"] == "last_name"
    # prepared, so that migrate_data --quarantine / --repair can run; plain migrate_data stops
    assert state_mod.read_state(dirs(tmp_path)["state_file"]).phase == "prepared"


def test_the_command_prints_each_rejected_row_and_the_ways_forward(tmp_path):
    source, pk = _source_with_a_nul_byte(tmp_path)
    out = StringIO()
    with as_settings(tmp_path, source):
        call_command("migration_prepare", stdout=out)
    text = out.getvalue()
    assert "1 rows would be rejected:" in text
    assert f"accounts_user pk={pk}" in text.replace("-", "")
    assert "last_name: NUL byte" in text
    assert "migrate_data --quarantine" in text
    assert "Prepared. Next: migrate_data" in text


def test_strict_refuses_rows_that_would_be_rejected(tmp_path):
    source, _pk = _source_with_a_nul_byte(tmp_path)
    with pytest.raises(DataError, match="1 source rows would be rejected") as exc:
        run_prepare(sqlite_path=source, strict=True, **dirs(tmp_path))
    assert "accounts_user" in str(exc.value) and "Report:" in str(exc.value)
    report_path = Path(str(exc.value).split("Report: ")[1].strip())
    assert json.loads(report_path.read_text())["status"] == "failed"
    assert state_mod.read_state(dirs(tmp_path)["state_file"]).phase == "nothing"


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("not_sqlite", "is not a SQLite database"),
        ("corrupt", "is corrupt"),
        ("locked", "is locked by another writer"),
    ],
)
def test_bad_sources_refused_by_the_command(tmp_path, kind, message):
    path = tmp_path / "bad.sqlite3"
    holder = None
    if kind == "not_sqlite":
        path.write_bytes(b"PK\x03\x04 a zip file, not a database")
    elif kind == "corrupt":
        corrupt(path)
    elif kind == "locked":
        path = migrated_source(tmp_path)
        holder = sqlite3.connect(path, isolation_level=None)
        # a legacy rollback-journal file: in WAL mode a writer never blocks a reader
        holder.execute("PRAGMA journal_mode=DELETE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("DELETE FROM django_session")
    try:
        with as_settings(tmp_path, path), pytest.raises(CommandError, match=message) as exc:
            call_command("migration_prepare", "--lock-timeout", "0.2", stdout=StringIO())
    finally:
        if holder:
            holder.execute("ROLLBACK")
            holder.close()
    assert exc.value.returncode == SourceError.returncode
    assert len(str(exc.value).splitlines()) <= 3  # cause + fix, then where the report is
    assert state_mod.read_state(dirs(tmp_path)["state_file"]).phase == "nothing"
    assert list_backups(dirs(tmp_path)["backup_dir"]) == []


def test_foreign_tables_in_target_are_never_overwritten(tmp_path):
    source = migrated_source(tmp_path)
    with connections["postgresql"].cursor() as cur:
        cur.execute("CREATE TABLE billing_invoices (id int)")
    try:
        with as_settings(tmp_path, source), pytest.raises(CommandError) as exc:
            call_command("migration_prepare", stdout=StringIO())
        with connections["postgresql"].cursor() as cur:
            cur.execute("SELECT count(*) FROM billing_invoices")
            assert cur.fetchone()[0] == 0
    finally:
        with connections["postgresql"].cursor() as cur:
            cur.execute("DROP TABLE billing_invoices")
    assert exc.value.returncode == TargetError.returncode
    assert "billing_invoices" in str(exc.value) and "empty database" in str(exc.value)
    assert list_backups(dirs(tmp_path)["backup_dir"]) == []


def test_unreachable_postgresql_stops_in_phase_1(tmp_path, monkeypatch):
    source = migrated_source(tmp_path)
    # point the alias at a port where nothing listens (configuration, not code, is changed)
    monkeypatch.setitem(connections["postgresql"].settings_dict, "PORT", _free_port())
    with pytest.raises(TargetError, match="is not reachable") as exc:
        run_prepare(sqlite_path=source, **dirs(tmp_path))
    assert "start the server or correct POSTGRES_URL" in str(exc.value)
    report = json.loads(Path(str(exc.value).split("Report: ")[1]).read_text())
    assert [s["status"] for s in report["steps"]] == ["failed"]


def test_out_of_order_refused(tmp_path):
    source = migrated_source(tmp_path, users=0)
    d = dirs(tmp_path)
    state_mod.write_state(d["state_file"], state_mod.MigrationState(phase="switched"))
    with pytest.raises(PhaseError, match="Cannot run migration_prepare now"):
        run_prepare(sqlite_path=source, **d)
    assert state_mod.read_state(d["state_file"]).phase == "switched"


def test_writes_during_prepare_pass_a_schema_change_fails_it(tmp_path):
    source = migrated_source(tmp_path)

    def app_writes(message):
        if message.startswith("phase 5"):
            conn = sqlite3.connect(source)
            conn.execute("DELETE FROM django_session")
            conn.execute("UPDATE accounts_user SET first_name = 'changed'")
            conn.commit()
            conn.close()

    run_prepare(sqlite_path=source, progress=app_writes, **dirs(tmp_path))  # a live site
    assert state_mod.read_state(dirs(tmp_path)["state_file"]).phase == "prepared"

    def deploy_migrates(message):
        if message.startswith("phase 5"):
            conn = sqlite3.connect(source)
            conn.execute("CREATE INDEX user_first_name ON accounts_user (first_name)")
            conn.commit()
            conn.close()

    elsewhere = dirs(tmp_path / "again")
    with pytest.raises(SourceError, match="schema changed while prepare ran"):
        run_prepare(sqlite_path=source, progress=deploy_migrates, **elsewhere)
    assert state_mod.read_state(elsewhere["state_file"]).phase == "nothing"


def test_sigterm_during_prepare_leaves_nothing_marked(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.sources import BASE_DIR, big_source

    source = big_source(tmp_path / "big.sqlite3")
    pg = connections["postgresql"].settings_dict
    db_dir = tmp_path / "db"
    env = {
        **os.environ,
        "PROPCORE_DATABASE_DIR": str(db_dir),
        "SQLITE_PATH": str(source),
        # the test database: phase 1 finds only our schema there
        "POSTGRES_URL": f"postgres://{pg['USER']}:{pg['PASSWORD'] or ''}@{pg['HOST']}:"
        f"{pg['PORT']}/{pg['NAME']}",
        "DATABASE_ACTIVE": "sqlite",
    }
    proc = subprocess.Popen(
        [sys.executable, str(BASE_DIR / "manage.py"), "migration_prepare"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(db_dir.glob("backups/*.partial/jsonl")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    assert not list(db_dir.glob("backups/*.partial")) and list_backups(db_dir / "backups") == []
    assert state_mod.read_state(db_dir / "state.json").phase == "nothing"
    (report,) = (db_dir / "reports").glob("migration_report_*.json")
    assert json.loads(report.read_text())["status"] == "failed"


def test_schema_comparison_names_a_changed_column():
    from dbmigration.prepare import compare_schema

    assert compare_schema("postgresql") == []
    with connections["postgresql"].cursor() as cur:
        cur.execute("ALTER TABLE accounts_organisation ALTER COLUMN phone TYPE text")
    try:
        problems = compare_schema("postgresql")
    finally:
        with connections["postgresql"].cursor() as cur:
            cur.execute("ALTER TABLE accounts_organisation ALTER COLUMN phone TYPE varchar(32)")
    assert problems == ["accounts_organisation.phone is text, expected character varying(32)"]


def test_types_are_compared_in_postgresqls_own_spelling():
    """A TimeField's 'time' is PostgreSQL's 'time without time zone' (it made prepare refuse)."""
    from dbmigration.prepare import canonical_types, connect_target

    names = ["time", "varchar(20)", "numeric(10, 2)", "timestamp with time zone", "serial"]
    with connect_target("postgresql") as conn:
        spelled = canonical_types(conn, [*names, "interval", "no_such_type"])
    assert spelled == {
        "time": "time without time zone",
        "varchar(20)": "character varying(20)",
        "numeric(10, 2)": "numeric(10,2)",
        "timestamp with time zone": "timestamp with time zone",
        "serial": "integer",
        "interval": "interval",
        "no_such_type": "no_such_type",  # unknown: kept, so it differs from the catalog's
    }


def test_every_value_field_type_passes_the_schema_check(monkeypatch):
    """Django's own column types, created by its schema editor, all match (TimeField failed)."""
    from django.db import models
    from django.test.utils import isolate_apps

    from dbmigration import plan
    from dbmigration.prepare import compare_schema

    with isolate_apps("tests.corpus.fields"):

        class EveryType(models.Model):  # noqa: DJ008
            t = models.TimeField()
            d = models.DurationField()
            dt = models.DateTimeField()
            dec = models.DecimalField(max_digits=12, decimal_places=3)
            f = models.FloatField()
            u = models.UUIDField()
            j = models.JSONField()
            b = models.BinaryField()
            ip = models.GenericIPAddressField()
            c = models.CharField(max_length=7)
            small = models.PositiveSmallIntegerField()

            class Meta:
                app_label = "fields"
                db_table = f"prepare_every_type_{os.getpid()}"

    pg = connections["postgresql"]
    with pg.schema_editor() as editor:
        editor.create_model(EveryType)
    monkeypatch.setattr(plan, "copied_models", lambda: [EveryType])
    try:
        assert compare_schema("postgresql") == []
    finally:
        with pg.schema_editor() as editor:
            editor.delete_model(EveryType)
