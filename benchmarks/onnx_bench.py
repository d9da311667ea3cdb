"""RepNeXt exported to ONNX: the export as is → ``reparam.fuse_onnx`` → the export of the FX-fused model.

    python -m benchmarks.onnx_bench [--variants m0,m1] [--exporters torchscript,dynamo] [--rounds 40] [--no-write]

Per variant (1000 classes, BatchNorm statistics randomized, 224×224, batch 1) and exporter (torch.onnx.export
with dynamo=False, opset 17, or dynamo=True, opset 18; each with its default settings): ONNX node, Conv and
BatchNormalization counts, and ONNX Runtime latency (ORT_ENABLE_ALL, 2 intra-op threads, median over interleaved
rounds of the three models in the same run; also with 1 thread) of (1) the training-time model's export as is, (2) that file after
``reparam.fuse_onnx``, (3) the export of ``reparam.fuse(model)``. Prints the table and writes
docs/benchmarks-onnx.md.
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

import reparam
from examples.repnext.measure import build, latencies
from reparam.frontends.onnx.backend import relative_error

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks-onnx.md"
THREADS = 2
SIZE = 224
EXPORTERS = ("torchscript", "dynamo")


def export(model: torch.nn.Module, x: torch.Tensor, exporter: str) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            return torch.onnx.export(model, (x,), dynamo=True, opset_version=18, verbose=False).model_proto
        f = io.BytesIO()
        torch.onnx.export(model, (x,), f, dynamo=False, opset_version=17)
        return onnx.load_from_string(f.getvalue())


def session(model: onnx.ModelProto, threads: int = THREADS):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # sessions run interleaved: an idle session's pool must not spin on the cores the next one needs
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda a: sess.run(None, {name: a})


def counts(model: onnx.ModelProto) -> tuple[int, int, int]:
    ops = Counter(n.op_type for n in model.graph.node)
    return len(model.graph.node), ops["Conv"], ops["BatchNormalization"]


def bench(variant: str, exporter: str, rounds: int) -> dict:
    model = build(variant, seed=0)
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    as_is = export(model, x, exporter)
    t0 = time.perf_counter()
    ours, rep = reparam.fuse_onnx(as_is, report=True)
    seconds = time.perf_counter() - t0
    fx = export(reparam.fuse(model, x), x, exporter)
    runs = [session(m) for m in (as_is, ours, fx)]
    probe = np.random.default_rng(2).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    want = runs[0](probe)
    errors = [relative_error(r(probe), want) for r in runs[1:]]
    lat = latencies(runs, x.numpy(), threads=THREADS, rounds=rounds, inner=2)
    single = latencies([session(m, 1) for m in (as_is, ours, fx)], x.numpy(), threads=1, rounds=rounds, inner=2)
    return dict(variant=variant.upper(), exporter=exporter, counts=[counts(m) for m in (as_is, ours, fx)],
                latency=lat, single=single, errors=errors, seconds=seconds, fired=sum(rep.fired_counts().values()))


def table(rows: list[dict]) -> str:
    out = [f"| variant | exporter | model | nodes | Conv | BN | ORT latency, {THREADS} threads | vs as is "
           "| ORT latency, 1 thread | vs as is | rel. error vs as is |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base, base1 = r["latency"][0], r["single"][0]
        labels = ("export as is", f"`fuse_onnx` ({r['fired']} rewrites, {r['seconds']:.1f} s)",
                  "export of `reparam.fuse`")
        for k, label in enumerate(labels):
            nodes, convs, bns = r["counts"][k]
            err = "—" if k == 0 else f"{r['errors'][k - 1]:.1e}"
            out.append(f"| {r['variant']} | {r['exporter']} | {label} | {nodes} | {convs} | {bns} "
                       f"| {r['latency'][k] * 1e3:.2f} ms | {r['latency'][k] / base:.2f} "
                       f"| {r['single'][k] * 1e3:.2f} ms | {r['single'][k] / base1:.2f} | {err} |")
    return "\n".join(out)


def checks(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        (n0, *_), (n1, *_), (n2, *_) = r["counts"]
        l0, l1, _ = r["latency"]
        s0, s1, _ = r["single"]
        lines.append(f"- {r['variant']} / {r['exporter']}: nodes after `fuse_onnx` {n1} vs export of the FX-fused "
                     f"model {n2} ({'met' if n1 <= n2 else 'MISSED'}: no more nodes); latency {l1 * 1e3:.2f} ms vs "
                     f"{l0 * 1e3:.2f} ms as is (ratio {l1 / l0:.2f}; {'met' if l1 <= l0 else 'MISSED'}: not slower); "
                     f"1 thread: ratio {s1 / s0:.2f}")
    return lines


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.onnx_bench", description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="m0,m1", help="comma-separated RepNeXt variants (default m0,m1)")
    p.add_argument("--exporters", default=",".join(EXPORTERS), help="torchscript, dynamo or both (default)")
    p.add_argument("--rounds", type=int, default=40, help="interleaved latency rounds (median; default 40: the 2-thread latencies are noisy)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks-onnx.md alone")
    args = p.parse_args(argv)
    args.variants = [v.strip().lower() for v in args.variants.split(",") if v.strip()]
    args.exporters = [e.strip() for e in args.exporters.split(",") if e.strip()]
    if not args.variants or any(e not in EXPORTERS for e in args.exporters) or not args.exporters:
        p.error(f"give variants like m0,m1 and exporters from {', '.join(EXPORTERS)}")
    if args.rounds < 1:
        p.error("--rounds must be positive")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    import onnxruntime as ort

    started, load0 = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for v in args.variants:
        for e in args.exporters:
            print(f"[onnx] {v.upper()} / {e} ...", file=sys.stderr, flush=True)
            try:
                rows.append(bench(v, e, args.rounds))
            except ValueError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
    text = "\n".join([
        "# Benchmarks: ONNX",
        "",
        "## RepNeXt exported to ONNX: as is → `reparam.fuse_onnx` → export of `reparam.fuse`",
        "",
        f"Reproduce: `python -m benchmarks.onnx_bench` (part of `make bench`). Measured "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPUs, Linux "
        f"{platform.release()}; torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}; "
        f"1-minute load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; whole run "
        f"{time.perf_counter() - started:.0f} s.",
        "",
        "Training-time RepNeXt (1000 classes, BatchNorm statistics randomized) exported with each exporter's "
        "defaults (torchscript: `dynamo=False, opset_version=17`, which already folds Conv+BN pairs; dynamo: "
        "`dynamo=True, opset_version=18`). `fuse_onnx` runs on that file with its default input shape "
        f"(1×3×{SIZE}×{SIZE}) and onnxruntime verification (its time is included). ORT latency: "
        f"CPUExecutionProvider, ORT_ENABLE_ALL, {THREADS} intra-op threads (spinning off: the sessions run "
        f"interleaved, and an idle session's spinning pool would take the next one's cores), batch 1, "
        f"{SIZE}×{SIZE}, median over "
        f"{args.rounds} rounds in which the three models run alternately (2 calls each); 'vs as is' is the "
        "ratio to the export as is in the same run. The same again with 1 intra-op thread: on a loaded "
        "machine a spinning 2-thread pool waits for CPU time, which inflates and blurs the 2-thread numbers "
        "(see the load average above). Errors: max-abs relative error against the export as is, "
        "both in ORT float32.",
        "",
        table(rows),
        "",
        "Acceptance (our pass leaves no more nodes than the export of the FX-fused model, and is not slower than "
        "the export as is):",
        *checks(rows),
        "",
    ])
    print(text)
    if not args.no_write:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        tmp = DOC.with_suffix(".md.tmp")
        old = DOC.read_text() if DOC.exists() else ""
        begin, end = "<!-- onnx-real: begin -->", "<!-- onnx-real: end -->"  # benchmarks/onnx_real_bench.py's
        if begin in old and end in old:
            text = text.rstrip("\n") + "\n\n" + old[old.index(begin):old.index(end) + len(end)] + "\n"
        tmp.write_text(text)
        os.replace(tmp, DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main())
