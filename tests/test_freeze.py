"""The write freeze, through Django's test client: writes answer 503, reads go on."""

import json
import time

import pytest
from django.http import HttpResponse
from django.urls import path

from accounts.models import Organisation
from dbmigration import freeze as fz


def write_on_get(request):
    """A badly behaved read: it writes."""
    Organisation.objects.create(name="Sneaky", kind="developer")
    return HttpResponse("wrote")


def read_only(request):
    return HttpResponse(str(Organisation.objects.count()))


urlpatterns = [path("sneaky/", write_on_get), path("count/", read_only)]


@pytest.fixture
def state_file(settings, tmp_path):
    settings.STATE_FILE = tmp_path / "state.json"
    return settings.STATE_FILE


@pytest.fixture
def flag(state_file):
    return fz.freeze_path_for(state_file)


def test_freeze_on_off_records_reason_and_duration(flag):
    held = fz.freeze_on(flag, reason="cutover test")
    data = json.loads(flag.read_text())
    assert data["reason"] == "cutover test" and data["token"] == held.token
    assert fz.read_freeze(flag).reason == "cutover test"
    with pytest.raises(fz.FreezeError, match="already frozen"):
        fz.freeze_on(flag, reason="second")
    assert fz.still_held(flag, held)
    lasted = fz.freeze_off(flag, held)
    assert lasted is not None and lasted >= 0
    assert not flag.exists() and fz.read_freeze(flag) is None


def test_expired_freeze_is_ignored_and_can_be_replaced(flag):
    old = fz.freeze_on(flag, reason="crashed", max_seconds=0.01)
    time.sleep(0.05)
    assert fz.read_freeze(flag) is None
    assert not fz.still_held(flag, old)
    new = fz.freeze_on(flag, reason="next")
    assert fz.freeze_off(flag, old) is None  # not ours any more: left in place
    assert fz.read_freeze(flag).token == new.token


def test_context_manager_lifts_freeze_on_error(flag):
    with pytest.raises(RuntimeError), fz.write_freeze(flag, reason="boom"):
        assert fz.read_freeze(flag) is not None
        raise RuntimeError
    assert not flag.exists()


@pytest.mark.django_db(databases="__all__")
@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_writes_answer_503_with_retry_after(client, flag, method):
    fz.freeze_on(flag, reason="switching")
    response = getattr(client, method)("/admin/login/", {"username": "x", "password": "y"})
    assert response.status_code == 503
    assert 1 <= int(response["Retry-After"]) <= 60
    assert "switching" in response.json()["detail"]


@pytest.mark.django_db(databases="__all__")
def test_reads_go_on_and_writes_resume_after(client, flag):
    held = fz.freeze_on(flag, reason="switching")
    assert client.get("/admin/login/").status_code == 200
    fz.freeze_off(flag, held)
    response = client.post("/admin/login/", {"username": "x", "password": "y"})
    assert response.status_code == 200  # the login form again, with its error


@pytest.mark.urls(__name__)
@pytest.mark.django_db(databases="__all__", transaction=True)
def test_a_read_that_writes_is_refused(client, flag):
    client.raise_request_exception = False  # as in production: the view's error becomes a response
    fz.freeze_on(flag, reason="switching")
    assert client.get("/count/").content == b"0"
    response = client.get("/sneaky/")
    assert response.status_code == 503
    assert Organisation.objects.count() == 0
    fz.freeze_off(flag)
    assert client.get("/sneaky/").status_code == 200
    assert Organisation.objects.count() == 1
