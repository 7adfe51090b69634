"""Is PostgreSQL's own audit trail (pgaudit) set up as deploy/postgresql-audit.conf says?

Read from the server (``pg_settings``, the auditor role's grants), for db_test_postgresql:
a warning, never a failure, since the migration itself does not need it.
"""

from __future__ import annotations

from dbmigration.preflight import Check, connect
from dbmigration.roles import AUDITED_TABLES, DML

CONF_FILE = "deploy/postgresql-audit.conf"
SESSION_CLASSES = {"ddl", "role"}  # audited for everyone, on every table
NOISY_CLASSES = {"all", "read", "write"}  # every statement: the log grows ~1000x in a bulk load


def pgaudit_check(*, conninfo: dict, auditor_role: str) -> Check:
    """One check line: pgaudit loaded, auditing DDL and ROLE, and personal data via the role."""
    with connect(conninfo) as conn:
        one = conn.execute
        # a placeholder (pgaudit.* set, library not loaded) is not listed in pg_settings
        settings = dict(one("SELECT name, setting FROM pg_settings WHERE name LIKE 'pgaudit.%'"))
        if not settings:
            return _warning(
                "pgaudit is not loaded (shared_preload_libraries): no database-level audit trail"
            )
        problems = []
        classes = {c.strip().lower() for c in settings.get("pgaudit.log", "").split(",")}
        if "all" not in classes and not classes >= SESSION_CLASSES:
            problems.append(f"pgaudit.log is '{settings.get('pgaudit.log')}' (want 'ddl, role')")
        if classes & NOISY_CLASSES:
            problems.append(
                f"pgaudit.log '{settings.get('pgaudit.log')}' logs every statement of its class "
                "(a bulk load multiplies the log)"
            )
        if settings.get("pgaudit.log_parameter") != "off":
            problems.append("pgaudit.log_parameter is on (values of personal data get logged)")
        role = settings.get("pgaudit.role", "")
        if role != auditor_role:
            problems.append(f"pgaudit.role is '{role}' (want '{auditor_role}')")
        elif not one("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone():
            problems.append(f"role {role} does not exist (run db_roles)")
        else:
            unaudited = [
                table
                for (table,) in one(
                    "SELECT c.relname FROM pg_class c JOIN pg_namespace n "
                    "ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
                    "AND c.relname = ANY(%s) AND NOT ("
                    + " AND ".join(f"has_table_privilege(%s, c.oid, '{p}')" for p in sorted(DML))
                    + ") ORDER BY 1",
                    [sorted(AUDITED_TABLES), *[role] * len(DML)],
                )
            ]
            if unaudited:
                problems.append(
                    f"{role} lacks SELECT/INSERT/UPDATE/DELETE on {', '.join(unaudited)} "
                    "(run db_roles)"
                )
        if problems:
            return _warning("; ".join(problems))
        return Check(
            "pgaudit",
            True,
            f"pgaudit {settings.get('pgaudit.log')}, and reads and writes of the personal-data "
            f"tables through role {role}",
        )


def _warning(detail: str) -> Check:
    # the fix goes into the detail: Check.line() shows a fix only for failures
    return Check("pgaudit", True, f"{detail}; {CONF_FILE} has the documented setup", warning=True)
