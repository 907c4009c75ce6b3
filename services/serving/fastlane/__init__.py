"""The prediction hot path (``SHIPYARD_SERVING_FAST_LANE``): an ASGI layer in front of the app, and
uvicorn's HTTP protocol handing predict requests to it without a task.

The only code bound to a server's internals (uvicorn's ``httptools`` protocol, at the pinned version).
"""
