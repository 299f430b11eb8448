"""pytest-benchmark: each public op at a small I-RoPE layout (``pytest benchmarks --benchmark-only``).

The layout (video 2x4x4 tokens, a face and a body reference) is small enough for the CPU; the
docs/design.md §8 shapes are the per-kernel scripts' job (``wildactor bench --suite kernels``).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.suite import op_cases

pytest.importorskip("pytest_benchmark")

OPS = ["apply_rope", "qk_norm_rope", "asym_attention", "cached_asym_attention", "ref_lora_linear"]


def _finite(out) -> bool:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return all(bool(torch.isfinite(o).all()) for o in outs)


@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, synced, device, dtype, backend, op):
    case = op_cases(device, dtype=dtype, backend=backend)[op]
    benchmark.group = "ops"
    benchmark.extra_info.update(op=op, backend=backend, dtype=str(dtype), flops=case["flops"])
    call = synced(case["fn"])
    call()  # compile / autotune outside the rounds
    out = benchmark(call)
    assert _finite(out)
