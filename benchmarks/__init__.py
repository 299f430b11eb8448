"""Benchmarks of wildactor-kernels: the shared harness, the model-step benchmark, the suite
behind ``wildactor bench``, the report generator and the per-kernel scripts (docs/design.md §8)."""
