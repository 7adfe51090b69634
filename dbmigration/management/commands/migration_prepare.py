import os

from django.core.management.base import BaseCommand, CommandError

from dbmigration import conf
from dbmigration.backup import KEY_ENV
from dbmigration.errors import ConfigError
from dbmigration.management.output import describe_rows
from dbmigration.management.runbook import (
    add_keep,
    add_lock_timeout,
    add_noinput,
    resolve_keep,
    runbook_run,
)
from dbmigration.prepare import run_prepare


class Command(BaseCommand):
    help = (
        "Phases 1-5 of the runbook: safety checks, verified backups, PostgreSQL checks, schema "
        "creation, final validation with a dry run of the data conversion that lists every row "
        "the copy would reject. SQLite is only read. Safe to re-run."
    )

    def add_arguments(self, parser):
        add_keep(parser)
        parser.add_argument(
            "--encrypt", action="store_true", help=f"Encrypt the backup with ${KEY_ENV}."
        )
        add_lock_timeout(parser, waits_for="a SQLite writer's lock")
        add_noinput(
            parser, help="Accepted like the other runbook commands; prepare never asks anything."
        )
        parser.add_argument(
            "--strict",
            action="store_true",
            help="Fail (exit 5) when any row would be rejected, instead of listing them and "
            "leaving the choice (fix SQLite, or migrate_data --quarantine/--repair) to you.",
        )

    def handle(self, *args, **opts):
        key = os.environ.get(KEY_ENV) if opts["encrypt"] else None
        if opts["encrypt"] and not key:
            raise CommandError(
                f"--encrypt needs the key in ${KEY_ENV}; set it and retry.",
                returncode=ConfigError.returncode,
            )
        with runbook_run(
            "migration_prepare", stdout=self.stdout, verbosity=opts["verbosity"]
        ) as renderer:
            r = run_prepare(
                sqlite_path=conf.sqlite_path(),
                state_file=conf.state_file(),
                backup_dir=conf.backup_dir(),
                report_dir=conf.report_dir(),
                log_dir=conf.log_dir(),
                pg_alias=conf.TARGET_ALIAS,
                pool_max=conf.pool_max(),
                keep=resolve_keep(opts["keep"]),
                encrypt_key=key,
                lock_timeout=opts["lock_timeout"],
                strict=opts["strict"],
                progress=renderer.note,
            )
        for phase in r.phases:
            self.stdout.write(f"  {phase.name:<22} {phase.status:<8} {phase.seconds:7.2f}s")
            for warning in phase.warnings:
                self.stdout.write(self.style.WARNING(f"    {warning}"))
        converts = (
            f"{len(r.rejections):,} would be rejected" if r.rejections else "every row converts"
        )
        self.stdout.write(
            f"Source sha256 {r.fingerprint_before['sha256'][:16]}... unchanged; backup "
            f"{r.backup.path.name}; scanned {describe_rows(r.rows_by_table)}: {converts} "
            f"({r.conversion_rows_per_s:,.0f} rows/s); copy estimate "
            f"{r.estimated_copy_seconds:.0f}s"
        )
        if r.rejections:
            self._list_rejections(r.rejections)
        self.stdout.write(f"Report: {r.report_path}\nLog:    {r.log_path}")
        self.stdout.write(self.style.SUCCESS("Prepared. Next: migrate_data"))

    def _list_rejections(self, rejections, shown: int = 20) -> None:
        self.stdout.write(self.style.WARNING(f"{len(rejections)} rows would be rejected:"))
        for r in rejections[:shown]:
            self.stdout.write(f"  {r.table} pk={r.pk} {r.column}: {r.reason} ({r.excerpt[:60]})")
        if len(rejections) > shown:
            self.stdout.write(f"  ... and {len(rejections) - shown} more in the report")
        self.stdout.write(
            "migrate_data will stop on these rows. Fix them in SQLite and prepare again, or run "
            "migrate_data --quarantine (sets them aside in a reject file) or --repair strip-nul "
            "(NUL bytes only)."
        )
