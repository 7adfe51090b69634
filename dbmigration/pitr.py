"""Point-in-time recovery with pgBackRest: configure, back up, report, restore to a time.

pgBackRest does the work (archive-push, backup, expire, verify, restore).  This module
writes its configuration from ``DBMIGRATION['PITR']`` (dbmigration/conf.py), runs it as
the server's OS user, and turns its JSON output and its failures into dataclasses and
our exceptions.  It never prints.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from django.db import connections

from dbmigration import conf
from dbmigration.errors import PitrError, RestoreTargetError, TargetError

# settings the server needs for pgBackRest's WAL archiving; wal_level 'logical' also works
SERVER_SETTINGS = ("archive_mode", "archive_command", "wal_level")
DEFAULT_CONFIG = Path("/etc/pgbackrest/pgbackrest.conf")
BACKUP_TYPES = ("full", "diff", "incr")

Progress = Callable[[str, str, int, int], None]


def _no_progress(stage: str, item: str, done: int, total: int) -> None:
    pass


# --- running pgbackrest ---------------------------------------------------------------


def _as_os_user(cmd: list[str], user: str | None) -> list[str]:
    # pgBackRest must read the data directory and write the repository as the server's
    # user; root hands over with runuser, any other user is trusted to be that user.
    if user and os.geteuid() == 0:
        return ["runuser", "-u", user, "--", *cmd]
    return cmd


def _chown(path: Path, user: str | None) -> None:
    if user and os.geteuid() == 0:
        shutil.chown(path, user, pwd.getpwnam(user).pw_gid)


def _error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"\b(ERROR|FATAL|PANIC):", line)]
    return (errors or lines or ["no output"])[0]


def pgbackrest(*args: str, stanza: bool = True, timeout: float = 3600) -> str:
    """Run one pgbackrest command with our config as the server's OS user; return stdout."""
    options = conf.pitr()
    cmd = ["pgbackrest", f"--config={options['CONFIG']}"]
    if stanza:
        cmd.append(f"--stanza={options['STANZA']}")
    cmd += list(args)
    try:
        proc = subprocess.run(
            _as_os_user(cmd, options["OS_USER"]), capture_output=True, text=True, timeout=timeout
        )
    except FileNotFoundError as exc:
        raise PitrError(
            "pgbackrest is not installed: run `make install` (it installs Debian's pgbackrest)"
        ) from exc
    if proc.returncode:
        raise PitrError(
            f"pgbackrest {args[0]} failed (exit {proc.returncode}): "
            f"{_error_line(proc.stderr + proc.stdout)}; fix that, then run db_pitr check"
        )
    return proc.stdout


# --- the server ----------------------------------------------------------------------


def _connect(alias: str = conf.TARGET_ALIAS, **overrides):
    import psycopg

    cfg = connections.settings[alias]
    params = {"dbname": cfg["NAME"], "connect_timeout": 5, "autocommit": True}
    for key, name in (("USER", "user"), ("PASSWORD", "password"), ("HOST", "host")):
        if cfg.get(key):
            params[name] = cfg[key]
    if cfg.get("PORT"):
        params["port"] = int(cfg["PORT"])
    params.update(overrides)
    try:
        return psycopg.connect(**params)
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TargetError(
            f"PostgreSQL does not answer: {first}; start it or fix the alias"
        ) from exc


@dataclasses.dataclass
class Server:
    data_directory: str
    port: int
    socket_dir: str
    current: dict[str, str]  # the SERVER_SETTINGS as the server runs them now
    postmaster_only: set[str]  # those of them that need a restart to change
    hba_file: str = ""  # outside the data directory on Debian (/etc/postgresql/...)
    ident_file: str = ""


def inspect_server(alias: str = conf.TARGET_ALIAS) -> Server:
    """What pgBackRest's config needs to know about the server (superuser only)."""
    with _connect(alias) as conn:
        rows = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('data_directory', 'port', 'unix_socket_directories', 'hba_file', 'ident_file')"
            ).fetchall()
        )
        if "data_directory" not in rows:
            raise TargetError(
                "the postgresql alias's role cannot see data_directory: db_pitr needs a "
                "superuser (or pg_read_all_settings) on the server it configures"
            )
        settings = conn.execute(
            "SELECT name, setting, context FROM pg_settings WHERE name = ANY(%s)",
            [list(SERVER_SETTINGS)],
        ).fetchall()
    return Server(
        data_directory=rows["data_directory"],
        port=int(rows["port"]),
        socket_dir=(rows.get("unix_socket_directories") or "/var/run/postgresql").split(",")[0],
        current={name: value for name, value, _ in settings},
        postmaster_only={name for name, _, context in settings if context == "postmaster"},
        hba_file=rows.get("hba_file", ""),
        ident_file=rows.get("ident_file", ""),
    )


def archive_command() -> str:
    options = conf.pitr()
    config = "" if options["CONFIG"] == DEFAULT_CONFIG else f"--config={options['CONFIG']} "
    return f"pgbackrest {config}--stanza={options['STANZA']} archive-push %p"


def wanted_settings(server: Server) -> dict[str, str]:
    """The server settings WAL archiving to pgBackRest needs."""
    wal_level = server.current.get("wal_level")
    return {
        "archive_mode": "on",
        "archive_command": archive_command(),
        "wal_level": wal_level if wal_level in ("replica", "logical") else "replica",
    }


def render_config(server: Server) -> str:
    """The pgbackrest.conf text for this server and DBMIGRATION['PITR']."""
    options = conf.pitr()
    home = options["CONFIG"].parent
    return "\n".join(
        [
            "# written by `manage.py db_pitr setup` from DBMIGRATION['PITR']: change those",
            "# settings and rerun setup rather than editing this file",
            "[global]",
            f"repo1-path={options['REPO_PATH']}",
            *retention_lines(options),
            f"repo1-retention-diff={options['RETENTION_DIFF']}",
            f"process-max={options['PROCESS_MAX']}",
            f"compress-type={options['COMPRESS_TYPE']}",
            "start-fast=y",  # a checkpoint now, not at the next scheduled one
            f"log-path={home / 'log'}",
            f"lock-path={home / 'lock'}",
            "",
            f"[{options['STANZA']}]",
            f"pg1-path={server.data_directory}",
            f"pg1-port={server.port}",
            f"pg1-socket-path={server.socket_dir}",
            "",
        ]
    )


def retention_lines(options: dict) -> list[str]:
    """pgBackRest's retention: full backups by count, or by days of recovery window."""
    days = options["RETENTION_FULL_DAYS"]
    if days:
        # time-based: keep the full backups (and their WAL) that cover the last N days
        return ["repo1-retention-full-type=time", f"repo1-retention-full={days}"]
    return [f"repo1-retention-full={options['RETENTION_FULL']}"]


def describe_retention(options: dict | None = None) -> str:
    """One line: what pgBackRest keeps, as configured."""
    options = options or conf.pitr()
    days = options["RETENTION_FULL_DAYS"]
    full = (
        f"full backups covering the last {days} day{'s' if days != 1 else ''} of recovery"
        if days
        else f"the last {options['RETENTION_FULL']} full backups"
    )
    return (
        f"{full} and the last {options['RETENTION_DIFF']} differentials, with the WAL they "
        "need; pgBackRest expires the rest after each backup"
    )


@dataclasses.dataclass
class SetupResult:
    config_path: Path
    repo_path: Path
    wanted: dict[str, str]
    current: dict[str, str]
    applied: list[str]
    restart_needed: list[str]  # settings that take effect only after a restart
    checked: bool  # pgbackrest check passed (skipped while the settings are not live)

    @property
    def missing(self) -> list[str]:
        return [k for k, v in self.wanted.items() if self.current.get(k) != v]


def setup(
    *, apply: bool = False, alias: str = conf.TARGET_ALIAS, progress: Progress = _no_progress
) -> SetupResult:
    """Write pgbackrest.conf; with apply, ALTER SYSTEM the server; stanza-create and check."""
    from psycopg import sql

    options = conf.pitr()
    server = inspect_server(alias)
    home = options["CONFIG"].parent
    for path in (home, home / "log", home / "lock", options["REPO_PATH"]):
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o750)
        _chown(path, options["OS_USER"])
    options["CONFIG"].write_text(render_config(server))
    _chown(options["CONFIG"], options["OS_USER"])
    progress("pitr", "config", 1, 4)
    wanted = wanted_settings(server)
    changes = [name for name, value in wanted.items() if server.current.get(name) != value]
    applied, restart_needed = [], []
    if apply and changes:
        with _connect(alias) as conn:
            for name in changes:
                # ALTER SYSTEM takes no bind parameters: quote on the client
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(name), sql.Literal(wanted[name])
                    )
                )
            conn.execute("SELECT pg_reload_conf()")
        applied = changes
        restart_needed = [name for name in changes if name in server.postmaster_only]
    progress("pitr", "server settings", 2, 4)
    pgbackrest("stanza-create")
    progress("pitr", "stanza-create", 3, 4)
    live = not restart_needed and (apply or not changes)
    if live:
        pgbackrest("check")
    progress("pitr", "check", 4, 4)
    return SetupResult(
        config_path=options["CONFIG"],
        repo_path=options["REPO_PATH"],
        wanted=wanted,
        current=server.current,
        applied=applied,
        restart_needed=restart_needed,
        checked=live,
    )


def is_set_up() -> bool:
    return conf.pitr()["CONFIG"].exists()


# --- backups and their list ----------------------------------------------------------


@dataclasses.dataclass
class Backup:
    label: str
    type: str
    started: datetime
    stopped: datetime
    size: int  # bytes of the database
    repo_size: int  # bytes in the repository (compressed)

    @property
    def age_hours(self) -> float:
        return round((datetime.now(UTC) - self.stopped).total_seconds() / 3600, 2)


@dataclasses.dataclass
class StanzaInfo:
    status: str  # pgBackRest's own: 'ok', 'no valid backups', 'missing stanza path', ...
    backups: list[Backup]
    archive_min: str | None  # oldest and newest WAL segment in the repository
    archive_max: str | None

    def last(self, backup_type: str) -> Backup | None:
        found = [b for b in self.backups if b.type == backup_type]
        return found[-1] if found else None


def info() -> StanzaInfo:
    """The stanza's backups, oldest first, from `pgbackrest info --output=json`."""
    stanzas = json.loads(pgbackrest("info", "--output=json", timeout=120))
    if not stanzas:
        return StanzaInfo("missing stanza", [], None, None)
    stanza = stanzas[0]
    backups = [
        Backup(
            label=b["label"],
            type=b["type"],
            started=datetime.fromtimestamp(b["timestamp"]["start"], UTC),
            stopped=datetime.fromtimestamp(b["timestamp"]["stop"], UTC),
            size=b["info"]["size"],
            repo_size=b["info"]["repository"]["delta"],
        )
        for b in stanza.get("backup", [])
    ]
    archives = stanza.get("archive") or [{}]
    return StanzaInfo(
        status=stanza["status"]["message"],
        backups=backups,
        archive_min=archives[-1].get("min"),
        archive_max=archives[-1].get("max"),
    )


@dataclasses.dataclass
class Status:
    stanza: StanzaInfo
    retention: str  # as DBMIGRATION['PITR'] asks for it
    retention_written: list[str]  # the repo1-retention lines of pgbackrest.conf
    retention_stale: bool  # settings changed since setup wrote the config

    @property
    def oldest_restorable(self) -> datetime | None:
        """The earliest time a restore can reach: just after the oldest backup ended."""
        return self.stanza.backups[0].stopped if self.stanza.backups else None


def status() -> Status:
    """The stanza's backups and the retention in force (and whether setup must rerun)."""
    options = conf.pitr()
    stanza = require_stanza()
    written = [
        line.strip()
        for line in options["CONFIG"].read_text().splitlines()
        if line.startswith("repo1-retention")
    ]
    wanted = [line for line in retention_lines(options) if line.startswith("repo1-retention")]
    wanted.append(f"repo1-retention-diff={options['RETENTION_DIFF']}")
    return Status(
        stanza=stanza,
        retention=describe_retention(options),
        retention_written=written,
        retention_stale=sorted(written) != sorted(wanted),
    )


def expire() -> StanzaInfo:
    """Let pgBackRest expire what the retention no longer keeps (it also runs after backups)."""
    pgbackrest("expire")
    return info()


@dataclasses.dataclass
class BackupResult:
    backup: Backup
    seconds: float
    verified: bool


def backup(*, backup_type: str = "full", verify: bool = True) -> BackupResult:
    """Take a pgBackRest backup (expiring old ones by the retention), then verify the repo."""
    if backup_type not in BACKUP_TYPES:
        raise PitrError(f"unknown backup type {backup_type!r}: use one of {BACKUP_TYPES}")
    start = time.perf_counter()
    pgbackrest("backup", f"--type={backup_type}")
    if verify:
        pgbackrest("verify")
    latest = info().backups[-1]
    return BackupResult(latest, round(time.perf_counter() - start, 2), verify)


# --- the posture the health check reports --------------------------------------------


@dataclasses.dataclass
class Posture:
    set_up: bool
    problems: list[str]  # each says what is wrong and what to do; empty when healthy
    last_backups: dict[str, dict]  # per type: label, stopped, age_hours
    archiver: dict  # pg_stat_archiver's row
    drill: dict | None = None  # the last restore drill's record


def posture(
    *,
    alias: str = conf.TARGET_ALIAS,
    backup_max_age_hours: float,
    full_max_age_hours: float,
    drill_max_age_hours: float,
) -> Posture:
    """Last backup per type and its age, and whether WAL archiving is failing now."""
    if not is_set_up():
        return Posture(False, [], {}, {})
    problems = []
    with _connect(alias) as conn:
        row = conn.execute(
            "SELECT archived_count, last_archived_wal, last_archived_time, failed_count, "
            "last_failed_wal, last_failed_time FROM pg_stat_archiver"
        ).fetchone()
    archiver = dict(
        zip(
            (
                "archived_count",
                "last_archived_wal",
                "last_archived_time",
                "failed_count",
                "last_failed_wal",
                "last_failed_time",
            ),
            row,
            strict=True,
        )
    )
    last_ok, last_failed = archiver["last_archived_time"], archiver["last_failed_time"]
    if last_failed and (last_ok is None or last_failed > last_ok):
        # pg_wal keeps every segment that failed to archive: the disk fills next
        problems.append(
            f"WAL archiving is failing ({archiver['failed_count']} failures, last "
            f"{archiver['last_failed_wal']} at {last_failed:%Y-%m-%d %H:%M:%S %Z}); pg_wal "
            "grows until it is fixed: make the repository writable by the server's user "
            "and run db_pitr check (the server log names the cause)"
        )
    stanza = info()
    last_backups = {}
    for backup_type in BACKUP_TYPES:
        found = stanza.last(backup_type)
        if found:
            last_backups[backup_type] = {
                "label": found.label,
                "stopped": found.stopped.isoformat(),
                "age_hours": found.age_hours,
            }
    if not stanza.backups:
        problems.append(f"no pgBackRest backup ({stanza.status}); run db_pitr backup")
    else:
        newest = stanza.backups[-1]
        if newest.age_hours > backup_max_age_hours:
            problems.append(
                f"last pgBackRest backup is {newest.age_hours} h old (limit "
                f"{backup_max_age_hours:g} h); run db_pitr backup --type diff"
            )
        full = stanza.last("full")
        if full and full.age_hours > full_max_age_hours:
            problems.append(
                f"last full backup is {full.age_hours} h old (limit {full_max_age_hours:g} h); "
                "run db_pitr backup --type full"
            )
    drill = last_drill()
    if drill and not drill.ok:
        problems.append(
            f"the last restore drill failed: {drill.message}; fix it, rerun db_restore_drill"
        )
    elif drill:
        drill_age = (datetime.now(UTC) - datetime.fromisoformat(drill.finished_at)).total_seconds()
        if drill_age / 3600 > drill_max_age_hours:
            problems.append(
                f"the last restore drill is {drill_age / 3600:.1f} h old (limit "
                f"{drill_max_age_hours:g} h); run db_restore_drill"
            )
    return Posture(
        True, problems, last_backups, archiver, dataclasses.asdict(drill) if drill else None
    )


# --- restore to a point in time ------------------------------------------------------


@dataclasses.dataclass
class RestoreResult:
    target_dir: Path
    port: int
    backup_label: str
    target_time: datetime
    stopped_at: str  # the server's "recovery stopping before|at ..." line
    row_counts: dict[str, int]
    log_path: Path
    seconds: float

    @property
    def promote_command(self) -> str:
        return f"pg_ctl -D {self.target_dir} promote"

    @property
    def stop_command(self) -> str:
        return f"pg_ctl -D {self.target_dir} stop"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pick_backup(backups: list[Backup], target: datetime) -> Backup:
    """The newest backup that ended strictly before the target time."""
    if not backups:
        raise RestoreTargetError("no pgBackRest backup to restore from; run db_pitr backup first")
    # a target equal to a backup's stop time cannot reach consistency (pgbackrest #1168)
    before = [b for b in backups if b.stopped < target]
    if not before:
        first = backups[0]
        raise RestoreTargetError(
            f"{target.isoformat()} is before the first backup ({first.label}, ended "
            f"{first.stopped.isoformat()}): nothing can be restored to that time; pick a later time"
        )
    return before[-1]


def require_stanza() -> StanzaInfo:
    """The stanza's info, or a one-line error when PITR or the stanza is missing."""
    options = conf.pitr()
    if not is_set_up():
        raise RestoreTargetError(
            f"point-in-time recovery is not set up (no {options['CONFIG']}): run db_pitr setup"
        )
    stanza = info()
    if stanza.status.startswith("missing stanza"):
        raise RestoreTargetError(
            f"no stanza {options['STANZA']!r} in the pgBackRest repository "
            f"{options['REPO_PATH']} ({stanza.status}): run db_pitr setup, then db_pitr backup"
        )
    return stanza


def _pg_ctl(*args: str) -> subprocess.CompletedProcess:
    # on PATH, else Debian's layout (the newest major version)
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    pg_ctl = shutil.which("pg_ctl") or (debian[0] if debian else None)
    if not pg_ctl:
        raise PitrError("pg_ctl not found: install PostgreSQL's server binaries")
    cmd = _as_os_user([pg_ctl, *args], conf.pitr()["OS_USER"])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _complete_config_files(target_dir: Path, server: Server, user: str | None) -> None:
    """Give a restored data directory the config files a Debian cluster keeps in /etc.

    pgBackRest restores the data directory only; without postgresql.conf the server does not
    start.  The access rules are the live server's own (same roles, same passwords).
    """
    sources = {
        "postgresql.conf": None,  # settings come from -o and the restored postgresql.auto.conf
        "pg_hba.conf": server.hba_file,
        "pg_ident.conf": server.ident_file,
    }
    for name, source in sources.items():
        path = target_dir / name
        if path.exists():
            continue
        if source and Path(source).is_file():
            shutil.copyfile(source, path)
        else:
            path.write_text(f"# written by db_pitr restore: the live {name} is elsewhere\n")
        path.chmod(0o600)
        _chown(path, user)


UNREACHED = "recovery ended before configured recovery target was reached"


def _wait_for_log(log: Path, pattern: str, *, timeout: float) -> re.Match | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, log.read_text(errors="replace")) if log.exists() else None
        if found:
            return found
        time.sleep(0.2)
    return None


def restore(
    *,
    to_time: datetime,
    target_dir: Path,
    port: int | None = None,
    restore_point: str | None = None,
    alias: str = conf.TARGET_ALIAS,
    progress: Progress = _no_progress,
) -> RestoreResult:
    """Restore the stanza as of to_time into target_dir, start it paused at the target.

    With restore_point (made by pg_create_restore_point at to_time), recovery stops exactly
    there instead of at the first commit after to_time.

    Never over the live data directory; the restored server does not archive, listens on
    127.0.0.1 only, and stays paused (read-only) until someone promotes it.
    """
    options = conf.pitr()
    if to_time.tzinfo is None:
        raise RestoreTargetError(
            f"{to_time} has no time zone: write it like 2026-12-01 10:15:00+00"
        )
    start = time.perf_counter()
    if to_time >= datetime.now(UTC):
        raise RestoreTargetError(
            f"{to_time.isoformat()} is in the future, past the archived WAL; pick a time before now"
        )
    target_dir = target_dir.resolve()
    server = inspect_server(alias)
    live = Path(server.data_directory).resolve()
    if target_dir == live:
        raise RestoreTargetError(
            f"{target_dir} is the live server's data directory: restore into a scratch directory"
        )
    if target_dir.exists() and any(target_dir.iterdir()):
        raise RestoreTargetError(f"{target_dir} is not empty: give a new or empty directory")
    chosen = pick_backup(require_stanza().backups, to_time)
    target_dir.mkdir(parents=True, exist_ok=True)
    target_dir.chmod(0o700)
    _chown(target_dir, options["OS_USER"])
    progress("restore", chosen.label, 1, 3)
    pgbackrest(
        "restore",
        f"--set={chosen.label}",
        *(
            ["--type=name", f"--target={restore_point}"]
            if restore_point
            else ["--type=time", f"--target={to_time.isoformat(sep=' ')}"]
        ),
        "--target-action=pause",
        "--archive-mode=off",  # the scratch copy must not push WAL into the live repository
        f"--pg1-path={target_dir}",
    )
    _complete_config_files(target_dir, server, options["OS_USER"])
    progress("restore", "start", 2, 3)
    port = port or _free_port()
    log = target_dir / "pitr_restore.log"
    started = _pg_ctl(
        "-D", str(target_dir), "-l", str(log), "-w", "-t", "600",
        # TCP only: a socket under a deep target_dir passes the 107-byte limit of its path
        "-o", f"-p {port} -c unix_socket_directories='' -c listen_addresses=127.0.0.1", "start",
    )  # fmt: skip
    # pg_ctl returns once hot standby opens; running out of WAL before the target comes later
    stopped = _wait_for_log(log, rf"recovery stopping (before|at) .*|{UNREACHED}", timeout=120)
    if (stopped and stopped.group(0) == UNREACHED) or UNREACHED in started.stderr:
        stop_restored(target_dir)
        raise RestoreTargetError(
            f"{to_time.isoformat()} is past the archived WAL (no transaction after it reached "
            "the repository): pick an earlier time, or run db_pitr check to archive the current "
            f"WAL and retry; the scratch directory {target_dir} can be removed"
        )
    if started.returncode:
        text = log.read_text(errors="replace") if log.exists() else started.stderr
        raise PitrError(f"the restored server did not start: {_error_line(text)}; see {log}")
    if not stopped:
        raise PitrError(
            f"the restored server on port {port} did not log 'recovery stopping before' the "
            f"target; see {log}, then stop it with pg_ctl -D {target_dir} stop -m fast"
        )
    _wait_for_log(log, r"pausing at the end of recovery|database system is ready", timeout=60)
    progress("restore", "count rows", 3, 3)
    row_counts = count_rows(alias=alias, host="127.0.0.1", port=port)
    return RestoreResult(
        target_dir=target_dir,
        port=port,
        backup_label=chosen.label,
        target_time=to_time,
        stopped_at=stopped.group(0).strip(),
        row_counts=row_counts,
        log_path=log,
        seconds=round(time.perf_counter() - start, 2),
    )


def count_rows(*, alias: str = conf.TARGET_ALIAS, **overrides) -> dict[str, int]:
    """Exact row counts of every table in the alias's database and schema."""
    from psycopg import sql

    with _connect(alias, **overrides) as conn:
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                "ORDER BY tablename"
            )
        ]
        return {
            table: conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
            ).fetchone()[0]
            for table in tables
        }


def applied_migrations(*, alias: str = conf.TARGET_ALIAS) -> list[str]:
    """The alias database's django_migrations as app.name (empty when it has none)."""
    with _connect(alias) as conn:
        exists = conn.execute("SELECT to_regclass('django_migrations')").fetchone()[0]
        if not exists:
            return []
        return sorted(
            f"{app}.{name}" for app, name in conn.execute("SELECT app, name FROM django_migrations")
        )


def stop_restored(target_dir: Path) -> None:
    """Stop a scratch server restore() started (immediate: it holds nothing to keep)."""
    if (target_dir / "postmaster.pid").exists():
        _pg_ctl("-D", str(target_dir), "-m", "immediate", "stop")


# --- restore one database beside (or over) the live one --------------------------------


@dataclasses.dataclass
class DatabaseRestoreResult:
    database: str  # where the restored rows are now, on the live server
    live_database: str
    kept_as: str | None  # the live database's new name when it was replaced
    backup_label: str
    target_time: datetime
    stopped_at: str  # the scratch server's "recovery stopping before ..." line
    row_counts: dict[str, int]
    seconds: float

    @property
    def replaced(self) -> bool:
        return self.kept_as is not None


def default_target_db(live: str, to_time: datetime) -> str:
    """A new database beside the live one, named by the time it holds."""
    return f"{live}_at_{to_time.astimezone(UTC):%Y%m%dT%H%M%S}"[:63]


def _libpq_env(cfg: dict) -> dict:
    env = dict(os.environ)
    if cfg.get("PASSWORD"):  # through the environment, never on a command line
        env["PGPASSWORD"] = str(cfg["PASSWORD"])
    return env


def _run_tool(cmd: list[str], *, env: dict, what: str) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=6 * 3600)
    if proc.returncode:
        raise PitrError(f"{what} failed: {_error_line(proc.stderr + proc.stdout)}")


def _database_exists(conn, name: str) -> bool:
    found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
    return found is not None


def restore_database(
    *,
    to_time: datetime,
    scratch_root: Path,
    target_db: str | None = None,
    replace_live: bool = False,
    alias: str = conf.TARGET_ALIAS,
    progress: Progress = _no_progress,
) -> DatabaseRestoreResult:
    """Restore the alias's database as of to_time into a new database on the live server.

    pgBackRest restores whole clusters, so the time is reached in a scratch cluster (restore());
    its copy of the database is then dumped and loaded into target_db beside the live one, the
    counts compared, and the scratch cluster dropped.  With replace_live the new database takes
    the live one's name and the live one is kept, renamed, with connections to it ended: the
    caller must have asked the operator first.
    """
    from psycopg import sql

    start = time.perf_counter()
    cfg = connections.settings[alias]
    live = cfg["NAME"]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    if replace_live:
        target_db = f"{live}_pitr_{stamp}"[:63]  # renamed to live at the end
    target_db = target_db or default_target_db(live, to_time)
    if target_db == live:
        raise RestoreTargetError(
            f"--target-db {live} is the live database: restore beside it under another name, "
            "or replace it with --replace-live-database"
        )
    with _connect(alias, dbname="postgres") as admin:
        if _database_exists(admin, target_db):
            raise RestoreTargetError(
                f"database {target_db} already exists: name another with --target-db, or drop it"
            )
        owner = admin.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", [live]
        ).fetchone()[0]
    scratch = scratch_root / f"propcore_pitr_{stamp}"
    dump = scratch_root / f"propcore_pitr_{stamp}.dump"
    env = _libpq_env(cfg)
    created = False
    try:
        restored = restore(to_time=to_time, target_dir=scratch, alias=alias, progress=progress)
        progress("restore", f"dump {live}", 1, 3)
        user = ["-U", cfg["USER"]] if cfg.get("USER") else []
        _run_tool(
            ["pg_dump", "-Fc", "-h", "127.0.0.1", "-p", str(restored.port), *user,
             "-f", str(dump), live],
            env=env, what="pg_dump of the restored database",
        )  # fmt: skip
        stop_restored(scratch)
        progress("restore", f"load {target_db}", 2, 3)
        with _connect(alias, dbname="postgres") as admin:
            admin.execute(
                sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0").format(
                    sql.Identifier(target_db), sql.Identifier(owner)
                )
            )
        created = True
        host = ["-h", cfg["HOST"]] if cfg.get("HOST") else []
        port = ["-p", str(cfg["PORT"])] if cfg.get("PORT") else []
        _run_tool(
            ["pg_restore", "--exit-on-error", *host, *port, *user, "-d", target_db, str(dump)],
            env=env, what=f"pg_restore into {target_db}",
        )  # fmt: skip
        progress("restore", "count rows", 3, 3)
        counts = count_rows(alias=alias, dbname=target_db)
        if counts != restored.row_counts:
            differing = sorted(t for t in counts if counts[t] != restored.row_counts.get(t))
            raise PitrError(
                f"{target_db}'s row counts differ from the restored cluster's "
                f"({', '.join(differing[:3])}); it was dropped, the live database is untouched"
            )
        kept_as = _swap_in(target_db, live, stamp, alias=alias) if replace_live else None
    except BaseException:
        if created:
            with _connect(alias, dbname="postgres") as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(target_db)
                    )
                )
        raise
    finally:
        stop_restored(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
        dump.unlink(missing_ok=True)
    return DatabaseRestoreResult(
        database=live if replace_live else target_db,
        live_database=live,
        kept_as=kept_as,
        backup_label=restored.backup_label,
        target_time=to_time,
        stopped_at=restored.stopped_at,
        row_counts=counts,
        seconds=round(time.perf_counter() - start, 2),
    )


def _swap_in(restored: str, live: str, stamp: str, *, alias: str) -> str:
    """Rename live out of the way (kept) and restored into its place; return the kept name."""
    from psycopg import sql

    kept = f"{live}_before_pitr_{stamp}"[:63]
    with _connect(alias, dbname="postgres") as admin:
        # no new session may slip in between ending the old ones and the rename
        admin.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(live))
        )
        try:
            for _ in range(50):
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    [live],
                )
                busy = admin.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [live]
                ).fetchone()[0]
                if not busy:
                    break
                time.sleep(0.1)
            admin.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(live), sql.Identifier(kept)
                )
            )
        finally:
            name = kept if _database_exists(admin, kept) else live
            admin.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name))
            )
        try:
            admin.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(restored), sql.Identifier(live)
                )
            )
        except Exception:  # never leave the application without its database
            admin.execute(
                sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                    sql.Identifier(kept), sql.Identifier(live)
                )
            )
            raise
    return kept


# --- the restore drill ---------------------------------------------------------------

DRILL_RECORD = "pitr_drill.json"


@dataclasses.dataclass
class DrillResult:
    ok: bool
    finished_at: str
    seconds: float
    backup_label: str
    restore_point: str
    tables: int
    rows: int
    differing: dict[str, list]  # table -> [live, restored] counts (or checksums)
    checksummed: list[str]  # the sample of tables compared by checksum too
    message: str


def drill_record_path() -> Path:
    return conf.report_dir() / DRILL_RECORD


def restore_drill(
    *, scratch_root: Path, alias: str = conf.TARGET_ALIAS, progress: Progress = _no_progress
) -> DrillResult:
    """Restore the latest backup to a restore point made now, compare it, drop it.

    Compares every table's count, then the checksums of the DRILL_CHECKSUM_TABLES largest
    whose counts match.  The live side is one snapshot taken just before the restore point,
    so on a quiet database everything matches; a write landing in between shows as a
    difference.
    The result is recorded (report dir, pitr_drill.json) for the health check.
    """
    start = time.perf_counter()
    stamp = datetime.now(UTC)
    name = f"propcore_drill_{stamp:%Y%m%dT%H%M%S}"
    live_counts, live_sums = _counts_and_restore_point(alias, name)
    pgbackrest("check")  # switches WAL: the restore point's segment reaches the repository
    target_dir = scratch_root / name
    try:
        restored = restore(
            to_time=stamp,
            target_dir=target_dir,
            restore_point=name,
            alias=alias,
            progress=progress,
        )
        differing = {
            table: [count, restored.row_counts.get(table, -1)]
            for table, count in live_counts.items()
            if restored.row_counts.get(table) != count
        }
        with _connect(alias, host="127.0.0.1", port=restored.port) as conn:
            for table, live_sum in live_sums.items():  # counts first, then checksums
                restored_sum = _table_checksum(conn, table)
                if table not in differing and restored_sum != live_sum:
                    differing[table] = [f"md5 {live_sum}", f"md5 {restored_sum}"]
        ok = not differing
        message = (
            f"restored {restored.backup_label} to {name}: {len(live_counts)} tables' counts "
            f"and {len(live_sums)} tables' checksums match"
            if ok
            else f"restored {restored.backup_label} to {name}: {len(differing)} of "
            f"{len(live_counts)} tables differ ({', '.join(sorted(differing)[:3])})"
        )
        label = restored.backup_label
    except PitrError as exc:
        ok, differing, message, label = False, {}, str(exc), ""
    finally:
        stop_restored(target_dir)
        shutil.rmtree(target_dir, ignore_errors=True)
    result = DrillResult(
        ok=ok,
        finished_at=datetime.now(UTC).isoformat(),
        seconds=round(time.perf_counter() - start, 2),
        backup_label=label,
        restore_point=name,
        tables=len(live_counts),
        rows=sum(live_counts.values()),
        checksummed=sorted(live_sums),
        differing=differing,
        message=message,
    )
    drill_record_path().parent.mkdir(parents=True, exist_ok=True)
    drill_record_path().write_text(json.dumps(dataclasses.asdict(result), indent=2))
    return result


DRILL_CHECKSUM_TABLES = 5


def _table_checksum(conn, table: str) -> str:
    """md5 over the md5 of every row, in the order of those md5s (needs no primary key)."""
    from psycopg import sql

    query = sql.SQL(
        "SELECT md5(coalesce(string_agg(h, '' ORDER BY h), '')) "
        "FROM (SELECT md5(t::text) AS h FROM {} AS t) AS rows"
    ).format(sql.Identifier(table))
    return conn.execute(query).fetchone()[0]


def _counts_and_restore_point(alias: str, name: str) -> tuple[dict[str, int], dict[str, str]]:
    """Every table's count and the largest tables' checksums, then a restore point."""
    from psycopg import sql

    with _connect(alias) as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                "ORDER BY tablename"
            )
        ]
        counts = {
            table: conn.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
            ).fetchone()[0]
            for table in tables
        }
        sample = sorted(counts, key=counts.__getitem__, reverse=True)[:DRILL_CHECKSUM_TABLES]
        checksums = {table: _table_checksum(conn, table) for table in sample}
        conn.execute("SELECT pg_create_restore_point(%s)", [name])
    return counts, checksums


def last_drill() -> DrillResult | None:
    path = drill_record_path()
    if not path.exists():
        return None
    return DrillResult(**json.loads(path.read_text()))
