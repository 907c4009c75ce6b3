"""The trainer's jobs layer, shared by the API and the worker: the job spec and its public form
(``schemas``), the tables (``tables``), the job store (``store``: read, update, claim, log, send)
and how a job travels on the broker (``queues``).

It imports nothing from ``api``, ``worker`` or ``engines``, and nothing heavy (no torch, no Celery).
"""
