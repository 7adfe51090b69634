import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from dbmigration import backup, conf, pitr
from dbmigration.errors import MigrationError, NotConfirmed, RestoreTargetError
from dbmigration.management.runbook import (
    add_lock_timeout,
    add_noinput,
    confirm_by_typing,
    engine_errors,
    precious_reason,
)
from dbmigration.preflight import code_migrations
from dbmigration.reports import command_run


class Command(BaseCommand):
    help = (
        "Restore the SQLite database from a verified backup: checksums are verified first, the "
        "current database is kept as a backup of its own, and a backup whose migrations do not "
        "match the code is refused. Replacing the file the application runs on needs "
        "--replace-live-database and its file name typed at the prompt. On PostgreSQL with "
        "pgBackRest: --to-time T restores the database as of T into a new database beside the "
        "live one (--target-db), or replaces the live one (--replace-live-database and its name "
        "typed at the prompt)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "backup", nargs="?", help="Backup directory, or its name under --backup-dir."
        )
        parser.add_argument(
            "--to-time",
            help='PostgreSQL (pgBackRest): restore as of this time, e.g. "2026-12-01 10:31:00+00" '
            "(a time zone is required).",
        )
        parser.add_argument(
            "--target-db",
            help="With --to-time: the new database to restore into, beside the live one "
            "(default: <live>_at_<time>).",
        )
        parser.add_argument(
            "--scratch-dir",
            help="With --to-time: where the scratch cluster is restored first (default: a new "
            "temporary directory; removed afterwards).",
        )
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
            "backup are lost), after you type its file name; with --to-time, the live "
            "PostgreSQL database (kept renamed), after you type its name. Never with --noinput.",
        )
        add_noinput(parser, help="Never prompt; replacing the live database is then refused.")

    def handle(self, *args, **opts):
        if opts["to_time"]:
            return self._restore_to_time(opts)
        if opts["target_db"] or opts["scratch_dir"]:
            raise CommandError("--target-db and --scratch-dir go with --to-time", returncode=2)
        if not opts["backup"]:
            raise CommandError(
                "name a backup (db_backup --list), or give --to-time on PostgreSQL", returncode=2
            )
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
        reason = precious_reason(conf.state_file(), "sqlite")
        live = conf.sqlite_path()
        if reason is None or not live.exists():
            return  # nothing the application still writes would be lost
        if not opts["replace_live_database"]:
            raise CommandError(
                f"Refusing to replace {live}: {reason}. If that is intended, run db_restore "
                f"{opts['backup']} --replace-live-database and type its file name.",
                returncode=NotConfirmed.returncode,
            )
        rows = sum(checked.row_counts.values())
        confirm_by_typing(
            self.stdout,
            name=live.name,
            kind="file name",
            refusing=f"Refusing to replace {live}",
            reason=reason,
            interactive=opts["interactive"],
            warning=f"Backup {checked.restored_from.name} verified ({rows} rows). This REPLACES "
            f"{live}: {reason}.\nThe current file is kept as a backup first.",
            cancelled="nothing was restored.",
        )

    def _restore_to_time(self, opts) -> None:
        """Point-in-time restore of the PostgreSQL database through pgBackRest."""
        if opts["backup"]:
            raise CommandError(
                "--to-time picks the pgBackRest backup itself: leave out the backup name",
                returncode=2,
            )
        try:
            to_time = datetime.fromisoformat(opts["to_time"])
        except ValueError as exc:
            raise CommandError(
                f"--to-time {opts['to_time']!r} is not a time: write 2026-12-01 10:31:00+00",
                returncode=2,
            ) from exc
        live = connections.settings["postgresql"]["NAME"]
        replace = opts["replace_live_database"]
        made = None  # a temporary scratch directory of ours, removed at the end
        try:
            if to_time.tzinfo is None:
                raise RestoreTargetError(
                    f"{opts['to_time']} has no time zone: write it like 2026-12-01 10:31:00+00"
                )
            chosen = pitr.pick_backup(pitr.require_stanza().backups, to_time)
            if replace and opts["target_db"]:
                raise CommandError(
                    "--replace-live-database restores over the live database: drop --target-db",
                    returncode=2,
                )
            target = live if replace else opts["target_db"] or pitr.default_target_db(live, to_time)
            if opts["dry_run"]:
                where = f", keeping the live {live} renamed" if replace else " beside the live one"
                self.stdout.write(
                    f"Would restore pgBackRest backup {chosen.label} (ended "
                    f"{chosen.stopped:%Y-%m-%d %H:%M:%S}Z) and WAL up to {to_time.isoformat()} "
                    f"into database {target}{where}."
                )
                return
            if replace:
                self._confirm_replace_postgres(live, opts)
            scratch = Path(opts["scratch_dir"] or tempfile.mkdtemp(prefix="propcore_pitr_"))
            scratch.mkdir(parents=True, exist_ok=True)
            scratch.chmod(0o755)  # the server's OS user restores and runs the scratch cluster
            made = None if opts["scratch_dir"] else scratch
            with command_run(
                "db_restore", report_dir=conf.report_dir(), log_dir=conf.log_dir()
            ) as run:
                with run.step("restore_postgresql_to_time") as step:
                    result = pitr.restore_database(
                        to_time=to_time,
                        scratch_root=scratch,
                        target_db=opts["target_db"],
                        replace_live=replace,
                    )
                step.details = {
                    "database": result.database,
                    "kept_as": result.kept_as,
                    "backup": result.backup_label,
                    "to_time": to_time.isoformat(),
                    "stopped_at": result.stopped_at,
                    "tables": {t: {"rows": n} for t, n in result.row_counts.items()},
                }
        except MigrationError as exc:
            raise CommandError(str(exc), returncode=exc.returncode) from exc
        finally:
            if made:
                shutil.rmtree(made, ignore_errors=True)
        self.stdout.write(f"server log: {result.stopped_at}")
        if opts["verbosity"] > 1:
            for table, count in result.row_counts.items():
                self.stdout.write(f"  {table:<40} {count}")
        rows = sum(result.row_counts.values())
        if result.replaced:
            self.stdout.write(
                self.style.SUCCESS(
                    f"Restored {live} as of {to_time.isoformat()} from {result.backup_label} "
                    f"({rows:,} rows, {result.seconds:.2f}s); the previous database is kept as "
                    f"{result.kept_as}. Reload the application (kill -HUP gunicorn's master): "
                    "its pooled connections to the old database were ended"
                )
            )
            return
        self.stdout.write(
            self.style.SUCCESS(
                f"Restored {live} as of {to_time.isoformat()} from {result.backup_label} into "
                f"database {result.database} beside the live one ({rows:,} rows, "
                f"{result.seconds:.2f}s); the live database is untouched"
            )
        )

    def _confirm_replace_postgres(self, live: str, opts) -> None:
        """Refuse to replace the live PostgreSQL database unless its name is typed."""
        reason = precious_reason(conf.state_file(), "postgresql")
        if reason is None:
            return  # the application neither runs on it nor is about to
        confirm_by_typing(
            self.stdout,
            name=live,
            kind="database name",
            refusing=f"Refusing to replace database {live}",
            reason=reason,
            interactive=opts["interactive"],
            warning=f"This REPLACES database {live} with its state as of {opts['to_time']}: "
            f"{reason}; writes since then are lost from it.\nThe current database is kept "
            "under another name.",
            cancelled="nothing was restored.",
        )
