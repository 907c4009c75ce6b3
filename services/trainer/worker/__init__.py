"""The trainer's worker layer: the Celery app, the job runner, the broker's view, the reconciler.

``python -m services.trainer.worker`` starts a worker (see :mod:`services.trainer.worker.celery_app`).
"""
