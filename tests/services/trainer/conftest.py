"""Trainer fixtures: settings with a queue prefix of their own, torch on one thread, digits, a real
worker process (the helpers behind them are in support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.trainer.settings import TrainerSettings
from shipyard_common.settings import PlatformSettings
from tests.services.trainer.support import WorkerProcess, trainer_settings


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread for a module: small models gain nothing from intra-op threads, and on
    a busy machine (the suite runs beside workers and servers) threads spinning against each
    other make training ten times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> Any:
    """scikit-learn's digits: 1797 images of 8×8 pixels as 64 feature columns and ``target``."""
    from sklearn.datasets import load_digits

    return load_digits(as_frame=True).frame


@pytest.fixture
def settings(platform: PlatformSettings) -> TrainerSettings:
    return trainer_settings(platform)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Any]:
    """Start ``python -m services.trainer.worker`` for given settings; always stopped afterwards."""
    workers: list[WorkerProcess] = []

    def start(settings: TrainerSettings) -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"worker-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()
