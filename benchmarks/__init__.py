"""Benchmark scripts: each prints tables and writes its section of docs/benchmarks.md."""
