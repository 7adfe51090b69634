import json

from django.core.management.base import BaseCommand, CommandError

from dbmigration import health


class Command(BaseCommand):
    help = (
        "Check the database side of propcore for monitors and cron: active backend reachable, "
        "state file consistent with this process, migration phase and write freeze, age of the "
        "last verified backup, pool usage, replication lag, recent slow queries. Exit status: "
        "0 healthy, 1 degraded, 2 down (the same checks /health/ runs)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--json", action="store_true", help="Print the results as one JSON document."
        )
        parser.add_argument(
            "--check",
            action="append",
            choices=list(health.CHECKS),
            dest="checks",
            help="Run only this check (repeat for several). Default: all.",
        )

    def handle(self, *args, **options):
        report = health.run_checks(options["checks"])
        if options["json"]:
            self.stdout.write(json.dumps(report.to_dict(), indent=2, default=str))
        else:
            style = {
                health.OK: self.style.SUCCESS,
                health.DEGRADED: self.style.WARNING,
                health.DOWN: self.style.ERROR,
            }
            for result in report.checks:
                label = style[result.status](f"{result.status:<8}")
                self.stdout.write(f"{label} {result.name:<16} {result.message}")
                if options["verbosity"] > 1 and result.details:
                    self.stdout.write(f"{'':<26}{json.dumps(result.details, default=str)}")
            self.stdout.write(f"overall: {report.status}")
        if report.exit_code:
            worst = [c.name for c in report.checks if c.status == report.status]
            milder = [c.name for c in report.checks if c.status not in (health.OK, report.status)]
            also = f" (also degraded: {', '.join(milder)})" if milder else ""
            raise CommandError(
                f"database health is {report.status}: {', '.join(worst)}{also}",
                returncode=report.exit_code,
            )
