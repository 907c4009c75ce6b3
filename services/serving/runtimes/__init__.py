"""Model runtimes: ONNX Runtime, TorchScript (``torch.jit.load``), and TF Serving over gRPC.

Never a pickle: ONNX files are data, TorchScript archives are loaded with ``torch.jit.load``
(not ``torch.load``), and SavedModels are executed by TF Serving, not in this process.
"""
