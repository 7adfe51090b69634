import argparse
import os

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from dbmigration import backup, conf, pitr
from dbmigration.errors import ConfigError
from dbmigration.management.output import describe_rows, json_document
from dbmigration.management.progress import ProgressRenderer
from dbmigration.management.runbook import (
    add_database,
    add_json,
    add_keep,
    add_lock_timeout,
    engine_errors,
    resolve_keep,
)
from dbmigration.preflight import conninfo_from_settings
from dbmigration.reports import command_run


class Command(BaseCommand):
    help = (
        "Take a verified backup of the active database: SQLite as a consistent snapshot plus "
        "JSON Lines per table; PostgreSQL through pgBackRest when point-in-time recovery is set "
        "up (db_pitr setup), else as pg_dump -Fc. Listed backups always verified."
    )

    def add_arguments(self, parser):
        parser.add_argument("--list", action="store_true", help="List verified backups and exit.")
        add_json(parser, what="--list")
        add_database(
            parser,
            choices=["active", "sqlite", "postgresql"],
            default="active",
            help="Which database to back up: the one the application runs on, or this alias",
        )
        # the option's first name: scripts written for it keep working
        parser.add_argument(
            "--backend",
            dest="database",
            choices=["active", "sqlite", "postgresql"],
            help=argparse.SUPPRESS,
        )
        add_keep(parser)
        parser.add_argument(
            "--encrypt",
            action="store_true",
            help=f"Encrypt the backup files with the key in ${backup.KEY_ENV}.",
        )
        parser.add_argument(
            "--verify-restore",
            action="store_true",
            help="PostgreSQL: restore the dump into a scratch database and compare row counts.",
        )
        parser.add_argument(
            "--type",
            choices=pitr.BACKUP_TYPES,
            help="PostgreSQL with pgBackRest: backup type (default: full the first time, then "
            "diff).",
        )
        parser.add_argument(
            "--pg-dump",
            action="store_true",
            help="PostgreSQL: take a pg_dump even when pgBackRest is set up.",
        )
        parser.add_argument("--backup-dir", help="Where backups go (default: database/backups).")
        add_lock_timeout(parser, waits_for="a SQLite writer's lock")

    def handle(self, *args, **opts):
        backup_dir = opts["backup_dir"] or conf.backup_dir()
        if opts["list"]:
            return self._list(backup_dir, as_json=opts["json"])
        key = os.environ.get(backup.KEY_ENV) if opts["encrypt"] else None
        if opts["encrypt"] and not key:
            raise CommandError(
                f"--encrypt needs the key in ${backup.KEY_ENV}; set it and retry.",
                returncode=ConfigError.returncode,
            )
        if opts["json"]:
            raise CommandError("--json goes with --list.", returncode=2)
        kind = self._active() if opts["database"] == "active" else opts["database"]
        renderer = ProgressRenderer(self.stdout, verbosity=opts["verbosity"])
        keep = resolve_keep(opts["keep"])
        with (
            engine_errors(),
            renderer,
            command_run("db_backup", report_dir=conf.report_dir(), log_dir=conf.log_dir()) as run,
            run.step(f"backup_{kind}") as step,
        ):
            if kind == "postgresql" and pitr.is_set_up() and not opts["pg_dump"]:
                self._refuse_for_pgbackrest(opts)
                info = backup.create_pgbackrest_backup(
                    backup_dir=backup_dir, backup_type=opts["type"], progress=renderer.note
                )
            elif kind == "postgresql":
                info = backup.create_pg_backup(
                    conninfo=conninfo_from_settings(settings.DATABASES["postgresql"]),
                    backup_dir=backup_dir,
                    verify_restore=opts["verify_restore"],
                    encrypt_key=key,
                    keep=keep,
                    progress=renderer.note,
                )
            else:
                info = backup.create_sqlite_backup(
                    sqlite_path=conf.sqlite_path(),
                    backup_dir=backup_dir,
                    encrypt_key=key,
                    keep=keep,
                    lock_timeout=opts["lock_timeout"],
                    progress=renderer.note,
                )
            step.details = {
                "backup": str(info.path),
                "bytes": info.size,
                "tables": {t: {"rows": n} for t, n in info.row_counts.items()},
            }
        if "pgbackrest" in info.checks:
            made = info.checks["pgbackrest"]
            self.stdout.write(
                self.style.SUCCESS(
                    f"pgBackRest {made['type']} backup {made['label']} verified (pgbackrest "
                    f"verify): {info.source_size:,} bytes, {made['repository_bytes']:,} in "
                    f"{made['repository']}; {info.seconds:.2f}s; recorded in {info.path}"
                )
            )
            return
        self.stdout.write(
            self.style.SUCCESS(
                f"Backup verified: {info.path} ({info.kind}, {len(info.files)} files, "
                f"{info.size:,} bytes, {describe_rows(info.row_counts)}, "
                f"{info.seconds:.2f}s{', encrypted' if info.encrypted else ''})"
            )
        )

    def _refuse_for_pgbackrest(self, opts) -> None:
        # pgBackRest's repository has its own retention (and encryption) settings
        for option, where in (("keep", "RETENTION_FULL / RETENTION_FULL_DAYS"),):
            if opts[option] is not None:
                raise CommandError(
                    f"--{option} does not apply to pgBackRest backups: pgBackRest expires them "
                    f"by DBMIGRATION['PITR'] {where} (db_pitr status shows it); or add --pg-dump",
                    returncode=ConfigError.returncode,
                )
        if opts["encrypt"] or opts["verify_restore"]:
            raise CommandError(
                "--encrypt and --verify-restore apply to pg_dump backups: add --pg-dump (a "
                "pgBackRest backup is checked by pgbackrest verify and db_restore_drill)",
                returncode=ConfigError.returncode,
            )

    def _list(self, backup_dir, *, as_json: bool):
        backups = backup.list_backups(backup_dir)
        if as_json:
            rows = [
                {
                    "name": info.name,
                    "path": str(info.path),
                    "kind": info.kind,
                    "created_at": info.created_at,
                    "verified": info.verified,
                    "encrypted": info.encrypted,
                    "size_bytes": info.size,
                    "rows": sum(info.row_counts.values()),
                    "tables": len(info.row_counts),
                    "migrations": len(info.migrations),
                    "pgbackrest": info.checks.get("pgbackrest"),
                }
                for info in backups
            ]
            self.stdout.write(json_document(status="ok", backup_dir=str(backup_dir), backups=rows))
            return
        if not backups:
            self.stdout.write(f"No verified backups in {backup_dir}.")
        for info in backups:
            made = info.checks.get("pgbackrest")
            if made:
                self.stdout.write(
                    f"{info.name}  {info.kind:<10} pgBackRest {made['type']} {made['label']}  "
                    f"{describe_rows(info.row_counts)}  {len(info.migrations)} migrations"
                )
                continue
            self.stdout.write(
                f"{info.name}  {info.kind:<10} {info.size:>14,} bytes  "
                f"{describe_rows(info.row_counts)}  {len(info.migrations)} migrations"
                f"{'  encrypted' if info.encrypted else ''}"
            )

    def _active(self) -> str:
        # propcore's settings name the backend this process uses; any project: the state file
        from dbmigration.state import read_active_backend

        return getattr(settings, "ACTIVE_BACKEND", None) or read_active_backend(conf.state_file())
