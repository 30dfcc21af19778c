"""Benchmarks run the real kernels: no Triton interpreter here (it is for tests only)."""
