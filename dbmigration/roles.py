"""Database roles: who may do what in the target database (``manage.py db_roles``).

One desired state, compared with PostgreSQL's catalog; the differences are both the drift
report (``--check``) and the SQL that removes them (``--plan`` prints it, a plain run
executes it in one transaction).  Running it again finds nothing to do.

- owner (``propcore_owner``): owns the schema, every table, view, type and function;
  BYPASSRLS, because FORCE ROW LEVEL SECURITY applies to owners too and the runbook
  (verify, sync, rollback, backups) must see every row.  NOLOGIN unless asked.
- app (``app_service``): the running application.  DML on the application's tables, USAGE on
  their sequences, EXECUTE on the functions policies call; no DDL, no TRUNCATE, owns nothing,
  NOBYPASSRLS: every row it reads passes the row-level security policies.
- admin (``admin_role``): the staff tools; the same rights as app, under the staff policies.
- developer (``developer_role``): read-only debugging of production.  It sees every row
  (BYPASSRLS) but only the columns that are not personal data (column privileges).
- analytics (``analytics_role``): reads the analytics materialized views only.
- auditor (``auditor``): never logs in; pgaudit's object audit role (``pgaudit.role``, see
  deploy/postgresql-audit.conf).  Its DML grants on the personal-data tables are what makes
  pgaudit log every read and write of them, by anyone.

Passwords never appear in a plan, a message or the server log: the statement carries the
SCRAM verifier libpq computes on this side.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable

from dbmigration.errors import RolesError

BASE_NAMES = {
    "owner": "propcore_owner",
    "app": "app_service",
    "admin": "admin_role",
    "developer": "developer_role",
    "analytics": "analytics_role",
    "auditor": "auditor",
}

# Columns that hold personal data: hidden from developer_role.  A table missing here is
# shown to developers in full, so a new table with personal data must be added.
PERSONAL_COLUMNS = {
    "accounts_user": {
        "email", "first_name", "last_name", "phone", "password", "preferences", "metadata",
    },
    "accounts_organisation": {"email", "phone"},
    "accounts_kycverification": {"document_reference", "notes"},
    "accounts_loginevent": {"email_attempted", "ip_address", "user_agent"},
    "auditlog_logentry": {
        "changes", "changes_text", "object_repr", "remote_addr", "remote_port",
        "additional_data", "serialized_data", "actor_email",
    },
    "django_admin_log": {"object_repr", "change_message"},
    "django_session": {"session_data"},
    "security_securityfinding": {"subject", "detail", "evidence", "resolution_note"},
}  # fmt: skip

# pgaudit logs each statement reading or writing a table its role (auditor) holds that
# privilege on: every table with personal data, for SELECT, INSERT, UPDATE and DELETE.
AUDITED_TABLES = frozenset(PERSONAL_COLUMNS)

# Tables the application reads but never changes.
READ_ONLY_TABLES = {"django_migrations"}
DML = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})
MAX_ROUNDS = 3


@dataclasses.dataclass(frozen=True)
class RoleSpec:
    kind: str
    login: bool | None  # None: left as it is (the owner logs in only where asked)
    bypassrls: bool
    inherit: bool = False


@dataclasses.dataclass(frozen=True)
class RoleNames:
    owner: str
    app: str
    admin: str
    developer: str
    analytics: str
    auditor: str

    def of(self, kind: str) -> str:
        return getattr(self, kind)

    def all(self) -> list[str]:
        return [self.of(kind) for kind in BASE_NAMES]


def role_names(*, suffix: str = "") -> RoleNames:
    """The five role names; a suffix lets several installations share one cluster."""
    return RoleNames(**{kind: f"{base}{suffix}" for kind, base in BASE_NAMES.items()})


def role_specs(*, owner_login: bool | None = None) -> dict[str, RoleSpec]:
    return {
        "owner": RoleSpec("owner", login=owner_login, bypassrls=True, inherit=True),
        "app": RoleSpec("app", login=True, bypassrls=False),
        "admin": RoleSpec("admin", login=True, bypassrls=False),
        "developer": RoleSpec("developer", login=True, bypassrls=True),
        "analytics": RoleSpec("analytics", login=True, bypassrls=False),
        "auditor": RoleSpec("auditor", login=False, bypassrls=False),
    }


@dataclasses.dataclass
class Change:
    """One difference between the catalog and the desired state, and its fix."""

    what: str  # one line, for --check
    sql: str  # for --plan and the run; never holds a password
    secret: str | None = None  # the statement actually run, when it carries a verifier


@dataclasses.dataclass
class RolesResult:
    names: RoleNames
    changes: list[Change]
    applied: bool = False

    @property
    def drift(self) -> bool:
        return bool(self.changes)


Progress = Callable[[str, str, int, int], None] | None


def q(name: str) -> str:
    """Quote an identifier."""
    return '"' + name.replace('"', '""') + '"'


# --- what the catalog says ------------------------------------------------------------------


@dataclasses.dataclass
class Catalog:
    roles: dict[str, dict]
    relations: dict[str, tuple[str, str]]  # name -> (relkind, owner)
    columns: dict[str, list[str]]
    grants: dict[tuple[str, str, str | None], set[str]]  # (role, object, column) -> privileges
    types: dict[str, str]  # enum name -> owner
    functions: dict[str, tuple[str, str]]  # signature -> (owner, quoted signature)
    schema_owner: str


OBJECT_KEYWORD = {"r": "TABLE", "p": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW"}


def read_catalog(conn, *, names: RoleNames) -> Catalog:
    """The roles, owners and grants of schema public that db_roles manages."""
    one = conn.execute
    roles = {
        row[0]: {
            "login": row[1],
            "bypassrls": row[2],
            "superuser": row[3],
            "createrole": row[4],
            "createdb": row[5],
            "inherit": row[6],
        }
        for row in one(
            "SELECT rolname, rolcanlogin, rolbypassrls, rolsuper, rolcreaterole, rolcreatedb, "
            "rolinherit FROM pg_roles WHERE rolname = ANY(%s)",
            [names.all()],
        )
    }
    not_extension = (
        "NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = {oid} AND d.deptype = 'e')"
    )
    relations = {
        row[0]: (row[1], row[2])
        for row in one(
            "SELECT c.relname, c.relkind, pg_get_userbyid(c.relowner) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
            "AND c.relkind IN ('r', 'p', 'v', 'm', 'S') AND " + not_extension.format(oid="c.oid")
        )
    }
    columns: dict[str, list[str]] = defaultdict(list)
    for table, column in one(
        "SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
        "AND c.relkind IN ('r', 'p', 'v', 'm') AND a.attnum > 0 AND NOT a.attisdropped "
        "ORDER BY c.relname, a.attnum"
    ):
        columns[table].append(column)
    grants: dict[tuple[str, str, str | None], set[str]] = defaultdict(set)
    for role, obj, column, privilege in one(
        "SELECT r.rolname, c.relname, NULL, x.privilege_type FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace CROSS JOIN LATERAL aclexplode(c.relacl) x "
        "JOIN pg_roles r ON r.oid = x.grantee WHERE n.nspname = 'public' "
        "AND r.rolname = ANY(%(roles)s) "
        "UNION ALL "
        "SELECT r.rolname, c.relname, a.attname, x.privilege_type FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "CROSS JOIN LATERAL aclexplode(a.attacl) x JOIN pg_roles r ON r.oid = x.grantee "
        "WHERE n.nspname = 'public' AND r.rolname = ANY(%(roles)s) "
        "UNION ALL "
        "SELECT r.rolname, 'function ' || p.oid::regprocedure::text, NULL, x.privilege_type "
        "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "CROSS JOIN LATERAL aclexplode(p.proacl) x JOIN pg_roles r ON r.oid = x.grantee "
        "WHERE n.nspname = 'public' AND r.rolname = ANY(%(roles)s) "
        "UNION ALL "
        "SELECT r.rolname, 'schema public', NULL, x.privilege_type FROM pg_namespace n "
        "CROSS JOIN LATERAL aclexplode(n.nspacl) x JOIN pg_roles r ON r.oid = x.grantee "
        "WHERE n.nspname = 'public' AND r.rolname = ANY(%(roles)s)",
        {"roles": [names.app, names.admin, names.developer, names.analytics, names.auditor]},
    ):
        grants[(role, obj, column)].add(privilege)
    types = {
        row[0]: row[1]
        for row in one(
            "SELECT t.typname, pg_get_userbyid(t.typowner) FROM pg_type t JOIN pg_namespace n "
            "ON n.oid = t.typnamespace WHERE n.nspname = 'public' AND t.typtype = 'e' AND "
            + not_extension.format(oid="t.oid")
        )
    }
    functions = {
        f"function {row[0]}": (row[1], row[0])
        for row in one(
            "SELECT p.oid::regprocedure::text, pg_get_userbyid(p.proowner) FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public' AND "
            + not_extension.format(oid="p.oid")
        )
    }
    schema_owner = one(
        "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'public'"
    ).fetchone()[0]
    return Catalog(roles, relations, dict(columns), grants, types, functions, schema_owner)


# --- what it should say ---------------------------------------------------------------------


def desired_grants(catalog: Catalog, *, names: RoleNames) -> dict[tuple, set[str]]:
    """(role, object, column or None) -> privileges, for the managed roles below the owner."""
    want: dict[tuple, set[str]] = defaultdict(set)
    for role in (names.app, names.admin, names.developer, names.analytics):
        want[(role, "schema public", None)] = {"USAGE"}
    for name, (kind, _owner) in catalog.relations.items():
        for role in (names.app, names.admin):
            if kind == "S":
                want[(role, name, None)] = {"USAGE"}
            elif kind in "rp":
                want[(role, name, None)] = {"SELECT"} if name in READ_ONLY_TABLES else set(DML)
            else:
                want[(role, name, None)] = {"SELECT"}
        if kind in "rpv" or kind == "m":
            hidden = PERSONAL_COLUMNS.get(name, set())
            if not hidden:
                want[(names.developer, name, None)] = {"SELECT"}
            else:
                for column in catalog.columns.get(name, []):
                    if column not in hidden:
                        want[(names.developer, name, column)] = {"SELECT"}
        if kind == "m":
            want[(names.analytics, name, None)] = {"SELECT"}
        if kind in "rp" and name in AUDITED_TABLES:
            want[(names.auditor, name, None)] = set(DML)
    for signature in catalog.functions:
        for role in (names.app, names.admin):
            want[(role, signature, None)] = {"EXECUTE"}
    return want


def _object_sql(obj: str, kind: str | None) -> str:
    if obj == "schema public":
        return "SCHEMA public"
    if obj.startswith("function "):
        return "FUNCTION " + obj.removeprefix("function ")
    return ("SEQUENCE " if kind == "S" else "TABLE ") + q(obj)


def diff(
    catalog: Catalog,
    *,
    names: RoleNames,
    specs: dict[str, RoleSpec],
    verifiers: dict[str, str],
) -> list[Change]:
    """Every difference between the catalog and the desired state, with the SQL fixing it."""
    changes: list[Change] = []
    for kind, spec in specs.items():
        role = names.of(kind)
        current = catalog.roles.get(role)
        login = spec.login if spec.login is not None else bool(current and current["login"])
        attrs = (
            f"{'LOGIN' if login else 'NOLOGIN'} {'BYPASSRLS' if spec.bypassrls else 'NOBYPASSRLS'} "
            f"{'INHERIT' if spec.inherit else 'NOINHERIT'} NOSUPERUSER NOCREATEDB NOCREATEROLE"
        )
        if current is None:
            changes.append(Change(f"role {role} is missing", f"CREATE ROLE {q(role)} {attrs}"))
        else:
            wrong = [
                f"{attr}={current[attr]} (want {value})"
                for attr, value in (
                    ("login", login),
                    ("bypassrls", spec.bypassrls),
                    ("inherit", spec.inherit),
                    ("superuser", False),
                    ("createrole", False),
                    ("createdb", False),
                )
                if current[attr] != value
            ]
            if wrong:
                changes.append(
                    Change(f"role {role} has {', '.join(wrong)}", f"ALTER ROLE {q(role)} {attrs}")
                )
        if role in verifiers:
            changes.append(
                Change(
                    f"role {role}: set its password",
                    f"ALTER ROLE {q(role)} PASSWORD '********'",
                    secret=f"ALTER ROLE {q(role)} PASSWORD '{verifiers[role]}'",
                )
            )
    owner = names.owner
    if catalog.schema_owner != owner:
        changes.append(
            Change(
                f"schema public is owned by {catalog.schema_owner}, not {owner}",
                f"ALTER SCHEMA public OWNER TO {q(owner)}",
            )
        )
    for name, (kind, current_owner) in sorted(catalog.relations.items()):
        # sequences follow their table's owner (identity columns)
        if kind != "S" and current_owner != owner:
            changes.append(
                Change(
                    f"{name} is owned by {current_owner}, not {owner}",
                    f"ALTER {OBJECT_KEYWORD[kind]} {q(name)} OWNER TO {q(owner)}",
                )
            )
    for name, current_owner in sorted(catalog.types.items()):
        if current_owner != owner:
            changes.append(
                Change(
                    f"type {name} is owned by {current_owner}, not {owner}",
                    f"ALTER TYPE {q(name)} OWNER TO {q(owner)}",
                )
            )
    for signature, (current_owner, sql_name) in sorted(catalog.functions.items()):
        if current_owner != owner:
            changes.append(
                Change(
                    f"{signature} is owned by {current_owner}, not {owner}",
                    f"ALTER FUNCTION {sql_name} OWNER TO {q(owner)}",
                )
            )
    want = desired_grants(catalog, names=names)
    for key in sorted(set(want) | set(catalog.grants), key=lambda k: (k[0], k[1], k[2] or "")):
        role, obj, column = key
        kind = catalog.relations.get(obj, (None,))[0]
        target = _object_sql(obj, kind)
        cols = f" ({q(column)})" if column else ""
        where = f"{obj}.{column}" if column else obj
        missing = sorted(want.get(key, set()) - catalog.grants.get(key, set()))
        extra = sorted(catalog.grants.get(key, set()) - want.get(key, set()))
        if missing:
            privs = ", ".join(p + cols for p in missing)
            changes.append(
                Change(
                    f"{role} lacks {', '.join(missing)} on {where}",
                    f"GRANT {privs} ON {target} TO {q(role)}",
                )
            )
        if extra:
            privs = ", ".join(p + cols for p in extra)
            changes.append(
                Change(
                    f"{role} has extra {', '.join(extra)} on {where}",
                    f"REVOKE {privs} ON {target} FROM {q(role)}",
                )
            )
    return changes


# --- the entry points -----------------------------------------------------------------------


def scram_verifier(conn, *, role: str, password: str) -> str:
    """The SCRAM-SHA-256 verifier of a password, computed by libpq on this side."""
    return conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256").decode()


def sync_roles(
    *,
    conninfo: dict,
    names: RoleNames,
    passwords: dict[str, str] | None = None,
    owner_login: bool | None = None,
    apply: bool = True,
    progress: Progress = None,
) -> RolesResult:
    """Compare the roles, owners and grants with the desired state; apply the changes if asked.

    ``passwords`` maps a role kind ("app", ...) to its new password.  With ``apply=False``
    nothing is written (``--plan`` and ``--check``).
    """
    import psycopg

    from dbmigration.preflight import connect

    specs = role_specs(owner_login=owner_login)
    with connect(conninfo) as conn:
        verifiers = {
            names.of(kind): scram_verifier(conn, role=names.of(kind), password=password)
            for kind, password in (passwords or {}).items()
        }
        changes = diff(
            read_catalog(conn, names=names), names=names, specs=specs, verifiers=verifiers
        )
        if not apply or not changes:
            return RolesResult(names, changes, applied=False)
        applied: list[Change] = []
        try:
            with conn.transaction():
                # a new owner inherits the old owner's grants: the second round sees them
                for _round in range(MAX_ROUNDS):
                    for done, change in enumerate(changes, 1):
                        conn.execute(change.secret or change.sql)
                        if progress:
                            progress("db_roles", change.what, done, len(changes))
                    applied += changes
                    changes = diff(
                        read_catalog(conn, names=names), names=names, specs=specs, verifiers={}
                    )
                    if not changes:
                        break
                else:
                    raise RolesError(
                        f"db_roles did not converge: {changes[0].what}. Fix: look at that "
                        "object's owner and grants by hand."
                    )
        except psycopg.errors.InsufficientPrivilege as exc:
            raise RolesError(
                f"db_roles was refused ({exc.diag.message_primary}). Fix: run it as a "
                "superuser (POSTGRES_ADMIN_URL), which may create roles with BYPASSRLS."
            ) from None
    return RolesResult(names, applied, applied=True)


def drop_roles(*, conninfo: dict, names: RoleNames, new_owner: str) -> None:
    """Give what the roles own in this database to new_owner, then drop the roles."""
    from dbmigration.preflight import connect

    with connect(conninfo) as conn:
        existing = {
            row[0]
            for row in conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", [names.all()]
            )
        }
        for role in names.all():
            if role in existing:
                conn.execute(f"REASSIGN OWNED BY {q(role)} TO {q(new_owner)}")
                conn.execute(f"DROP OWNED BY {q(role)}")
                conn.execute(f"DROP ROLE {q(role)}")
