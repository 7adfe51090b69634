from datetime import datetime
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from dbmigration import backup, conf, pitr
from dbmigration.errors import MigrationError


class Command(BaseCommand):
    help = (
        "Point-in-time recovery with pgBackRest: setup (config, server settings with --apply, "
        "stanza-create, check), check, backup --type full|diff|incr, status (backups, "
        "retention, recovery window), expire (apply the retention now), and restore "
        "--to-time T --target-dir DIR (a scratch cluster, never the live one)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "action", choices=["setup", "check", "backup", "status", "expire", "restore"]
        )
        parser.add_argument(
            "--apply", action="store_true", help="setup: ALTER SYSTEM the server's settings."
        )
        parser.add_argument(
            "--type",
            choices=pitr.BACKUP_TYPES,
            default="full",
            help="backup: full, diff or incr (default: %(default)s).",
        )
        parser.add_argument(
            "--to-time", help='restore: e.g. "2026-12-01 10:15:00+00" (a time zone is required)'
        )
        parser.add_argument("--target-dir", help="restore: a new or empty directory")
        parser.add_argument("--port", type=int, help="restore: port (default: a free one)")

    def handle(self, *args, **opts):
        try:
            getattr(self, f"_{opts['action']}")(opts)
        except MigrationError as exc:
            raise CommandError(str(exc), returncode=exc.returncode) from exc

    def _setup(self, opts):
        result = pitr.setup(apply=opts["apply"])
        self.stdout.write(f"wrote {result.config_path} (repository {result.repo_path})")
        for name, value in result.wanted.items():
            now = result.current.get(name)
            mark = "ok " if now == value else ("set" if name in result.applied else "   ")
            self.stdout.write(f"  {mark} {name} = '{value}'  (now: {now!r})")
        if result.restart_needed:
            self.stdout.write(
                self.style.WARNING(
                    f"restart PostgreSQL for {', '.join(result.restart_needed)}, then run "
                    "db_pitr check"
                )
            )
        elif result.missing and not result.applied:
            self.stdout.write(
                self.style.WARNING("set these (or rerun with --apply), then run db_pitr check")
            )
        if result.checked:
            self.stdout.write(self.style.SUCCESS("stanza created; check passed (WAL archived)"))

    def _check(self, opts):
        pitr.pgbackrest("check")
        self.stdout.write(self.style.SUCCESS("check passed: a WAL segment reached the repository"))

    def _backup(self, opts):
        result = pitr.backup(backup_type=opts["type"])
        b = result.backup
        self.stdout.write(
            self.style.SUCCESS(
                f"{b.type} backup {b.label}: {b.size} bytes ({b.repo_size} in the repository) "
                f"in {result.seconds} s; repository verified"
            )
        )

    def _status(self, opts):
        status = pitr.status()
        stanza = status.stanza
        self.stdout.write(
            f"stanza: {stanza.status}; WAL {stanza.archive_min}..{stanza.archive_max}"
        )
        self.stdout.write(f"retention: {status.retention}")
        if status.retention_stale:
            self.stdout.write(
                self.style.WARNING(
                    f"  pgbackrest.conf still says {', '.join(status.retention_written)}: rerun "
                    "db_pitr setup to apply the retention settings"
                )
            )
        if status.oldest_restorable:
            self.stdout.write(
                f"recovery window: from {status.oldest_restorable:%Y-%m-%d %H:%M:%S}Z "
                "to the last archived WAL"
            )
        self.stdout.write(self._backups_table(stanza))

    def _expire(self, opts):
        stanza = backup.expire_pgbackrest(conf.backup_dir())
        self.stdout.write(f"expired by the retention ({pitr.describe_retention()}); kept:")
        self.stdout.write(self._backups_table(stanza))

    def _backups_table(self, stanza) -> str:
        return (
            "\n".join(
                f"  {b.label}  {b.type:<4}  ended {b.stopped:%Y-%m-%d %H:%M:%S}Z  "
                f"{b.age_hours / 24:.1f} days old"
                for b in stanza.backups
            )
            or "  no backups"
        )

    def _restore(self, opts):
        if not (opts["to_time"] and opts["target_dir"]):
            raise CommandError("restore needs --to-time and --target-dir", returncode=2)
        try:
            to_time = datetime.fromisoformat(opts["to_time"])
        except ValueError as exc:
            raise CommandError(
                f"--to-time {opts['to_time']!r} is not a time: write 2026-12-01 10:15:00+00",
                returncode=2,
            ) from exc
        result = pitr.restore(
            to_time=to_time, target_dir=Path(opts["target_dir"]), port=opts["port"]
        )
        self.stdout.write(f"restored {result.backup_label} + WAL in {result.seconds} s")
        self.stdout.write(f"server log: {result.stopped_at}")
        for table, count in result.row_counts.items():
            self.stdout.write(f"  {table:<40} {count}")
        self.stdout.write(
            f"running paused (read-only) on 127.0.0.1:{result.port}. To make it writable: "
            f"{result.promote_command}; to drop it: {result.stop_command} and remove the directory"
        )
