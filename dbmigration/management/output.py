"""The one JSON shape every command's --json prints: top-level status/ok, stable keys, values."""

from __future__ import annotations

import json
from typing import Any


def json_document(*, status: str, **fields: Any) -> str:
    """Render a command's result: "status" and "ok" first, then the command's own keys."""
    return json.dumps({"status": status, "ok": status == "ok", **fields}, indent=2, default=str)


def thousands(n: int) -> str:
    """Write a count the way every command does: 76,439."""
    return f"{n:,}"
