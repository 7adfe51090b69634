from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

from dbmigration.errors import PhaseError, TargetError
from dbmigration.management.runbook import add_database, engine_errors
from dbmigration.preflight import connect, conninfo_from_settings

VIEW = "accounts_daily_analytics"


class Command(BaseCommand):
    help = (
        "Refresh the dashboard analytics materialized view (PostgreSQL only). "
        "Uses REFRESH ... CONCURRENTLY so dashboards keep reading while it runs."
    )

    def add_arguments(self, parser):
        add_database(
            parser,
            default=DEFAULT_DB_ALIAS,
            help="The alias to refresh ('default' follows the active backend)",
        )
        parser.add_argument(
            "--blocking",
            action="store_true",
            help="Plain REFRESH (locks readers out). A view never filled gets one anyway: "
            "CONCURRENTLY needs a filled view.",
        )

    def handle(self, *args, database, blocking, **options):
        connection = connections[database]
        if connection.vendor != "postgresql":
            self.stdout.write(
                f"'{database}' is {connection.vendor}: no materialized view to refresh."
            )
            return
        # reachable? one line (exit 3) rather than the connection pool's retries
        with engine_errors():
            connect(conninfo_from_settings(connection.settings_dict)).close()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT ispopulated FROM pg_matviews WHERE matviewname = %s", [VIEW])
                row = cursor.fetchone()
                if row is None:
                    raise CommandError(
                        f"'{database}' has no {VIEW}: its schema is not migrated. Run: manage.py "
                        f"migrate --database {database} (or migration_prepare), then "
                        "refresh_analytics.",
                        returncode=PhaseError.returncode,
                    )
                concurrently = row[0] and not blocking
                mode = " CONCURRENTLY" if concurrently else ""
                cursor.execute(f"REFRESH MATERIALIZED VIEW{mode} {VIEW}")
        except DatabaseError as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CommandError(
                f"PostgreSQL ('{database}') refused to refresh {VIEW}: {why}.",
                returncode=TargetError.returncode,
            ) from exc
        how = (
            ""
            if concurrently
            else " (plain REFRESH: "
            + ("--blocking)" if blocking else "the view had never been filled)")
        )
        self.stdout.write(self.style.SUCCESS(f"Refreshed {VIEW} on '{database}'{how}."))
