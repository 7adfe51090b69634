"""security_scan: each attack planted in LoginEvent and the audit trail, on both engines.

Every pattern is asserted with its kind, severity, subject, count and window; a realistic
quiet history scans clean; recording twice never duplicates.
"""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from auditlog.context import disable_auditlog, set_actor
from django.contrib.auth.models import Group
from django.core.management import CommandError, call_command
from django.utils import timezone

from accounts.models import KycVerification, LoginEvent, User
from dbmigration import health
from security import conf
from security.models import SecurityFinding
from security.record import record
from security.scan import run_scan
from security.scan.auth_attacks import bursts

pytestmark = pytest.mark.django_db(databases=["default", "sqlite", "postgresql"])

ENGINES = ["sqlite", "postgresql"]
NOW = timezone.now().replace(microsecond=0)


def make_user(db, email, **fields) -> User:
    user = User(email=email, **fields)
    user.set_password("not-used-here")
    user.save(using=db)
    return user


def logins(db, *events) -> None:
    """events: (minutes before NOW, user or email, ip, success)."""
    rows = []
    for minutes, who, ip, ok in events:
        user = who if isinstance(who, User) else None
        rows.append(
            LoginEvent(
                user=user,
                email_attempted=user.email if user else who,
                ip_address=ip,
                success=ok,
                failure_reason="" if ok else "bad_password",
                created_at=NOW - timedelta(minutes=minutes),
            )
        )
    LoginEvent.objects.using(db).bulk_create(rows)


def scan(db, *, since=timedelta(days=1), **overrides):
    options = {**conf.DEFAULTS, **overrides}
    until = max(NOW, timezone.now()) + timedelta(minutes=1)  # audit entries carry real times
    return run_scan(database=db, since=NOW - since, until=until, options=options)


def only(result, kind):
    found = [f for f in result.findings if f.kind == kind]
    assert len(found) == 1, [f.line() for f in result.findings]
    return found[0]


@pytest.fixture
def quiet(request):
    """A realistic quiet day: 30 users signing in, a few typos, an unknown address."""
    db = request.param
    users = [make_user(db, f"user{n}@example.ie") for n in range(30)]
    events = []
    for n, user in enumerate(users):
        ip = f"192.0.2.{n + 1}"
        events += [(600 - n * 7, user, ip, True), (300 - n * 3, user, ip, True)]
        if n % 5 == 0:  # a typo, then the right password a minute later
            events += [(200 - n, user, ip, False), (199 - n, user, ip, True)]
    events.append((100, "nobody@example.ie", "198.51.100.7", False))
    logins(db, *events)
    return db, users


@pytest.mark.parametrize("quiet", ENGINES, indirect=True)
def test_a_quiet_day_scans_clean(quiet):
    db, _ = quiet
    result = scan(db)
    assert result.findings == []
    assert result.worst == 0
    assert result.notes == ["database posture not checked: the site runs on SQLite"]


@pytest.mark.parametrize("db", ENGINES)
def test_brute_force_on_one_account(db):
    victim = make_user(db, "victim@example.ie")
    # 12 failures in 11 minutes from two addresses; 9 on another account stay under 10
    logins(db, *[(60 - n, victim, f"203.0.113.{n % 2}", False) for n in range(12)])
    other = make_user(db, "other@example.ie")
    logins(db, *[(60 - n, other, "203.0.113.9", False) for n in range(9)])
    finding = only(scan(db), "brute_force")
    assert (finding.severity, finding.subject, finding.count) == ("warning", victim.email, 12)
    assert finding.window_start == NOW - timedelta(minutes=60)
    assert finding.window_end == NOW - timedelta(minutes=49)
    assert sorted(finding.evidence["ips"]) == ["203.0.113.0", "203.0.113.1"]


@pytest.mark.parametrize("db", ENGINES)
def test_brute_force_on_an_address_with_no_account(db):
    logins(db, *[(30 - n, "Ghost@Example.ie", "203.0.113.5", False) for n in range(10)])
    finding = only(scan(db), "brute_force")
    assert finding.subject == "ghost@example.ie (no such account)"


@pytest.mark.parametrize("db", ENGINES)
def test_failures_spread_out_are_not_brute_force(db):
    user = make_user(db, "slow@example.ie")
    logins(db, *[(n * 20, user, "203.0.113.5", False) for n in range(12)])  # one per 20 min
    assert [f.kind for f in scan(db).findings] == []


@pytest.mark.parametrize("db", ENGINES)
def test_password_spraying_from_one_ip(db):
    users = [make_user(db, f"target{n}@example.ie") for n in range(12)]
    logins(db, *[(90 - n * 2, user, "198.51.100.66", False) for n, user in enumerate(users)])
    finding = only(scan(db), "spraying")
    assert (finding.severity, finding.subject, finding.count) == ("warning", "198.51.100.66", 12)
    assert finding.evidence["accounts"] == 12
    assert finding.window_start == NOW - timedelta(minutes=90)


@pytest.mark.parametrize("db", ENGINES)
def test_credential_stuffing_that_worked_is_critical(db):
    users = [make_user(db, f"leaked{n}@example.ie") for n in range(11)]
    emails = [f"unknown{n}@example.ie" for n in range(5)]
    logins(
        db,
        *[(50 - n, user, "198.51.100.77", False) for n, user in enumerate(users)],
        *[(30 - n, email, "198.51.100.77", False) for n, email in enumerate(emails)],
        (20, users[3], "198.51.100.77", True),  # one pair in the list worked
    )
    finding = only(scan(db), "spraying")
    assert finding.severity == "critical"
    assert finding.evidence == {"accounts": 16, "signed_in": [str(users[3].pk)]}
    assert "signed in to 1 of them: leaked3@example.ie" in finding.detail


@pytest.mark.parametrize("db", ENGINES)
def test_success_right_after_a_run_of_failures(db):
    user = make_user(db, "guessed@example.ie")
    logins(db, *[(40 - n, user, "203.0.113.40", False) for n in range(6)])
    logins(db, (33, user, "203.0.113.40", True))
    finding = only(scan(db), "success_after_failures")
    assert (finding.severity, finding.subject, finding.count) == ("critical", user.email, 6)
    assert (finding.window_start, finding.window_end) == (
        NOW - timedelta(minutes=40),
        NOW - timedelta(minutes=33),
    )
    assert "from 203.0.113.40 after 6 failed attempts" in finding.detail


@pytest.mark.parametrize("db", ENGINES)
def test_logins_to_deleted_and_deactivated_accounts(db):
    deleted = make_user(db, "gone@example.ie")
    logins(db, (300, deleted, "203.0.113.1", True))  # before the deletion: fine
    deleted.delete(using=db)  # soft delete, now
    suspended = make_user(db, "off@example.ie", is_active=False, status="suspended")
    User.all_objects.using(db).filter(pk=deleted.pk).update(deleted_at=NOW - timedelta(hours=2))
    User.all_objects.using(db).filter(pk=suspended.pk).update(updated_at=NOW - timedelta(hours=3))
    logins(db, (60, deleted, "203.0.113.2", True), (30, deleted, "203.0.113.3", True))
    logins(db, (240, suspended, "203.0.113.4", True), (20, suspended, "203.0.113.5", True))
    found = {f.subject: f for f in scan(db).findings if f.kind == "inactive_account_login"}
    assert set(found) == {deleted.email, suspended.email}
    assert (found[deleted.email].severity, found[deleted.email].count) == ("critical", 2)
    assert "deleted account" in found[deleted.email].detail
    assert found[suspended.email].count == 1  # the one before the suspension does not count
    assert "deactivated account" in found[suspended.email].detail


def test_bursts_merge_overlapping_windows():
    t = [NOW + timedelta(minutes=m) for m in (0, 1, 2, 3, 10, 11, 30, 31, 32)]
    assert bursts(t, threshold=3, window=timedelta(minutes=5)) == [
        (t[0], t[3], 4),
        (t[6], t[8], 3),
    ]


# --- privilege changes (the audit trail) ---------------------------------------------------


@pytest.mark.parametrize("db", ENGINES)
def test_user_made_superuser_staff_and_admin(db):
    boss = make_user(db, "boss@prop.ie", role="admin", is_staff=True, is_superuser=True)
    user = make_user(db, "climber@example.ie")
    with set_actor(boss):
        user.is_staff = user.is_superuser = True
        user.save(using=db)
        user.role = "admin"
        user.save(using=db)
    found = {f.kind: f for f in scan(db).findings}
    assert set(found) == {"made_superuser", "made_staff", "role_admin"}
    assert found["made_superuser"].severity == "critical"
    assert found["made_staff"].severity == found["role_admin"].severity == "warning"
    assert "-> True, by boss@prop.ie" in found["made_superuser"].detail
    assert "-> admin, by boss@prop.ie" in found["role_admin"].detail


@pytest.mark.parametrize("db", ENGINES)
def test_kyc_approved_by_a_non_reviewer_is_forced(db):
    reviewer = make_user(db, "reviewer@prop.ie", role="admin", is_staff=True)
    grouped = make_user(db, "checker@prop.ie", role="agent")
    group = Group.objects.using(db).create(name="KYC reviewers")
    grouped.groups.add(group)
    clerk = make_user(db, "clerk@example.ie", role="agent", is_staff=True)
    applicants = [make_user(db, f"applicant{n}@example.ie") for n in range(3)]
    checks = [
        KycVerification.objects.using(db).create(user=a, document_type="passport", status="pending")
        for a in applicants
    ]
    for check, actor in zip(checks, [reviewer, grouped, clerk], strict=True):
        with set_actor(actor):
            check.status = "verified"
            check.save(using=db)
    with set_actor(reviewer):  # a reviewer approving their own KYC is not a review
        own = KycVerification.objects.using(db).create(
            user=reviewer, document_type="passport", status="pending"
        )
        own.status = "verified"
        own.save(using=db)
    applicants[0].kyc_status = "verified"  # no actor: a shell or a script
    applicants[0].save(using=db)
    found = [f for f in scan(db).findings if f.kind == "kyc_forced"]
    by_subject = {f.subject: f.detail for f in found}
    assert len(found) == 3 and {f.severity for f in found} == {"critical"}
    assert "by clerk@example.ie, who is not a KYC reviewer" in by_subject[applicants[2].email]
    assert "by reviewer@prop.ie, who approved their own KYC" in by_subject[reviewer.email]
    assert "-> verified, by no actor (a command or script)" in by_subject[applicants[0].email]


# --- recording -------------------------------------------------------------------------------


@pytest.mark.parametrize("db", ENGINES)
def test_a_rescan_updates_instead_of_duplicating(db):
    victim = make_user(db, "again@example.ie")
    logins(db, *[(60 - n, victim, "203.0.113.8", False) for n in range(10)])
    first = record(scan(db).findings, database=db, now=NOW)
    assert (first.new, first.updated) == (1, 0)
    # the attack goes on; a later scan with a shorter look-back sees only its tail
    logins(db, *[(50 - n, victim, "203.0.113.8", False) for n in range(15)])
    later = NOW + timedelta(minutes=5)
    second = record(scan(db, since=timedelta(minutes=55)).findings, database=db, now=later)
    assert (second.new, second.updated) == (0, 1)
    row = SecurityFinding.objects.using(db).get()
    assert row.count == 5 + 15  # the larger of the two scans' counts (10, 20), never a sum
    assert row.window_start == NOW - timedelta(minutes=60)
    assert (row.first_seen, row.last_seen) == (NOW, later)
    # resolved, then the same scan again: still resolved (no newer evidence)
    SecurityFinding.objects.using(db).update(resolved=True)
    again = record(scan(db).findings, database=db, now=later)
    assert (again.new, again.reopened) == (0, 0)
    assert SecurityFinding.objects.using(db).get().resolved
    # a new burst within the window reopens it; one a day later is a new incident
    logins(db, *[(30 - n, victim, "203.0.113.8", False) for n in range(10)])
    reopened = record(scan(db).findings, database=db, now=later)
    assert reopened.reopened == 1
    assert not SecurityFinding.objects.using(db).get().resolved


@pytest.mark.parametrize("db", ENGINES)
def test_a_later_incident_on_the_same_account_is_a_new_finding(db):
    victim = make_user(db, "twice@example.ie")
    logins(db, *[(60 * 24 * 3 - n, victim, "203.0.113.8", False) for n in range(10)])
    logins(db, *[(60 - n, victim, "203.0.113.8", False) for n in range(10)])
    record(scan(db, since=timedelta(days=7)).findings, database=db, now=NOW)
    record(scan(db, since=timedelta(days=7)).findings, database=db, now=NOW)
    assert SecurityFinding.objects.using(db).filter(kind="brute_force").count() == 2


# --- the command and the health check --------------------------------------------------------


def run(*args) -> tuple[str, int]:
    out = StringIO()
    try:
        call_command("security_scan", *args, stdout=out)
    except CommandError as exc:
        return out.getvalue(), exc.returncode
    return out.getvalue(), 0


def test_command_exit_codes_json_and_no_record(settings):
    db = "default"
    out, code = run("--since", "2h")
    assert code == 0 and "No findings." in out
    assert "info: database posture not checked: the site runs on SQLite" in out
    user = make_user(db, "cmd@example.ie")
    logins(db, *[(60 - n, user, "203.0.113.8", False) for n in range(10)])
    out, code = run("--since", "2h", "--no-record")
    assert code == 1 and "[warning] Brute force on one account: cmd@example.ie" in out
    assert not SecurityFinding.objects.exists()
    logins(db, (45, user, "203.0.113.8", True))
    out, code = run("--since", "2h", "--json")
    assert code == 2
    import json

    document = json.loads(out)
    assert document["status"] == "findings" and document["recorded"]["new"] == 2
    assert {f["kind"] for f in document["findings"]} == {"brute_force", "success_after_failures"}
    assert SecurityFinding.objects.count() == 2
    out, code = run("--since", "2h")
    assert "recorded: 0 new, 2 updated, 0 reopened" in out
    assert SecurityFinding.objects.count() == 2


@pytest.mark.parametrize("since", ["yesterday", "24x", "2026-13-01"])
def test_a_bad_since_is_one_line(since):
    out, code = run("--since", since)
    assert code == 78


def test_since_accepts_spans_and_dates():
    assert conf.parse_since("7d", now=NOW) == NOW - timedelta(days=7)
    assert conf.parse_since("30m", now=NOW) == NOW - timedelta(minutes=30)
    assert conf.parse_since("2026-11-30").isoformat().startswith("2026-11-30T00:00:00")


def test_health_is_degraded_while_a_finding_is_unresolved():
    assert health.run_check("security").status == health.OK
    user = make_user("default", "health@example.ie")
    logins("default", *[(60 - n, user, "203.0.113.8", False) for n in range(10)])
    run("--since", "2h")
    result = health.run_check("security")
    assert result.status == health.DEGRADED
    assert result.details["by_severity"] == {"warning": 1}
    assert "1 unresolved security finding(s) (1 warning)" in result.message
    SecurityFinding.objects.update(resolved=True)
    assert health.run_check("security").status == health.OK


def test_unknown_setting_key_is_refused(settings):
    settings.SECURITY_SCAN = {"BRUTE_FORCE": 3}
    out, code = run()
    assert code == 78


def test_the_admin_lists_and_filters_findings(client):
    with disable_auditlog():  # or making the operator a superuser is itself a finding
        staff = make_user("default", "sec@prop.ie", role="admin", is_staff=True, is_superuser=True)
    victim = make_user("default", "admin-victim@example.ie")
    logins("default", *[(60 - n, victim, "203.0.113.8", False) for n in range(10)])
    logins("default", (45, victim, "203.0.113.8", True))
    record(scan("default").findings, database="default", now=NOW)
    client.force_login(staff)
    url = "/admin/security/securityfinding/"
    page = client.get(url).content.decode()
    assert "admin-victim@example.ie" in page and "Brute force on one account" in page
    critical = client.get(url, {"severity__exact": "critical"}).content.decode()
    assert "1 security finding" in critical  # the success after failures, not the brute force
    assert 'class="field-kind">Success right after a run of failures' in critical
    assert "2 security findings" in client.get(url, {"resolved__exact": "0"}).content.decode()
    assert "0 security findings" in client.get(url, {"kind__exact": "pgaudit_off"}).content.decode()
    day = timezone.localdate(NOW)  # the date hierarchy's drill-down
    by_day = {"last_seen__year": day.year, "last_seen__month": day.month, "last_seen__day": day.day}
    assert "2 security findings" in client.get(url, by_day).content.decode()
    finding = SecurityFinding.objects.get(kind="brute_force")
    response = client.post(
        url, {"action": "mark_resolved", "_selected_action": [finding.pk]}, follow=True
    )
    assert "1 finding(s) marked resolved." in response.content.decode()
    assert SecurityFinding.objects.get(pk=finding.pk).resolved_at is not None
    assert client.get(f"{url}add/").status_code == 403


@pytest.mark.django_db(databases=["default", "sqlite", "postgresql"], transaction=True)
def test_health_with_the_sqlite_file_missing_creates_nothing(tmp_path):
    from django.db import connections

    gone = tmp_path / "propcore.sqlite3"  # its directory exists: Django would create the file
    aliases = [a for a in ("sqlite", "default") if connections[a].vendor == "sqlite"]
    saved = {alias: connections.settings[alias]["NAME"] for alias in aliases}
    for alias in aliases:
        connections[alias].close()
        connections.settings[alias]["NAME"] = str(gone)
    try:
        result = health.run_check("security")
    finally:
        for alias in aliases:
            connections[alias].close()
            connections.settings[alias]["NAME"] = saved[alias]
    assert (result.status, result.message.split(":")[0]) == (health.OK, "not checked")
    assert not gone.exists()


def test_failed_authentications_read_from_a_server_log(tmp_path):
    from datetime import UTC, datetime

    from security.scan.db_posture import read_auth_failures

    log = tmp_path / "postgresql.log"
    log.write_text(
        '2026-12-01 09:59:59.900 UTC [11] FATAL:  password authentication failed for user "app"\n'
        '2026-12-01 10:00:01.000 UTC [12] FATAL:  password authentication failed for user "app"\n'
        "2026-12-01 10:00:02.000 UTC [12] DETAIL:  Connection matched pg_hba.conf line 99\n"
        '2026-12-01 11:00:03 +01 [13] FATAL:  no pg_hba.conf entry for host "192.0.2.1", '
        'user "mallory", database "propcore", SSL off\n'
        '2026-12-01 10:30:00.000 UTC [14] FATAL:  role "root" does not exist\n'
        "2026-12-01 10:30:01.000 UTC [15] LOG:  checkpoint starting: time\n"
        '2026-12-01 12:00:00.000 UTC [16] FATAL:  password authentication failed for user "app"\n'
    )
    since, until = datetime(2026, 12, 1, 10, tzinfo=UTC), datetime(2026, 12, 1, 11, tzinfo=UTC)
    found = read_auth_failures(log, since=since, until=until, tail_mb=1)
    assert dict(found) == {
        "app": [datetime(2026, 12, 1, 10, 0, 1, tzinfo=UTC)],
        "mallory": [datetime(2026, 12, 1, 10, 0, 3, tzinfo=UTC)],  # 11:00:03 +01
        "root": [datetime(2026, 12, 1, 10, 30, tzinfo=UTC)],
    }


@pytest.mark.parametrize(
    "bad, error",
    [
        ({"BRUTE_FORCE": 3}, "security.E001"),
        ({"BRUTE_FORCE_FAILURES": 0}, "security.E002"),
        ({"SPRAY_ACCOUNTS": "10"}, "security.E002"),
        ({"HEALTH_SEVERITY": "info"}, "security.E003"),
        ({"SINCE": "yesterday"}, "security.E004"),
    ],
)
def test_system_checks_refuse_a_bad_security_scan_setting(settings, bad, error):
    from security.checks import check_security_scan_settings

    assert check_security_scan_settings() == []
    settings.SECURITY_SCAN = bad
    assert [message.id for message in check_security_scan_settings()] == [error]
