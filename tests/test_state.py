"""The state file: transitions, what to run first, and staleness of a prepare."""

from __future__ import annotations

import json
import sqlite3
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from dbmigration import state as state_mod
from dbmigration.sqlite_source import source_fingerprint
from tests.sources import make_source


def test_transitions_record_history_and_refuse_out_of_order(tmp_path):
    path = tmp_path / "state.json"
    with pytest.raises(state_mod.StateError, match="Run migration_prepare next"):
        state_mod.transition(path, "data_migrated")
    st = state_mod.transition(path, "prepared", note="t", source_fingerprint={"sha256": "a"})
    assert st.phase == "prepared" and st.history[-1]["from"] == "nothing"
    assert "@" in st.history[-1]["by"] and st.history[-1]["at"]
    on_disk = json.loads(path.read_text())
    assert on_disk["phase"] == "prepared" and on_disk["source_fingerprint"] == {"sha256": "a"}
    with pytest.raises(state_mod.StateError, match="Run migrate_data next"):
        state_mod.transition(path, "switched")
    assert not list(tmp_path.glob(".state-*"))  # no temp files left by atomic writes


def test_unreadable_state_file_says_what_to_do(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("{not json")
    with pytest.raises(state_mod.StateError, match="restore it from git"):
        state_mod.read_state(path)


def test_staleness_follows_the_schema_and_migrations_not_the_rows(tmp_path):
    source = make_source(tmp_path / "s.sqlite3", rows=5)
    prepared = state_mod.MigrationState(phase="prepared")
    assert state_mod.stale_reasons(prepared, source_fingerprint(source)) == [
        "no source fingerprint recorded; run migration_prepare"
    ]
    prepared.source_fingerprint = source_fingerprint(source)
    assert state_mod.stale_reasons(prepared, source_fingerprint(source)) == []

    conn = sqlite3.connect(source)
    conn.execute("UPDATE item SET name = 'same length!' WHERE id = 1")
    conn.execute("INSERT INTO item (name) VALUES ('late')")
    conn.commit()
    current = source_fingerprint(source)
    assert current["sha256"] != prepared.source_fingerprint["sha256"]  # the rows changed...
    assert not state_mod.is_prepare_stale(prepared, current)  # ...which --sync carries

    conn.execute("CREATE INDEX item_name ON item (name)")
    conn.commit()
    assert state_mod.stale_reasons(prepared, source_fingerprint(source)) == [
        "schema_sha256 changed since migration_prepare"
    ]
    conn.execute("DROP INDEX item_name")
    conn.execute("INSERT INTO django_migrations (app, name) VALUES ('accounts', '0099_new')")
    conn.commit()
    conn.close()
    assert "migrations changed since migration_prepare" in state_mod.stale_reasons(
        prepared, source_fingerprint(source)
    )


def test_the_write_fence_is_not_a_schema_change(tmp_path):
    from dbmigration import fence

    source = make_source(tmp_path / "f.sqlite3", rows=5)
    prepared = state_mod.MigrationState(source_fingerprint=source_fingerprint(source))
    lock = fence.hold_sqlite_write_lock(source, timeout=1)
    lock.fence(["item"], reason="test")
    lock.release()
    assert not state_mod.is_prepare_stale(prepared, source_fingerprint(source))


def test_a_fresh_install_cannot_be_rolled_back(tmp_path):
    with pytest.raises(state_mod.StateError, match="Run migration_prepare next"):
        state_mod.transition(tmp_path / "state.json", "rolled_back")


def test_rollback_on_a_fresh_install_refuses_and_leaves_the_phase(tmp_path, settings):
    settings.STATE_FILE = tmp_path / "state.json"
    settings.REPORT_DIR, settings.LOG_DIR = tmp_path / "reports", tmp_path / "logs"
    for interactive in ([], ["--noinput"]):  # refuses before asking anything
        with pytest.raises(CommandError) as exc:
            call_command("rollback_to_sqlite", *interactive, stdout=StringIO())
        assert exc.value.returncode == 7
        assert "Nothing to roll back" in str(exc.value)
        assert "Run migration_prepare to start it" in str(exc.value)
    assert state_mod.read_state(settings.STATE_FILE).phase == "nothing"
    assert not settings.STATE_FILE.exists()
    # and migrate_data still refuses, naming the prepare (no way around it)
    with pytest.raises(CommandError, match="Run migration_prepare next"):
        call_command("migrate_data", stdout=StringIO(), stderr=StringIO())


def test_rollback_twice_refuses_the_second_time(tmp_path, settings):
    settings.STATE_FILE = tmp_path / "state.json"
    state_mod.write_state(settings.STATE_FILE, state_mod.MigrationState(phase="rolled_back"))
    with pytest.raises(CommandError, match="already rolled back") as exc:
        call_command("rollback_to_sqlite", "--noinput", stdout=StringIO())
    assert exc.value.returncode == 7
