from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from dbmigration.errors import NotConfirmed, TargetError
from dbmigration.management.runbook import add_noinput, confirm_by_typing, precious_reason
from propcore.pgserver import database_name, drop_database, ensure_database, redact_url


class Command(BaseCommand):
    help = (
        "Show which PostgreSQL server propcore uses (POSTGRES_URL, else 127.0.0.1:5432, else a "
        "private cluster under var/) and create the target database if it does not exist."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--recreate",
            action="store_true",
            help="Drop the target database first (for demos and benchmarks; loses its data). "
            "Refused once it holds the migrated data or is live, unless --drop-live-database.",
        )
        parser.add_argument(
            "--drop-live-database",
            action="store_true",
            help="With --recreate: allow dropping the migrated or live database, after you type "
            "its name (never with --noinput).",
        )
        add_noinput(parser, help="Never prompt; a drop that needs a typed confirmation is refused.")

    def handle(self, *args, recreate, drop_live_database, interactive, **options):
        url = settings.POSTGRES_URL
        if recreate:
            self._confirm_drop(url, allowed=drop_live_database, interactive=interactive)
        try:
            if recreate:
                drop_database(url)
            created = ensure_database(url)
        except Exception as exc:  # psycopg's errors: say which server, never the password
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CommandError(
                f"PostgreSQL at {redact_url(url)} is not usable: {first_line}",
                returncode=TargetError.returncode,
            ) from exc
        verb = "recreated" if recreate else "created" if created else "exists"
        self.stdout.write(f"PostgreSQL: {redact_url(url)} (database {verb})")

    def _confirm_drop(self, url: str, *, allowed: bool, interactive: bool) -> None:
        """Refuse to drop a database that holds the migration's data, unless typed out."""
        reason = precious_reason(settings.STATE_FILE, "postgresql")
        if reason is None:
            return
        name = database_name(url)
        if not allowed:
            raise CommandError(
                f"Refusing to drop database '{name}': {reason}. If losing it is intended, run "
                "ensure_postgres --recreate --drop-live-database and type its name.",
                returncode=NotConfirmed.returncode,
            )
        confirm_by_typing(
            self.stdout,
            name=name,
            kind="database name",
            refusing=f"Refusing to drop database '{name}'",
            reason=reason,
            interactive=interactive,
            warning=f"This DROPS database '{name}' at {redact_url(url)} and creates it empty: "
            f"{reason}.\nNothing is backed up first (db_backup --backend postgresql does that).",
            to="drop it",
            cancelled="nothing was dropped.",
        )
