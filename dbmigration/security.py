"""Is row-level security really in force?  ``manage.py security_check`` and db_test_postgresql.

Read from PostgreSQL's catalog, never from our own list of what we meant to protect:
- every table with a foreign key to the user table (and the user table) has ENABLE and FORCE
  ROW LEVEL SECURITY and at least one policy, and an index on each such column;
- no policy is always true, and none compares with ``current_setting('app.user_id')``
  without ``nullif(..., '')`` (the empty string left after a transaction must match nothing);
- every view is ``security_invoker`` (a view otherwise reads as its owner, who bypasses RLS);
- the application's role owns nothing and is neither superuser nor BYPASSRLS.
"""

from __future__ import annotations

import dataclasses
import re

from dbmigration.preflight import Check, connect

USER_TABLE = "accounts_user"
UNGUARDED_SETTING = re.compile(r"(?<!nullif\()current_setting\('app\.user_id'", re.IGNORECASE)


@dataclasses.dataclass
class Finding:
    kind: str  # rls_missing, policy_missing, policy_open, index_missing, view_definer, app_role
    relation: str
    detail: str

    def line(self) -> str:
        return f"{self.relation}: {self.detail}"


@dataclasses.dataclass
class SecurityReport:
    app_role: str
    protected: list[str]
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not self.findings


def check_security(*, conninfo: dict, app_role: str) -> SecurityReport:
    """Every finding that makes row-level security weaker than the README promises."""
    findings: list[Finding] = []
    with connect(conninfo) as conn:
        one = conn.execute
        person_columns: dict[str, list[str]] = {USER_TABLE: ["id"]}
        for table, column in one(
            "SELECT c.conrelid::regclass::text, a.attname FROM pg_constraint c "
            "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey) "
            "WHERE c.contype = 'f' AND c.confrelid = %s::regclass ORDER BY 1, 2",
            [USER_TABLE],
        ):
            person_columns.setdefault(table, []).append(column)
        for table, columns in sorted(person_columns.items()):
            enabled, forced, policies = one(
                "SELECT relrowsecurity, relforcerowsecurity, "
                "(SELECT count(*) FROM pg_policy WHERE polrelid = c.oid) FROM pg_class c "
                "WHERE oid = %s::regclass",
                [table],
            ).fetchone()
            if not (enabled and forced):
                findings.append(
                    Finding(
                        "rls_missing",
                        table,
                        "holds a person's data without ENABLE and FORCE ROW LEVEL SECURITY; "
                        "add both, with policies, in a migration",
                    )
                )
            if not policies:
                findings.append(
                    Finding(
                        "policy_missing",
                        table,
                        "has no policy; add one reading nullif(current_setting('app.user_id', "
                        "true), '')",
                    )
                )
            for column in columns:
                indexed = one(
                    "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a "
                    "ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
                    "WHERE i.indrelid = %s::regclass AND a.attname = %s)",
                    [table, column],
                ).fetchone()[0]
                if not indexed:
                    findings.append(
                        Finding(
                            "index_missing",
                            table,
                            f"column {column} is what a policy filters on and has no index "
                            "starting with it; add one",
                        )
                    )
        for table, name, using, check in one(
            "SELECT tablename, policyname, qual, with_check FROM pg_policies "
            "WHERE schemaname = 'public' ORDER BY 1, 2"
        ):
            for expression in (using, check):
                if expression is None:
                    continue
                if expression.strip("() ").lower() == "true":
                    findings.append(Finding("policy_open", table, f"policy {name} is always true"))
                elif UNGUARDED_SETTING.search(expression.replace(" ", "")):
                    findings.append(
                        Finding(
                            "policy_open",
                            table,
                            f"policy {name} reads app.user_id without nullif(..., ''): the "
                            "empty value left after a transaction could match rows",
                        )
                    )
        for name, body in one(
            "SELECT p.proname, p.prosrc FROM pg_proc p JOIN pg_namespace n "
            "ON n.oid = p.pronamespace WHERE n.nspname = 'public' AND NOT EXISTS "
            "(SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')"
        ):
            if UNGUARDED_SETTING.search(body.replace(" ", "")):
                findings.append(
                    Finding(
                        "policy_open",
                        f"function {name}",
                        "reads app.user_id without nullif(..., ''): the empty value left "
                        "after a transaction could match rows",
                    )
                )
        for (view,) in one(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind = 'v' AND NOT coalesce("
            "c.reloptions && ARRAY['security_invoker=true', 'security_invoker=on', "
            "'security_invoker=1'], false) ORDER BY 1"
        ):
            findings.append(
                Finding(
                    "view_definer",
                    view,
                    "view reads with its owner's rights, bypassing RLS; recreate it WITH "
                    "(security_invoker = true)",
                )
            )
        findings += _app_role_findings(one, app_role)
    return SecurityReport(app_role, sorted(person_columns), findings)


def _app_role_findings(one, app_role: str) -> list[Finding]:
    row = one(
        "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = %s", [app_role]
    ).fetchone()
    if row is None:
        return [
            Finding("app_role", app_role, "the application's role does not exist; run db_roles")
        ]
    findings = []
    if row[0] or row[1]:
        findings.append(
            Finding(
                "app_role",
                app_role,
                "the application's role is SUPERUSER or BYPASSRLS, so no policy binds it; "
                "run db_roles",
            )
        )
    for (relation,) in one(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND pg_get_userbyid(c.relowner) = %s ORDER BY 1",
        [app_role],
    ):
        findings.append(
            Finding(
                "app_role",
                relation,
                f"owned by the application's role {app_role}; run db_roles to give it to the owner",
            )
        )
    return findings


def app_role_check(*, conninfo: dict, strict: bool) -> Check:
    """The role the application connects as; with ``strict`` (prod) owners and superusers fail."""
    with connect(conninfo) as conn:
        role, superuser, bypassrls, owned = conn.execute(
            "SELECT current_user, r.rolsuper, r.rolbypassrls, (SELECT count(*) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
            "AND c.relowner = r.oid) FROM pg_roles r WHERE r.rolname = current_user"
        ).fetchone()
    powers = [text for text, has in (("superuser", superuser), ("BYPASSRLS", bypassrls)) if has] + (
        [f"owner of {owned} relation(s)"] if owned else []
    )
    detail = f"the application connects as {role}" + (
        f" ({', '.join(powers)}: row-level security does not bind it)" if powers else ""
    )
    return Check(
        "app_role",
        not (strict and powers),
        detail,
        "connect POSTGRES_URL as app_service (manage.py db_roles) and keep the owner for "
        "POSTGRES_OWNER_URL",
        warning=bool(powers),
    )
