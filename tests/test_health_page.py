"""/health/ for monitors: 200 when every database answers, 500 when one is down."""

import pytest
from django.db import connections

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)


def test_health_is_200_with_json_when_databases_answer(client):
    response = client.get("/health/", {"format": "json"})
    assert response.status_code == 200, response.content
    body = response.json()
    assert any("postgresql" in name for name in body), body
    assert any("sqlite" in name for name in body), body


@pytest.fixture
def postgres_down():
    """Point the postgresql alias at a port nobody listens on, then put it back."""
    connection = connections["postgresql"]
    connection.close_pool()
    saved = connection.settings_dict["PORT"], connection.settings_dict["OPTIONS"]["pool"]
    connection.settings_dict["PORT"] = 1
    connection.settings_dict["OPTIONS"]["pool"] = {**saved[1], "timeout": 1.0}
    yield
    connection.close_pool()
    connection.settings_dict["PORT"], connection.settings_dict["OPTIONS"]["pool"] = saved


def test_health_is_500_when_postgresql_is_down(client, postgres_down):
    response = client.get("/health/", {"format": "json"})
    assert response.status_code == 500
    failing = [name for name, status in response.json().items() if status != "OK"]
    assert any("postgresql" in name for name in failing), response.json()
