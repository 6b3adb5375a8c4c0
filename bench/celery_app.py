"""The peer in bench_engine.py: a Celery app on the local Redis with one no-op task.

The worker is started by the benchmark as
`celery -A bench.celery_app worker --concurrency=2 ...`; the broker and the result
backend are two Redis databases named by STAVILY_BENCH_CELERY_BROKER and
STAVILY_BENCH_CELERY_BACKEND (the benchmark picks empty ones and empties them after).
Results are stored (Celery's default), as our agents report theirs.
"""

from __future__ import annotations

import os

from celery import Celery

app = Celery(
    "stavily_bench",
    broker=os.environ.get("STAVILY_BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/14"),
    backend=os.environ.get("STAVILY_BENCH_CELERY_BACKEND", "redis://127.0.0.1:6379/15"),
)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=3600,
)


@app.task(name="bench.noop")
def noop() -> None:
    """Does nothing, like the agents' plugin in the engine benchmark."""
    return None
