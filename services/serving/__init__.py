"""Serving: answers predictions with the versions the registry's aliases name.

Its layers, one folder each, each importing only the ones below it (import-linter checks it):

* ``fastlane/``  the prediction hot path in front of the app (``SHIPYARD_SERVING_FAST_LANE``), and
  the one module bound to a server's internals (uvicorn's HTTP protocol, pinned)
* ``api/``       the FastAPI routers, one per protocol, auth and body limits, the status routes;
  the gRPC server of the Open Inference Protocol v2 (``SHIPYARD_SERVING_GRPC_PORT``)
* ``protocols/`` codecs: bytes and headers to arrays and back, per protocol
* ``core/``      the data plane (pick the version, validate, canary/shadow, run, log, count),
  the loaded models, the follower that loads them, leases, metrics
* ``batching/``  merging concurrent requests of one version into one runtime call; call costs
* ``predlog/``   the durable prediction log: journal, shipper process, the log's API
* ``runtimes/``  ONNX Runtime, TorchScript, TF Serving over gRPC behind one interface

``app.py`` wires them; ``settings.py`` is read by all.
"""
