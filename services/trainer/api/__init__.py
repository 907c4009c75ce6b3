"""The trainer's HTTP layer: the routes, the job service, the job metrics collector.

It stores jobs through :mod:`services.trainer.jobs` and sends them to a worker by name; it never
imports ``worker`` or ``engines`` (hence neither torch nor Celery's task code).
"""
