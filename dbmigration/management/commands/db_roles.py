import getpass
import os
import sys

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from dbmigration.errors import MigrationError
from dbmigration.preflight import conninfo_from_settings, conninfo_from_url
from dbmigration.roles import role_names, role_specs, sync_roles


def password_variable(kind: str) -> str:
    return f"PROPCORE_{kind.upper()}_DB_PASSWORD"


class Command(BaseCommand):
    help = (
        "Create or update the database roles (owner, app, admin, developer, analytics, "
        "auditor), the owner of every object and every grant. --plan prints the SQL, --check "
        "reports drift."
    )

    def add_arguments(self, parser):
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--plan", action="store_true", help="Print the SQL; change nothing.")
        mode.add_argument(
            "--check", action="store_true", help="Report drift; exit 1 when there is any."
        )
        parser.add_argument(
            "--no-password",
            action="store_true",
            help="Set no password (certificate or peer authentication); never prompt.",
        )
        parser.add_argument(
            "--owner-login", action="store_true", help="Let the owner role log in itself."
        )

    def handle(self, *args, **opts):
        names = role_names(suffix=settings.DB_ROLE_SUFFIX)
        passwords = {} if opts["plan"] or opts["check"] else self._passwords(opts)
        try:
            result = sync_roles(
                conninfo=conninfo_from_url(settings.POSTGRES_ADMIN_URL)
                if settings.POSTGRES_ADMIN_URL
                else conninfo_from_settings(settings.DATABASES["postgresql"]),
                names=names,
                passwords=passwords,
                owner_login=opts["owner_login"] or None,
                apply=not (opts["plan"] or opts["check"]),
            )
        except MigrationError as exc:
            raise CommandError(str(exc), returncode=exc.returncode) from None
        if opts["plan"]:
            for change in result.changes:
                self.stdout.write(f"{change.sql};")
            return
        for change in result.changes:
            self.stdout.write(f"  {change.what}")
        if opts["check"] and result.drift:
            raise CommandError(
                f"{len(result.changes)} difference(s) from the desired roles and grants. "
                "Fix: run manage.py db_roles.",
                returncode=1,
            )
        done = "changed" if result.applied else "nothing to change"
        self.stdout.write(self.style.SUCCESS(f"Roles {', '.join(names.all())}: {done}."))

    def _passwords(self, opts) -> dict[str, str]:
        """Passwords of the login roles: the environment, else a prompt (never arguments)."""
        if opts["no_password"]:
            return {}
        specs = role_specs(owner_login=opts["owner_login"] or None)
        kinds = [kind for kind, spec in specs.items() if spec.login]
        passwords = {
            k: os.environ[password_variable(k)]
            for k in kinds
            if os.environ.get(password_variable(k))
        }
        for kind in kinds:
            if kind in passwords:
                continue
            if not sys.stdin.isatty():
                raise CommandError(
                    f"No password for the {kind} role. Fix: set {password_variable(kind)} "
                    "or pass --no-password.",
                    returncode=3,
                )
            passwords[kind] = getpass.getpass(f"Password for the {kind} role: ")
        return passwords
