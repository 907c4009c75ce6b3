"""Model runtimes serving can load. Only ONNX: a format that cannot execute code when loaded."""
