"""The installed ``reparam`` console script, driven in a subprocess: every input kind, every output kind,
every bad-input case (one line on stderr, documented exit code, nothing written)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from reparam.cli.catalogue import rule_catalogue
from tests.cli_models import tiny_repvgg, two_inputs

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "reparam"
SHAPE = "1,3,12,12"
X = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(7))


def script_env(pythonpath: bool = True) -> dict[str, str]:
    """The environment of a run: the repository on PYTHONPATH (for tests.cli_models), or no PYTHONPATH at all."""
    env = dict(os.environ, COLUMNS="120")
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def run(*args, check_rc: int | None = 0, cwd: Path = ROOT, pythonpath: bool = True) -> subprocess.CompletedProcess:
    assert SCRIPT.exists(), f"{SCRIPT} is missing: run `make install` first"
    proc = subprocess.run([str(SCRIPT), *map(str, args)], cwd=cwd, env=script_env(pythonpath), capture_output=True,
                          text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> bool:
    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    return got.shape == want.shape and float((got - want).abs().max()) <= rtol * float(want.abs().max())


def assert_fused_structure(module: torch.nn.Module) -> None:
    """The RepVGG blocks became single convs: no BatchNorm left, 3 convs (stem + one per block)."""
    mods = list(module.modules())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in mods)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in mods) == 3


@pytest.fixture
def pickled(tmp_path) -> Path:
    path = tmp_path / "model.pt"
    torch.save(tiny_repvgg(), path)
    return path


def only_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


PHASE_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] (✓ )?\S")  # a phase's start or end in a log


def assert_one_line_error(proc, rc: int, *needles: str) -> None:
    assert proc.returncode == rc, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("reparam: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "\x1b" not in proc.stderr  # no traceback, no terminal codes
    assert all(ln.startswith("reparam: error:") or PHASE_LINE.match(ln) for ln in lines), proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


# ------------------------------------------------------------------------------------------- inputs/outputs

def test_pickled_module_with_trust_to_pt(pickled, tmp_path):
    out = tmp_path / "deploy.pt"
    proc = run("fuse", pickled, "--trust", "-s", SHAPE, "-o", out)
    for needle in ("ops", "convs", "BNs", "params", "max error", "rules fired", "7 → 0", "conv_bn_fold"):
        assert needle in proc.stdout, proc.stdout
    fused = torch.load(out, weights_only=False)
    assert_fused_structure(fused)
    with torch.no_grad():
        assert close(fused(X), tiny_repvgg()(X))
    assert only_files(tmp_path) == {"model.pt", "deploy.pt"}  # no temporary file left


def test_factory_with_weights_to_pt2_with_report_and_json(tmp_path):
    weights = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": tiny_repvgg().state_dict()}, weights)
    out, report = tmp_path / "deploy.pt2", tmp_path / "report.json"
    proc = run("fuse", "tests.cli_models:TinyRepVGG", "--weights", weights, "-s", SHAPE, "-o", out,
               "--report", report, "--json")
    doc = json.loads(proc.stdout)
    assert doc == json.loads(report.read_text())
    rep = doc["report"]
    assert rep["verification"]["passed"] is True and rep["verification"]["error_fp64"] < 1e-12
    assert rep["before"]["bns"] == 7 and rep["after"]["bns"] == 0 and rep["after"]["convs"] == 3
    assert rep["fired_counts"]["conv_bn_fold"] == 5
    program = torch.export.load(str(out))
    with torch.no_grad():
        assert close(program.module()(X), tiny_repvgg()(X))


def test_two_inputs_to_onnx_runs_in_onnxruntime(tmp_path):
    import onnx
    import onnxruntime as ort

    src, out = tmp_path / "two.pt", tmp_path / "deploy.onnx"
    torch.save(two_inputs(), src)
    run("fuse", src, "--trust", "-s", "1,3,8,8", "--input-shape", "1,3,8,8", "-o", out, "--quiet")
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops
    x, y = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    (got,) = sess.run(None, {names[0]: x.numpy(), names[1]: y.numpy()})
    with torch.no_grad():
        assert close(torch.from_numpy(got), two_inputs()(x, y))


def test_pt2_input_to_pt(tmp_path):
    src, out = tmp_path / "model.pt2", tmp_path / "deploy.pt"
    with torch.no_grad():
        torch.export.save(torch.export.export(tiny_repvgg(), (X,)), str(src))
    proc = run("fuse", src, "-o", out)
    assert "rules fired" in proc.stdout
    fused = torch.load(out, weights_only=False)
    targets = [str(n.target) for n in fused.graph.nodes if n.op == "call_function"]
    assert not any("batch_norm" in t for t in targets), targets
    assert sum("conv" in t for t in targets) == 3, targets
    with torch.no_grad():
        assert close(fused(X), tiny_repvgg()(X))


def test_onnx_input_to_onnx(tmp_path):
    import onnx
    import onnxruntime as ort

    src, out = tmp_path / "model.onnx", tmp_path / "deploy.onnx"
    with torch.no_grad():
        torch.onnx.export(tiny_repvgg(), (X,), str(src), dynamo=False, opset_version=17, do_constant_folding=False,
                          input_names=["x"])
    before = [n.op_type for n in onnx.load(str(src)).graph.node]
    assert before.count("BatchNormalization") == 7
    run("fuse", src, "-o", out, "-q")
    after = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert "BatchNormalization" not in after and after.count("Conv") == 3, after
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: X.numpy()})
    with torch.no_grad():
        assert close(torch.from_numpy(np.asarray(got)), tiny_repvgg()(X))


# ------------------------------------------------------------------------------------------- rule choice

def test_only_and_disable_pick_rules(pickled, tmp_path):
    out = tmp_path / "deploy.pt"
    doc = json.loads(run("fuse", pickled, "--trust", "-s", SHAPE, "-o", out, "--only", "conv_bn_fold",
                         "--json", "--no-verify").stdout)
    assert doc["report"]["fired_counts"] == {"conv_bn_fold": 5}
    assert doc["report"]["verification"]["skipped"]
    doc = json.loads(run("fuse", pickled, "--trust", "-s", SHAPE, "-o", out, "--disable", "parallel_sum_pad",
                         "--json").stdout)
    assert "parallel_sum_pad" not in doc["report"]["fired_counts"] and doc["report"]["fired_counts"]
    assert doc["report"]["verification"]["passed"] is True


WRONG_RULE = '''
from reparam.core.ops import Affine
from reparam.core.pattern import P, X
from reparam.core.rule import rule


@rule(P(Affine, X("x"), name="bn"))
def drop_affine(x, bn):
    """a(x) = x (wrong on purpose)."""
    return x
'''


def test_user_rule_file_is_tried_first_and_a_wrong_rule_fails_verification(pickled, tmp_path):
    rules = tmp_path / "my_rules.py"
    rules.write_text(WRONG_RULE)
    listing = run("rules", "--rules", rules).stdout
    assert "drop_affine (user)" in listing and "a(x) = x (wrong on purpose)." in listing
    assert all(name in listing for name, _, _ in rule_catalogue())
    out = tmp_path / "deploy.pt"
    proc = run("fuse", pickled, "--trust", "-s", SHAPE, "-o", out, "--rules", rules, check_rc=None)
    assert_one_line_error(proc, 3, "drop_affine")
    assert not out.exists()


NEIGHBOUR_RULE = '''
from helpers import nothing_to_do
from reparam.core.ops import Affine
from reparam.core.pattern import P, X
from reparam.core.rule import rule


@rule(P(Affine, X("x"), name="bn"))
def never_rewrites(x, bn):
    """a(x) = a(x): never rewrites (asks helpers.py, next to this file)."""
    return nothing_to_do()
'''


def test_a_rule_file_imports_modules_next_to_it(tmp_path):
    folder = tmp_path / "my_rules"
    folder.mkdir()
    (folder / "helpers.py").write_text("def nothing_to_do():\n    return None\n")
    (folder / "rules.py").write_text(NEIGHBOUR_RULE)
    listing = run("rules", "--rules", folder / "rules.py").stdout  # run from the repository, not from the folder
    assert "never_rewrites (user)" in listing


def test_a_pickled_model_loads_from_the_working_directory(tmp_path, monkeypatch):
    """A console script does not put the working directory on sys.path; --trust loads need it, as factories do."""
    source = tmp_path / "my_models.py"
    source.write_text((ROOT / "tests" / "cli_models.py").read_text())
    spec = importlib.util.spec_from_file_location("my_models", source)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "my_models", module)
    spec.loader.exec_module(module)
    torch.save(module.tiny_repvgg(), tmp_path / "model.pt")
    proc = run("fuse", "model.pt", "--trust", "-s", SHAPE, "-o", "deploy.pt", cwd=tmp_path, pythonpath=False)
    assert "rules fired" in proc.stdout
    assert_fused_structure(torch.load(tmp_path / "deploy.pt", weights_only=False))


def test_a_guessed_input_shape_is_printed_and_a_factory_is_not_called_a_training_model():
    proc = run("inspect", "tests.cli_models:TinyRepVGG")
    assert "guessed the input shape 1,3,224,224" in proc.stdout, proc.stdout
    assert "training mode" not in proc.stdout


RESTATE_RULE = '''
from reparam.core.ops import Affine
from reparam.core.pattern import P, X
from reparam.core.rule import rule


@rule(P(Affine, X("x"), name="a"))
def restate_affine(x, a):
    """a(x) = a(x), as a new node: matches its own output forever."""
    return a.op.with_()(x)
'''


def test_rules_that_never_settle_are_not_called_a_verification_failure(tmp_path):
    rules = tmp_path / "loop.py"
    rules.write_text(RESTATE_RULE)
    proc = run("inspect", "tests.cli_models:TinyRepVGG", "-s", SHAPE, "--rules", rules, check_rc=None)
    assert_one_line_error(proc, 3, "the rules did not settle", "'restate_affine' keeps firing")
    assert "verification failed" not in proc.stderr


# ------------------------------------------------------------------------------------------- bad input

def test_pickled_module_without_trust_is_refused(pickled, tmp_path):
    proc = run("fuse", pickled, "-o", tmp_path / "deploy.pt", check_rc=None)
    assert_one_line_error(proc, 2, "--trust", "--weights")
    assert only_files(tmp_path) == {"model.pt"}


NOT_RULES = 'RULES = ["conv_bn_fold"]  # names, not rules\n'

DUPLICATE_RULE = '''
from reparam.core.ops import Affine
from reparam.core.pattern import P, X
from reparam.core.rule import rule


@rule(P(Affine, X("x"), name="bn"), name="conv_bn_fold")
def my_conv_bn_fold(x, bn):
    """A user rule that reuses a built-in rule's name."""
    return None
'''


def _bad_cases(tmp_path: Path, pickled: Path) -> dict[str, tuple[list, str]]:
    (tmp_path / "model.txt").write_text("not a model")
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage, not a torch file")
    (tmp_path / "garbage.pt2").write_bytes(b"garbage")
    (tmp_path / "garbage.onnx").write_bytes(b"garbage")
    torch.save(tiny_repvgg().state_dict(), tmp_path / "weights.pth")
    torch.save({"stem.0.weight": torch.zeros(2)}, tmp_path / "other.pth")
    torch.save(two_inputs(), tmp_path / "two.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; users still have such files
        torch.jit.script(tiny_repvgg()).save(str(tmp_path / "scripted.pt"))
    (tmp_path / "link.pth").symlink_to(tmp_path / "weights.pth")
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "rules.py").write_text(WRONG_RULE)
    (tmp_path / "not_rules.py").write_text(NOT_RULES)
    (tmp_path / "duplicate.py").write_text(DUPLICATE_RULE)
    out = tmp_path / "deploy.pt"
    out.write_text("the previous output")  # a failed run leaves it as it was
    factory, weights, nodir = "tests.cli_models:TinyRepVGG", tmp_path / "weights.pth", tmp_path / "nodir"
    return {
        "missing file": (["fuse", tmp_path / "nope.pt", "--trust", "-o", out], "no such file"),
        "unknown input format": (["fuse", tmp_path / "model.txt", "-o", out], "unknown model format"),
        "unknown output format": (["fuse", pickled, "--trust", "-o", tmp_path / "deploy.h5"],
                                  "unknown output format"),
        "unreadable file": (["fuse", tmp_path / "garbage.pt", "--trust", "-o", out], "not a readable PyTorch"),
        "unreadable file without --trust": (["fuse", tmp_path / "garbage.pt", "-o", out], "not a readable PyTorch"),
        "corrupt .pt2": (["fuse", tmp_path / "garbage.pt2", "-o", tmp_path / "d.pt2"], "not a loadable torch.export"),
        "corrupt .onnx": (["fuse", tmp_path / "garbage.onnx", "-o", tmp_path / "d.onnx"], "not a loadable ONNX"),
        "TorchScript model": (["fuse", tmp_path / "scripted.pt", "-o", out], "TorchScript models cannot be fused"),
        "TorchScript model with --trust": (["fuse", tmp_path / "scripted.pt", "--trust", "-o", out],
                                           "TorchScript models cannot be fused"),
        "state_dict as model": (["fuse", weights, "-o", out], "pkg.module:factory --weights"),
        "pickled model as weights": (["fuse", factory, "-w", pickled, "-o", out], "holds more than tensors"),
        "TorchScript model as weights": (["fuse", factory, "-w", tmp_path / "scripted.pt", "-o", out],
                                         "is a TorchScript model"),
        "weights for a .pt2": (["fuse", tmp_path / "garbage.pt2", "-w", weights, "-o", out],
                               "a torch.export program (.pt2) carries its own weights"),
        "broken factory": (["fuse", "tests.cli_models:broken_factory", "-o", out], "always fails"),
        "data-dependent model to .pt2": (["fuse", "tests.cli_models:DataDependent", "-s", "1,3,8,8", "-q", "-o",
                                          tmp_path / "d.pt2"], "torch.export could not export the fused model"),
        "unknown factory": (["fuse", "tests.cli_models:nothing_here", "-o", out], "no attribute"),
        "weights that do not fit": (["fuse", factory, "-w", tmp_path / "other.pth", "-o", out], "does not fit"),
        "shape that does not fit": (["fuse", pickled, "--trust", "-s", "1,5,12,12", "-o", out],
                                    "does not run on inputs of shape"),
        "guessed shape that does not fit": (["fuse", tmp_path / "two.pt", "--trust", "-o", out],
                                            "(set the input shape with --input-shape)"),
        "bad shape text": (["fuse", pickled, "--trust", "-s", "1,3,a", "-o", out], "bad --input-shape"),
        "NaN tolerance": (["fuse", pickled, "--trust", "--tolerance", "nan", "-o", out], "--tolerance must be"),
        "output is the input": (["fuse", pickled, "--trust", "-o", pickled], "is the input file"),
        "output is the weights file": (["fuse", factory, "-w", weights, "-o", weights], "is the --weights file"),
        "output is a link to the weights file": (["fuse", factory, "-w", weights, "-o", tmp_path / "link.pth"],
                                                 "is the --weights file"),
        "report is the input": (["fuse", pickled, "--trust", "-o", out, "--report", pickled], "is the input file"),
        "report is the weights file": (["fuse", factory, "-w", weights, "-o", out, "--report", weights],
                                       "is the --weights file"),
        "report is a rules file": (["fuse", pickled, "--trust", "--rules", tmp_path / "rules.py", "-o", out,
                                    "--report", tmp_path / "rules.py"], "is a --rules file"),
        "report is the output": (["fuse", pickled, "--trust", "-o", out, "--report", out], "is the output file"),
        "output folder missing": (["fuse", pickled, "--trust", "-o", nodir / "d.pt"], "does not exist"),
        "report folder missing": (["fuse", pickled, "--trust", "-o", out, "--report", nodir / "r.json"],
                                  "does not exist"),
        "output is a directory": (["fuse", pickled, "--trust", "-o", tmp_path / "folder.pt"], "is a directory"),
        "report is a directory": (["fuse", pickled, "--trust", "-o", out, "--report", tmp_path / "folder.pt"],
                                  "is a directory"),
        "unknown rule": (["fuse", pickled, "--trust", "--disable", "no_such_rule", "-o", out], "no_such_rule"),
        "RULES holds a non-rule": (["fuse", pickled, "--trust", "--rules", tmp_path / "not_rules.py", "-o", out],
                                   "not_rules.py': RULES[0] is a str, not a rule"),
        "duplicate rule name": (["fuse", pickled, "--trust", "--rules", tmp_path / "duplicate.py", "-o", out],
                                "two rules are named 'conv_bn_fold'"),
        "duplicate rule name in the listing": (["rules", "--rules", tmp_path / "duplicate.py"],
                                               "two rules are named 'conv_bn_fold'"),
        "missing --output": (["fuse", pickled, "--trust"], "Missing option '--output'"),
        "unknown option": (["fuse", pickled, "--trust", "--bogus", "-o", out], "No such option: --bogus"),
        "unknown command": (["fusee", pickled], "No such command 'fusee'"),
    }


CASES = ["missing file", "unknown input format", "unknown output format", "unreadable file",
         "unreadable file without --trust", "corrupt .pt2", "corrupt .onnx", "TorchScript model",
         "TorchScript model with --trust", "state_dict as model", "pickled model as weights",
         "TorchScript model as weights", "weights for a .pt2", "broken factory", "data-dependent model to .pt2",
         "unknown factory", "weights that do not fit", "shape that does not fit", "guessed shape that does not fit",
         "bad shape text",
         "NaN tolerance", "output is the input", "output is the weights file", "output is a link to the weights file",
         "report is the input", "report is the weights file", "report is a rules file", "report is the output",
         "output folder missing", "report folder missing", "output is a directory", "report is a directory",
         "unknown rule", "RULES holds a non-rule", "duplicate rule name", "duplicate rule name in the listing",
         "missing --output", "unknown option", "unknown command"]
# Refused before anything is loaded or fused (the checks that need no model).
EARLY = {"unknown input format", "unknown output format", "weights for a .pt2", "bad shape text", "NaN tolerance",
         "output is the input", "output is the weights file", "output is a link to the weights file",
         "report is the input", "report is the weights file", "report is a rules file", "report is the output",
         "output folder missing", "report folder missing", "output is a directory", "report is a directory",
         "unknown rule", "RULES holds a non-rule", "duplicate rule name", "missing --output", "unknown option",
         "unknown command"}


def test_every_bad_case_is_run(pickled, tmp_path):
    cases = _bad_cases(tmp_path, pickled)
    assert sorted(CASES) == sorted(cases) and EARLY <= set(cases)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_nothing_written(case, pickled, tmp_path):
    args, needle = _bad_cases(tmp_path, pickled)[case]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    proc = run(*args, check_rc=None)
    assert_one_line_error(proc, 2, needle)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before  # nothing written or touched
    assert (tmp_path / "deploy.pt").read_text() == "the previous output"
    if case in EARLY:
        assert not any(PHASE_LINE.match(ln) for ln in proc.stderr.splitlines()), \
            f"{case}: refused only after loading\n{proc.stderr}"
    if "-s" in args:
        assert "set the input shape" not in proc.stderr  # the hint only when no shape was given


def test_duplicate_rule_names_are_refused_in_the_python_api_too():
    import reparam
    from reparam.errors import ReparamError

    spec = {}
    exec(DUPLICATE_RULE, spec)
    with pytest.raises(ReparamError, match="two rules are named 'conv_bn_fold'"):
        reparam.fuse(tiny_repvgg(), X, extra_rules=[spec["my_conv_bn_fold"]])


def test_verification_failure_exits_3_writes_no_model_and_reports_the_error(pickled, tmp_path):
    out = tmp_path / "deploy.onnx"
    proc = run("fuse", pickled, "--trust", "-s", SHAPE, "-o", out, "--tolerance", "1e-30",
               "--report", tmp_path / "r.json", "--json", check_rc=None)
    assert_one_line_error(proc, 3, "verification failed", "first wrong rewrite")
    assert only_files(tmp_path) == {"model.pt", "r.json"}  # the report, with the error; no model
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc == json.loads(proc.stdout)
    assert doc["status"] == "error" and doc["error"]["code"] == 3 and doc["error"]["kind"] == "verification"
    assert "first wrong rewrite" in doc["error"]["message"] and doc["schema_version"] == 1


# ------------------------------------------------------------------------------------------- other commands

def test_rules_lists_every_rule_with_its_identity():
    proc = run("rules", "--json")
    listed = [(r["name"], r["identity"]) for r in json.loads(proc.stdout)["rules"]]
    assert listed == [(n, i) for n, i, _ in rule_catalogue()]


def test_inspect_is_a_dry_run(pickled, tmp_path):
    proc = run("inspect", pickled, "--trust", "-s", SHAPE)
    for needle in ("regions: <whole model>", "rules that fire", "conv_bn_fold", "stem", "7 → 0", "refusals"):
        assert needle in proc.stdout, proc.stdout
    doc = json.loads(run("inspect", pickled, "--trust", "-s", SHAPE, "--json").stdout)
    assert doc["regions"] == ["<whole model>"]
    assert {e["where"] for e in doc["report"]["rules_fired"] if e["rule"] == "conv_bn_fold"} >= {"stem"}
    assert doc["report"]["verification"]["skipped"]
    assert only_files(tmp_path) == {"model.pt"}


def test_bench_reports_medians_and_ratio(pickled, tmp_path):
    doc = json.loads(run("bench", pickled, "--trust", "-s", "2,3,12,12", "--threads", "1", "-n", "3",
                         "--json").stdout)
    assert doc["input_shapes"] == [[2, 3, 12, 12]] and doc["threads"] == 1
    med = doc["median_ms"]
    assert med["original"] > 0 and med["fused"] > 0
    assert doc["speedup"] == pytest.approx(med["original"] / med["fused"])
    assert only_files(tmp_path) == {"model.pt"}


def test_repnext_m1_pickled_with_trust(tmp_path):
    """The default path (verified in float64), run as a user would: from the project directory, no PYTHONPATH."""
    from examples.repnext import repnext_m1
    from examples.repnext.utils import randomize_bn_stats

    model = randomize_bn_stats(repnext_m1(), torch.Generator().manual_seed(0)).eval()
    src, out = tmp_path / "repnext_m1.pt", tmp_path / "deploy.pt"
    torch.save(model, src)
    proc = run("fuse", src, "--trust", "--input-shape", "1,3,224,224", "-o", out, pythonpath=False)
    bns = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for needle in (f"{bns} → 0", "max error", "in float64 (tolerance 1e-09)", "rules fired"):
        assert needle in proc.stdout, proc.stdout
    assert "✓ verifying end to end in float64" in proc.stderr
    fused = torch.load(out, weights_only=False)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert close(fused(x), model(x), rtol=1e-4)


def test_sigterm_removes_the_temporary_file_and_exits_143(tmp_path):
    out = tmp_path / "deploy.pt2"  # exporting M1 takes seconds, with the temporary file in place
    proc = subprocess.Popen([str(SCRIPT), "fuse", "examples.repnext:repnext_m1", "-s", "1,3,224,224", "-o", out,
                             "--no-verify"], cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(".partial" in p.name for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before writing began"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), 143,
                          "terminated; nothing was written")
    assert only_files(tmp_path) == set()


def test_docs_cover_every_command_and_option():
    import typer.main

    from reparam.cli.app import app

    docs = (ROOT / "docs" / "cli.md").read_text()
    group = typer.main.get_command(app)
    sections = {name: docs.split(f"## `reparam {name}`", 1) for name in group.commands}
    for name, command in group.commands.items():
        assert len(sections[name]) == 2, f"docs/cli.md has no section for `reparam {name}`"
        section = sections[name][1].split("\n## ", 1)[0]
        rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in section.splitlines() if ln.startswith("| `")]
        for param in command.params:
            if getattr(param, "param_type_name", None) == "option" and "--help" not in param.opts:
                for flag in param.opts + param.secondary_opts:
                    row = next((r for r in rows if flag in r[0].replace("`", " ").replace(",", " ").split()), None)
                    assert row is not None, f"`reparam {name}` option {flag} is not documented in docs/cli.md"
                    assert len(row) == 3 and row[1] and row[2], f"{flag}: needs a meaning and an example"


def test_atomic_write_leaves_nothing_on_failure_and_keeps_the_old_file(tmp_path):
    from reparam.io.saving import atomic_path

    target = tmp_path / "deploy.pt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            Path(tmp).write_text("half")
            raise KeyboardInterrupt
    assert only_files(tmp_path) == {"deploy.pt"} and target.read_text() == "old"
    with atomic_path(target) as tmp:
        Path(tmp).write_text("new")
    assert only_files(tmp_path) == {"deploy.pt"} and target.read_text() == "new"


# ------------------------------------------------------------------------------------------- issue 13: 2-6

def test_a_crafted_pt2_is_refused_without_trust_and_runs_no_code(tmp_path):
    from tests.pt2_craft import craft

    clean, bad, marker = tmp_path / "clean.pt2", tmp_path / "bad.pt2", tmp_path / "marker"
    with torch.no_grad():
        torch.export.save(torch.export.export(tiny_repvgg(), (X,)), str(clean))
    craft(clean, bad, marker, "sample_inputs")
    for command in (["fuse", bad, "-o", tmp_path / "d.pt"], ["inspect", bad]):
        proc = run(*command, check_rc=None)
        assert_one_line_error(proc, 2, "runs code when loaded", "--trust")
        assert "--input-shape" not in proc.stderr  # advice that fits a .pt2
        assert not marker.exists()
    assert "rules fired" in run("fuse", clean, "-o", tmp_path / "d.pt").stdout


def test_literal_trust_flow_and_a_deploy_py_that_loads_with_torch_alone(pickled, tmp_path):
    proc = run("fuse", "model.pt", "-o", "deploy.pt", "--trust", cwd=pickled.parent)
    assert "rules fired" in proc.stdout
    run("fuse", "model.pt", "-o", "deploy.py", "--trust", "-s", SHAPE, "-q", cwd=pickled.parent)
    code = "import deploy, torch; print(tuple(deploy.load()(torch.zeros(3, 3, 12, 12)).shape))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env=script_env(pythonpath=False))
    assert out.returncode == 0 and out.stdout.strip() == "(3, 4, 12, 12)", out.stderr


def test_onnx_written_from_pytorch_runs_at_batch_4_and_the_check_is_reported(tmp_path):
    import onnxruntime as ort

    out = tmp_path / "deploy.onnx"
    doc = json.loads(run("fuse", "tests.cli_models:tiny_repvgg", "-s", SHAPE, "-o", out, "--json").stdout)
    assert any("[4, 3, 12, 12]" in c for c in doc["written"]["checked"]), doc["written"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x4 = torch.randn(4, 3, 12, 12)
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x4.numpy()})
    with torch.no_grad():
        assert close(torch.from_numpy(got), tiny_repvgg()(x4), rtol=1e-4)


def test_a_sigkilled_run_leaves_a_partial_file_that_the_next_run_removes(tmp_path):
    out = tmp_path / "deploy.pt2"
    proc = subprocess.Popen([str(SCRIPT), "fuse", "examples.repnext:repnext_m1", "-s", "1,3,224,224", "-o", out,
                             "--no-verify", "-q"], cwd=ROOT, env=script_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(".partial" in p.name for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before writing began"
            time.sleep(0.01)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert any(".partial" in p.name for p in tmp_path.iterdir())
    run("fuse", "tests.cli_models:TinyRepVGG", "-s", SHAPE, "-o", out, "-q")
    assert only_files(tmp_path) == {"deploy.pt2"}


def test_progress_in_a_log_is_timestamped_phase_lines_with_the_summarys_clocks(tmp_path):
    out = tmp_path / "deploy.pt"
    proc = run("fuse", "tests.cli_models:TinyRepVGG", "-s", SHAPE, "-o", out, "--report", tmp_path / "r.json")
    lines = proc.stderr.splitlines()
    assert lines and all(PHASE_LINE.match(ln) for ln in lines), proc.stderr
    done = [re.match(r"^\[[\d:]+\] ✓ (.*) \((\d+\.\d) s\)$", ln) for ln in lines if "✓" in ln]
    labels = [m.group(1) for m in done]
    assert labels[0].startswith("loading") and "capturing and rewriting" in labels
    assert "verifying end to end in float64" in labels and labels[-2].startswith("writing")
    assert labels[-1].startswith("checking the written")
    seconds = json.loads((tmp_path / "r.json").read_text())["seconds"]
    assert list(seconds) == ["load", "rewrite", "verify", "write", "check", "total"]
    for m, key in zip(done, ["load", "rewrite", "verify", "write", "check"]):
        assert m.group(2) == f"{seconds[key]:.1f}"  # one clock per phase: the ✓ line's is the report's
    time_row = next(ln for ln in proc.stdout.splitlines() if ln.startswith("time"))
    assert f"load {seconds['load']:.1f} s" in time_row and "total" in time_row


def test_progress_on_a_terminal_is_a_bar_with_stage_counts():
    import io

    from rich.console import Console

    from reparam.cli.render import Steps

    buffer = io.StringIO()
    steps = Steps(Console(file=buffer, force_terminal=True, width=120), quiet=False, stages=3)
    with steps.step("load", "loading m"):
        assert "stage 1/3" in steps._progress.tasks[0].fields["counts"]
    with steps.phases({"rewrite": "rewriting"}) as progress:
        progress("rewrite")
        progress("rewrite", 5, 10)
        assert steps._progress.tasks[-1].fields["counts"] == "stage 2/3 · 5/10"
    steps.close()
    assert list(steps.seconds) == ["load", "rewrite"] and "✓ loading m" in buffer.getvalue()


def test_json_documents_have_schema_versions_status_and_times(tmp_path):
    out = tmp_path / "deploy.pt"
    doc = json.loads(run("fuse", "tests.cli_models:TinyRepVGG", "-s", SHAPE, "-o", out, "--json").stdout)
    assert doc["schema_version"] == 1 and doc["tool"]["name"] == "reparam" and doc["status"] == "ok"
    assert doc["torch"] == torch.__version__.split("+")[0] or doc["torch"].startswith(torch.__version__[:4])
    assert {"load", "rewrite", "verify", "write", "total"} <= set(doc["seconds"])
    assert doc["seconds"]["total"] >= sum(v for k, v in doc["seconds"].items() if k != "total")
    bench = json.loads(run("bench", "tests.cli_models:TinyRepVGG", "-s", SHAPE, "-n", "2", "--json").stdout)
    assert isinstance(bench["max_error"], float) and bench["max_error"] < 1e-12 and bench["status"] == "ok"
    for command in (["inspect", "tests.cli_models:TinyRepVGG", "-s", SHAPE, "--json"], ["rules", "--json"]):
        d = json.loads(run(*command).stdout)
        assert d["schema_version"] == 1 and d["status"] == "ok" and d["command"] == command[0]
    failed = run("fuse", "tests.cli_models:broken_factory", "-o", out, "--json", check_rc=2)
    doc = json.loads(failed.stdout)
    assert doc["status"] == "error" and doc["error"]["code"] == 2 and "always fails" in doc["error"]["message"]


def test_help_version_and_completion():
    for flags in (["-h"], ["--help"], ["fuse", "-h"]):
        assert "Usage: reparam" in run(*flags).stdout
    assert run("-V").stdout == run("--version").stdout == f"reparam {importlib.metadata.version('reparam')}\n"
    env = dict(script_env(), _REPARAM_COMPLETE="complete_bash", COMP_WORDS="reparam fu", COMP_CWORD="1")
    proc = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["fuse"], proc
    assert "complete" in run("--show-completion", "bash").stdout


@pytest.mark.parametrize("flags", [["--version"], ["--help"], ["fuse", "--help"]])
def test_version_and_help_do_not_import_torch(flags):
    """Measured: the interpreter's import log (-X importtime) of the console script lists no torch module."""
    env = dict(script_env(), PYTHONPROFILEIMPORTTIME="1")
    proc = subprocess.run([str(SCRIPT), *flags], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    imported = [ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    assert imported and not [m for m in imported if m.split(".")[0] in ("torch", "rich", "numpy")], imported


def test_non_tty_output_is_neither_padded_nor_wrapped(pickled, tmp_path):
    proc = run("inspect", pickled, "--trust", "-s", SHAPE)
    lines = proc.stdout.splitlines()
    assert all(ln == ln.rstrip() for ln in lines), [ln for ln in lines if ln != ln.rstrip()]
    assert max(map(len, lines)) > 80  # a long refusal stays on one line
    refusal = next(ln for ln in lines if ln.startswith("serial_merge"))
    assert "the padded border would see the bias" in refusal


def test_factory_arguments_and_timm_names(tmp_path):
    doc = json.loads(run("inspect", "tests.cli_models:Wide", "--arg", "channels=6", "-s", SHAPE, "--json").stdout)
    assert doc["report"]["before"]["params"] != json.loads(
        run("inspect", "tests.cli_models:Wide", "-s", SHAPE, "--json").stdout)["report"]["before"]["params"]
    proc = run("inspect", "tests.cli_models:Wide", "--arg", "colour=3", "-s", SHAPE, check_rc=None)
    assert_one_line_error(proc, 2, "colour", "--arg")
    assert_one_line_error(run("inspect", pickled_path(tmp_path), "--trust", "--arg", "a=1", check_rc=None), 2,
                          "--arg passes keyword arguments to a factory")
    pytest.importorskip("timm")
    doc = json.loads(run("inspect", "timm:repvgg_a0", "--arg", "num_classes=10", "-s", "1,3,32,32", "--json").stdout)
    assert doc["report"]["fired_counts"] and doc["report"]["after"]["bns"] == 0
    assert_one_line_error(run("inspect", "timm:no_such_net", check_rc=None), 2, "timm has no model 'no_such_net'")


def pickled_path(folder: Path) -> Path:
    path = folder / "some.pt"
    torch.save(tiny_repvgg(), path)
    return path


MAIN_SCRIPT = '''
import torch, torch.nn as nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    def forward(self, x):
        return self.bn(self.conv(x))
torch.save(Net(), "main.pt")
m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
m[1].running_var[1] = float("nan")
torch.save(m, "nan.pt")
'''


def test_user_and_environment_errors_are_exit_2_naming_the_option_or_file(tmp_path):
    subprocess.run([sys.executable, "-c", MAIN_SCRIPT], cwd=tmp_path, check=True)
    factory = "tests.cli_models:TinyRepVGG"
    cases = {
        "allocation": (["-s", "1,3,10000000,10000000"], "--input-shape 1,3,10000000,10000000"),
        "overflow": (["-s", "99999999999999999999999,3,16,16"], "bad --input-shape"),
        "long name": (["-s", SHAPE, "-o", tmp_path / ("n" * 300 + ".pt")], "-o"),
    }
    for name, (extra, needle) in cases.items():
        out = [] if "-o" in extra else ["-o", tmp_path / "d.pt"]
        assert_one_line_error(run("fuse", factory, *extra, *out, check_rc=None), 2, needle)
    proc = run("fuse", tmp_path / "nan.pt", "--trust", "-o", tmp_path / "d.pt", check_rc=None)
    assert_one_line_error(proc, 2, "non-finite weights", "'1.running_var' holds NaN")
    assert "conv_bn_fold" not in proc.stderr and "rules/disable" not in proc.stderr
    proc = run("fuse", tmp_path / "main.pt", "--trust", "-o", tmp_path / "d.pt", check_rc=None)
    assert_one_line_error(proc, 2, "__main__", "state_dict", "--weights")
    assert only_files(tmp_path) == {"main.pt", "nan.pt"}


def test_a_wrong_rewrite_is_named_with_advice_that_exists(pickled, tmp_path):
    rules = tmp_path / "my_rules.py"
    rules.write_text(WRONG_RULE)
    proc = run("fuse", pickled, "--trust", "-s", SHAPE, "-o", tmp_path / "d.pt", "--rules", rules, check_rc=None)
    assert_one_line_error(proc, 3, "--disable drop_affine")
    assert "rules/disable" not in proc.stderr
