#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "propcore.settings")
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    from dbmigration.errors import ConfigError

    try:
        settings.INSTALLED_APPS  # noqa: B018 - load settings now, so their errors read cleanly
    except ImproperlyConfigured as exc:
        # a settings mistake is the operator's to fix: one line, not a traceback
        print(f"Settings error: {exc}", file=sys.stderr)
        sys.exit(ConfigError.returncode)
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
