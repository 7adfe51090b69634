"""Test-only pieces of the live cutover test (tests/test_live.py), never installed in the app.

- ``urlpatterns``: ``POST /live/write/?key=K`` creates one organisation named K in one
  transaction and answers 201.  ``hold=S`` sleeps S seconds after the write, inside the
  transaction (a slow view that outlives the drain); ``late=S`` sleeps before it (a request
  already past the middleware when the freeze begins, like an upload still arriving).
  ``POST /live/session/?key=K&late=S`` stores K in a new session, which SessionMiddleware
  saves after the view: a write no view code makes (a fence refusal there must be a 503).
  ``until=PATH`` waits until PATH exists first (a straggler held past the fence by the test).
- ``python -m tests.live_site ACKED STOP``: a writer that is no web request (a cron job, a
  worker): it writes through the ORM until the file STOP exists, appending each key whose
  transaction committed to ACKED.  Like a well-behaved worker it re-reads the active backend
  and drops old connections between jobs.
"""

import os
import sys
import time

from django.db import DatabaseError, transaction
from django.http import JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt


@csrf_exempt
def write(request):
    from accounts.models import Organisation

    key = request.GET["key"]
    time.sleep(float(request.GET.get("late", 0)))
    with transaction.atomic():
        Organisation.objects.create(name=key, kind="developer")
        time.sleep(float(request.GET.get("hold", 0)))
    return JsonResponse({"key": key}, status=201)


@csrf_exempt
def session_write(request):
    key = request.GET["key"]
    time.sleep(float(request.GET.get("late", 0)))
    deadline = time.monotonic() + 60
    while "until" in request.GET and not os.path.exists(request.GET["until"]):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    request.session["key"] = key  # written by SessionMiddleware, after the view
    return JsonResponse({"key": key}, status=201)


urlpatterns = [path("live/write/", write), path("live/session/", session_write)]


def orm_writer(acked_path: str, stop_path: str) -> None:
    from django.db import close_old_connections

    from accounts.models import Organisation
    from propcore.middleware import watcher

    number = 0
    with open(acked_path, "a") as acked:
        while not os.path.exists(stop_path):
            close_old_connections()
            watcher.poll()
            watcher.refresh_thread()
            key = f"orm-{number}"
            number += 1
            try:
                with transaction.atomic():
                    Organisation.objects.create(name=key, kind="developer")
            except DatabaseError:  # refused by the fence, or the database is busy: retry
                time.sleep(0.05)
                continue
            acked.write(key + "\n")
            acked.flush()
            time.sleep(0.02)


if __name__ == "__main__":
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.live_settings")
    django.setup()
    orm_writer(sys.argv[1], sys.argv[2])
