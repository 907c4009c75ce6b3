"""Prefect pipelines that drive the platform over its HTTP APIs."""

# The flows ``pipelines.serve`` serves, each as the deployment ``<name>/shipyard``
# (``pipelines.catalog.FLOWS``); named here so that a caller can check a name without importing Prefect.
PIPELINES = ("ingest", "train_and_deploy", "retrain", "batch_predict")
DEPLOYMENT = "shipyard"
