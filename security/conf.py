"""The scan's thresholds: one ``SECURITY_SCAN`` dict in the Django settings.

Every key is optional; these are the defaults (README, "Threat detection")::

    SECURITY_SCAN = {
        "SINCE": "24h",                      # default look-back of a scan (--since)
        "BRUTE_FORCE_FAILURES": 10,          # failures on one account ...
        "BRUTE_FORCE_WINDOW_MINUTES": 15,    # ... within this many minutes
        "SPRAY_ACCOUNTS": 10,                # accounts failing from one IP ...
        "SPRAY_WINDOW_MINUTES": 60,          # ... within this many minutes
        "SUCCESS_AFTER_FAILURES": 5,         # a success after this many failures in a row ...
        "SUCCESS_AFTER_WINDOW_MINUTES": 60,  # ... all within this many minutes
        "KYC_REVIEWER_GROUP": "KYC reviewers",  # reviewers: role 'admin' or in this group
        "ALLOWED_SUPERUSERS": ["postgres"],  # database superusers that are documented
        "ALLOWED_BYPASSRLS": None,           # None: the owner and developer roles (db_roles)
        "SSL_EXEMPT_LOOPBACK": True,         # plain connections from 127.0.0.1/::1 are fine
        "POSTGRES_LOG": "",                  # server log to read; "" = pg_current_logfile()
        "POSTGRES_LOG_TAIL_MB": 64,          # read at most the last this many MB of it
        "PG_AUTH_FAILURES": 5,               # failed logins per role in the look-back
        "HEALTH_SEVERITY": "warning",        # unresolved findings this severe degrade /health/
    }
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

DEFAULTS = {
    "SINCE": "24h",
    "BRUTE_FORCE_FAILURES": 10,
    "BRUTE_FORCE_WINDOW_MINUTES": 15,
    "SPRAY_ACCOUNTS": 10,
    "SPRAY_WINDOW_MINUTES": 60,
    "SUCCESS_AFTER_FAILURES": 5,
    "SUCCESS_AFTER_WINDOW_MINUTES": 60,
    "KYC_REVIEWER_GROUP": "KYC reviewers",
    "ALLOWED_SUPERUSERS": ["postgres"],
    "ALLOWED_BYPASSRLS": None,
    "SSL_EXEMPT_LOOPBACK": True,
    "POSTGRES_LOG": "",
    "POSTGRES_LOG_TAIL_MB": 64,
    "PG_AUTH_FAILURES": 5,
    "HEALTH_SEVERITY": "warning",
}


def options() -> dict:
    """The defaults overlaid with settings.SECURITY_SCAN; an unknown key is an error."""
    given = getattr(settings, "SECURITY_SCAN", None) or {}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ImproperlyConfigured(
            f"SECURITY_SCAN has unknown key(s) {', '.join(unknown)}; the keys are listed in "
            "security/conf.py."
        )
    return {**DEFAULTS, **given}


SPAN = re.compile(r"^\s*(\d+)\s*([mhdw])\s*$")
UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """'24h', '7d', '30m', '2w', or an ISO date/time (naive = the site's time zone)."""
    now = now or timezone.now()
    match = SPAN.match(text)
    if match:
        return now - timedelta(**{UNITS[match[2]]: int(match[1])})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r} is neither a span (30m, 24h, 7d, 2w) nor an ISO date "
            "(2026-12-01 or 2026-12-01T08:00)"
        ) from None
    if timezone.is_naive(moment):
        moment = timezone.make_aware(moment)
    return moment
