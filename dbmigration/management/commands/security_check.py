from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from dbmigration.errors import MigrationError
from dbmigration.preflight import conninfo_from_settings
from dbmigration.roles import role_names
from dbmigration.security import check_security


class Command(BaseCommand):
    help = (
        "Check row-level security on PostgreSQL: FORCE RLS and a policy on every table with a "
        "user foreign key, no always-true policy, security_invoker views, an app role that "
        "owns nothing. Exit 1 on any finding."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--app-role", help="The application's role (default: app_service with the suffix)."
        )

    def handle(self, *args, **opts):
        app_role = opts["app_role"] or role_names(suffix=settings.DB_ROLE_SUFFIX).app
        try:
            report = check_security(
                conninfo=conninfo_from_settings(settings.DATABASES["postgresql"]),
                app_role=app_role,
            )
        except MigrationError as exc:
            raise CommandError(str(exc), returncode=exc.returncode) from None
        self.stdout.write(f"Tables holding a person's data: {', '.join(report.protected)}")
        for finding in report.findings:
            self.stdout.write(f"  {finding.line()}")
        if not report.ok:
            raise CommandError(
                f"{len(report.findings)} security finding(s). Fix each as its line says.",
                returncode=1,
            )
        self.stdout.write(self.style.SUCCESS("Row-level security is in force."))
