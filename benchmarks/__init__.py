"""Benchmark scripts: each prints tables and writes its results under docs/."""
