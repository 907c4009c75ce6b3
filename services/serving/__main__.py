import logging
import os
from typing import Any

from services.serving.app import configure_process, create_app
from services.serving.fastlane.uvicorn_protocol import UVICORN_VERSION, FastLaneHttpProtocol, bound_uvicorn
from services.serving.settings import ServingSettings
from shipyard_common.runner import serve

if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    settings = ServingSettings()
    configure_process(settings)
    # SIGTERM: not ready for drain_grace_s while still answering, then in-flight requests finish.
    # Several workers: each process builds the app from the factory (settings from the environment).
    # The fast lane's predict requests are answered inside uvicorn's HTTP protocol (fastlane/), but
    # only on the uvicorn release that protocol was written against; elsewhere the ASGI lane does.
    http: Any = "auto"
    if settings.fast_lane:
        if bound_uvicorn():
            http = FastLaneHttpProtocol
        else:
            logging.getLogger("shipyard.serving").warning(
                "uvicorn is not %s: predictions take the fast lane's ASGI path", UVICORN_VERSION)
    serve("serving", settings, create_app, drain_grace_s=settings.drain_grace_s,
          shutdown_timeout_s=settings.shutdown_timeout_s, workers=settings.workers,
          app_factory="services.serving.app:create_app_from_env", http=http)
