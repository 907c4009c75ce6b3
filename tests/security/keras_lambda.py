"""A Keras model with a Lambda layer that creates a marker file when its code runs, loaded by the
trainer's resume path; run as a script, in its own process, so that Keras and TensorFlow stay out
of the test process.

    python -m tests.security.keras_lambda FOLDER MARKER

Prints one JSON line: whether the trainer's ``load_resume`` loaded it, whether the marker exists
after that, and (the control, proving the payload is live) whether loading it with
``safe_mode=False`` and calling it created the marker.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

MARKER_ENV = "SHIPYARD_SECURITY_MARKER"


def build(folder: Path) -> None:
    """``last.keras`` (a Lambda that touches $SHIPYARD_SECURITY_MARKER when set) and a valid
    ``state.json``, as a lost worker's checkpoint folder holds them."""
    import keras

    from services.trainer.engines.keras_checkpoint import (
        CHECKPOINT_MODEL,
        CHECKPOINT_STATE,
        CHECKPOINT_VERSION,
    )
    from services.trainer.engines.keras_setup import backend_name

    # A lambda, not a def: Keras stores a lambda's bytecode (a def only by name), and runs it on
    # load. Names spelt out: the bytecode runs with other globals than this module's.
    payload = keras.layers.Lambda(lambda x: (
        __import__("pathlib").Path(__import__("os").environ["SHIPYARD_SECURITY_MARKER"]).touch()
        if "SHIPYARD_SECURITY_MARKER" in __import__("os").environ else None, x)[1])
    model = keras.Sequential([keras.Input(shape=(2,)), payload, keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / CHECKPOINT_MODEL)
    state = {"version": CHECKPOINT_VERSION, "backend": backend_name(), "step": 0}
    (folder / CHECKPOINT_STATE).write_text(json.dumps(state))


def main(folder: Path, marker: Path) -> dict[str, Any]:
    import keras
    import numpy as np

    from services.trainer.engines.keras_checkpoint import CHECKPOINT_MODEL, load_resume

    os.environ.pop(MARKER_ENV, None)
    build(folder)
    os.environ[MARKER_ENV] = str(marker)
    resumed = load_resume(SimpleNamespace(resume_dir=folder))  # type: ignore[arg-type]
    after_platform = marker.exists()
    unsafe = keras.saving.load_model(folder / CHECKPOINT_MODEL, safe_mode=False)
    unsafe(np.zeros((1, 2), dtype="float32"))
    return {"loaded": resumed is not None, "marker_after_platform": after_platform,
            "marker_after_unsafe_load": marker.exists()}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]))))
