"""What is on the broker: the job ids that have a Celery message in Redis right now.

The messages wait in the Redis lists :func:`services.trainer.jobs.queues.waiting_keys` names, or sit
unacknowledged in the ``unacked`` hash. A job id found in neither has lost its message;
:func:`services.trainer.jobs.store.requeue_lost_jobs` sends such jobs again.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

import redis

from services.trainer.jobs.queues import TASK_NAME, UNACKED_KEY, waiting_keys
from services.trainer.jobs.schemas import Queue as QueueName
from services.trainer.settings import TrainerSettings

log = logging.getLogger("shipyard.trainer.broker")


def job_id_of(message: dict[str, Any]) -> str | None:
    """The job id a ``shipyard.train`` message carries, or None for any other message."""
    headers = message.get("headers") or {}
    if headers.get("task") != TASK_NAME:
        return None
    body: Any = message.get("body")
    try:
        if (message.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]  # protocol 2: [args, kwargs, embed]
        return str(args[0])
    except (ValueError, TypeError, IndexError, KeyError):
        # argsrepr is "['<id>']"; fall back to it for a body we cannot read.
        text = str(headers.get("argsrepr") or "").strip("[]()'\", ")
        return text or None


def _parse(raw: bytes | str) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if isinstance(value, list) and value:  # unacked entries are [message, exchange, routing_key]
        value = value[0]
    return value if isinstance(value, dict) else None


def job_ids_on_broker(redis_url: str, queue_names: Iterable[str], *, held: bool = True) -> set[str]:
    """Job ids with a message waiting in one of ``queue_names`` or (with ``held``) held unacknowledged."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=10)
    try:
        raw_messages: list[Any] = []
        for name in queue_names:
            for key in waiting_keys(name):
                raw_messages.extend(client.lrange(key, 0, -1))
        if held:
            raw_messages.extend(client.hvals(UNACKED_KEY))
    finally:
        client.close()
    found: set[str] = set()
    for raw in raw_messages:
        message = _parse(raw)
        job_id = job_id_of(message) if message else None
        if job_id:
            found.add(job_id)
    return found


def on_broker_for(settings: TrainerSettings) -> Callable[[], set[str]]:
    queue_names = [settings.queue_name(q.value) for q in QueueName]

    def on_broker() -> set[str]:
        return job_ids_on_broker(settings.platform.redis_url, queue_names)

    return on_broker


def waiting_for(settings: TrainerSettings) -> Callable[[], set[str]]:
    """Job ids with a message waiting on one of the settings' queues, not counting those held by a
    worker: a message held for a job whose row went silent is held by a lost worker."""
    queue_names = [settings.queue_name(q.value) for q in QueueName]

    def waiting() -> set[str]:
        return job_ids_on_broker(settings.platform.redis_url, queue_names, held=False)

    return waiting
