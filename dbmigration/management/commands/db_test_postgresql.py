import contextlib

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from dbmigration import conf
from dbmigration.errors import ConfigError, TargetError
from dbmigration.pgaudit import pgaudit_check
from dbmigration.pgurl import BadPostgresUrl, check_postgres_url
from dbmigration.preflight import check_postgresql, conninfo_from_settings, conninfo_from_url
from dbmigration.roles import role_names
from dbmigration.security import app_role_check


class Command(BaseCommand):
    help = (
        "Check the PostgreSQL target: version, latency, SSL, UTF8 encoding, privileges, "
        "extensions, max_connections against the pool, the app role, pgaudit (a warning). "
        "Exit 0 only when all are fine."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--url",
            help="Test this postgres:// URL instead of the 'postgresql' alias (never printed "
            "with its password).",
        )
        parser.add_argument(
            "--pool-max",
            type=int,
            help="Pool size to check max_connections against (default: the profile's).",
        )
        parser.add_argument(
            "--workers",
            type=int,
            help="Application processes sharing the server, each with its own pool (default: "
            "DBMIGRATION['WORKERS'], propcore: WEB_CONCURRENCY).",
        )

    def handle(self, *args, **opts):
        if opts["url"]:
            try:
                check_postgres_url(opts["url"], name="--url")
            except BadPostgresUrl as exc:
                raise CommandError(str(exc), returncode=ConfigError.returncode) from None
        app_conninfo = (
            conninfo_from_url(opts["url"])
            if opts["url"]
            else conninfo_from_settings(settings.DATABASES["postgresql"])
        )
        # privileges to create the schema are the owner's, where migrations run
        owner_url = getattr(settings, "POSTGRES_OWNER_URL", "")
        conninfo = conninfo_from_url(owner_url) if owner_url and not opts["url"] else app_conninfo
        report = check_postgresql(
            conninfo=conninfo,
            pool_max=opts["pool_max"] or conf.pool_max(),
            workers=opts["workers"] or conf.workers(),
            pgbouncer_pool=conf.pgbouncer_pool(),
        )
        if report.ok:
            # in prod the application must not be able to bypass row-level security
            profile = getattr(getattr(settings, "PROFILE", None), "name", "")
            with contextlib.suppress(TargetError):  # no database yet: nothing to own
                role = app_role_check(conninfo=app_conninfo, strict=profile == "prod")
                report.checks.append(role)
            with contextlib.suppress(TargetError):
                auditor = role_names(suffix=getattr(settings, "DB_ROLE_SUFFIX", "")).auditor
                report.checks.append(pgaudit_check(conninfo=conninfo, auditor_role=auditor))
        self.stdout.write(f"PostgreSQL target {report.target}")
        for check in report.checks:
            style = self.style.SUCCESS if check.ok and not check.warning else self.style.WARNING
            self.stdout.write(style(f"  {check.line()}") if check.ok else f"  {check.line()}")
        if not report.ok:
            raise CommandError(
                f"{len(report.failed)} check(s) failed: "
                + "; ".join(c.name for c in report.failed),
                returncode=TargetError.returncode,
            )
        self.stdout.write(self.style.SUCCESS("All checks passed."))
