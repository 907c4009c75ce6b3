"""``shipyard models …`` against a real registry API on a real MLflow server.

Four people hold named tokens (the ``{"role", "name"}`` form of ``SHIPYARD_TOKENS``): alice
trains, bob and carol approve, root administers. Every command runs through typer's CliRunner
as a user types it, with the token in ``SHIPYARD_API_TOKEN`` or ``--token``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from services.registry.app import create_app
from services.registry.settings import RegistrySettings
from shipyard_cli.main import app as cli
from shipyard_common.auth import Grant, Role
from shipyard_common.lineage import METRIC_TAG_PREFIX, TAG_DATASET, TAG_DATASET_REV
from shipyard_common.settings import PlatformSettings
from tests.services.registry.model_factory import ModelFactory, tiny_classifier, unique_name
from tests.support import running_app

# Tokens that share no run of four characters with their holders' names (the settings refuse those).
ALICE, BOB, CAROL, ROOT, VIEWER = "s3cr3t-1", "s3cr3t-2", "s3cr3t-3", "s3cr3t-4", "s3cr3t-5"
NAMED_TOKENS: dict[str, Role | Grant] = {
    ALICE: Grant(role=Role.TRAINER, name="alice"),
    BOB: Grant(role=Role.APPROVER, name="bob"),
    CAROL: Grant(role=Role.APPROVER, name="carol"),
    ROOT: Grant(role=Role.ADMIN, name="root"),
    VIEWER: Role.VIEWER,
}
REV = "0123456789abcdef0123456789abcdef01234567"


def flat(text: str) -> str:
    """The output with rich's line wrapping, table borders and padding undone: cells one space apart."""
    return " ".join(re.sub("[\u2500-\u257f]", " ", text).split())


class Cli:
    """Runs ``shipyard`` at one registry, as whoever holds ``token``."""

    def __init__(self, base: str, state_dir: Path) -> None:
        self.base = base
        self.env = {"SHIPYARD_REGISTRY_URL": base, "SHIPYARD_STATE_DIR": str(state_dir), "COLUMNS": "250"}

    def __call__(self, *args: str, token: str) -> Result:
        env = {**self.env, "SHIPYARD_API_TOKEN": token}
        return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)

    def ok(self, *args: str, token: str) -> str:
        result = self(*args, token=token)
        assert result.exit_code == 0, result.output
        return flat(result.output)

    def refused(self, *args: str, token: str) -> str:
        result = self(*args, token=token)
        assert result.exit_code == 1, result.output
        out = flat(result.output)
        assert "error:" in out, out
        return out

    def ask(self, name: str, version: str, reason: str, *options: str, token: str) -> tuple[str, str]:
        """``shipyard models request``: (the request's id, the output)."""
        out = self.ok("models", "request", name, version, "--reason", reason, *options, token=token)
        return out.split("request #", 1)[1].split(":", 1)[0], out

    def get(self, path: str, **params: Any) -> Any:
        headers = {"Authorization": f"Bearer {VIEWER}"}
        response = httpx.get(f"{self.base}{path}", params=params, headers=headers)
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="module")
def factory(mlflow_server: str) -> ModelFactory:
    return ModelFactory(mlflow_server)


@pytest.fixture
def shipyard(platform: PlatformSettings, tmp_path: Path) -> Iterator[Cli]:
    named = platform.model_copy(update={"tokens": dict(NAMED_TOKENS),
                                        "events_channel": f"test-events-{uuid.uuid4().hex[:10]}"})
    with running_app(create_app(RegistrySettings(platform=named))) as base:
        yield Cli(base, tmp_path / "cli-state")


@pytest.fixture
def model(factory: ModelFactory) -> Callable[..., str]:
    """Register versions of one new model: ``add(val_accuracy, lr=…)`` returns the version."""
    name = unique_name("cli")

    def add(val_accuracy: float, *, lr: str = "0.001", seed: int = 1) -> str:
        tags = {TAG_DATASET: "breast_cancer", TAG_DATASET_REV: REV,
                f"{METRIC_TAG_PREFIX}val_accuracy": repr(val_accuracy)}
        registered = factory.register(name, tiny_classifier(seed), tags=tags)
        factory.client.log_param(registered.run_id, "learning_rate", lr)
        return registered.version

    add.name = name  # type: ignore[attr-defined]
    return add


def _production(cli: Cli, name: str) -> str | None:
    aliases: dict[str, str] = cli.get(f"/models/{name}")["aliases"]
    return aliases.get("production")


def test_a_trainer_requests_and_another_person_approves(shipyard: Cli, model: Any) -> None:
    name = model.name
    model(0.91)
    model(0.95, seed=2)

    request_id, asked = shipyard.ask(name, "1", "first release", token=ALICE)
    assert f"{name} production → v1, pending (asked by alice)" in asked
    assert "gate: none covers production" in asked
    assert _production(shipyard, name) is None  # asking moves nothing

    listed = shipyard.ok("models", "requests", "--model", name, "--state", "pending", token=VIEWER)
    assert f"{request_id} {name} v1 production - pending alice" in listed and "first release" in listed

    # A trainer may ask but not decide; nobody decides their own request.
    mine = shipyard.refused("models", "approve", request_id, "--reason", "mine", token=ALICE)
    assert "needs the 'approver' role" in mine
    approved = shipyard.ok("models", "approve", request_id, "--reason", "metrics checked", token=BOB)
    assert f"request #{request_id} approved: {name}: production → v1 (was none)" in approved
    assert _production(shipyard, name) == "1"

    own_id, _ = shipyard.ask(name, "2", "better recall", token=BOB)
    refused = shipyard.refused("models", "approve", own_id, "--reason", "trust me", token=BOB)
    assert f"request #{own_id} is your own: another approver must decide it" in refused
    assert _production(shipyard, name) == "1"
    approved = shipyard.ok("models", "approve", own_id, "--reason", "checked", token=CAROL)
    assert "production → v2 (was v1)" in approved
    again = shipyard.refused("models", "approve", own_id, "--reason", "twice", token=BOB)
    assert f"request #{own_id} is no longer pending: it was approved by carol" in again

    staging_id, _ = shipyard.ask(name, "1", "soak", "--alias", "staging", token=ALICE)
    assert "only alice, who made request" in shipyard.refused("models", "withdraw", staging_id, token=BOB)
    assert f"request #{staging_id} cancelled" in shipyard.ok("models", "withdraw", staging_id, token=ALICE)
    staging_id, _ = shipyard.ask(name, "1", "soak", "--alias", "staging", token=ALICE)
    rejected = shipyard.ok("models", "reject", staging_id, "--reason", "no staging this week", token=CAROL)
    assert f"request #{staging_id} rejected by carol" in rejected

    everything = shipyard.ok("models", "requests", "--model", name, token=VIEWER)
    for state in ("approved", "cancelled", "rejected"):
        assert state in everything
    assert "pending" not in everything
    missing = shipyard.refused("models", "approve", "99999", "--reason", "x", token=BOB)
    assert "there is no promotion request #99999" in missing


def test_a_gate_blocks_an_approval_and_the_failing_rule_is_printed(shipyard: Cli, model: Any) -> None:
    name = model.name
    model(0.95)
    model(0.80, seed=2)
    model(0.945, seed=3)
    shipyard.ok("models", "promote", name, "1", "--reason", "bootstrap", token=ROOT)

    assert "needs the 'admin' role" in shipyard.refused(
        "models", "gate", name, "--set", "val_accuracy >= 0.9", token=BOB
    )
    set_out = shipyard.ok("models", "gate", name, "--set", "val_accuracy >= 0.9",
                          "--set", "val_accuracy >= production - 0.01", token=ROOT)
    assert f"{name}'s gate on production: val_accuracy >= 0.9 val_accuracy >= production - 0.01" in set_out
    shown = shipyard.ok("models", "gate", name, token=VIEWER)
    assert "val_accuracy >= production - 0.01" in shown and "set by root" in shown
    bad_rule = shipyard.refused("models", "gate", name, "--set", "accuracy is good", token=ROOT)
    assert "gate rule 'accuracy is good' is not understood" in bad_rule

    request_id, asked = shipyard.ask(name, "2", "smaller model", token=ALICE)
    assert "val_accuracy >= 0.9 fail val_accuracy 0.8 (v2) vs 0.9" in asked
    assert "gate: blocks: an approval would be refused (2 of 2 rules fail)" in asked

    blocked = shipyard.refused("models", "approve", request_id, "--reason", "ship it", token=BOB)
    failing = "val_accuracy >= 0.9 fails: val_accuracy 0.8 (v2) vs 0.9"
    assert f"{name}'s gate blocks request #{request_id}: {failing}" in blocked
    assert "val_accuracy >= production - 0.01 fail" in blocked  # the verdict's table, rule by rule
    assert _production(shipyard, name) == "1"
    listed = shipyard.ok("models", "requests", "--model", name, token=VIEWER)
    assert "pending" in listed and "blocks" in listed

    # v3 is within a point of production on the same data: the gate lets it through.
    passing_id, asked = shipyard.ask(name, "3", "retrained", token=ALICE)
    assert "gate: passes 2 of 2 rules" in asked
    approved = shipyard.ok("models", "approve", passing_id, "--reason", "ok", token=BOB)
    assert "production → v3 (was v1)" in approved

    assert "no gate rules" in shipyard.ok("models", "gate", name, "--clear", token=ROOT)
    approved = shipyard.ok("models", "approve", request_id, "--reason", "gate lifted", token=BOB)
    assert "production → v2 (was v3)" in approved


def test_rollback_and_history_with_at(shipyard: Cli, model: Any) -> None:
    name = model.name
    for accuracy in (0.90, 0.92, 0.93):
        model(accuracy)
    nothing = shipyard.refused("models", "rollback", name, "--reason", "x", token=BOB)
    assert f"{name}'s production alias (none)" in nothing
    shipyard.ok("models", "promote", name, "1", "--reason", "first", token=ROOT)
    for version in ("2", "3"):
        request_id, _ = shipyard.ask(name, version, f"v{version} is better", token=ALICE)
        shipyard.ok("models", "approve", request_id, "--reason", "ok", token=BOB)
    assert _production(shipyard, name) == "3"

    assert "needs the 'approver' role" in shipyard.refused("models", "rollback", name, "--reason", "x",
                                                           token=ALICE)
    back = shipyard.ok("models", "rollback", name, "--reason", "v3 regressed on recall", token=CAROL)
    assert f"rolled back {name}: production → v2 (was v3)" in back
    back = shipyard.ok("models", "rollback", name, "--reason", "v2 too", token=CAROL)
    assert f"rolled back {name}: production → v1 (was v2)" in back
    assert _production(shipyard, name) == "1"
    assert "no earlier production version" in shipyard.refused("models", "rollback", name, "--reason", "x",
                                                               token=CAROL)

    history = shipyard.ok("models", "history", name, token=VIEWER)
    newest_first = [history.index(text) for text in ("v2 too", "v3 regressed on recall", "(direct) - first")]
    assert newest_first == sorted(newest_first)
    assert "rollback production v2 v3 carol" in history
    assert "promote production v3 v2 bob #" in history
    assert "promote production v1 - root (direct) - first" in history

    moves = shipyard.get(f"/models/{name}/history")["moves"]
    second = next(m for m in moves if m["version"] == "2" and m["action"] == "promote")
    at_second = datetime.fromisoformat(second["at"])
    # The moment v2 became production, written in another time zone: production then was v2.
    elsewhere = at_second.astimezone(timezone(timedelta(hours=2))).isoformat()
    assert ": v2" in shipyard.ok("models", "history", name, "--at", elsewhere, token=VIEWER).split(
        "production at", 1)[1]
    before = (datetime.fromisoformat(moves[-1]["at"]) - timedelta(seconds=1)).isoformat()
    assert shipyard.ok("models", "history", name, "--at", before, token=VIEWER).endswith(": none")
    now = shipyard.ok("models", "history", name, "--at", datetime.now(UTC).isoformat(), token=VIEWER)
    assert now.endswith(": v1")
    assert "error:" in shipyard.refused("models", "history", name, "--at", "yesterday", token=VIEWER)


def test_compare_show_list_and_archive(shipyard: Cli, model: Any) -> None:
    name = model.name
    model(0.91, lr="0.001")
    model(0.95, lr="0.003", seed=2)
    shipyard.ok("models", "promote", name, "2", "--reason", "best", token=ROOT)

    compared = shipyard.ok("models", "compare", name, "1", "2", token=VIEWER)
    assert f"{name}: v2 against v1" in compared
    assert "val_accuracy 0.91 0.95 +0.04" in compared
    assert "learning_rate 0.001 0.003" in compared
    assert "same dataset revision: yes" in compared
    assert "no version 7" in shipyard.refused("models", "compare", name, "1", "7", token=VIEWER)

    listed = shipyard.ok("models", "list", token=VIEWER)
    assert f"{name} production→v2 v2" in listed

    shown = shipyard.ok("models", "show", name, token=VIEWER)
    assert f"{name} aliases: production→v2" in shown
    assert shown.index("v2 production 0.95") < shown.index("v1 0.91")
    detail = shipyard.ok("models", "show", name, "1", token=VIEWER)
    assert "version v1" in detail and f"dataset breast_cancer @ {REV}" in detail
    assert "metrics from the registered model (its tags)" in detail and "val_accuracy 0.91" in detail
    assert "learning_rate 0.001" in detail
    assert "is not in the registry" in shipyard.refused("models", "show", f"x{name}", token=VIEWER)

    # The production version cannot be archived; an archived one cannot be asked for.
    assert "is production" in shipyard.refused("models", "archive", name, "2", token=BOB)
    assert f"{name} v1 archived" in shipyard.ok("models", "archive", name, "1", "--reason", "old", token=BOB)
    assert "(archived)" in shipyard.ok("models", "show", name, token=VIEWER)
    assert "is archived and can no longer be given an alias" in shipyard.refused(
        "models", "request", name, "1", "--reason", "again", token=ALICE)
    assert f"{name} v1 restored" in shipyard.ok("models", "restore", name, "1", token=BOB)
    assert "is not archived" in shipyard.refused("models", "restore", name, "1", token=BOB)
    assert "pending" in shipyard.ok("models", "request", name, "1", "--reason", "again", token=ALICE)


def test_direct_promotion_is_the_admins_and_is_marked(shipyard: Cli, model: Any) -> None:
    name = model.name
    model(0.9)
    refused = shipyard.refused("models", "promote", name, "1", token=BOB)
    assert "needs the 'admin' role" in refused
    # --token wins over SHIPYARD_API_TOKEN.
    result = shipyard("models", "promote", name, "1", "--reason", "hotfix", "--token", ROOT, token=BOB)
    assert result.exit_code == 0 and f"{name}: production → v1 (was none)" in flat(result.output)
    [move] = shipyard.get(f"/models/{name}/history")["moves"]
    assert move["direct"] is True and move["actor"] == "root" and move["reason"] == "hotfix"
