"""Per-environment profiles: the one place their numbers live."""

from __future__ import annotations

import dataclasses


class UnknownProfile(ValueError):
    """PROPCORE_ENV names no profile."""


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    debug: bool
    pool_min: int
    pool_max: int
    pool_timeout: float  # seconds a request waits for a pooled connection
    log_level: str
    needs_secrets: bool  # refuse to start without SECRET_KEY / passwords from the environment
    # HTTPS only (redirect, secure cookies, HSTS for this many seconds; 0 = none), ALLOWED_HOSTS
    # required, and PostgreSQL URLs must verify the server (sslmode=verify-full)
    hsts_seconds: int = 0
    secure_transport: bool = False


PROFILES = {
    "dev": Profile("dev", True, 1, 10, 10.0, "DEBUG", False),
    "staging": Profile("staging", False, 2, 25, 10.0, "INFO", True, 3600, True),
    "prod": Profile("prod", False, 5, 100, 5.0, "WARNING", True, 365 * 24 * 3600, True),
}


def get_profile(name: str) -> Profile:
    """Return the profile for PROPCORE_ENV, refusing unknown names."""
    try:
        return PROFILES[name]
    except KeyError:
        raise UnknownProfile(
            f"PROPCORE_ENV={name!r} is not a profile; set it to one of {', '.join(PROFILES)}."
        ) from None
