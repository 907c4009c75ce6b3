"""The HTTP routers, one per protocol (ours, Open Inference Protocol v2, TF Serving REST), and what
they share: the token check in each protocol's error shape, the body limit, the status routes; and
the Open Inference Protocol v2 over gRPC (``grpc.py``, a ``grpc.aio`` server the app starts)."""
