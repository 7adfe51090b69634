import os

from django.core.management.base import BaseCommand, CommandError

from dbmigration import backup, conf
from dbmigration.errors import MigrationError
from dbmigration.preflight import code_migrations


class Command(BaseCommand):
    help = (
        "Restore the SQLite database from a verified backup: checksums are verified first, the "
        "current database is kept as a backup of its own, and a backup whose migrations do not "
        "match the code is refused."
    )

    def add_arguments(self, parser):
        parser.add_argument("backup", help="Backup directory, or its name under --backup-dir.")
        parser.add_argument("--backup-dir", help="Where backups live (default: database/backups).")
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Only verify the backup (checksums, migrations) and say what would happen.",
        )
        parser.add_argument(
            "--lock-timeout",
            type=float,
            default=20.0,
            help="Seconds to wait for other SQLite connections to let go.",
        )

    def handle(self, *args, **opts):
        progress = self.stdout.write if opts["verbosity"] > 1 else None
        try:
            result = backup.restore_sqlite_backup(
                backup=opts["backup"],
                sqlite_path=conf.sqlite_path(),
                backup_dir=opts["backup_dir"] or conf.backup_dir(),
                code_migrations=code_migrations(),
                encrypt_key=os.environ.get(backup.KEY_ENV),
                lock_timeout=opts["lock_timeout"],
                dry_run=opts["dry_run"],
                progress=progress,
            )
        except MigrationError as exc:
            raise CommandError(str(exc), returncode=exc.returncode) from exc
        if result.dry_run:
            self.stdout.write(
                f"Backup {result.restored_from} verified; would keep the current database as a "
                f"backup and restore {sum(result.row_counts.values())} rows into {result.target}."
            )
            return
        if result.safety_backup:
            self.stdout.write(f"Previous database kept as backup {result.safety_backup.path}")
        if result.raw_copy:
            self.stdout.write(
                self.style.WARNING(f"Current database was damaged; raw copy in {result.raw_copy}")
            )
        self.stdout.write(
            self.style.SUCCESS(
                f"Restored {result.target} from {result.restored_from} "
                f"({sum(result.row_counts.values())} rows verified, {result.seconds:.2f}s)"
            )
        )
