"""``shipyard up`` mends a stack, ``shipyard restart`` restarts one component, and the supervisor starts
again what dies: on real processes (sleepers standing in for the components, so that it takes seconds).

``tests/reliability/test_stack_supervision.py`` plays the same on the trainer service and a worker.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shipyard_cli.main import app as cli
from shipyard_cli.processes import Component, ProcessRecord, StackError
from shipyard_cli.stack import SUPERVISOR, Stack
from shipyard_common.settings import PlatformSettings
from tests.support import free_port, test_platform, wait_for

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]


class Sleepers(Stack):
    """A stack of two sleepers, ``a`` and ``b``; the supervisor looks every 0.2 s, with backoffs of at
    most 2 s."""

    def __init__(self, platform: PlatformSettings) -> None:
        super().__init__(platform, extra_env={"SHIPYARD_SUPERVISOR_INTERVAL_S": "0.2",
                                              "SHIPYARD_SUPERVISOR_MAX_BACKOFF_S": "2"})

    def components(self) -> list[Component]:
        return [Component("a", SLEEP), Component("b", SLEEP)]


@pytest.fixture
def sleepers(tmp_path: Path) -> Iterator[Sleepers]:
    stack = Sleepers(test_platform(tmp_path / "state"))
    try:
        yield stack
    finally:
        stack.down(timeout=5)


def pids(stack: Stack) -> dict[str, int]:
    return {record.name: record.pid for record in stack.records()}


def kill(record: ProcessRecord | None) -> None:
    assert record is not None
    os.killpg(record.pid, signal.SIGKILL)
    wait_for(lambda: not record.alive(), timeout=5, what=f"{record.name} to die")


def test_up_starts_what_is_down_and_leaves_what_runs(sleepers: Sleepers):
    first = sleepers.up()
    assert [r.name for r in first] == ["a", "b"]
    before = pids(sleepers)
    kill(sleepers.record("b"))

    running: list[str] = []
    again = sleepers.up(on_running=lambda r: running.append(r.name))
    assert [r.name for r in again] == ["b"] and running == ["a"]
    after = pids(sleepers)
    assert after["a"] == before["a"] and after["b"] != before["b"]
    b = sleepers.record("b")
    assert b is not None and b.alive() and b.restarts == 1
    assert b.last_exit == "killed by SIGKILL; started again by up"
    assert sleepers.up() == []  # all run: nothing to do


def test_restart_starts_one_component_again_and_leaves_the_others(sleepers: Sleepers):
    sleepers.up()
    before = pids(sleepers)
    record = sleepers.restart("a")
    assert record.pid != before["a"] and record.alive() and record.restarts == 1
    assert record.last_exit == "stopped by shipyard restart"
    assert pids(sleepers)["b"] == before["b"]
    with pytest.raises(Exception, match=r"no component 'c'.*it has: a, b"):
        sleepers.restart("c")


def test_the_supervisor_starts_a_killed_component_again_with_a_backoff(sleepers: Sleepers):
    sleepers.up(supervise=True)
    assert set(pids(sleepers)) == {"a", "b", SUPERVISOR}
    for restart in (1, 2):
        before = sleepers.record("a")
        assert before is not None
        died = time.monotonic()
        kill(before)
        def replaced(old: int = before.pid) -> ProcessRecord | None:
            record = sleepers.record("a")
            return record if record is not None and record.pid != old and record.alive() else None

        now = wait_for(replaced, timeout=10, interval=0.05, what="the supervisor to start a again")
        waited = time.monotonic() - died
        assert now.restarts == restart
        # The first restart follows its death by a second, the next in a row by two.
        assert restart - 0.5 <= waited <= restart + 3, waited
    # Its second process was the supervisor's own child: it knows how that one ended.
    assert now.last_exit == "killed by SIGKILL"
    supervisor_log = Path(sleepers.record(SUPERVISOR).log).read_text()  # type: ignore[union-attr]
    assert "a (pid" in supervisor_log and "starting it again in 2 s (restart 2)" in supervisor_log

    env = {**sleepers.platform.as_env(), "COLUMNS": "250"}
    shown = CliRunner().invoke(cli, ["status"], env=env, catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in shown.output.splitlines()]
    row = next(row for row in cells if row and row[0] == "a")
    assert row[2:6] == ["yes", "-", "2", "killed by SIGKILL"], shown.output

    stopped = sleepers.down(timeout=5)
    assert stopped[0] == SUPERVISOR and set(stopped) == {SUPERVISOR, "a", "b"}
    time.sleep(1.5)  # nothing comes back: the supervisor went first
    assert sleepers.records() == []


def test_the_supervisor_leaves_a_component_that_restart_is_starting(sleepers: Sleepers):
    """``shipyard restart`` holds the component's lock: the supervisor does not start it a second time."""
    sleepers.up(supervise=True)
    for _ in range(3):
        sleepers.restart("b")
    time.sleep(1.5)
    b = sleepers.record("b")
    assert b is not None and b.alive() and b.restarts == 3 and b.last_exit == "stopped by shipyard restart"


@pytest.mark.parametrize(("env", "says"), [
    ({"SHIPYARD_ENV": "prod"}, "the built-in development token is only allowed with SHIPYARD_ENV=dev"),
    ({"SHIPYARD_ENV": "production"}, "SHIPYARD_ENV: Input should be 'dev', 'test' or 'prod'"),
    ({"SHIPYARD_TOKENS": "abc"}, "SHIPYARD_TOKENS cannot be read (it must be JSON)"),
])
@pytest.mark.parametrize("command", [["up"], ["status"], ["restart", "trainer"], ["down"]])
def test_a_bad_configuration_is_a_sentence_not_a_traceback(
    tmp_path: Path, command: list[str], env: dict[str, str], says: str
):
    base = {"SHIPYARD_STATE_DIR": str(tmp_path), "SHIPYARD_ENV": "dev", "COLUMNS": "300"}
    result = CliRunner().invoke(cli, command, env={**base, **env}, catch_exceptions=False)
    assert result.exit_code == 1
    assert result.output.startswith("error: bad configuration in the environment") and says in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_a_service_that_refuses_its_configuration_says_which_setting_not_a_traceback(tmp_path: Path):
    """``shipyard up`` reports a service's bad setting (here ``SHIPYARD_TRAINER_PORT=abc``) as the
    setting and what is wrong with it, without the traceback or the value (it might be a token)."""
    stack = Stack(test_platform(tmp_path / "state"))
    component = Component("trainer", [sys.executable, "-m", "services.trainer"],
                          env={"SHIPYARD_TRAINER_PORT": "abc"}, health_url=f"http://127.0.0.1:{free_port()}/")
    record = stack.start_component(component)
    try:
        with pytest.raises(StackError) as refused:
            stack.wait_ready(record, timeout=60)
    finally:
        stack.down(timeout=5)
    message = str(refused.value)
    assert message.startswith("trainer refused its configuration (see ")
    assert message.endswith("ValidationError: 1 validation error for TrainerSettings\n  port\n  Input "
                            "should be a valid integer, unable to parse string as an integer"), message
    assert "Traceback" not in message and "abc" not in message
