"""The Helm chart ``infra/helm/shipyard``, checked offline: ``helm lint`` and ``helm template`` with the
default values, a GPU values file and a production-shaped one (existing Secret, external databases);
every rendered manifest validated by ``kubernetes-validate --strict``, the Prometheus Operator's
resources (no schema there) structurally here; ``checkov`` with no failed check beyond its config's
skip list; and what the issue asks of the chart, read from the rendered manifests.

The tools come from ``make infra-tools`` (``.tools/infra/``): without them these tests skip, except
under ``CI=true``, where they fail.
"""

from __future__ import annotations

import configparser
import hashlib
import importlib.util
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra.support import DASHBOARDS_DIR, ROOT, RULES_FILE, alert_rules, settings_env_names
from tests.support import missing_tool

TOOLS = ROOT / ".tools" / "infra"
HELM = TOOLS / "helm"
VENV_BIN = TOOLS / "venv" / "bin"
CHECKOV = VENV_BIN / "checkov"
KUBERNETES_VALIDATE = VENV_BIN / "kubernetes-validate"
CHART = ROOT / "infra" / "helm" / "shipyard"
CHECKOV_CONFIG = ROOT / "infra" / "helm" / "checkov.yaml"
NAMESPACE = "shipyard"
RELEASE = "sy"
FULLNAME = "sy-shipyard"
# The oldest release the chart supports (Chart.yaml's kubeVersion allows 1.29+) that is still maintained,
# and the newest the installed kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.34.0", "newest")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
SERVICES = ("trainer", "registry", "serving", "monitor")
VALUES = {
    "default": [],
    "gpu": ["-f", str(CHART / "ci" / "gpu-values.yaml")],
    "external": ["-f", str(CHART / "ci" / "external-values.yaml")],
}

Manifest = dict[str, Any]


def _tools_or_skip() -> None:
    missing = [str(p.relative_to(ROOT)) for p in (HELM, CHECKOV, KUBERNETES_VALIDATE) if not p.is_file()]
    if not missing:
        return
    missing_tool(f"{', '.join(missing)} missing: run `make infra-tools`")


def run(*argv: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv_text = [str(a) for a in argv]
    return subprocess.run(argv_text, capture_output=True, text=True, timeout=timeout, check=False)


def helm_template(*args: str) -> subprocess.CompletedProcess[str]:
    return run(HELM, "template", RELEASE, CHART, "--namespace", NAMESPACE, *args)


def render(*args: str) -> list[Manifest]:
    done = helm_template(*args)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Manifest]]]:
    """Each values set rendered once: the YAML file (for the validators) and its documents."""
    _tools_or_skip()
    folder = tmp_path_factory.mktemp("rendered")
    out = {}
    for name, args in VALUES.items():
        done = helm_template(*args)
        assert done.returncode == 0, f"helm template with {name} values: {done.stderr}"
        path = folder / f"{name}.yaml"
        path.write_text(done.stdout)
        out[name] = (path, [doc for doc in yaml.safe_load_all(done.stdout) if doc])
    return out


def find(docs: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} rendered"
    return matches[0]


def pod_spec(docs: list[Manifest], name: str) -> dict[str, Any]:
    """The pod template's spec of Deployment ``name``."""
    spec: dict[str, Any] = find(docs, "Deployment", name)["spec"]["template"]["spec"]
    return spec


def workloads(docs: list[Manifest]) -> Iterator[Manifest]:
    return (d for d in docs if d["kind"] in ("Deployment", "StatefulSet"))


def containers(docs: list[Manifest]) -> Iterator[tuple[Manifest, dict[str, Any]]]:
    for workload in workloads(docs):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            yield workload, container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


# -- the tools' verdicts -----------------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUES)
def test_helm_lint_passes(values: str) -> None:
    _tools_or_skip()
    done = run(HELM, "lint", "--strict", CHART, "--namespace", NAMESPACE, *VALUES[values])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


def _newest_kubernetes() -> str:
    package = next((TOOLS / "venv" / "lib").glob("python3*/site-packages/kubernetes_validate"))
    strict = (package / "kubernetes-json-schema").glob("v*-local-strict")
    versions = [p.name.removeprefix("v").removesuffix("-local-strict") for p in strict]
    return max(versions, key=lambda v: tuple(int(part) for part in v.split(".")))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_kubernetes(rendered, version: str) -> None:
    """Every built-in kind passes strict validation (no unknown field); the Prometheus Operator's
    kinds, which kubernetes-validate has no schema for, are the only ones it cannot check."""
    version = _newest_kubernetes() if version == "newest" else version
    for name, (path, docs) in rendered.items():
        done = run(KUBERNETES_VALIDATE, "--strict", "--kubernetes-version", version, path)
        assert done.returncode == 0, f"{name} values against {version}:\n{done.stdout}{done.stderr}"
        passed = re.findall(r"passed for resource (\S+)", done.stdout + done.stderr)
        unchecked = re.findall(r"Couldn't find schema for kind (\w+)", done.stdout + done.stderr)
        assert set(unchecked) <= CRD_KINDS, unchecked
        assert len(passed) == sum(1 for d in docs if d["kind"] not in CRD_KINDS), (name, passed)


def test_checkov_fails_no_check_and_catches_a_bad_pod(rendered, tmp_path: Path) -> None:
    """One checkov run over the three renderings and over a privileged pod made to fail: the chart fails
    no check (the skips in infra/helm/checkov.yaml aside), and the bad pod proves checkov looked."""
    for name, (path, _) in rendered.items():
        (tmp_path / f"{name}.yaml").write_text(path.read_text())
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad", "namespace": NAMESPACE},
        "spec": {"containers": [{"name": "c", "image": "x:1", "securityContext": {"privileged": True}}]},
    }))
    done = run(CHECKOV, "--config-file", CHECKOV_CONFIG, "-d", tmp_path, "-o", "json", timeout=240)
    report = json.loads(done.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["summary"]["parsing_errors"] == 0
    failed = report["results"]["failed_checks"]
    ours = [f"{f['check_id']} {f['resource']} ({f['file_path']})" for f in failed
            if "bad.yaml" not in f["file_path"]]
    assert ours == []
    assert any(f["check_id"] == "CKV_K8S_16" for f in failed), "checkov did not flag the privileged pod"


def test_each_checkov_skip_says_why() -> None:
    config = yaml.safe_load(CHECKOV_CONFIG.read_text())
    assert config["skip-download"] is True
    lines = {line.split("#")[0].strip(" -"): line for line in CHECKOV_CONFIG.read_text().splitlines()}
    for check in config["skip-check"]:
        reason = lines[check].split("#", 1)[1].strip() if "#" in lines[check] else ""
        assert len(reason) > 20, f"{check} is skipped without a reason on its line"


# -- the Prometheus Operator's resources, checked here -----------------------------------------------


def test_prometheus_rule_is_the_rules_file(rendered) -> None:
    rule = find(rendered["default"][1], "PrometheusRule", FULLNAME)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load(RULES_FILE.read_text())
    alerts = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert alerts == [a.name for a in alert_rules()]
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"]
        for entry in group["rules"]:
            assert ("alert" in entry) != ("record" in entry) and entry["expr"]


def test_service_monitor_scrapes_every_service_under_its_job(rendered) -> None:
    """Every Service that names a job is selected, exposes a port an endpoint names, and its job is
    what the alert rules match on (shipyard-serving, shipyard-worker …)."""
    docs = rendered["gpu"][1]
    monitor = find(docs, "ServiceMonitor", FULLNAME)
    spec = monitor["spec"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert spec["jobLabel"] == "shipyard.io/job"
    assert spec["selector"]["matchLabels"] == {"app.kubernetes.io/instance": RELEASE}
    ports = {e["port"] for e in spec["endpoints"]}
    assert all(e["path"] == "/metrics" for e in spec["endpoints"])
    jobs = {}
    for service in (d for d in docs if d["kind"] == "Service"):
        job = service["metadata"]["labels"].get("shipyard.io/job")
        if job:
            assert {p["name"] for p in service["spec"]["ports"]} & ports, service["metadata"]["name"]
            jobs[service["metadata"]["name"]] = job
    assert set(jobs.values()) == {*(f"shipyard-{s}" for s in SERVICES), "shipyard-worker", "shipyard-scaler"}
    rules = RULES_FILE.read_text()
    assert 'job="shipyard-worker"' in rules and "shipyard-(trainer|registry|serving|monitor)" in rules


def test_dashboards_are_configmaps_for_grafanas_sidecar(rendered) -> None:
    maps = [d for d in rendered["default"][1]
            if d["kind"] == "ConfigMap" and "dashboard" in d["metadata"]["name"]]
    by_file = {key: value for m in maps for key, value in m["data"].items()}
    assert set(by_file) == {p.name for p in DASHBOARDS_DIR.glob("*.json")}
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert m["metadata"]["annotations"]["grafana_folder"] == "Shipyard"
    for name, text in by_file.items():
        assert json.loads(text) == json.loads((DASHBOARDS_DIR / name).read_text())


def test_the_charts_copies_equal_infra() -> None:
    """The chart reads the rules and dashboards from files/ (it cannot read outside its folder); they
    must be the very files of infra/prometheus and infra/grafana."""
    fix = "copy infra/prometheus/rules/shipyard.yml and infra/grafana/dashboards/*.json to the chart's files/"
    copy = CHART / "files" / "prometheus" / "shipyard.yml"
    assert copy.read_bytes() == RULES_FILE.read_bytes(), f"{copy} differs: {fix}"
    copies = {p.name: p.read_bytes() for p in (CHART / "files" / "dashboards").glob("*.json")}
    originals = {p.name: p.read_bytes() for p in DASHBOARDS_DIR.glob("*.json")}
    assert copies == originals, f"the chart's dashboards differ from infra/grafana/dashboards: {fix}"


# -- what the issue asks of the chart ----------------------------------------------------------------


def test_every_shipyard_variable_the_chart_sets_is_read_by_the_platform(rendered) -> None:
    known = settings_env_names()
    set_names = {
        name
        for _, docs in rendered.values()
        for _, container in containers(docs)
        for name in env_of(container)
        if name.startswith("SHIPYARD_")
    }
    assert len(set_names) > 20
    assert sorted(set_names - known) == []


def test_every_command_is_a_module_of_the_platform(rendered) -> None:
    docs = rendered["gpu"][1]
    modules = set()
    for _, container in containers(docs):
        if container.get("command") == ["python", "-m"]:
            modules.add(container["args"][0])
    others = {"services.trainer.worker", "services.trainer.scaler", "pipelines.serve", "prefect"}
    assert modules == {*(f"services.{s}" for s in SERVICES), *others}
    for module in modules:
        assert importlib.util.find_spec(module) is not None, f"{module} is not in the checkout"


def test_gpu_workers_take_gpus_node_selector_and_tolerations_from_values(rendered) -> None:
    values = yaml.safe_load((CHART / "ci" / "gpu-values.yaml").read_text())["workers"]["gpu"]
    docs = rendered["gpu"][1]
    gpu = pod_spec(docs, f"{FULLNAME}-worker-gpu")
    (worker,) = gpu["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == values["gpusPerWorker"]
    assert gpu["nodeSelector"] == values["nodeSelector"]
    assert gpu["tolerations"] == values["tolerations"]
    assert gpu["runtimeClassName"] == values["runtimeClassName"] == "nvidia"
    assert worker["image"] == "shipyard-gpu:1.2.3@sha256:" + "1" * 64
    assert worker["args"] == ["services.trainer.worker", "--queues", "gpu", "--concurrency", "1"]
    cpu = pod_spec(docs, f"{FULLNAME}-worker-cpu")
    assert "nvidia.com/gpu" not in json.dumps(cpu) and "nodeSelector" not in cpu
    assert cpu["containers"][0]["image"] == "shipyard:1.2.3@sha256:" + "0" * 64
    names = {d["metadata"]["name"] for d in rendered["default"][1]}
    assert f"{FULLNAME}-worker-gpu" not in names and f"{FULLNAME}-scaler" not in names


def test_the_scaler_may_scale_the_gpu_workers_and_nothing_else(rendered) -> None:
    docs = rendered["gpu"][1]
    name = f"{FULLNAME}-scaler"
    target = f"{FULLNAME}-worker-gpu"
    role = find(docs, "Role", name)
    rules = {(tuple(r["resources"]), tuple(r["verbs"]), tuple(r["resourceNames"])) for r in role["rules"]}
    assert rules == {
        (("deployments",), ("get",), (target,)),
        (("deployments/scale",), ("get", "patch"), (target,)),
    }
    binding = find(docs, "RoleBinding", name)
    assert binding["roleRef"]["name"] == name
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]
    pod = pod_spec(docs, name)
    assert pod["serviceAccountName"] == name
    env = env_of(pod["containers"][0])
    assert env["SHIPYARD_SCALER_DEPLOYMENT"]["value"] == target
    assert env["SHIPYARD_SCALER_NAMESPACE"]["value"] == NAMESPACE
    bounds = (env["SHIPYARD_SCALER_MIN_REPLICAS"]["value"], env["SHIPYARD_SCALER_MAX_REPLICAS"]["value"])
    assert bounds == ("1", "4")
    assert "SHIPYARD_DB_URL" in env and "SHIPYARD_REDIS_URL" in env
    others = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] != name]
    assert all(d["spec"]["template"]["spec"].get("automountServiceAccountToken") is False for d in others)


def test_services_are_probed_on_healthz_and_readyz(rendered) -> None:
    for name, (_, docs) in rendered.items():
        for svc in SERVICES:
            (container,) = pod_spec(docs, f"{FULLNAME}-{svc}")["containers"]
            assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, name
            assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}, name
            port = next(p for p in container["ports"] if p["name"] == "http")["containerPort"]
            env = env_of(container)
            assert env[f"SHIPYARD_{svc.upper()}_PORT"]["value"] == str(port)
            assert env[f"SHIPYARD_{svc.upper()}_HOST"]["value"] == "0.0.0.0"
            url = env[f"SHIPYARD_{svc.upper()}_URL"]["value"]
            service = find(docs, "Service", f"{FULLNAME}-{svc}")
            assert url == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
            hosts = json.loads(env[f"SHIPYARD_{svc.upper()}_ALLOWED_HOSTS"]["value"])
            assert "$(POD_IP)" in hosts and list(env).index("POD_IP") < list(env).index(
                f"SHIPYARD_{svc.upper()}_ALLOWED_HOSTS"), "kubelet and Prometheus reach a pod by its IP"


@pytest.mark.parametrize("drain,shutdown", [(5, 30), (20, 120)])
def test_serving_outlives_its_drain(drain: int, shutdown: int) -> None:
    """The pod's grace period is longer than serving's drain grace plus its shutdown timeout, both as
    serving reads them from its environment."""
    _tools_or_skip()
    docs = render("--set", f"serving.drainGraceS={drain}", "--set", f"serving.shutdownTimeoutS={shutdown}")
    spec = pod_spec(docs, f"{FULLNAME}-serving")
    env = env_of(spec["containers"][0])
    read_drain = float(env["SHIPYARD_SERVING_DRAIN_GRACE_S"]["value"])
    read_shutdown = float(env["SHIPYARD_SERVING_SHUTDOWN_TIMEOUT_S"]["value"])
    assert (read_drain, read_shutdown) == (drain, shutdown)
    assert spec["terminationGracePeriodSeconds"] > read_drain + read_shutdown


def test_workers_get_time_to_finish_their_job(rendered) -> None:
    """On SIGTERM a worker finishes its running job (Celery's warm shutdown; the trainer sets no
    soft-shutdown timeout, Celery's default of 0 being none), so the pod's grace period is what bounds
    it: minutes, not the 30 s default that would cut nearly every job short."""
    for queue in ("cpu", "gpu"):
        spec = pod_spec(rendered["gpu"][1], f"{FULLNAME}-worker-{queue}")
        assert spec["terminationGracePeriodSeconds"] >= 300


def test_mlflow_redis_and_postgresql_admit_only_the_platform(rendered) -> None:
    docs = rendered["default"][1]
    platform = {"app.kubernetes.io/instance": RELEASE, "shipyard.io/platform": "true"}
    for component in ("mlflow", "prefect", "redis", "postgresql"):
        policy = find(docs, "NetworkPolicy", f"{FULLNAME}-{component}")["spec"]
        assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == component
        assert policy["policyTypes"] == ["Ingress"]
        (rule,) = policy["ingress"]
        assert rule["from"], "an empty from admits everyone"
        selectors = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
        assert all(set(peer) == {"podSelector"} for peer in rule["from"])  # no namespaces, no ipBlocks
        assert selectors[0] == platform
        if component == "postgresql":  # and the servers that keep their data there
            assert [s["app.kubernetes.io/component"] for s in selectors[1:]] == ["mlflow", "prefect"]
    labelled = {
        w["metadata"]["name"] for w in workloads(docs)
        if w["spec"]["template"]["metadata"]["labels"].get("shipyard.io/platform") == "true"
    }
    assert labelled == {f"{FULLNAME}-{s}" for s in (*SERVICES, "worker-cpu", "pipelines")}
    prefect = pod_spec(docs, f"{FULLNAME}-prefect")["containers"][0]
    assert not [n for n in env_of(prefect) if n.startswith("SHIPYARD_")], "Prefect's server is no client"
    pipelines = find(docs, "NetworkPolicy", f"{FULLNAME}-pipelines")["spec"]
    assert pipelines["policyTypes"] == ["Ingress"] and "ingress" not in pipelines, "it serves nothing"


def test_every_pod_runs_as_non_root_with_a_read_only_root(rendered) -> None:
    for name, (_, docs) in rendered.items():
        for workload, container in containers(docs):
            pod = workload["spec"]["template"]["spec"]["securityContext"]
            context = container["securityContext"]
            where = f"{name}: {workload['metadata']['name']}"
            assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 10000, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where


def _secret_refs(docs: list[Manifest]) -> set[tuple[str, str]]:
    refs = set()
    for workload, container in containers(docs):
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.add((ref["name"], ref["key"]))
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "secret" in volume:
                refs |= {(volume["secret"]["secretName"], item["key"]) for item in volume["secret"]["items"]}
    return refs


def _documented_secret_keys() -> set[str]:
    text = (CHART / "values.yaml").read_text()
    block = text.split("secrets:\n", 1)[0].rsplit("existingSecret,", 1)[1]
    return set(re.findall(r"^#\s+([a-z][a-z-]+[a-z])\b", block, re.M)) | set(
        re.findall(r"([a-z]+(?:-[a-z]+)+) \(", block))


def test_an_existing_secret_replaces_the_charts_own(rendered) -> None:
    docs = rendered["external"][1]
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert not [d for d in docs if d["kind"] == "StatefulSet"], "no bundled PostgreSQL or Redis"
    refs = _secret_refs(docs)
    assert {name for name, _ in refs} == {"shipyard-prod"}
    keys = {key for _, key in refs}
    assert keys <= _documented_secret_keys(), "values.yaml must list every key an existing Secret needs"
    mlflow = pod_spec(docs, f"{FULLNAME}-mlflow")["containers"][0]
    assert "--artifacts-destination=s3://shipyard-artifacts/mlflow" in mlflow["args"]
    assert mlflow["envFrom"] == [{"secretRef": {"name": "shipyard-artifact-store"}}]


def test_the_generated_secret_holds_every_key_the_pods_read(rendered, monkeypatch) -> None:
    """The default Secret has each key referenced; its tokens are the admin's and the pipelines' by
    hash, as the platform's settings read them in production; MLflow's password is long enough."""
    import base64

    from shipyard_common.auth import Role
    from shipyard_common.settings import PlatformSettings

    docs = rendered["default"][1]
    secret = find(docs, "Secret", FULLNAME)
    data = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    assert {key for name, key in _secret_refs(docs) if name == FULLNAME} <= set(data)
    tokens = json.loads(data["tokens"])
    admin = "sha256:" + hashlib.sha256(data["admin-token"].encode()).hexdigest()
    assert tokens[admin] == {"role": "admin", "name": "admin"}
    monkeypatch.setenv("SHIPYARD_ENV", "prod")
    monkeypatch.setenv("SHIPYARD_TOKENS", data["tokens"])
    table = PlatformSettings().tokens  # prod refuses the development tokens; these it takes
    assert table[data["admin-token"]].role == Role.ADMIN
    assert table[data["pipelines-token"]].role == Role.TRAINER
    assert table.clear == ()
    assert len(data["mlflow-password"]) >= 12
    ini = configparser.ConfigParser()
    ini.read_string(data["mlflow-auth-ini"])
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert ini["mlflow"]["database_uri"].endswith("/mlflow_auth")
    bundled = rf"postgresql\+psycopg2://shipyard:\w+@{FULLNAME}-postgresql:5432/shipyard"
    assert re.fullmatch(bundled, data["db-url"]), "the platform's database in the bundled PostgreSQL"


def test_external_databases_without_urls_are_refused() -> None:
    _tools_or_skip()
    done = helm_template("--set", "postgresql.enabled=false")
    assert done.returncode != 0 and "externalDatabase.url" in done.stderr
    done = helm_template("--set", "redis.enabled=false")
    assert done.returncode != 0 and "externalRedis.url" in done.stderr


def test_serving_scales_on_cpu_and_keeps_a_disruption_budget(rendered) -> None:
    docs = rendered["default"][1]
    hpa = find(docs, "HorizontalPodAutoscaler", f"{FULLNAME}-serving")["spec"]
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{FULLNAME}-serving"}
    assert hpa["scaleTargetRef"] == target
    assert "replicas" not in find(docs, "Deployment", f"{FULLNAME}-serving")["spec"], "the HPA owns replicas"
    for svc in SERVICES:
        budget = find(docs, "PodDisruptionBudget", f"{FULLNAME}-{svc}")["spec"]
        assert budget["selector"]["matchLabels"]["app.kubernetes.io/component"] == svc
        # A budget that keeps every replica would block each node drain for good.
        deployment = find(docs, "Deployment", f"{FULLNAME}-{svc}")["spec"]
        replicas = hpa["minReplicas"] if svc == "serving" else deployment["replicas"]
        assert budget.get("minAvailable", 0) < replicas and budget.get("maxUnavailable", 1) >= 1, svc


def test_the_ingress_serves_the_registry_ui_and_serving(rendered) -> None:
    ingress = find(rendered["gpu"][1], "Ingress", FULLNAME)["spec"]
    backends = {r["host"]: r["http"]["paths"][0]["backend"]["service"]["name"] for r in ingress["rules"]}
    assert backends == {
        "registry.shipyard.example.com": f"{FULLNAME}-registry",
        "serving.shipyard.example.com": f"{FULLNAME}-serving",
    }
    registry = find(rendered["gpu"][1], "Deployment", f"{FULLNAME}-registry")
    env = env_of(registry["spec"]["template"]["spec"]["containers"][0])
    assert env["SHIPYARD_REGISTRY_SECURE_COOKIES"]["value"] == "true"  # behind TLS
    assert "registry.shipyard.example.com" in json.loads(env["SHIPYARD_REGISTRY_ALLOWED_HOSTS"]["value"])


# -- the tools themselves ------------------------------------------------------------------------------


def test_the_infra_tools_venv_is_exactly_its_lock() -> None:
    """tools/infra-tools.lock pins every package with ==, the checkers among them, and the venv that
    `make infra-tools` built holds exactly those (so a test never runs a checker the lock does not name)."""
    lock = ROOT / "tools" / "infra-tools.lock"
    pins = [line for line in lock.read_text().splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", pin) for pin in pins), pins
    names = {pin.split("==")[0].lower(): pin for pin in pins}
    assert names["checkov"] == "checkov==3.3.30"
    assert names["kubernetes-validate"] == "kubernetes-validate==1.37.0"
    _tools_or_skip()
    frozen = run(VENV_BIN / "python", "-m", "pip", "freeze", "--all").stdout.split()
    assert sorted(frozen, key=str.lower) == sorted(pins, key=str.lower)
    assert run(HELM, "version", "--short").stdout.startswith("v4.1.")
    # The Terraform checks parse HCL with the venv's `hcl2` (checkov's fork, bc-python-hcl2).
    parsed = run(VENV_BIN / "python", "-c", "import hcl2; print(hcl2.loads('a = 1')['a'])")
    assert parsed.returncode == 0 and parsed.stdout.strip() in ("1", "[1]"), parsed.stderr


# What each process of the chart builds its settings from (module run -> settings classes).
PROCESS_SETTINGS = {
    "services.trainer": ("services.trainer.settings:TrainerSettings",),
    "services.registry": ("services.registry.settings:RegistrySettings",),
    "services.serving": ("services.serving.settings:ServingSettings",),
    "services.monitor": ("services.monitor.settings:MonitorSettings",),
    "services.trainer.worker": (
        "services.trainer.settings:TrainerSettings", "services.trainer.worker.metrics:WorkerMetricsSettings",
    ),
    "services.trainer.scaler": ("services.trainer.scaler.settings:ScalerSettings",),
    "pipelines.serve": ("shipyard_common.settings:PlatformSettings", "pipelines.tasks:PipelineSettings"),
    "prefect": (),  # Prefect's own server: no settings of ours
}
POD_IP = "10.1.2.3"


def container_environment(container: dict[str, Any], secret: dict[str, str]) -> dict[str, str]:
    """The environment kubelet gives ``container``: secrets filled in from ``secret``, the pod's IP, and
    ``$(VAR)`` references to earlier entries expanded, as Kubernetes does."""
    env: dict[str, str] = {}
    for entry in container["env"]:
        source = entry.get("valueFrom", {})
        if "secretKeyRef" in source:
            value = secret[source["secretKeyRef"]["key"]]
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "status.podIP"
            value = POD_IP
        else:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), entry["value"])
        env[entry["name"]] = value
    return env


def test_each_process_takes_the_environment_the_chart_gives_it(rendered, monkeypatch) -> None:
    """Every Shipyard process's settings classes build from its container's environment: the service
    listens on all addresses at its Service's port, answers to its pod IP (kubelet, Prometheus), and
    reaches the database, Redis and MLflow the chart set up."""
    import base64

    docs = rendered["gpu"][1]
    secret = {k: base64.b64decode(v).decode() for k, v in find(docs, "Secret", FULLNAME)["data"].items()}
    checked = set()
    for _, container in containers(docs):
        if container.get("command") != ["python", "-m"]:
            continue
        env = container_environment(container, secret)
        for name in [n for n in os.environ if n.startswith("SHIPYARD_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        for target in PROCESS_SETTINGS[container["args"][0]]:
            module, cls = target.split(":")
            settings = getattr(importlib.import_module(module), cls)()
            checked.add(target)
            platform = settings if cls == "PlatformSettings" else getattr(settings, "platform", None)
            if platform is not None:
                assert platform.env == "prod" and platform.db_url == secret["db-url"]
                assert platform.redis_url == secret["redis-url"]
                assert platform.mlflow_tracking_uri == f"http://{FULLNAME}-mlflow:5000"
                assert str(platform.mlflow_password_file) == "/var/run/secrets/shipyard/mlflow-password"
            if hasattr(settings, "allowed_hosts") and container["args"][0] != "services.trainer.worker":
                assert settings.host == "0.0.0.0" and POD_IP in settings.allowed_hosts
                assert settings.port == container["ports"][0]["containerPort"]
            if hasattr(settings, "metrics_host"):  # the /metrics of the worker and the scaler
                assert settings.metrics_host == "0.0.0.0"
                assert settings.metrics_port == container["ports"][0]["containerPort"]
    assert checked == {t for targets in PROCESS_SETTINGS.values() for t in targets}
    pipelines = container_environment(pod_spec(docs, f"{FULLNAME}-pipelines")["containers"][0], secret)
    assert pipelines["SHIPYARD_API_TOKEN"] == secret["pipelines-token"]
    prefect_api = f"http://{FULLNAME}-prefect:4200/api"
    assert pipelines["PREFECT_API_URL"] == pipelines["SHIPYARD_PREFECT_API_URL"] == prefect_api


def test_servings_grpc_port_is_opened_only_when_set(rendered) -> None:
    """gRPC (OIP v2) is off unless serving.grpcPort is set; then serving binds it, and its container,
    Service and NetworkPolicy open that port."""
    for name, expected in (("default", None), ("gpu", 8013)):
        docs = rendered[name][1]
        (container,) = pod_spec(docs, f"{FULLNAME}-serving")["containers"]
        env = env_of(container)
        assert env["SHIPYARD_SERVING_GRPC_PORT"]["value"] == str(expected or 0)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        service_ports = find(docs, "Service", f"{FULLNAME}-serving")["spec"]["ports"]
        service = {p["name"]: p["port"] for p in service_ports}
        policy = find(docs, "NetworkPolicy", f"{FULLNAME}-serving")["spec"]["ingress"][0]["ports"]
        assert ports.get("grpc") == service.get("grpc") == expected
        assert {p["port"] for p in policy} == {8003, expected} - {None}


@pytest.mark.parametrize("setting,complaint", [
    ("workers.gpu.enabeld=true", "'enabeld' not allowed"),
    ("secrets.mlflowPassword=short", "minLength"),
    ("env=staging", "'/env': value must be one of"),
])
def test_values_the_schema_refuses(setting: str, complaint: str) -> None:
    """values.schema.json turns a misspelt or impossible value into an error rather than a default."""
    _tools_or_skip()
    done = helm_template("--set", setting)
    assert done.returncode != 0 and complaint in done.stderr, done.stderr


def test_platform_pods_share_one_service_account_without_its_token(rendered) -> None:
    """The platform's pods run as one service account (annotated for a cloud identity, or one made
    outside the chart); none mounts its API token but the scaler, which has its own."""
    for name, account in (("gpu", FULLNAME), ("external", "shipyard-platform")):
        docs = rendered[name][1]
        accounts = [d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == account]
        if name == "gpu":
            (made,) = accounts
            assert made["metadata"]["annotations"] == {
                "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/shipyard-platform"}
            assert made["automountServiceAccountToken"] is False
        else:
            assert accounts == [], "create: false makes none"
        for workload in workloads(docs):
            pod = workload["spec"]["template"]["spec"]
            component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
            if component == "scaler":
                assert pod["serviceAccountName"] == f"{FULLNAME}-scaler"
                continue
            assert pod["automountServiceAccountToken"] is False, component
            platform = component not in ("prefect", "postgresql", "redis")
            assert (pod.get("serviceAccountName") == account) == platform, component


def test_your_tokens_replace_the_generated_admin(tmp_path: Path) -> None:
    """secrets.tokens replaces the generated admin token; the pipelines' token is added to it, since
    the monitor and the flows act with it."""
    import base64

    _tools_or_skip()
    bob = "sha256:" + hashlib.sha256(b"bob's token").hexdigest()
    values = tmp_path / "tokens.yaml"
    grant = {"role": "approver", "name": "bob"}
    values.write_text(yaml.safe_dump({"secrets": {"tokens": json.dumps({bob: grant})}}))
    secret = find(render("-f", str(values)), "Secret", FULLNAME)["data"]
    tokens = json.loads(base64.b64decode(secret["tokens"]))
    pipelines = "sha256:" + hashlib.sha256(base64.b64decode(secret["pipelines-token"])).hexdigest()
    assert tokens == {bob: grant, pipelines: {"role": "trainer", "name": "pipelines"}}
