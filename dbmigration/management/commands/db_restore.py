import os

from django.core.management.base import BaseCommand, CommandError

from dbmigration import backup, conf
from dbmigration.errors import NotConfirmed, PhaseError
from dbmigration.management.runbook import add_lock_timeout, add_noinput, engine_errors
from dbmigration.preflight import code_migrations
from dbmigration.reports import command_run
from dbmigration.state import StateError, read_state, why_precious


class Command(BaseCommand):
    help = (
        "Restore the SQLite database from a verified backup: checksums are verified first, the "
        "current database is kept as a backup of its own, and a backup whose migrations do not "
        "match the code is refused. Replacing the file the application runs on needs "
        "--replace-live-database and its file name typed at the prompt."
    )

    def add_arguments(self, parser):
        parser.add_argument("backup", help="Backup directory, or its name under --backup-dir.")
        parser.add_argument("--backup-dir", help="Where backups live (default: database/backups).")
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Only verify the backup (checksums, migrations) and say what would happen.",
        )
        add_lock_timeout(parser, default=20.0, waits_for="other SQLite connections to let go")
        parser.add_argument(
            "--replace-live-database",
            action="store_true",
            help="Allow replacing the SQLite file the application runs on (writes since the "
            "backup are lost), after you type its file name; never with --noinput.",
        )
        add_noinput(parser, help="Never prompt; replacing the live database is then refused.")

    def handle(self, *args, **opts):
        progress = self.stdout.write if opts["verbosity"] > 1 else None
        restore = dict(
            backup=opts["backup"],
            sqlite_path=conf.sqlite_path(),
            backup_dir=opts["backup_dir"] or conf.backup_dir(),
            code_migrations=code_migrations(),
            encrypt_key=os.environ.get(backup.KEY_ENV),
            lock_timeout=opts["lock_timeout"],
            progress=progress,
        )
        with engine_errors():
            # verified first: never ask to confirm a restore that would fail anyway
            checked = backup.restore_sqlite_backup(**restore, dry_run=True)
            if opts["dry_run"]:
                result = checked
            else:
                self._confirm_replace(checked, opts)
                with command_run(
                    "db_restore", report_dir=conf.report_dir(), log_dir=conf.log_dir()
                ) as run:
                    with run.step("restore_sqlite") as step:
                        result = backup.restore_sqlite_backup(**restore)
                    step.details = {
                        "restored_from": str(result.restored_from),
                        "target": str(result.target),
                        "safety_backup": str(result.safety_backup.path)
                        if result.safety_backup
                        else None,
                        "tables": {t: {"rows": n} for t, n in result.row_counts.items()},
                    }
        if result.dry_run:
            self.stdout.write(
                f"Backup {result.restored_from} verified; would keep the current database as a "
                f"backup and restore {sum(result.row_counts.values()):,} rows into {result.target}."
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
                f"({sum(result.row_counts.values()):,} rows verified, {result.seconds:.2f}s)"
            )
        )

    def _confirm_replace(self, checked, opts) -> None:
        """Refuse to replace the SQLite file the application runs on, unless typed out."""
        try:
            reason = why_precious(read_state(conf.state_file()), "sqlite")
        except StateError as exc:
            raise CommandError(str(exc), returncode=PhaseError.returncode) from exc
        live = conf.sqlite_path()
        if reason is None or not live.exists():
            return  # nothing the application still writes would be lost
        if not opts["replace_live_database"]:
            raise CommandError(
                f"Refusing to replace {live}: {reason}. If that is intended, run db_restore "
                f"{opts['backup']} --replace-live-database and type its file name.",
                returncode=NotConfirmed.returncode,
            )
        if not opts["interactive"]:
            raise CommandError(
                f"Refusing to replace {live} under --noinput: {reason}. Run the command at a "
                "terminal and type the file name to confirm.",
                returncode=NotConfirmed.returncode,
            )
        rows = sum(checked.row_counts.values())
        self.stdout.write(
            f"Backup {checked.restored_from.name} verified ({rows} rows). This REPLACES "
            f"{live}: {reason}.\nThe current file is kept as a backup first."
        )
        if input(f"    Type the file name '{live.name}' to continue: ") != live.name:
            raise CommandError(
                "Cancelled: nothing was restored.", returncode=NotConfirmed.returncode
            )
