from services.registry.app import create_app
from services.registry.settings import RegistrySettings
from shipyard_common.runner import serve

if __name__ == "__main__":
    # MLflow's client limits (a prompt 503 while MLflow is down) come from the platform's settings:
    # create_app applies them (shipyard_common.mlflow_client).
    serve("registry", RegistrySettings(), create_app)
