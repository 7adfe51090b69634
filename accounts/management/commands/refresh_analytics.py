from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, connections

VIEW = "accounts_daily_analytics"


class Command(BaseCommand):
    help = (
        "Refresh the dashboard analytics materialized view (PostgreSQL only). "
        "Uses REFRESH ... CONCURRENTLY so dashboards keep reading while it runs."
    )

    def add_arguments(self, parser):
        parser.add_argument("--database", default=DEFAULT_DB_ALIAS, help="Alias to refresh.")
        parser.add_argument(
            "--blocking",
            action="store_true",
            help="Plain REFRESH (locks readers out); needed once if the view was never filled.",
        )

    def handle(self, *args, database, blocking, **options):
        connection = connections[database]
        if connection.vendor != "postgresql":
            self.stdout.write(
                f"'{database}' is {connection.vendor}: no materialized view to refresh."
            )
            return
        mode = "" if blocking else " CONCURRENTLY"
        try:
            with connection.cursor() as cursor:
                cursor.execute(f"REFRESH MATERIALIZED VIEW{mode} {VIEW}")
        except Exception as exc:
            raise CommandError(f"Could not refresh {VIEW} on '{database}': {exc}") from exc
        self.stdout.write(self.style.SUCCESS(f"Refreshed {VIEW} on '{database}'."))
