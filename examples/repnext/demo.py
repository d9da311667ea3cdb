"""Fuse a training-time RepNeXt with ``reparam.fuse`` and compare it with its deploy form.

    python -m examples.repnext.demo [--variant m1] [--size 224] [--threads 2] [--rounds 10]

Builds the variant (BatchNorm statistics randomized, eval mode), fuses it with
``reparam.fuse(model, x, report=True)`` and prints, before → after: FX ops, convs, BatchNorms, Linears,
parameters, the float32 relative error against a float64 reference, the float64 error of the fused model,
the fuse time, and torch eager latency (batch 1, median of interleaved runs) with the ratio. Then the rules
that fired and the matches that were refused, with their reasons.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter

import torch

import reparam
from reparam.errors import ReparamError

from examples.repnext.measure import VARIANTS, build, fp64_reference, latencies, relative_error


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m examples.repnext.demo", description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="m1", type=str.lower, choices=VARIANTS, help="RepNeXt variant (default m1)")
    p.add_argument("--size", default=224, type=int, help="input height = width (default 224, at least 32)")
    p.add_argument("--threads", default=2, type=int, help="torch threads for the latency runs (default 2)")
    p.add_argument("--rounds", default=10, type=int, help="interleaved latency rounds (default 10)")
    p.add_argument("--seed", default=0, type=int, help="seed for weights, BN statistics and inputs")
    args = p.parse_args(argv)
    if args.size < 32:
        p.error(f"--size must be at least 32 (the network downsamples by 32), got {args.size}")
    if args.threads < 1 or args.rounds < 1:
        p.error("--threads and --rounds must be positive")
    return args


def _row(label, before, after, extra=""):
    return f"  {label:<28}{before:>16}  →  {after:<16}{extra}"


def _n(x):
    return "?" if x is None else f"{x:,}"


def main(argv=None) -> int:
    args = _parse(argv)
    torch.manual_seed(args.seed)
    model = build(args.variant, seed=args.seed)
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed + 7))

    t0 = time.perf_counter()
    try:
        fused, rep = reparam.fuse(model, x, report=True)
    except ReparamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    fuse_s = time.perf_counter() - t0

    probe = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed + 11))
    want = fp64_reference(model, probe)
    with torch.no_grad():
        err_before = relative_error(model(probe), want)
        err_after = relative_error(fused(probe), want)
    t_before, t_after = latencies([model, fused], x, threads=args.threads, rounds=args.rounds)

    b, a = rep.before, rep.after
    v = rep.verification
    title = f"RepNeXt-{args.variant.upper()} at {args.size}×{args.size}: training-time → reparam.fuse"
    print(title)
    print("  " + "-" * (len(title) - 2))
    print(_row("FX ops", _n(b.ops), _n(a.ops)))
    print(_row("Conv2d", _n(b.convs), _n(a.convs)))
    print(_row("BatchNorm", _n(b.bns), _n(a.bns)))
    print(_row("Linear", _n(b.linears), _n(a.linears)))
    print(_row("parameters", _n(b.params), _n(a.params), f"({a.params / 1e6:.2f}M)"))
    print(_row("fp32 rel. error vs fp64", f"{err_before:.2e}", f"{err_after:.2e}"))
    print(_row("fp64 rel. error (fused)", "", f"{v.error_fp64:.2e}",
               f"(verification {'passed' if v.passed else 'FAILED'}, tolerance {v.tolerance:.0e})"))
    print(_row(f"eager latency ({args.threads} thr, b=1)", f"{t_before * 1e3:.2f} ms", f"{t_after * 1e3:.2f} ms",
               f"(ratio {t_after / t_before:.2f}, median of {args.rounds} interleaved rounds)"))
    secs = rep.seconds
    print(f"  fuse time: {fuse_s:.2f} s (rewrite {secs.get('rewrite', 0):.2f} s, "
          f"verification {secs.get('verify', 0):.2f} s)")

    print("\nrules fired:")
    for rule, n in sorted(rep.fired_counts().items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {rule:<22}×{n}")
    if rep.refusals:
        print("\nrefused (left as they are):")
        by_rule = Counter(r["rule"] for r in rep.refusals)
        first = {}
        for r in rep.refusals:
            first.setdefault(r["rule"], r)
        for rule, n in by_rule.most_common():
            print(f"  {rule} ×{n}, e.g. at '{first[rule]['where']}': {first[rule]['detail']}")
    for note in rep.notes:
        print(f"note: {note}")
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        print(f"note: the machine is busy (1-minute load average {load:.1f} on {os.cpu_count()} CPUs); "
              f"latencies and times above are inflated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
