"""The health system's view of findings (DBMIGRATION['SECURITY'] names unresolved_findings)."""

from __future__ import annotations

from pathlib import Path

from django.db import connections
from django.db.models import Count, Max

from security import conf
from security.models import SecurityFinding
from security.scan.findings import RANK, SEVERITIES


def unresolved_findings(database: str = "default") -> dict:
    """Unresolved findings at or above SECURITY_SCAN['HEALTH_SEVERITY'], counted by severity."""
    settings_dict = connections[database].settings_dict
    if connections[database].vendor == "sqlite" and not Path(settings_dict["NAME"]).exists():
        # Django's SQLite backend would create the missing file on connect
        raise FileNotFoundError(f"the SQLite database {settings_dict['NAME']} does not exist")
    floor = RANK[conf.options()["HEALTH_SEVERITY"]]
    wanted = [severity for severity in SEVERITIES if RANK[severity] >= floor]
    open_ = SecurityFinding.objects.using(database).filter(resolved=False, severity__in=wanted)
    by_severity = dict(
        open_.order_by()
        .values_list("severity")
        .annotate(n=Count("id"))
        .values_list("severity", "n")
    )
    newest = open_.order_by("-last_seen").first()
    return {
        "unresolved": sum(by_severity.values()),
        "by_severity": {s: by_severity[s] for s in reversed(SEVERITIES) if s in by_severity},
        "last_seen": open_.aggregate(at=Max("last_seen"))["at"],
        "newest": str(newest) if newest else None,
    }
