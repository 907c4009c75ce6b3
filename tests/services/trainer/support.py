"""The trainer's test helpers, for its tests and any other package's: settings with a queue prefix of
their own, a job spec, a real worker process, and a divergence at a known step. Fixtures stay in
conftest.py; helpers live here, so that no test imports a conftest."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from services.trainer.settings import TrainerSettings
from shipyard_common.settings import PlatformSettings
from tests.support import stop_process_group

ROOT = Path(__file__).resolve().parents[3]


def trainer_settings(platform: PlatformSettings, **overrides: Any) -> TrainerSettings:
    # A queue prefix per settings object: test sessions share Redis db 13, and a worker of one
    # must never take another's jobs.
    return TrainerSettings(platform=platform, queue_prefix=f"test-{uuid.uuid4().hex[:8]}-", **overrides)


def job_spec(*, rev: str, dataset: str = "breast_cancer", **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model_name": "breast_cancer",
        "framework": "pytorch",
        "model": {"type": "mlp", "hidden": [64, 32]},
        "data": {"dataset": dataset, "rev": rev, "task": "classification", "target": "target",
                 "features": None, "validation_split": 0.2},
        "training": {"epochs": 20, "batch_size": 32, "learning_rate": 0.001, "optimizer": "adam", "seed": 0},
        "resources": {"queue": "cpu"},
        "exports": ["onnx"],
    }
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = spec
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return spec


def poison_weights_after(monkeypatch: pytest.MonkeyPatch, *, update: int, value: float) -> None:
    """Make the engine's optimizer set a weight to ``value`` right after its ``update``-th step:
    a divergence at a known step, to check what the NaN guard reports."""
    import torch

    from services.trainer.engines import engine

    build = engine.build_optimizer

    def poisoned(model: Any, job: Any) -> Any:
        optimizer = build(model, job)
        real_step, calls = optimizer.step, [0]

        def step(*args: Any, **kwargs: Any) -> Any:
            result = real_step(*args, **kwargs)
            calls[0] += 1
            if calls[0] == update:
                with torch.no_grad():
                    next(model.parameters()).fill_(value)
            return result

        optimizer.step = step
        return optimizer

    monkeypatch.setattr(engine, "build_optimizer", poisoned)


class WorkerProcess:
    def __init__(self, settings: TrainerSettings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        env = dict(os.environ)
        env.update(settings.platform.as_env())
        env["SHIPYARD_TRAINER_QUEUE_PREFIX"] = settings.queue_prefix
        # What decides how soon a lost worker's job is taken over, so that tests can shorten it.
        for name in ("stale_after_s", "max_attempts", "visibility_timeout_s",
                     "unacked_restore_interval_s", "unacked_restore_throttle"):
            env[f"SHIPYARD_TRAINER_{name.upper()}"] = str(getattr(settings, name))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.trainer.worker", "--queues", "cpu", "--concurrency", "1"],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        stop_process_group(self.process.pid, timeout=10)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
