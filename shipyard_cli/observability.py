"""Prometheus and Grafana beside the local stack (``shipyard up --with-prometheus --with-grafana``).

``infra/prometheus/prometheus.yml`` is the scrape configuration for the stack's default ports; here it
is the template: each ``shipyard-*`` job's target is set to where that part of this stack listens,
the intervals to the ones asked for, and the rule files to absolute paths, and the result is written
under the state directory. The end-to-end test starts its Prometheus from the same function.

Grafana reads ``infra/grafana/provisioning`` as it is; the two paths that differ per stack come from
the environment (``SHIPYARD_PROMETHEUS_URL``, ``SHIPYARD_GRAFANA_DASHBOARDS``), which Grafana expands
in provisioning files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from shipyard_common.settings import PlatformSettings

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "infra" / "prometheus"
PROMETHEUS_TEMPLATE = PROMETHEUS_DIR / "prometheus.yml"
GRAFANA_DIR = ROOT / "infra" / "grafana"
GRAFANA_PROVISIONING = GRAFANA_DIR / "provisioning"
GRAFANA_DASHBOARDS = GRAFANA_DIR / "dashboards"

DEFAULT_WORKER_METRICS_PORT = 8005
DEFAULT_PROMETHEUS_PORT = 9090
DEFAULT_GRAFANA_PORT = 3000
# The services' scrape jobs, by the platform setting that says where each listens.
SERVICE_JOBS = {
    "shipyard-trainer": "trainer_url",
    "shipyard-registry": "registry_url",
    "shipyard-serving": "serving_url",
    "shipyard-monitor": "monitor_url",
}
WORKER_JOB = "shipyard-worker"
PROMETHEUS_JOB = "prometheus"


class ObservabilityError(RuntimeError):
    pass


def host_port(url: str) -> str:
    parsed = urlparse(url)
    if parsed.hostname is None or parsed.port is None:
        raise ObservabilityError(f"{url} names no host and port to scrape")
    return f"{parsed.hostname}:{parsed.port}"


def scrape_targets(
    platform: PlatformSettings, *, worker_metrics_port: int, prometheus_port: int
) -> dict[str, str]:
    """Each scrape job of the template → the ``host:port`` it scrapes in the stack ``platform`` describes."""
    targets = {job: host_port(getattr(platform, setting)) for job, setting in SERVICE_JOBS.items()}
    targets[WORKER_JOB] = f"127.0.0.1:{worker_metrics_port}"
    targets[PROMETHEUS_JOB] = f"127.0.0.1:{prometheus_port}"
    return targets


def prometheus_config(
    targets: dict[str, str], *, scrape_interval: str = "15s", template: Path = PROMETHEUS_TEMPLATE
) -> dict[str, Any]:
    """The template with ``targets`` (job → ``host:port``), the interval, and absolute rule file paths."""
    config: dict[str, Any] = yaml.safe_load(template.read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    if jobs != set(targets):
        raise ObservabilityError(f"{template} scrapes {sorted(jobs)}; targets are for {sorted(targets)}")
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["evaluation_interval"] = scrape_interval
    config["rule_files"] = [str((template.parent / path).resolve()) for path in config.get("rule_files", [])]
    return config


def write_prometheus_config(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def prometheus_argv(binary: str, *, config: Path, data_dir: Path, port: int) -> list[str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
    ]


def grafana_binary() -> str | None:
    return shutil.which("grafana-server")


def grafana_home(binary: str) -> Path:
    """Grafana's home (``conf/defaults.ini``, ``public/``): ``SHIPYARD_GRAFANA_HOMEPATH``, else the
    Debian/RPM package's, else the release archive's (the folder above ``bin/``)."""
    configured = os.environ.get("SHIPYARD_GRAFANA_HOMEPATH")
    if configured:
        return Path(configured)
    packaged = Path("/usr/share/grafana")
    if (packaged / "conf" / "defaults.ini").exists():
        return packaged
    return Path(binary).resolve().parent.parent


def grafana_argv(binary: str) -> list[str]:
    return [binary, f"--homepath={grafana_home(binary)}"]


def grafana_env(*, state_dir: Path, port: int, prometheus_url: str) -> dict[str, str]:
    """Grafana's settings (``GF_*``) for the local stack: loopback, its data under the state
    directory, Shipyard's provisioning, anonymous viewers, nothing sent home."""
    data = state_dir / "grafana"
    return {
        "GF_SERVER_HTTP_ADDR": "127.0.0.1",
        "GF_SERVER_HTTP_PORT": str(port),
        "GF_PATHS_DATA": str(data / "data"),
        "GF_PATHS_LOGS": str(data / "logs"),
        "GF_PATHS_PLUGINS": str(data / "plugins"),
        "GF_PATHS_PROVISIONING": str(GRAFANA_PROVISIONING),
        "GF_AUTH_ANONYMOUS_ENABLED": "true",
        "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
        "GF_ANALYTICS_REPORTING_ENABLED": "false",
        "GF_ANALYTICS_CHECK_FOR_UPDATES": "false",
        "GF_ANALYTICS_CHECK_FOR_PLUGIN_UPDATES": "false",
        "GF_NEWS_NEWS_FEED_ENABLED": "false",
        "SHIPYARD_PROMETHEUS_URL": prometheus_url,
        "SHIPYARD_GRAFANA_DASHBOARDS": str(GRAFANA_DASHBOARDS),
    }
