from services.monitor.app import create_app
from services.monitor.settings import MonitorSettings
from shipyard_common.runner import serve

if __name__ == "__main__":
    serve("monitor", MonitorSettings(), create_app)
