"""``GET /v1/models[/{name}]``: the status of each served model, its canary and shadow included."""

from __future__ import annotations

from services.serving.api.schemas import ModelStatusPublic
from services.serving.core.dataplane import DataPlane, model_state
from services.serving.core.loaded import ModelState
from services.serving.core.routing import (
    alias_status,
    version_status,
)
from services.serving.runtimes.base import Runtime
from services.serving.runtimes.loader import input_limits


def _runtime_threads(runtime: Runtime) -> int | None:
    threads = getattr(runtime, "threads", None)
    return threads if isinstance(threads, int) else None


def _status_public(state: ModelState) -> ModelStatusPublic:
    served = state.served
    signature = served.signature if served else None
    first_input = signature.inputs[0] if signature else None
    limits = input_limits(served.signature, served.text) if served else {}
    return ModelStatusPublic(
        name=state.name,
        version=served.version if served else None,
        status=state.status,
        target_version=state.target_version,
        error=state.error,
        failed_version=state.failed_version,
        loaded_at=served.loaded_at if served else None,
        format=served.runtime.format if served else None,
        platform=served.runtime.platform if served else None,
        runtime_threads=_runtime_threads(served.runtime) if served else None,
        input_name=first_input.name if first_input else None,
        output_name=signature.outputs[0].name if signature else None,
        n_features=(
            first_input.shape[1] if first_input is not None and len(first_input.shape) == 2 else None
        ),
        inputs=[s.to_json() for s in signature.inputs] if signature else None,
        outputs=[s.to_json() for s in signature.outputs] if signature else None,
        labels=list(signature.labels) if signature and signature.labels else None,
        features=list(signature.features) if signature and signature.features else None,
        columns=served.columns if served else None,
        text=limits.get("text"),
        sequence=limits.get("sequence"),
        model_version_status=version_status(state),
        **alias_status(state),
    )


def list_models(*, dataplane: DataPlane) -> list[ModelStatusPublic]:
    return [_status_public(state) for state in dataplane.models.states()]


def get_model(*, dataplane: DataPlane, name: str) -> ModelStatusPublic:
    return _status_public(model_state(dataplane, name))
