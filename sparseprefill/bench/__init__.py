"""Benchmarks (GPU): kernels and end to end."""
