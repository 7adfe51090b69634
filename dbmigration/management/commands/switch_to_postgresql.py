from django.core.management.base import BaseCommand, CommandError

from dbmigration import conf, cutover
from dbmigration import freeze as fz
from dbmigration.errors import NotConfirmed, PhaseError
from dbmigration.management.runbook import add_noinput, runbook_run
from dbmigration.state import StateError


class Command(BaseCommand):
    help = (
        "Phase 7: switch the application to PostgreSQL. Refuses unless migrate_data finished "
        "and verified. Puts the application into a write freeze (writes answer 503, reads go "
        "on), runs the final migrate_data --sync catch-up, verifies, flips the active backend "
        "in the state file and lifts the freeze. On any failure the freeze is lifted and the "
        "application stays on SQLite. The report gives the length of the write freeze."
    )

    def add_arguments(self, parser):
        add_noinput(parser)
        parser.add_argument(
            "--dry-run", action="store_true", help="Check the preconditions, show the plan, stop."
        )
        parser.add_argument(
            "--drain-seconds",
            type=float,
            default=10.0,
            help="Longest wait after the freeze starts for SQLite's write lock "
            "(default: %(default)g).",
        )
        parser.add_argument(
            "--freeze-timeout",
            type=float,
            default=fz.DEFAULT_MAX_SECONDS,
            help="The longest the write freeze may last, even if this command hangs; if the "
            f"command dies it lifts within {fz.LEASE_SECONDS:g} s (default: %(default)g).",
        )

    def handle(self, *args, **options):
        try:
            plan = cutover.plan_switch(state_file=conf.state_file())
        except StateError as exc:
            raise CommandError(str(exc), returncode=PhaseError.returncode) from exc
        if not plan.ready:  # the refusal alone: a plan that will not run only confuses
            raise CommandError(" ".join(plan.problems), returncode=PhaseError.returncode)
        self.stdout.write(f"Phase {plan.phase}, active backend {plan.active_backend}. Plan:")
        for number, step in enumerate(plan.steps, 1):
            self.stdout.write(f"  {number}. {step}")
        if options["dry_run"]:
            self.stdout.write("Dry run: nothing was changed.")
            return
        if options["interactive"]:
            answer = input(
                "This runs the plan above: writes answer 503 for a few seconds (at least "
                f"--drain-seconds {options['drain_seconds']:g}), then the application runs on "
                "PostgreSQL; SQLite is kept for rollback_to_sqlite.\n"
                "    Type 'yes' to continue, or 'no' to cancel: "
            )
            if answer != "yes":
                raise CommandError(
                    "Switch cancelled: nothing was changed.", returncode=NotConfirmed.returncode
                )
        with runbook_run(
            "switch_to_postgresql",
            stdout=self.stdout,
            verbosity=options["verbosity"],
            then="The application stays on SQLite; the write freeze was lifted.",
            also=(StateError,),
        ) as renderer:
            result = cutover.switch_to_postgresql(
                drain_seconds=options["drain_seconds"],
                freeze_max_seconds=options["freeze_timeout"],
                progress=renderer.note,
                rows_progress=renderer.stage("catch-up"),
            )
        if result.took_over:
            self.stdout.write(self.style.WARNING(f"Took over a leftover {result.took_over}."))
        if result.lifted_fence:
            self.stdout.write(
                self.style.WARNING(
                    f"Lifted the {result.lifted_fence}: a switch killed before its flip left "
                    "it (SQLite held every write; this switch carried them over)."
                )
            )
        self.stdout.write(
            self.style.SUCCESS(
                f"Switched to PostgreSQL in {result.seconds:.2f} s; writes were frozen for "
                f"{result.freeze_seconds:.2f} s."
            )
        )
        for refill in result.refills:
            self.stdout.write(self.style.WARNING(f"  next: {refill}"))
        self.stdout.write(f"Report: {result.report_path}")
