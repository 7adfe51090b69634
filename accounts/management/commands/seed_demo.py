from django.core.management.base import BaseCommand, CommandError

from dbmigration.management.output import describe_rows
from fixtures.demo import DEFAULT_SEED, DEMO_PASSWORD, SeedError, seed_database


class Command(BaseCommand):
    help = (
        "Fill the SQLite database with deterministic, realistic PROP.ie demo data "
        "(users, organisations, memberships, KYC checks, login events), streamed in bulk "
        "in one transaction. The schema must be migrated on that database first."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--users", type=int, required=True, help="How many users to create (any scale)."
        )
        parser.add_argument(
            "--seed",
            type=int,
            default=DEFAULT_SEED,
            help=f"Random seed: the same seed and --users give the same data (default "
            f"{DEFAULT_SEED}).",
        )
        parser.add_argument(
            "--database", default="sqlite", help="SQLite alias to fill (default: sqlite)."
        )
        parser.add_argument(
            "--reset",
            action="store_true",
            help="Delete existing users and everything pointing at them before seeding.",
        )
        parser.add_argument(
            "--batch-users",
            type=int,
            default=10_000,
            help="Users written per batch (memory and progress granularity; default 10000).",
        )

    def handle(self, *args, users, seed, database, reset, batch_users, verbosity, **options):
        def progress(done, total, rows, seconds):
            if verbosity >= 1:
                self.stdout.write(
                    f"  {done:>9,}/{total:,} users  {sum(rows.values()):>11,} rows  "
                    f"{seconds:7.1f}s  ({sum(rows.values()) / max(seconds, 1e-9):,.0f} rows/s)"
                )

        try:
            result = seed_database(
                users=users,
                seed=seed,
                using=database,
                reset=reset,
                batch_users=batch_users,
                progress=progress,
            )
        except SeedError as exc:
            raise CommandError(str(exc)) from exc
        if verbosity >= 1:
            for table, count in result.rows.items():
                self.stdout.write(f"  {table:<28} {count:>11,}")
            self.stdout.write(
                self.style.SUCCESS(
                    f"Seeded {describe_rows(result.rows)} ({result.users:,} users, seed "
                    f"{result.seed}) into '{result.alias}' in {result.seconds:.1f}s. "
                    f"Demo password for every user: {DEMO_PASSWORD}"
                )
            )
