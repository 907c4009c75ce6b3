"""Where a version's files are: only its own run's artifacts may be given an alias.

Serving downloads whatever a version's ``source`` names. A version registered straight in MLflow
with ``source`` ``file:///etc``, ``http://169.254.169.254/latest/meta-data/`` or another run's
folder would, once promoted, have serving copy the host's files, call the cloud metadata service or
serve a model nobody trained for it. The trainer registers ``runs:/<its run>/model``; tests and
older versions name the run's artifact URI itself. Anything else is refused before an alias moves.
"""

from __future__ import annotations

from urllib.parse import unquote

from services.registry.core.store import Store, VersionRecord, mlflow_errors
from shipyard_common.errors import InvalidInput


def _under(source: str, prefix: str) -> bool:
    """Whether ``source`` is ``prefix`` or a path below it, with no ``..`` climbing back out
    (spelt plainly, percent-encoded or with backslashes)."""
    if source == prefix:
        return True
    if not source.startswith(prefix + "/"):
        return False
    rest = unquote(unquote(source[len(prefix) + 1 :])).replace("\\", "/")
    return ".." not in rest.split("/")


def run_artifacts(store: Store, run_id: str) -> str:
    """The artifact URI of run ``run_id`` (its folder in MLflow's artifact store)."""
    with mlflow_errors(f"run {run_id} is gone", store.tracking_uri):
        return str(store.client.get_run(run_id).info.artifact_uri).rstrip("/")


def check_source(store: Store, version: VersionRecord) -> None:
    """Refuse (400) ``version`` unless its files are its own run's artifacts."""
    source, run_id = version.source or "", version.run_id
    what = f"{version.name} v{version.version}"
    if not run_id:
        raise InvalidInput(f"{what} was not registered from a run (its files are at {source!r}); only a "
                           "run's own model can be given an alias")
    if _under(source, f"runs:/{run_id}"):
        return
    artifacts = run_artifacts(store, run_id)
    if _under(source, artifacts):
        return
    raise InvalidInput(
        f"{what}'s files are at {source!r}, outside its run's artifacts ({artifacts}); serving would "
        "read them from there, so it cannot be given an alias. Register the run's own model folder."
    )
