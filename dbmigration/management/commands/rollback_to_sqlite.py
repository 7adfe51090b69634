from django.core.management.base import BaseCommand, CommandError

from dbmigration import conf, rollback
from dbmigration import freeze as fz
from dbmigration.errors import NotConfirmed, PhaseError
from dbmigration.management.output import json_document
from dbmigration.management.runbook import add_json, add_noinput, engine_errors, runbook_run
from dbmigration.state import StateError, read_state


class Command(BaseCommand):
    help = (
        "Return the application to SQLite; available at every phase. Before the switch it "
        "only moves the state back (and drops the PostgreSQL copy with --drop-postgres). "
        "After the switch, rows written on PostgreSQL since the cutover are carried back "
        "(inserted, updated, deleted) into a fresh copy of the SQLite file under a write "
        "freeze, verified, swapped in atomically, and the old file is kept as a verified "
        "backup. The report lists what was carried back, per table."
    )

    def add_arguments(self, parser):
        add_noinput(parser)
        parser.add_argument(
            "--drop-postgres",
            action="store_true",
            help="Also unapply every migration on PostgreSQL (drops its tables, types, views).",
        )
        parser.add_argument(
            "--discard-postgres-writes",
            action="store_true",
            help="Do not carry PostgreSQL's writes back: they are lost (listed in the report). "
            "Asks you to type 'discard'; with --noinput also needs --confirm-discard.",
        )
        parser.add_argument(
            "--confirm-discard",
            action="store_true",
            help="With --noinput: confirm --discard-postgres-writes.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Show what would be carried back (or discarded) and change nothing.",
        )
        add_json(parser, what="--dry-run's plan")
        parser.add_argument(
            "--drain-seconds",
            type=float,
            default=10.0,
            help="Longest wait for transactions begun before the freeze to end; those left "
            "are ended (default: %(default)g).",
        )
        parser.add_argument(
            "--freeze-timeout",
            type=float,
            default=fz.DEFAULT_MAX_SECONDS,
            help="The longest the write freeze may last, even if this command hangs; if the "
            f"command dies it lifts within {fz.LEASE_SECONDS:g} s (default: %(default)g).",
        )

    def handle(self, *args, **options):
        discard = options["discard_postgres_writes"]
        if options["dry_run"]:
            return self._dry_run(discard=discard, drop=options["drop_postgres"], opts=options)
        if options["json"]:
            raise CommandError("--json goes with --dry-run.", returncode=2)
        with engine_errors(also=(StateError,)):
            state = read_state(conf.state_file())
        confirmed = options["confirm_discard"]
        where = "PostgreSQL (switched)" if state.active_backend == "postgresql" else "SQLite"
        self.stdout.write(f"Phase {state.phase}; the application runs on {where}.")
        refusal = rollback.nothing_to_roll_back(state, drop_postgres=options["drop_postgres"])
        if refusal:  # before asking: there is nothing to confirm
            raise CommandError(refusal, returncode=PhaseError.returncode)
        if options["interactive"]:
            if discard:
                prompt = (
                    "Writes made on PostgreSQL since the switch will be LOST.\n"
                    "    Type 'discard' to continue: "
                )
                confirmed = input(prompt) == "discard"
                if not confirmed:
                    raise CommandError("Rollback cancelled.", returncode=NotConfirmed.returncode)
            elif input("Roll back to SQLite?\n    Type 'yes' to continue: ") != "yes":
                raise CommandError("Rollback cancelled.", returncode=NotConfirmed.returncode)
        with runbook_run(
            "rollback_to_sqlite",
            stdout=self.stdout,
            verbosity=options["verbosity"],
            then="The state file was not changed.",
            also=(StateError,),
        ) as renderer:
            result = rollback.rollback_to_sqlite(
                drop_postgres=options["drop_postgres"],
                discard_postgres_writes=discard,
                discard_confirmed=confirmed,
                drain_seconds=options["drain_seconds"],
                freeze_max_seconds=options["freeze_timeout"],
                progress=renderer.note,
            )
        if result.took_over:
            self.stdout.write(self.style.WARNING(f"Took over a leftover {result.took_over}."))
        if result.lifted_fence:
            self.stdout.write(
                self.style.WARNING(
                    f"Lifted the {result.lifted_fence}: a switch killed before its flip left "
                    "it; no write had reached PostgreSQL, SQLite takes writes again."
                )
            )
        if result.leftovers_removed:
            removed = ", ".join(result.leftovers_removed)
            self.stdout.write(f"Removed the working copies of killed runs: {removed}")
        for kind, tables in (("carried back", result.carried), ("DISCARDED", result.discarded)):
            for t in tables:
                self.stdout.write(
                    f"  {kind} {t.label}: {t.inserted} inserted, {t.updated} updated, "
                    f"{t.deleted} deleted"
                )
        if result.was_switched and not (result.carried or result.discarded):
            self.stdout.write("  no writes were made on PostgreSQL since the switch")
        for warning in result.warnings:
            self.stdout.write(self.style.WARNING(f"  warning: {warning}"))
        if result.pre_rollback_backup:
            self.stdout.write(f"Pre-rollback SQLite backup: {result.pre_rollback_backup}")
        if result.dropped_postgres:
            self.stdout.write("The PostgreSQL copy was dropped.")
        self.stdout.write(
            self.style.SUCCESS(
                f"Rolled back to SQLite in {result.seconds:.2f} s (writes frozen "
                f"{result.freeze_seconds:.2f} s)."
            )
        )
        self.stdout.write(f"Report: {result.report_path}")

    def _dry_run(self, *, discard: bool, drop: bool, opts) -> None:
        with engine_errors(also=(StateError,)):
            refusal = rollback.nothing_to_roll_back(
                read_state(conf.state_file()), drop_postgres=drop
            )
            p = rollback.preview_rollback(discard_postgres_writes=discard, drop_postgres=drop)
        if opts["json"]:
            self._dry_run_json(p, discard=discard, drop=drop, refusal=refusal)
        else:
            where = "PostgreSQL (switched)" if p.active_backend == "postgresql" else "SQLite"
            self.stdout.write(f"Phase {p.phase}; the application runs on {where}.")
        if refusal:  # what the real run would answer, with its exit code
            raise CommandError(f"Dry run: {refusal}", returncode=PhaseError.returncode)
        if opts["json"]:
            return
        if not p.was_switched:
            self.stdout.write(
                "Would move the state to rolled_back; SQLite holds every row already."
            )
        for kind, tables in (("carry back", p.carried), ("DISCARD", p.discarded)):
            for t in tables:
                self.stdout.write(
                    f"  would {kind} {t.label}: {t.inserted:,} inserted, {t.updated:,} updated, "
                    f"{t.deleted:,} deleted"
                )
        if p.was_switched and not (p.carried or p.discarded):
            self.stdout.write("  no writes were made on PostgreSQL since the switch")
        if p.was_switched and not discard:
            freeze = (
                f"; writes were frozen {p.last_freeze_seconds:.2f} s in the last measurement"
                if p.last_freeze_seconds
                else ""
            )
            self.stdout.write(f"Writes would freeze while the last rows move{freeze}.")
        if drop:
            self.stdout.write("Would drop the PostgreSQL copy (unapply every migration).")
        self.stdout.write(self.style.SUCCESS("Dry run: nothing was changed."))

    def _dry_run_json(self, p, *, discard: bool, drop: bool, refusal: str | None) -> None:
        def tables(carries):
            return [
                {
                    "table": t.table,
                    "model": t.label,
                    "inserted": t.inserted,
                    "updated": t.updated,
                    "deleted": t.deleted,
                }
                for t in carries
            ]

        self.stdout.write(
            json_document(
                status="refused" if refusal else "ok",
                action="dry_run",
                refusal=refusal,
                changed=False,
                phase=p.phase,
                active_backend=p.active_backend,
                was_switched=p.was_switched,
                carry_back=tables(p.carried),
                discard=tables(p.discarded),
                discard_postgres_writes=discard,
                drop_postgres=drop,
                freeze_expected=p.was_switched and not discard,
                last_freeze_seconds=p.last_freeze_seconds,
            )
        )
