import dataclasses
import json

from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from dbmigration.management.runbook import add_database
from propcore import query_stats


class Command(BaseCommand):
    help = (
        "List the statements that cost PostgreSQL the most (pg_stat_statements), with the "
        "Django view that ran them. Needs shared_preload_libraries = 'pg_stat_statements'."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--limit", type=int, default=10, help="How many (default: %(default)s)."
        )
        parser.add_argument(
            "--order",
            choices=list(query_stats.ORDERS),
            default="total",
            help="Sort key (default: %(default)s).",
        )
        parser.add_argument("--json", action="store_true", help="Print one JSON document.")
        parser.add_argument("--reset", action="store_true", help="Reset the counters after.")
        add_database(parser, default="postgresql", help="The PostgreSQL alias to read")

    def handle(self, *args, **options):
        settings_dict = connections.settings[options["database"]]
        try:
            stats = query_stats.top_queries(
                settings_dict, limit=options["limit"], order=options["order"]
            )
            if options["reset"]:
                query_stats.reset(settings_dict)
        except query_stats.StatementsUnavailable as exc:
            raise CommandError(str(exc), returncode=exc.returncode) from None
        if options["json"]:
            self.stdout.write(json.dumps([dataclasses.asdict(s) for s in stats], indent=2))
            return
        self.stdout.write(
            f"{'total ms':>12} {'mean ms':>10} {'calls':>8} {'rows':>8}  view / query"
        )
        for s in stats:
            query = " ".join(s.query.split())[:100]
            self.stdout.write(
                f"{s.total_ms:>12.1f} {s.mean_ms:>10.3f} {s.calls:>8} {s.rows:>8}  "
                f"{s.view or '-'}\n{'':>42}{query}"
            )
