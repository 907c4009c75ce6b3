"""Code every Shipyard service shares: settings, errors, auth, database, events, metrics, logging.

Nothing here imports a service. Services import this package and talk to each other over
HTTP, Celery, events and the MLflow registry.
"""
