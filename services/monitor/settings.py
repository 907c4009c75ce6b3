from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from shipyard_common.settings import ServiceSettings

MAX_WINDOW = 100_000


class WindowSpec(BaseModel):
    """How one model's predictions are cut into windows: every ``rows`` rows, or every ``seconds``."""

    rows: int | None = Field(default=None, ge=1, le=MAX_WINDOW)
    seconds: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _exactly_one(self) -> WindowSpec:
        if (self.rows is None) == (self.seconds is None):
            raise ValueError("a window is either {'rows': N} or {'seconds': S}, exactly one of them")
        return self


class MonitorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SHIPYARD_MONITOR_", extra="ignore")

    port: int = 8004
    # Windows: every model by ``window`` unless ``windows`` names it (JSON: {"iris": {"seconds": 3600}}).
    window: WindowSpec = Field(default_factory=lambda: WindowSpec(rows=500))
    windows: dict[str, WindowSpec] = Field(default_factory=dict)
    # A window with fewer rows is reported (status too_few_rows), not tested: K-S on a handful of
    # rows calls anything drifted.
    min_rows: int = Field(default=30, ge=1)
    # How often the background loop closes windows, scores feedback and checks the policies.
    loop_interval_s: float = Field(default=10, gt=0)
    # Evidently's own default (0.5) needs half of all features to move before it calls the
    # dataset drifted; on a 30-feature model that hides a shift of 8 features, which is the
    # kind of change worth an alert. A quarter still needs several independent K-S rejections.
    drift_share: float = Field(default=0.25, gt=0, le=1)
    # The prediction log is written a moment after the answer (the serving shipper's lag); a window
    # takes only rows answered at least this long ago, so that late rows are not left out of it.
    window_grace_s: float = Field(default=5.0, ge=0)
    # The most windows one (model, version) closes per pass: a backlog is caught up over passes.
    max_windows_per_pass: int = Field(default=10, ge=1)
    # Drift methods and thresholds: Evidently's choice per column unless one is set here (any name
    # Evidently knows: "ks", "wasserstein", "psi", "jensenshannon", "chisquare", "z" …).
    num_method: str | None = None
    cat_method: str | None = None
    num_threshold: float | None = Field(default=None, gt=0)
    cat_threshold: float | None = Field(default=None, gt=0)
    reference_cache_size: int = Field(default=16, ge=1)
    report_dir: Path | None = Field(default=None, description="Reports; under state_dir if unset.")
    # Evidently's report of each ok window is kept on disk, the newest ``reports_keep`` per model.
    reports_keep: int = Field(default=500, ge=1)
    # The token the monitor starts retraining with (the trainer's POST /pipelines/retrain/runs).
    trainer_token: SecretStr | None = None

    def window_for(self, model: str) -> WindowSpec:
        return self.windows.get(model, self.window)

    @property
    def report_path(self) -> Path:
        return (self.report_dir or self.platform.state_dir / "monitor" / "reports").resolve()
