"""The shared progress renderer: plain periodic lines off a terminal, nothing at verbosity 0."""

from __future__ import annotations

import re
import time
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import OutputWrapper
from django.test import override_settings

from dbmigration import state as state_mod
from dbmigration.management.progress import ProgressRenderer
from dbmigration.sqlite_source import source_fingerprint
from tests.sources import make_people, source_path


def test_plain_lines_name_stage_item_counts_rate_and_eta():
    out = StringIO()
    with ProgressRenderer(OutputWrapper(out), verbosity=1, interval=0) as progress:
        progress("copy", "accounts_user", 0, 50_000)
        time.sleep(0.05)
        progress("copy", "accounts_user", 12_345, 50_000)
    lines = out.getvalue().splitlines()
    assert lines[0] == "copy: accounts_user 0/50,000"
    assert re.fullmatch(
        r"copy: accounts_user 12,345/50,000 \([\d,]+ rows/s, \d+ (s|min) left\)", lines[1]
    ), lines[1]


def test_lines_come_at_most_every_interval():
    out = StringIO()
    with ProgressRenderer(OutputWrapper(out), verbosity=1, interval=3600) as progress:
        for done in range(0, 10_000, 100):
            progress("verify", "accounts_user", done, 0)
    assert out.getvalue().splitlines() == ["verify: accounts_user 0"]  # then quiet for an hour


def test_a_long_silent_step_still_prints_every_interval():
    out = StringIO()
    with ProgressRenderer(OutputWrapper(out), verbosity=1, interval=0.05) as progress:
        progress.note("snapshot of the SQLite file")
        time.sleep(0.4)  # a step that reports nothing while it runs
    lines = out.getvalue().splitlines()
    assert lines[0] == "snapshot of the SQLite file"
    ticks = [line for line in lines[1:] if line.endswith("since: snapshot of the SQLite file")]
    assert len(ticks) >= 3, lines


def test_verbosity_0_prints_nothing_even_for_a_long_step():
    out = StringIO()
    with ProgressRenderer(OutputWrapper(out), verbosity=0, interval=0.01) as progress:
        progress.note("backup")
        progress("copy", "accounts_user", 1, 2)
        time.sleep(0.1)
    assert out.getvalue() == ""


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_migrate_data_shows_copy_and_verification_progress_off_a_terminal(tmp_path):
    make_people(5)
    state_file = tmp_path / "state.json"
    state_mod.write_state(
        state_file,
        state_mod.MigrationState(
            phase="prepared", source_fingerprint=source_fingerprint(source_path())
        ),
    )
    fast = {**getattr(settings, "DBMIGRATION", {}), "PROGRESS_SECONDS": 0}
    with override_settings(
        STATE_FILE=state_file,
        REPORT_DIR=tmp_path / "reports",
        LOG_DIR=tmp_path / "logs",
        SQLITE_PATH=source_path(),
        DBMIGRATION=fast,
    ):
        out = StringIO()
        call_command("migrate_data", stdout=out, stderr=StringIO())
        lines = out.getvalue().splitlines()
        assert "copy: accounts_user 5/5" in "\n".join(lines)
        assert any(line.startswith("verify: accounts_user ") for line in lines)
        quiet = StringIO()
        call_command("migrate_data", "--verify-only", verbosity=0, stdout=quiet)
        assert quiet.getvalue() == ""


def test_row_totals_say_what_they_count():
    from dbmigration.management.output import describe_rows

    counts = {
        "accounts_user": 10_000,
        "accounts_organisation": 66_384,
        "django_migrations": 38,
        "auth_permission": 55,
    }
    assert describe_rows(counts) == (
        "76,384 rows in 2 tables (+55 in 1 of Django's own tables, +38 in django_migrations)"
    )
    assert describe_rows({"accounts_user": 1}) == "1 row in 1 table"
    assert describe_rows({"accounts_user": 3, "auth_permission": 55}) == (
        "3 rows in 1 table (+55 in 1 of Django's own tables)"
    )


def test_a_terminal_gets_bars_with_the_stage_and_item():
    out = StringIO()
    with ProgressRenderer(OutputWrapper(out), verbosity=1, tty=True) as progress:
        progress("copy", "accounts_user", 500, 1_000)
        progress.note("write freeze on")
        progress("copy", "accounts_user", 1_000, 1_000)
    text = out.getvalue()
    assert "copy: accounts_user" in text and "overall" in text and " rows/s" in text
    assert "write freeze on" in text
