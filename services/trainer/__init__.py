"""Trainer: accepts training jobs over HTTP and runs them on Celery workers with PyTorch.

The API process never imports torch: it stores the job, then hands its id to a worker by name
(``shipyard.train``). The worker trains, exports ONNX, and registers the version in MLflow.
"""
