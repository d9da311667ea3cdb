"""RepNeXt M0–M5: training-time vs ``reparam.fuse`` deploy form.

    python -m benchmarks.repnext_bench [--variants m0,m1,...] [--repeats 3] [--rounds 15] [--no-write]

Per variant (1000 classes, BatchNorm statistics randomized, 224×224, batch 1): parameters and MACs (forward
hooks on Conv2d/Linear), FX ops and convs before → after, fuse time with and without end-to-end verification
(median of ``--repeats``), torch eager latency before → after and their ratio (2 threads, medians of interleaved
rounds in the same run), and ONNX Runtime latency of both exported models (torch.onnx.export with dynamo=False,
opset 17; ORT_ENABLE_ALL, 2 intra-op threads). Prints the tables and writes its section of docs/benchmarks.md
(between ``<!-- repnext-bench -->`` markers; other sections of that file are kept).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import reparam
from examples.repnext.measure import VARIANTS, build, count_macs, fp64_reference, latencies, median_time, relative_error
from reparam.frontends.fx.counting import count_model
from benchmarks.tables import machine, write_section

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
SECTION = "repnext-bench"
THREADS = 2
SIZE = 224
TARGETS = "fuse time of M5 ≤ 1 s without verification and ≤ 3 s with it; M1 deploy/train eager latency ratio ≤ 0.62"


def ort_session(model: torch.nn.Module, x: torch.Tensor, path: str):
    """Export ``model`` to ONNX (TorchScript exporter, opset 17) and open it in ONNX Runtime with 2 threads."""
    import onnxruntime as ort

    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice is not news here
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    # sessions run interleaved: an idle session's pool must not spin on the cores the next one needs
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return lambda a: sess.run(None, {"x": a})[0]


def bench_variant(variant: str, repeats: int, rounds: int) -> dict:
    model = build(variant, seed=0)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    fused, rep = reparam.fuse(model, x, report=True)
    t_verify = median_time(lambda: reparam.fuse(model, x), repeats)
    t_plain = median_time(lambda: reparam.fuse(model, x, verify=False), repeats)
    t_graph = median_time(lambda: reparam.fuse(model, x, verify=False, keep_class=False), repeats)
    before, after = count_model(model), count_model(fused)

    probe = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    want = fp64_reference(model, probe)
    with torch.no_grad():
        err32 = relative_error(fused(probe), want)
    eager = latencies([model, fused], x, threads=THREADS, rounds=rounds, inner=2)

    with tempfile.TemporaryDirectory() as tmp:
        run_train = ort_session(model, x, os.path.join(tmp, "train.onnx"))
        run_fused = ort_session(fused, x, os.path.join(tmp, "fused.onnx"))
        xn = x.numpy()
        ort_lat = latencies([run_train, run_fused], xn, threads=THREADS, rounds=rounds, inner=2)
        ort_err = relative_error(torch.from_numpy(run_fused(probe.numpy())), want)

    return dict(variant=variant.upper(), params=(before.params, after.params),
                macs=(count_macs(model, x), count_macs(fused, x)), ops=(before.ops, after.ops),
                convs=(before.convs, after.convs), bns=(before.bns, after.bns),
                fuse=(t_plain, t_verify, t_graph), err64=rep.verification.error_fp64, err32=err32, ort_err=ort_err,
                eager=tuple(eager), ort=tuple(ort_lat), fired=sum(rep.fired_counts().values()),
                refused=len(rep.refusals))


def _arrow(pair, fmt="{:,}"):
    return f"{fmt.format(pair[0])} → {fmt.format(pair[1])}"


def tables(rows: list[dict]) -> str:
    """Markdown tables of the results."""
    out = ["| variant | params | MACs | FX ops | convs | BNs | fuse, no verify | fuse, verified | one graph, no verify "
           "| fp64 err | fp32 err | ORT fp32 err |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['variant']} | {r['params'][0] / 1e6:.2f}M → {r['params'][1] / 1e6:.2f}M "
                   f"| {r['macs'][0] / 1e9:.3f}G → {r['macs'][1] / 1e9:.3f}G | {_arrow(r['ops'])} "
                   f"| {_arrow(r['convs'])} | {_arrow(r['bns'])} "
                   f"| {r['fuse'][0]:.2f} s | {r['fuse'][1]:.2f} s | {r['fuse'][2]:.2f} s "
                   f"| {r['err64']:.1e} | {r['err32']:.1e} | {r['ort_err']:.1e} |")
    out += ["", "| variant | torch eager train → deploy | ratio | ONNX Runtime train → deploy | ratio |",
            "|---|---|---|---|---|"]
    for r in rows:
        (et, ed), (ot, od) = r["eager"], r["ort"]
        out.append(f"| {r['variant']} | {et * 1e3:.2f} ms → {ed * 1e3:.2f} ms | {ed / et:.2f} "
                   f"| {ot * 1e3:.2f} ms → {od * 1e3:.2f} ms | {od / ot:.2f} |")
    return "\n".join(out)


def targets(rows: list[dict]) -> list[str]:
    by = {r["variant"]: r for r in rows}
    lines = []
    if "M5" in by:
        plain, verified, graph = by["M5"]["fuse"]
        lines.append(f"- M5 fuse time without verification: {plain:.2f} s as a drop-in model, {graph:.2f} s as one "
                     f"graph (target ≤ 1 s: {'met' if plain <= 1 else 'missed'} / {'met' if graph <= 1 else 'missed'}); "
                     f"with verification: {verified:.2f} s (target ≤ 3 s: {'met' if verified <= 3 else 'missed'})")
    if "M1" in by:
        et, ed = by["M1"]["eager"]
        lines.append(f"- M1 deploy/train eager latency ratio: {ed / et:.2f} (target ≤ 0.62: "
                     f"{'met' if ed / et <= 0.62 else 'missed'})")
    return lines


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.repnext_bench", description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, e.g. m0,m1 (default all)")
    p.add_argument("--repeats", type=int, default=3, help="fuse-time repetitions (median; default 3)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved latency rounds (median; default 15)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = p.parse_args(argv)
    args.variants = [v.strip().lower() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or not args.variants:
        p.error(f"unknown variant(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    if args.repeats < 1 or args.rounds < 1:
        p.error("--repeats and --rounds must be positive")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    started = time.perf_counter()
    load0 = os.getloadavg()[0]
    rows = []
    for v in args.variants:
        print(f"[repnext] {v.upper()} ...", file=sys.stderr, flush=True)
        rows.append(bench_variant(v, args.repeats, args.rounds))
    load1 = os.getloadavg()[0]
    import onnxruntime as ort

    table = tables(rows)
    goals = targets(rows)
    cmd = "python -m benchmarks.repnext_bench" + (
        "" if args.variants == list(VARIANTS) else f" --variants {','.join(args.variants)}")
    text = "\n".join([
        "## RepNeXt M0–M5: training-time → `reparam.fuse`",
        "",
        f"Reproduce: `make bench` (all benchmarks) or `{cmd}`. "
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}; "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, Python {platform.python_version()}; "
        f"1-minute load average {load0:.2f} at the start, {load1:.2f} at the end; "
        f"whole run {time.perf_counter() - started:.0f} s.",
        "",
        f"1000 classes, BatchNorm statistics randomized, input 1×3×{SIZE}×{SIZE}. Fuse times: median of "
        f"{args.repeats} calls of `reparam.fuse` (verified = with the end-to-end float64 check; one graph = "
        "`keep_class=False`, the fused GraphModule alone, without verification; the default is the drop-in deploy "
        "model, docs/design.md). Errors: max-abs "
        "relative error against the training-time model run in float64 (fp64 err: the fused model's float64 "
        "twin; fp32 err: the fused float32 model in torch; ORT fp32 err: the exported fused model in ONNX "
        f"Runtime). Latencies: batch 1, {THREADS} threads, median over {args.rounds} rounds in which train and "
        "deploy models run alternately (2 calls each); ratio = deploy / train from the same run. ONNX: "
        "`torch.onnx.export(dynamo=False, opset_version=17)`, ORT_ENABLE_ALL, 2 intra-op threads (spinning off: "
        "the two sessions run interleaved). MACs count "
        "Conv2d and Linear multiply-accumulates via forward hooks.",
        "",
        table,
        "",
        f"Targets ({TARGETS}):",
        *goals,
    ])
    print(text)
    if not args.no_write:
        write_section(DOC, SECTION, text)
        print(f"\nwrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
