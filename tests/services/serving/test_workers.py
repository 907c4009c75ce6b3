"""Several worker processes (SHIPYARD_SERVING_WORKERS=2): each serves and logs; SIGTERM drains all.

A real ``python -m services.serving`` with two uvicorn worker processes behind one port, on the
SQLite database (each worker writes its own prediction log rows to it: WAL + busy timeout). The
supervisor forwards SIGTERM to the workers, which report not ready, drain, write what their logs
hold and exit; the supervisor exits 0 once they have.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path

import httpx
from sqlalchemy import select

from shipyard_common.db import Database
from shipyard_common.records import PredictionRecord
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import ModelFactory, unique_name
from tests.services.serving.model_folder import register_folder
from tests.services.serving.processes import serving_process
from tests.support import auth, free_port, wait_for

ROWS = [[0.1, 0.2, 0.3, 0.4]]


def test_two_workers_serve_log_and_drain_on_sigterm(
    isolated_platform: PlatformSettings, model_factory: ModelFactory, tmp_path: Path
) -> None:
    version = register_folder(model_factory, unique_name("workers"), seed=4, serve="onnx")
    model_factory.set_production(version.name, version.version)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    db_url = f"sqlite:///{tmp_path / 'serving.db'}"
    platform = isolated_platform.model_copy(update={"db_url": db_url, "serving_url": base})
    log_path = tmp_path / "serving.log"
    with serving_process(platform, port=port, log_path=log_path, workers="2", drain_grace_s="1",
                         reconcile_interval_s="300") as process:
        def ready() -> bool:
            assert process.poll() is None, log_path.read_text()[-3000:]
            return httpx.get(f"{base}/readyz", timeout=5).status_code == 200

        wait_for(ready, timeout=180, what="serving ready")

        def both_serving() -> bool:  # each worker loads the registry's models itself, in its own time
            return all(httpx.post(f"{base}/v1/models/{version.name}/predict", json={"inputs": ROWS},
                                  headers=auth("viewer"), timeout=30).status_code == 200 for _ in range(10))

        wait_for(both_serving, timeout=180, what="both workers serving the model")
        # Both workers answer (each loads the model itself): a few requests reach each.
        sent = []
        for _ in range(40):
            request_id = uuid.uuid4().hex
            response = httpx.post(f"{base}/v1/models/{version.name}/predict", json={"inputs": ROWS},
                                  headers={**auth("viewer"), "X-Request-ID": request_id}, timeout=30)
            if response.status_code == 503:  # a worker still loading the model
                continue
            assert response.status_code == 200, response.text
            sent.append(request_id)
        assert len(sent) >= 20
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0, log_path.read_text()[-3000:]
    text = log_path.read_text()
    assert text.count("draining for 1.0s") == 2, text[-3000:]
    database = Database(db_url)
    try:
        with database.session() as session:
            logged = set(session.scalars(
                select(PredictionRecord.request_id).where(PredictionRecord.model == version.name)
            ).all())
    finally:
        database.dispose()
    assert set(sent) <= logged
