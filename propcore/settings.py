"""propcore settings: profiles, database aliases, the active backend."""

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from dbmigration.state import read_active_backend
from propcore.pgserver import PostgresUnavailable, resolve_postgres_url
from propcore.profiles import get_profile

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env")  # optional; the environment wins

PROFILE = get_profile(env.str("PROPCORE_ENV", "dev"))
DEBUG = env.bool("DEBUG", PROFILE.debug)

if PROFILE.needs_secrets and not env.str("SECRET_KEY", ""):
    raise ImproperlyConfigured(
        f"SECRET_KEY must be set in the environment for the {PROFILE.name} profile."
    )
SECRET_KEY = env.str("SECRET_KEY", "dev-only-insecure-key-not-for-staging-or-prod")
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["*"] if DEBUG else [])

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
except PostgresUnavailable as exc:
    raise ImproperlyConfigured(str(exc)) from exc

if PROFILE.needs_secrets and not (env.str("POSTGRES_URL", "") or env.str("PGPASSWORD", "")):
    raise ImproperlyConfigured(
        f"POSTGRES_URL (with its password) must be set in the environment for the "
        f"{PROFILE.name} profile."
    )

# Lets parallel checkouts share one server without sharing test databases.
TEST_SUFFIX = env.str("PROPCORE_TEST_SUFFIX", "")


def _postgres_alias() -> dict:
    config = env.db_url_config(POSTGRES_URL)
    config["ENGINE"] = "django.db.backends.postgresql"
    config["CONN_MAX_AGE"] = 0  # required by the pool
    config.setdefault("OPTIONS", {})
    config["OPTIONS"]["pool"] = {
        "min_size": PROFILE.pool_min,
        "max_size": PROFILE.pool_max,
        "timeout": PROFILE.pool_timeout,
    }
    config["TEST"] = {"NAME": f"test_propcore{TEST_SUFFIX}", "DEPENDENCIES": []}
    return config


DATABASES = {
    "sqlite": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": SQLITE_PATH,
        # concurrent writers queue instead of failing with "database is locked": WAL lets
        # readers go on beside a writer; IMMEDIATE takes the write lock at BEGIN, so a
        # read-then-write transaction never has to upgrade its lock (that fails at once);
        # the busy timeout is how long a writer waits for its turn
        "OPTIONS": {
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL",
        },
        # a real file, so that tests can open it with sqlite3 as the engine does
        "TEST": {
            "NAME": str(DATABASE_DIR / f"test_propcore{TEST_SUFFIX}.sqlite3"),
            "DEPENDENCIES": [],
        },
    },
    "postgresql": _postgres_alias(),
}
ACTIVE_BACKEND = read_active_backend(STATE_FILE)
DATABASES["default"] = {**DATABASES[ACTIVE_BACKEND], "TEST": {"MIRROR": ACTIVE_BACKEND}}

DATABASE_ROUTERS = ["propcore.routers.AuditRouter"]

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "accounts.User"

# --- Applications -----------------------------------------------------------------
INSTALLED_APPS = [
    "django.contrib.admin",
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
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # write freeze + active-backend reload during cutover (before anything touches the DB)
    "propcore.middleware.CutoverMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "auditlog.middleware.AuditlogMiddleware",
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

# --- Slow queries -------------------------------------------------------------------
SLOW_QUERY_MS = env.float("SLOW_QUERY_MS", 1000.0)

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
