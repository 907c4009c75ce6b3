"""The local stack mends itself: a crashed service is started again by the supervisor, ``shipyard up``
starts what is down and leaves what runs, ``shipyard restart`` restarts one component.

Real parts, started the way ``shipyard up`` starts them (``shipyard_cli.stack``), but only those these
tests need: a Redis server, a Celery worker and the trainer service, on free ports, shared by the
module (a stack takes seconds to start), and the supervisor.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from shipyard_cli.main import app as cli
from shipyard_cli.processes import Component, ProcessRecord
from shipyard_cli.stack import SUPERVISOR, Stack
from shipyard_common.settings import PlatformSettings
from tests.support import free_port, test_platform, wait_for

pytestmark = pytest.mark.reliability

# A killed component answers again within this: the supervisor's first wait (1 s) and its start.
BACK_WITHIN_S = 60


class SmallStack(Stack):
    """Redis (a server of its own, once it answers no more a component to start), a worker and the
    trainer."""

    def components(self) -> list[Component]:
        redis_part = self.redis_component()
        parts = [redis_part] if redis_part else []
        return [*parts, self.worker_component(), self.service_component("trainer")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmallStack]:
    platform = test_platform(
        tmp_path_factory.mktemp("supervised"), redis_url=f"redis://127.0.0.1:{free_port()}/0",
        trainer_url=f"http://127.0.0.1:{free_port()}", mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}",
    )
    small = SmallStack(platform, extra_env={"SHIPYARD_SUPERVISOR_INTERVAL_S": "0.5"})
    try:
        assert [r.name for r in small.up(supervise=True)] == ["redis", "worker", "trainer", SUPERVISOR]
        yield small
    finally:
        small.down()


def cli_env(platform: PlatformSettings) -> dict[str, str]:
    return {**platform.as_env(), "COLUMNS": "250"}


def record(stack: Stack, name: str) -> ProcessRecord:
    found = stack.record(name)
    assert found is not None, name
    return found


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def kill(found: ProcessRecord) -> None:
    os.killpg(found.pid, signal.SIGKILL)
    wait_for(lambda: not found.alive(), timeout=10, what=f"{found.name} to die")


def test_a_killed_service_is_started_again_by_the_supervisor(stack: SmallStack):
    trainer = record(stack, "trainer")
    others = {r.name: r.pid for r in stack.records() if r.name != "trainer"}
    health = f"{stack.platform.trainer_url}/healthz"
    assert answers(health)
    kill(trainer)
    died = time.monotonic()
    wait_for(lambda: answers(health), timeout=BACK_WITHIN_S, interval=0.2,
             what="the trainer to answer again")
    back = record(stack, "trainer")
    assert back.pid != trainer.pid and back.restarts == trainer.restarts + 1, back
    assert {r.name: r.pid for r in stack.records() if r.name != "trainer"} == others
    print(f"trainer answered again {time.monotonic() - died:.1f} s after its kill -9")

    log = Path(record(stack, SUPERVISOR).log).read_text()
    assert f"trainer (pid {trainer.pid}) died" in log and f"started trainer again as pid {back.pid}" in log
    shown = CliRunner().invoke(cli, ["status"], env=cli_env(stack.platform), catch_exceptions=False)
    assert shown.exit_code == 0, shown.output  # every component alive again
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in shown.output.splitlines()]
    row = next(row for row in rows if row and row[0] == "trainer")
    assert row[1] == str(back.pid) and row[2:4] == ["yes", "yes"] and row[4] == str(back.restarts), row


def test_up_starts_what_is_down_and_leaves_what_runs(stack: SmallStack):
    """With the supervisor gone too (say, the machine's OOM killer took both), ``up`` mends the stack."""
    kill(record(stack, SUPERVISOR))
    worker = record(stack, "worker")
    kill(worker)
    running = {name: record(stack, name).pid for name in ("redis", "trainer")}
    seen: list[str] = []
    started = stack.up(supervise=True, on_running=lambda r: seen.append(r.name))
    assert [r.name for r in started] == ["worker", SUPERVISOR] and seen == ["trainer"]
    assert {name: record(stack, name).pid for name in running} == running
    assert record(stack, "worker").restarts == worker.restarts + 1
    assert answers(f"http://127.0.0.1:{stack.worker_metrics_port}/metrics")


def test_restart_restarts_one_component_and_the_supervisor_leaves_it_alone(stack: SmallStack):
    before = {r.name: r for r in stack.records()}
    env = cli_env(stack.platform)
    shown = CliRunner().invoke(cli, ["restart", "trainer"], env=env, catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    trainer = record(stack, "trainer")
    assert f"trainer restarted: pid {trainer.pid}" in shown.output
    assert trainer.pid != before["trainer"].pid and trainer.last_exit == "stopped by shipyard restart"
    assert answers(f"{stack.platform.trainer_url}/healthz")
    time.sleep(2)  # the supervisor saw the old process go, and starts nothing more
    assert record(stack, "trainer").pid == trainer.pid
    assert {r.name: r.pid for r in stack.records() if r.name != "trainer"} == {
        name: r.pid for name, r in before.items() if name != "trainer"}
    missing = CliRunner().invoke(cli, ["restart", "nope"], env=env, catch_exceptions=False)
    assert missing.exit_code == 1 and "no component 'nope'" in missing.output
