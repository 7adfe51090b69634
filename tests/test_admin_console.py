"""The admin's "Database migration" section: read-only views over a real runbook's files."""

import csv
import datetime
import json
from io import StringIO
from pathlib import Path

import pytest
from auditlog.context import set_actor
from auditlog.models import LogEntry
from django.core.management import call_command
from django.test import override_settings

from accounts.models import Organisation, User
from tests.sources import bad_copy, make_people, prepared

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)

CONSOLE = "/admin/migration/"


@pytest.fixture
def runbook(tmp_path):
    """A backup, a prepare and a migrate_data --quarantine that set a NUL-damaged row aside."""
    make_people(2)
    source = bad_copy(tmp_path, "UPDATE accounts_user SET first_name = 'x' || char(0) || 'y'")
    files = tmp_path / "database"
    with override_settings(
        STATE_FILE=files / "state.json",
        REPORT_DIR=files / "reports",
        LOG_DIR=files / "logs",
        BACKUP_DIR=files / "backups",
        SQLITE_PATH=source,
    ):
        call_command("db_backup", stdout=StringIO())
        prepared(source, files / "state.json")
        call_command("migrate_data", "--quarantine", stdout=StringIO(), stderr=StringIO())
        yield files


def _report(files: Path) -> tuple[str, dict]:
    path = sorted((files / "reports").glob("migration_report_*.json"))[-1]
    return path.name, json.loads(path.read_text())


@pytest.fixture
def superuser(client):
    user = User.objects.create_superuser("root@prop.ie", "correct-horse-battery")
    client.force_login(user)
    return user


@pytest.fixture
def staff(client):
    user = User.objects.create_user("ops@prop.ie", "correct-horse-battery", is_staff=True)
    client.force_login(user)
    return user


def test_console_is_for_staff_only(client, runbook):
    assert client.get(CONSOLE)["Location"].startswith("/admin/login/")
    client.force_login(User.objects.create_user("buyer@example.ie", "pw-123456"))
    assert client.get(CONSOLE)["Location"].startswith("/admin/login/")


def test_admin_index_has_the_migration_section(client, staff, runbook):
    page = client.get("/admin/").content.decode()
    assert "Database migration" in page
    for url in ("migration/", "migration/status/", "migration/reports/", "migration/backups/"):
        assert f'href="/admin/{url}"' in page


def test_status_page_shows_phase_next_step_and_history(client, staff, runbook):
    name, _ = _report(runbook)
    page = client.get(CONSOLE).content.decode()
    assert '<dd class="phase">data_migrated</dd>' in page
    assert "<code>switch_to_postgresql</code>" in page  # what to run next
    assert "migrate_data (copy)" in page  # the transition's note in the history
    assert f'href="/admin/migration/reports/{name}/"' in page
    assert "Write freeze</dt><dd>off" in page


def test_report_page_shows_steps_counts_checksums_and_rejects(client, superuser, runbook):
    name, report = _report(runbook)
    page = client.get(f"{CONSOLE}reports/{name}/").content.decode()
    users = report["facts"]["tables"]["accounts_user"]
    assert users["rows_rejected"] == users["rows_read"] > 0 and users["source_checksum"]
    assert '<td class="status-warning">warning</td>' in page  # the copy step
    assert users["source_checksum"] in page and users["target_checksum"] in page
    counts = "".join(f"<td>{users[k]}</td>" for k in ("rows_read", "rows_written", "rows_rejected"))
    assert f"<td>accounts_user</td><td>copied</td>{counts}" in page
    assert "NUL byte" in page  # the rejection's reason
    download = client.get(f"{CONSOLE}reports/{name}/rejects")
    assert download.status_code == 200
    assert download["Content-Disposition"].startswith('attachment; filename="rejects_')
    listed = b"".join(download.streaming_content)
    assert listed == Path(report["facts"]["reject_file"]).read_bytes()
    assert b"u0@example.ie" in listed  # whole rows: for superusers only


def test_staff_see_counts_but_not_the_rejected_rows(client, staff, runbook):
    name, report = _report(runbook)
    page = client.get(f"{CONSOLE}reports/{name}/").content.decode()
    assert "NUL byte" in page and "superusers can download it" in page
    assert "u0@example.ie" not in page and "x\\u0000y" not in page
    assert client.get(f"{CONSOLE}reports/{name}/rejects").status_code == 403
    assert client.get(f"{CONSOLE}reports/{name}/json").status_code == 200


def test_reports_list_and_log(client, staff, runbook):
    name, report = _report(runbook)
    page = client.get(f"{CONSOLE}reports/").content.decode()
    assert name in page and "migration_prepare" not in page  # prepare() wrote no report here
    log = client.get(f"{CONSOLE}reports/{name}/log")
    assert b"migrate_data started" in b"".join(log.streaming_content)


def test_backups_page_shows_verification_and_unusable_directories(client, staff, runbook):
    (runbook / "backups" / "20260101T000000Z.partial").mkdir()
    page = client.get(f"{CONSOLE}backups/").content.decode()
    backup = next(p for p in (runbook / "backups").iterdir() if (p / "manifest.json").exists())
    assert backup.name in page and "integrity_check: ok" in page
    assert '<td class="status-ok">verified</td>' in page
    assert '<li class="status-failed">20260101T000000Z.partial</li>' in page


def test_health_checks_page_names_checks_readably(client, staff, runbook):
    page = client.get(f"{CONSOLE}health/").content.decode()
    for label in ("Active backend", "Backup age", "Migration phase", "Connection pool"):
        assert f"<td>{label}</td>" in page
    assert "last verified sqlite backup" in page


def test_only_reports_and_files_under_their_folders_are_served(client, superuser, runbook):
    assert client.get(f"{CONSOLE}reports/state.json/").status_code == 404
    assert client.get(f"{CONSOLE}reports/..%2Fstate.json/").status_code == 404
    forged = runbook / "reports" / "migration_report_20990101T000000Z.json"
    forged.write_text(
        json.dumps({"command": "x", "facts": {"reject_file": str(runbook / "state.json")}})
    )
    assert client.get(f"{CONSOLE}reports/{forged.name}/").status_code == 200
    assert client.get(f"{CONSOLE}reports/{forged.name}/rejects").status_code == 404
    assert client.get(f"{CONSOLE}reports/{forged.name}/log").status_code == 404


def _tree(root: Path) -> dict:
    # in WAL mode every reader updates SQLite's shared-memory index (-shm): only that it
    # exists counts there; the database and its -wal must not change at all
    return {
        str(p): (p.stat().st_size, None if p.name.endswith("-shm") else p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_console_writes_nothing(client, superuser, runbook):
    name, _ = _report(runbook)
    before = _tree(runbook.parent)
    for page in ("", "reports/", f"reports/{name}/", "backups/", "health/"):
        assert client.get(f"{CONSOLE}{page}").status_code == 200, page
    b"".join(client.get(f"{CONSOLE}reports/{name}/rejects").streaming_content)
    assert _tree(runbook.parent) == before


# --- in a real browser: headless Chromium from Debian, driven by Playwright ------------------

CHROMIUM = "/usr/bin/chromium"  # Debian's package (the Makefile installs it)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.slow
def test_operator_and_auditor_in_a_browser(runbook, live_server, tmp_path):
    name, report = _report(runbook)
    root = User.objects.create_superuser("root@prop.ie", "correct-horse-battery")
    with set_actor(root):
        Organisation.objects.create(name="Lisney Sotheby's", kind="estate_agent")
    Organisation.objects.create(name="Glenveagh Properties", kind="developer")  # by "system"
    march = LogEntry.objects.filter(object_repr="Glenveagh Properties")
    march.update(timestamp=datetime.datetime(2026, 3, 1, 12, tzinfo=datetime.UTC))
    expected_system = LogEntry.objects.filter(actor__isnull=True).count()

    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(accept_downloads=True).new_page()
        page.set_default_timeout(15_000)
        try:
            # log in
            page.goto(f"{live_server.url}/admin/")
            page.fill("#id_username", "root@prop.ie")
            page.fill("#id_password", "correct-horse-battery")
            page.click("input[type=submit]")
            page.wait_for_selector("text=Site administration")

            # the migration page, from the admin index
            page.click("text=Status and history")
            assert page.inner_text("#migration-status .phase") == "data_migrated"
            assert "switch_to_postgresql" in page.inner_text("#migration-status .next-step")
            assert "migrate_data (copy)" in page.inner_text("#history")

            # a report: steps, counts, rejections, and the reject file
            page.click(".console-nav >> text=Reports")
            page.click(f"a[href$='{name}/']")
            assert "copy" in page.inner_text("#steps") and "verify" in page.inner_text("#steps")
            users = report["facts"]["tables"]["accounts_user"]
            assert users["source_checksum"] in page.inner_text("#facts")
            assert "NUL byte" in page.inner_text("table[data-block=rejections]")
            with page.expect_download() as download:
                page.click("a.rejects-download")
            saved = tmp_path / "rejects.jsonl"
            download.value.save_as(saved)
            assert saved.read_bytes() == Path(report["facts"]["reject_file"]).read_bytes()

            # the audit log, filtered by actor, then by date range, then exported
            page.goto(f"{live_server.url}/admin/auditlog/logentry/")
            page.click("#changelist-filter >> text=system (no user)")
            assert f"Export CSV ({expected_system} entries)" in page.text_content(".export-csv")
            page.fill("form[data-filter=date-range] input[name=date_from]", "2026-03-01")
            page.fill("form[data-filter=date-range] input[name=date_to]", "2026-03-01")
            page.click("form[data-filter=date-range] input[type=submit]")
            assert "Export CSV (1 entry)" in page.text_content(".export-csv")
            assert "Glenveagh Properties" in page.inner_text("#result_list")
            with page.expect_download() as download:
                page.click(".export-csv")
            exported = tmp_path / "audit.csv"
            download.value.save_as(exported)
            rows = list(csv.DictReader(exported.open(encoding="utf-8")))
            assert [(r["actor"], r["action"], r["object"]) for r in rows] == [
                ("system", "create", "Glenveagh Properties")
            ]
            assert rows[0]["timestamp"].startswith("2026-03-01T12:00:00")

            # a user's History page shows the user's audit entries
            page.goto(f"{live_server.url}/admin/accounts/user/{root.pk}/change/")
            page.click("a.historylink")
            assert "Audit log: root@prop.ie" in page.inner_text("#content")
            assert "Create" in page.inner_text("#auditlog-history")
        finally:
            browser.close()


def test_an_unreadable_state_file_is_said_not_crashed_on(client, staff, runbook):
    (runbook / "state.json").write_text("{ half a file")
    response = client.get(CONSOLE)
    assert response.status_code == 200
    assert "is unreadable" in response.content.decode()


def test_reports_list_shows_a_refusal_recorded_in_the_facts(client, staff, runbook):
    refused = runbook / "reports" / "migration_report_20991231T000000Z.json"
    refused.write_text(
        json.dumps(
            {
                "command": "migration_prepare",
                "status": "failed",
                "steps": [],
                "facts": {"error": "Cannot run migration_prepare now"},
            }
        )
    )
    page = client.get(f"{CONSOLE}reports/").content.decode()
    assert "Cannot run migration_prepare now" in page
