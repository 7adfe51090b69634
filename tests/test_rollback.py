"""rollback_to_sqlite: before the switch (state only), after it (PostgreSQL writes carried back)."""

import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from io import StringIO
from pathlib import Path

import psycopg
import pytest
from auditlog.models import LogEntry
from django.core.management import CommandError, call_command
from django.core.management.color import no_style
from django.db import DatabaseError, connections, transaction
from django.db.migrations.executor import MigrationExecutor
from django.db.utils import load_backend
from django.utils import timezone

from accounts.models import KycVerification, LoginEvent, Membership, Organisation, User
from dbmigration import fence, rollback
from dbmigration import freeze as fz
from dbmigration.plan import build_plan
from dbmigration.state import MigrationState, read_state, write_state

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)


@pytest.fixture
def state_file(settings, tmp_path):
    settings.STATE_FILE = tmp_path / "state.json"
    settings.REPORT_DIR = tmp_path / "reports"
    settings.LOG_DIR = tmp_path / "logs"
    settings.BACKUP_DIR = tmp_path / "backups"
    return settings.STATE_FILE


def sqlite_file() -> str:
    return connections.settings["sqlite"]["NAME"]


def run_rollback(*args):
    out = StringIO()
    call_command("rollback_to_sqlite", "--noinput", "--drain-seconds", "0", *args, stdout=out)
    return out.getvalue()


def mirror_framework_rows():
    """Content types and permissions as migrate_data leaves them: SQLite's rows, same ids.

    pytest-django flushes each test database on its own and post_migrate re-creates these
    rows under new ids on each side, so after a few tests the two engines disagree."""
    from django.contrib.auth.models import Permission
    from django.contrib.contenttypes.models import ContentType

    types, permissions = (list(m.objects.using("sqlite").all()) for m in (ContentType, Permission))
    with transaction.atomic(using="postgresql"):
        Permission.objects.using("postgresql").all().delete()
        ContentType.objects.using("postgresql").all().delete()
        ContentType.objects.using("postgresql").bulk_create(types)
        Permission.objects.using("postgresql").bulk_create(permissions)
        with connections["postgresql"].cursor() as cursor:
            for sql in connections["postgresql"].ops.sequence_reset_sql(
                no_style(), [ContentType, Permission]
            ):
                cursor.execute(sql)
    ContentType.objects.clear_cache()


def seed_both():
    """The same rows on both engines, as after migrate_data (bulk: no signals, no audit)."""
    mirror_framework_rows()
    org = Organisation(name="Cairn Homes", kind="developer", metadata={"tier": 1})
    users = [
        User(email=f"u{i}@example.ie", first_name=f"U{i}", organisation=org, password="x")
        for i in range(5)
    ]
    kyc = KycVerification(user=users[0], document_type="passport", document_reference="P1")
    memberships = [Membership(id=1, user=users[1], organisation=org, role="admin")]
    logins = [LoginEvent(id=i, user=users[i], success=True) for i in range(1, 4)]
    for obj in [org, *users, *memberships, kyc]:
        obj.updated_at = timezone.now()  # raw saves skip auto_now
    for alias in ("sqlite", "postgresql"):
        for obj in [org, *users, *memberships, kyc, *logins]:
            obj.save_base(using=alias, raw=True, force_insert=True)  # raw: not audited
    pg = connections["postgresql"]
    with pg.cursor() as cursor:  # as migrate_data leaves them: above max(pk)
        for sql in pg.ops.sequence_reset_sql(no_style(), [Membership, LoginEvent]):
            cursor.execute(sql)
    return org, users


def write_on_postgresql(org, users):
    """What users do after the switch: create, update, soft-delete, hard-delete, via the ORM."""
    pg = "postgresql"
    new = User.objects.db_manager(pg).create_user("new@example.ie", "pw", first_name="Nua")
    Membership.objects.using(pg).create(user=new, organisation=org, role="member")
    LoginEvent.objects.using(pg).create(user=new, success=False, failure_reason="bad password")
    changed = User.all_objects.using(pg).get(pk=users[2].pk)
    changed.first_name, changed.preferences = "Siobhán", {"alerts": ["email", "sms"]}
    changed.save(using=pg)
    User.all_objects.using(pg).get(pk=users[3].pk).delete(using=pg)  # soft delete
    # cascades to the membership, sets login event 1's user to NULL
    User.all_objects.using(pg).get(pk=users[1].pk).hard_delete(using=pg)
    return new


def assert_same_everywhere():
    for table in build_plan().tables:
        diff = rollback.orm_diff(table.model, source="postgresql", target="sqlite")
        assert diff.total == 0, (table.db_table, diff)


def test_before_switch_only_the_state_moves(state_file):
    org, _ = seed_both()
    write_state(state_file, MigrationState(phase="data_migrated"))
    before = os.stat(sqlite_file()).st_ino
    out = run_rollback()
    state = read_state(state_file)
    assert (state.phase, state.active_backend) == ("rolled_back", "sqlite")
    assert "runs on SQLite" in out and "Rolled back to SQLite" in out
    assert os.stat(sqlite_file()).st_ino == before
    assert Organisation.objects.using("postgresql").filter(pk=org.pk).exists()


def test_before_switch_clears_a_leftover_freeze(state_file):
    write_state(state_file, MigrationState(phase="prepared"))
    flag = fz.freeze_path_for(state_file)
    fz.freeze_on(flag, reason="killed switch", max_seconds=0)
    run_rollback()
    assert not flag.exists()


@pytest.fixture
def old_transaction():
    """A transaction elsewhere on the server, open all along: the xmin horizon stays old."""
    cfg = connections.settings["postgresql"]
    conn = psycopg.connect(
        dbname="postgres", host=cfg["HOST"], port=cfg["PORT"] or 5432, user=cfg["USER"]
    )
    conn.execute("SELECT pg_current_xact_id()")  # takes an xid, left uncommitted
    yield
    conn.rollback()
    conn.close()


def test_after_switch_writes_are_carried_back(state_file, settings, old_transaction):
    org, users = seed_both()
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    new = write_on_postgresql(org, users)
    assert LogEntry.objects.using("postgresql").count() >= 4  # the ORM writes were audited
    sqlite_before = {u.pk for u in User.all_objects.using("sqlite")}
    inode_before = os.stat(sqlite_file()).st_ino

    out = run_rollback()

    state = read_state(state_file)
    assert (state.phase, state.active_backend) == ("rolled_back", "sqlite")
    # the copy's pages were written into the live file, never renamed over it (WAL-safe)
    assert os.stat(sqlite_file()).st_ino == inode_before
    assert_same_everywhere()  # every object of every table, through the ORM
    assert User.all_objects.using("sqlite").get(pk=users[2].pk).first_name == "Siobhán"
    assert User.all_objects.using("sqlite").get(pk=users[3].pk).is_deleted
    assert not User.all_objects.using("sqlite").filter(pk=users[1].pk).exists()
    assert LoginEvent.objects.using("sqlite").get(pk=1).user_id is None
    assert KycVerification.objects.using("sqlite").count() == 1
    assert User.objects.using("sqlite").get(pk=new.pk).check_password("pw")
    # no audit entries of the carry-back's own: SQLite has exactly PostgreSQL's
    assert LogEntry.objects.using("sqlite").count() == LogEntry.objects.using("postgresql").count()
    assert "carried back accounts.User: 1 inserted, 2 updated, 1 deleted" in out
    report = json.loads(Path(out.split("Report: ")[1].split()[0]).read_text())
    per_table = {t["label"]: t for t in report["facts"]["carried_back"]}
    assert per_table["accounts.User"]["sample_pks"]["deleted"] == [str(users[1].pk)]
    counts = {k: (v["inserted"], v["updated"], v["deleted"]) for k, v in per_table.items()}
    assert counts["accounts.Membership"] == (1, 0, 1)
    assert counts["accounts.LoginEvent"] == (1, 1, 0)
    assert "accounts.KycVerification" not in counts
    assert report["facts"]["write_freeze_seconds"] > 0
    assert not fz.freeze_path_for(state_file).exists()
    # the pre-rollback file is kept as a verified backup holding the old rows
    backup = next(settings.BACKUP_DIR.glob("*pre-rollback*"))
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["verified"] is True
    snap = sqlite3.connect(backup / manifest["files"][0]["name"])
    ids = {uuid.UUID(r[0]) for r in snap.execute("SELECT id FROM accounts_user")}
    snap.close()
    assert ids == sqlite_before


# another process of the site: a connection opened before the rollback, kept across the swap
HOLDER = """
import json, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=20)
conn.execute("SELECT count(*) FROM accounts_user").fetchone()
print("open", flush=True)
sys.stdin.readline()  # the rollback runs meanwhile
rows = conn.execute("SELECT id, first_name FROM accounts_user").fetchall()
print(json.dumps({
    "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
    "integrity": conn.execute("PRAGMA integrity_check").fetchone()[0],
    "names": {row[0].replace("-", ""): row[1] for row in rows},
}), flush=True)
"""


def test_a_connection_held_across_the_swap_sees_the_carried_back_rows(state_file):
    # WAL: a rename swap left such a connection on the old file and its -wal (old rows,
    # then "database disk image is malformed" for the next process to open the path)
    org, users = seed_both()
    with connections["sqlite"].cursor() as cursor:
        assert cursor.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    new = write_on_postgresql(org, users)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, sqlite_file()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "open", holder.stderr.read()
        run_rollback()
        out, err = holder.communicate("go\n", timeout=60)
    finally:
        holder.kill()
    assert holder.returncode == 0, err
    seen = json.loads(out)
    assert (seen["journal_mode"], seen["integrity"]) == ("wal", "ok")
    assert seen["names"][new.pk.hex] == "Nua"  # inserted on PostgreSQL after the switch
    assert seen["names"][users[2].pk.hex] == "Siobhán"  # updated there
    assert users[1].pk.hex not in seen["names"]  # hard-deleted there
    assert_same_everywhere()
    fresh = sqlite3.connect(sqlite_file())  # and a connection opened after the swap
    try:
        assert fresh.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert fresh.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        fresh.close()


def test_dry_run_lists_what_would_be_carried_back_and_changes_nothing(state_file):
    org, users = seed_both()
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    write_on_postgresql(org, users)
    inode_before = os.stat(sqlite_file()).st_ino
    state_before = state_file.read_text()

    out = run_rollback("--dry-run")

    assert "would carry back accounts.User: 1 inserted, 2 updated, 1 deleted" in out
    assert "would carry back accounts.Membership: 1 inserted, 0 updated, 1 deleted" in out
    assert "Writes would freeze while the last rows move" in out
    assert "Dry run: nothing was changed." in out
    assert state_file.read_text() == state_before
    assert os.stat(sqlite_file()).st_ino == inode_before
    assert not fz.freeze_path_for(state_file).exists()
    assert User.all_objects.using("sqlite").get(pk=users[2].pk).first_name == "U2"

    out = run_rollback("--dry-run", "--discard-postgres-writes")
    assert "would DISCARD accounts.User: 1 inserted, 2 updated, 1 deleted" in out
    assert read_state(state_file).active_backend == "postgresql"


def test_dry_run_as_json_says_what_would_be_carried_back(state_file):
    org, users = seed_both()
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    write_on_postgresql(org, users)
    state_before = state_file.read_text()

    document = json.loads(run_rollback("--dry-run", "--json"))  # nothing but the document

    assert (document["status"], document["ok"], document["changed"]) == ("ok", True, False)
    assert (document["phase"], document["active_backend"]) == ("switched", "postgresql")
    assert document["was_switched"] is True and document["freeze_expected"] is True
    carried = {t["model"]: t for t in document["carry_back"]}
    assert carried["accounts.User"] == {
        "table": "accounts_user",
        "model": "accounts.User",
        "inserted": 1,
        "updated": 2,
        "deleted": 1,
    }
    assert document["discard"] == []
    assert state_file.read_text() == state_before
    discard = json.loads(run_rollback("--dry-run", "--json", "--discard-postgres-writes"))
    assert discard["carry_back"] == [] and discard["freeze_expected"] is False
    assert {t["model"] for t in discard["discard"]} == set(carried)


def test_dry_run_says_when_the_rollback_would_be_refused(state_file):
    write_state(state_file, MigrationState(phase="nothing"))
    out = StringIO()
    with pytest.raises(CommandError, match="Dry run: Nothing to roll back") as caught:
        call_command("rollback_to_sqlite", "--dry-run", "--json", stdout=out)
    assert caught.value.returncode == 7
    document = json.loads(out.getvalue())
    assert (document["status"], document["ok"]) == ("refused", False)
    assert "Run migration_prepare" in document["refusal"]
    assert read_state(state_file).phase == "nothing"


def test_dry_run_before_the_switch_moves_nothing(state_file):
    write_state(state_file, MigrationState(phase="data_migrated"))
    out = run_rollback("--dry-run")
    assert "Would move the state to rolled_back" in out
    assert read_state(state_file).phase == "data_migrated"


def test_discard_needs_confirmation_and_lists_what_was_lost(state_file):
    org, users = seed_both()
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    write_on_postgresql(org, users)
    with pytest.raises(CommandError, match="needs the explicit confirmation") as exc:
        run_rollback("--discard-postgres-writes")
    assert exc.value.returncode == 9
    assert read_state(state_file).active_backend == "postgresql"
    out = run_rollback("--discard-postgres-writes", "--confirm-discard")
    assert "DISCARDED accounts.User: 1 inserted, 2 updated, 1 deleted" in out
    assert read_state(state_file).active_backend == "sqlite"
    assert User.all_objects.using("sqlite").get(pk=users[2].pk).first_name == "U2"


def test_interactive_discard_needs_the_word(state_file, monkeypatch):
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    with pytest.raises(CommandError, match="Rollback cancelled"):
        call_command("rollback_to_sqlite", "--discard-postgres-writes", stdout=StringIO())
    assert read_state(state_file).active_backend == "postgresql"


def test_drop_postgres_copy_unapplies_every_migration(settings):
    name = f"{connections.settings['postgresql']['NAME']}_drop"
    cfg = connections.settings["postgresql"]
    admin = psycopg.connect(
        dbname="postgres", host=cfg["HOST"], port=cfg["PORT"] or 5432, user=cfg["USER"],
        autocommit=True,
    )  # fmt: skip
    admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.execute(f'CREATE DATABASE "{name}"')
    scratch = {**cfg, "NAME": name, "OPTIONS": {}}
    # a thread-local alias outside DATABASES, as Django's test runner allows
    connections["scratch_pg"] = load_backend(scratch["ENGINE"]).DatabaseWrapper(
        scratch, "scratch_pg"
    )
    try:
        executor = MigrationExecutor(connections["scratch_pg"])
        executor.migrate(executor.loader.graph.leaf_nodes())
        assert "accounts_user" in connections["scratch_pg"].introspection.table_names()
        undone = rollback.drop_postgres_copy("scratch_pg")
        assert "accounts.0001_initial" in undone
        tables = connections["scratch_pg"].introspection.table_names(include_views=True)
        assert tables == ["django_migrations"]
    finally:
        connections["scratch_pg"].close()
        del connections["scratch_pg"]
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


def test_discard_works_when_postgresql_is_gone(state_file):
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    connection = connections["postgresql"]
    connection.close_pool()
    cfg = connection.settings_dict
    saved = cfg["PORT"], cfg["OPTIONS"]["pool"]
    cfg["PORT"], cfg["OPTIONS"]["pool"] = 1, {**saved[1], "timeout": 1.0}
    try:
        out = run_rollback("--discard-postgres-writes", "--confirm-discard")
    finally:
        connection.close_pool()
        cfg["PORT"], cfg["OPTIONS"]["pool"] = saved
    assert "warning: could not list the discarded rows" in out
    assert read_state(state_file).active_backend == "sqlite"


def test_writes_during_stage_1_are_caught_under_the_freeze(state_file):
    org, users = seed_both()
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    first_new = write_on_postgresql(org, users)  # before the rollback: stage 1 carries these
    late = {}

    def app_keeps_writing(message):
        # after stage 1 carried its rows, before the freeze: only stage 2 can see these
        if message.startswith("stage 1:"):
            pg = "postgresql"
            late["user"] = User.objects.db_manager(pg).create_user("late@example.ie", "pw")
            again = User.all_objects.using(pg).get(pk=users[0].pk)
            again.first_name = "Arís"
            again.save(using=pg)
            LoginEvent.objects.using(pg).filter(user=first_new).delete()  # carried, now gone
            User.all_objects.using(pg).get(pk=users[4].pk).hard_delete(using=pg)

    result = rollback.rollback_to_sqlite(
        state_file=state_file, drain_seconds=0, progress=app_keeps_writing
    )
    assert result.state.active_backend == "sqlite"
    assert_same_everywhere()
    assert User.all_objects.using("sqlite").get(pk=users[0].pk).first_name == "Arís"
    assert User.objects.using("sqlite").filter(pk=late["user"].pk).exists()
    assert not LoginEvent.objects.using("sqlite").filter(user=first_new).exists()
    steps = {s["name"]: s for s in json.loads(result.report_path.read_text())["steps"]}
    assert steps["catch_up"]["details"]["accounts_user"] == [1, 1, 1]
    net = {t.label: (t.inserted, t.updated, t.deleted) for t in result.carried}
    assert net["accounts.User"] == (2, 3, 2)
    assert net["accounts.LoginEvent"] == (0, 1, 0)  # inserted then deleted: nothing net


# --- the fence on PostgreSQL: an observed drain, then triggers refuse every later write -------


def fence_sqlite_as_the_switch_does():
    lock = fence.hold_sqlite_write_lock(Path(sqlite_file()), timeout=5)
    lock.fence([t.db_table for t in build_plan().tables], reason="switched to PostgreSQL")
    lock.release()


@pytest.fixture
def pre_freeze_writer():
    """A session of the application inside a transaction that wrote and never ends."""
    cfg = connections.settings["postgresql"]
    conn = psycopg.connect(
        dbname=cfg["NAME"], host=cfg["HOST"], port=cfg["PORT"] or 5432, user=cfg["USER"]
    )
    conn.execute(
        "INSERT INTO accounts_organisation (id, name, kind, cro_number, vat_number, "
        "psra_licence, email, phone, address_line1, address_line2, town, county, eircode, "
        "website, metadata, created_at, updated_at) VALUES (%s, 'Never committed', 'developer', "
        "'', '', '', '', '', '', '', '', '', '', '', '{}', now(), now())",
        [uuid.uuid4().hex],
    )
    yield conn
    conn.close()


def test_rollback_drains_fences_postgresql_and_unfences_sqlite(state_file, pre_freeze_writer):
    org, users = seed_both()
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    new = write_on_postgresql(org, users)  # (its audit entries go through 'default': SQLite)
    fence_sqlite_as_the_switch_does()

    result = rollback.rollback_to_sqlite(state_file=state_file, drain_seconds=0.5)

    steps = {s["name"]: s for s in json.loads(result.report_path.read_text())["steps"]}
    drained = steps["drain_and_fence_postgresql"]["details"]
    assert drained["drain"]["sessions_ended"] == 1  # the transaction past the bound was ended
    assert drained["drain"]["waited_seconds"] >= 0.5
    assert drained["fence"]["tables_fenced"] == len(build_plan().tables)
    with pytest.raises(psycopg.OperationalError):  # its write was never acknowledged
        pre_freeze_writer.commit()
    assert not Organisation.objects.using("sqlite").filter(name="Never committed").exists()
    assert User.objects.using("sqlite").filter(pk=new.pk).exists()
    assert_same_everywhere()
    # PostgreSQL refuses every later write; SQLite, live again, takes them
    with pytest.raises(DatabaseError, match="propcore write fence: rolled back to SQLite"):
        Organisation.objects.using("postgresql").create(name="Too late", kind="developer")
    assert fence.postgres_fence("postgresql")["reason"] == "rolled back to SQLite"
    assert fence.sqlite_fence(Path(sqlite_file())) is None
    Organisation.objects.using("sqlite").create(name="Back on SQLite", kind="developer")


def test_a_failed_rollback_lifts_the_postgresql_fence(state_file):
    org, users = seed_both()
    fence_sqlite_as_the_switch_does()
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))

    def fails_under_the_freeze(message):
        if message.startswith("stage 2:"):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        rollback.rollback_to_sqlite(
            state_file=state_file, drain_seconds=0, progress=fails_under_the_freeze
        )
    assert read_state(state_file).active_backend == "postgresql"
    assert fence.postgres_fence("postgresql") is None  # PostgreSQL is live: it takes writes
    Organisation.objects.using("postgresql").create(name="Still live", kind="developer")
    assert fence.sqlite_fence(Path(sqlite_file())) is not None  # SQLite stays fenced


def test_rollback_before_the_switch_lifts_a_killed_switch_fence(state_file):
    write_state(state_file, MigrationState(phase="data_migrated"))
    fence_sqlite_as_the_switch_does()  # the switch fenced SQLite, then died before the flip
    run_rollback()
    assert fence.sqlite_fence(Path(sqlite_file())) is None
    Organisation.objects.using("sqlite").create(name="Writes again", kind="developer")


def other_session_writes() -> str:
    """One insert from a session that is not the runbook's; its outcome."""
    cfg = connections.settings["postgresql"]
    params = {"dbname": cfg["NAME"], "host": cfg["HOST"], "user": cfg["USER"]}
    with psycopg.connect(**params, port=cfg["PORT"] or 5432, autocommit=True) as conn:
        try:
            conn.execute("DELETE FROM django_session")
        except psycopg.Error as exc:
            return str(exc).splitlines()[0]
    return "written"


def test_the_postgresql_fence_dies_with_its_session_until_kept():
    pg = connections["postgresql"]
    tables = [t.db_table for t in build_plan().tables]
    fence.fence_postgres("postgresql", tables, reason="rolled back to SQLite", lock_timeout=5)
    assert other_session_writes().startswith("propcore write fence: rolled back to SQLite")
    pg.close()
    pg.close_pool()  # the rollback killed under its freeze: its sessions end
    deadline = time.monotonic() + 5  # the server notices the closed socket at once
    while (outcome := other_session_writes()) != "written" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert outcome == "written"  # no manual action needed

    fence.fence_postgres("postgresql", tables, reason="rolled back to SQLite", lock_timeout=5)
    fence.keep_postgres_fence("postgresql", reason="rolled back to SQLite")  # the state flipped
    pg.close()
    pg.close_pool()
    time.sleep(0.5)
    assert other_session_writes().startswith("propcore write fence")
    assert fence.postgres_fence("postgresql")["reason"] == "rolled back to SQLite"


def test_a_writer_that_began_after_the_drain_is_ended_by_the_fence(pre_freeze_writer):
    # (the fixture's transaction stands for one that began after the drain looked)
    tables = [t.db_table for t in build_plan().tables]
    fenced = fence.fence_postgres(
        "postgresql", tables, reason="rolled back to SQLite", lock_timeout=0.5
    )
    assert fenced == {"tables_fenced": len(tables), "sessions_ended": 1}
    with pytest.raises(psycopg.OperationalError):
        pre_freeze_writer.commit()
    assert not Organisation.objects.using("postgresql").filter(name="Never committed").exists()
    assert other_session_writes().startswith("propcore write fence")


# --- the change log: what the freeze carries and checks (issue 16) --------------------------


def live_copy() -> Path:
    """The rollback's working copy of the SQLite file (one at a time)."""
    live = Path(sqlite_file())
    found = live.parent.glob(f"{live.name}.rollback-*")
    [copy] = [p for p in found if not p.name.endswith(("-wal", "-shm", "-journal"))]
    return copy


def test_deletes_in_stage_1_and_at_the_freeze_and_an_update_at_the_freeze_all_arrive(state_file):
    org, users = seed_both()
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    new = write_on_postgresql(org, users)
    pg = "postgresql"

    def app_keeps_writing(message):
        if message.startswith("stage 1:"):  # logged, left out of the sums before the freeze
            LoginEvent.objects.using(pg).filter(pk=2).delete()
        if message == "write freeze on":  # a request past the middleware commits in the drain
            LoginEvent.objects.using(pg).filter(pk=3).delete()
            User.all_objects.using(pg).filter(pk=new.pk).update(last_name="Ó Briain")

    result = rollback.rollback_to_sqlite(
        state_file=state_file, drain_seconds=0, progress=app_keeps_writing
    )
    assert result.state.active_backend == "sqlite"
    assert not LoginEvent.objects.using("sqlite").filter(pk__in=[2, 3]).exists()
    assert User.all_objects.using("sqlite").get(pk=new.pk).last_name == "Ó Briain"
    assert_same_everywhere()
    steps = {s["name"]: s for s in json.loads(result.report_path.read_text())["steps"]}
    assert steps["verify_unlogged"]["details"]["full_check_frozen"] == [
        t.db_table for t in build_plan().tables if t.composite
    ] or all(  # only tables the sums cannot cover are compared in full under the freeze
        t not in ("accounts_user", "accounts_loginevent")
        for t in steps["verify_unlogged"]["details"]["full_check_frozen"]
    )
    assert steps["catch_up"]["details"]["accounts_loginevent"] == [0, 0, 2]
    assert steps["catch_up"]["details"]["accounts_user"] == [0, 1, 0]
    assert fence.postgres_fence(pg) is not None  # the fence stays, the change log is gone
    with connections[pg].cursor() as cursor:
        cursor.execute("SELECT to_regclass(%s)", [fence.LOG_TABLE])
        assert cursor.fetchone()[0] is None


def test_a_table_truncated_on_postgresql_before_the_freeze_is_emptied_in_sqlite(state_file):
    org, users = seed_both()
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    write_on_postgresql(org, users)
    assert LoginEvent.objects.using("postgresql").exists()

    def operator_truncates(message):
        if message == "write freeze on":  # after the unlogged rows were summed, before the fence
            with connections["postgresql"].cursor() as cursor:
                cursor.execute("TRUNCATE accounts_loginevent")

    result = rollback.rollback_to_sqlite(
        state_file=state_file, drain_seconds=0, progress=operator_truncates
    )
    assert result.state.active_backend == "sqlite"
    assert not LoginEvent.objects.using("sqlite").exists()
    assert_same_everywhere()
    steps = {s["name"]: s for s in json.loads(result.report_path.read_text())["steps"]}
    assert "accounts_loginevent" in steps["verify"]["details"]["tables_compared_in_full"]


def corrupt(sql: str) -> None:
    conn = sqlite3.connect(live_copy())
    conn.execute(sql)
    conn.commit()
    conn.close()


FORGE_KYC = "UPDATE accounts_kycverification SET document_reference = 'forged'"


def test_a_copy_that_differs_where_nobody_wrote_is_compared_in_full_and_refused(state_file):
    org, users = seed_both()
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    write_on_postgresql(org, users)
    fence_sqlite_as_the_switch_does()
    seen = {}

    def corrupt_the_copy(message):
        if message.startswith("stage 1:"):  # wrong where PostgreSQL logged nothing
            corrupt(FORGE_KYC)
        if message.startswith("stage 2:"):  # and still wrong after the frozen catch-up
            seen["repaired"] = (
                sqlite3.connect(live_copy())
                .execute("SELECT document_reference FROM accounts_kycverification")
                .fetchone()[0]
            )
            corrupt(FORGE_KYC)

    with pytest.raises(rollback.VerificationError, match="accounts_kycverification"):
        rollback.rollback_to_sqlite(
            state_file=state_file, drain_seconds=0, progress=corrupt_the_copy
        )
    assert seen["repaired"] == "P1"  # the sums saw it: the table was carried in full, frozen
    assert read_state(state_file).active_backend == "postgresql"
    assert KycVerification.objects.using("sqlite").get().document_reference == "P1"
    assert fence.sqlite_fence(Path(sqlite_file())) is not None  # the live file untouched
    assert fence.postgres_fence("postgresql") is None  # PostgreSQL stays live


def test_a_copy_that_differs_in_a_logged_row_is_refused(state_file):
    org, users = seed_both()
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    write_on_postgresql(org, users)

    def app_and_fault(message):
        if message.startswith("stage 1:"):  # logged: checked row by row under the freeze
            User.all_objects.using("postgresql").filter(pk=users[0].pk).update(last_name="Nua")
        if message.startswith("stage 2:"):
            corrupt(f"UPDATE accounts_user SET last_name = 'x' WHERE id = '{users[0].pk.hex}'")

    with pytest.raises(rollback.VerificationError, match="accounts_user: rows differ"):
        rollback.rollback_to_sqlite(state_file=state_file, drain_seconds=0, progress=app_and_fault)
    assert read_state(state_file).active_backend == "postgresql"


def test_a_rollback_failing_under_the_freeze_puts_the_live_file_back(state_file):
    org, users = seed_both()
    fence_sqlite_as_the_switch_does()
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    new = write_on_postgresql(org, users)

    def fails_under_the_freeze(message):
        if message.startswith("stage 2:"):  # after stage 1 wrote its rows into the live file
            assert not User.all_objects.using("sqlite").filter(pk=users[1].pk).exists()
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        rollback.rollback_to_sqlite(
            state_file=state_file, drain_seconds=0, progress=fails_under_the_freeze
        )
    assert read_state(state_file).active_backend == "postgresql"
    assert User.all_objects.using("sqlite").filter(pk=users[1].pk).exists()  # as switched
    assert not User.all_objects.using("sqlite").filter(pk=new.pk).exists()
    assert fence.sqlite_fence(Path(sqlite_file())) is not None
    report = json.loads(max(state_file.parent.joinpath("reports").glob("*.json")).read_text())
    assert report["facts"]["live_file_restored"] is True


def test_a_table_a_long_transaction_holds_is_compared_in_full(state_file, pre_freeze_writer):
    org, users = seed_both()
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    write_on_postgresql(org, users)
    result = rollback.rollback_to_sqlite(state_file=state_file, drain_seconds=0.2)
    steps = {s["name"]: s for s in json.loads(result.report_path.read_text())["steps"]}
    assert steps["change_log"]["details"]["not_logged"] == ["accounts_organisation"]
    assert "accounts_organisation" in steps["verify_unlogged"]["details"]["full_check_frozen"]
    assert "accounts_organisation" in steps["verify"]["details"]["tables_compared_in_full"]
    assert_same_everywhere()


@pytest.mark.slow
@pytest.mark.parametrize("point", ["rollback_prewrite_live", "rollback_write_live"])
def test_kill_9_while_writing_the_live_file_leaves_it_fenced_and_a_rerun_finishes(
    state_file, point
):
    from tests.test_freeze import manage, runbook_env

    org, users = seed_both()
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    new = write_on_postgresql(org, users)
    fence_sqlite_as_the_switch_does()
    db_dir = state_file.parent
    proc = subprocess.Popen(
        manage("rollback_to_sqlite", "--noinput", "--drain-seconds", "0"),
        env=runbook_env(db_dir, pause_at=point),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    flag = fz.freeze_path_for(state_file)
    while True:  # paused inside its transaction on the live file: it holds the write lock
        assert proc.poll() is None, proc.communicate()
        if point == "rollback_write_live" and not flag.exists():  # the one under the freeze
            time.sleep(0.1)
            continue
        assert time.monotonic() < deadline, "the rollback never reached the live file"
        probe = sqlite3.connect(sqlite_file(), timeout=0)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
        except sqlite3.OperationalError:
            break
        finally:
            probe.close()
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    # SQLite rolled the killed transaction back: still fenced; before the freeze the rows of
    # the switch, under it those stage 1 wrote in before the freeze (PostgreSQL's, inactive)
    assert fence.sqlite_fence(Path(sqlite_file())) is not None
    prewritten = point == "rollback_write_live"
    assert User.all_objects.using("sqlite").filter(pk=users[1].pk).exists() is not prewritten
    assert User.all_objects.using("sqlite").filter(pk=new.pk).exists() is prewritten
    assert read_state(state_file).active_backend == "postgresql"
    deadline = time.monotonic() + 10  # the PostgreSQL fence was a lease of the dead session
    while other_session_writes() != "written":
        assert time.monotonic() < deadline, "PostgreSQL stayed fenced"
        time.sleep(0.1)
    again = subprocess.run(
        manage("rollback_to_sqlite", "--noinput", "--drain-seconds", "0"),
        env=runbook_env(db_dir), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert read_state(state_file).active_backend == "sqlite"
    assert_same_everywhere()


def test_row_hashes_in_c_and_sql_find_the_rows_the_python_path_finds(monkeypatch):
    from dbmigration import range_sums, sync
    from dbmigration.verify import Side

    org, users = seed_both()
    write_on_postgresql(org, users)  # inserts, updates, deletes; UUID and integer keys
    pg, lite = Side(alias="postgresql"), Side(sqlite_path=Path(sqlite_file()))
    plan = {t.db_table: t for t in build_plan().tables}
    used = []
    real = range_sums.row_diff
    monkeypatch.setattr(range_sums, "row_diff", lambda **kw: used.append(kw) or real(**kw))
    tables = ("accounts_user", "accounts_loginevent", "accounts_membership")
    fast = {t: sync.diff_table(source=pg, target=lite, table=plan[t]) for t in tables}
    back = {t: sync.diff_table(source=lite, target=pg, table=plan[t]) for t in tables}
    assert len(used) == 6 and all(real(**kw) is not None for kw in used)
    monkeypatch.setattr(range_sums, "row_diff", lambda **kw: None)  # the Python path
    slow = {t: sync.diff_table(source=pg, target=lite, table=plan[t]) for t in tables}
    for t in tables:
        assert (fast[t].inserted_pks, fast[t].updated_pks, fast[t].deleted_pks) == (
            slow[t].inserted_pks, slow[t].updated_pks, slow[t].deleted_pks,
        ), t  # fmt: skip
        assert (back[t].inserted_pks, back[t].deleted_pks) == (
            slow[t].deleted_pks,
            slow[t].inserted_pks,
        )
    assert fast["accounts_user"].updated_pks  # the test changed something of each kind
    assert fast["accounts_user"].deleted_pks == [users[1].pk]
    assert len(fast["accounts_loginevent"].inserted_pks) == 1
