"""The checks behind /health/: one database check per alias, plus dbmigration.health's checks.

django-health-check 4.x answers 500 when any check raises; ``HealthView`` answers 200
when the only problems are warnings (degraded: an old backup, a slow query burst), so a
load balancer does not pull a working application out of rotation.  Down checks still
answer 500.
"""

import dataclasses
import sqlite3
from pathlib import Path

from django.conf import settings
from django.db import connections
from health_check import checks
from health_check.base import HealthCheck
from health_check.exceptions import ServiceUnavailable, ServiceWarning
from health_check.views import HealthCheckView

from dbmigration import health


@dataclasses.dataclass
class Database(checks.Database):
    """SELECT 1 on an alias, after this thread picked up a changed active backend."""

    def run(self):
        from propcore.middleware import watcher

        watcher.refresh_thread()  # checks run in executor threads that see no request
        config = connections.settings[self.alias]
        if config["ENGINE"].endswith("sqlite3"):
            # Django's SQLite backend creates a missing file on connect: probe read-only
            return self._probe_sqlite(
                Path(config["NAME"]), active=self.alias in {"default", watcher.backend}
            )
        return super().run()

    def _probe_sqlite(self, path: Path, *, active: bool) -> None:
        from dbmigration.errors import SourceError
        from dbmigration.sqlite_source import open_readonly

        try:
            conn = open_readonly(path, timeout=3)
            try:
                conn.execute("SELECT 1").fetchone()
            finally:
                conn.close()
        except (SourceError, sqlite3.Error) as exc:
            # only the backend in use takes the site down; a missing spare is a warning
            raise (ServiceUnavailable if active else ServiceWarning)(str(exc)) from exc


@dataclasses.dataclass
class Migration(HealthCheck):
    """One check of dbmigration.health; its detail shows on the page once it has run."""

    check: str = "process_backend"
    detail: str = dataclasses.field(default="", init=False)

    def run(self):
        result = health.run_check(self.check)
        self.detail = result.message
        if result.status == health.DOWN:
            raise ServiceUnavailable(result.message)
        if result.status == health.DEGRADED:
            raise ServiceWarning(result.message)


HEALTH_CHECKS = [(Database, {"alias": alias}) for alias in settings.DATABASES] + [
    (Migration, {"check": name}) for name in health.CHECKS
]


class HealthView(HealthCheckView):
    """/health/: 500 only when something is down; degraded checks show but answer 200."""

    checks = HEALTH_CHECKS

    async def get(self, request, *args, **kwargs):
        response = await super().get(request, *args, **kwargs)
        only_warnings = all(
            result.error is None or isinstance(result.error, ServiceWarning)
            for result in self.results
        )
        if response.status_code == 500 and only_warnings:
            response.status_code = 200
        return response
