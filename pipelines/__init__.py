"""Prefect pipelines that drive the platform over its HTTP APIs."""

# The flows ``pipelines.serve`` serves, each as the deployment ``<name>/shipyard``
# (``pipelines.flows.FLOWS``).
PIPELINES = ("ingest", "train_and_deploy", "retrain")
DEPLOYMENT = "shipyard"
