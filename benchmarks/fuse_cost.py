"""Fuse cost: time and extra memory of producing the deploy model, against the hand-written fuse.

    python -m benchmarks.fuse_cost [--models repvgg_b3,...] [--repeats 3] [--params 1e9[,3e8...]] [--no-write]

Every measurement runs in a fresh process (``python -m benchmarks.fuse_cost --child MODEL MODE``), so one
measurement's allocator state, caches and imports do not skew the next; the parent reports medians of
``--repeats`` processes. Modes: ``hand`` (timm's ``timm.models.reparameterize_model``, on a copy, as
``reparam`` also leaves its input alone), ``plain`` (``reparam.fuse(model, x, verify=False)``) and ``verified``
(``reparam.fuse(model, x)``, with the end-to-end float64 verification). Time: wall clock of that one call.
Extra memory: the process's peak RSS during the call (``VmHWM``, reset through ``/proc/self/clear_refs``
just before it) minus its RSS with the model loaded. Models: timm ``repvgg_b3``, ``mobileone_s4``,
``fastvit_sa24`` (``pretrained=False``, nothing downloaded, BatchNorm statistics randomized), RepNeXt-M5
(``examples/repnext``; there is no hand-written fuse to compare with) and ``synthetic``: a RepVGG-style stack
(3×3 conv + BN, 1×1 conv + BN and BN identity branches) of about ``--params`` parameters (one or several
sizes), for which the peak RSS of the whole process is compared with the model's float32 size. A child whose RSS passes a cap
(``--cap-gb``, default 80 % of the memory available when the parent starts) stops itself and is reported
as such, so that a measurement never takes the machine's memory from other work.

Prints the table and writes its section of docs/benchmarks.md (``benchmarks.tables.write_section``, section
``fuse-cost``).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.tables import machine, write_section

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "fuse-cost"
TIMM_MODELS = ("repvgg_b3", "mobileone_s4", "fastvit_sa24")
MODELS = (*TIMM_MODELS, "repnext_m5", "synthetic")
MODES = ("hand", "plain", "verified")
PAGE = os.sysconf("SC_PAGE_SIZE")
TARGETS = ("without verification ≤ 1.5× the hand-written fuse's time and extra memory (timm models); verified "
           "≤ 4× its time; the synthetic model fuses with verification at peak RSS ≤ 2× its float32 size")


# ---------------------------------------------------------------- child: one measurement in a fresh process

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux ≥ 4.0); False when it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Watch(threading.Thread):
    """Samples RSS every few ms: the peak where VmHWM cannot be reset, and a cap that stops the process."""

    def __init__(self, cap: int):
        super().__init__(daemon=True)
        self.cap, self.peak, self.stop = cap, 0, threading.Event()

    def run(self):
        while not self.stop.wait(0.005):
            now = rss()
            self.peak = max(self.peak, now)
            if now > self.cap:
                print(json.dumps(dict(capped=True, rss=now)), flush=True)
                os._exit(0)


def synthetic(params: float):
    """A RepVGG-style stack of about ``params`` parameters: a 3×3 stem, then blocks of width C whose three
    branches (3×3 conv + BN, 1×1 conv + BN, BN) are summed and ReLU'd; global pool and a Linear head. The
    width is chosen so that 24 blocks hold the parameters."""
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.k3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
            self.k1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
            self.id = nn.BatchNorm2d(c)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.k3(x) + self.k1(x) + self.id(x))

    depth = 24
    width = int(math.sqrt(params / (10 * depth)) / 64) * 64 or 64
    layers = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), *[Block(width) for _ in range(depth)],
              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 1000)]
    return nn.Sequential(*layers), (1, 3, 8, 8)


def build(name: str, params: float):
    """The model (eval mode, BatchNorm statistics randomized) and its input shape."""
    import torch

    sys.path.insert(0, str(ROOT))
    from examples.repnext.utils import randomize_bn_stats

    torch.manual_seed(0)
    if name == "synthetic":
        model, shape = synthetic(params)
    elif name == "repnext_m5":
        from examples.repnext.measure import build as build_repnext
        return build_repnext("m5", seed=0), (1, 3, 224, 224)
    else:
        import timm
        model = timm.create_model(name, pretrained=False)
        shape = (1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
    randomize_bn_stats(model, torch.Generator().manual_seed(1))
    return model.eval(), shape


def child(name: str, mode: str, params: float, cap: int) -> dict:
    import torch

    model, shape = build(name, params)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    if mode == "hand":
        from timm.models import reparameterize_model

        def call():
            return reparameterize_model(model)
    else:
        import reparam

        def call():
            return reparam.fuse(model, x, verify=(mode == "verified"))
    size32 = sum(p.numel() for p in model.parameters()) * 4
    gc.collect()
    watch = Watch(cap)
    watch.start()
    base = rss()
    exact = reset_peak()
    t0 = time.perf_counter()
    out = call()
    seconds = time.perf_counter() - t0
    peak = peak_rss() if exact else watch.peak
    watch.stop.set()
    with torch.no_grad():  # a cheap sanity check that the result is a model that runs
        out(x)
    return dict(seconds=seconds, extra=max(peak - base, 0), peak=peak, base=base, size32=size32, capped=False)


# ---------------------------------------------------------------- parent: medians over fresh processes

def measure(name: str, mode: str, repeats: int, params: float, cap: int) -> dict | None:
    runs = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.fuse_cost", "--child", name, mode,
                               "--params", str(params), "--cap-bytes", str(cap)],
                              cwd=ROOT, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"[fuse_cost] {name} {mode}: the child failed (exit {proc.returncode}): {tail}",
                  file=sys.stderr, flush=True)
            return dict(failed=f"exit {proc.returncode}: {tail}")
        r = json.loads(lines[-1])
        if r.get("capped"):
            return dict(capped=True, peak=r["rss"])
        runs.append(r)
    keys = ("seconds", "extra", "peak", "base", "size32")
    return {k: statistics.median(r[k] for r in runs) for k in keys} | dict(capped=False)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _cell(r: dict | None, key: str, fmt) -> str:
    if r is None:
        return "—"
    if r.get("failed"):
        return "failed"
    if r.get("capped"):
        return f"stopped at the cap ({_gb(r['peak'])})"
    return fmt(r[key])


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
    if not a or not b or a.get("capped") or b.get("capped") or a.get("failed") or b.get("failed") or not b[key]:
        return ""
    return f" ({a[key] / b[key]:.1f}×)"


def table(results: dict) -> str:
    out = ["| model | params | hand | reparam, no verification | reparam, verified | extra memory: hand → no "
           "verification → verified |", "|---|---|---|---|---|---|"]
    for name, res in results.items():
        if name.startswith("synthetic"):
            continue
        hand, plain, ver = res.get("hand"), res.get("plain"), res.get("verified")
        any_ = next((r for r in (hand, plain, ver) if r and "size32" in r), None)
        params = f"{any_['size32'] / 4e6:.0f} M" if any_ else "?"
        sec = lambda v: f"{v:.2f} s"  # noqa: E731
        mem = " → ".join(_cell(r, "extra", _gb) for r in (hand, plain, ver))
        out.append(f"| {name} | {params} | {_cell(hand, 'seconds', sec)} "
                   f"| {_cell(plain, 'seconds', sec)}{_ratio(plain, hand, 'seconds')} "
                   f"| {_cell(ver, 'seconds', sec)}{_ratio(ver, hand, 'seconds')} | {mem} |")
    synthetic_runs = [res for name, res in results.items() if name.startswith("synthetic")]
    if synthetic_runs:
        out += ["", "| synthetic RepVGG-style model | float32 size | mode | time | peak RSS | peak / float32 size "
                "| extra / float32 size |", "|---|---|---|---|---|---|---|"]
    for res in synthetic_runs:
        for mode in ("plain", "verified"):
            r = res.get(mode)
            if r is None:
                continue
            size = r.get("size32")
            done = size and not r.get("capped") and not r.get("failed")
            ratio = f"{r['peak'] / size:.2f} | {r['extra'] / size:.2f}" if done else " | "
            out.append(f"| {res.get('label', '')} | {_gb(size) if size else '?'} | {mode} "
                       f"| {_cell(r, 'seconds', lambda v: f'{v:.1f} s')} | {_cell(r, 'peak', _gb)} | {ratio} |")
    return "\n".join(out)


def goals(results: dict) -> list[str]:
    lines = []
    ok = lambda b: "met" if b else "missed"  # noqa: E731
    for name in TIMM_MODELS:
        res = results.get(name, {})
        hand, plain, ver = res.get("hand"), res.get("plain"), res.get("verified")
        if not hand or not plain or hand.get("failed") or plain.get("failed") or plain.get("capped"):
            continue
        t, m = plain["seconds"] / hand["seconds"], plain["extra"] / max(hand["extra"], 1)
        line = f"- {name}: no verification {t:.2f}× time ({ok(t <= 1.5)}), {m:.2f}× extra memory ({ok(m <= 1.5)})"
        if ver and not ver.get("failed") and not ver.get("capped"):
            v = ver["seconds"] / hand["seconds"]
            line += f"; verified {v:.2f}× time ({ok(v <= 4)})"
        lines.append(line)
    for name, res in results.items():
        ver = res.get("verified") if name.startswith("synthetic") else None
        if not ver:
            continue
        if ver.get("failed"):
            lines.append(f"- {res['label']}, with verification: the run failed (missed)")
        elif ver.get("capped"):
            lines.append(f"- {res['label']}, with verification: stopped at the memory cap, "
                         f"{_gb(ver['peak'])} (missed)")
        else:
            q = ver["peak"] / ver["size32"]
            lines.append(f"- {res['label']}, with verification: peak RSS {q:.2f}× its float32 size ({ok(q <= 2)})")
    return lines


def command(args) -> str:
    """The command line that reproduces this run."""
    parts = ["python -m benchmarks.fuse_cost"]
    if args.models != list(MODELS):
        parts.append(f"--models {','.join(args.models)}")
    if args.repeats != 3:
        parts.append(f"--repeats {args.repeats}")
    if args.params != [1e9]:
        parts.append(f"--params {','.join(f'{p:g}' for p in args.params)}")
    if args.cap_gb:
        parts.append(f"--cap-gb {args.cap_gb:g}")
    return " ".join(parts)


def available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PHYS_PAGES") * PAGE


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.fuse_cost", description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement (median; default 3)")
    p.add_argument("--params", default="1e9", help="parameters of the synthetic model, or several sizes, comma-"
                   "separated (default 1e9)")
    p.add_argument("--cap-gb", type=float, default=None, help="stop a child whose RSS passes this (GB)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--cap-bytes", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        args.params = [float(v) for v in args.params.split(",") if v.strip()]
    except ValueError:
        p.error(f"--params must be numbers (e.g. 1e9 or 1e9,3e8), not {args.params!r}")
    if not args.params or any(v <= 0 for v in args.params):
        p.error("--params must be positive")
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        p.error(f"unknown model(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(MODELS)}")
    if args.repeats < 1:
        p.error("--repeats must be positive")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    if args.child:
        name, mode = args.child
        print(json.dumps(child(name, mode, args.params[0], args.cap_bytes or available())), flush=True)
        return 0
    cap = int(args.cap_gb * 1e9) if args.cap_gb else int(0.8 * available())
    started, load0 = time.perf_counter(), os.getloadavg()[0]
    results: dict = {}
    runs = [(name, params) for name in args.models
            for params in (args.params if name == "synthetic" else [args.params[0]])]
    for name, params in runs:
        key = f"synthetic {params:g}" if name == "synthetic" else name
        modes = ("plain", "verified") if name in ("repnext_m5", "synthetic") else MODES
        results[key] = {}
        for mode in modes:
            repeats = 1 if name == "synthetic" else args.repeats
            print(f"[fuse_cost] {key} {mode} ...", file=sys.stderr, flush=True)
            results[key][mode] = r = measure(name, mode, repeats, params, cap)
            print(f"[fuse_cost] {key} {mode}: {json.dumps(r)}", file=sys.stderr, flush=True)  # as it comes
        if name == "synthetic":
            results[key]["label"] = f"24 blocks, ~{params / 1e9:g} B parameters, input 1×3×8×8"
    import torch
    now = datetime.datetime.now(datetime.timezone.utc)
    text = "\n".join([
        "## Fuse cost: reparam against the hand-written fuse",
        "",
        f"Reproduce: `{command(args)}`. Measured {now:%Y-%m-%d %H:%M} UTC on {machine(memory=True)}; torch {torch.__version__}, Python {platform.python_version()}; 1-minute load "
        f"average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; whole run "
        f"{time.perf_counter() - started:.0f} s.",
        "",
        f"Each cell: median of {args.repeats} fresh processes (the synthetic model: one). hand = timm's "
        "`reparameterize_model` (on a copy); no verification = `reparam.fuse(model, x, verify=False)`; verified = "
        "`reparam.fuse(model, x)`. Time: that call's wall clock (ratio to hand in brackets). Extra memory: peak RSS "
        "during the call minus RSS with the model loaded. timm models: `pretrained=False`, BatchNorm statistics "
        "randomized, input at the model's default size; RepNeXt-M5 has no hand-written fuse.",
        "",
        table(results),
        "",
        f"Targets ({TARGETS}):",
        *goals(results),
    ])
    print(text)
    if not args.no_write:
        write_section(DOC, SECTION, text)
        print(f"\nwrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
