"""One scan: authentication attacks, privilege changes and database posture.

The engine returns findings and never prints; ``record()`` keeps them in SecurityFinding
(security/record.py); ``manage.py security_scan`` renders and records.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime

from django.utils import timezone

from security.scan import auth_attacks, db_posture, privilege_changes
from security.scan.findings import RANK, Finding


@dataclasses.dataclass
class ScanResult:
    since: datetime
    until: datetime
    findings: list[Finding]
    notes: list[str]  # info lines: what was not checked, and why
    seconds: dict[str, float]

    @property
    def worst(self) -> int:
        """0 clean, 1 warnings, 2 anything critical (the command's exit status)."""
        return max((RANK[f.severity] for f in self.findings), default=0)

    def to_dict(self) -> dict:
        return {
            "status": ("clean", "warnings", "findings")[self.worst],
            "ok": not self.findings,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "findings": [f.to_dict() for f in self.findings],
            "notes": self.notes,
            "seconds": self.seconds,
        }


def run_scan(
    *,
    database: str,
    since: datetime,
    until: datetime | None = None,
    posture: dict | None = None,
    options: dict,
) -> ScanResult:
    """Scan the events of ``database`` between since and until, and the posture if given.

    ``posture``: the keyword arguments of ``db_posture.scan`` without the times (conninfo,
    app_user, names), or None when the site runs on SQLite.
    """
    import time

    until = until or timezone.now()
    findings: list[Finding] = []
    notes: list[str] = []
    seconds = {}
    for name, check in (("auth_attacks", auth_attacks), ("privilege_changes", privilege_changes)):
        start = time.perf_counter()
        findings += check.scan(database=database, since=since, until=until, options=options)
        seconds[name] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    if posture is None:
        notes.append("database posture not checked: the site runs on SQLite")
    else:
        result = db_posture.scan(**posture, since=since, until=until, options=options)
        findings += result.findings
        notes += result.notes
    seconds["db_posture"] = round(time.perf_counter() - start, 3)
    findings.sort(key=lambda f: (-RANK[f.severity], f.kind, f.window_start, f.subject))
    return ScanResult(since, until, findings, notes, seconds)


def posture_from_settings(database: str) -> dict | None:
    """db_posture.scan's connection and roles from the settings; None when on SQLite.

    Reads as POSTGRES_ADMIN_URL when set (a superuser sees every session's SSL), else as the
    alias's login (the owner, for commands in OWNER_COMMANDS).
    """
    from django.conf import settings
    from django.db import connections

    from dbmigration.preflight import conninfo_from_settings, conninfo_from_url
    from dbmigration.roles import role_names

    if connections[database].vendor != "postgresql":
        return None
    admin_url = getattr(settings, "POSTGRES_ADMIN_URL", "")
    conninfo = (
        conninfo_from_url(admin_url)
        if admin_url
        else conninfo_from_settings(connections[database].settings_dict)
    )
    app_url = getattr(settings, "POSTGRES_URL", "")
    app_user = (conninfo_from_url(app_url) if app_url else {}).get("user") or conninfo.get(
        "user", "postgres"
    )
    return {
        "conninfo": conninfo,
        "app_user": app_user,
        "names": role_names(suffix=getattr(settings, "DB_ROLE_SUFFIX", "")),
    }
