"""Loading and writing that are safe: a crafted .pt2 runs no code without --trust, the .py deploy format loads
with torch alone, written files are checked before they are put in place, stale temporary files go, a full
disk is a user-facing error."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reparam.errors import ReparamError
from tests.cli_models import tiny_repvgg
from tests.pt2_craft import craft

X = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(7))


@pytest.fixture
def clean_pt2(tmp_path) -> Path:
    path = tmp_path / "clean.pt2"
    with torch.no_grad():
        torch.export.save(torch.export.export(tiny_repvgg(), (X,)), str(path))
    return path


@pytest.mark.parametrize("where", ["sample_inputs", "weight"])
def test_a_crafted_pt2_runs_code_in_torch_export_load_but_not_in_reparam(where, clean_pt2, tmp_path):
    from reparam.io.pt2 import load_pt2

    bad, marker = tmp_path / "bad.pt2", tmp_path / "marker"
    craft(clean_pt2, bad, marker, where)
    with pytest.raises(ReparamError, match="runs code when loaded.*--trust"):
        load_pt2(bad)
    assert not marker.exists()
    # the archive is dangerous indeed: torch.export.load itself runs its pickle
    subprocess.run([sys.executable, "-c", f"import torch\ntry:\n    torch.export.load({str(bad)!r})\nexcept Exception:\n"
                    f"    pass"], capture_output=True, check=True)
    assert marker.exists()


def test_a_clean_pt2_loads_without_trust(clean_pt2):
    from reparam.io.pt2 import load_pt2, pt2_unsafe_entry

    assert pt2_unsafe_entry(clean_pt2.read_bytes()) is None
    with torch.no_grad():
        torch.testing.assert_close(load_pt2(clean_pt2).module()(X), tiny_repvgg()(X))


def _fused():
    import reparam

    return reparam.fuse(tiny_repvgg(), X)


def test_the_py_format_loads_with_torch_alone_in_a_fresh_interpreter(tmp_path):
    """deploy.py + deploy.safetensors: no reparam, no unpickling, dynamic batch; safetensors reads the weights."""
    from reparam.io.saving import save_model

    save_model(_fused(), tmp_path / "deploy.py", (X,))
    assert {p.name for p in tmp_path.iterdir()} == {"deploy.py", "deploy.safetensors"}
    code = ("import sys, torch, pickle\n"
            "pickle.Unpickler = pickle._Unpickler = None  # nothing may unpickle\n"
            "sys.path.insert(0, '.')\n"
            "import deploy\n"
            "model = deploy.load()\n"
            "print(tuple(model(torch.ones(4, 3, 12, 12)).shape), deploy.DYNAMIC_BATCH)\n"
            "assert not any(m.startswith('reparam') for m in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(4,", "4,", "12,", "12)", "True"]
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "deploy.safetensors"))
    assert len(weights) == 6 and all(w.dtype == torch.float32 for w in weights.values())
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy_here", tmp_path / "deploy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.no_grad():
        torch.testing.assert_close(module.load()(X), tiny_repvgg()(X), rtol=1e-5, atol=1e-5)


def test_a_deploy_pt_loads_in_a_fresh_interpreter_without_reparam(tmp_path):
    """The pickle written for .pt needs torch and the model's own code (its class keeps its place), not reparam
    (and weights_only=False, as the docs say)."""
    from reparam.io.saving import save_model

    save_model(_fused(), tmp_path / "deploy.pt", (X,))
    code = ("import sys, torch\n"
            "m = torch.load('deploy.pt', weights_only=False)\n"
            "print(tuple(m(torch.ones(2, 3, 12, 12)).shape))\n"
            "assert not any(k.startswith('reparam') for k in sys.modules), 'reparam was imported'\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}  # the model's code: tests/
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 4, 12, 12)"


@pytest.mark.parametrize("fmt", ["onnx", "pt2", "py"])
def test_exports_have_a_dynamic_batch(fmt, tmp_path):
    from reparam.io.saving import save_model

    out = tmp_path / f"deploy.{fmt}"
    assert save_model(_fused(), out, (X,)) == []  # no note: the batch is dynamic
    x4 = torch.randn(4, 3, 12, 12)
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        (got,) = sess.run(None, {sess.get_inputs()[0].name: x4.numpy()})
        got = torch.from_numpy(got)
    elif fmt == "pt2":
        got = torch.export.load(str(out)).module()(x4)
    else:
        from reparam.io.pysource import load_python

        got = load_python(str(out))(x4)
    with torch.no_grad():
        torch.testing.assert_close(got, tiny_repvgg()(x4), rtol=1e-4, atol=1e-4)


def test_spatial_dims_can_be_dynamic_too(tmp_path):
    import onnx

    from reparam.io.saving import save_model

    out = tmp_path / "deploy.onnx"
    save_model(_fused(), out, (X,), dynamic="spatial")
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))


class FixedBatch(torch.nn.Module):
    """Runs at batch 1 only (a reshape with the batch written in)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).reshape(1, 4, 12, 12)


def test_a_model_that_runs_at_one_batch_size_only_is_written_static_with_a_note(tmp_path):
    import reparam
    from reparam.io.saving import save_model

    fused = reparam.fuse(FixedBatch().eval(), X)
    notes = save_model(fused, tmp_path / "deploy.onnx", (X,))
    assert len(notes) == 1 and "fixed" in notes[0]


def test_the_written_file_is_checked_before_it_is_put_in_place(tmp_path, monkeypatch):
    """A writer that produces something else (here: an ONNX file of another model) is caught; nothing written."""
    from reparam.io import saving

    real = saving._export_onnx

    def wrong(model, *args, **kwargs):
        return real(tiny_repvgg().double().float().apply(_perturb), *args, **kwargs)

    monkeypatch.setattr(saving, "_export_onnx", wrong)
    out = tmp_path / "deploy.onnx"
    with pytest.raises(ReparamError, match="computes something else than the fused model"):
        saving.save_model(_fused(), out, (X,))
    assert list(tmp_path.iterdir()) == []


def _perturb(m):
    if isinstance(m, torch.nn.Conv2d):
        with torch.no_grad():
            m.weight.add_(0.1)


def test_stale_partial_files_of_dead_runs_are_removed(tmp_path):
    from reparam.io.saving import atomic_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".deploy.{dead.pid}.abc123.partial.pt"
    alive = tmp_path / f".deploy.{os.getppid()}.def456.partial.pt"  # a running process: another run's file
    legacy = tmp_path / ".deploy.xyz789.partial.pt"
    for p in (stale, alive, legacy):
        p.write_text("half")
    os.utime(legacy, (0, 0))  # an old file of an earlier version (no process id in its name)
    with atomic_path(tmp_path / "deploy.pt") as tmp:
        Path(tmp).write_text("new")
    assert {p.name for p in tmp_path.iterdir()} == {"deploy.pt", alive.name}


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter "
                                                  "failed writing file data/0: file write failed")])
def test_a_full_disk_is_a_user_error_naming_the_file(failure, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from reparam.io import saving
    from reparam.cli.app import app

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(saving.torch, "save", full)
    out = tmp_path / "deploy.pt"
    result = CliRunner().invoke(app, ["fuse", "tests.cli_models:TinyRepVGG", "-s", "1,3,12,12", "-o", str(out),
                                      "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 2, result.output
    line = [ln for ln in result.stderr.splitlines() if ln.startswith("reparam: error:")]
    assert len(line) == 1 and str(out) in line[0] and ("no space left" in line[0] or "disk" in line[0]), line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["status"] == "error" and doc["error"]["code"] == 2 and doc["error"]["phase"].startswith("writing")


def test_a_signal_right_after_the_temporary_file_is_created_leaves_nothing(tmp_path, monkeypatch):
    """SIGTERM raises where the program is; arriving just after the temporary file came into existence (before
    anything else ran), it must still be cleaned up: the file is known to the cleanup before it is created."""
    from reparam.io import atomic

    real_close = os.close

    def interrupted(fd):
        real_close(fd)
        raise KeyboardInterrupt  # what a signal handler raising at that moment looks like

    monkeypatch.setattr(atomic.os, "close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_path(tmp_path / "deploy.pt2"):
            pass
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
