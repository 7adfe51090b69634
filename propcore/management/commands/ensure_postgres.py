from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from propcore.pgserver import drop_database, ensure_database, redact_url


class Command(BaseCommand):
    help = (
        "Show which PostgreSQL server propcore uses (POSTGRES_URL, else 127.0.0.1:5432, else a "
        "private cluster under var/) and create the target database if it does not exist."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--recreate",
            action="store_true",
            help="Drop the target database first (for demos and benchmarks; loses its data).",
        )

    def handle(self, *args, recreate, **options):
        url = settings.POSTGRES_URL
        try:
            if recreate:
                drop_database(url)
            created = ensure_database(url)
        except Exception as exc:
            raise CommandError(f"PostgreSQL at {redact_url(url)} is not usable: {exc}") from exc
        verb = "created" if created else "exists"
        self.stdout.write(f"PostgreSQL: {redact_url(url)} (database {verb})")
