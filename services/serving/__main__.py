import os

from services.serving.app import create_app
from services.serving.settings import ServingSettings
from shipyard_common.runner import serve

if __name__ == "__main__":
    # MLflow's client retries for minutes by default; the reconcile loop retries on its own timer.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    serve("serving", ServingSettings(), create_app)
