"""Database posture on PostgreSQL: what the catalog, pg_stat_ssl and the server log say.

Row-level security is judged by ``dbmigration.security.check_security`` (the catalog, not
our list); this module adds the cluster-wide view: who is superuser or BYPASSRLS, who is
connected without SSL, whether the application logs in as an owner, whether pgaudit is
loaded, and failed authentications in the server log.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from dbmigration.preflight import connect
from dbmigration.roles import RoleNames
from dbmigration.security import check_security
from security.scan.findings import CRITICAL, WARNING, Finding

# check_security's kinds that weaken row-level security, and how severe each is
RLS_KINDS = {
    "rls_missing": CRITICAL,
    "policy_missing": CRITICAL,
    "policy_open": CRITICAL,
    "view_definer": WARNING,
}
LOOPBACK = "(a.client_addr <<= '127.0.0.0/8'::inet OR a.client_addr = '::1'::inet)"
# default log_line_prefix '%m [%p] ': '2026-12-01 19:50:01.123 UTC [42] FATAL:  ...'
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?)(?: ([A-Za-z]+|[+-]\d{2,4}))?")
AUTH_FAILED = re.compile(
    r"FATAL:\s+(?:password authentication failed for user \"(?P<user>[^\"]*)\""
    r"|no pg_hba\.conf entry for host \"(?P<host>[^\"]*)\", user \"(?P<hba_user>[^\"]*)\""
    r"|role \"(?P<unknown>[^\"]*)\" does not exist)"
)


@dataclasses.dataclass
class PostureResult:
    findings: list[Finding]
    notes: list[str]  # what was not checked and why (info, never a finding)


def scan(
    *,
    conninfo: dict,
    app_user: str,
    names: RoleNames,
    since: datetime,
    until: datetime,
    options: dict,
) -> PostureResult:
    """Every posture finding on the server conninfo reaches (as the owner or a superuser)."""
    now = until
    findings, notes = [], []
    report = check_security(conninfo=conninfo, app_role=names.app)
    for weakness in report.findings:
        if weakness.kind in RLS_KINDS:
            findings.append(
                _standing("rls_weak", RLS_KINDS[weakness.kind], "table", weakness.relation,
                          weakness.detail, now, key=f"{weakness.relation}:{weakness.kind}")
            )  # fmt: skip
    with connect(conninfo) as conn:
        findings += _privileged_roles(conn, names=names, options=options, now=now)
        findings += _app_login(conn, app_user=app_user, owner=names.owner, now=now)
        ssl, note = _plain_connections(
            conn, exempt_loopback=options["SSL_EXEMPT_LOOPBACK"], now=now
        )
        findings += ssl
        notes += [note] if note else []
        preload = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()[0]
        if "pgaudit" not in {lib.strip() for lib in preload.split(",")}:
            findings.append(
                _standing("pgaudit_off", WARNING, "server", _server(conninfo),
                          "pgaudit is not in shared_preload_libraries: nothing outside Django "
                          "(raw SQL, psql, bulk updates) leaves an audit trail; configure it as "
                          "README 'Security operations' says (needs a restart)", now)
            )  # fmt: skip
        log, note = _server_log(conn, options)
    if note:
        notes.append(note)
    if log:
        findings += _auth_failures(log, options=options, since=since, until=until)
    return PostureResult(findings, notes)


def _server(conninfo: dict) -> str:
    return f"{conninfo.get('host', 'localhost')}:{conninfo.get('port', 5432)}"


def _standing(
    kind, severity, subject_type, subject, detail, now, *, count=1, key="", evidence=None
):
    return Finding(
        kind, severity, subject_type, subject, count, now, now, detail,
        evidence=evidence or {}, subject_key=key, standing=True,
    )  # fmt: skip


def _privileged_roles(conn, *, names: RoleNames, options: dict, now) -> list[Finding]:
    allowed_super = set(options["ALLOWED_SUPERUSERS"])
    allowed_bypass = set(options["ALLOWED_BYPASSRLS"] or [names.owner, names.developer])
    found = []
    for role, superuser, bypass, login in conn.execute(
        "SELECT rolname, rolsuper, rolbypassrls, rolcanlogin FROM pg_roles "
        "WHERE (rolsuper OR rolbypassrls) AND rolname NOT LIKE 'pg\\_%' ORDER BY 1"
    ):
        if superuser and role not in allowed_super:
            what = "SUPERUSER"
        elif not superuser and bypass and role not in allowed_bypass | allowed_super:
            what = "BYPASSRLS"
        else:
            continue
        found.append(
            _standing("role_privileged", CRITICAL, "role", role,
                      f"{what}{' and can log in' if login else ''}: every row-level security "
                      f"policy is bypassed; remove it (ALTER ROLE ... NO{what}) or document it "
                      "in SECURITY_SCAN['ALLOWED_SUPERUSERS'/'ALLOWED_BYPASSRLS']", now)
        )  # fmt: skip
    return found


def _app_login(conn, *, app_user: str, owner: str, now) -> list[Finding]:
    row = conn.execute(
        "SELECT r.rolsuper, r.rolbypassrls, "
        "(SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        " WHERE n.nspname = 'public' AND c.relowner = r.oid), "
        "EXISTS (SELECT 1 FROM pg_roles o WHERE o.rolname = %s "
        "        AND pg_has_role(r.oid, o.oid, 'USAGE')) "
        "FROM pg_roles r WHERE r.rolname = %s",
        [owner, app_user],
    ).fetchone()
    if row is None:
        return []
    superuser, bypass, owned, as_owner = row
    powers = [
        text
        for text, has in (
            ("is a superuser", superuser),
            ("has BYPASSRLS", bypass and not superuser),
            (f"owns {owned} relation(s)", owned),
            (f"acts as {owner}", as_owner and app_user != owner),
            (f"is {owner}", app_user == owner),
        )
        if has
    ]
    if not powers:
        return []
    return [
        _standing("app_as_owner", CRITICAL, "role", app_user,
                  f"the application's login (POSTGRES_URL) {', '.join(powers)}: row-level "
                  "security does not bind it; connect as app_service (manage.py db_roles) and "
                  "keep the owner for POSTGRES_OWNER_URL", now)
    ]  # fmt: skip


def _plain_connections(conn, *, exempt_loopback: bool, now) -> tuple[list[Finding], str]:
    sees_all = conn.execute(
        "SELECT rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') "
        "FROM pg_roles WHERE rolname = current_user"
    ).fetchone()[0]
    note = (
        ""
        if sees_all
        else "connections of other roles are not visible to this role; grant it "
        "pg_read_all_stats to check their SSL"
    )
    rows = conn.execute(
        "SELECT a.usename, host(a.client_addr), count(*) FROM pg_stat_activity a "
        "JOIN pg_stat_ssl s ON s.pid = a.pid WHERE a.backend_type = 'client backend' "
        "AND a.client_addr IS NOT NULL AND NOT s.ssl"
        + ("" if not exempt_loopback else f" AND NOT {LOOPBACK}")
        + " GROUP BY 1, 2 ORDER BY 1, 2"
    ).fetchall()
    by_role = defaultdict(list)
    for role, address, count in rows:
        by_role[role].append((address, count))
    findings = [
        _standing("ssl_missing", WARNING, "connection", role,
                  f"{sum(n for _, n in seen)} connection(s) without SSL from "
                  f"{', '.join(a for a, _ in seen[:5])}: passwords and personal data cross the "
                  "network in clear; use sslmode=verify-full and hostssl lines in pg_hba.conf",
                  now, count=sum(n for _, n in seen), evidence={"addresses": [a for a, _ in seen]})
        for role, seen in by_role.items()
    ]  # fmt: skip
    return findings, note


def _server_log(conn, options: dict) -> tuple[Path | None, str]:
    """The server log file, if this process can read it."""
    path = options["POSTGRES_LOG"]
    if not path:
        try:
            current = conn.execute("SELECT pg_current_logfile()").fetchone()[0]
            data = conn.execute("SELECT current_setting('data_directory')").fetchone()[0]
        except Exception:  # needs superuser or pg_monitor
            return None, "server log not read: this role may not ask where it is (pg_monitor)"
        if not current:
            return None, (
                "server log not read: logging_collector is off; set SECURITY_SCAN"
                "['POSTGRES_LOG'] to the file the server writes"
            )
        path = os.path.join(data, current)
    if not os.access(path, os.R_OK):
        return None, f"server log not read: {path} is not readable by this process"
    return Path(path), ""


def _zone(name: str | None) -> dt.tzinfo:
    """The time zone of a log line's stamp: %m writes an abbreviation (UTC) or an offset."""
    if not name or name in ("UTC", "GMT", "Z"):
        return dt.UTC
    if name[0] in "+-":
        digits = name[1:].ljust(4, "0")
        offset = dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:4]))
        return dt.timezone(-offset if name[0] == "-" else offset)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return dt.UTC  # an abbreviation zoneinfo does not know (IST, CET...): read as UTC


def read_auth_failures(path: Path, *, since: datetime, until: datetime, tail_mb: int) -> dict:
    """role -> [times] of failed authentications logged between since and until."""
    size = path.stat().st_size
    failures: dict[str, list[datetime]] = defaultdict(list)
    with path.open("rb") as handle:
        if size > tail_mb * 1024 * 1024:
            handle.seek(size - tail_mb * 1024 * 1024)
            handle.readline()  # a partial line
        for raw in handle:
            if b"FATAL" not in raw:
                continue
            line = raw.decode("utf-8", "replace")
            failed, stamp = AUTH_FAILED.search(line), LOG_TIME.match(line)
            if not (failed and stamp):
                continue
            at = datetime.fromisoformat(stamp[1]).replace(tzinfo=_zone(stamp[2]))
            if since <= at < until:
                role = failed["user"] or failed["hba_user"] or failed["unknown"] or "?"
                failures[role].append(at)
    return failures


def _auth_failures(path: Path, *, options: dict, since: datetime, until: datetime) -> list[Finding]:
    threshold = options["PG_AUTH_FAILURES"]
    failures = read_auth_failures(
        path, since=since, until=until, tail_mb=options["POSTGRES_LOG_TAIL_MB"]
    )
    return [
        Finding(
            "pg_auth_failures",
            WARNING,
            "role",
            role,
            len(times),
            min(times),
            max(times),
            f"{len(times)} failed PostgreSQL authentication(s) for role {role} (threshold "
            f"{threshold}) in {path.name}: someone is guessing a database password, or a "
            "service runs with a stale one",
            merge_within=timedelta(hours=1),
        )
        for role, times in sorted(failures.items())
        if len(times) >= threshold
    ]
