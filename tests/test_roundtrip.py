"""The whole runbook, round trip: seed -> prepare -> migrate -> switch -> writes on PostgreSQL
-> rollback -> SQLite holds exactly those writes -> prepare -> migrate -> an interrupted switch
-> switch.  Real commands, the real SQLite test file and the real PostgreSQL test database."""

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connections

from accounts.models import KycVerification, LoginEvent, Membership, Organisation, User
from dbmigration import cutover, rollback
from dbmigration import freeze as fz
from dbmigration.backup import SNAPSHOT
from dbmigration.plan import build_plan
from dbmigration.state import read_state
from dbmigration.sync import diff_table
from dbmigration.verify import Side, verify

pytestmark = [pytest.mark.slow, pytest.mark.django_db(databases="__all__", transaction=True)]
PG = "postgresql"


@pytest.fixture
def runbook(settings, tmp_path):
    """Point the runbook's files at tmp_path and its source at the SQLite test database."""
    settings.SQLITE_PATH = Path(connections.settings["sqlite"]["NAME"])
    settings.STATE_FILE = tmp_path / "state.json"
    settings.BACKUP_DIR = tmp_path / "backups"
    settings.REPORT_DIR = tmp_path / "reports"
    settings.LOG_DIR = tmp_path / "logs"
    return settings


def run(name, *args):
    out = StringIO()
    call_command(name, *args, stdout=out, stderr=StringIO(), verbosity=1)
    return out.getvalue()


def report_of(out: str) -> dict:
    return json.loads(Path(out.split("Report: ")[1].split()[0]).read_text())


def prepare_and_migrate():
    run("migration_prepare")
    run("migrate_data")
    assert read_state(runbook_state()).phase == "data_migrated"


def runbook_state():
    from django.conf import settings

    return settings.STATE_FILE


def assert_equal_by_checksums_and_objects(sqlite_path):
    """SQLite and PostgreSQL agree: counts and range checksums, then every object via the ORM."""
    source, target = Side(alias=PG), Side(sqlite_path=sqlite_path)
    checked = verify(source=source, target=target)
    assert checked.ok, checked.problems(source, target)
    for table in build_plan().tables:
        diff = rollback.orm_diff(table.model, source=PG, target="sqlite")
        assert diff.total == 0, (table.db_table, diff)


def writes_on_postgresql():
    """Create, update, soft-delete and hard-delete through the ORM, as the application would."""
    users = list(User.all_objects.using(PG).filter(deleted_at__isnull=True).order_by("email"))
    org = Organisation.objects.using(PG).order_by("name").first()
    created = User.objects.db_manager(PG).create_user(
        "nua@example.ie", "pw", first_name="Aoife", preferences={"county": "Corca Dhuibhne"}
    )
    Membership.objects.using(PG).create(user=created, organisation=org, role="member")
    KycVerification.objects.using(PG).create(
        user=created, document_type="passport", document_reference="PX1", risk_score="12.50"
    )
    updated = users[0]
    updated.last_name, updated.metadata = "Mac Giolla Phádraig", {"note": "new\u00a0name"}
    updated.save(using=PG)
    soft = users[1]
    soft.delete(using=PG)
    hard = users[2].pk
    users[2].hard_delete(using=PG)  # cascades: memberships, KYC checks; SET NULL elsewhere
    return {"created": created.pk, "updated": updated.pk, "soft": soft.pk, "hard": hard}


def test_round_trip(runbook):
    sqlite_path = runbook.SQLITE_PATH
    run("seed_demo", "--users", "25")
    prepare_and_migrate()

    # 1. switch, write on PostgreSQL, roll back: SQLite holds exactly those writes
    out = run("switch_to_postgresql", "--noinput", "--drain-seconds", "0")
    freeze = report_of(out)["facts"]["write_freeze_seconds"]
    assert 0 < freeze < 30
    assert read_state(runbook.STATE_FILE).active_backend == PG
    changed = writes_on_postgresql()
    logins_before = LoginEvent.objects.using("sqlite").count()

    out = run("rollback_to_sqlite", "--noinput", "--drain-seconds", "0")
    state = read_state(runbook.STATE_FILE)
    assert (state.phase, state.active_backend) == ("rolled_back", "sqlite")
    assert_equal_by_checksums_and_objects(sqlite_path)
    carried = {t["label"]: t for t in report_of(out)["facts"]["carried_back"]}
    user = carried["accounts.User"]
    assert (user["inserted"], user["updated"], user["deleted"]) == (1, 2, 1)
    assert user["sample_pks"]["inserted"] == [str(changed["created"])]
    assert sorted(user["sample_pks"]["updated"]) == sorted(
        [str(changed["updated"]), str(changed["soft"])]
    )
    assert user["sample_pks"]["deleted"] == [str(changed["hard"])]
    assert carried["accounts.KycVerification"]["inserted"] == 1
    assert "auditlog.LogEntry" in carried  # the audit trail of those writes came back too
    # exactly those changes: the pre-rollback backup differs from the new file by them only
    backup = next(runbook.BACKUP_DIR.glob("*pre-rollback*"))
    old = Side(sqlite_path=backup / SNAPSHOT)
    users_table = build_plan(only=["accounts_user"]).tables[0]
    diff = diff_table(source=Side(sqlite_path=sqlite_path), target=old, table=users_table)
    assert diff.inserted_pks == [changed["created"]]
    assert sorted(diff.updated_pks, key=str) == sorted(
        [changed["updated"], changed["soft"]], key=str
    )
    assert diff.deleted_pks == [changed["hard"]]
    lite = User.all_objects.using("sqlite")
    assert lite.get(pk=changed["updated"]).last_name == "Mac Giolla Phádraig"
    assert lite.get(pk=changed["soft"]).is_deleted
    assert lite.get(pk=changed["created"]).check_password("pw")
    assert LoginEvent.objects.using("sqlite").count() == logins_before

    # 2. the application goes on, on SQLite; then prepare, migrate and switch again
    User.objects.db_manager("sqlite").create_user("ar-ais@example.ie", "pw")
    prepare_and_migrate()

    # 3. an interrupted switch (Ctrl-C in the middle of the catch-up) stays on SQLite
    late = User.objects.db_manager("sqlite").create_user("deireanach@example.ie", "pw")

    def interrupt(message):
        if message.startswith("catch-up: accounts_user"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cutover.switch_to_postgresql(drain_seconds=0, progress=interrupt)
    state = read_state(runbook.STATE_FILE)
    assert (state.phase, state.active_backend) == ("data_migrated", "sqlite")
    assert not fz.freeze_path_for(runbook.STATE_FILE).exists()
    assert User.objects.using("sqlite").filter(pk=late.pk).exists()

    out = run("switch_to_postgresql", "--noinput", "--drain-seconds", "0")
    assert read_state(runbook.STATE_FILE).active_backend == PG
    assert User.objects.using(PG).get(pk=late.pk).email == "deireanach@example.ie"
    assert_equal_by_checksums_and_objects(sqlite_path)
    assert "ok" in run("db_health_check", "--check", "active_backend", "--check", "replication")


def test_prepare_after_a_rollback_is_not_blocked_by_the_postgresql_fence(runbook):
    # regression: the rollback leaves PostgreSQL fenced; the next prepare's migrate then
    # failed on its own inserts (content types, permissions of a model a deploy added)
    from django.contrib.auth.models import Permission

    from dbmigration import fence

    run("seed_demo", "--users", "10")
    prepare_and_migrate()
    run("switch_to_postgresql", "--noinput", "--drain-seconds", "0")
    writes_on_postgresql()
    run("rollback_to_sqlite", "--noinput", "--drain-seconds", "0")
    assert fence.postgres_fence(PG) is not None  # the inactive PostgreSQL refuses writes
    # a deploy adds a model: its permission is new to the target (removed under the fence's
    # triggers, which only the runbook may step around)
    gone = Permission.objects.using("sqlite").get(codename="view_organisation")
    table = Permission._meta.db_table
    with connections[PG].cursor() as cur:
        cur.execute(f'ALTER TABLE "{table}" DISABLE TRIGGER {fence.PG_TRIGGER}')
        cur.execute(f'DELETE FROM "{table}" WHERE codename = %s', [gone.codename])
        cur.execute(f'ALTER TABLE "{table}" ENABLE TRIGGER {fence.PG_TRIGGER}')

    out = run("migration_prepare")
    assert report_of(out)["status"] in ("ok", "warning")
    assert fence.postgres_fence(PG) is None
    assert Permission.objects.using(PG).filter(codename=gone.codename).exists()
    run("migrate_data")
    out = run("switch_to_postgresql", "--noinput", "--drain-seconds", "0")
    state = read_state(runbook.STATE_FILE)
    assert (state.phase, state.active_backend) == ("switched", PG)
    assert_equal_by_checksums_and_objects(runbook.SQLITE_PATH)
