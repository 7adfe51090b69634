import json

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from dbmigration.errors import MigrationError
from security import conf
from security.record import record
from security.scan import posture_from_settings, run_scan


class Command(BaseCommand):
    help = (
        "Look for attacks and weak database posture: brute force, password spraying and "
        "credential stuffing, sign-ins after failures or to inactive accounts (LoginEvent); "
        "users made staff, superuser or admin and KYC approved by a non-reviewer (audit "
        "trail); row-level security, privileged roles, SSL, the app's login, pgaudit and "
        "failed PostgreSQL logins (PostgreSQL only). Records findings (SecurityFinding). "
        "Exit status: 0 clean, 1 warnings, 2 findings."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--since",
            help="Look back this far: 30m, 24h, 7d, 2w or an ISO date/time "
            "(default: SECURITY_SCAN['SINCE'], 24h).",
        )
        parser.add_argument("--json", action="store_true", help="Print one JSON document.")
        parser.add_argument(
            "--no-record", action="store_true", help="Report only; do not record findings."
        )
        parser.add_argument(
            "--database", default="default", help="Alias to scan (default: the active one)."
        )

    def handle(self, *args, **opts):
        try:
            options = conf.options()
            since = conf.parse_since(opts["since"] or options["SINCE"])
        except (ValueError, ImproperlyConfigured) as exc:
            raise CommandError(str(exc), returncode=78) from None
        database = opts["database"]
        try:
            result = run_scan(
                database=database,
                since=since,
                posture=posture_from_settings(database),
                options=options,
            )
        except MigrationError as exc:
            raise CommandError(str(exc), returncode=exc.returncode) from None
        recorded = None if opts["no_record"] else record(
            result.findings, database=database, now=timezone.now()
        )  # fmt: skip
        if opts["json"]:
            document = result.to_dict()
            if recorded:
                document["recorded"] = vars(recorded)
            self.stdout.write(json.dumps(document, indent=2, default=str))
        else:
            self._render(result, recorded, verbosity=opts["verbosity"])
        if result.worst:
            raise CommandError(
                f"{len(result.findings)} security finding(s); see the admin's Threat detection "
                "> Security findings, resolve each when handled",
                returncode=result.worst,
            )

    def _render(self, result, recorded, *, verbosity: int) -> None:
        style = {"warning": self.style.WARNING, "critical": self.style.ERROR}
        self.stdout.write(
            f"Scanned {result.since:%Y-%m-%d %H:%M} to {result.until:%Y-%m-%d %H:%M} UTC"
        )
        for note in result.notes:
            self.stdout.write(f"info: {note}")
        for finding in result.findings:
            self.stdout.write(style[finding.severity](finding.line()))
        if recorded:
            self.stdout.write(
                f"recorded: {recorded.new} new, {recorded.updated} updated, "
                f"{recorded.reopened} reopened"
            )
        if verbosity > 1:
            times = ", ".join(f"{name} {s:.2f} s" for name, s in result.seconds.items())
            self.stdout.write(f"took: {times}")
        if not result.findings:
            self.stdout.write(self.style.SUCCESS("No findings."))
