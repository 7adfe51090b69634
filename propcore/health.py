"""/health/: one database check per alias, plus dbmigration.health's checks, readable.

django-health-check 4.x answers 500 when any check raises; ``HealthView`` answers 200
when the only problems are warnings (degraded: an old backup, a slow query burst), so a
load balancer does not pull a working application out of rotation.  Down checks still
answer 500.

Each check has a stable ``key`` (``active_backend``, ``database_sqlite``) and a readable
``label`` ("Active backend"); its message, details and timing are values, never part of
the key, so ``?format=json`` reads the same from one request to the next::

    {"status": "degraded",
     "checks": {"backup_age": {"label": "Backup age", "status": "degraded",
                               "message": "...", "details": {...}, "seconds": 0.0012}, ...}}
"""

import asyncio
import dataclasses
import json
import logging
import sqlite3
from pathlib import Path

from django.conf import settings
from django.db import connections
from django.http import HttpResponse, JsonResponse
from health_check import checks
from health_check.base import HealthCheck
from health_check.exceptions import HealthCheckException, ServiceUnavailable, ServiceWarning
from health_check.views import HealthCheckView, MediaType

from dbmigration import health

# names that read better than the check's own (the rest: "backup_age" -> "Backup age")
LABELS = {"pool": "Connection pool", "process_backend": "This process's backend"}


def label_for(key: str) -> str:
    """The readable name of a check key."""
    return LABELS.get(key) or key.replace("_", " ").capitalize()


class _ExpectedFailureOneLine(logging.Filter):
    """A check that reports degraded or down is an answer, not a crash: log one line.

    django-health-check logs every raised HealthCheckException with its traceback; ours
    are raised on purpose with a message that says it all (a monitor polling a degraded
    system would otherwise fill the log with tracebacks, from the first request on).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HealthCheckException):
            record.msg = f"{record.msg}: %s"
            record.args = (*(record.args or ()), error)
            record.exc_info = record.exc_text = None
        return True


logging.getLogger("health_check").addFilter(_ExpectedFailureOneLine())


@dataclasses.dataclass(repr=False)
class Database(checks.Database):
    """SELECT 1 on an alias, after this thread picked up a changed active backend."""

    observes_process = False  # a probe: runs in the first round

    @property
    def key(self) -> str:
        return f"database_{self.alias}"

    @property
    def label(self) -> str:
        return f"Database {self.alias}"

    @property
    def message(self) -> str:
        return "answers SELECT 1"

    @property
    def details(self) -> dict:
        return {"alias": self.alias, "engine": settings.DATABASES[self.alias]["ENGINE"]}

    def __repr__(self) -> str:  # the library's text, feeds and logs name checks by repr
        return self.label

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


@dataclasses.dataclass(repr=False)
class Migration(HealthCheck):
    """One check of dbmigration.health; its result shows on the page once it has run."""

    check: str = "process_backend"
    result: health.CheckResult | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def observes_process(self) -> bool:
        # the pool check reads this process's pools, which the database probes open: run it
        # after them, or the first request sees their own warm-up as requests waiting
        return self.check in ("pool", "slow_queries")

    @property
    def key(self) -> str:
        return self.check

    @property
    def label(self) -> str:
        return label_for(self.check)

    @property
    def message(self) -> str:
        return self.result.message if self.result else ""

    @property
    def details(self) -> dict:
        return self.result.details if self.result else {}

    def __repr__(self) -> str:
        return self.label

    def run(self):
        self.result = health.run_check(self.check)
        if self.result.status == health.DOWN:
            raise ServiceUnavailable(self.result.message)
        if self.result.status == health.DEGRADED:
            raise ServiceWarning(self.result.message)


FORMATS = ("json", "text", "atom", "rss", "openmetrics", "html")


def health_checks(aliases, replica_aliases) -> list:
    """The page's checks: each database alias but the read replicas, then the engine's.

    A replica that is down is out of rotation (a warning in read_replicas), not a reason
    for a load balancer to pull the application.
    """
    return [
        (Database, {"alias": alias}) for alias in aliases if alias not in set(replica_aliases)
    ] + [(Migration, {"check": name}) for name in health.CHECKS]


HEALTH_CHECKS = health_checks(
    settings.DATABASES, getattr(settings, "REPLICA_ROUTING", {}).get("ALIASES", [])
)


def status_of(error: HealthCheckException | None) -> str:
    """ok, degraded or down: the words db_health_check uses."""
    if error is None:
        return health.OK
    return health.DEGRADED if isinstance(error, ServiceWarning) else health.DOWN


def describe(result) -> dict:
    """One check's result as plain values (what the JSON and the page show)."""
    check, error = result.check, result.error
    return {
        "label": check.label,
        "status": status_of(error),
        "message": error.message if error is not None else check.message,
        "details": check.details,
        "seconds": round(result.time_taken, 4),
    }


class HealthView(HealthCheckView):
    """/health/: 500 only when something is down; degraded checks show but answer 200."""

    checks = HEALTH_CHECKS
    template_name = "propcore/health.html"
    media_types = {
        "text/plain": "text",
        "text/html": "html",
        "application/xhtml+xml": "html",
        "text/*": "html",
        "*/*": "html",
        "application/json": "json",
        "application/*": "json",
        "application/atom+xml": "atom",
        "application/rss+xml": "rss",
        "application/openmetrics-text": "openmetrics",
    }

    async def get(self, request, *args, **kwargs):
        every = list(self.get_checks())
        probes = [c for c in every if not c.observes_process]
        with self.get_executor() as executor:
            done = await asyncio.gather(*(c.get_result(executor) for c in probes))
            done += await asyncio.gather(
                *(c.get_result(executor) for c in every if c.observes_process)
            )
        by_check = {id(r.check): r for r in done}
        self.results = [by_check[id(c)] for c in every]
        self.overall = max(
            (status_of(r.error) for r in self.results),
            key=health.SEVERITY.__getitem__,
            default=health.OK,
        )
        status_code = 500 if self.overall == health.DOWN else 200
        wanted = request.GET.get("format")
        if wanted not in FORMATS:
            wanted = self._negotiate(request)
        match wanted:
            case "json":
                return self.render_to_response_json(status_code)
            case "text":
                return self.render_to_response_text(status_code)
            case "atom":  # feeds and metrics answer 200 whatever the checks say (library's rule)
                return self.render_to_response_atom()
            case "rss":
                return self.render_to_response_rss()
            case "openmetrics":
                return self.render_to_response_openmetrics()
            case "html":
                return self.render_to_response(self.get_context_data(**kwargs), status=status_code)
        return HttpResponse(
            "Not Acceptable: use ?format=json, text, atom, rss or openmetrics, or "
            "Accept: text/html.",
            status=406,
            content_type="text/plain",
        )

    def _negotiate(self, request) -> str | None:
        for media in MediaType.parse_header(request.headers.get("accept", "*/*")):
            if media.mime_type in self.media_types:
                return self.media_types[media.mime_type]
        return None

    def get_context_data(self, **kwargs):
        rows = [describe(r) for r in self.results]
        for row in rows:  # nested values as JSON, never as a Python repr
            row["details"] = {
                name: json.dumps(value, default=str) if isinstance(value, dict | list) else value
                for name, value in row["details"].items()
            }
        return {**super().get_context_data(**kwargs), "overall": self.overall, "rows": rows}

    def render_to_response_json(self, status):
        return JsonResponse(
            {"status": self.overall, "checks": {r.check.key: describe(r) for r in self.results}},
            status=status,
            json_dumps_params={"indent": 2},
        )

    def render_to_response_text(self, status):
        lines = [f"status: {self.overall}"] + [
            f"{row['label']}: {row['status']} - {row['message']} ({row['seconds'] * 1000:.1f} ms)"
            for row in map(describe, self.results)
        ]
        return HttpResponse(
            "\n".join(lines) + "\n", content_type="text/plain; charset=utf-8", status=status
        )
