"""Trainer: accepts training jobs over HTTP and runs them on Celery workers with PyTorch.

The API process never imports torch: it stores the job, then hands its id to a worker by name
(``shipyard.train``). The worker trains, exports ONNX, and registers the version in MLflow.

A folder per layer; each imports only the layers below it, never one above or beside it:

1. ``app`` (and ``__main__``): the HTTP service put together; imports ``api`` and ``worker``
   (the Celery app it sends with, the reconciler thread it runs).
2. ``worker``: the Celery app, the job runner, the broker's view, the reconciler, the worker's
   metrics; imports ``engines`` (lazily: a process that only sends never loads torch) and ``jobs``.
   ``api``: the routes, the job service, the job metrics collector; imports ``jobs`` only.
   Neither imports the other.
3. ``engines``: the training code (PyTorch, Keras, export, tracking, model card); imports ``jobs``
   (the spec) only.
4. ``jobs``: what ``api``, ``worker`` and ``engines`` share: the job spec (``schemas``), the tables,
   the job store (``store``: read, update, claim, log, send) and how a job travels on the broker
   (``queues``).
5. ``settings``, then ``shipyard_common``: imported by any layer above.

Importers outside the trainer (tests, ``bench/``) take the job spec, the tables and the job store
from ``jobs`` too; ``api.service`` holds only what the HTTP API does itself.
"""
