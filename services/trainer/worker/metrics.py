"""The worker's own ``/metrics``, on ``SHIPYARD_WORKER_METRICS_PORT``.

Prometheus's ``up`` of that target is "is the worker alive"; the GPUs' memory and utilisation are
read from ``nvidia-smi`` when it is on ``PATH``: in the worker's main process, which must never touch
CUDA (its pool's children train, and CUDA does not survive a fork). No GPU, no GPU series.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("shipyard.trainer.metrics")

NVIDIA_SMI_FIELDS = ("index", "name", "memory.used", "memory.total", "utilization.gpu")
MIB = 1024 * 1024


class WorkerMetricsSettings(BaseSettings):
    """Where a worker serves ``/metrics``; no port, no endpoint."""

    model_config = SettingsConfigDict(env_prefix="SHIPYARD_WORKER_", extra="ignore")

    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"


@dataclass(frozen=True)
class GpuReading:
    index: str
    name: str
    memory_used_bytes: float
    memory_total_bytes: float
    utilization_ratio: float | None


def parse_nvidia_smi(output: str) -> list[GpuReading]:
    """``nvidia-smi --query-gpu=index,name,memory.used,memory.total,utilization.gpu
    --format=csv,noheader,nounits`` lines (MiB, percent); a field it cannot read is ``[N/A]``."""
    readings = []
    for line in output.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != len(NVIDIA_SMI_FIELDS):
            continue
        index, name, used, total, utilization = fields
        if not (_number(used) is not None and _number(total) is not None):
            continue
        percent = _number(utilization)
        readings.append(GpuReading(index, name, float(used) * MIB, float(total) * MIB,
                                   percent / 100.0 if percent is not None else None))
    return readings


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_gpus(binary: str = "nvidia-smi", timeout_s: float = 5.0) -> list[GpuReading]:
    """The GPUs ``nvidia-smi`` reports; none without the binary or when it fails."""
    found = shutil.which(binary)
    if found is None:
        return []
    argv = [found, f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader,nounits"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("no GPU metrics this scrape: nvidia-smi failed: %s", exc)
        return []
    return parse_nvidia_smi(done.stdout)


class GpuCollector(Collector):
    """GPU memory and utilisation, read at each scrape (``read`` is :func:`read_gpus` outside tests)."""

    def __init__(self, read: Callable[[], list[GpuReading]] = read_gpus) -> None:
        self.read = read

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        readings = self.read()
        if not readings:
            return
        labels = ["gpu", "name"]
        used = GaugeMetricFamily("shipyard_gpu_memory_used_bytes", "GPU memory in use", labels=labels)
        total = GaugeMetricFamily("shipyard_gpu_memory_total_bytes", "GPU memory in all", labels=labels)
        busy = GaugeMetricFamily("shipyard_gpu_utilization_ratio",
                                 "Share of the last sample period a kernel ran on the GPU", labels=labels)
        for gpu in readings:
            used.add_metric([gpu.index, gpu.name], gpu.memory_used_bytes)
            total.add_metric([gpu.index, gpu.name], gpu.memory_total_bytes)
            if gpu.utilization_ratio is not None:
                busy.add_metric([gpu.index, gpu.name], gpu.utilization_ratio)
        yield from (used, total, busy)


def worker_registry(queues: Iterable[str], concurrency: int) -> CollectorRegistry:
    registry = CollectorRegistry()
    info = GaugeMetricFamily("shipyard_worker_info", "1 per running worker: its queues and concurrency",
                             labels=["queues", "concurrency"])
    info.add_metric([",".join(queues), str(concurrency)], 1)
    registry.register(_Constant([info]))
    registry.register(GpuCollector())
    return registry


class _Constant(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def serve_worker_metrics(
    settings: WorkerMetricsSettings, *, queues: Iterable[str], concurrency: int
) -> WSGIServer | None:
    """Serve the worker's ``/metrics`` from a thread of this (the main) process; None without a port."""
    if settings.metrics_port is None:
        return None
    server, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host,
                                  registry=worker_registry(queues, concurrency))
    log.info("worker metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    return server
