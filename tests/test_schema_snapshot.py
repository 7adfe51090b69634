"""The schema snapshot the copy drops and rebuilds around the load, on the real PostgreSQL."""

from __future__ import annotations

import os

import psycopg
import pytest

from dbmigration.done_marks import done_tables, read_marks, target_identity, write_marks
from dbmigration.schema_rebuild import droppable, schema_snapshot

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)


@pytest.fixture
def tables(pg):
    """Two scratch tables in the test database: parent and child (child -> parent)."""
    parent, child = f"snap_parent_{os.getpid()}", f"snap_child_{os.getpid()}"
    with pg.cursor() as cur:
        cur.execute(f'CREATE TABLE "{parent}" (id int PRIMARY KEY, status varchar(20), page int)')
        cur.execute(
            f'CREATE TABLE "{child}" (id int PRIMARY KEY, parent_id int REFERENCES "{parent}")'
        )
    yield parent, child
    with pg.cursor() as cur:
        cur.execute(f'DROP TABLE IF EXISTS "{child}", "{parent}"')


def test_a_partial_index_rebuilt_from_the_catalog_text_is_the_same_object(pg, tables):
    parent, _ = tables
    with pg.cursor() as cur:
        # Wagtail's unique_in_progress_workflow has this shape: status__in=(...)
        cur.execute(
            f'CREATE UNIQUE INDEX "{parent}_one" ON "{parent}" (page) '
            "WHERE status IN ('a', 'b')"
        )
        before = schema_snapshot(cur, [parent])
        (index,) = [o for o in before if o.name == f"{parent}_one"]
        cur.execute(index.drop_sql)
        cur.execute(index.create_sql)
        after = schema_snapshot(cur, [parent])
    (rebuilt,) = [o for o in after if o.name == f"{parent}_one"]
    assert rebuilt.definition != index.definition  # PostgreSQL prints it another way now
    assert rebuilt == index and after == before  # but it is there: nothing to build again
    assert not (before - after) and not (after - before)


def test_foreign_keys_of_other_tables_come_with_the_table_they_point_at(pg, tables):
    parent, child = tables
    with pg.cursor() as cur:
        snapshot = schema_snapshot(cur, [parent])
        picked = droppable(snapshot, loaded={parent})
        # the copy drops in this order; the child's key must go before the parent's primary key
        assert [(o.table, o.kind) for o in picked] == [
            (child, "constraint-f"),
            (parent, "constraint-p"),
        ]
        for obj in picked:
            cur.execute(obj.drop_sql)
        for obj in sorted(picked, key=lambda o: o.kind != "constraint-p"):
            cur.execute(obj.create_sql)
        assert schema_snapshot(cur, [parent]) == snapshot


def test_saved_marks_count_only_on_the_target_they_were_made_on(pg, tmp_path):
    state = tmp_path / "state.json"
    with pg.cursor() as cur:
        here = target_identity(cur)
    params = pg.get_connection_params()
    with psycopg.connect(**{**params, "dbname": "postgres"}) as other_db:
        elsewhere = target_identity(other_db.cursor())
    assert here != elsewhere  # same server, another database: another identity
    pending = [{"table": "t", "kind": "index", "name": "i", "definition": "CREATE INDEX i ON t"}]
    marks = {"source_sha256": "abc", "done": {"t": 3}, "pending_ddl": pending}
    write_marks(state, {**marks, "target": elsewhere})
    assert read_marks(state, target=here) == {}
    assert done_tables(state, source_sha256="abc", target=here) == {}
    write_marks(state, {**marks, "target": here})
    assert read_marks(state, target=here)["pending_ddl"] == pending
    assert done_tables(state, source_sha256="abc", target=here) == {"t": 3}
