"""Django system checks: SECURITY_SCAN is valid before any scan or health check reads it."""

from __future__ import annotations

from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from security import conf
from security.scan.findings import SEVERITIES

COUNTS = [key for key, value in conf.DEFAULTS.items() if isinstance(value, int) and value > 1]


@checks.register(checks.Tags.security)
def check_security_scan_settings(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    try:
        options = conf.options()
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="security.E001")]
    errors = [
        checks.Error(
            f"SECURITY_SCAN['{key}'] = {options[key]!r} must be a whole number of at least 1.",
            hint=f"The default is {conf.DEFAULTS[key]} (security/conf.py).",
            id="security.E002",
        )
        for key in COUNTS
        if not (isinstance(options[key], int) and not isinstance(options[key], bool))
        or options[key] < 1
    ]
    if options["HEALTH_SEVERITY"] not in SEVERITIES:
        errors.append(
            checks.Error(
                f"SECURITY_SCAN['HEALTH_SEVERITY'] = {options['HEALTH_SEVERITY']!r} is not one "
                f"of {', '.join(SEVERITIES)}.",
                id="security.E003",
            )
        )
    try:
        conf.parse_since(options["SINCE"])
    except ValueError as exc:
        errors.append(checks.Error(f"SECURITY_SCAN['SINCE']: {exc}", id="security.E004"))
    return errors
