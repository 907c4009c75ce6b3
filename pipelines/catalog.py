"""Every flow the platform deploys, by name: what ``python -m pipelines.serve`` serves as
``<name>/shipyard`` and what ``shipyard pipelines run`` and ``POST /pipelines/{name}/runs`` start."""

from __future__ import annotations

from typing import Any

from pipelines import PIPELINES
from pipelines.batch import batch_predict_flow
from pipelines.flows import ingest, retrain_flow, train_and_deploy_flow

FLOWS: dict[str, Any] = {
    "ingest": ingest,
    "train_and_deploy": train_and_deploy_flow,
    "retrain": retrain_flow,
    "batch_predict": batch_predict_flow,
}
assert tuple(FLOWS) == PIPELINES
