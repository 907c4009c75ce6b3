"""The Prometheus configuration and alert rules, checked by Prometheus's own ``promtool``: the shipped
file, the one ``shipyard up --with-prometheus`` writes, the rules, and the rules' unit tests (each
alert fires, and stays quiet, on series made for it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shipyard_cli import observability
from shipyard_cli.stack import Stack
from shipyard_common.settings import PlatformSettings
from tests.infra.support import PROMETHEUS_DIR, RULES_FILE, alert_rules
from tests.support import TOKENS, free_port

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus; .ci/run does)"
)
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    argv = [PROMTOOL, *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def assert_ok(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_the_shipped_configuration_and_rules_are_valid():
    assert_ok(promtool("check", "config", PROMETHEUS_DIR / "prometheus.yml"))
    assert_ok(promtool("check", "rules", RULES_FILE))


@needs_promtool
@pytest.mark.parametrize("tests_file", RULE_TESTS, ids=lambda p: p.name)
def test_rule_unit_tests_pass(tests_file):
    assert_ok(promtool("test", "rules", tests_file))


@needs_promtool
def test_a_broken_rule_fails_its_unit_tests(tmp_path):
    """The unit tests can fail: with the serving error threshold raised, the alert they expect is missing."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    text = RULES_FILE.read_text()
    threshold = "\n          > 0.05\n"  # the serving error rate's
    assert text.count(threshold) == 1
    (tmp_path / "rules" / "shipyard.yml").write_text(text.replace(threshold, "\n          > 0.5\n"))
    shutil.copy(PROMETHEUS_DIR / "tests" / "shipyard_test.yml", tmp_path / "tests")
    done = promtool("test", "rules", tmp_path / "tests" / "shipyard_test.yml")
    assert done.returncode != 0 and "ShipyardServingErrorRate" in done.stdout + done.stderr


def test_every_alert_has_a_threshold_a_severity_words_and_a_unit_test():
    rules = yaml.safe_load(RULES_FILE.read_text())["groups"]
    tested = {
        case["alertname"]
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    alerts = [rule for group in rules for rule in group["rules"] if "alert" in rule]
    assert {rule["alert"] for rule in alerts} == {
        "ShipyardDatasetDrift", "ShipyardLiveAccuracyBelowFloor", "ShipyardServingErrorRate",
        "ShipyardServingP99Latency", "ShipyardPredictionLogLag", "ShipyardWorkerDown", "ShipyardServiceDown",
        "ShipyardTrainingQueueBacklog", "ShipyardAliasMovedOutsideRegistry",
    }
    for rule in alerts:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert rule["alert"] in tested, f"{rule['alert']} has no unit test that makes it fire"
    for alert in alert_rules():
        assert alert.query and alert.query != alert.expr  # the e2e test queries this part


def default_stack(tmp_path: Path, **ports: int) -> Stack:
    return Stack(PlatformSettings(env="test", state_dir=tmp_path, tokens=TOKENS), **ports)


def test_the_shipped_targets_are_the_default_stacks():
    """``infra/prometheus/prometheus.yml`` scrapes what ``shipyard up`` starts on its default ports."""
    shipped = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in shipped["scrape_configs"]}
    expected = observability.scrape_targets(
        PlatformSettings(), worker_metrics_port=observability.DEFAULT_WORKER_METRICS_PORT,
        prometheus_port=observability.DEFAULT_PROMETHEUS_PORT,
    )
    assert targets == {job: [target] for job, target in expected.items()}


def test_the_worker_serves_metrics_on_the_stacks_port(tmp_path):
    stack = default_stack(tmp_path, worker_metrics_port=18005)
    worker = stack.worker_component()
    assert worker.env["SHIPYARD_WORKER_METRICS_PORT"] == "18005" and worker.port == 18005
    assert worker.health_url == "http://127.0.0.1:18005/metrics"
    # Unless given, a free port: stacks of parallel test sessions must not share one.
    assert default_stack(tmp_path).worker_metrics_port != observability.DEFAULT_WORKER_METRICS_PORT


@needs_promtool
def test_with_prometheus_the_stack_writes_a_valid_configuration_for_its_ports(tmp_path):
    stack = default_stack(tmp_path, worker_metrics_port=free_port(), prometheus_port=free_port())
    component = stack.prometheus_component(scrape_interval="1s")
    assert component is not None and component.name == "prometheus"
    config_file = tmp_path / "prometheus" / "prometheus.yml"
    assert f"--config.file={config_file}" in component.argv
    assert_ok(promtool("check", "config", config_file))
    config = yaml.safe_load(config_file.read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"][0] for job in config["scrape_configs"]}
    assert targets["shipyard-worker"] == f"127.0.0.1:{stack.worker_metrics_port}"
    assert targets["shipyard-serving"] == "127.0.0.1:8003"
    assert targets["prometheus"] == f"127.0.0.1:{stack.prometheus_port}"
    assert config["global"]["scrape_interval"] == "1s"
    assert config["rule_files"] == [str(RULES_FILE)]


def test_no_prometheus_or_grafana_unless_asked_for_and_installed(tmp_path, monkeypatch):
    assert default_stack(tmp_path).prometheus_component() is None
    assert default_stack(tmp_path).grafana_component() is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    stack = default_stack(tmp_path, prometheus_port=free_port(), grafana_port=free_port())
    assert stack.prometheus_component() is None and stack.grafana_component() is None


def test_shipyard_up_asks_for_prometheus_and_grafana_on_their_ports(tmp_path, monkeypatch):
    """``shipyard up --with-grafana``: the worker on its fixed port, Prometheus and Grafana (a stand-in
    ``grafana-server`` on PATH here) on the ports the environment names."""
    from shipyard_cli.main import _stack_for_up

    grafana = tmp_path / "bin" / "grafana-server"
    grafana.parent.mkdir()
    grafana.write_text("#!/bin/sh\nexit 0\n")
    grafana.chmod(0o755)
    prometheus_bin = shutil.which("prometheus") or "/nonexistent/prometheus"
    monkeypatch.setenv("PATH", f"{grafana.parent}:{Path(prometheus_bin).parent}")
    monkeypatch.setenv("SHIPYARD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SHIPYARD_PROMETHEUS_PORT", "19090")
    monkeypatch.setenv("SHIPYARD_GRAFANA_PORT", "13000")
    monkeypatch.delenv("SHIPYARD_WORKER_METRICS_PORT", raising=False)
    stack = _stack_for_up(with_prometheus=True, with_grafana=True)
    assert stack.worker_metrics_port == observability.DEFAULT_WORKER_METRICS_PORT
    if shutil.which("prometheus") is None:
        assert stack.prometheus_port is None and stack.grafana_port is None
        return
    assert (stack.prometheus_port, stack.grafana_port) == (19090, 13000)
    component = stack.grafana_component()
    assert component is not None and component.argv[0] == str(grafana)
    assert component.env["GF_SERVER_HTTP_PORT"] == "13000"
    assert component.env["SHIPYARD_PROMETHEUS_URL"] == "http://127.0.0.1:19090"
    assert component.env["GF_PATHS_PROVISIONING"] == str(observability.GRAFANA_PROVISIONING)
    assert component.health_url == "http://127.0.0.1:13000/api/health"


def test_shipyard_up_goes_on_without_prometheus_when_none_is_installed(tmp_path, monkeypatch):
    from shipyard_cli.main import _stack_for_up

    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setenv("SHIPYARD_STATE_DIR", str(tmp_path / "state"))
    stack = _stack_for_up(with_prometheus=True, with_grafana=True)
    assert stack.prometheus_port is None and stack.grafana_port is None
    assert [c for c in (stack.prometheus_component(), stack.grafana_component()) if c] == []
