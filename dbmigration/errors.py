"""The engine's exceptions: one small class per kind of failure.

Commands turn them into ``CommandError(str(exc), returncode=exc.returncode)``.
Messages name the cause and the fix, and never hold a password.

The exit codes, the same in every command (README, "Exit codes", lists them too):
0 done; 1 an unexpected error (a bug: the traceback is printed), or db_health_check
degraded; 2 the SQLite source, or db_health_check down (and argparse's usage errors);
3 the PostgreSQL target; 4 a backup; 5 rows that would be rejected; 6 verification;
7 out of order; 8 the write freeze; 9 not confirmed (cancelled at the prompt, or a
destructive step without its flag); 78 settings (manage.py, sysexits' EX_CONFIG);
130 interrupted.
"""


class MigrationError(Exception):
    """Base class: something the operator must fix before the step can run."""

    returncode = 1


class SourceError(MigrationError):
    """The SQLite source is missing, not SQLite, corrupt, locked or out of date."""

    returncode = 2


class TargetError(MigrationError):
    """The PostgreSQL target is unreachable, refuses us, or holds foreign data."""

    returncode = 3


class BackupError(MigrationError):
    """A backup could not be written or did not verify."""

    returncode = 4


class DataError(MigrationError):
    """Rows that cannot arrive exactly; the report lists each one."""

    returncode = 5


class VerificationError(MigrationError):
    """Counts or checksums differ between source and target."""

    returncode = 6


class RolesError(MigrationError):
    """Database roles or grants could not be changed (db_roles without a superuser)."""

    returncode = 3


class PhaseError(MigrationError):
    """A command was run out of order (see state.py)."""

    returncode = 7


class NotConfirmed(MigrationError):
    """A destructive step was cancelled at its prompt, or asked for without its flag."""

    returncode = 9


class ConfigError(MigrationError):
    """A setting or option is malformed (e.g. a POSTGRES_URL that names no database)."""

    returncode = 78


class Interrupted(MigrationError):
    """SIGINT or SIGTERM stopped a command; nothing half-done was marked as done."""

    returncode = 130


class PitrError(BackupError):
    """pgBackRest is missing, misconfigured, or one of its commands failed."""


class RestoreTargetError(PitrError):
    """A point-in-time restore was asked for a time no backup and archived WAL can reach."""


# sqlstates of a server that ended our session or refuses new ones (class 08: connection)
_LOST_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})


def postgres_lost(exc: BaseException | None) -> BaseException | None:
    """The lost or refused PostgreSQL connection behind exc (or what caused it), if any."""
    import psycopg

    if isinstance(exc, MigrationError):
        return None  # the engine already said what happened and what to do next
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, psycopg.InterfaceError):  # "the connection is closed"
            return exc
        if isinstance(exc, psycopg.OperationalError):
            sqlstate = getattr(exc, "sqlstate", None)
            if sqlstate is None or sqlstate.startswith("08") or sqlstate in _LOST_SQLSTATES:
                return exc
        exc = exc.__cause__ or exc.__context__
    return None


def target_lost(lost: BaseException, *, during: str, then: str) -> TargetError:
    """One line for a PostgreSQL that went away: where, why (first line only), what next."""
    why = (str(lost).strip().splitlines() or [type(lost).__name__])[0]
    return TargetError(f"PostgreSQL went away during {during} ({why}). {then}")
