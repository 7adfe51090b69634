from django.core.management.base import BaseCommand, CommandError

from dbmigration import conf
from dbmigration.errors import MigrationError
from dbmigration.status import migration_status


class Command(BaseCommand):
    help = "Show the migration phase, the last report, the last verified backup and what next."

    def handle(self, *args, **opts):
        try:
            s = migration_status(
                state_file=conf.state_file(),
                backup_dir=conf.backup_dir(),
                sqlite_path=conf.sqlite_path(),
                report_dir=conf.report_dir(),
            )
        except MigrationError as exc:
            raise CommandError(str(exc), returncode=exc.returncode) from exc
        self.stdout.write(f"Phase:          {s.phase} (active backend: {s.active_backend})")
        report = f"{s.last_report} ({s.last_report_status})" if s.last_report else "none"
        self.stdout.write(f"Last report:    {report}")
        b = s.last_backup
        self.stdout.write(
            f"Last backup:    {b.path} ({b.kind}, {b.created_at}, verified)"
            if b
            else f"Last backup:    none of {s.active_backend} verified yet (run db_backup)"
        )
        freeze = s.write_freeze
        if freeze is None:
            self.stdout.write("Write freeze:   none")
        else:
            facts = (
                f"by {freeze['owner']} ({freeze['reason']}), {freeze['age_seconds']:g} s old, "
                f"renewed {freeze['renewed_seconds_ago']:g} s ago"
            )
            if freeze["void"]:
                self.stdout.write(
                    f"Write freeze:   left over {facts}; void ({freeze['void']}): writes go "
                    "on, the next switch or rollback clears it"
                )
            else:
                self.stdout.write(self.style.WARNING(f"Write freeze:   ON {facts}"))
        for reason in s.stale:
            self.stdout.write(self.style.WARNING(f"Stale prepare:  {reason}"))
        self.stdout.write(self.style.SUCCESS(f"Next:           {s.next_step}"))
