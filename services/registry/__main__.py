import os

from services.registry.app import create_app
from services.registry.settings import RegistrySettings
from shipyard_common.runner import serve

if __name__ == "__main__":
    # MLflow's client retries for minutes by default; an API caller is better served by a
    # prompt 503 while MLflow is down than by a request that hangs.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    serve("registry", RegistrySettings(), create_app)
