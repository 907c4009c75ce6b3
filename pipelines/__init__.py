"""Prefect pipelines that drive the platform over its HTTP APIs."""
