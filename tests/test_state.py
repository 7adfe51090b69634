"""The state file: transitions, what to run first, and staleness of a prepare."""

from __future__ import annotations

import json
import sqlite3

import pytest

from dbmigration import state as state_mod
from dbmigration.sqlite_source import source_fingerprint
from tests.test_backup import make_source


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


def test_fingerprint_staleness_follows_every_kind_of_change(tmp_path):
    source = make_source(tmp_path / "s.sqlite3", rows=5)
    prepared = state_mod.MigrationState(phase="prepared")
    assert state_mod.stale_reasons(prepared, source_fingerprint(source)) == [
        "no source fingerprint recorded; run migration_prepare"
    ]
    prepared.source_fingerprint = source_fingerprint(source)
    assert state_mod.stale_reasons(prepared, source_fingerprint(source)) == []
    assert not state_mod.is_prepare_stale(prepared, source_fingerprint(source))

    conn = sqlite3.connect(source)
    conn.execute("UPDATE item SET name = 'same length!' WHERE id = 1")
    conn.commit()
    conn.close()
    reasons = state_mod.stale_reasons(prepared, source_fingerprint(source))
    assert "sha256 changed since migration_prepare" in reasons
    assert state_mod.is_prepare_stale(prepared, source_fingerprint(source))


def test_wal_commits_not_yet_checkpointed_make_a_prepare_stale(tmp_path):
    source = make_source(tmp_path / "w.sqlite3", rows=5, wal=True)
    keep_open = sqlite3.connect(source)  # holds the WAL so it is not checkpointed on close
    keep_open.execute("PRAGMA wal_autocheckpoint=0")
    prepared = state_mod.MigrationState(
        phase="prepared", source_fingerprint=source_fingerprint(source)
    )
    main_before = prepared.source_fingerprint["sha256"]
    keep_open.execute("INSERT INTO item (name) VALUES ('late')")
    keep_open.commit()
    current = source_fingerprint(source)
    assert current["sha256"] == main_before  # the main file did not change...
    reasons = state_mod.stale_reasons(prepared, current)
    assert "wal_sha256 changed since migration_prepare" in reasons  # ...the WAL did
    assert "row_counts changed since migration_prepare" in reasons
    keep_open.close()
