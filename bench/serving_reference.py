"""The bare reference server for ``bench/serving.py``: a raw ASGI app, no framework.

    BENCH_MODEL_PATH=model.onnx uvicorn --app-dir bench serving_reference:app --workers 2

``POST`` anything with ``{"inputs": [[...], ...]}``; answers ``{"outputs": [[...], ...]}``. One ONNX
Runtime session per process, with serving's session options (``BENCH_ORT_THREADS`` intra-op threads,
no spinning). No auth, no validation, no metrics, no log: the ceiling for a Python HTTP server.
"""

import os

import numpy as np
import onnxruntime as ort
import orjson
from serving_models import INPUT_NAME, OUTPUT_NAME, session_options

_session = ort.InferenceSession(
    os.environ["BENCH_MODEL_PATH"],
    sess_options=session_options(int(os.environ.get("BENCH_ORT_THREADS", "1"))),
    providers=["CPUExecutionProvider"],
)
_HEADERS = [(b"content-type", b"application/json")]


async def app(scope, receive, send):  # type: ignore[no-untyped-def]  # the bare ASGI signature
    if scope["type"] != "http":  # lifespan: nothing to set up
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    rows = np.asarray(orjson.loads(body)["inputs"], dtype=np.float32)
    (output,) = _session.run([OUTPUT_NAME], {INPUT_NAME: rows})
    payload = orjson.dumps({"outputs": output}, option=orjson.OPT_SERIALIZE_NUMPY)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": payload})
