"""The Terraform of infra/terraform, checked offline (no provider can be downloaded here): every file
parses with python-hcl2 (the infra tools venv's), variables and outputs are typed and described, module
calls pass what their local modules declare and require, references name what exists, Terraform, the
providers and the remote charts are pinned exactly, checkov finds nothing outside its reasoned skips,
the values given to the Shipyard chart exist in it, and, where terraform is on PATH, ``terraform fmt``
agrees and (with the AWS provider in a local mirror) ``terraform test`` plans every module against a
mocked provider and checks what it promises."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra.support import settings_env_names
from tests.support import missing_tool

ROOT = Path(__file__).resolve().parents[2]
TF_DIR = ROOT / "infra" / "terraform"
CHECKOV_CONFIG = TF_DIR / ".checkov.yaml"
TOOLS_BIN = ROOT / ".tools" / "infra" / "venv" / "bin"
CHART_VALUES = ROOT / "infra" / "helm" / "shipyard" / "values.yaml"
EXACT = re.compile(r"^= \d+\.\d+\.\d+$")
# Arguments of a module block that are Terraform's, not the module's variables.
MODULE_META = {"source", "version", "count", "for_each", "providers", "depends_on"}

# Run by the tools venv's python: every .tf file under argv[1], parsed, as JSON by relative path.
PARSE_SCRIPT = """
import json, pathlib, sys
import hcl2
root = pathlib.Path(sys.argv[1])
parsed = {}
for path in sorted(root.rglob("*.tf")):
    if ".terraform" in path.parts:
        continue
    try:
        parsed[str(path.relative_to(root))] = {"doc": hcl2.loads(path.read_text())}
    except Exception as error:
        parsed[str(path.relative_to(root))] = {"error": f"{type(error).__name__}: {error}"}
print(json.dumps(parsed))
"""


def tool(name: str) -> Path:
    """A program of the infra tools venv: a failure under CI, a skip elsewhere, when it is missing."""
    path = TOOLS_BIN / name
    if not path.exists():
        missing_tool(f"{path.relative_to(ROOT)} is missing: run make infra-tools")
    return path


def scalar(value: Any) -> Any:
    """An attribute's value: python-hcl2 (checkov's fork) wraps each one in a list of one."""
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]  # the upstream parser keeps a string's quotes
    return value


def blocks(doc: dict[str, Any], kind: str) -> list[tuple[str, dict[str, Any]]]:
    """The labelled blocks of one kind in a parsed file (``variable "x" {...}`` -> ("x", body))."""
    return [(name, body) for entry in doc.get(kind, []) for name, body in entry.items()]


@dataclass
class TfDir:
    """One Terraform module (a folder of .tf files): what it declares and calls, and its text."""

    path: Path
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    locals: set[str] = field(default_factory=set)
    terraform: list[dict[str, Any]] = field(default_factory=list)
    resource_types: set[str] = field(default_factory=set)
    resource_count: int = 0
    helm_releases: dict[str, dict[str, Any]] = field(default_factory=dict)
    text: str = ""

    def add(self, doc: dict[str, Any], text: str) -> None:
        self.variables.update(blocks(doc, "variable"))
        self.outputs.update(blocks(doc, "output"))
        self.modules.update(blocks(doc, "module"))
        self.locals.update(
            key for entry in doc.get("locals", []) for key in entry if not key.startswith("__")
        )
        self.terraform.extend(doc.get("terraform", []))
        for kind in ("resource", "data"):
            for resource_type, named in blocks(doc, kind):
                self.resource_types.add(resource_type)
                if kind == "resource":
                    self.resource_count += len([name for name in named if not name.startswith("__")])
                if resource_type == "helm_release":
                    self.helm_releases.update(named)
        # Comment lines are left out: only code may reference things.
        self.text += "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")) + "\n"

    def called(self, name: str) -> Path:
        return (self.path / scalar(self.modules[name]["source"])).resolve()


def model(parsed: dict[str, dict[str, Any]]) -> dict[Path, TfDir]:
    dirs: dict[Path, TfDir] = {}
    for relative, result in parsed.items():
        path = (TF_DIR / relative).resolve()
        tf_dir = dirs.setdefault(path.parent, TfDir(path.parent))
        tf_dir.add(result["doc"], path.read_text())
    return dirs


@pytest.fixture(scope="module")
def parsed() -> dict[str, dict[str, Any]]:
    python = tool("python")
    done = subprocess.run(
        [python, "-c", PARSE_SCRIPT, TF_DIR], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def dirs(parsed: dict[str, dict[str, Any]]) -> dict[Path, TfDir]:
    assert not [name for name, result in parsed.items() if "error" in result], "parse errors"
    return model(parsed)


def test_every_file_parses(parsed):
    files = {str(path.relative_to(TF_DIR)) for path in TF_DIR.rglob("*.tf") if ".terraform" not in path.parts}
    assert set(parsed) == files
    assert {name: result["error"] for name, result in parsed.items() if "error" in result} == {}
    expected = {"network", "cluster", "storage", "database", "redis", "kms", "irsa"}
    assert {path.name for path in (TF_DIR / "modules").iterdir() if path.is_dir()} >= expected
    assert "environments/example/main.tf" in parsed


def declaration_problems(dirs: dict[Path, TfDir]) -> list[str]:
    """Variables without a type or a description, outputs without a description."""
    problems = []
    for tf_dir in dirs.values():
        where = tf_dir.path.relative_to(TF_DIR)
        for name, body in tf_dir.variables.items():
            if not scalar(body.get("type")):
                problems.append(f"{where}: variable {name} has no type")
            if len(str(scalar(body.get("description", "")))) < 10:
                problems.append(f"{where}: variable {name} has no description")
        for name, body in tf_dir.outputs.items():
            if len(str(scalar(body.get("description", "")))) < 10:
                problems.append(f"{where}: output {name} has no description")
    return problems


def test_variables_are_typed_and_described_and_outputs_described(dirs):
    assert sum(len(tf_dir.variables) for tf_dir in dirs.values()) > 0
    assert declaration_problems(dirs) == []


def module_call_problems(dirs: dict[Path, TfDir]) -> list[str]:
    """Module calls to anything but a local folder (a registry module cannot be downloaded here), to a
    missing folder, with an input the module does not declare, or without one it requires (a variable
    without a default)."""
    problems = []
    for tf_dir in dirs.values():
        for name, body in tf_dir.modules.items():
            where = f"{tf_dir.path.relative_to(TF_DIR)}: module {name}"
            if not str(scalar(body["source"])).startswith(("./", "../")):
                problems.append(f"{where}: source {scalar(body['source'])} is not a local folder")
                continue
            callee = dirs.get(tf_dir.called(name))
            if callee is None:
                problems.append(f"{where}: no module at {scalar(body['source'])}")
                continue
            inputs = {key for key in body if key not in MODULE_META and not key.startswith("__")}
            required = {var for var, spec in callee.variables.items() if "default" not in spec}
            unknown = sorted(inputs - set(callee.variables))
            problems += [f"{where}: {key} is no variable of the module" for key in unknown]
            problems += [f"{where}: required {key} is not passed" for key in sorted(required - inputs)]
    return problems


def test_module_calls_match_the_modules_variables(dirs):
    assert any(tf_dir.modules for tf_dir in dirs.values())
    assert module_call_problems(dirs) == []


def reference_problems(dirs: dict[Path, TfDir]) -> list[str]:
    """References to a module output, a variable or a local value that its module does not declare."""
    problems = []
    for tf_dir in dirs.values():
        where = tf_dir.path.relative_to(TF_DIR)
        for module, output in sorted(set(re.findall(r"\bmodule\.(\w+)\.(\w+)", tf_dir.text))):
            if module not in tf_dir.modules:
                problems.append(f"{where}: module.{module} is not called here")
            elif output not in getattr(dirs.get(tf_dir.called(module)), "outputs", {}):
                problems.append(f"{where}: module.{module} has no output {output}")
        variables = set(re.findall(r"\bvar\.(\w+)", tf_dir.text)) - set(tf_dir.variables)
        problems += [f"{where}: var.{name} is not declared" for name in sorted(variables)]
        local_values = set(re.findall(r"\blocal\.(\w+)", tf_dir.text)) - tf_dir.locals
        problems += [f"{where}: local.{name} is not defined" for name in sorted(local_values)]
    return problems


def test_references_name_existing_outputs_variables_and_locals(dirs):
    assert reference_problems(dirs) == []


def test_a_misspelt_module_input_or_output_is_found(parsed):
    """The checks above can fail: a misspelt input, a missing required one, a registry module, a
    misspelt output."""
    broken = model(json.loads(json.dumps(parsed)))
    example = broken[(TF_DIR / "environments" / "example").resolve()]
    cluster_call = example.modules["cluster"]
    cluster_call["gpu_max_sizes"] = cluster_call.pop("gpu_max_size")
    del cluster_call["subnet_ids"]
    example.modules["storage"]["source"] = ["terraform-aws-modules/s3/aws"]
    example.text = example.text.replace("module.cluster.gpu_tolerations", "module.cluster.gpu_toleration")
    assert module_call_problems(broken) == [
        "environments/example: module cluster: gpu_max_sizes is no variable of the module",
        "environments/example: module cluster: required subnet_ids is not passed",
        "environments/example: module storage: source terraform-aws-modules/s3/aws is not a local folder",
    ]
    assert "environments/example: module.cluster has no output gpu_toleration" in reference_problems(broken)


def pins(tf_dir: TfDir) -> tuple[str, dict[str, tuple[str, str]]]:
    """The module's required_version and its providers' (source, version)."""
    assert len(tf_dir.terraform) == 1, f"{tf_dir.path}: one terraform block"
    block = tf_dir.terraform[0]
    providers = scalar(block.get("required_providers", {}))
    return scalar(block.get("required_version")), {
        name: (scalar(spec)["source"], scalar(spec)["version"]) for name, spec in providers.items()
    }


def test_charts_from_a_repository_are_pinned_to_a_version(dirs):
    """A chart from a repository has an exact version (given directly, or as a variable's default)."""
    versions, local = {}, []
    for tf_dir in dirs.values():
        for name, body in tf_dir.helm_releases.items():
            if "repository" not in body:
                local.append(name)
                continue
            version = str(scalar(body.get("version", "")))
            variable = re.fullmatch(r"\$\{var\.(\w+)\}", version)
            versions[name] = (
                str(scalar(tf_dir.variables[variable[1]].get("default"))) if variable else version
            )
    assert versions, (
        "the example installs the cluster autoscaler and the device plugin from their repositories"
    )
    assert {name: v for name, v in versions.items() if not re.fullmatch(r"\d+\.\d+\.\d+", v)} == {}
    assert local == ["shipyard"], "Shipyard's own chart comes from this repository"


def test_terraform_and_providers_are_pinned_exactly_and_alike(dirs):
    seen: dict[str, set[str]] = {}
    for tf_dir in dirs.values():
        where = tf_dir.path.relative_to(TF_DIR)
        required_version, providers = pins(tf_dir)
        assert EXACT.match(str(required_version)), f"{where}: required_version {required_version!r}"
        seen.setdefault("terraform", set()).add(required_version)
        for name, (source, version) in providers.items():
            assert source == f"hashicorp/{name}" and EXACT.match(version), f"{where}: {name} {version!r}"
            seen.setdefault(name, set()).add(version)
        used = {resource_type.split("_")[0] for resource_type in tf_dir.resource_types}
        assert used <= set(providers), f"{where}: providers used but not required: {used - set(providers)}"
    assert {name: len(versions) for name, versions in seen.items() if len(versions) > 1} == {}


def checkov_skips() -> tuple[list[str], list[str]]:
    """The skip list's check IDs, and the lines among them that give a reason."""
    skips = yaml.safe_load(CHECKOV_CONFIG.read_text())["skip-check"]
    reasoned = re.findall(r"^\s*-\s*(CKV\w+)\s+#\s*\S.{9,}$", CHECKOV_CONFIG.read_text(), re.MULTILINE)
    return skips, reasoned


def test_every_skipped_check_says_why():
    skips, reasoned = checkov_skips()
    assert skips == reasoned, "each skip-check entry needs '# reason' on its line"
    inline = [
        (path.relative_to(TF_DIR), match)
        for path in TF_DIR.rglob("*.tf")
        for match in re.findall(r"#\s*checkov:skip=([^\n]*)", path.read_text())
    ]
    assert inline, "the resource-specific skips are inline"
    for path, skip in inline:
        assert re.fullmatch(r"CKV2?_[A-Z0-9_]+:\s*\S.{9,}", skip), (
            f"{path}: checkov:skip={skip} needs ':reason'"
        )


def test_checkov_finds_no_failed_check(dirs):
    checkov = tool("checkov")
    argv = [checkov, "--config-file", CHECKOV_CONFIG, "-d", TF_DIR, "--quiet", "--compact", "-o", "json"]
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_NO_OUTPUT_TRUNCATION": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, env=env, cwd=TF_DIR)
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert [report["check_type"] for report in reports] == ["terraform"], done.stderr[-2000:]
    summary = reports[0]["summary"]
    failed = [
        f"{check['check_id']} {check['resource']} ({check['file_path']}): {check['check_name']}"
        for check in reports[0]["results"]["failed_checks"]
    ]
    assert failed == []
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 0
    assert summary["resource_count"] >= sum(tf_dir.resource_count for tf_dir in dirs.values())


def chart_value_problems(given: dict[str, Any], chart: dict[str, Any], prefix: str = "") -> list[str]:
    """Paths of ``given`` that the chart's values.yaml does not have; below a map the chart leaves empty
    (a node selector, annotations) any key goes."""
    problems = []
    for key, value in given.items():
        path = f"{prefix}{key}"
        if not isinstance(chart, dict) or key not in chart:
            problems.append(path)
        elif isinstance(value, dict) and isinstance(chart[key], dict) and chart[key]:
            problems += chart_value_problems(value, chart[key], f"{path}.")
    return problems


def example_chart_values(parsed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the example environment gives the Shipyard chart: its values and its set_sensitive names."""
    docs = [result["doc"] for name, result in parsed.items() if name.startswith("environments/example/")]
    values = scalar(
        next(
            entry["shipyard_values"]
            for doc in docs
            for entry in doc.get("locals", [])
            if "shipyard_values" in entry
        )
    )
    release = next(
        named["shipyard"]
        for doc in docs
        for kind, named in blocks(doc, "resource")
        if kind == "helm_release" and "shipyard" in named
    )
    assert scalar(release["values"]) == "${yamlencode(local.shipyard_values)}"
    for setting in release.get("set_sensitive", []):
        *parents, leaf = scalar(setting["name"]).split(".")
        node = values
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = "(sensitive)"
    return values


def test_the_example_passes_only_values_the_chart_has(parsed):
    chart = yaml.safe_load(CHART_VALUES.read_text())
    given = example_chart_values(parsed)
    assert {"workers", "externalDatabase", "externalRedis", "mlflow"} <= set(given)
    assert chart_value_problems(given, chart) == []
    assert chart_value_problems({"workers": {"gpu": {"nodeSelectr": {}}}}, chart) == [
        "workers.gpu.nodeSelectr"
    ]
    extra_env = {scalar(entry["name"]) for entry in given["extraEnv"]}
    assert extra_env and extra_env <= settings_env_names(), extra_env - settings_env_names()


def test_the_example_gives_every_url_the_chart_requires_without_its_bundled_databases(parsed, tmp_path):
    """The example turns the chart's PostgreSQL and Redis off: the chart must render with exactly the
    external URLs the example passes (dummies here), or an install stops at the first one it lacks."""
    helm = TOOLS_BIN.parent.parent / "helm"
    tool("python")  # the tools are there (else the same skip or failure as the other checks)
    given = example_chart_values(parsed)
    values: dict[str, Any] = {
        "postgresql": {"enabled": given["postgresql"]["enabled"]},
        "redis": {"enabled": given["redis"]["enabled"]},
    }
    for section in ("externalDatabase", "externalRedis"):
        urls = {key: f"postgresql://u:p@db:5432/{key}" for key in given.get(section, {})}
        if urls:
            values[section] = urls
    assert values["postgresql"]["enabled"] is False and values["redis"]["enabled"] is False
    (tmp_path / "example.yaml").write_text(yaml.safe_dump(values))
    chart = CHART_VALUES.parent
    done = subprocess.run([helm, "template", "shipyard", chart, "-f", tmp_path / "example.yaml"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


TERRAFORM = shutil.which("terraform")
needs_terraform = pytest.mark.skipif(TERRAFORM is None, reason="terraform is not on PATH")


def terraform(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    assert TERRAFORM is not None
    argv = [TERRAFORM, *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False, cwd=cwd, env=env)


@needs_terraform
def test_terraform_fmt_is_clean():
    done = terraform("fmt", "-check", "-recursive", "-diff", "-no-color", TF_DIR, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def mirror_env(dirs: dict[Path, TfDir], tmp_path: Path) -> dict[str, str]:
    """Terraform's environment with a CLI configuration that installs providers from the local
    filesystem mirror (``TF_PLUGIN_MIRROR``, default /opt/tf-plugins); a skip without the AWS provider."""
    _, providers = pins(dirs[(TF_DIR / "modules" / "cluster").resolve()])
    source, version = providers["aws"]
    mirror = Path(os.environ.get("TF_PLUGIN_MIRROR", "/opt/tf-plugins"))
    if not (mirror / "registry.terraform.io" / source / version.lstrip("= ")).is_dir():
        missing_tool(f"no {source} {version} in the provider mirror {mirror} (TF_PLUGIN_MIRROR)")
    config = tmp_path / "terraformrc"
    config.write_text(f'provider_installation {{\n  filesystem_mirror {{\n    path = "{mirror}"\n  }}\n}}\n')
    return {**os.environ, "TF_CLI_CONFIG_FILE": str(config), "TF_IN_AUTOMATION": "1"}


@needs_terraform
def test_module_terraform_tests_pass(dirs, tmp_path):
    """``terraform test`` in ``testing/``: each ``*.tftest.hcl`` plans a module against a mocked AWS
    provider and asserts what the module promises (GPU nodes from zero behind the NVIDIA taint, a
    private versioned encrypted bucket, a private database with backups...) and which inputs it refuses.
    Before each run, terraform validates the module and the modules it calls against the AWS provider's
    schema (attribute names, enums), which needs that provider in a local mirror. Every module the
    environments call has its tests. The example environment is not run: its Helm, Kubernetes and random
    providers are not in the mirror."""
    env = mirror_env(dirs, tmp_path)
    modules_dir = (TF_DIR / "modules").resolve()
    modules = {path.name: tf_dir for path, tf_dir in dirs.items() if path.parent == modules_dir}
    nested = {tf_dir.called(call).name for tf_dir in modules.values() for call in tf_dir.modules}
    test_files = "".join(path.read_text() for path in (TF_DIR / "testing").glob("*.tftest.hcl"))
    tested = set(re.findall(r'source\s*=\s*"\.\./modules/([\w-]+)"', test_files))
    assert sorted(tested) == sorted(set(modules) - nested)
    copy = tmp_path / "terraform"
    shutil.copytree(TF_DIR, copy, ignore=shutil.ignore_patterns(".terraform", ".terraform.lock.hcl"))
    init = terraform("init", "-backend=false", "-input=false", "-no-color", cwd=copy / "testing", env=env)
    assert init.returncode == 0, init.stdout + init.stderr
    done = terraform("test", "-no-color", cwd=copy / "testing", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"Success! \d+ passed, 0 failed", done.stdout), done.stdout
