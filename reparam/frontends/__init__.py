"""Layer 4, front ends: torch.fx (``fx``), torch.export / ATen (``aten``, built on ``fx``) and ONNX (``onnx``), each
with the same parts: recognizers (source op → IR op), an importer, emitters, an exporter and a backend (the fuse
driver). ``pipeline`` holds what the drivers share; ``rulesets`` picks the rules of a run."""

from reparam.frontends.fx import capture as _capture

# torch.export's concrete capture, which the FX capture uses where symbolic tracing sees less: registered by name,
# imported (with the ATen recognizers it registers) the first time a model needs it
if "reparam.frontends.aten.concrete:_capture" not in _capture.CONCRETE_CAPTURES:
    _capture.CONCRETE_CAPTURES.append("reparam.frontends.aten.concrete:_capture")
