import tempfile
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from dbmigration import pitr
from dbmigration.errors import MigrationError, VerificationError


class Command(BaseCommand):
    help = (
        "Restore drill: restore the latest pgBackRest backup to a restore point made now into a "
        "scratch cluster, compare every table's row count with the live database, record the "
        "result and its duration (the pitr health check reads it), and drop the scratch cluster."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--scratch-dir",
            help="Where the scratch cluster goes (default: a new temporary directory).",
        )

    def handle(self, *args, **opts):
        scratch = Path(opts["scratch_dir"] or tempfile.mkdtemp(prefix="propcore_drill_"))
        scratch.chmod(0o755)  # the server's OS user must reach the directory inside
        try:
            result = pitr.restore_drill(scratch_root=scratch)
        except MigrationError as exc:
            raise CommandError(str(exc), returncode=exc.returncode) from exc
        for table, (live, restored) in result.differing.items():
            self.stdout.write(f"  {table:<40} live {live}  restored {restored}")
        if not result.ok:
            raise CommandError(
                f"restore drill failed: {result.message}", returncode=VerificationError.returncode
            )
        self.stdout.write(
            self.style.SUCCESS(
                f"{result.message}; {result.rows} rows in {result.seconds} s (recorded in "
                f"{pitr.drill_record_path()})"
            )
        )
