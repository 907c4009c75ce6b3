"""Two people in a real browser govern a promotion, and the serving service follows it.

Debian's chromium (never a downloaded one) driven by Playwright against a real registry, trainer
API and serving process on the session's MLflow server, Redis and a SQLite platform database.
A trainer signs in, opens the model, compares two versions and asks for production for the newer
one; an approver, in another browser context, sees the request with its gate verdict and approves
it; serving then answers with the new version; the history names the request and the approver.

Every page visited is saved as a full-page screenshot under ``tmp_path / "screenshots"`` (and
under ``$SHIPYARD_SCREENSHOT_DIR`` when set), for people to look at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

from services.registry.app import create_app
from services.registry.settings import RegistrySettings
from services.serving.app import create_app as create_serving_app
from services.serving.settings import ServingSettings
from services.trainer.api import service as trainer_service
from services.trainer.app import create_app as create_trainer_app
from services.trainer.engines.reports import write_reports
from services.trainer.jobs import store as trainer_store
from services.trainer.jobs.schemas import JobCreate, JobState, Task
from services.trainer.settings import TrainerSettings
from shipyard_common.db import Database
from shipyard_common.lineage import (
    METRIC_TAG_PREFIX,
    MODEL_ARTIFACT_PATH,
    MODEL_CARD_FILE,
    REPORTS_ARTIFACT_PATH,
    TAG_DATASET,
    TAG_DATASET_REV,
    TAG_FORMATS,
    TAG_FRAMEWORK,
    TAG_GIT_COMMIT,
    TAG_JOB_ID,
    TAG_SIGNATURE,
    TAG_TASK,
)
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import (
    ModelFactory,
    RegisteredVersion,
    run_directly,
    tiny_classifier,
)
from tests.support import auth, free_port, missing_tool, name_of, running_app, token_of, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
ROW = [5.1, 3.5, 1.4, 0.2]
REV = "a41c07e9d3b25f8810c6de2f97b4a3c5e1f0d2b7"
CLASSES = ["setosa", "versicolor", "virginica"]
SIGNATURE = {"inputs": [{"name": "input", "shape": [None, 4], "dtype": "float32"}],
             "outputs": [{"name": "probabilities", "shape": [None, 3], "dtype": "float32"}]}
# (seed, metrics, params): three trainings of one classifier, each a little better than the last.
TRAININGS = [
    (1, {"val_accuracy": 0.8933, "val_f1_macro": 0.8871, "val_loss": 0.3412, "train_loss": 0.2950},
     {"lr": "0.001", "hidden_sizes": "[64, 32]", "epochs": "30", "dropout": "0.1"}),
    (2, {"val_accuracy": 0.9200, "val_f1_macro": 0.9154, "val_loss": 0.2617, "train_loss": 0.2203},
     {"lr": "0.001", "hidden_sizes": "[128, 64]", "epochs": "40", "dropout": "0.1"}),
    (3, {"val_accuracy": 0.9467, "val_f1_macro": 0.9452, "val_loss": 0.1934, "train_loss": 0.1712},
     {"lr": "0.0005", "hidden_sizes": "[128, 64]", "epochs": "60", "dropout": "0.2"}),
]
CARD = """# {name}

A PyTorch `mlp` classification model trained by Shipyard.

## Intended use
Sorting iris flowers by species from four measurements, for the field team's survey app.

## Data
- Dataset `iris` at revision `{rev}`
- Target `species`; 4 feature(s)
- 120 training rows, 30 validation rows
- Classes: setosa, versicolor, virginica

## Metrics (validation)
| metric | value |
|---|---|
{metrics}

## Limitations
- Trained on 150 flowers from one region; other cultivars are untested.
- <script>alert("raw HTML in a card is shown as text")</script>
"""


@dataclass
class Shots:
    """Full-page screenshots of every page visited, numbered in the order they were taken."""

    folders: list[Path]
    taken: list[str] = field(default_factory=list)

    def take(self, page: Any, label: str) -> None:
        page.wait_for_load_state("networkidle")
        name = f"{len(self.taken) + 1:02d}-{label}.png"
        page.screenshot(path=str(self.folders[0] / name), full_page=True)
        for folder in self.folders[1:]:
            shutil.copy(self.folders[0] / name, folder / name)
        self.taken.append(name)


def register(factory: ModelFactory, name: str, job_id: str) -> list[RegisteredVersion]:
    """Three versions laid out as the trainer leaves them: tags, params, card and report images."""
    found = []
    for seed, metrics, params in TRAININGS:
        tags = {f"{METRIC_TAG_PREFIX}{k}": repr(v) for k, v in metrics.items()}
        tags.update({TAG_DATASET: "iris", TAG_DATASET_REV: REV, TAG_SIGNATURE: json.dumps(SIGNATURE),
                     TAG_FORMATS: '["onnx"]', TAG_FRAMEWORK: "pytorch", TAG_TASK: "classification",
                     TAG_JOB_ID: job_id, TAG_GIT_COMMIT: "9e1b7c2d4f6a8b0c"})
        version = factory.register(name, tiny_classifier(seed), metrics=metrics, tags=tags)
        for key, value in params.items():
            factory.client.log_param(version.run_id, key, value)
        log_reports(factory, version.run_id, name, seed, metrics)
        found.append(version)
    return found


def log_reports(factory: ModelFactory, run_id: str, name: str, seed: int, metrics: dict[str, float]) -> None:
    """The trainer's own report drawings (curves, confusion matrix) and a model card, on the run."""
    epochs = 12
    history = [{"epoch": e, "train_loss": 1.1 * 0.8**e + 0.1, "val_loss": 1.2 * 0.82**e + 0.12 + seed / 100,
                "val_accuracy": min(0.99, 0.55 + 0.04 * e + seed / 100)} for e in range(1, epochs + 1)]
    confusion = [[10, 0, 0], [0, 9 - (seed < 3), 1 + (seed < 3)], [0, 1, 9]]
    outcome = SimpleNamespace(task=Task.CLASSIFICATION, classes=CLASSES, confusion=confusion, history=history,
                              best_epoch=epochs - 2)
    with tempfile.TemporaryDirectory() as folder:
        reports = Path(folder) / "reports"
        for path in write_reports(outcome, reports):
            factory.client.log_artifact(run_id, str(path), REPORTS_ARTIFACT_PATH)
        card = Path(folder) / MODEL_CARD_FILE
        rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in metrics.items())
        card.write_text(CARD.format(name=name, rev=REV, metrics=rows))
        factory.client.log_artifact(run_id, str(card), MODEL_ARTIFACT_PATH)


def make_job(database: Database, name: str) -> str:
    """A finished job with its log, written by the trainer's own service functions."""
    spec = JobCreate.model_validate({"model_name": name, "data": {
        "dataset": "iris", "rev": REV, "task": "classification", "target": "species"}})
    job = trainer_service.create_job(database=database, spec=spec, enqueue=lambda job_id, queue: None)
    for line, message in enumerate(["claimed by worker cpu-1", "dataset iris@a41c07e9 (150 rows)",
                                    *(f"epoch {e}/60 train_loss {0.9 * 0.95 ** e:.4f} val_accuracy "
                                      f"{min(0.9467, 0.6 + e * 0.01):.4f}" for e in range(1, 9)),
                                    "exported onnx (max |diff| 2.4e-07)", "registered version 3"], start=1):
        trainer_store.append_log(database=database, job_id=job.id, line=line, level="INFO", message=message)
    trainer_store.update_job(database=database, job_id=job.id, state=JobState.SUCCEEDED,
                             progress={**job.progress.model_dump(), "epoch": 60, "epochs": 60},
                             metrics=TRAININGS[2][1])
    return job.id


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        missing_tool(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def shots(tmp_path: Path) -> Shots:
    folders = [tmp_path / "screenshots"]
    if os.environ.get("SHIPYARD_SCREENSHOT_DIR"):
        folders.append(Path(os.environ["SHIPYARD_SCREENSHOT_DIR"]))
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    return Shots(folders)


@dataclass
class Platform:
    registry: str
    serving: str
    versions: list[RegisteredVersion]
    name: str
    job_id: str
    database: Database


@pytest.fixture
def platform_running(isolated_platform: PlatformSettings, model_factory: ModelFactory) -> Iterator[Platform]:
    """Registry, trainer API and serving on one platform; v2 in production and served; a gate."""
    name = f"iris-species-{uuid.uuid4().hex[:6]}"
    ports = {role: free_port() for role in ("trainer", "serving")}
    platform = isolated_platform.model_copy(update={
        "trainer_url": f"http://127.0.0.1:{ports['trainer']}", "serving_url": f"http://127.0.0.1:{ports['serving']}",
        "monitor_url": f"http://127.0.0.1:{free_port()}"})
    database = Database(platform.database_url)
    trainer = create_trainer_app(TrainerSettings(platform=platform, reconcile_interval_s=3600,
                                                 queue_prefix=f"ui-{uuid.uuid4().hex[:8]}-"))
    with ExitStack() as stack:
        stack.enter_context(running_app(trainer, port=ports["trainer"]))  # creates the tables
        job_id = make_job(database, name)
        versions = register(model_factory, name, job_id)
        registry = stack.enter_context(running_app(create_app(RegistrySettings(platform=platform))))
        admin = auth("admin")
        for version, reason in (("1", "first release"), ("2", "wider layers, +2.7 points accuracy")):
            httpx.post(f"{registry}/models/{name}/versions/{version}/promote", json={"reason": reason},
                       headers=admin, timeout=60).raise_for_status()
        httpx.put(f"{registry}/models/{name}/gate", headers=admin, timeout=60, json={
            "rules": ["val_accuracy >= production - 0.01", "val_f1_macro >= 0.9"]}).raise_for_status()
        decide_earlier_requests(registry, name)
        trainer_store.update_job(database=database, job_id=job_id, model_version=versions[2].version,
                                 mlflow_run_id=versions[2].run_id)
        serving_app = create_serving_app(ServingSettings(platform=platform, reconcile_interval_s=300))
        serving = stack.enter_context(running_app(serving_app, port=ports["serving"]))
        wait_for(lambda: served(serving, name) == "2", timeout=60, what="serving v2")
        yield Platform(registry, serving, versions, name, job_id, database)
    database.dispose()


def served(serving: str, name: str) -> str | None:
    """The version serving says answers for ``name``."""
    return httpx.get(f"{serving}/v1/models/{name}", headers=auth("viewer")).json()["version"]  # type: ignore[no-any-return]


def decide_earlier_requests(registry: str, name: str) -> None:
    """Two requests decided before the test starts, so the inbox has a history: one approved, one not."""
    for version, alias, verb, reason in (("3", "staging", "approve", "staging smoke tests pass"),
                                         ("1", "canary", "reject", "v1 is older than production")):
        made = httpx.post(f"{registry}/models/{name}/requests", headers=auth("trainer"), timeout=60,
                          json={"version": version, "alias": alias, "reason": f"try v{version} as {alias}"})
        made.raise_for_status()
        httpx.post(f"{registry}/requests/{made.json()['id']}/{verb}", headers=auth("approver"), timeout=60,
                   json={"reason": reason}).raise_for_status()


def sign_in(context: Any, base: str, role: str, shots: Shots | None = None) -> Any:
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.goto(f"{base}/ui/models")
    assert "/ui/login" in page.url
    if shots is not None:
        shots.take(page, "sign-in")
    page.fill("#token", token_of(role))
    page.click("button:has-text('Sign in')")
    page.wait_for_url(f"{base}/ui/models")
    assert name_of(role) in page.inner_text(".topbar") and role in page.inner_text(".topbar")
    return page


def test_a_trainer_asks_an_approver_approves_and_serving_follows(
    browser: Any, platform_running: Platform, shots: Shots
) -> None:
    p = platform_running
    base, name = p.registry, p.name
    viewport = {"width": 1360, "height": 900}

    # A, a trainer: the model, two versions compared, a request for production.
    a = sign_in(browser.new_context(viewport=viewport), base, "trainer", shots)
    shots.take(a, "models")
    # The session's registry holds other tests' models too, more than a page of them: find it by name.
    a.fill("input[name=search]", name)
    a.click("form.search button")
    a.wait_for_url(f"{base}/ui/models?search={name}")
    shots.take(a, "models-search")
    a.click(f"a.strong:has-text('{name}')")
    a.wait_for_selector("svg.chart")
    assert "val_accuracy by version" in a.inner_text("body")
    shots.take(a, "model")
    a.select_option("select[name=a]", "2")
    a.select_option("select[name=b]", "3")
    a.click("button:has-text('Compare')")
    a.wait_for_url(re.compile(r".*/compare\?a=2&b=3"))
    assert a.locator("td.delta.better").count() >= 3 and "same revision" in a.inner_text("body")
    shots.take(a, "compare")
    a.click(".compare-head a:has-text('v3')")
    a.wait_for_selector("img[alt='training_curves.png']")
    # The plots come from MLflow through the registry, after the page: wait until the browser has them all
    # (loaded or broken), then every one must have loaded.
    a.wait_for_function("[...document.images].every(i => i.complete)")
    assert a.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    assert "<script>" in a.inner_text(".markdown")  # the card's raw HTML is text, not markup
    shots.take(a, "version")
    a.select_option("#req-alias", "production")
    a.fill("#req-reason", "v3 beats v2 by 2.7 points of accuracy and 3 of macro F1 on the same data revision")
    a.click("button:has-text('Request promotion')")
    flash = a.inner_text(".flash")
    request_id = re.search(r"Request #(\d+)", flash).group(1)  # type: ignore[union-attr]
    shots.take(a, "version-requested")

    # B, an approver in another browser: the inbox, the gate's verdict, the approval.
    b = sign_in(browser.new_context(viewport=viewport), base, "approver")
    b.click("nav.nav a:has-text('Requests')")
    card = b.locator(f"#request-{request_id}")
    assert "Gate passes" in card.inner_text() and name_of("trainer") in card.inner_text()
    assert "val_accuracy 0.9467 (v3) vs 0.91 (production v2: 0.92)" in card.inner_text()
    shots.take(b, "requests")
    card.locator("input[name=reason]").fill("Checked the curves and the confusion matrix; ship it")
    card.locator("button:has-text('Approve')").click()
    assert f"Request #{request_id} approved" in b.inner_text(".flash")
    shots.take(b, "requests-approved")

    # Serving follows the production alias: its answers now come from v3.
    viewer = auth("viewer")
    wait_for(lambda: served(p.serving, name) == "3", timeout=60, what="serving v3")
    answer = httpx.post(f"{p.serving}/v1/models/{name}/predict", json={"inputs": [ROW]}, headers=viewer)
    assert answer.status_code == 200 and answer.headers["x-model-version"] == "3"
    np.testing.assert_allclose(answer.json()["outputs"], run_directly(p.versions[2].model_bytes, [ROW]),
                               rtol=1e-5, atol=1e-6)

    # The history shows the move with A's request and B's name; the model page shows v3 served.
    b.goto(f"{base}/ui/models/{name}/history")
    latest = b.locator(".timeline li").first.inner_text()
    assert f"#{request_id}" in latest and name_of("trainer") in latest and name_of("approver") in latest
    assert "v2" in latest and "v3" in latest
    shots.take(b, "history")
    b.goto(f"{base}/ui/models/{name}")
    def shows_v3_served() -> bool:
        b.reload()
        return "answers with v3" in b.inner_text(".tiles")

    wait_for(shows_v3_served, timeout=20, interval=0.5, what="the model page showing v3 served")
    shots.take(b, "model-after")
    b.goto(f"{base}/ui/models/{name}/rollback")
    assert "Roll back to v2" in b.inner_text("body")
    shots.take(b, "rollback-confirm")
    a.goto(f"{base}/ui/jobs")
    a.click(f"a:has-text('{p.job_id[:8]}')")
    assert "registered version 3" in a.inner_text("#log")
    shots.take(a, "job")
    follow_a_running_job(a, base, p, shots)
    assert len(shots.taken) >= 11


def follow_a_running_job(page: Any, base: str, p: Platform, shots: Shots) -> None:
    """The job page's script shows lines the worker writes after the page loaded, and the job's end."""
    spec = JobCreate.model_validate({"model_name": p.name, "data": {
        "dataset": "iris", "rev": REV, "task": "classification", "target": "species"}})
    job = trainer_service.create_job(database=p.database, spec=spec, enqueue=lambda job_id, queue: None)
    trainer_store.update_job(database=p.database, job_id=job.id, state=JobState.RUNNING)
    trainer_store.append_log(database=p.database, job_id=job.id, line=1, level="INFO", message="epoch 1/60")
    page.goto(f"{base}/ui/jobs/{job.id}")
    assert "following" in page.inner_text("[data-log-status]")
    trainer_store.append_log(database=p.database, job_id=job.id, line=2, level="WARNING",
                             message="epoch 2/60: val_loss rose")
    page.wait_for_selector("#log .lvl-warning:has-text('val_loss rose')")
    trainer_store.update_job(database=p.database, job_id=job.id, state=JobState.CANCELLED)
    page.wait_for_selector("[data-job-state] .state-cancelled")  # the page reloads once the job ends
    assert "epoch 2/60: val_loss rose" in page.inner_text("#log")
    shots.take(page, "job-followed")
