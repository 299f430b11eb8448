"""pytest-benchmark: a ``tiny`` WildActor denoising step (CFG batch 2), joint path against the
reference-cache path (``pytest benchmarks --benchmark-only``).

The full-size model step is ``benchmarks/bench_model.py`` (``wildactor bench --suite model``).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_model import build

pytest.importorskip("pytest_benchmark")


@pytest.fixture(scope="module")
def tiny(device, dtype):
    cfg, m, inputs, refs = build("tiny", device, dtype, None, seed=0)
    return m, inputs, refs


@pytest.mark.parametrize("path", ["joint", "cached"])
def test_tiny_step(benchmark, synced, tiny, backend, path):
    m, inputs, refs = tiny
    m.set_backend(backend)
    with torch.no_grad():
        cache = m.encode_references(refs, video_shape=inputs["latents"].shape) if path == "cached" else None

    def step():
        with torch.no_grad():
            if cache is None:
                return m(**inputs, refs=refs)
            return m(**inputs, ref_cache=cache)

    benchmark.group = "tiny model step"
    benchmark.extra_info.update(path=path, backend=backend)
    call = synced(step)
    call()  # autotune outside the rounds
    out = benchmark(call)
    assert torch.isfinite(out).all()
