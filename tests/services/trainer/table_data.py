"""A real-world table (issue 16, "Real-world tables"), generated in the tests: breast_cancer with a binned
string column (``size``, with holes), a random categorical column (``city``, declared embedded), holes in
two numeric columns, and a category (``grade`` ``"rare"``) that only the test rows hold; ``part`` splits
it (train, validation, test)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.datasets import load_breast_cancer

from tests.services.trainer.support import job_spec

DECLARED = {"city": {"type": "categorical", "encoding": "embedding", "embedding_dim": 3},
            "mean texture": {"type": "numeric", "impute": "median"}}


def table_frame() -> pd.DataFrame:
    frame = load_breast_cancer(as_frame=True).frame
    rng = np.random.default_rng(0)
    positions = np.arange(len(frame))
    frame["part"] = np.where(positions % 5 == 0, "test", np.where(positions % 5 == 1, "validation", "train"))
    size = pd.cut(frame["mean radius"], [0, 12, 15, 100], labels=["small", "medium", "large"]).astype(object)
    frame["size"] = size.where(rng.random(len(frame)) > 0.1, None)
    frame["city"] = rng.choice(["paris", "lyon", "nice", "lille"], len(frame))
    frame["grade"] = np.where(frame["part"] == "test", rng.choice(["a", "rare"], len(frame)), "a")
    frame.loc[rng.random(len(frame)) < 0.1, "mean texture"] = np.nan
    frame.loc[rng.random(len(frame)) < 0.1, "worst area"] = np.nan
    return frame


def table_job_spec(*, rev: str, model_name: str, dataset: str = "tables", **changes: Any) -> dict[str, Any]:
    """A job on :func:`table_frame`'s rows: split by ``part``, the columns :data:`DECLARED`."""
    return job_spec(rev=rev, dataset=dataset, model_name=model_name,
                    **{"data__split": {"column": "part"}, "data__columns": DECLARED, **changes})
