"""Run every benchmark (what `make bench` runs): RepNeXt, then the zoo, ONNX and fuse-cost benchmarks when present.

    python -m benchmarks.run_all

Each benchmark runs in its own process (so one's thread settings or memory do not skew the next), prints its
tables and writes its results under docs/ (docs/benchmarks.md and siblings). The exit status is non-zero if
any of them failed.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("repnext_bench", "zoo_bench", "onnx_bench", "onnx_real_bench", "fuse_cost")  # onnx_real after onnx


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        if not (HERE / f"{name}.py").exists():
            continue
        print(f"== benchmarks.{name}", flush=True)
        rc = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"], cwd=HERE.parent)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"error: benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
