"""Names that the trainer writes on MLflow objects and the registry, serving and monitor read."""

PRODUCTION = "production"
STAGING = "staging"
CANARY = "canary"
SHADOW = "shadow"
ALIASES = (PRODUCTION, STAGING, CANARY, SHADOW)

TAG_JOB_ID = "shipyard.job_id"
TAG_DATASET = "shipyard.dataset"
TAG_DATASET_REV = "shipyard.dataset_rev"
TAG_GIT_COMMIT = "shipyard.git_commit"
TAG_FEATURES = "shipyard.features"
TAG_TARGET = "shipyard.target"
TAG_TASK = "shipyard.task"
TAG_FORMAT = "shipyard.format"
TAG_SIGNATURE = "shipyard.signature"

ONNX_ARTIFACT_PATH = "onnx"
ONNX_FILE_NAME = "model.onnx"
