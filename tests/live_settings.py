"""Settings of the live cutover test's server: the test settings plus a tiny write endpoint."""

from tests.settings import *  # noqa: F403

ROOT_URLCONF = "tests.live_site"
