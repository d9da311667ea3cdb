"""Layer 4, front ends: torch.fx (``fx``), torch.export / ATen (``aten``, built on ``fx``) and ONNX (``onnx``), each
with the same parts: recognizers (source op → IR op), an importer, emitters, an exporter and a backend (the fuse
driver). ``pipeline`` holds what the drivers share; ``rulesets`` picks the rules of a run."""

# torch.export's concrete capture, which the FX capture uses where symbolic tracing sees less (it registers itself)
from reparam.frontends.aten import concrete as _concrete  # noqa: E402,F401
