"""The installed ``reparam`` console script, driven in a subprocess: every input kind, every output kind,
every bad-input case (one line on stderr, documented exit code, nothing written)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reparam.catalogue import rule_catalogue
from tests.cli_models import tiny_repvgg, two_inputs

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "reparam"
SHAPE = "1,3,12,12"
X = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(7))


def run(*args, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    assert SCRIPT.exists(), f"{SCRIPT} is missing: run `make install` first"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               COLUMNS="120")
    proc = subprocess.run([str(SCRIPT), *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
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


def assert_one_line_error(proc, rc: int, *needles: str) -> None:
    assert proc.returncode == rc, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("reparam: error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert all(ln.startswith(("reparam: error:", "✓")) for ln in lines), proc.stderr
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
from reparam.ops import Affine
from reparam.pattern import P, X
from reparam.rule import rule


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


# ------------------------------------------------------------------------------------------- bad input

def test_pickled_module_without_trust_is_refused(pickled, tmp_path):
    proc = run("fuse", pickled, "-o", tmp_path / "deploy.pt", check_rc=None)
    assert_one_line_error(proc, 2, "--trust", "--weights")
    assert only_files(tmp_path) == {"model.pt"}


def _bad_cases(tmp_path: Path, pickled: Path) -> dict[str, tuple[list, str]]:
    (tmp_path / "model.txt").write_text("not a model")
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage, not a torch file")
    torch.save(tiny_repvgg().state_dict(), tmp_path / "weights.pth")
    torch.save({"stem.0.weight": torch.zeros(2)}, tmp_path / "other.pth")
    out = tmp_path / "deploy.pt"
    return {
        "missing file": (["fuse", tmp_path / "nope.pt", "--trust", "-o", out], "no such file"),
        "unknown input format": (["fuse", tmp_path / "model.txt", "-o", out], "unknown model format"),
        "unknown output format": (["fuse", pickled, "--trust", "-o", tmp_path / "deploy.h5"],
                                  "unknown output format"),
        "unreadable file": (["fuse", tmp_path / "garbage.pt", "--trust", "-o", out], "could not be read"),
        "state_dict as model": (["fuse", tmp_path / "weights.pth", "-o", out], "pkg.module:factory --weights"),
        "broken factory": (["fuse", "tests.cli_models:broken_factory", "-o", out], "always fails"),
        "unknown factory": (["fuse", "tests.cli_models:nothing_here", "-o", out], "no attribute"),
        "weights that do not fit": (["fuse", "tests.cli_models:TinyRepVGG", "-w", tmp_path / "other.pth", "-o",
                                     out], "does not fit"),
        "shape that does not fit": (["fuse", pickled, "--trust", "-s", "1,5,12,12", "-o", out], "--input-shape"),
        "bad shape text": (["fuse", pickled, "--trust", "-s", "1,3,a", "-o", out], "bad --input-shape"),
        "output is the input": (["fuse", pickled, "--trust", "-o", pickled], "is the input file"),
        "unknown rule": (["fuse", pickled, "--trust", "--disable", "no_such_rule", "-o", out], "no_such_rule"),
    }


CASES = ["missing file", "unknown input format", "unknown output format", "unreadable file", "state_dict as model",
         "broken factory", "weights that do not fit", "shape that does not fit",
         "output is the input", "unknown rule"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_nothing_written(case, pickled, tmp_path):
    args, needle = _bad_cases(tmp_path, pickled)[case]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    proc = run(*args, check_rc=None)
    assert_one_line_error(proc, 2, needle)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before  # nothing written or touched


def test_verification_failure_exits_3_and_writes_nothing(pickled, tmp_path):
    out = tmp_path / "deploy.onnx"
    proc = run("fuse", pickled, "--trust", "-s", SHAPE, "-o", out, "--tolerance", "1e-30",
               "--report", tmp_path / "r.json", check_rc=None)
    assert_one_line_error(proc, 3, "verification failed", "first wrong rewrite")
    assert only_files(tmp_path) == {"model.pt"}


# ------------------------------------------------------------------------------------------- other commands

def test_rules_lists_every_rule_with_its_identity():
    proc = run("rules", "--json")
    listed = [(r["name"], r["identity"]) for r in json.loads(proc.stdout)]
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
    from examples.repnext import repnext_m1
    from examples.repnext.utils import randomize_bn_stats

    model = randomize_bn_stats(repnext_m1(), torch.Generator().manual_seed(0)).eval()
    src, out = tmp_path / "repnext_m1.pt", tmp_path / "deploy.pt"
    torch.save(model, src)
    # Verified here against the original in float32; the CLI's float64 check of all of M1 costs tens of seconds.
    proc = run("fuse", src, "--trust", "--input-shape", "1,3,224,224", "-o", out, "--no-verify")
    bns = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert f"{bns} → 0" in proc.stdout and "rules fired" in proc.stdout, proc.stdout
    fused = torch.load(out, weights_only=False)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert close(fused(x), model(x), rtol=1e-4)


def test_docs_cover_every_command_and_option():
    import typer.main

    from reparam.cli import app

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
    from reparam.saving import atomic_path

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
