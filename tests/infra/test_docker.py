"""The container images (docker/Dockerfile, docker/Dockerfile.gpu) and docker/compose.yaml, checked
without a container engine (none runs here): what each container runs is a module or command the
package really has, each healthcheck calls a route its target really serves on the port compose gives
it, each variable compose sets is one the settings read, and no secret is written in any of them.

The Dockerfiles are read with a small line parser (continuations joined, comments dropped), the
compose file with PyYAML (anchors and merge keys resolved)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.infra.support import PROMETHEUS_DIR, ROOT, settings_env_names
from tests.support import test_platform

DOCKER_DIR = ROOT / "docker"
DOCKERFILES = (DOCKER_DIR / "Dockerfile", DOCKER_DIR / "Dockerfile.gpu")
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
ENV_EXAMPLE = DOCKER_DIR / "env.example"
CODE_DIRS = {"shipyard_common", "shipyard_cli", "services", "pipelines"}
SERVICES = ("trainer", "registry", "serving", "monitor")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|PRIVATE|_KEY\b|_KEY_|CREDENTIAL", re.IGNORECASE)
# A value compose must be given from outside: ${NAME:?message}, nothing around it.
REQUIRED_VAR = re.compile(r"^\$\{(?P<name>[A-Z][A-Z0-9_]*):\?[^}]*\}$")
URL_IN_TEXT = re.compile(r"https?://[^\s'\"]+")
LOOPBACK = {"127.0.0.1", "localhost"}
UNKNOWN_VARIABLE = "not a variable the platform reads (settings_env_names: a typo?), nor in OTHER_ENV:"

# Variables compose or the images set that are not Shipyard's settings, each for the program that reads it.
OTHER_ENV = {
    "PGPASSWORD",  # libpq (psycopg2) and asyncpg: the PostgreSQL password, kept out of the URLs
    "MLFLOW_TRACKING_URI",  # MLflow's client, as PlatformSettings.as_env gives it to every child
    "PREFECT_API_URL",  # Prefect's client (pipelines.serve and the flow runs it starts)
    "MLFLOW_AUTH_CONFIG_PATH",  # MLflow's basic-auth app: its configuration file
    "MLFLOW_AUTH_ADMIN_USERNAME",  # ... its admin, created on first start (the platform's user)
    "MLFLOW_AUTH_ADMIN_PASSWORD",  # ... and that admin's password
    "MLFLOW_FLASK_SERVER_SECRET_KEY",  # MLflow's Flask sessions (CSRF) in the basic-auth app
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",  # MLflow server: no background job runner (as shipyard up)
    "MLFLOW_DISABLE_TELEMETRY",  # NO_TELEMETRY_ENV: MLflow sends nothing home
    "DO_NOT_TRACK",  # NO_TELEMETRY_ENV: Evidently and others send nothing home
    "DVC_NO_ANALYTICS",  # NO_TELEMETRY_ENV: DVC
    "HF_HUB_OFFLINE",  # NO_TELEMETRY_ENV: Hugging Face never downloads at run time
    "PREFECT_SERVER_ANALYTICS_ENABLED",  # NO_TELEMETRY_ENV: Prefect's server
    "PREFECT_HOME",  # Prefect's local files (its profile), as Stack.prefect_component sets it
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",  # Prefect server's database
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT",  # Prefect's UI, as Stack.prefect_component
    "PREFECT_UI_API_URL",  # where the browser's Prefect UI finds the API (the published port)
    "POSTGRES_USER",  # the postgres image: its superuser
    "POSTGRES_DB",  # ... the database it creates (the platform's)
    "POSTGRES_PASSWORD",  # ... that user's password
    "GF_SERVER_HTTP_PORT",  # Grafana, as observability.grafana_env (its port)
    "GF_PATHS_PROVISIONING",  # ... infra/grafana/provisioning
    "GF_SECURITY_ADMIN_PASSWORD",  # ... its admin's password
    "GF_AUTH_ANONYMOUS_ENABLED",  # ... viewers need no account
    "GF_AUTH_ANONYMOUS_ORG_ROLE",  # ... and may only view
    "GF_ANALYTICS_REPORTING_ENABLED",  # ... sends nothing home
    "GF_ANALYTICS_CHECK_FOR_UPDATES",  # ...
    "GF_ANALYTICS_CHECK_FOR_PLUGIN_UPDATES",  # ...
    "GF_NEWS_NEWS_FEED_ENABLED",  # ...
    "PYTHONDONTWRITEBYTECODE",  # the images: Python writes no .pyc into the read-only code
    "PYTHONUNBUFFERED",  # ... logs leave at once
    "PIP_NO_CACHE_DIR",  # ... pip keeps no cache in a layer
    "PIP_DISABLE_PIP_VERSION_CHECK",  # ... pip asks nothing of PyPI it was not asked
    "NVIDIA_VISIBLE_DEVICES",  # the NVIDIA Container Toolkit: which GPUs (the GPU image)
    "NVIDIA_DRIVER_CAPABILITIES",  # ... compute for CUDA, utility for nvidia-smi (GPU metrics)
}
# Routes of servers that are not Python (their documented health endpoints), by compose service.
DOCUMENTED_ROUTES = {
    "prometheus": {"/-/ready", "/-/healthy"},  # prometheus.io/docs/prometheus/latest/management_api
    "grafana": {"/api/health"},  # grafana.com/docs/grafana/latest/developers/http_api/other
}


# -- reading the files --------------------------------------------------------------------------------
def dockerfile(path: Path) -> list[tuple[int, str, str]]:
    """(line number, INSTRUCTION, arguments) of each instruction; continuations joined."""
    instructions: list[tuple[int, str, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        start = start or number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        keyword, _, args = text.partition(" ")
        instructions.append((start, keyword.upper(), args.strip()))
        pending, start = "", 0
    return instructions


def argv_of(args: str) -> list[str]:
    """An instruction's exec form (JSON array) or shell form, as an argument list."""
    return list(json.loads(args)) if args.startswith("[") else shlex.split(args)


def healthcheck_argv(args: str) -> list[str]:
    """The command of ``HEALTHCHECK [--options] CMD ...``."""
    _, _, command = args.partition("CMD ")
    return argv_of(command.strip())


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def compose_services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    return services


def built_from(service: dict[str, Any]) -> Path | None:
    """The Dockerfile a compose service's image is built from, or None (an image pulled as it is)."""
    build = service.get("build")
    if not build:
        return None
    return (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve()


def shipyard_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose_services().items() if built_from(s) is not None}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def healthcheck_test(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    return list(test[1:]) if test[0] in ("CMD", "CMD-SHELL") else list(test)


# -- what a command runs ------------------------------------------------------------------------------
def command_problems(argv: list[str]) -> list[str]:
    """Why ``argv`` is not something the image really provides: a ``python -m`` module that does not
    exist (or a package without ``__main__``), a ``shipyard`` subcommand the CLI lacks, ``python -c``
    code that does not compile or imports what is not there; [] when it is real."""
    if argv[:2] in (["python", "-m"], ["python3", "-m"]):
        return module_problems(argv[2])
    if argv[:2] in (["python", "-c"], ["python3", "-c"]):
        return code_problems(argv[2])
    if argv[0] == "shipyard":
        return cli_problems(argv[1:])
    return [f"{argv[0]!r} is neither python -m, python -c nor shipyard"]


def module_problems(module: str) -> list[str]:
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        return [f"no module {module}"]
    if spec.submodule_search_locations is not None and importlib.util.find_spec(f"{module}.__main__") is None:
        return [f"package {module} has no __main__, so python -m {module} runs nothing"]
    return []


def code_problems(code: str) -> list[str]:
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        return [f"python -c code does not compile: {exc}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [f"no module {a.name}" for a in node.names
                         if importlib.util.find_spec(a.name) is None]
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            problems += [f"{node.module} has no {a.name}" for a in node.names if not hasattr(module, a.name)]
    return problems


def cli_problems(words: list[str]) -> list[str]:
    """Whether ``shipyard <words...>`` names a real command (its options aside)."""
    import typer.main

    from shipyard_cli.main import app

    # Typer's groups (its own copy of click's) hold their subcommands in ``commands``.
    command: Any = typer.main.get_command(app)
    path = ["shipyard"]
    for word in words:
        if word.startswith("-") or not hasattr(command, "commands"):
            break
        if word not in command.commands:
            return [f"{' '.join(path)} has no command {word!r} (it has {sorted(command.commands)})"]
        command, path = command.commands[word], [*path, word]
    if hasattr(command, "commands"):
        return [f"{' '.join(path)} is a group: name one of its commands ({sorted(command.commands)})"]
    return []


def test_the_command_check_catches_what_does_not_exist():
    """The check the tests below rely on fails on a misspelt module, subcommand or import."""
    assert command_problems(["python", "-m", "services.trainer"]) == []
    assert command_problems(["python", "-m", "services.trainr"]) == ["no module services.trainr"]
    assert "no __main__" in command_problems(["python", "-m", "shipyard_common"])[0]
    assert command_problems(["shipyard", "tokens", "hash", "--role", "admin"]) == []
    assert "no command 'tokns'" in command_problems(["shipyard", "tokns", "hash"])[0]
    assert "is a group" in command_problems(["shipyard", "tokens"])[0]
    assert command_problems(["python", "-c", "from shipyard_cli.stack import deployment_served"]) == [
        "shipyard_cli.stack has no deployment_served"]


# -- the Dockerfiles -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_commands_are_what_the_package_provides(path: Path):
    problems = []
    for number, keyword, args in dockerfile(path):
        if keyword in ("CMD", "ENTRYPOINT"):
            argv = argv_of(args)
        elif keyword == "HEALTHCHECK":
            argv = healthcheck_argv(args)
        else:
            continue
        problems += [f"{path.name}:{number} {keyword} {args}: {p}" for p in command_problems(argv)]
    assert not problems, "\n".join(problems)
    assert any(k == "CMD" for _, k, _ in dockerfile(path)), f"{path.name} has no CMD"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_as_a_non_root_user_with_a_healthcheck(path: Path):
    instructions = dockerfile(path)
    users = [(n, args) for n, k, args in instructions if k == "USER"]
    assert users, f"{path.name} has no USER: its processes would run as root"
    number, user = users[-1]
    assert user.split(":")[0] not in ("root", "0"), f"{path.name}:{number} USER {user} is root"
    made = " ".join(args for _, k, args in instructions if k == "RUN")
    assert re.search(rf"useradd\b.*\b{re.escape(user)}\b", made), f"{path.name}: no useradd of {user}"
    checks = [(n, args) for n, k, args in instructions if k == "HEALTHCHECK"]
    assert checks and "NONE" not in checks[-1][1], f"{path.name} has no HEALTHCHECK"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dependencies_are_installed_from_the_lock_before_the_code_is_copied(path: Path):
    instructions = dockerfile(path)
    lock_copy = next((n for n, k, a in instructions
                      if k == "COPY" and "requirements.lock" in a.split()), None)
    assert lock_copy, f"{path.name} never copies requirements.lock"
    installs = [n for n, k, a in instructions
                if k == "RUN" and "pip install" in a and "requirements.lock" in a and n > lock_copy]
    assert installs, f"{path.name}: no RUN pip install with requirements.lock after line {lock_copy}"
    code = [(n, a) for n, k, a in instructions if k == "COPY" and set(a.split()[:-1]) & CODE_DIRS]
    assert code, f"{path.name} copies none of {sorted(CODE_DIRS)}"
    early = [f"{path.name}:{n} COPY {a}" for n, a in code if n < installs[0]]
    why = f"code copied before the dependencies are installed (line {installs[0]})"
    assert not early, "\n".join([why, *early])
    # Every RUN after an ARG sees it: one that changes with each commit, declared before the install,
    # would rebuild the dependency layer each time.
    per_commit = [f"{path.name}:{n} ARG {a}" for n, k, a in instructions
                  if k == "ARG" and re.search(r"COMMIT|REVISION|BUILD_DATE", a) and n < installs[0]]
    assert not per_commit, "\n".join(["declare it after the dependency install:", *per_commit])
    sources = {s for n, k, a in instructions if k == "COPY" for s in a.split()[:-1] if not s.startswith("--")}
    assert sorted(s for s in sources if not (ROOT / s).exists()) == []


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_no_secret_is_baked_into_an_image(path: Path):
    baked = []
    for number, keyword, args in dockerfile(path):
        if keyword not in ("ENV", "ARG"):
            continue
        for name, _ in env_assignments(args):
            if SECRET_NAME.search(name):
                baked.append(f"{path.name}:{number} {keyword} {name}")
    why = "secrets come at run time (compose, Kubernetes secrets), never in an image:"
    assert not baked, "\n".join([why, *baked])


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_env_is_what_the_settings_read(path: Path):
    known = settings_env_names()
    unknown = [f"{path.name}:{n} ENV {name}" for n, k, args in dockerfile(path) if k == "ENV"
               for name, _ in env_assignments(args) if name not in known and name not in OTHER_ENV]
    assert not unknown, "\n".join([UNKNOWN_VARIABLE, *unknown])


def env_assignments(args: str) -> list[tuple[str, str]]:
    """``ENV A=1 B=2`` / ``ARG NAME[=default]`` as (name, value) pairs."""
    pairs = []
    for word in shlex.split(args):
        name, _, value = word.partition("=")
        pairs.append((name, value))
    return pairs


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(path: Path):
    loose = []
    for number, keyword, args in dockerfile(path):
        if keyword != "FROM":
            continue
        image = args.split()[0]
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        if "@sha256:" not in image and not re.match(r"^\d+(\.\d+)+", tag):
            loose.append(f"{path.name}:{number} FROM {image}")
    why = "pin base images by a versioned tag (or digest), never latest or a bare name:"
    assert not loose, "\n".join([why, *loose])


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``relative`` out of the build context (last matching pattern wins; a
    pattern that matches a folder matches what is in it)."""
    ignored = False
    parts = relative.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = re.escape(pattern.lstrip("!").strip("/"))
        regex = regex.replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\[", "[").replace(r"\]", "]")  # [abc]: a character class, as in Go
        if any(re.fullmatch(regex.replace(r"\?", "[^/]"), c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_sends_what_the_images_copy_and_nothing_secret():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = {s for path in DOCKERFILES for n, k, a in dockerfile(path)
              if k == "COPY" for s in a.split()[:-1]}
    assert sorted(s for s in copied if dockerignored(s, patterns)) == []
    assert dockerignored("services/trainer/app.py", patterns) is False
    kept_out = [".git/config", ".venv/bin/python", ".shipyard/shipyard.db", "docker/.env", ".env",
                "services/__pycache__/app.cpython-311.pyc", "tests/conftest.py"]
    assert [p for p in kept_out if not dockerignored(p, patterns)] == []


def image_requirements() -> list[str]:
    """What the images install (docker/requirements.py, which they run), imported from its path."""
    spec = importlib.util.spec_from_file_location("docker_requirements", DOCKER_DIR / "requirements.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    wanted: list[str] = module.requirements(ROOT / "pyproject.toml")
    return wanted


def distribution_closure(requirements: list[str]) -> set[str]:
    """The distributions pip installs for ``requirements`` (with their extras), read from the metadata
    of those installed here (the lock's versions, as in the image)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    extras_of: dict[str, set[str]] = {}
    todo = [Requirement(text) for text in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        first = name not in extras_of
        new = set(requirement.extras) - extras_of.get(name, set())
        if not (first or new):
            continue
        extras_of.setdefault(name, set()).update(new)
        environments = [{"extra": extra} for extra in new] + ([{"extra": ""}] if first else [])
        for text in metadata.distribution(requirement.name).requires or []:
            dependency = Requirement(text)
            if dependency.marker is None:
                wanted = first
            else:
                wanted = any(dependency.marker.evaluate(env) for env in environments)
            if wanted:
                todo.append(dependency)
    return set(extras_of)


def imported_top_modules() -> dict[str, str]:
    """Each third-party top-level module the shipped packages import -> a file that imports it."""
    import sys

    found: dict[str, str] = {}
    for package in sorted(CODE_DIRS):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for top in {name.split(".")[0] for name in names} - CODE_DIRS - sys.stdlib_module_names:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def test_the_images_install_every_module_the_code_imports():
    """A module only the dev extra brings (pytest, tritonclient...) would be missing in the image and
    fail there, at start or on the first request that needs it."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    installed = distribution_closure(image_requirements())
    providers = metadata.packages_distributions()
    missing = [f"{module} (imported by {path})" for module, path in sorted(imported_top_modules().items())
               if not {canonicalize_name(d) for d in providers.get(module, [])} & installed]
    assert "torch" in installed and "mlflow" in installed, "the closure of the requirements is wrong"
    why = "imported by the code, not installed by the images (docker/requirements.py):"
    assert not missing, "\n".join([why, *missing])


# -- compose -------------------------------------------------------------------------------------------
def test_compose_commands_are_what_the_package_provides():
    problems = []
    for name, service in shipyard_services().items():
        argv = [str(word) for word in service.get("command") or []]
        assert argv, f"compose service {name} runs its image's default CMD: name what it runs"
        problems += [f"{name}: command {argv}: {p}" for p in command_problems(argv)]
        test = healthcheck_test(service)
        problems += [f"{name}: healthcheck {test}: {p}" for p in command_problems(test)]
    assert not problems, "\n".join(problems)


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies():
    services = compose_services()
    problems = []
    for name, service in services.items():
        one_shot = service.get("restart", "no") == "no"
        if not one_shot and not (service.get("healthcheck") or {}).get("test"):
            problems.append(f"{name} runs for good but has no healthcheck")
        problems += dependency_problems(name, service, services)
    assert not problems, "\n".join(problems)


def waits_for(name: str, services: dict[str, Any]) -> set[str]:
    """Every service ``name`` waits for, directly or through another."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        for target in services[todo.pop()].get("depends_on") or {}:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_services_start_one_after_another():
    """Each service creates the platform's tables at start (shipyard_common.db), and two CREATE TABLEs
    of one table at once fail in PostgreSQL: of any two, one waits for the other. (A worker creates
    them at its first job, which the trainer, up and healthy by then, has sent it.)"""
    services = compose_services()
    together = [f"{a} and {b}" for i, a in enumerate(SERVICES) for b in SERVICES[i + 1:]
                if a not in waits_for(b, services) and b not in waits_for(a, services)]
    assert not together, "\n".join(["these may start at the same time:", *together])


def dependency_problems(name: str, service: dict[str, Any], services: dict[str, Any]) -> list[str]:
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return [f"{name}: depends_on {depends} is a list: it waits for nothing but the start"]
    problems = []
    for target, rule in depends.items():
        wanted = ("service_completed_successfully" if services[target].get("restart", "no") == "no"
                  else "service_healthy")
        if (rule or {}).get("condition") != wanted:
            problems.append(f"{name}: depends_on {target} needs condition: {wanted}, has {rule}")
    return problems


@pytest.fixture(scope="module")
def service_routes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """The paths each compose service's server really routes: the four services' apps as they are
    built (nothing started: create_app runs no lifespan), MLflow's Flask app, Prefect's API app."""
    from mlflow.server import app as mlflow_app
    from prefect.server.api.server import create_api_app

    state = tmp_path_factory.mktemp("docker-routes")
    platform = test_platform(state, db_url=f"sqlite:///{state / 'shipyard.db'}")
    routes: dict[str, set[str]] = {}
    for name in SERVICES:
        create_app = importlib.import_module(f"services.{name}.app").create_app
        settings_class = getattr(importlib.import_module(f"services.{name}.settings"),
                                 f"{name.capitalize()}Settings")
        app = create_app(settings_class(platform=platform))
        routes[name] = {route.path for route in app.routes if hasattr(route, "path")}
    routes["mlflow"] = {rule.rule for rule in mlflow_app.url_map.iter_rules()}
    # Prefect's server mounts its API app under /api (prefect.server.api.server.create_app).
    routes["prefect"] = {f"/api{r.path}" for r in create_api_app().routes if hasattr(r, "path")}
    return routes


def configured_port(name: str, service: dict[str, Any]) -> int:
    """The port compose makes service ``name`` listen on: its settings' variable, or its command's."""
    env = environment(service)
    argv = [str(word) for word in service.get("command") or []]
    if f"SHIPYARD_{name.upper()}_PORT" in env:
        return int(env[f"SHIPYARD_{name.upper()}_PORT"])
    if "SHIPYARD_WORKER_METRICS_PORT" in env:
        return int(env["SHIPYARD_WORKER_METRICS_PORT"])
    if "--port" in argv:
        return int(argv[argv.index("--port") + 1])
    listen = [w for w in argv if w.startswith("--web.listen-address=")]
    if listen:
        return int(listen[0].rsplit(":", 1)[1])
    if "GF_SERVER_HTTP_PORT" in env:
        return int(env["GF_SERVER_HTTP_PORT"])
    raise AssertionError(f"compose sets no port for {name}: set it, so that the check can be checked")


def routes_of(name: str, service_routes: dict[str, set[str]]) -> set[str]:
    if name in service_routes:
        return service_routes[name]
    if name in DOCUMENTED_ROUTES:
        return DOCUMENTED_ROUTES[name]
    if "SHIPYARD_WORKER_METRICS_PORT" in environment(compose_services()[name]):
        return {"/metrics"}  # the worker's prometheus_client endpoint (services.trainer.worker.metrics)
    raise AssertionError(f"no route table known for compose service {name}")


def test_healthchecks_call_a_route_the_service_has_on_its_port(service_routes: dict[str, set[str]]):
    problems = []
    for name, service in compose_services().items():
        urls = URL_IN_TEXT.findall(" ".join(healthcheck_test(service)))
        if not urls:
            continue
        url = urlsplit(urls[0])
        if url.hostname not in LOOPBACK:
            problems.append(f"{name}: healthcheck {urls[0]} is not this container (127.0.0.1)")
        if url.port != configured_port(name, service):
            problems.append(f"{name}: healthcheck port {url.port}, but it listens on "
                            f"{configured_port(name, service)}")
        if url.path not in routes_of(name, service_routes):
            problems.append(f"{name}: healthcheck path {url.path} is no route of its server")
    assert not problems, "\n".join(problems)


def test_services_listen_where_the_others_look_for_them():
    services = compose_services()
    problems = []
    for name in SERVICES:
        env = environment(services[name])
        if env.get(f"SHIPYARD_{name.upper()}_HOST") != "0.0.0.0":
            problems.append(f"{name}: SHIPYARD_{name.upper()}_HOST must be 0.0.0.0 in a container")
        url = urlsplit(env[f"SHIPYARD_{name.upper()}_URL"])
        if (url.hostname, url.port) != (name, configured_port(name, services[name])):
            problems.append(f"{name}: SHIPYARD_{name.upper()}_URL {url.geturl()} is not {name}:its port")
    assert not problems, "\n".join(problems)


def seconds(duration: str) -> float:
    """A compose duration (``45s``, ``1m30s``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(number) * units[unit] for number, unit in parts)


def test_serving_has_the_time_to_drain_when_stopped():
    """``docker compose stop`` sends SIGTERM, then SIGKILL after stop_grace_period (10 s by default):
    serving needs its drain and its requests' shutdown time before that."""
    from services.serving.settings import ServingSettings

    serving = compose_services()["serving"]
    fields = ServingSettings.model_fields
    env = environment(serving)
    drain = float(env.get("SHIPYARD_SERVING_DRAIN_GRACE_S", fields["drain_grace_s"].default))
    finish = float(env.get("SHIPYARD_SERVING_SHUTDOWN_TIMEOUT_S", fields["shutdown_timeout_s"].default))
    grace = seconds(str(serving.get("stop_grace_period", "10s")))
    assert grace > drain + finish, f"stop_grace_period {grace}s <= drain {drain}s + shutdown {finish}s"


def test_pulled_images_are_pinned():
    loose = [f"{name}: image {s['image']}" for name, s in compose_services().items()
             if built_from(s) is None and not re.search(r":v?\d+(\.\d+)+[^:/]*$|@sha256:", s["image"])]
    assert not loose, "\n".join(["pin images by a versioned tag (or digest), never latest:", *loose])


def image_default_port(path: Path, argv: list[str]) -> int:
    """The port the image's default CMD listens on: a service's settings default, or the worker's
    metrics port from the image's ENV."""
    module = argv[2]
    if module == "services.trainer.worker":
        env = {name: value for _, k, args in dockerfile(path) if k == "ENV"
               for name, value in env_assignments(args)}
        return int(env["SHIPYARD_WORKER_METRICS_PORT"])
    name = module.split(".")[1]
    settings = getattr(importlib.import_module(f"{module}.settings"), f"{name.capitalize()}Settings")
    port: int = settings.model_fields["port"].default
    return port


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_healthcheck_calls_its_default_command_on_its_port(
    path: Path, service_routes: dict[str, set[str]]
):
    instructions = dockerfile(path)
    argv = argv_of([a for _, k, a in instructions if k == "CMD"][-1])
    check = healthcheck_argv([a for _, k, a in instructions if k == "HEALTHCHECK"][-1])
    url = urlsplit(URL_IN_TEXT.findall(" ".join(check))[0])
    assert url.hostname in LOOPBACK, f"{path.name}: HEALTHCHECK {url.geturl()} is not this container"
    assert url.port == image_default_port(path, argv), f"{path.name}: HEALTHCHECK port is not {argv}'s"
    name = argv[2].split(".")[1]
    routes = {"/metrics"} if argv[2] == "services.trainer.worker" else service_routes[name]
    assert url.path in routes, f"{path.name}: {url.path} is no route of {argv[2]}"


def test_compose_sets_only_variables_the_settings_read():
    known = settings_env_names()
    unknown = [f"{name}: {var}" for name, service in compose_services().items()
               for var in environment(service)
               if not (var in known or var in OTHER_ENV)]
    assert not unknown, "\n".join([UNKNOWN_VARIABLE, *unknown])


def test_the_gpu_worker_runs_under_the_gpu_profile_on_an_nvidia_gpu():
    worker = compose_services()["gpu-worker"]
    assert worker.get("profiles") == ["gpu"]
    assert built_from(worker) == DOCKER_DIR / "Dockerfile.gpu"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    argv = worker["command"]
    assert argv[argv.index("--queues") + 1] == "gpu"
    cpu = compose_services()["worker"]["command"]
    assert cpu[cpu.index("--queues") + 1] == "cpu" and "profiles" not in compose_services()["worker"]


def named_volume_at(service: dict[str, Any], target: str) -> str | None:
    for mount in service.get("volumes") or []:
        source, _, rest = str(mount).partition(":")
        if rest.split(":")[0] == target and not source.startswith((".", "/")):
            return source
    return None


def test_state_lives_in_named_volumes():
    services = compose_services()
    declared = set(compose().get("volumes") or {})
    mlflow = [str(w) for w in services["mlflow"]["command"]]
    wanted = {("postgres", "/var/lib/postgresql/data"),
              ("mlflow", mlflow[mlflow.index("--artifacts-destination") + 1])}
    wanted |= {(name, environment(s)["SHIPYARD_STATE_DIR"]) for name, s in shipyard_services().items()
               if "SHIPYARD_STATE_DIR" in environment(s)}
    missing = [f"{name}: nothing at {target}" for name, target in sorted(wanted)
               if named_volume_at(services[name], target) not in declared]
    why = "state on the container's own layer is lost with the container:"
    assert not missing, "\n".join([why, *missing])


def test_bind_mounts_exist():
    missing = [f"{name}: {mount}" for name, service in compose_services().items()
               for mount in service.get("volumes") or []
               if str(mount).startswith(".") and not (DOCKER_DIR / str(mount).split(":")[0]).exists()]
    assert not missing, "\n".join(missing)


def test_no_secret_is_written_in_compose():
    problems = []
    for name, service in compose_services().items():
        for var, value in environment(service).items():
            if SECRET_NAME.search(var) and not REQUIRED_VAR.match(value):
                problems.append(f"{name}: {var} must be ${{VAR:?message}} (from docker/.env), not {value!r}")
        for word in map(str, service.get("command") or []):
            if re.search(r"://[^/@\s]+:[^/@\s]+@", word):
                problems.append(f"{name}: a password in {word.split('@')[-1]}'s URL")
        urls = URL_IN_TEXT.findall(json.dumps(environment(service)))
        problems += [f"{name}: {u} holds a password" for u in urls if urlsplit(u).password]
    assert not problems, "\n".join(problems)


def test_env_example_names_every_required_variable_and_holds_no_value():
    example = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                   if line and not line.startswith("#"))
    lines = COMPOSE_FILE.read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    required = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):\?", text))
    assert "POSTGRES_PASSWORD" in required, "the parse of docker/compose.yaml found no required variable"
    assert sorted(required - set(example)) == [], "docker/env.example must say what to set"
    assert {k: v for k, v in example.items() if v} == {}, "docker/env.example holds values"


# -- Prometheus and Grafana in compose ---------------------------------------------------------------
def mounted(service: dict[str, Any], target: str) -> Path:
    for mount in service.get("volumes") or []:
        source, _, rest = str(mount).partition(":")
        if rest.split(":")[0] == target:
            return (DOCKER_DIR / source).resolve()
    raise AssertionError(f"nothing is mounted at {target}")


def compose_prometheus_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((DOCKER_DIR / "prometheus" / "prometheus.yml").read_text())
    return config


def test_prometheus_scrapes_the_compose_services_with_the_shipped_rules():
    config = compose_prometheus_config()
    template = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"] for j in config["scrape_configs"]}
    assert jobs == {j["job_name"] for j in template["scrape_configs"]}, "the alerts and dashboards use these"
    services = compose_services()
    prometheus = services["prometheus"]
    rules = mounted(prometheus, "/etc/prometheus/rules")
    assert rules == (PROMETHEUS_DIR / "rules").resolve()
    for rule_file in config["rule_files"]:
        assert (rules / Path(rule_file).relative_to("/etc/prometheus/rules")).is_file(), rule_file
    for job in config["scrape_configs"]:
        for target in scrape_targets(job):
            host, port = target.rsplit(":", 1)
            name = "prometheus" if host == "localhost" else host
            assert int(port) == configured_port(name, services[name]), f"{job['job_name']}: {target}"


def scrape_targets(job: dict[str, Any]) -> list[str]:
    static = [t for c in job.get("static_configs", []) for t in c["targets"]]
    dns = [f"{n}:{c['port']}" for c in job.get("dns_sd_configs", []) for n in c["names"]]
    return static + dns


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_compose_prometheus_config(tmp_path: Path):
    config = compose_prometheus_config()
    config["rule_files"] = [str(PROMETHEUS_DIR / "rules" / Path(f).name) for f in config["rule_files"]]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_grafana_is_provisioned_from_infra_grafana():
    services = compose_services()
    grafana = services["grafana"]
    env = environment(grafana)
    provisioning = mounted(grafana, env["GF_PATHS_PROVISIONING"])
    assert provisioning == (ROOT / "infra" / "grafana" / "provisioning").resolve()
    assert mounted(grafana, env["SHIPYARD_GRAFANA_DASHBOARDS"]) == (ROOT / "infra" / "grafana" / "dashboards")
    prometheus = urlsplit(env["SHIPYARD_PROMETHEUS_URL"])
    assert prometheus.hostname == "prometheus"
    assert prometheus.port == configured_port("prometheus", services["prometheus"])
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
