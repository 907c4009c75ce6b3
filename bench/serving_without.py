"""``python -m services.serving`` with some of serving's features replaced by no-ops, for the
``bound`` target of ``bench/serving.py``: what a request costs over sockets without them.

``BENCH_WITHOUT`` names them (``log,metrics,validation,auth``; see ``serving_hotpath.without``). A
measurement, never a way to run serving: nothing it answers is logged, counted or checked.
"""

import os
import runpy
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

from serving_hotpath import FEATURES, without  # noqa: E402

if __name__ == "__main__":
    features = {name for name in os.environ.get("BENCH_WITHOUT", ",".join(FEATURES)).split(",") if name}
    without(features)
    runpy.run_module("services.serving", run_name="__main__", alter_sys=True)
