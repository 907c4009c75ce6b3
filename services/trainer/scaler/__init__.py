"""The GPU scaler: a small controller that scales the ``gpu`` worker Deployment between a minimum and a
maximum from the job table's queued and running jobs (``python -m services.trainer.scaler``).

Up at once for waiting jobs, never below the running ones, down only after a cooldown, to zero when
idle; one decision per interval (:mod:`.decision` holds the rules, :mod:`.controller` the loop).

It talks to the Kubernetes API with the ``kubernetes`` client: in-cluster configuration (the pod's
service account), else the kubeconfig. RBAC its service account needs in the Deployment's namespace:

- ``get``, ``patch`` on ``deployments/scale`` (apps): read and set the replicas each tick;
- ``get`` on ``deployments`` (apps): the check at start that the Deployment exists.

Settings: :class:`~services.trainer.scaler.settings.ScalerSettings` (``SHIPYARD_SCALER_*``, plus the
platform's ``SHIPYARD_DB_URL``); metrics on ``SHIPYARD_SCALER_METRICS_PORT`` (8006). See
``docs/gpu-autoscaling.md``.
"""
