"""The GPU scaler's decision (plain numbers in, replicas and a reason out) and its settings."""

from __future__ import annotations

import itertools
import math

import pytest
from pydantic import ValidationError

from services.trainer.scaler.decision import Action, decide
from services.trainer.scaler.settings import ScalerSettings, pod_namespace

# queued, running, current, minimum, maximum, seconds since needed, cooldown -> replicas, action, reason has
TABLE = [
    pytest.param(0, 0, 0, 0, 4, 0, 60, 0, Action.HOLD, "hold at 0", id="idle at zero stays at zero"),
    pytest.param(3, 0, 0, 0, 4, 0, 60, 3, Action.UP, "scale up from 0 to 3: 3 queued", id="jobs queue: up"),
    pytest.param(10, 0, 1, 0, 4, 0, 60, 4, Action.UP, "capped at the maximum 4", id="up capped at max"),
    pytest.param(2, 1, 1, 0, 4, 0, 60, 3, Action.UP, "2 queued + 1 running", id="up ignores the cooldown"),
    pytest.param(0, 2, 2, 0, 4, 500, 60, 2, Action.HOLD, "hold at 2: 0 queued + 2", id="all busy: hold"),
    pytest.param(1, 1, 3, 0, 4, 10, 60, 3, Action.HOLD, "cooldown 50 s left", id="surplus in cooldown: hold"),
    pytest.param(0, 1, 3, 0, 4, 60, 60, 1, Action.DOWN, "scale down from 3 to 1", id="down after cooldown"),
    pytest.param(0, 0, 2, 0, 4, 60, 60, 0, Action.DOWN, "scale to zero from 2", id="idle: to zero"),
    pytest.param(0, 0, 2, 0, 4, 59.9, 60, 2, Action.HOLD, "cooldown 0 s left", id="not before cooldown"),
    pytest.param(0, 0, 3, 1, 4, 60, 60, 1, Action.DOWN, "scale down from 3 to 1", id="idle: down to min"),
    pytest.param(0, 0, 0, 2, 4, 0, 60, 2, Action.UP, "scale up from 0 to 2", id="min brought up at once"),
    pytest.param(0, 3, 3, 0, 2, 900, 60, 3, Action.HOLD, "hold at 3: 0 queued + 3", id="running > max: kept"),
    pytest.param(0, 3, 5, 0, 2, 900, 60, 3, Action.DOWN, "from 5 to 3", id="down, not below running"),
    pytest.param(0, 1, 4, 0, 2, 900, 60, 1, Action.DOWN, "from 4 to 1", id="above max and idle: down"),
    pytest.param(0, 0, 1, 0, 4, 0, 0, 0, Action.DOWN, "scale to zero", id="no cooldown: down at once"),
    pytest.param(5, 0, 0, 0, 0, 0, 60, 0, Action.HOLD, "the maximum is 0", id="max 0: scaler switched off"),
]


@pytest.mark.parametrize(("queued", "running", "current", "minimum", "maximum", "since", "cooldown",
                          "replicas", "action", "reason"), TABLE)
def test_decision_table(queued, running, current, minimum, maximum, since, cooldown, replicas, action,
                        reason):
    decision = decide(queued=queued, running=running, current=current, minimum=minimum, maximum=maximum,
                      seconds_since_needed=since, cooldown_s=cooldown)
    assert (decision.replicas, decision.action) == (replicas, action), decision.reason
    assert reason in decision.reason


def test_jobs_per_replica_counts_workers_not_jobs():
    up = decide(queued=3, running=2, current=0, minimum=0, maximum=8, seconds_since_needed=0, cooldown_s=60,
                jobs_per_replica=2)
    assert (up.replicas, up.action) == (3, Action.UP)  # 5 jobs, 2 a worker: 3 workers
    down = decide(queued=0, running=3, current=4, minimum=0, maximum=8, seconds_since_needed=60,
                  cooldown_s=60, jobs_per_replica=2)
    assert (down.replicas, down.action) == (2, Action.DOWN)  # 3 running jobs still need 2 workers


def test_invariants_over_every_small_case():
    """Over every small input: never below the running jobs, never above max unless they need it, up at
    once to cover waiting jobs, no scale down inside the cooldown, zero only with nothing to do (or max 0)."""
    for queued, running, current, minimum, maximum, since in itertools.product(
        range(4), range(4), range(5), range(3), range(4), (0.0, 30.0, 60.0)
    ):
        if minimum > maximum:
            continue
        decision = decide(queued=queued, running=running, current=current, minimum=minimum, maximum=maximum,
                          seconds_since_needed=since, cooldown_s=60)
        case = (queued, running, current, minimum, maximum, since, decision)
        assert decision.replicas >= min(running, current), case
        assert decision.replicas <= max(maximum, running, current), case
        assert decision.replicas >= min(max(queued + running, minimum), maximum), case
        if since < 60:
            assert decision.replicas >= current or decision.action == Action.UP, case
        if decision.replicas == 0 and current > 0:
            assert running == 0 and (queued == minimum == 0 or maximum == 0), case
        assert (decision.action == Action.HOLD) == (decision.replicas == current), case


@pytest.mark.parametrize("numbers", [
    {"queued": -1}, {"running": -2}, {"current": -1}, {"minimum": -1}, {"cooldown_s": -5},
    {"minimum": 3, "maximum": 2}, {"jobs_per_replica": 0},
])
def test_impossible_numbers_are_refused(numbers):
    values = {"queued": 0, "running": 0, "current": 0, "minimum": 0, "maximum": 2, "seconds_since_needed": 0,
              "cooldown_s": 60, **numbers}
    with pytest.raises(ValueError, match=r"decide\(\) takes no negative|minimum <= maximum"):
        decide(**values)


def test_settings_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SHIPYARD_SCALER_DEPLOYMENT", "trainer-worker-gpu")
    monkeypatch.setenv("SHIPYARD_SCALER_NAMESPACE", "ml")
    monkeypatch.setenv("SHIPYARD_SCALER_MAX_REPLICAS", "4")
    monkeypatch.setenv("SHIPYARD_SCALER_COOLDOWN_S", "120")
    monkeypatch.setenv("SHIPYARD_DB_URL", f"sqlite:///{tmp_path}/x.db")
    settings = ScalerSettings()
    assert (settings.deployment, settings.namespace, settings.queue) == ("trainer-worker-gpu", "ml", "gpu")
    assert (settings.min_replicas, settings.max_replicas, settings.cooldown_s) == (0, 4, 120)
    assert math.isclose(settings.interval_s, 15) and settings.metrics_port == 8006
    assert settings.platform.database_url == f"sqlite:///{tmp_path}/x.db"


def test_settings_refuse_a_minimum_above_the_maximum_and_a_missing_deployment(monkeypatch):
    monkeypatch.delenv("SHIPYARD_SCALER_DEPLOYMENT", raising=False)
    above = r"SHIPYARD_SCALER_MIN_REPLICAS \(3\) is above SHIPYARD_SCALER_MAX_REPLICAS \(2\)"
    with pytest.raises(ValidationError, match=above):
        ScalerSettings(deployment="w", min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError, match="deployment"):
        ScalerSettings()


def test_namespace_is_the_pods_own_else_default(tmp_path):
    path = tmp_path / "namespace"
    assert pod_namespace(path) == "default"
    path.write_text("ml-team\n")
    assert pod_namespace(path) == "ml-team"
    path.write_text("")
    assert pod_namespace(path) == "default"
