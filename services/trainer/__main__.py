from services.trainer.app import create_app
from services.trainer.settings import TrainerSettings
from shipyard_common.runner import serve

if __name__ == "__main__":
    serve("trainer", TrainerSettings(), create_app)
