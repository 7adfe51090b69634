from django.core.management.base import BaseCommand

from dbmigration import conf
from dbmigration.management.output import describe_rows, json_document
from dbmigration.management.runbook import engine_errors
from dbmigration.status import migration_status, runbook_summary


class Command(BaseCommand):
    help = "Show the migration phase, the last report, the last verified backup and what next."

    def add_arguments(self, parser):
        parser.add_argument(
            "--json", action="store_true", help="Print the status as one JSON document."
        )
        parser.add_argument(
            "--summary",
            action="store_true",
            help="Also say what the reports prove: rows copied and verified, write freezes.",
        )

    def handle(self, *args, **opts):
        with engine_errors():
            s = migration_status(
                state_file=conf.state_file(),
                backup_dir=conf.backup_dir(),
                sqlite_path=conf.sqlite_path(),
                report_dir=conf.report_dir(),
            )
        if opts["json"]:
            self.stdout.write(json_document(status="stale" if s.stale else "ok", **s.to_json()))
            return
        self.stdout.write(f"Phase:          {s.phase} (active backend: {s.active_backend})")
        report = f"{s.last_report} ({s.last_report_status})" if s.last_report else "none"
        self.stdout.write(f"Last report:    {report}")
        if s.last_completed_step:
            self.stdout.write(f"Last completed: {s.last_completed_step}")
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
        if s.lifted_fence:
            self.stdout.write(
                self.style.WARNING(
                    f"Write fence:    lifted the orphaned {s.lifted_fence}: that switch was "
                    "killed before its flip, so no write reached PostgreSQL; SQLite takes "
                    "writes again (run switch_to_postgresql again)"
                )
            )
        for reason in s.stale:
            self.stdout.write(self.style.WARNING(f"Stale prepare:  {reason}"))
        self.stdout.write(self.style.SUCCESS(f"Next:           {s.next_step}"))
        if opts["summary"]:
            self._summary(conf.report_dir())

    def _summary(self, report_dir) -> None:
        r = runbook_summary(report_dir)
        self.stdout.write(f"Reports:        {r.reports} in {report_dir}")
        self.stdout.write(f"Rows copied:    {describe_rows(r.rows_copied)}, by the last full copy")
        if r.rows_verified:
            self.stdout.write(f"Rows verified:  {describe_rows(r.rows_verified)}")
        for command, seconds in r.freezes:
            self.stdout.write(f"Write freeze:   {seconds:.2f} s ({command})")
        for failed in r.failed:
            self.stdout.write(self.style.WARNING(f"Not ok:         {failed}"))
