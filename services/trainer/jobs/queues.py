"""How a job travels on the broker, as the API (sending, counting) and the worker (running) see it.

The API sends the task by name (``TASK_NAME``) and never imports the task's code. kombu's Redis
transport keeps a queue's waiting messages in a Redis list named after the queue, plus one list
per priority step (``<queue>\\x06\\x16<priority>``), and the messages a worker has taken but not
yet acknowledged in the ``unacked`` hash.
"""

from __future__ import annotations

TASK_NAME = "shipyard.train"

UNACKED_KEY = "unacked"
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)  # kombu's default steps; step 0 is the plain queue name


def waiting_keys(queue_name: str) -> tuple[str, ...]:
    """The Redis lists that hold the messages waiting on Celery queue ``queue_name``, every priority."""
    return (queue_name, *(f"{queue_name}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS))
