"""Running a service process: settings from the environment, logging, uvicorn."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shipyard_common.logging import configure_logging
from shipyard_common.settings import ServiceSettings, disable_telemetry


def serve(
    service: str,
    settings: ServiceSettings,
    create_app: Callable[[Any], Any],
    **uvicorn_options: Any,
) -> None:
    import uvicorn

    disable_telemetry()
    configure_logging(service, level=settings.platform.log_level, json_lines=settings.platform.log_json)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        **uvicorn_options,
    )
