"""gunicorn settings for propcore: `gunicorn -c deploy/gunicorn.conf.py` (README, "Running").

Sync workers (one request at a time each; Django's psycopg pool per process).  Graceful by
design:
- SIGTERM: the master stops listening, each worker stops listening too (so new connections
  are refused at once, not parked in a backlog nobody serves; propcore.shutdown's worker),
  finishes the request in hand within graceful_timeout, closes its database connections and
  pools, and exits.
- SIGHUP: a rolling restart: new workers (new code, new settings) start, then the old ones
  get the SIGTERM above; the listening socket stays open throughout, so no request is lost.
Every value can be set from the environment (GUNICORN_*), e.g. by the systemd unit.
"""

import multiprocessing
import os

wsgi_app = "propcore.wsgi:application"
bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", multiprocessing.cpu_count() * 2 + 1))
worker_class = "propcore.shutdown.GracefulSyncWorker"
# a request running longer than this is killed (and its transaction rolled back)
timeout = int(os.environ.get("GUNICORN_TIMEOUT", 30))
# on SIGTERM/SIGHUP, how long a worker may finish its request before it is killed
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", 30))
keepalive = 2
# recycle workers now and then (memory); jitter keeps them from restarting together
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", 2000))
max_requests_jitter = 200
# not preloaded: SIGHUP then loads new code in the new workers
preload_app = False
accesslog = os.environ.get("GUNICORN_ACCESS_LOG", "-") or None  # empty: none
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")


def worker_exit(server, worker):
    """Close the worker's database connections and pools before it exits."""
    from propcore.shutdown import close_database_connections

    closed = close_database_connections()
    server.log.info("worker %s closed its database pools: %s", worker.pid, closed or "none")
