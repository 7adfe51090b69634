"""What a finding is, the kinds the scan knows, and how severe each is."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import datetime, timedelta

WARNING, CRITICAL = "warning", "critical"
SEVERITIES = (WARNING, CRITICAL)  # the command exits 1 on warnings, 2 on anything critical
RANK = {WARNING: 1, CRITICAL: 2}

SUBJECT_TYPES = ("account", "ip", "user", "object", "table", "role", "connection", "server")

KINDS = {
    # authentication attacks (accounts.LoginEvent)
    "brute_force": "Brute force on one account",
    "spraying": "Password spraying / credential stuffing from one IP",
    "success_after_failures": "Success right after a run of failures",
    "inactive_account_login": "Login to a deactivated or deleted account",
    # privilege changes (the django-auditlog trail)
    "made_superuser": "User made superuser",
    "made_staff": "User made staff",
    "role_admin": "Role changed to admin",
    "kyc_forced": "KYC approved by someone other than a reviewer",
    # database posture (PostgreSQL's catalog and server log)
    "rls_weak": "Personal data not protected by row-level security",
    "role_privileged": "Role with SUPERUSER or BYPASSRLS beyond the documented ones",
    "ssl_missing": "Connections without SSL",
    "app_as_owner": "Application connects as an owner or superuser",
    "pgaudit_off": "pgaudit not loaded",
    "pg_auth_failures": "Failed PostgreSQL authentications",
}


@dataclasses.dataclass
class Finding:
    kind: str
    severity: str
    subject_type: str
    subject: str  # what an operator reads: an email, an IP, a role, a table
    count: int
    window_start: datetime
    window_end: datetime
    detail: str
    evidence: dict = dataclasses.field(default_factory=dict)
    # stable identity of the subject (a user's id rather than an email that may change)
    subject_key: str = ""
    # a later sighting this close to the recorded window is the same incident
    merge_within: timedelta = timedelta(0)
    # a state, not an event: every scan that still sees it is the same finding
    standing: bool = False

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.subject_key or self.subject}"[:300]

    @property
    def fingerprint(self) -> str:
        anchor = "" if self.standing else self.window_start.isoformat()
        return hashlib.sha256(f"{self.key}|{anchor}".encode()).hexdigest()

    def line(self) -> str:
        window = f"{self.window_start:%Y-%m-%d %H:%M}"
        if self.window_end != self.window_start:
            window += f" to {self.window_end:%Y-%m-%d %H:%M}"
        return f"[{self.severity}] {KINDS[self.kind]}: {self.subject} ({self.detail}; {window} UTC)"

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "subject_type": self.subject_type,
            "subject": self.subject,
            "count": self.count,
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
            "detail": self.detail,
            "evidence": self.evidence,
            "fingerprint": self.fingerprint,
        }
