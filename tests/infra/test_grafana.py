"""The Grafana dashboards and provisioning, without a Grafana: the committed JSON is what
``infra/grafana/build_dashboards.py`` builds, every panel is well formed and reads the provisioned
data source through the ``datasource`` variable, every query parses (``promtool``), every variable is
used, and the provisioning files point at what exists. ``tests/e2e/test_observability.py`` runs the
queries against a live stack."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from shipyard_cli import observability
from tests.infra.support import (
    DASHBOARDS_DIR,
    GPU_METRICS,
    build_module,
    dashboards,
    fill,
    panel_queries,
    variable_queries,
)

# Grafana unit ids the panels may use.
UNITS = {"reqps", "short", "s", "percentunit", "bytes", "none"}
PANEL_TYPES = {"timeseries", "stat", "state-timeline"}
BOARDS = dashboards()


def test_the_committed_dashboards_are_what_the_builder_builds():
    built = build_module().build()
    assert sorted(built) == sorted(BOARDS) == ["models.json", "serving.json", "training.json"]
    module = build_module()
    for name, board in built.items():
        assert (DASHBOARDS_DIR / name).read_text() == module.render(board), (
            f"{name} differs from what infra/grafana/build_dashboards.py builds: run it"
        )


def test_uids_titles_and_panel_ids_are_unique():
    uids = [board["uid"] for board in BOARDS.values()]
    assert len(set(uids)) == len(uids) and all(uid.startswith("shipyard-") for uid in uids)
    assert len({board["title"] for board in BOARDS.values()}) == len(BOARDS)
    for name, board in BOARDS.items():
        ids = [panel["id"] for panel in board["panels"]]
        assert len(set(ids)) == len(ids), name


def cells(panel: dict[str, Any]) -> set[tuple[int, int]]:
    grid = panel["gridPos"]
    xs = range(grid["x"], grid["x"] + grid["w"])
    return {(x, y) for x in xs for y in range(grid["y"], grid["y"] + grid["h"])}


def test_panels_fit_the_grid_without_overlapping():
    for name, board in BOARDS.items():
        taken: set[tuple[int, int]] = set()
        for panel in board["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, (name, panel["title"])
            assert not taken & cells(panel), (name, panel["title"])
            taken |= cells(panel)


def test_every_panel_reads_the_datasource_variable_has_a_unit_words_and_queries():
    for name, board in BOARDS.items():
        for panel in board["panels"]:
            where = (name, panel["title"])
            assert panel["type"] in PANEL_TYPES, where
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["fieldConfig"]["defaults"]["unit"] in UNITS, where
            assert panel["description"], where
            assert panel["targets"], where
            refs = [target["refId"] for target in panel["targets"]]
            assert len(set(refs)) == len(refs), where
            for target in panel["targets"]:
                assert target["datasource"] == panel["datasource"], where
                assert target["expr"].strip() and target["legendFormat"], where


def variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in board["templating"]["list"]}


def test_the_datasource_variable_defaults_to_the_provisioned_prometheus():
    path = observability.GRAFANA_PROVISIONING / "datasources" / "prometheus.yml"
    provisioned = yaml.safe_load(path.read_text())
    [source] = provisioned["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "${SHIPYARD_PROMETHEUS_URL}"
    for name, board in BOARDS.items():
        variable = variables(board)["datasource"]
        assert variable["type"] == "datasource" and variable["query"] == "prometheus", name
        assert variable["current"]["value"] == source["uid"], name


def test_model_and_version_filter_every_panel_that_has_them():
    """Serving and Models are by model and version: a query that names ``model`` (or ``version``)
    filters it with ``$model`` (``$version``); Training is by queue."""
    expected = {"serving.json": {"model", "version"}, "models.json": {"model", "version"},
                "training.json": {"queue"}}
    for name, board in BOARDS.items():
        defined = set(variables(board)) - {"datasource"}
        assert defined == expected[name], name
        used = set()
        for query in panel_queries({name: board}):
            for label in defined:
                if f"${label}" in query.expr:
                    used.add(label)
                    assert f'{label}=~"${label}"' in query.expr, query
                elif re.search(rf"\b{label}\b", query.expr):
                    pytest.fail(f"{query} names {label} but does not filter it by ${label}")
        assert used == defined, f"{name}: variables no panel uses: {defined - used}"


def test_query_variables_ask_for_label_values_of_known_metrics():
    for name, variable, query in variable_queries(BOARDS):
        match = re.fullmatch(r"label_values\((shipyard_\w+)(\{.*\})?, (\w+)\)", query)
        assert match and match.group(3) == variable, (name, variable, query)


def test_gpu_panels_say_they_need_a_gpu():
    module = build_module()
    gpu_titles = {query.panel for query in panel_queries(BOARDS) if query.gpu}
    assert gpu_titles == {"GPU memory", "GPU utilisation"}
    for board in BOARDS.values():
        for panel in board["panels"]:
            says = panel["description"] == module.GPU_NOTE
            assert says == (panel["title"] in gpu_titles), panel["title"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (apt-get install prometheus)")
def test_every_query_parses(tmp_path):
    """Each panel query, its variables filled in, as a recording rule that ``promtool check rules`` parses."""
    queries = panel_queries(BOARDS)
    rules = [{"record": f"shipyard:panel_query_{i}", "expr": fill(q.expr, {"model": ".*", "version": ".*",
                                                                            "queue": ".*"})}
             for i, q in enumerate(queries)]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    argv = ["promtool", "check", "rules", str(path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(queries)} rules found" in done.stdout
    assert GPU_METRICS in "".join(q.expr for q in queries)


def test_provisioning_points_at_the_dashboards_folder():
    env = observability.grafana_env(state_dir=observability.ROOT / ".shipyard", port=3000,
                                    prometheus_url="http://127.0.0.1:9090")
    provisioning = observability.GRAFANA_PROVISIONING
    assert env["GF_PATHS_PROVISIONING"] == str(provisioning)
    providers = yaml.safe_load((provisioning / "dashboards" / "shipyard.yml").read_text())["providers"]
    [provider] = providers
    assert provider["type"] == "file" and provider["options"]["path"] == "${SHIPYARD_GRAFANA_DASHBOARDS}"
    folder = env["SHIPYARD_GRAFANA_DASHBOARDS"]
    assert sorted(p.name for p in DASHBOARDS_DIR.glob("*.json")) == sorted(BOARDS)
    assert folder == str(DASHBOARDS_DIR) and DASHBOARDS_DIR.is_dir()
    assert env["SHIPYARD_PROMETHEUS_URL"] == "http://127.0.0.1:9090"
    assert {p.name for p in provisioning.iterdir()} == {"datasources", "dashboards"}
