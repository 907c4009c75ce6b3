"""The trainer's HTTP layer: routes, request and answer schemas, the job service, the tables.

Nothing here imports torch or Celery's task code: jobs are stored, then sent to a worker by name.
"""
