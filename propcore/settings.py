"""propcore settings: profiles, database aliases, the active backend."""

import sys
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from dbmigration.pgurl import ALLOW_REQUIRE_VARIABLE, check_verified_tls
from dbmigration.state import StateError, read_active_backend
from propcore.pgserver import BadPostgresUrl, PostgresUnavailable, resolve_postgres_url
from propcore.pooling import (
    UnknownPoolingMode,
    apply_pooling,
    persistent_connections,
    pgbouncer_server_connections,
)
from propcore.profiles import UnknownProfile, get_profile

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env")  # optional; the environment wins

# Settings errors are ImproperlyConfigured with one line (variable, problem, fix): manage.py
# prints that line alone instead of a traceback.
try:
    PROFILE = get_profile(env.str("PROPCORE_ENV", "dev"))
except UnknownProfile as exc:
    raise ImproperlyConfigured(str(exc)) from None
DEBUG = env.bool("DEBUG", PROFILE.debug)

if PROFILE.needs_secrets and not env.str("SECRET_KEY", ""):
    raise ImproperlyConfigured(
        f"SECRET_KEY must be set in the environment for the {PROFILE.name} profile; set it to "
        "a long random string (python -c 'import secrets; print(secrets.token_urlsafe(50))')."
    )
SECRET_KEY = env.str("SECRET_KEY", "dev-only-insecure-key-not-for-staging-or-prod")
if PROFILE.secure_transport and not env.list("ALLOWED_HOSTS", default=[]):
    raise ImproperlyConfigured(
        f"ALLOWED_HOSTS must be set in the environment for the {PROFILE.name} profile; set it "
        "to the site's host names, comma-separated (e.g. prop.ie,www.prop.ie)."
    )
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["*"] if DEBUG else [])

# --- HTTPS only in staging and prod (check --deploy; README "Encrypted connections") ----------
SECURE_SSL_REDIRECT = PROFILE.secure_transport
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = PROFILE.secure_transport
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", PROFILE.hsts_seconds)
_https = PROFILE.secure_transport
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", _https)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", _https)
# behind a proxy that ends TLS, the redirect would loop unless Django trusts its header; only
# safe when the proxy sets X-Forwarded-Proto itself and strips the client's
if env.bool("BEHIND_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# --- Files the runbook writes -------------------------------------------------
DATABASE_DIR = Path(env.str("PROPCORE_DATABASE_DIR", str(BASE_DIR / "database")))
STATE_FILE = DATABASE_DIR / "state.json"
BACKUP_DIR = DATABASE_DIR / "backups"
REPORT_DIR = DATABASE_DIR / "reports"
LOG_DIR = DATABASE_DIR / "logs"
PRIVATE_PG_ROOT = BASE_DIR / "var" / "postgres"

# --- Databases ------------------------------------------------------------------
SQLITE_PATH = Path(env.str("SQLITE_PATH", str(DATABASE_DIR / "propcore.sqlite3")))
try:
    POSTGRES_URL = resolve_postgres_url(private_root=PRIVATE_PG_ROOT)
except (PostgresUnavailable, BadPostgresUrl) as exc:
    raise ImproperlyConfigured(str(exc)) from None

if PROFILE.needs_secrets and not (env.str("POSTGRES_URL", "") or env.str("PGPASSWORD", "")):
    raise ImproperlyConfigured(
        f"POSTGRES_URL (with its password) must be set in the environment for the "
        f"{PROFILE.name} profile; set it as postgres://USER:PASSWORD@HOST:5432/DATABASE."
    )

# Lets parallel checkouts share one server without sharing test databases.
TEST_SUFFIX = env.str("PROPCORE_TEST_SUFFIX", "")

# --- Database roles (dbmigration/roles.py, README "Security model") -----------------------
# The application connects as app_service (POSTGRES_URL); migrations and the runbook as the
# owner (POSTGRES_OWNER_URL), which may change the schema and sees every row (BYPASSRLS).
POSTGRES_OWNER_URL = env.str("POSTGRES_OWNER_URL", "")
# db_roles creates roles with BYPASSRLS, so it needs a superuser (default: the postgresql alias).
POSTGRES_ADMIN_URL = env.str("POSTGRES_ADMIN_URL", "")
DB_ROLE_SUFFIX = env.str("PROPCORE_DB_ROLE_SUFFIX", "")  # several installations, one cluster
OWNER_COMMANDS = {
    "migrate", "migration_prepare", "migrate_data", "switch_to_postgresql", "rollback_to_sqlite",
    "db_backup", "db_restore", "refresh_analytics", "security_check", "sqlflush", "flush",
    # reads every user's login events and audit entries, which the policies hide from the app
    "security_scan",
    # operator tools that act for no user: under the policies they would see no row
    "createsuperuser", "changepassword", "loaddata", "dumpdata",
}  # fmt: skip


def _runs_as_owner(argv: list[str]) -> bool:
    """A runbook or schema command: it connects with POSTGRES_OWNER_URL when that is set."""
    return bool(POSTGRES_OWNER_URL) and len(argv) > 1 and argv[1] in OWNER_COMMANDS


# native: Django's psycopg pool per process; pgbouncer: POSTGRES_URL is a PgBouncer in
# transaction mode (propcore/pooling.py says what that changes; deploy/pgbouncer.ini).
POSTGRES_POOLING = env.str("POSTGRES_POOLING", "native")


def _postgres_alias(url: str = "") -> dict:
    # runbook commands connect as the owner (POSTGRES_OWNER_URL), the app as app_service
    config = env.db_url_config(
        url or (POSTGRES_OWNER_URL if _runs_as_owner(sys.argv) else POSTGRES_URL)
    )
    config["ENGINE"] = "django.db.backends.postgresql"
    try:
        config = apply_pooling(
            config,
            POSTGRES_POOLING,
            pool_min=PROFILE.pool_min,
            pool_max=PROFILE.pool_max,
            timeout=PROFILE.pool_timeout,
        )
    except UnknownPoolingMode as exc:
        raise ImproperlyConfigured(str(exc)) from None
    config["TEST"] = {"NAME": f"test_propcore{TEST_SUFFIX}", "DEPENDENCIES": []}
    return config


DATABASES = {
    "sqlite": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": SQLITE_PATH,
        # concurrent writers queue instead of failing with "database is locked": IMMEDIATE
        # takes the write lock at BEGIN, so a read-then-write transaction never has to
        # upgrade its lock (that fails at once); the busy timeout is how long a writer waits
        # for its turn.  WAL lets readers run beside the writer (the mode is stored in the
        # file); what touches the file directly copes with it: backups and snapshots use the
        # backup API, fingerprints hash the -wal too, and the rollback writes its copy INTO
        # the live file through the backup API instead of renaming over it (rollback.swap_in)
        "OPTIONS": {
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL",
        },
        # a real file, so that tests can open it with sqlite3 as the engine does
        "TEST": {
            "NAME": str(DATABASE_DIR / f"test_propcore{TEST_SUFFIX}.sqlite3"),
            "DEPENDENCIES": [],
        },
    },
    "postgresql": _postgres_alias(),
}
try:
    ACTIVE_BACKEND = read_active_backend(STATE_FILE)
except StateError as exc:
    raise ImproperlyConfigured(str(exc)) from None
DATABASES["default"] = {**DATABASES[ACTIVE_BACKEND], "TEST": {"MIRROR": ACTIVE_BACKEND}}

# Read replicas (propcore/replicas.py): each URL of POSTGRES_REPLICA_URLS becomes an alias
# replica1, replica2... that only the router reads from; the runbook never touches them.
REPLICA_URLS = env.list("POSTGRES_REPLICA_URLS", default=[])
for _number, _url in enumerate(REPLICA_URLS, start=1):
    _replica = _postgres_alias(_url)
    if POSTGRES_POOLING == "native":
        _replica = persistent_connections(_replica)  # no pool waiting on a dead replica
    _replica["OPTIONS"].setdefault("connect_timeout", 2)  # a hung replica is skipped quickly
    DATABASES[f"replica{_number}"] = {**_replica, "TEST": {"MIRROR": "postgresql"}}
REPLICA_ROUTING = {
    "PRIMARY": "default",
    "ALIASES": [f"replica{n}" for n in range(1, len(REPLICA_URLS) + 1)],
    "MAX_LAG_BYTES": env.int("REPLICA_MAX_LAG_BYTES", 8 * 1024 * 1024),
    "MAX_LAG_SECONDS": env.float("REPLICA_MAX_LAG_SECONDS", 60.0),
    "CHECK_INTERVAL": env.float("REPLICA_CHECK_INTERVAL", 5.0),
}

# staging and prod talk to PostgreSQL only over TLS that verifies the server: sslmode
# verify-full (or require, with the documented opt-out) on every URL they may connect with
if PROFILE.secure_transport:
    _urls = [("POSTGRES_URL", POSTGRES_URL), ("POSTGRES_OWNER_URL", POSTGRES_OWNER_URL)]
    _urls += [("POSTGRES_ADMIN_URL", POSTGRES_ADMIN_URL)]
    _urls += [("POSTGRES_REPLICA_URLS", url) for url in REPLICA_URLS]
    try:
        for _name, _url in _urls:
            if _url:
                check_verified_tls(
                    _url,
                    name=_name,
                    profile=PROFILE.name,
                    allow_require=env.bool(ALLOW_REQUIRE_VARIABLE, False),
                    environ=dict(env.ENVIRON),
                )
    except BadPostgresUrl as exc:
        raise ImproperlyConfigured(str(exc)) from None

# audit entries first (they follow their row's alias), then reads to replicas
DATABASE_ROUTERS = ["propcore.routers.AuditRouter", "propcore.replicas.ReplicaRouter"]

# --- The migration engine (every key: dbmigration/conf.py; README "Using the engine in your
# own Django project").  STATE_FILE, BACKUP_DIR, REPORT_DIR, LOG_DIR and SQLITE_PATH above
# are read by it too (and by propcore's middleware and tests).
DBMIGRATION = {
    "STATE_DIR": DATABASE_DIR,
    "POOL_MAX": PROFILE.pool_max,
    # gunicorn reads WEB_CONCURRENCY for its worker count: each worker holds its own pool
    "WORKERS": env.int("WEB_CONCURRENCY", 1),
    # through PgBouncer the server sees PgBouncer's pool, not the workers' (PGBOUNCER_INI)
    "PGBOUNCER_POOL": (
        pgbouncer_server_connections(
            env.path("PGBOUNCER_INI", str(BASE_DIR / "deploy" / "pgbouncer.ini"))
        )
        if POSTGRES_POOLING == "pgbouncer"
        else None
    ),
    "MODEL_POLICIES": {},
    "PROCESS_BACKEND": "propcore.middleware.process_backend",
    "SLOW_QUERIES": "propcore.query_timing.slow_queries_since",
    "REPLICAS": "propcore.replicas.replica_status",
    "SECURITY": "security.health.unresolved_findings",
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "accounts.User"
# finds the user through a SECURITY DEFINER function, since RLS hides every row before login
AUTHENTICATION_BACKENDS = ["propcore.rls.RlsModelBackend"]

# --- Applications -----------------------------------------------------------------
INSTALLED_APPS = [
    "propcore.apps.ConsoleAdminConfig",  # django.contrib.admin + the migration console
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "auditlog",
    "health_check",
    "propcore.apps.PropcoreConfig",
    "accounts",
    "dbmigration",
    "security",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # write freeze + active-backend reload during cutover (before anything touches the DB)
    "propcore.middleware.CutoverMiddleware",
    # read-your-writes with replicas: outside SessionMiddleware so a login's save counts
    "propcore.replicas.ReplicaStickinessMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # the request's transaction, carrying app.user_id / app.role for row-level security
    "propcore.rls.RlsIdentityMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "auditlog.middleware.AuditlogMiddleware",
    "propcore.query_tags.QueryTagMiddleware",  # SQL comments name the view (db_top_queries)
]

ROOT_URLCONF = "propcore.urls"
WSGI_APPLICATION = "propcore.wsgi.application"
ASGI_APPLICATION = "propcore.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-ie"
TIME_ZONE = "Europe/Dublin"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"

# --- Audit trail --------------------------------------------------------------------
AUDITLOG_DISABLE_ON_RAW_SAVE = True  # loaddata and raw saves are data moves, not user actions

# --- Threat detection (manage.py security_scan; every key and its default: security/conf.py,
# README "Threat detection").  Only what differs from the defaults goes here.
SECURITY_SCAN: dict = {}

# --- Slow queries -------------------------------------------------------------------
try:  # float() itself: django-environ would read '1s' as 1.0 without a word
    SLOW_QUERY_MS = float(env.str("SLOW_QUERY_MS", "") or 1000.0)
except ValueError:
    raise ImproperlyConfigured(
        f"SLOW_QUERY_MS={env.str('SLOW_QUERY_MS')!r} is not a number; set it to milliseconds, "
        "e.g. 1000."
    ) from None

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "propcore": {"level": PROFILE.log_level},
        "propcore.slow_query": {"level": "WARNING"},
        # runbook steps go to database/logs/ (reports.RunReport); the console gets the summaries
        "dbmigration": {"level": "WARNING"},
    },
}
