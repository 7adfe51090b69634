"""Every key, relation and table shape of tests/corpus/relations arrives exactly.

Filled through the ORM on the SQLite alias, then the real commands (migration_prepare's dry
run, migrate_data, --sync, switch, rollback) against the real SQLite test file and the real
PostgreSQL test database; every object is compared through the ORM on both aliases.
"""

import json
import sqlite3
import uuid
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from django.contrib.contenttypes.models import ContentType
from django.core.management import CommandError, call_command
from django.db import connections

from dbmigration import state as state_mod
from dbmigration.plan import build_plan
from dbmigration.source_scan import scan_source
from dbmigration.sqlite_source import source_fingerprint
from tests.corpus.relations import models as m

ALL = pytest.mark.django_db(databases="__all__", transaction=True)
LITE, PG = "sqlite", "postgresql"
APP = "corpus_relations"


def source_path() -> Path:
    return Path(connections[LITE].settings_dict["NAME"])


def raw_sql(sql: str, params=()) -> None:
    """Write straight into the SQLite source, as a careless app or a manual fix would."""
    conn = sqlite3.connect(source_path())
    conn.execute(sql, params)
    conn.commit()
    conn.close()


@pytest.fixture(autouse=True)
def fresh_sqlite_counters():
    """The corpus takes AUTOINCREMENT keys to their maxima; the flush between tests empties
    tables but keeps SQLite's counters, so later tests would get keys past int4."""
    yield
    raw_sql("DELETE FROM sqlite_sequence WHERE name LIKE 'corpus_relations_%'")


@pytest.fixture
def runbook(settings, tmp_path):
    settings.SQLITE_PATH = source_path()
    settings.STATE_FILE = tmp_path / "state.json"
    settings.BACKUP_DIR = tmp_path / "backups"
    settings.REPORT_DIR = tmp_path / "reports"
    settings.LOG_DIR = tmp_path / "logs"
    return settings


def prepared(state_file: Path) -> None:
    state = state_mod.MigrationState(
        phase="prepared", source_fingerprint=source_fingerprint(source_path())
    )
    state_mod.write_state(state_file, state)


def prepared_again(state_file: Path) -> None:
    """The source was fixed: record its new fingerprint, keeping the copy's markers (what
    an earlier run dropped and could not rebuild is still owed)."""
    state = state_mod.read_state(state_file)
    state.phase = "prepared"
    state.source_fingerprint = source_fingerprint(source_path())
    state_mod.write_state(state_file, state)


def run(name: str, *args) -> str:
    out = StringIO()
    call_command(name, *args, stdout=out, stderr=StringIO(), verbosity=1)
    return out.getvalue()


def fill() -> dict:
    """One or more objects of every model, with boundary values where the kind has them."""
    db = LITE
    small = m.AutoKey.objects.using(db).create(name="ordinary")
    owner = m.AutoKey.objects.using(db).create(id=2147483647, name="max int4 key")
    m.BigAutoKey.objects.using(db).create(name="ordinary")
    m.BigAutoKey.objects.using(db).create(id=9223372036854775807, name="max int8 key")
    m.SmallAutoKey.objects.using(db).create(name="ordinary")
    m.SmallAutoKey.objects.using(db).create(id=32767, name="max int2 key")
    u1 = m.UUIDKey.objects.using(db).create(id=uuid.UUID(int=0), name="nil")
    u2 = m.UUIDKey.objects.using(db).create(name="random")
    c1 = m.CharKey.objects.using(db).create(code="Ünïcode key", name="text key")
    c2 = m.CharKey.objects.using(db).create(code="a,b'c\"d", name="quotes and comma")
    m.CompositeKey.objects.using(db).create(owner=owner, slot="a", note="first")
    m.CompositeKey.objects.using(db).create(owner=owner, slot="b", note="second")
    m.CompositeKey.objects.using(db).create(owner=small, slot="a", note="")
    tenant = uuid.UUID("12345678-1234-5678-1234-567812345678")
    m.CompositeUUIDKey.objects.using(db).create(tenant=tenant, number=1, amount=Decimal("1.50"))
    m.CompositeUUIDKey.objects.using(db).create(tenant=tenant, number=-7, amount=Decimal("0"))
    target = m.ToFieldTarget.objects.using(db).create(code="T-1")
    m.ToFieldChild.objects.using(db).create(target=target, to_uuid=u1, to_char=c1)
    m.ToFieldChild.objects.using(db).create(target=target, to_uuid=u2, to_char=c2)
    root = m.Node.objects.using(db).create(name="root")
    leaf = m.Node.objects.using(db).create(name="leaf", parent=root)
    m.Node.objects.using(db).create(name="leaf of leaf", parent=leaf)
    a = m.CycleA.objects.using(db).create()
    b = m.CycleB.objects.using(db).create(a=a)
    a.b = b
    a.save(using=db)
    m.Profile.objects.using(db).create(owner=owner, bio="one to one")
    tags = [m.Tag.objects.using(db).create(name=n) for n in ("red", "green")]
    article = m.Article.objects.using(db).create(title="auto and through m2m")
    article.tags.add(*tags)
    m.Reading.objects.using(db).create(article=article, reader=owner, minutes=3)
    for obj in (article, owner, c1, u1):
        m.Note.objects.using(db).create(
            content_type=ContentType.objects.db_manager(db).get_for_model(obj),
            object_id=str(obj.pk),
            text=f"about {obj}",
        )
    place = m.Place.objects.using(db).create(name="plain place")
    m.Restaurant.objects.using(db).create(name="pizzeria", serves_pizza=True)
    m.Event.objects.using(db).create(kind="db default")
    m.Event.objects.using(db).create(kind="given", label="set")
    m.LooseLink.objects.using(db).create(place=place)
    m.Computed.objects.using(db).create(a=1, b=2, name="plain ascii")
    m.Select.objects.using(db).create(order=1, group="g", spaced="s p")
    parent = m.SpacedParent.objects.using(db).create(name="p")
    m.SpacedChild.objects.using(db).create(parent=parent)
    m.Indexed.objects.using(db).create(kind="Ok", rank=1)
    m.Indexed.objects.using(db).create(kind="other", rank=1, active=False)
    return {"owner": owner, "place": place}


def corpus_models():
    return [t.model for t in build_plan().tables if t.model._meta.app_label == APP]


def rows(model, alias: str) -> dict:
    """Every object of model on alias, as {pk: field values} through the ORM."""
    names = [f.attname for f in model._meta.concrete_fields]
    found = {}
    for obj in model._base_manager.using(alias).all():
        found[obj.pk] = {n: getattr(obj, n) for n in names}
    return found


def assert_orm_equal(*, skip: tuple = ()) -> None:
    checked = 0
    for model in corpus_models():
        if model in skip:
            continue
        ours, theirs = rows(model, LITE), rows(model, PG)
        assert ours == theirs, model._meta.label
        checked += len(ours)
    assert checked > 40


@ALL
def test_every_shape_is_planned():
    plan = build_plan()
    labels = {t.label for t in plan.tables}
    assert "corpus_relations.RecentEvent" not in labels  # a proxy has no table
    composite = plan.table("corpus_relations_compositekey")
    assert composite.pk_columns == ("owner_id", "slot")
    assert composite.key_of((7, "x", "note")) == (7, "x")
    computed = plan.table("corpus_relations_computed")
    assert "total" not in computed.column_names
    assert [c.name for c in computed.generated] == ["total", "lowered", "product"]
    loose = plan.table("corpus_relations_looselink")
    assert loose.foreign_keys == ()  # no constraint in the database: nothing to enforce


def report_of(out: str) -> dict:
    return json.loads(Path(out.split("Report: ")[1].split()[0]).read_text())


def rejected(rows) -> set[tuple]:
    return {(r["table"], json.dumps(r["pk"]), r["column"]) for r in rows}


@ALL
def test_migrate_data_copies_every_shape_exactly(runbook):
    fill()
    prepared(runbook.STATE_FILE)
    out = run("migrate_data")
    assert "migrate_data (copy) done." in out and "warning" not in out
    assert_orm_equal()


@ALL
def test_dangling_key_without_constraint_is_copied_and_switched(runbook):
    """Issue 9.15: db_constraint=False pointing nowhere is legal data: the dry run, the copy,
    the verification and the switch agree."""
    fill()
    m.LooseLink.objects.using(LITE).create(place_id=987654)  # no such place
    assert scan_source(sqlite_path=source_path()).rejections == []
    prepared(runbook.STATE_FILE)
    run("migrate_data")
    assert m.LooseLink.objects.using(PG).filter(place_id=987654).exists()
    run("switch_to_postgresql", "--noinput", "--drain-seconds", "0")
    assert state_mod.read_state(runbook.STATE_FILE).active_backend == PG
    m.LooseLink.objects.using(PG).create(place_id=123456)  # written after the switch
    run("rollback_to_sqlite", "--noinput", "--drain-seconds", "0")
    assert m.LooseLink.objects.using(LITE).filter(place_id=123456).exists()
    assert_orm_equal()


UPPER = "ABCDEF0123456789ABCDEF0123456789"


def plant_postgresql_only_refusals() -> dict:
    """Rows SQLite keeps and PostgreSQL refuses: a generated a+b past int4, a UUID key that
    differs from another only by letter case (with a row pointing at it), and two kinds
    equal under Lower() by PostgreSQL's rules only ('Ä'/'ä': SQLite folds ASCII only)."""
    over = m.Computed.objects.using(LITE).create(a=2147483647, b=1, name="overflow")
    # Django stores the hex in lower case; the same UUID in upper case sorts first and keeps it
    twin = m.UUIDKey.objects.using(LITE).create(id=uuid.UUID(UPPER), name="lower case")
    raw_sql("INSERT INTO corpus_relations_uuidkey (id, name) VALUES (?, 'upper case')", [UPPER])
    target = m.ToFieldTarget.objects.using(LITE).create(code="T-2")
    pointing = m.ToFieldChild.objects.using(LITE).create(target=target, to_uuid=twin)
    keep = m.Indexed.objects.using(LITE).create(kind="Äpfel", rank=7)
    clash = m.Indexed.objects.using(LITE).create(kind="äpfel", rank=8)
    # a * b fits the bigint column, but PostgreSQL computes it in int4: refused at COPY
    product = m.Computed.objects.using(LITE).create(a=65536, b=65536, name="product")
    uses = m.ToFieldChild.objects.using(LITE).create(target=target, computed=product)
    return {
        "over": over.pk,
        "pointing": pointing.pk,
        "keep": keep.pk,
        "clash": clash.pk,
        "product": product.pk,
        "uses": uses.pk,
    }


@ALL
def test_dry_run_predicts_what_it_can(runbook):
    """The generated overflow and the letter-case UUID duplicate are named from SQLite;
    what only PostgreSQL can judge (a generated a * b it computes in int4, two rows equal
    under Lower()) by asking PostgreSQL about a temporary copy of the rows."""
    fill()
    planted = plant_postgresql_only_refusals()
    assert m.Computed.objects.using(LITE).get(pk=planted["product"]).product == 1 << 32
    found = {
        (r.table, r.pk, r.column): r for r in scan_source(sqlite_path=source_path()).rejections
    }
    over = found[("corpus_relations_computed", planted["over"], "total")]
    assert "F(a) + F(b)" in over.reason and over.code == "range"
    dup = found[("corpus_relations_uuidkey", UPPER.lower(), "id")]
    assert dup.code == "unique" and "duplicate of pk" in dup.reason
    product = found[("corpus_relations_computed", planted["product"], "total,lowered,product")]
    assert "integer out of range" in product.reason and "F(a) * F(b)" in product.reason
    clash = found[("corpus_relations_indexed", planted["clash"], "corpus_indexed_lower_kind_uniq")]
    assert clash.code == "unique" and f"duplicate of pk {planted['keep']}" in clash.reason
    assert len(found) == 4
    # the command lists them too, and PostgreSQL kept nothing of the dry run
    out = run("migration_prepare")
    assert "4 rows would be rejected:" in out
    assert f"corpus_relations_computed pk={planted['over']} total:" in out
    assert f"corpus_relations_uuidkey pk={UPPER.lower()} id:" in out
    assert f"corpus_relations_computed pk={planted['product']} total,lowered,product:" in out
    assert f"corpus_relations_indexed pk={planted['clash']} corpus_indexed_lower_kind_uniq:" in out
    assert not m.Indexed.objects.using(PG).exists()


@ALL
def test_default_run_names_postgresql_only_refusals_and_leaves_no_half_schema(runbook):
    fill()
    planted = plant_postgresql_only_refusals()
    prepared(runbook.STATE_FILE)
    with pytest.raises(CommandError, match="corpus_relations_computed") as caught:
        run("migrate_data")
    assert caught.value.returncode == 5
    # fix the two the dry run names; the functional unique is then found by PostgreSQL
    m.Computed.objects.using(LITE).filter(pk=planted["over"]).delete()
    raw_sql("DELETE FROM corpus_relations_tofieldchild WHERE id = ?", [planted["pointing"]])
    raw_sql("DELETE FROM corpus_relations_uuidkey WHERE id = ?", [UPPER.lower()])
    # the product PostgreSQL computes in int4: refused at COPY, named by the line it was on
    prepared(runbook.STATE_FILE)
    with pytest.raises(CommandError) as caught:
        run("migrate_data")
    assert caught.value.returncode == 5
    message = str(caught.value)
    assert f"corpus_relations_computed pk={planted['product']}" in message
    assert "integer out of range" in message and "product = " in message
    raw_sql("DELETE FROM corpus_relations_tofieldchild WHERE id = ?", [planted["uses"]])
    raw_sql("DELETE FROM corpus_relations_computed WHERE id = ?", [planted["product"]])
    # then the functional unique, found by asking PostgreSQL why its index did not build
    prepared_again(runbook.STATE_FILE)
    with pytest.raises(CommandError) as caught:
        run("migrate_data")
    assert caught.value.returncode == 5
    message = str(caught.value)
    assert f"corpus_relations_indexed pk={planted['clash']}" in message
    assert "corpus_indexed_lower_kind_uniq" in message and "lower" in message
    # every index and constraint the migrations made is there again, none left pending
    marks = state_mod.read_state(runbook.STATE_FILE).extra["migrate_data"]
    assert marks["pending_ddl"] == []
    with connections[PG].cursor() as cur:
        cur.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'corpus_relations_indexed'")
        indexes = {name for (name,) in cur.fetchall()}
    assert {"corpus_indexed_lower_kind_uniq", "corpus_indexed_rank_active"} <= indexes
    # fixed in SQLite, the next run copies and verifies everything
    m.Indexed.objects.using(LITE).filter(pk=planted["clash"]).delete()
    prepared_again(runbook.STATE_FILE)
    assert "migrate_data (copy) done." in run("migrate_data")
    assert_orm_equal()


@ALL
def test_quarantine_sets_postgresql_only_refusals_aside(runbook):
    fill()
    planted = plant_postgresql_only_refusals()
    prepared(runbook.STATE_FILE)
    out = run("migrate_data", "--quarantine")
    assert "migrate_data (copy) done." in out
    facts = report_of(out)["facts"]
    assert rejected(facts["rejections"]) == {
        ("corpus_relations_computed", json.dumps(planted["over"]), "total"),
        ("corpus_relations_uuidkey", json.dumps(UPPER.lower()), "id"),
        ("corpus_relations_tofieldchild", json.dumps(planted["pointing"]), "to_uuid_id"),
        (
            "corpus_relations_indexed",
            json.dumps(planted["clash"]),
            "corpus_indexed_lower_kind_uniq",
        ),
        ("corpus_relations_computed", json.dumps(planted["product"]), "total,lowered,product"),
        ("corpus_relations_tofieldchild", json.dumps(planted["uses"]), "computed_id"),
    }
    assert not m.Indexed.objects.using(PG).filter(pk=planted["clash"]).exists()
    assert m.Indexed.objects.using(PG).filter(pk=planted["keep"]).exists()
    assert not m.Computed.objects.using(PG).filter(pk=planted["over"]).exists()
    assert m.UUIDKey.objects.using(PG).filter(pk=uuid.UUID(UPPER)).count() == 1


@ALL
def test_quarantine_by_composite_key(runbook):
    """Issue 9.3: under --quarantine a composite key crashed in copy.qi; now a bad row of a
    composite-key table and the composite rows pointing at a bad row are set aside by key."""
    made = fill()
    bad_owner = m.AutoKey.objects.using(LITE).create(id=3, name="nul \x00 in text")
    m.CompositeKey.objects.using(LITE).create(owner=bad_owner, slot="z", note="points at it")
    raw_sql(
        "INSERT INTO corpus_relations_compositekey (owner_id, slot, note) VALUES (?, 'y', ?)",
        [made["owner"].pk, "nul \x00 here"],
    )
    prepared(runbook.STATE_FILE)
    out = run("migrate_data", "--quarantine")
    assert "migrate_data (copy) done." in out
    facts = report_of(out)["facts"]
    assert rejected(facts["rejections"]) == {
        ("corpus_relations_autokey", json.dumps(bad_owner.pk), "name"),
        ("corpus_relations_compositekey", json.dumps([bad_owner.pk, "z"]), "owner_id"),
        ("corpus_relations_compositekey", json.dumps([made["owner"].pk, "y"]), "note"),
    }
    pg = m.CompositeKey.objects.using(PG)
    assert not pg.filter(slot__in=["y", "z"]).exists() and pg.count() == 3
    state = state_mod.read_state(runbook.STATE_FILE)
    assert state.extra["migrate_data"]["pending_ddl"] == []


@ALL
def test_generated_value_the_engines_compute_differently_is_a_named_warning(runbook):
    fill()
    odd = m.Computed.objects.using(LITE).create(a=1, b=1, name="ÄÖÜ École straße")
    # SQLite's lower() folds ASCII letters only
    assert m.Computed.objects.using(LITE).get(pk=odd.pk).lowered == "ÄÖÜ École straße"
    prepared(runbook.STATE_FILE)
    out = run("migrate_data")
    assert "migrate_data (copy) done." in out
    warning = next(line for line in out.splitlines() if "warning:" in line)
    assert "corpus_relations_computed.lowered: Lower(F(name))" in warning
    assert f"pk {odd.pk}: 'ÄÖÜ École straße' -> 'äöü école straße'" in warning
    assert m.Computed.objects.using(PG).get(pk=odd.pk).lowered == "äöü école straße"
    assert_orm_equal(skip=(m.Computed,))
    # the data is equal: the switch accepts a run whose only warning is this one
    run("switch_to_postgresql", "--noinput", "--drain-seconds", "0")
    assert state_mod.read_state(runbook.STATE_FILE).active_backend == PG


@ALL
def test_switch_names_a_row_postgresql_refuses_in_the_catch_up(runbook):
    """A row written while the switch ran, which PostgreSQL refuses although every check
    passed, is named; the application stays on SQLite."""
    from dbmigration import cutover
    from dbmigration.errors import DataError

    fill()
    prepared(runbook.STATE_FILE)
    run("migrate_data")
    late = []

    def write_during_the_switch(message: str) -> None:
        if message == "write freeze on":
            late.append(m.Computed.objects.using(LITE).create(a=65536, b=65536, name="late"))

    with pytest.raises(DataError, match="integer out of range") as caught:
        cutover.switch_to_postgresql(drain_seconds=0, progress=write_during_the_switch)
    assert f"corpus_relations_computed pk={late[0].pk!r}" in str(caught.value)
    assert caught.value.returncode == 5
    assert state_mod.read_state(runbook.STATE_FILE).active_backend == LITE


def change_on(alias: str, made: dict) -> None:
    """Inserts, updates and deletes of every key kind, through the ORM."""
    owner = m.AutoKey.objects.using(alias).get(pk=made["owner"].pk)
    m.CompositeKey.objects.using(alias).filter(pk=(owner.pk, "a")).update(note=f"on {alias}")
    m.CompositeKey.objects.using(alias).filter(pk=(owner.pk, "b")).delete()
    m.CompositeKey.objects.using(alias).create(owner=owner, slot=f"new on {alias}", note="x")
    tenant = uuid.UUID("12345678-1234-5678-1234-567812345678")
    m.CompositeUUIDKey.objects.using(alias).filter(pk=(tenant, 1)).update(amount=Decimal("9.99"))
    number = 2 if alias == LITE else 3
    m.CompositeUUIDKey.objects.using(alias).create(tenant=tenant, number=number, amount=1)
    m.Select.objects.using(alias).update(group=f"on {alias}")
    m.Select.objects.using(alias).create(order=2, group="g2", spaced="new")
    m.CharKey.objects.using(alias).filter(pk="a,b'c\"d").update(name="renamed")
    m.UUIDKey.objects.using(alias).create(name=f"new on {alias}")
    m.Computed.objects.using(alias).create(a=40, b=2, name=f"Made On {alias}")
    m.Node.objects.using(alias).create(name="new leaf", parent=m.Node.objects.using(alias).first())
    m.Restaurant.objects.using(alias).create(name=f"bistro on {alias}")


@ALL
def test_sync_carries_changes_of_every_key_kind(runbook):
    made = fill()
    prepared(runbook.STATE_FILE)
    run("migrate_data")
    change_on(LITE, made)
    out = run("migrate_data", "--sync")
    assert "migrate_data (sync) done." in out
    synced = report_of(out)["steps"][0]["details"]["tables"]
    assert synced["corpus_relations_compositekey"] == {
        "inserted": 1,
        "updated": 1,
        "deleted": 1,
        "seconds": synced["corpus_relations_compositekey"]["seconds"],
    }
    assert_orm_equal()


@pytest.mark.slow
@ALL
def test_switch_catch_up_and_rollback_round_trip(runbook):
    """The switch's catch-up carries writes made while it ran; the rollback carries
    PostgreSQL's writes back; every object equal on both sides after each."""
    from dbmigration import cutover

    made = fill()
    run("migration_prepare")  # its dry run, schema check and backup see every shape too
    run("migrate_data")

    def write_during_the_switch(message: str) -> None:
        if message == "write freeze on":  # a request that began before the freeze ends now
            change_on(LITE, made)

    cutover.switch_to_postgresql(drain_seconds=0, progress=write_during_the_switch)
    assert state_mod.read_state(runbook.STATE_FILE).active_backend == PG
    assert m.CompositeKey.objects.using(PG).filter(slot="new on sqlite").exists()
    assert_orm_equal()

    change_on(PG, made)
    out = run("rollback_to_sqlite", "--noinput", "--drain-seconds", "0")
    assert state_mod.read_state(runbook.STATE_FILE).active_backend == LITE
    carried = {t["label"]: t for t in report_of(out)["facts"]["carried_back"]}
    composite = carried["corpus_relations.CompositeKey"]
    assert (composite["inserted"], composite["updated"], composite["deleted"]) == (1, 1, 0)
    assert m.CompositeKey.objects.using(LITE).filter(slot="new on postgresql").exists()
    assert m.Computed.objects.using(LITE).get(name="Made On postgresql").total == 42
    assert_orm_equal()


MIXED = "AbCdEf0123456789aBcDeF0123456789"


@ALL
def test_uuid_key_pointed_at_in_another_letter_case_arrives_pointing_at_the_same_row(runbook):
    """A foreign key holding a UUID in another letter case than the key it points at: SQLite
    compares text (its check called it dangling, the copy carried it), PostgreSQL compares
    uuids. The dry run, the copy and verification agree: carried as the canonical uuid,
    pointing at the row Django's ORM on SQLite reads for it."""
    fill()
    parent = m.UUIDKey.objects.using(LITE).create(id=uuid.UUID(UPPER), name="stored lower")
    target = m.ToFieldTarget.objects.using(LITE).create(code="T-3")
    child = m.ToFieldChild.objects.using(LITE).create(target=target, to_uuid=parent)
    raw_sql(
        "UPDATE corpus_relations_tofieldchild SET to_uuid_id = ? WHERE id = ?", [MIXED, child.pk]
    )
    assert m.ToFieldChild.objects.using(LITE).get(pk=child.pk).to_uuid == parent
    assert scan_source(sqlite_path=source_path()).rejections == []
    prepared(runbook.STATE_FILE)
    assert "migrate_data (copy) done." in run("migrate_data")
    assert m.ToFieldChild.objects.using(PG).get(pk=child.pk).to_uuid.name == "stored lower"
    assert_orm_equal()


@ALL
def test_quarantine_sets_aside_every_row_pointing_at_a_case_folded_duplicate(runbook):
    """Two UUID keys equal for PostgreSQL: one is set aside, and so is every row pointing at
    that uuid in any letter case (on SQLite the ORM reads one row, a join another)."""
    fill()
    lower = m.UUIDKey.objects.using(LITE).create(id=uuid.UUID(UPPER), name="lower case")
    raw_sql("INSERT INTO corpus_relations_uuidkey (id, name) VALUES (?, 'upper case')", [UPPER])
    target = m.ToFieldTarget.objects.using(LITE).create(code="T-4")
    children = {}
    for stored in (UPPER.lower(), UPPER, MIXED):
        child = m.ToFieldChild.objects.using(LITE).create(target=target, to_uuid=lower)
        raw_sql(
            "UPDATE corpus_relations_tofieldchild SET to_uuid_id = ? WHERE id = ?",
            [stored, child.pk],
        )
        children[stored] = child.pk
    prepared(runbook.STATE_FILE)
    out = run("migrate_data", "--quarantine")
    assert "migrate_data (copy) done." in out
    facts = report_of(out)["facts"]
    assert rejected(facts["rejections"]) == {
        ("corpus_relations_uuidkey", json.dumps(UPPER.lower()), "id"),
        *{
            ("corpus_relations_tofieldchild", json.dumps(pk), "to_uuid_id")
            for pk in children.values()
        },
    }
    assert not m.ToFieldChild.objects.using(PG).filter(pk__in=children.values()).exists()


def plant_sync_refusals() -> dict:
    """After the copy: a kind equal under Lower() to a copied one, with a smaller key than
    it (the copied row still keeps the key), and a generated a * b PostgreSQL computes in
    int4, with a row pointing at it."""
    copied = m.Indexed.objects.using(LITE).get(kind="Äpfel")
    clash = m.Indexed.objects.using(LITE).create(id=copied.pk - 1, kind="äpfel", rank=9)
    product = m.Computed.objects.using(LITE).create(a=65536, b=65536, name="late product")
    target = m.ToFieldTarget.objects.using(LITE).get(code="T-1")
    uses = m.ToFieldChild.objects.using(LITE).create(target=target, computed=product)
    return {"keep": copied.pk, "clash": clash.pk, "product": product.pk, "uses": uses.pk}


@ALL
def test_sync_names_a_functional_unique_collision_by_its_rows(runbook):
    """--sync named a row colliding under Lower(kind) by PostgreSQL's key detail; now as the
    copy names it: table, pk, index, and the pk of the row already there."""
    fill()
    keep = m.Indexed.objects.using(LITE).create(id=500, kind="Äpfel", rank=7)
    prepared(runbook.STATE_FILE)
    run("migrate_data")
    m.Indexed.objects.using(LITE).create(id=400, kind="äpfel", rank=8)
    with pytest.raises(CommandError) as caught:
        run("migrate_data", "--sync")
    assert caught.value.returncode == 5
    message = str(caught.value)
    assert "corpus_relations_indexed pk=400 column corpus_indexed_lower_kind_uniq:" in message
    assert f"duplicate of pk {keep.pk} under unique corpus_indexed_lower_kind_uniq" in message
    assert not m.Indexed.objects.using(PG).filter(pk=400).exists()
    with connections[PG].cursor() as cur:  # the index the investigation dropped is back
        cur.execute("SELECT 1 FROM pg_indexes WHERE indexname = 'corpus_indexed_lower_kind_uniq'")
        assert cur.fetchone()


@ALL
def test_sync_quarantine_sets_aside_rows_postgresql_refuses(runbook):
    """--sync --quarantine sets aside what COPY or a unique index refuses, with the rows
    pointing at it, lists them like the copy, and verifies the rest."""
    fill()
    m.Indexed.objects.using(LITE).create(id=500, kind="Äpfel", rank=7)
    prepared(runbook.STATE_FILE)
    run("migrate_data")
    planted = plant_sync_refusals()
    m.Select.objects.using(LITE).create(order=9, group="late", spaced="ok")
    out = run("migrate_data", "--sync", "--quarantine")
    assert "migrate_data (sync) done." in out and "3 row(s) quarantined" in out
    facts = report_of(out)["facts"]
    assert rejected(facts["rejections"]) == {
        (
            "corpus_relations_indexed",
            json.dumps(planted["clash"]),
            "corpus_indexed_lower_kind_uniq",
        ),
        ("corpus_relations_computed", json.dumps(planted["product"]), "total,lowered,product"),
        ("corpus_relations_tofieldchild", json.dumps(planted["uses"]), "computed_id"),
    }
    lines = Path(facts["reject_file"]).read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["values"] for line in lines)
    assert m.Select.objects.using(PG).filter(group="late").exists()
    assert not m.Indexed.objects.using(PG).filter(pk=planted["clash"]).exists()
    assert not m.ToFieldChild.objects.using(PG).filter(pk=planted["uses"]).exists()


@ALL
def test_switch_names_a_late_row_pointing_nowhere_in_one_line(runbook):
    """A row written while the switch ran, pointing at a missing row (SQLite enforces no
    foreign key for a plain connection): PostgreSQL refuses it only at commit, with no COPY
    line; the switch names it in one line with the fix, no traceback."""
    from dbmigration import cutover
    from dbmigration.errors import DataError

    fill()
    prepared(runbook.STATE_FILE)
    run("migrate_data")
    target = m.ToFieldTarget.objects.using(LITE).get(code="T-1")

    def write_during_the_switch(message: str) -> None:
        if message == "write freeze on":
            raw_sql(
                "INSERT INTO corpus_relations_tofieldchild (id, target_id, computed_id) "
                "VALUES (777, ?, 424242)",
                [target.code],
            )

    with pytest.raises(DataError) as caught:
        cutover.switch_to_postgresql(drain_seconds=0, progress=write_during_the_switch)
    message = str(caught.value)
    assert "\n" not in message and caught.value.returncode == 5
    assert "corpus_relations_tofieldchild pk=777 computed_id: points to a missing" in message
    assert "Fix it in SQLite, then switch again." in message
    assert state_mod.read_state(runbook.STATE_FILE).active_backend == LITE


@ALL
def test_switch_names_rows_its_sync_cannot_carry_in_one_line(runbook):
    """The switch's first sync stopped with the copy's multi-line refusal, which suggests
    --quarantine, an option the switch does not take; now one line with the fix."""
    from dbmigration import cutover
    from dbmigration.errors import DataError

    fill()
    prepared(runbook.STATE_FILE)
    run("migrate_data")
    late = m.Computed.objects.using(LITE).create(a=65536, b=65536, name="before the switch")
    with pytest.raises(DataError) as caught:
        cutover.switch_to_postgresql(drain_seconds=0)
    message = str(caught.value)
    assert "\n" not in message and "--quarantine" not in message
    assert f"corpus_relations_computed pk={late.pk} total,lowered,product:" in message
    assert "fix them in SQLite, then switch again" in message
    assert state_mod.read_state(runbook.STATE_FILE).active_backend == LITE
