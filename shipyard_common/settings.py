"""Settings shared by every service, read from ``SHIPYARD_*`` environment variables.

Each service has its own ``Settings`` class with its own prefix (``SHIPYARD_TRAINER_`` …)
and holds a :class:`PlatformSettings` for what all services must agree on: where the state,
database, Redis and MLflow are, and which tokens exist.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shipyard_common.auth import Grant, Role, TokenTable, token_key
from shipyard_common.oidc import OidcSettings

log = logging.getLogger("shipyard.settings")

DEV_ADMIN_TOKEN = "dev-admin-token"
# Two more people for trying governed promotion on a laptop: one asks, the other approves.
DEV_TRAINER_TOKEN = "dev-trainer-token"
DEV_APPROVER_TOKEN = "dev-approver-token"
# Their holders' names show no part of the tokens (every viewer reads them in the audit).
DEFAULT_DEV_TOKENS: dict[str, Role | Grant] = {
    DEV_ADMIN_TOKEN: Grant(role=Role.ADMIN, name="carol"),
    DEV_TRAINER_TOKEN: Grant(role=Role.TRAINER, name="alice"),
    DEV_APPROVER_TOKEN: Grant(role=Role.APPROVER, name="bob"),
}

# Under the state directory: MLflow's auth configuration, its users' database and generated secrets.
MLFLOW_AUTH_DIR = "mlflow-auth"

# Nothing in Shipyard may phone home; every process we start inherits these.
NO_TELEMETRY_ENV = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
}


def disable_telemetry() -> None:
    for key, value in NO_TELEMETRY_ENV.items():
        os.environ.setdefault(key, value)


class PlatformSettings(BaseSettings):
    """What every Shipyard process must agree on."""

    # Errors never echo their input: SHIPYARD_TOKENS may hold tokens in clear.
    model_config = SettingsConfigDict(env_prefix="SHIPYARD_", extra="ignore", hide_input_in_errors=True)

    env: Literal["dev", "test", "prod"] = "dev"
    state_dir: Path = Path(".shipyard")
    db_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite under state_dir when unset.")
    redis_url: str = "redis://127.0.0.1:6379/0"
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    # Every MLflow client in the platform (shipyard_common.mlflow_client.apply_mlflow_client_limits):
    # a call that MLflow does not answer fails within about (retries + 1) × timeout, not minutes.
    mlflow_request_timeout_s: int = Field(
        default=10, ge=1, le=600,
        description="Seconds one MLflow request waits to connect, then for an answer.",
    )
    mlflow_request_retries: int = Field(
        default=2, ge=0, le=10,
        description="Retries of an MLflow request refused, timed out or answered 5xx.",
    )
    mlflow_request_backoff_s: int = Field(
        default=1, ge=0, le=120, description="MLflow's backoff factor between those retries (seconds).",
    )
    # MLflow's own authentication (its basic-auth app): every platform process signs in with these;
    # nobody else holds an MLflow account, so an alias cannot be moved behind the registry's back.
    mlflow_auth: bool | None = Field(
        default=None,
        description="Run MLflow with its basic-auth app (shipyard up); unset: on, except SHIPYARD_ENV=test.",
    )
    mlflow_username: str = Field(
        default="shipyard", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
        description="The MLflow user the platform's services sign in as (MLflow's admin).",
    )
    mlflow_password: SecretStr | None = Field(
        default=None, description="Its password (at least 12 characters); or mlflow_password_file.",
    )
    mlflow_password_file: Path | None = Field(
        default=None, description="A file holding the password (a mounted secret), read when used.",
    )
    # Held hashed (shipyard_common.auth.TokenTable): no process keeps a clear token after it starts.
    tokens: TokenTable = Field(
        default_factory=lambda: TokenTable.from_config(DEFAULT_DEV_TOKENS),
        description='JSON object. Key: the token\'s hash "sha256:<64 hex>" (shipyard tokens hash), or the '
        'token in clear (hashed as it is read); value: a role ("approver") or {"role": "approver", '
        '"name": "bob"}. Or key: a name, value: {"role": "approver", "file": "/run/secrets/bob"} or '
        '{"role": "approver", "env": "BOB_TOKEN"}, a token read at start.',
    )
    oidc: OidcSettings = Field(
        default_factory=OidcSettings,
        description="Optional: JWTs an identity provider signs, as bearer tokens (SHIPYARD_OIDC_*).",
    )
    events_channel: str = "shipyard.events"
    log_level: str = "INFO"
    log_json: bool = True

    trainer_url: str = "http://127.0.0.1:8001"
    registry_url: str = "http://127.0.0.1:8002"
    serving_url: str = "http://127.0.0.1:8003"
    monitor_url: str = "http://127.0.0.1:8004"
    prefect_api_url: str = Field(default="http://127.0.0.1:4200/api", description="Prefect server's API.")

    data_repo: Path | None = Field(default=None, description="DVC repository; under state_dir.")
    dvc_remote: Path | None = Field(default=None, description="DVC remote folder.")
    # An S3-compatible bucket as the DVC remote instead of the folder (set the bucket to use it).
    # The credentials reach DVC through the data repository's .dvc/config.local, never a commit.
    dvc_s3_bucket: str | None = None
    dvc_s3_prefix: str = "shipyard-data"
    dvc_s3_endpoint_url: str | None = Field(default=None, description="e.g. a MinIO or Ceph gateway.")
    dvc_s3_access_key_id: str | None = None
    dvc_s3_secret_access_key: SecretStr | None = None
    dvc_s3_region: str | None = None

    @model_validator(mode="after")
    def _refuse_default_secrets_outside_dev(self) -> PlatformSettings:
        if self.env != "dev" and any(token_key(token) in self.tokens for token in DEFAULT_DEV_TOKENS):
            raise ValueError(
                "the built-in development token is only allowed with SHIPYARD_ENV=dev; "
                "set SHIPYARD_TOKENS to your own tokens"
            )
        return self

    @model_validator(mode="after")
    def _warn_of_clear_tokens_in_production(self) -> PlatformSettings:
        # Names only (a bare role's is role:<role>#<8 hex of its hash>), never a token.
        if self.env == "prod" and self.tokens.clear:
            log.warning(
                "SHIPYARD_TOKENS holds %d token(s) in clear (%s): give their hashes instead "
                "('shipyard tokens hash' prints one) or read them from a secret "
                '({"role": ..., "file": "/run/secrets/..."} or {"role": ..., "env": "VAR"})',
                len(self.tokens.clear), ", ".join(self.tokens.clear),
            )
        return self

    @property
    def database_url(self) -> str:
        if self.db_url:
            return self.db_url
        return f"sqlite:///{self.state_dir.resolve() / 'shipyard.db'}"

    @property
    def mlflow_auth_enabled(self) -> bool:
        """Whether MLflow runs with its basic-auth app: ``mlflow_auth``, else on outside tests."""
        return self.mlflow_auth if self.mlflow_auth is not None else self.env != "test"

    def mlflow_credentials(self) -> tuple[str, str] | None:
        """(username, password) for MLflow, or None when none is configured.

        The password comes from ``mlflow_password``, else ``mlflow_password_file``, else the one
        ``shipyard up`` generated for this state directory (:func:`generated_mlflow_password_path`),
        so that a service or command started by hand on the same state directory signs in too.
        """
        if self.mlflow_password is not None:
            return self.mlflow_username, self.mlflow_password.get_secret_value()
        generated = generated_mlflow_password_path(self.state_dir)
        for path in (self.mlflow_password_file, generated):
            if path is not None and path.is_file():
                return self.mlflow_username, path.read_text().strip()
        return None

    @property
    def data_repo_path(self) -> Path:
        return (self.data_repo or self.state_dir / "data").resolve()

    @property
    def dvc_remote_path(self) -> Path:
        return (self.dvc_remote or self.state_dir / "dvc-remote").resolve()

    def as_env(self) -> dict[str, str]:
        """The environment that makes a child process see these same settings."""
        import json

        env = {
            "SHIPYARD_ENV": self.env,
            "SHIPYARD_STATE_DIR": str(self.state_dir.resolve()),
            "SHIPYARD_DB_URL": self.database_url,
            "SHIPYARD_REDIS_URL": self.redis_url,
            "SHIPYARD_MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
            "SHIPYARD_MLFLOW_REQUEST_TIMEOUT_S": str(self.mlflow_request_timeout_s),
            "SHIPYARD_MLFLOW_REQUEST_RETRIES": str(self.mlflow_request_retries),
            "SHIPYARD_MLFLOW_REQUEST_BACKOFF_S": str(self.mlflow_request_backoff_s),
            # By hash: a child never sees a token in clear (a model_copy may have put a plain dict here).
            "SHIPYARD_TOKENS": json.dumps(TokenTable(self.tokens).as_config()),
            "SHIPYARD_EVENTS_CHANNEL": self.events_channel,
            "SHIPYARD_LOG_LEVEL": self.log_level,
            "SHIPYARD_LOG_JSON": "true" if self.log_json else "false",
            "SHIPYARD_TRAINER_URL": self.trainer_url,
            "SHIPYARD_REGISTRY_URL": self.registry_url,
            "SHIPYARD_SERVING_URL": self.serving_url,
            "SHIPYARD_MONITOR_URL": self.monitor_url,
            "SHIPYARD_DATA_REPO": str(self.data_repo_path),
            "SHIPYARD_DVC_REMOTE": str(self.dvc_remote_path),
            "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
            "SHIPYARD_PREFECT_API_URL": self.prefect_api_url,
            "PREFECT_API_URL": self.prefect_api_url,
        }
        s3 = {
            "SHIPYARD_DVC_S3_BUCKET": self.dvc_s3_bucket,
            "SHIPYARD_DVC_S3_PREFIX": self.dvc_s3_prefix if self.dvc_s3_bucket else None,
            "SHIPYARD_DVC_S3_ENDPOINT_URL": self.dvc_s3_endpoint_url,
            "SHIPYARD_DVC_S3_ACCESS_KEY_ID": self.dvc_s3_access_key_id,
            "SHIPYARD_DVC_S3_SECRET_ACCESS_KEY": (
                self.dvc_s3_secret_access_key.get_secret_value() if self.dvc_s3_secret_access_key else None
            ),
            "SHIPYARD_DVC_S3_REGION": self.dvc_s3_region,
        }
        env.update({key: value for key, value in s3.items() if value})
        env.update(self.oidc.as_env())
        env.update(self._mlflow_auth_env())
        env.update(NO_TELEMETRY_ENV)
        return env

    def _mlflow_auth_env(self) -> dict[str, str]:
        """MLflow's credentials as the platform's settings and as MLflow's client reads them."""
        env = {"SHIPYARD_MLFLOW_USERNAME": self.mlflow_username}
        if self.mlflow_auth is not None:
            env["SHIPYARD_MLFLOW_AUTH"] = "true" if self.mlflow_auth else "false"
        credentials = self.mlflow_credentials()
        if credentials is not None:
            env["SHIPYARD_MLFLOW_PASSWORD"] = credentials[1]
            env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = credentials
        return env


def generated_mlflow_password_path(state_dir: Path) -> Path:
    """Where ``shipyard up`` keeps the MLflow password it generated for ``state_dir`` (mode 0600)."""
    return state_dir.resolve() / MLFLOW_AUTH_DIR / "password"


class ServiceSettings(BaseSettings):
    """Base of each service's settings: where it listens, plus the platform settings."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    platform: PlatformSettings = Field(default_factory=PlatformSettings)

    # The edge (shipyard_common.edge): what a request must pass before routing, auth and parsing.
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1,
        description="Largest request body; a larger one is answered 413 before it is read.",
    )
    max_json_depth: int = Field(default=64, ge=0, description="Deepest JSON nesting accepted (400); 0: any.")
    max_json_values: int = Field(
        default=1_000_000, ge=0, description="Most values in one JSON body (400); 0: any."
    )
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1", "::1"],
        description='Host headers answered (JSON list; "*.example.com", "*" for any), besides the '
        "service's own host and its URL in the platform settings; others are answered 400.",
    )
    cors_allowed_origins: list[str] = Field(
        default_factory=list,
        description='Origins browsers may call from (JSON list, "*" any); none by default.',
    )
    rate_limit_per_s: float = Field(
        default=0, ge=0,
        description="Requests a second per token (per address without one), in each process; 0: off.",
    )
    rate_limit_burst: int = Field(default=100, ge=1, description="Requests a caller may send at once.")
