from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import OperationalError, connections

from dbmigration import conf
from dbmigration.errors import PhaseError, SourceError
from dbmigration.management.output import describe_rows
from dbmigration.management.runbook import add_database
from dbmigration.sqlite_source import open_readonly, row_counts
from dbmigration.state import StateError, read_state
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
            help="Random seed: the same seed and --users give the same data "
            "(default: %(default)s).",
        )
        add_database(parser, default="sqlite", help="The SQLite alias to fill")
        parser.add_argument(
            "--reset",
            action="store_true",
            help="Delete existing users and everything pointing at them before seeding.",
        )
        parser.add_argument(
            "--batch-users",
            type=int,
            default=10_000,
            help="Users written per batch (memory and progress granularity; default: %(default)s).",
        )

    def handle(self, *args, users, seed, database, reset, batch_users, verbosity, **options):
        def progress(done, total, rows, seconds):
            if verbosity >= 1:
                self.stdout.write(
                    f"  {done:>9,}/{total:,} users  {sum(rows.values()):>11,} rows  "
                    f"{seconds:7.1f}s  ({sum(rows.values()) / max(seconds, 1e-9):,.0f} rows/s)"
                )

        refusal = _after_the_switch(database)
        if refusal:
            raise CommandError(refusal, returncode=PhaseError.returncode)
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
            raise CommandError(str(exc), returncode=exc.returncode) from exc
        except OperationalError as exc:  # locked by a writer, disk full, read-only file
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CommandError(
                f"SQLite ('{database}') refused the demo data: {why}. Nothing was written; "
                "fix that and run seed_demo again.",
                returncode=SourceError.returncode,
            ) from exc
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
            # the whole file, counted as db_backup and migration_prepare count it
            conn = open_readonly(Path(connections[database].settings_dict["NAME"]))
            try:
                holds = describe_rows(row_counts(conn))
            finally:
                conn.close()
            self.stdout.write(f"'{result.alias}' now holds {holds}.")


def _after_the_switch(alias: str) -> str | None:
    """Why SQLite takes no demo data now: after the switch it is fenced, kept for rollback."""
    if connections[alias].vendor != "sqlite":
        return None  # seed_database names the problem
    try:
        active = read_state(conf.state_file()).active_backend
    except StateError:
        return None  # settings already refused an unreadable state file
    if active != "postgresql":
        return None
    return (
        "The application runs on PostgreSQL since the switch; SQLite is fenced and kept "
        "only for rollback_to_sqlite. Seed before migration_prepare, or run "
        "rollback_to_sqlite first."
    )
