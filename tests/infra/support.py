"""What the fast infra tests and the end-to-end Prometheus test share: the dashboards' queries with
Grafana's variables filled in, and the alert rules with their threshold taken off."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "infra" / "prometheus"
RULES_FILE = PROMETHEUS_DIR / "rules" / "shipyard.yml"
GRAFANA_DIR = ROOT / "infra" / "grafana"
DASHBOARDS_DIR = GRAFANA_DIR / "dashboards"
GPU_METRICS = "shipyard_gpu_"

# Grafana's built-in interval variables, as Grafana would fill them in for a 1 s scrape interval over
# the last few minutes.
BUILTINS = {"$__rate_interval": "5m", "$__interval": "15s", "$__range": "10m"}
# A top-level comparison against a number at the end of an expression: `… > 0.05`, `… == 0`.
THRESHOLD = re.compile(r"\s*(==|!=|>=|<=|>|<)\s*(bool\s+)?-?[0-9][0-9.e+-]*\s*$")


def build_module() -> ModuleType:
    """``infra/grafana/build_dashboards.py``, imported from its path (infra is no package)."""
    path = GRAFANA_DIR / "build_dashboards.py"
    spec = importlib.util.spec_from_file_location("build_dashboards", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict[str, Any]]:
    """The committed dashboard files, by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS_DIR.glob("*.json"))}


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    expr: str

    @property
    def gpu(self) -> bool:
        return GPU_METRICS in self.expr

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref}"


def panel_queries(boards: dict[str, dict[str, Any]]) -> list[PanelQuery]:
    return [
        PanelQuery(name, panel["title"], target["refId"], target["expr"])
        for name, board in boards.items()
        for panel in board["panels"]
        for target in panel["targets"]
    ]


def variable_queries(boards: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(dashboard, variable, ``label_values(…)`` query) of every query variable."""
    return [
        (name, variable["name"], variable["definition"])
        for name, board in boards.items()
        for variable in board["templating"]["list"]
        if variable["type"] == "query"
    ]


def fill(expr: str, values: dict[str, str]) -> str:
    """``expr`` with Grafana's built-in variables and ``values`` (``{"model": "iris"}``) filled in."""
    for name, value in BUILTINS.items():
        expr = expr.replace(name, value)
    for name, value in values.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert "$" not in expr, f"a variable is left unfilled in {expr}"
    return expr


@dataclass(frozen=True)
class AlertRule:
    name: str
    expr: str

    @property
    def query(self) -> str:
        """The expression without its threshold: what the alert compares (``up{…}`` of ``up{…} == 0``)."""
        match = THRESHOLD.search(self.expr)
        assert match, f"{self.name}: its expression does not end in a comparison against a number"
        return self.expr[: match.start()].strip()


def alert_rules() -> list[AlertRule]:
    groups = yaml.safe_load(RULES_FILE.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    return [AlertRule(rule["alert"], rule["expr"]) for rule in rules if "alert" in rule]


# Every settings class a Shipyard process builds from its environment, by module and class name.
SETTINGS_CLASSES = (
    ("shipyard_common.settings", "PlatformSettings"),
    ("shipyard_common.oidc", "OidcSettings"),
    ("services.trainer.settings", "TrainerSettings"),
    ("services.trainer.worker.metrics", "WorkerMetricsSettings"),
    ("services.trainer.scaler.settings", "ScalerSettings"),
    ("services.registry.settings", "RegistrySettings"),
    ("services.serving.settings", "ServingSettings"),
    ("services.monitor.settings", "MonitorSettings"),
    ("pipelines.tasks", "PipelineSettings"),
)
CODE_DIRS = ("services", "shipyard_common", "shipyard_cli", "pipelines")
_ENV_LITERAL = re.compile(r"[\"'](SHIPYARD_[A-Z0-9_]*[A-Z0-9])[\"']")


def settings_env_names() -> set[str]:
    """Every ``SHIPYARD_*`` variable the platform reads: each settings class's fields under its prefix
    (nested settings under their own), and each name the code spells out whole (``os.environ`` reads,
    such as ``SHIPYARD_SERVING_GRPC_PORT``). Compose files and the Helm chart may set only these, so a
    misspelt variable fails a test instead of being ignored in production."""
    from pydantic_settings import BaseSettings

    names: set[str] = set()
    for module_name, class_name in SETTINGS_CLASSES:
        names |= _field_env_names(getattr(importlib.import_module(module_name), class_name), BaseSettings)
    for directory in CODE_DIRS:
        for path in (ROOT / directory).rglob("*.py"):
            names |= set(_ENV_LITERAL.findall(path.read_text()))
    return names


def _field_env_names(settings: type[Any], base: type[Any]) -> set[str]:
    prefix = str(settings.model_config.get("env_prefix", "")).upper()
    names: set[str] = set()
    for field_name, field in settings.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, base):
            names |= _field_env_names(kind, base)  # read from its own prefix, not as one variable
        else:
            names.add(prefix + field_name.upper())
    return names
