"""Registry: the MLflow model registry behind a Shipyard API, with audited, announced promotions."""
