import pytest

from accounts.models import User


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_user_on_both():
    for alias in ("sqlite", "postgresql"):
        User.objects.db_manager(alias).create_user("A@Example.ie", "x")
        assert User.objects.using(alias).get().email == "a@example.ie"
