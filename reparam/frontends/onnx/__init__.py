"""The ONNX front end (onnx-graphsurgeon): import, export, float64 evaluation and ``reparam.fuse_onnx``."""
