"""timm's reparameterizable families: training model vs timm's hand-written deploy form vs ``reparam.fuse``.

    python -m benchmarks.zoo_bench [--models repvgg_a0,...] [--size 224] [--repeats 3] [--rounds 15] [--no-write]
    python -m benchmarks.zoo_bench --capture [--no-write]      # only the capture section (see below)
    python -m benchmarks.zoo_bench --blocks [--no-write]       # only the authors' blocks section (see below)

Per model (``pretrained=False``, eval, BatchNorm statistics and layer scales randomized, batch 1): conv / BN /
Linear / op counts and parameters of the three forms (``reparam.core.report.count_model``: calls in the FX graph,
the same function for all three); the relative error of each form against the float64 reference (the training
model cast to float64), in float32 and when fused from a float64 copy; torch eager latency of the three (2
threads, interleaved rounds in one process, medians) and the ratio ours / timm's; fuse time of
``timm.models.reparameterize_model`` and of ``reparam.fuse`` with and without its float64 verification
(medians of ``--repeats``). Prints the tables and writes docs/benchmarks-zoo.md.

``--capture`` measures the models that symbolic torch.fx tracing reads only in part (``CAPTURE_MODELS``: LeViT's
shape-only second uses, ResNetV2-BiT's weight-standardized convs) and rewrites only their section of the doc:
counts of what each form executes on the example input (``counting.count_run``: ATen calls, so a weight
standardization's batch-norm call counts as a BN), errors against the float64 reference, one fuse time.

``--blocks`` measures small networks of blocks written as their authors write them (``examples.authors.blocks``:
DBB's pad-with-the-BN-bias by index writes, ACNet's crops) the same way, against the minimal form their authors'
own conversion reaches, and rewrites only their section.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
from pathlib import Path

import torch

import reparam
from examples.repnext.measure import latencies, median_time
from examples.zoo.timm_models import MODELS, build, timm_deploy
from reparam.frontends import verify
from reparam.frontends.fx.counting import count_model, count_run

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks-zoo.md"
THREADS = 2
FORMS = ("training", "timm deploy", "reparam")
NOTE = ('Reading the table: the verified fuse time adds the end-to-end float64 check, which runs the '
        'training model and the fused twin in float64 (torch\'s float64 CPU path for grouped and depthwise '
        'convolutions is slow, so depthwise-heavy models pay most). `verify=False` skips it; the local float64 '
        'check of every rewrite still runs. *One graph* is `reparam.fuse(model, x, verify=False, keep_class=False)`: '
        'the fused GraphModule alone; the default keeps the model\'s class (a drop-in deploy model: its submodules '
        'fused in place, then the whole graph over them, docs/design.md). Absolute latencies depend on the '
        'machine\'s load (see above); the ratio column comes from interleaved runs in one process.')


def error(model: torch.nn.Module, x: torch.Tensor, want: list[torch.Tensor]) -> str:
    try:
        return f"{verify.relative_error(verify.run(model, (x,)), want):.1e}"
    except Exception as err:  # timm's fuse can mix dtypes (see the doc); report it instead of stopping
        return f"fails ({type(err).__name__})"


def measure(name: str, size: int, repeats: int, rounds: int) -> dict:
    model = build(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    theirs = timm_deploy(model)
    ours, report = reparam.fuse(model, x, report=True)
    forms = dict(zip(FORMS, (model, theirs, ours)))

    want = verify.run(model, (x,), torch.float64)
    model64, x64 = copy.deepcopy(model).double(), x.double()
    forms64 = {"training": model64, "timm deploy": timm_deploy(model64), "reparam": reparam.fuse(model64, x64)}
    row = {"name": name, "counts": {k: count_model(m) for k, m in forms.items()},
           "fp32": {k: error(m, x, want) for k, m in forms.items()},
           "fp64": {k: error(m, x64, want) for k, m in forms64.items()},
           "verification": report.verification.error_fp64}
    row["latency"] = dict(zip(FORMS, latencies(list(forms.values()), x, threads=THREADS, rounds=rounds)))
    row["fuse"] = {"timm": median_time(lambda: timm_deploy(model), repeats),
                   "reparam": median_time(lambda: reparam.fuse(model, x), repeats),
                   "reparam, no verification": median_time(lambda: reparam.fuse(model, x, verify=False), repeats),
                   "one graph": median_time(lambda: reparam.fuse(model, x, verify=False, keep_class=False), repeats)}
    return row


CAPTURE_MODELS = {"levit_128s": 224, "resnetv2_50x1_bit": 64}  # LeViT's attention biases fix its input size
CAPTURE_BEGIN, CAPTURE_END = "<!-- capture section: python -m benchmarks.zoo_bench --capture -->", "<!-- /capture -->"


def capture_row(name: str, size: int) -> dict:
    import time

    model = build(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    theirs = timm_deploy(model)
    t0 = time.perf_counter()
    ours, report = reparam.fuse(model, x, report=True)
    seconds = time.perf_counter() - t0
    want = verify.run(model, (x,), torch.float64)
    forms = dict(zip(FORMS, (model, theirs, ours)))
    return {"name": name, "size": size, "counts": {k: count_run(m, (x,)) for k, m in forms.items()},
            "fp32": {k: error(m, x, want) for k, m in forms.items()}, "verification": report.verification.error_fp64,
            "seconds": seconds, "notes": [n for n in report.notes if "example inputs" in n]}


def capture_section(rows: list[dict], started, load) -> str:
    out = [CAPTURE_BEGIN, "", "## Models symbolic tracing reads only in part", "",
           f"Measured {started:%Y-%m-%d %H:%M} UTC with `python -m benchmarks.zoo_bench --capture` (load average "
           f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}: fuse times are noisy). Counts are what each form "
           "executes on the example input, as ATen calls (`reparam.frontends.fx.counting.count_run`): a "
           "weight-standardized conv's statistics of its weights count as a BN call.", "",
           "| model | input | form | convs | BNs | linears | ops | params | rel. error fp32 |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for form in FORMS:
            c = r["counts"][form]
            out.append(f"| {r['name']} | {r['size']}² | {form} | {c.convs} | {c.bns} | {c.linears} | {c.ops} | "
                       f"{c.params:,} | {r['fp32'][form]} |")
    out += ["", "| model | capture | fuse (verified) | our verification error (fp64) |", "|---|---|---:|---:|"]
    for r in rows:
        how = "; ".join(r["notes"]) or "symbolic trace"
        out.append(f"| {r['name']} | {how} | {r['seconds']:.1f} s | {r['verification']:.1e} |")
    return "\n".join(out + ["", CAPTURE_END, ""])


BLOCKS_BEGIN, BLOCKS_END = "<!-- authors' blocks: python -m benchmarks.zoo_bench --blocks -->", "<!-- /blocks -->"
BLOCK_SIZE = 56


def block_models() -> dict:
    """name -> (model builder, the convs of the minimal form the authors' own conversion reaches)."""
    from examples.authors import blocks

    return {"DBB ×3 (index writes into the borders)": (blocks.dbb_net, 3),
            "ACNet ×3 (padding < k//2: crops)": (blocks.acnet_net, 3),
            "RepMLP ×3 (reshape(*x.size()), local convs beside the FC)": (blocks.repmlp_net, 4)}


def block_row(name: str, make, minimal: int) -> dict:
    import time

    from reparam.testing import randomize_params

    model = randomize_params(make(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 3, BLOCK_SIZE, BLOCK_SIZE, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    ours, report = reparam.fuse(model, x, report=True)
    seconds = time.perf_counter() - t0
    want = verify.run(model, (x,), torch.float64)
    forms = {"training": model, "reparam": ours}
    return {"name": name, "minimal": minimal, "counts": {k: count_run(m, (x,)) for k, m in forms.items()},
            "fp32": {k: error(m, x, want) for k, m in forms.items()}, "verification": report.verification.error_fp64,
            "seconds": seconds, "fired": report.fired_counts(),
            "notes": [n for n in report.notes if "example inputs" in n]}


def blocks_section(rows: list[dict], started, load) -> str:
    out = [BLOCKS_BEGIN, "", "## Blocks as their authors write them", "",
           f"Measured {started:%Y-%m-%d %H:%M} UTC with `python -m benchmarks.zoo_bench --blocks` (load average "
           f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}), input 1×3×{BLOCK_SIZE}², parameters and BN statistics "
           "randomized. The networks are in `examples/authors/blocks.py`; counts are what each form executes "
           "(`count_run`, ATen calls: DBB's border writes count as ops). The authors' own conversion reaches the "
           "minimal form, one k×k conv per block (RepMLP: the stem and each block's FC, a grouped 1×1 conv).", "",
           "| network | form | convs | BNs | ops | params | rel. error fp32 |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        for form in ("training", "reparam"):
            c = r["counts"][form]
            out.append(f"| {r['name']} | {form} | {c.convs} | {c.bns} | {c.ops} | {c.params:,} | {r['fp32'][form]} |")
        out.append(f"| {r['name']} | authors' conversion (minimal form) | {r['minimal']} | 0 | | | |")
    out += ["", "| network | capture | rules that made the difference | fuse (verified) | verification error (fp64) |",
            "|---|---|---|---:|---:|"]
    for r in rows:
        how = "; ".join(r["notes"]) or "symbolic trace"
        key = ", ".join(f"{k}×{v}" for k, v in sorted(r["fired"].items()) if k in ("const_pad_commute", "crop_as_pad", "conv_to_dense"))
        out.append(f"| {r['name']} | {how} | {key or '—'} | {r['seconds']:.1f} s | {r['verification']:.1e} |")
    return "\n".join(out + ["", BLOCKS_END, ""])


def write_section(section: str, begin: str, end: str) -> None:
    text = DOC.read_text()
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(DOC)


def tables(rows: list[dict]) -> list[str]:
    out = ["| model | form | convs | BNs | linears | ops | params | rel. error fp32 | rel. error fp64 | latency (ms) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for form in FORMS:
            c = r["counts"][form]
            out.append(f"| {r['name']} | {form} | {c.convs} | {c.bns} | {c.linears} | {c.ops} | {c.params:,} | "
                       f"{r['fp32'][form]} | {r['fp64'][form]} | {1e3 * r['latency'][form]:.2f} |")
    out += ["", "| model | latency ours / timm's | fuse: timm | fuse: reparam (verified) | fuse: reparam (no verification) "
            "| fuse: reparam, one graph (no verification) | our verification error (fp64) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lat, f = r["latency"], r["fuse"]
        out.append(f"| {r['name']} | {lat['reparam'] / lat['timm deploy']:.2f} | {f['timm']:.2f} s | "
                   f"{f['reparam']:.2f} s | {f['reparam, no verification']:.2f} s | {f['one graph']:.2f} s "
                   f"| {r['verification']:.1e} |")
    return out


def document(rows: list[dict], args, started: datetime.datetime, load: tuple[float, float, float]) -> str:
    import timm

    cmd = "python -m benchmarks.zoo_bench " + " ".join(sys.argv[1:])
    return "\n".join([
        "# Benchmark: timm model zoo, reparam vs the authors' own fuse",
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC with `{cmd.strip()}` (torch {torch.__version__}, timm "
        f"{timm.__version__}, {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "at the start: the machine was shared, so absolute times are noisy; ratios come from interleaved runs in "
        "one process).",
        "",
        "Models: timm's `" + "`, `".join(r["name"] for r in rows) + f"` with `pretrained=False`, eval mode, every "
        "BatchNorm's statistics and affine parameters and every layer scale (`gamma`) randomized "
        f"(`examples/zoo/timm_models.py`), input 1×3×{args.size}×{args.size}.",
        "",
        "Forms: **training** is the model as built; **timm deploy** is `timm.models.reparameterize_model` (the "
        "hand-written `reparameterize`/`fuse` methods of each family); **reparam** is `reparam.fuse(model, x)` "
        "with the built-in rules and nothing specific to timm.",
        "",
        "How counts are made: one function for all three forms, `reparam.core.report.count_model`. It traces the model "
        "with `torch.fx.symbolic_trace` and counts call nodes: *convs* are `call_module` nodes of `nn.Conv*` and "
        "calls of `F.conv*`; *BNs* are `call_module` nodes of any `_BatchNorm` subclass and calls of "
        "`F.batch_norm` (timm's `BatchNormAct2d` is traced through, so it counts as its `F.batch_norm`); "
        "*linears* likewise; *ops* are all call nodes (modules, functions, methods; `nn.Identity` and the "
        "getattr/eq/`torch._assert` shape checks included, which is why the training and timm forms have many). "
        "Parameters are distinct parameter tensors' elements.",
        "",
        "Errors: max |y − y₆₄| / max |y₆₄| where y₆₄ is the training model run in float64. *fp32*: each form as "
        "deployed (float32). *fp64*: each form built from a float64 copy of the training model and run in "
        "float64 (\"fails\" means the deploy model cannot run in float64). Latency: torch eager, "
        f"`torch.set_num_threads({THREADS})`, batch 1, medians of {args.rounds} interleaved rounds (3 calls "
        f"each). Fuse times: medians of {args.repeats} runs; both sides copy the model (timm's "
        "`reparameterize_model` deep-copies it; `reparam.fuse` never modifies its input).",
        "",
        *tables(rows),
        "",
        NOTE,
        "",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--capture", action="store_true", help="only the models symbolic tracing reads in part")
    p.add_argument("--blocks", action="store_true", help="only the blocks written as their authors write them")
    args = p.parse_args(argv)
    if args.blocks:
        started, load = datetime.datetime.now(datetime.timezone.utc), os.getloadavg()
        section = blocks_section([block_row(n, make, m) for n, (make, m) in block_models().items()], started, load)
        print(section)
        if not args.no_write:
            write_section(section, BLOCKS_BEGIN, BLOCKS_END)
            print(f"wrote {DOC.relative_to(DOC.parent.parent)}")
        return 0
    if args.capture:
        started, load = datetime.datetime.now(datetime.timezone.utc), os.getloadavg()
        section = capture_section([capture_row(n, s) for n, s in CAPTURE_MODELS.items()], started, load)
        print(section)
        if not args.no_write:
            write_section(section, CAPTURE_BEGIN, CAPTURE_END)
            print(f"wrote {DOC.relative_to(DOC.parent.parent)}")
        return 0
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or args.size < 32 or args.repeats < 1 or args.rounds < 1:
        print(f"error: unknown model(s) {', '.join(unknown)} (choose from {', '.join(MODELS)})" if unknown else
              "error: --size must be >= 32 and --repeats, --rounds >= 1", file=sys.stderr)
        return 2
    started, load = datetime.datetime.now(datetime.timezone.utc), os.getloadavg()
    rows = []
    for name in names:
        print(f"measuring {name} ...", flush=True)
        rows.append(measure(name, args.size, args.repeats, args.rounds))
    print("\n".join(tables(rows)))
    if not args.no_write:
        text = document(rows, args, started, load)
        old = DOC.read_text() if DOC.exists() else ""
        if CAPTURE_BEGIN in old:  # the capture section is measured on its own (--capture): keep it
            text = text.rstrip("\n") + "\n\n" + CAPTURE_BEGIN + old.split(CAPTURE_BEGIN, 1)[1]
        tmp = DOC.with_suffix(".md.tmp")
        tmp.write_text(text)
        tmp.replace(DOC)
        print(f"wrote {DOC.relative_to(DOC.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
