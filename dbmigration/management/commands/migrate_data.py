import signal

from django.core.management.base import BaseCommand, CommandError

from dbmigration import conf
from dbmigration.casts import REPAIR_RULES
from dbmigration.errors import Interrupted
from dbmigration.management.output import describe_rows, json_document
from dbmigration.management.runbook import add_json, add_noinput, engine_errors, runbook_run
from dbmigration.migrate import migrate_data


class Command(BaseCommand):
    help = (
        "Phase 6: copy every table from SQLite (opened read-only) to PostgreSQL with COPY, "
        "then verify counts and range checksums. Stops on any row PostgreSQL would refuse "
        "or change, listing each one. Resumes after an interruption; safe to re-run."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--quarantine",
            action="store_true",
            help="Set offending rows aside in a JSON Lines reject file; copy (or --sync) the rest.",
        )
        parser.add_argument(
            "--repair",
            action="append",
            default=[],
            choices=sorted(REPAIR_RULES),
            metavar="RULE",
            help="Apply a named repair, recorded per row: "
            + "; ".join(f"{k}: {v}" for k, v in REPAIR_RULES.items()),
        )
        parser.add_argument(
            "--sync",
            action="store_true",
            help="After a full copy: carry only rows inserted, updated or deleted since.",
        )
        parser.add_argument(
            "--verify-only", action="store_true", help="Copy nothing; verify again."
        )
        parser.add_argument(
            "--no-verify", action="store_true", help="Skip verification after the copy."
        )
        parser.add_argument(
            "--tables",
            nargs="+",
            metavar="TABLE",
            help="Copy only these tables (db_table or app_label.Model); the phase stays.",
        )

        parser.add_argument(
            "--plan",
            action="store_true",
            help="Show what would be copied (tables in order, rows, skipped models); copy nothing.",
        )
        add_json(parser, what="--plan")
        add_noinput(
            parser, help="Accepted like the other runbook commands; migrate_data never asks."
        )

    def handle(self, *args, **opts):
        if opts["plan"]:
            return self._plan(opts["tables"], as_json=opts["json"])
        if opts["json"]:
            raise CommandError("--json goes with --plan.", returncode=2)
        # SIGTERM unwinds like Ctrl-C: the open table rolls back, its marker is never written
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            with runbook_run(
                "migrate_data", stdout=self.stdout, verbosity=opts["verbosity"]
            ) as progress:
                r = migrate_data(
                    sqlite_path=conf.sqlite_path(),
                    state_file=conf.state_file(),
                    report_dir=conf.report_dir(),
                    log_dir=conf.log_dir(),
                    tables=opts["tables"],
                    quarantine=opts["quarantine"],
                    repairs=opts["repair"],
                    sync=opts["sync"],
                    verify_only=opts["verify_only"],
                    verify=not opts["no_verify"],
                    progress=progress if progress.enabled else None,
                )
        except KeyboardInterrupt as exc:
            name = "SIGTERM" if "signal" in str(exc) else "Ctrl-C"
            raise CommandError(
                f"Interrupted by {name} {_what_was_interrupted(opts)}",
                returncode=Interrupted.returncode,
            ) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
        if opts["verbosity"] == 0:
            return
        if r.copy:
            for t in r.copy.tables:
                self.stdout.write(
                    f"  {t.table:<32} {t.status:<12} {t.rows_written:>11,} rows "
                    f"{t.rows_rejected:>5,} rejected {t.seconds:7.2f}s "
                    f"{t.rows_per_second:>10,.0f}/s"
                )
            if r.copy.rejected_total:
                self.stdout.write(
                    self.style.WARNING(
                        f"{r.copy.rejected_total:,} row(s) quarantined: {r.copy.reject_file}"
                    )
                )
            for repair in r.copy.repairs[:20]:
                self.stdout.write(f"  repaired {repair.table} pk={repair.pk!r} {repair.column}")
        if r.sync:
            self.stdout.write(
                f"Synced {r.sync.changed:,} changed row(s): {r.sync.rows_written:,} written, "
                f"{r.sync.rows_deleted:,} deleted, in {r.sync.seconds:.2f}s"
            )
            if r.sync.rejections:
                self.stdout.write(
                    self.style.WARNING(
                        f"{len(r.sync.rejections):,} row(s) quarantined: {r.sync.reject_file}"
                    )
                )
        if r.verification:
            rows = describe_rows({c.table: c.target_rows for c in r.verification.tables})
            self.stdout.write(
                f"Verified {rows}: counts, checksums, "
                f"foreign keys, sequences, migrations ({r.verification.seconds:.2f}s)"
            )
            for warning in r.verification.warnings:
                self.stdout.write(self.style.WARNING(f"  warning: {warning}"))
        self.stdout.write(f"Report: {r.report_path}\nLog:    {r.log_path}")
        self.stdout.write(self.style.SUCCESS(f"migrate_data ({r.mode}) done."))

    def _plan(self, tables, *, as_json: bool) -> None:
        from dbmigration.plan import preview_copy

        with engine_errors():
            p = preview_copy(sqlite_path=conf.sqlite_path(), only=tables)
        if as_json:
            document = json_document(
                status="ok",
                action="plan",
                changed=False,
                tables=[
                    {"order": n, "table": t.db_table, "source_rows": t.source_rows}
                    for n, t in enumerate(p.tables, 1)
                ],
                skipped=[{"model": label, "why": why} for label, why in p.skipped],
                deferred_foreign_keys=p.deferred_fks,
                rows=p.rows,
            )
            self.stdout.write(document)
            return
        self.stdout.write("Would copy, in this order:")
        for n, t in enumerate(p.tables, 1):
            rows = f"{t.source_rows:>12,} rows" if t.source_rows is not None else "  not in SQLite"
            self.stdout.write(f"  {n:>3}. {t.db_table:<40} {rows}")
        for label, why in p.skipped:
            self.stdout.write(f"  skipped {label}: {why}")
        if p.deferred_fks:
            self.stdout.write(f"  {p.deferred_fks} foreign key(s) added after the load")
        rows = describe_rows({t.db_table: t.source_rows or 0 for t in p.tables})
        self.stdout.write(self.style.SUCCESS(f"Plan: {rows}; nothing was copied."))


def _what_was_interrupted(opts) -> str:
    """The rest of the interruption message: what stopped, what it left, what to run."""
    if opts["verify_only"]:
        return (
            "during verification: nothing was copied or changed. Run migrate_data "
            "--verify-only again."
        )
    if opts["sync"]:
        return (
            "during the --sync catch-up: its one transaction rolled back, PostgreSQL is as "
            "before. Run migrate_data --sync again."
        )
    return (
        "during the copy. The tables being loaded were rolled back; finished ones are kept "
        "as done. Run migrate_data again to go on from there."
    )


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
