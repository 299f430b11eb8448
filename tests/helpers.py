"""What the kernel tests share: the device the Triton paths run on, dtypes, token layouts and
rope tables, case ids built from the values, assertions and fp64 ground truths."""

from __future__ import annotations

import math

import torch

# One source of truth for where every test that exercises a Triton path puts its tensors and
# models: CUDA when present (compiled kernels), else the CPU (kernels under the interpreter, which
# conftest turns on). A Triton call on CPU tensors on a CUDA machine raises, so such a test must
# build its inputs on DEVICE. The fp64 truths below run on the device of their inputs.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# --------------------------------------------------------------------------- dtypes
DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DT_NAME = {v: k for k, v in DT.items()}


def dtype_params(*names: str) -> list:
    """``pytest.param(dtype, id=name)`` for each name of :data:`DT`."""
    import pytest

    return [pytest.param(DT[n], id=n) for n in names]


#: The interpreter checks fp32 and fp16 (bf16 only through its fp32 upcast); GPU runs bf16 first.
CPU_DTYPES = dtype_params("fp32", "fp16")
GPU_DTYPES = dtype_params("bf16", "fp16")


# --------------------------------------------------------------------------- layouts, tables
def layout_id(layout) -> str:
    """``Nv37-Nr11``: a layout named by its token counts."""
    return f"Nv{layout.num_video}-Nr{layout.num_ref}"


def _layouts(*layouts) -> dict:
    return {layout_id(lt): lt for lt in layouts}


def _token_layouts():
    import wildactor_kernels as wk

    # odd counts, never a multiple of a block size; video only and references only included
    cpu = _layouts(
        wk.TokenLayout((1, 1, 37), [("face", 2, 3), ("body", 1, 5)]),   # Nv37-Nr11
        wk.TokenLayout((1, 1, 211)),                                     # Nv211-Nr0
        wk.TokenLayout((0, 4, 4), [("face", 3, 3), ("body", 4, 5)]),     # Nv0-Nr29
        wk.TokenLayout((1, 3, 5), [("face", 2, 5), ("body", 3, 4)]),     # Nv15-Nr22
        wk.TokenLayout((3, 7, 9), [("face", 2, 5), ("body", 3, 4)]),     # Nv189-Nr22
        wk.TokenLayout((2, 4, 5)),                                       # Nv40-Nr0
        wk.TokenLayout((0, 4, 4), [("face", 3, 4), ("body", 2, 3)]),     # Nv0-Nr18
    )
    gpu = {
        # a short wan-720p-like clip (4 frames of 22x40) with two references of the same grid
        "wan720p-T4": wk.TokenLayout((4, 22, 40), [("face", 22, 40), ("body", 22, 40)]),
        "odd": wk.TokenLayout((3, 17, 23), [("face", 9, 11), ("body", 13, 7)]),
    }
    return cpu, gpu


#: CPU-sized layouts keyed by :func:`layout_id`, and the GPU-sized ones by name.
LAYOUTS, GPU_LAYOUTS = _token_layouts()


def rope_tables(layout, d: int, device=DEVICE):
    """``(pos, cos, sin)`` of a layout (or a :data:`LAYOUTS` key) with the offsets every kernel
    test uses; ``pos`` stays on the CPU for the fp64 truths."""
    import wildactor_kernels as wk

    layout = LAYOUTS[layout] if isinstance(layout, str) else layout
    pos = wk.irope_positions(layout, face_offset=1, body_offset=2, spatial_shift=True)
    cos, sin = wk.rope_cos_sin(pos.to(device), d)
    return pos, cos, sin


# --------------------------------------------------------------------------- case ids
def case_id(*parts, **values) -> str:
    """An id built from the values: ``case_id("Nv37-Nr11", B=2, H=2, D=64, dtype="fp16")`` ->
    ``Nv37-Nr11-B2-H2-D64-fp16``. Keyword values are written ``<key><value>`` (``dtype`` and
    string flags bare, torch dtypes by their short name, None and "none" left out)."""
    out = [str(p) for p in parts if p not in (None, "none", "")]
    for k, v in values.items():
        if v is None or v == "none" or v is False:
            continue
        if isinstance(v, torch.dtype):
            out.append(DT_NAME.get(v, str(v)))
        elif v is True or isinstance(v, str):
            out.append(k if v is True else v)
        else:
            out.append(f"{k}{v}")
    return "-".join(out)


def case(**values):
    """One parametrize case from named values: ``pytest.param(*values.values(), id=case_id(**values))``,
    e.g. ``case(layout="Nv37-Nr11", B=2, H=2, D=64, dtype="fp16", rope="fused")``."""
    import pytest

    return pytest.param(*values.values(), id=case_id(**values))


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, atol: float = 0.0,
                         rtol: float = 0.0, name: str = "tensor") -> None:
    """allclose that says what differs: count, worst index, NaN/inf disagreements."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    if not torch.equal(nan_a, nan_e):
        idx = (nan_a != nan_e).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: NaN pattern differs ({int((nan_a != nan_e).sum())} "
                             f"elements, first at {idx})")
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    if not torch.equal(inf_a, inf_e):
        raise AssertionError(f"{name}: inf pattern differs")
    fin = ~(nan_a | inf_a)
    diff = (a - e).abs().where(fin, torch.zeros_like(a))
    bad = diff > atol + rtol * e.abs()
    if bad.any():
        worst = int(diff.argmax())
        idx = list(torch.unravel_index(torch.tensor(worst), a.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements differ beyond atol={atol:g} rtol={rtol:g};"
            f" max abs diff {diff.max().item():.3e} at {[int(i) for i in idx]} "
            f"(actual {a.flatten()[worst].item():.6g}, expected {e.flatten()[worst].item():.6g})")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double().cpu() - b.detach().double().cpu()).abs().max().item() if a.numel() else 0.0


def assert_within_baseline(out: torch.Tensor, baseline: torch.Tensor, truth: torch.Tensor,
                           factor: float = 2.0, atol: float = 1e-5, name: str = "out") -> None:
    """flash-attn's rule: the kernel's error against an fp64 truth is at most ``factor`` times
    the error of plain PyTorch in the same precision, plus a small ``atol``."""
    assert not torch.isnan(out).any(), f"{name}: NaN in output (unwritten elements?)"
    e_out, e_base = max_err(out, truth), max_err(baseline, truth)
    assert e_out <= factor * e_base + atol, (
        f"{name}: kernel error {e_out:.3e} > {factor} x baseline error {e_base:.3e} + {atol:g}")


def dense_asym_attention_fp64(q, k, v, num_video, scale=None):
    """fp64 hand computation with an explicit N x N mask (tests only)."""
    q, k, v = q.double(), k.double(), v.double()
    n, d = q.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    allowed = torch.ones(n, n, dtype=torch.bool, device=q.device)
    allowed[num_video:, :num_video] = False  # references never read video keys
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v)


def rope_fp64(x, pos, head_dim, theta=10000.0):
    """fp64 I-RoPE by the formula of docs/design.md §3, independent of the library's tables."""
    d_h = d_w = 2 * (head_dim // 6)
    dims = [head_dim - d_h - d_w, d_h, d_w]
    pos = pos.to(x.device)
    angles = []
    for a, d_a in enumerate(dims):
        i = torch.arange(d_a // 2, dtype=torch.float64, device=x.device)
        angles.append(pos[:, a : a + 1].double() * theta ** (-2 * i / d_a))
    ang = torch.cat(angles, 1)[None, :, None, :]
    x = x.double()
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * ang.cos() - x1 * ang.sin()
    out[..., 1::2] = x0 * ang.sin() + x1 * ang.cos()
    return out


def run_sm90_build(script: str, timeout: float = 300.0) -> str:
    """Run ``script`` (which builds kernels ahead of time for sm_90 with ``triton.compile``) in a
    fresh process with the interpreter off, and return its stdout.

    The interpreter never runs Triton's compiler; building PTX + cubin for an H100/H200 target
    catches what only the GPU toolchain rejects. Skips when this Triton ships no NVIDIA backend
    or no ptxas; fails with the script's output otherwise.
    """
    import os
    import subprocess
    import sys

    import pytest

    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=root, timeout=timeout)
    if res.returncode and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("this triton build ships no ptxas")
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    return res.stdout


def ptxas_usage(kernel) -> tuple[int, int, int]:
    """``(registers, spill store bytes, spill load bytes)`` of a kernel compiled ahead of time for
    sm_90 (``triton.compile(..., target=GPUTarget("cuda", 90, 32))``), read from ``ptxas -v`` run
    on its PTX: the numbers the driver would report, without a GPU. For scripts run by
    :func:`run_sm90_build` (they put ``tests/`` on ``sys.path`` to import it)."""
    import os
    import re
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        res = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-2000:]
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    loads = int(re.search(r"(\d+) bytes spill loads", log).group(1))
    return regs, stores, loads
