"""Runtime: ONNX Runtime sessions on artifacts, the KV-cache decode loop, eqc's custom-op library."""
