"""The "Database migration" section of the admin: the runbook as operators and auditors read it.

Read-only views over what the commands leave behind: the state file (phase, what to run
next, the history of transitions), the JSON reports (steps, per-table counts, checksums,
rejected rows), the backups (with their verification) and the health checks.  Nothing here
writes a file or a database: the management commands stay the only way to act.

Staff see everything but the rows themselves; the content of rejected rows (the reject file,
the values and excerpts in a report) is personal data and shown to superusers only.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from django.conf import settings
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import FileResponse, Http404
from django.template.response import TemplateResponse
from django.urls import path, reverse

from dbmigration import health
from dbmigration.backup import list_backups
from dbmigration.errors import MigrationError
from dbmigration.freeze import freeze_path_for, read_freeze
from dbmigration.state import StateError, read_state
from dbmigration.status import migration_status
from propcore.health import label_for

REPORT_NAME = re.compile(r"migration_report_[0-9A-Za-z]+\.json")
ROWS_SHOWN = 200  # per list in a report page; the JSON file has them all
# a rejected row's content: whole rows only in the reject file, the bad value to superusers
ROW_CONTENT_KEYS = frozenset({"values"})
SUPERUSER_KEYS = frozenset({"excerpt"})

PAGES = (
    ("migration_status", "Status and history", "MigrationStatus"),
    ("migration_reports", "Reports", "MigrationReport"),
    ("migration_backups", "Backups", "MigrationBackup"),
    ("migration_health", "Health checks", "MigrationHealth"),
)


# --- a report as blocks a template can show, whatever command wrote it ----------------------


@dataclasses.dataclass
class Block:
    """One entry of a report's facts or a step's details: a value, a table or some JSON."""

    key: str
    kind: str  # value | table | json
    value: str = ""
    columns: list[str] = dataclasses.field(default_factory=list)
    rows: list[list[str]] = dataclasses.field(default_factory=list)
    more: int = 0  # rows not shown


def _text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _table(key: str, rows: list[dict], first: str | None = None) -> Block:
    columns = [first] if first else []
    for row in rows:
        columns += [c for c in row if c not in columns]
    shown = [[_text(row.get(c)) for c in columns] for row in rows[:ROWS_SHOWN]]
    return Block(key, "table", columns=columns, rows=shown, more=max(0, len(rows) - ROWS_SHOWN))


def blocks(data: dict, *, show_rows: bool) -> list[Block]:
    """Lay out a dict of facts: a dict of dicts or a list of dicts becomes a table."""
    out = []
    for key, value in data.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            named = all(name in inner.values() for name, inner in value.items())
            rows = [
                _private(inner if named else {"": name, **inner}, show_rows)
                for name, inner in value.items()
            ]
            out.append(_table(key, rows, first=None if named else ""))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out.append(_table(key, [_private(v, show_rows) for v in value]))
        elif isinstance(value, dict | list) and not value:
            out.append(Block(key, "value", "none"))
        elif isinstance(value, dict | list):
            out.append(Block(key, "json", json.dumps(value, indent=2, default=str)))
        else:
            out.append(Block(key, "value", _text(value)))
    return out


def _private(row: dict, show_rows: bool) -> dict:
    hidden = ROW_CONTENT_KEYS if show_rows else ROW_CONTENT_KEYS | SUPERUSER_KEYS
    return {k: v for k, v in row.items() if k not in hidden}


def report_path(name: str) -> Path:
    """The report file called name under REPORT_DIR; 404 for anything else."""
    if not REPORT_NAME.fullmatch(name):
        raise Http404("No such report.")
    found = Path(settings.REPORT_DIR) / name
    if not found.is_file():
        raise Http404(f"No report {name} under {settings.REPORT_DIR}.")
    return found


def read_report(name: str) -> dict:
    try:
        return json.loads(report_path(name).read_text())
    except (OSError, ValueError) as exc:
        raise Http404(f"Report {name} is unreadable: {exc}") from exc


def _inside(file: str | None, folder: Path) -> Path | None:
    """The file, when it exists inside folder (a report names it; we serve nothing else)."""
    if not file:
        return None
    found = Path(file).resolve()
    return found if found.is_file() and found.is_relative_to(Path(folder).resolve()) else None


def list_reports() -> list[dict]:
    """Every report, newest first, with what it says about itself."""
    folder = Path(settings.REPORT_DIR)
    found = []
    for file in sorted(folder.glob("migration_report_*.json"), reverse=True):
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            data = {"status": "unreadable"}
        facts = data.get("facts") or {}
        found.append(
            {
                "name": file.name,
                "command": data.get("command", "?"),
                "status": data.get("status", "?"),
                "started_at": data.get("started_at", ""),
                "mode": facts.get("mode", ""),
                "rejected": facts.get("rejected_total", 0),
                # a refusal may sit in facts.error rather than in a step (issue 10)
                "error": next((s["error"] for s in data.get("steps", []) if s.get("error")), "")
                or facts.get("error", ""),
            }
        )
    return found


# --- the admin site -----------------------------------------------------------------------


class ConsoleAdminSite(admin.AdminSite):
    """Django's admin plus the read-only "Database migration" section."""

    def get_urls(self):
        view = self.admin_view
        console = [
            # the section's own address; the sidebar marks pages by prefix, so status has its own
            path("migration/", view(self.status_view), name="migration"),
            path("migration/status/", view(self.status_view), name="migration_status"),
            path("migration/reports/", view(self.reports_view), name="migration_reports"),
            path("migration/reports/<str:name>/", view(self.report_view), name="migration_report"),
            path(
                "migration/reports/<str:name>/json",
                view(self.report_json_view),
                name="migration_report_json",
            ),
            path(
                "migration/reports/<str:name>/log",
                view(self.report_log_view),
                name="migration_report_log",
            ),
            path(
                "migration/reports/<str:name>/rejects",
                view(self.rejects_view),
                name="migration_rejects",
            ),
            path("migration/backups/", view(self.backups_view), name="migration_backups"),
            path("migration/health/", view(self.health_view), name="migration_health"),
        ]
        return console + super().get_urls()

    def get_app_list(self, request, app_label=None):
        apps = super().get_app_list(request, app_label)
        if app_label is None and request.user.is_active and request.user.is_staff:
            apps.insert(0, self._console_section())
        return apps

    def _console_section(self) -> dict:
        return {
            "name": "Database migration",
            "app_label": "migration",
            "app_url": reverse("admin:migration", current_app=self.name),
            "has_module_perms": True,
            "models": [
                {
                    "name": title,
                    "object_name": object_name,
                    "admin_url": reverse(f"admin:{url_name}", current_app=self.name),
                    "add_url": None,
                    "view_only": True,
                    "perms": {"view": True},
                }
                for url_name, title, object_name in PAGES
            ],
        }

    def _render(self, request, template: str, title: str, **context):
        return TemplateResponse(
            request,
            f"console/{template}",
            {
                **self.each_context(request),
                "title": title,
                "pages": [(f"admin:{u}", t) for u, t, _ in PAGES],
                **context,
            },
        )

    # --- pages ---

    def status_view(self, request):
        context = {"state_file": settings.STATE_FILE}
        try:
            status = migration_status(
                state_file=Path(settings.STATE_FILE),
                backup_dir=Path(settings.BACKUP_DIR),
                sqlite_path=Path(settings.SQLITE_PATH),
                report_dir=Path(settings.REPORT_DIR),
            )
            history = list(reversed(read_state(Path(settings.STATE_FILE)).history))
        except (MigrationError, StateError) as exc:
            return self._render(request, "status.html", "Database migration", error=str(exc))
        last = Path(status.last_report).name if status.last_report else None
        context.update(
            status=status,
            history=history,
            last_report=last if last and REPORT_NAME.fullmatch(last) else None,
            freeze=read_freeze(freeze_path_for(Path(settings.STATE_FILE))),
        )
        return self._render(request, "status.html", "Database migration", **context)

    def reports_view(self, request):
        return self._render(
            request, "reports.html", "Reports", reports=list_reports(), folder=settings.REPORT_DIR
        )

    def report_view(self, request, name):
        data = read_report(name)
        show_rows = request.user.is_superuser
        facts = data.get("facts") or {}
        steps = [
            {**step, "blocks": blocks(step.get("details") or {}, show_rows=show_rows)}
            for step in data.get("steps", [])
        ]
        reject_file = _inside(facts.get("reject_file"), Path(settings.REPORT_DIR))
        return self._render(
            request,
            "report.html",
            f"Report: {data.get('command', name)} ({data.get('status', '?')})",
            name=name,
            report=data,
            steps=steps,
            facts=blocks(facts, show_rows=show_rows),
            reject_file=reject_file,
            show_rows=show_rows,
            log_file=_inside(data.get("log_path"), Path(settings.LOG_DIR)),
        )

    def report_json_view(self, request, name):
        return FileResponse(report_path(name).open("rb"), content_type="application/json")

    def report_log_view(self, request, name):
        log = _inside(read_report(name).get("log_path"), Path(settings.LOG_DIR))
        if log is None:
            raise Http404(f"The log of {name} is not under {settings.LOG_DIR}.")
        return FileResponse(log.open("rb"), content_type="text/plain; charset=utf-8")

    def rejects_view(self, request, name):
        if not request.user.is_superuser:
            raise PermissionDenied("Rejected rows hold personal data: superusers only.")
        facts = read_report(name).get("facts") or {}
        rejects = _inside(facts.get("reject_file"), Path(settings.REPORT_DIR))
        if rejects is None:
            raise Http404(f"Report {name} names no reject file under {settings.REPORT_DIR}.")
        return FileResponse(
            rejects.open("rb"),
            as_attachment=True,
            filename=rejects.name,
            content_type="application/x-ndjson",
        )

    def backups_view(self, request):
        backup_dir = Path(settings.BACKUP_DIR)
        verified = list(reversed(list_backups(backup_dir)))
        listed = {b.path.name for b in verified}
        others = (
            sorted(p.name for p in backup_dir.iterdir() if p.is_dir() and p.name not in listed)
            if backup_dir.is_dir()
            else []
        )
        rows = [
            {
                "info": b,
                "rows": sum(b.row_counts.values()),
                "checks": [(k, _text(v)) for k, v in b.checks.items()],
            }
            for b in verified
        ]
        return self._render(
            request,
            "backups.html",
            "Backups",
            backups=rows,
            unverified=others,
            folder=backup_dir,
        )

    def health_view(self, request):
        report = health.run_checks()
        rows = [
            {
                "label": label_for(c.name),
                "status": c.status,
                "message": c.message,
                "details": [(k, _text(v)) for k, v in c.details.items()],
                "seconds": c.seconds,
            }
            for c in report.checks
        ]
        return self._render(
            request, "health.html", "Health checks", overall=report.status, checks=rows
        )
