"""Layer 5, loading and saving models: checkpoints, factories, ``.pt2`` programs, ONNX files, atomic writes."""
