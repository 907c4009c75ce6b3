"""The monitor on what a served table and a served sequence model were really sent (issue 16), end to end:
both trained by the real trainer (its API and a Celery worker) on data generated here, registered,
given the production alias and served by serving; rows sent over HTTP as a client sends them (raw
rows with strings and nulls; ragged sequences); the prediction log written by serving's own
journal and shipper; then the monitor's pass closes the windows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mlflow.tracking import MlflowClient
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select

from services.monitor.context import create_monitor
from services.monitor.loop import run_pass
from services.monitor.settings import MonitorSettings, WindowSpec
from services.monitor.tables import WindowRecord
from shipyard_common.datasets import DataRepo
from shipyard_common.db import Database
from shipyard_common.lineage import PRODUCTION, TAG_SEQUENCE, TAG_SIGNATURE
from shipyard_common.records import PredictionRecord
from tests.services.monitor.input_data import (
    list_column,
    sequence_bodies,
    sequences,
    shifted_table,
    table_bodies,
    table_frame,
)
from tests.services.registry.model_factory import unique_name
from tests.services.serving.support import predict, serving, serving_platform, train_for_production
from tests.services.trainer.support import job_spec
from tests.support import auth, wait_for


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str,
          mlflow_server: str) -> Iterator[dict[str, Any]]:
    """A table model (``code`` declared categorical) and an LSTM on a list column, trained, served."""
    state = tmp_path_factory.mktemp("served-inputs")
    platform = serving_platform(state, redis_url=redis_url, mlflow_server=mlflow_server)
    repo = DataRepo(platform.data_repo_path, platform.dvc_remote_path)
    table = table_frame(600, seed=0)
    revs = {"table": repo.add("table", table).rev, "seq_list": repo.add("seq_list", list_column(
        sequences(400, seed=1))).rev}
    names = {"table": unique_name("monitor-table"), "seq_list": unique_name("monitor-seq")}
    specs = {
        "table": job_spec(rev=revs["table"], dataset="table", model_name=names["table"], data__target="y",
                          data__columns={"code": {"type": "categorical"}}, training__epochs=2),
        "seq_list": job_spec(rev=revs["seq_list"], dataset="seq_list", model_name=names["seq_list"],
                             model={"type": "lstm", "hidden_size": 8}, data__target="sign",
                             data__sequence={"column": "steps"}, training__epochs=2),
    }
    train_for_production(platform, specs, state)
    with serving(platform) as base:
        def status(name: str) -> Any:
            return httpx.get(f"{base}/v1/models/{name}", headers=auth("viewer")).json().get("status")

        wait_for(lambda: all(status(name) == "serving" for name in names.values()), timeout=120,
                 what="both models served")
        yield {"base": base, "platform": platform, "names": names, "table": table}


def logged_requests(database: Database, model: str) -> int:
    with database.session() as session:
        return int(session.scalar(select(func.count()).select_from(PredictionRecord)
                                  .where(PredictionRecord.model == model)) or 0)


def test_the_monitor_reads_a_served_tables_columns_and_sequences_as_serving_logged_them(stack):
    base, names, platform = stack["base"], stack["names"], stack["platform"]
    table, listed = names["table"], names["seq_list"]
    sent = {
        table: table_bodies(stack["table"].sample(200, random_state=5))
        + table_bodies(shifted_table(stack["table"])),
        listed: sequence_bodies(sequences(100, seed=11), flat=True)
        + sequence_bodies(sequences(100, seed=12, lengths=(14, 20)), flat=True),
    }
    for model, bodies in sent.items():
        for body in bodies:
            answer = predict(base, model, body)
            assert answer.status_code == 200, answer.text
    database = Database(platform.database_url)
    wait_for(lambda: all(logged_requests(database, model) == len(bodies) for model, bodies in sent.items()),
             timeout=60, what="serving's shipper to log every request")
    database.dispose()

    # The trainer tags the sequence version with where its sequences are (the monitor reads that).
    client = MlflowClient(tracking_uri=platform.mlflow_tracking_uri)
    tags = client.get_model_version_by_alias(listed, PRODUCTION).tags
    reads = json.loads(tags[TAG_SIGNATURE])["sequence"]["max_length"]
    assert json.loads(tags[TAG_SEQUENCE]) == {"column": "steps", "features": ["steps"], "max_length": reads}
    assert 3 <= reads <= 20 and TAG_SEQUENCE not in client.get_model_version_by_alias(table, PRODUCTION).tags
    settings = MonitorSettings(platform=platform, window_grace_s=0, window={"rows": 200},
                               windows={listed: WindowSpec(rows=100)})
    monitor = create_monitor(settings=settings, database=Database(platform.database_url),
                             registry=CollectorRegistry())
    try:
        run_pass(monitor=monitor)
        with monitor.database.session() as session:
            found = {model: list(session.scalars(select(WindowRecord).where(WindowRecord.model == model)
                                                 .order_by(WindowRecord.id))) for model in sent}
    finally:
        monitor.close()
        monitor.database.dispose()

    calm, shifted = found[table]
    for window in (calm, shifted):
        assert (window.status, window.rows) == ("ok", 200), window.message
        assert window.quality["schema_mismatch_share"] == 0
        assert {f["name"]: f["kind"] for f in window.features} == {
            "colour": "categorical", "size": "numerical", "code": "categorical"}
    assert not any(f["drifted"] for f in calm.features) and calm.quality["missing"]["colour"] > 0
    assert {f["name"] for f in shifted.features if f["drifted"]} == {"colour", "code"}
    assert shifted.quality["missing"]["size"] == pytest.approx(0.3)
    assert shifted.quality["unseen_categories"]["colour"]["values"] == ["purple"]

    short, longer = found[listed]
    for window in (short, longer):
        assert (window.status, window.rows, window.quality["widths"]) == ("ok", 100, {}), window.message
        assert [f["name"] for f in window.features] == ["mean(steps)", "length"]
    assert not any(f["drifted"] for f in short.features)
    assert {f["name"]: f["drifted"] for f in longer.features}["length"] is True
