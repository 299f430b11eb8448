"""Seeded fuzz of every public op on both backends (issue 11 item 9).

Each case is drawn at collection time from ``random.Random(f"{op}-{seed}-{i}")`` (so its id and
any known-defect mark are fixed before it runs) and is one of:

- **valid**: odd sizes, 0-sized dims, Nv = 0 / Nr = 0, odd head dims where allowed, stride-0,
  strided and transposed views, fp32 and fp16, gradients of every input that may need one. The
  Triton backend (the CPU interpreter here) must match the reference backend within the
  baseline rule of the suite: error against an fp64 truth written here, independently of the
  library, at most twice the reference backend's error in the same dtype (plus the rounding of
  the truth's magnitude). Both backends must give an output with an autograd graph whenever an
  input needs grad, and gradients of the inputs' shapes.
- **invalid**: one argument of a valid call spoiled (shape, rank, dtype, device, kind, a NaN,
  a bool where an int is meant, ...). Every backend must raise ``TypeError`` or ``ValueError``
  whose message names the argument; any other exception, or no exception, fails the case.

Sizes stay tiny: the Triton interpreter runs every program instance in Python. The default run
is four seeds of five cases per op (well under a minute on two cores); a longer fuzz with other seeds is
``WILDACTOR_FUZZ_SEEDS=3-40 WILDACTOR_FUZZ_CASES=8 pytest tests/test_fuzz.py``, and with larger
shapes (several tiles per segment, head dims up to 128) ``WILDACTOR_FUZZ_WIDE=1``.

The defects issue 11 found by hand are pinned cases (``PINNED``): they run whatever the seeds draw.
"""

from __future__ import annotations

import math
import os
import random
import re
import zlib

import pytest
import torch
from helpers import DEVICE, assert_within_baseline, dense_asym_attention_fp64

import wildactor_kernels as wk
from wildactor_kernels.quant import quantize_weight_fp8

pytestmark = pytest.mark.usefixtures("nan_empty")


def _seeds() -> list[int]:
    spec = os.environ.get("WILDACTOR_FUZZ_SEEDS", "0-3")
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


SEEDS = _seeds()
CASES_PER_SEED = int(os.environ.get("WILDACTOR_FUZZ_CASES", "5"))  # per op and seed
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
BACKENDS = ("triton", "reference")


# =========================================================================== tensors and views
class Spec:
    """A float input: a base tensor (the autograd leaf) and the view the op receives.

    ``how``: ``"contig"``, ``"strided"`` (every other element of a wider last dim),
    ``"transposed"`` (storage with the last two dims swapped), ``"stride0"`` (a size-1 dim
    expanded) or ``"offset"`` (a slice that starts past the storage's first element).
    """

    def __init__(self, shape, how: str, g: torch.Generator, scale: float = 1.0):
        self.shape, self.how = tuple(shape), how
        nd = len(self.shape)
        if how == "strided" and nd >= 1:
            base_shape = self.shape[:-1] + (2 * self.shape[-1] + 1,)
        elif how == "transposed" and nd >= 2:
            base_shape = self.shape[:-2] + (self.shape[-1], self.shape[-2])
        elif how == "stride0" and nd >= 1:
            # expand the largest dim but the last: a feature row of one repeated value is a
            # degenerate input of a norm (its gradient is 0 by scale invariance, all cancellation)
            self.dim = max(range(max(nd - 1, 1)), key=lambda i: self.shape[i])
            base_shape = tuple(1 if i == self.dim else s for i, s in enumerate(self.shape))
        elif how == "offset" and nd >= 1:
            base_shape = (self.shape[0] + 1,) + self.shape[1:]
        else:
            self.how, base_shape = "contig", self.shape
        self.base = torch.randn(base_shape, generator=g, dtype=torch.float64) * scale

    @property
    def fan_in(self) -> int:
        """View elements that autograd sums into one leaf element."""
        return self.shape[self.dim] if self.how == "stride0" else 1

    def view(self, leaf: torch.Tensor) -> torch.Tensor:
        if self.how == "strided":
            return leaf[..., 1::2]
        if self.how == "transposed":
            return leaf.transpose(-1, -2)
        if self.how == "stride0":
            return leaf.expand(self.shape)
        if self.how == "offset":
            return leaf[1:]
        return leaf

    def leaf(self, dtype: torch.dtype, grad: bool) -> torch.Tensor:
        return self.base.to(device=DEVICE, dtype=dtype).requires_grad_(grad)

    def make(self, dtype: torch.dtype, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = self.leaf(dtype, grad)
        return leaf, self.view(leaf)


def _how(rng: random.Random) -> str:
    return rng.choice(["contig", "contig", "strided", "transposed", "stride0", "offset"])


def _rounding_atol(truth: torch.Tensor, dtype: torch.dtype, fan_in: int = 1) -> float:
    """Slack on top of the 2x rule: two units of ``dtype``'s precision at the larger of the
    truth's magnitude and 1 (the inputs are standard normal, so the terms of every sum are O(1)),
    times ``fan_in``, the number of view elements that autograd sums into one element of a
    stride-0 leaf (each term rounded to ``dtype`` once).

    A kernel that rounds one intermediate to fp16 where PyTorch keeps fp32 is that far off, and
    the fuzz makes results whose truth is ~0 by cancellation of O(1) terms (all keys equal through
    a stride-0 view: dq = 0), where "2x the baseline's error" alone would ask for exactness.
    Real defects (a stride ignored, a row skipped) are O(1) off. Never below 1e-5 (fp32)."""
    mag = truth.detach().abs().max().item() if truth.numel() else 0.0
    return max(2.0 * torch.finfo(dtype).eps * max(mag, 1.0) * fan_in, 1e-5)


def _check(name: str, out: torch.Tensor, base: torch.Tensor, truth: torch.Tensor, fan_in: int = 1) -> None:
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert out.dtype == base.dtype, f"{name}: dtype {out.dtype} != reference {base.dtype}"
    assert_within_baseline(out, base, truth, atol=_rounding_atol(truth, out.dtype, fan_in), name=name)


def _grads(out: torch.Tensor, do: torch.Tensor, leaves: list[torch.Tensor], who: str) -> list[torch.Tensor]:
    """Grads of ``sum(out * do)`` w.r.t. the leaves that need one; an unused leaf gets zeros."""
    if not leaves:
        return []
    assert out.requires_grad, f"{who}: inputs need grad but the output has no autograd graph"
    gs = torch.autograd.grad(out, leaves, do.to(out.dtype), allow_unused=True)
    out_g = []
    for g, leaf in zip(gs, leaves):
        g = torch.zeros_like(leaf) if g is None else g
        assert g.shape == leaf.shape, f"{who}: grad shape {tuple(g.shape)} != {tuple(leaf.shape)}"
        out_g.append(g)
    return out_g


def _compare(run, truth_fn, names: list[str], needs_grad: list[bool], specs=None) -> None:
    """``run(backend, dtype_or_None)`` -> ``(outs, leaves)``; checks Triton against the reference
    and the fp64 truth, forward and the grads of the leaves that need one."""
    res = {}
    for backend in BACKENDS:
        outs, leaves, do = run(backend)
        gl = [leaf for leaf, ng in zip(leaves, needs_grad) if ng]
        grads = _grads(torch.cat([o.flatten() for o in outs]), torch.cat([d.flatten() for d in do]),
                       gl, backend) if gl else []
        res[backend] = (outs, grads)
    outs64, leaves64, do64 = truth_fn()
    gl64 = [leaf for leaf, ng in zip(leaves64, needs_grad) if ng]
    grads64 = _grads(torch.cat([o.flatten() for o in outs64]), torch.cat([d.flatten() for d in do64]),
                     gl64, "fp64 truth") if gl64 else []
    (t_out, t_g), (r_out, r_g) = res["triton"], res["reference"]
    for i, (o, r, t) in enumerate(zip(t_out, r_out, outs64)):
        _check(f"out{i}", o, r, t)
    fan = [1 if s is None else s.fan_in for s in (specs or [None] * len(names))]
    gnames = [(n, f) for n, f, ng in zip(names, fan, needs_grad) if ng]
    for (n, f), o, r, t in zip(gnames, t_g, r_g, grads64):
        _check(f"d{n}", o, r, t, f)


_WORD = "(?<![A-Za-z0-9_]){}(?![A-Za-z0-9_])"


def _expect_error(call, names: list[str], what: str) -> None:
    """``call()`` must raise TypeError/ValueError whose message names one of ``names``."""
    try:
        call()
    except (TypeError, ValueError) as e:
        msg = str(e)
        assert any(re.search(_WORD.format(re.escape(n)), msg) for n in names), (
            f"{what}: {type(e).__name__} does not name {names}: {msg!r}")
        return
    raise AssertionError(f"{what}: the invalid input was accepted (expected an error naming {names})")


# =========================================================================== fp64 truths
def _rotate64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation of ``x [B, N, H, D]`` by ``[N, D//2]`` tables, in fp64."""
    x = x.double()
    c, s = cos.double()[None, :, None, :], sin.double()[None, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)


def _rms64(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    b, n, h, d = x.shape
    xf = x.reshape(b, n, h * d)
    xf = xf / torch.sqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (xf if w is None else xf * w).reshape(b, n, h, d)


def _lora64(x, w, bias, a, b, scale, nv):
    y = x @ w.t()
    if bias is not None:
        y = y + bias
    delta = (x[:, nv:] @ a.t()) @ b.t() * scale
    return torch.cat([y[:, :nv], y[:, nv:] + delta], 1)


def _positions(layout: wk.TokenLayout, face: int, body: int, shift: bool) -> list[tuple[int, int, int]]:
    """I-RoPE positions by docs/design.md §3, one token at a time."""
    t_, hg, wg = layout.video
    out = [(t, y, x) for t in range(t_) for y in range(hg) for x in range(wg)]
    used = {"face": [0, 0], "body": [0, 0]}
    for kind, h, w in layout.refs:
        dy, dx = (hg + used[kind][0], wg + used[kind][1]) if shift else (0, 0)
        off = face if kind == "face" else body
        out += [(t_ + off, dy + y, dx + x) for y in range(h) for x in range(w)]
        used[kind][0] += h
        used[kind][1] += w
    return out


def _tables64(pos: torch.Tensor, d: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    dh = 2 * (d // 6)
    dims = (d - 2 * dh, dh, dh)
    cols = []
    for a, da in enumerate(dims):
        for i in range(da // 2):
            cols.append(pos[:, a].double() * theta ** (-2.0 * i / da))
    ang = torch.stack(cols, 1) if cols else torch.zeros(pos.shape[0], 0, dtype=torch.float64)
    return ang.cos(), ang.sin()


# =========================================================================== case drawing
#: ``WILDACTOR_FUZZ_WIDE=1``: also larger token counts and head dims (several tiles per segment,
#: the model's head dims); slower under the interpreter, for longer runs with other seeds.
WIDE = os.environ.get("WILDACTOR_FUZZ_WIDE", "0") not in ("", "0")


def _head_dim(rng: random.Random) -> int:
    return rng.choice([8, 10, 16, 16, 24, 34] + ([40, 64, 72, 128] if WIDE else []))


def _tokens(rng: random.Random) -> tuple[int, int]:
    nv = rng.choice([0, 1, 5, 13, 19] + ([33, 64, 70] if WIDE else []))
    nr = rng.choice([0, 1, 4, 7] + ([17, 32, 41] if WIDE else []))
    if rng.random() < 0.1:
        nv = nr = 0
    return nv, nr


def _draw_attention(rng):
    nv, nr = _tokens(rng)
    return dict(b=rng.choice([0, 1, 2, 2]) if rng.random() < 0.15 else rng.choice([1, 2]), nv=nv, nr=nr,
                h=rng.choice([1, 2, 3]), d=_head_dim(rng), dtype=rng.choice(["fp32", "fp32", "fp16"]),
                rope=rng.random() < 0.6, rope_mode=rng.choice([None, "fused", "prologue"]),
                tables=_how(rng), scale=rng.choice([None, None, 0.3, 1.0, -0.5]),
                hows=[_how(rng) for _ in range(5)], grads=[rng.random() < 0.7 for _ in range(5)],
                fp8=rng.random() < 0.3, cache=rng.random() < 0.5)


def _draw_rope(rng):
    return dict(b=rng.choice([0, 1, 2]) if rng.random() < 0.15 else rng.choice([1, 2]),
                n=rng.choice([0, 1, 6, 11]), h=rng.choice([1, 2, 3]), d=_head_dim(rng),
                dtype=rng.choice(["fp32", "fp32", "fp16"]), tables=_how(rng),
                hows=[_how(rng) for _ in range(4)], grads=[rng.random() < 0.7 for _ in range(4)],
                weights=[rng.random() < 0.6, rng.random() < 0.6], eps=rng.choice([1e-6, 1e-3, 0.5]))


def _draw_lora(rng):
    nv, nr = _tokens(rng)
    c = dict(b=rng.choice([0, 1, 2]) if rng.random() < 0.15 else rng.choice([1, 2]), nv=nv, nr=nr,
                din=rng.choice([0, 1, 5, 12, 17]) if rng.random() < 0.2 else rng.choice([5, 12, 17]),
                dout=rng.choice([1, 6, 10]), r=rng.choice([1, 2, 5]), bias=rng.random() < 0.7,
                scale=rng.choice([0.5, 2.0, 0.0, -1.0]), dtype=rng.choice(["fp32", "fp32", "fp16"]),
                hows=[_how(rng) for _ in range(5)], grads=[rng.random() < 0.6 for _ in range(5)],
                mixed=rng.choice([None] * 30 + ["weight", "bias", "lora_a", "lora_b"]))
    if c["mixed"]:  # one argument in another float dtype, on plain layouts and rows that use it
        c.update(b=max(c["b"], 1), nr=max(c["nr"], 1), bias=c["bias"] or c["mixed"] == "bias")
        for i in (0, ["x", "weight", "bias", "lora_a", "lora_b"].index(c["mixed"])):
            c["hows"][i] = "contig"
    return c


def _draw_module(rng):
    nv, nr = _tokens(rng)
    return dict(b=rng.choice([1, 2]), nv=nv, nr=nr, x2d=rng.random() < 0.3, din=rng.choice([5, 12]),
                dout=rng.choice([3, 10]), rank=rng.choice([0, 1, 3]), bias=rng.random() < 0.7,
                alpha=rng.choice([None, 2.0, 8]), nv_none=rng.random() < 0.15,
                fold=rng.choice(["auto", "unfold", "fold"]), train=rng.random() < 0.5,
                dtype=rng.choice(["fp32", "fp32", "fp16"]), how=_how(rng))


def _draw_quant(rng):
    lead = rng.choice([(), (0,), (1,), (7,), (2, 3)])
    return dict(shape=lead + (rng.choice([0, 1, 7, 16, 33]),), dtype=rng.choice(["fp32", "fp32", "fp16"]),
                pad_to=rng.choice([1, 1, 16, 3]), how=_how(rng), zero_row=rng.random() < 0.3,
                mag=rng.choice([1.0, 1e-3, 300.0]))


def _draw_fp8_linear(rng):
    lead = rng.choice([(3,), (2, 5), (0,)])
    return dict(lead=lead, k=rng.choice([0, 1, 8, 19]), n=rng.choice([1, 6, 16]), bias=rng.random() < 0.6,
                dtype=rng.choice(["fp32", "fp32", "fp16"]), how=_how(rng), bias_how=_how(rng),
                grad_x=rng.random() < 0.6, grad_b=rng.random() < 0.5)


def _draw_layout(rng):
    refs = [(rng.choice(["face", "body"]), rng.randint(1, 3), rng.randint(1, 3))
            for _ in range(rng.choice([0, 1, 2, 3]))]
    return dict(video=(rng.randint(0, 2), rng.randint(0, 3), rng.randint(0, 3)), refs=refs,
                face=rng.choice([1, 2, 0, -1]), body=rng.choice([1, 2, 5]), shift=rng.random() < 0.7,
                d=rng.choice([8, 10, 16, 30, 64]), theta=rng.choice([10000.0, 100, 0.5, 1e6]))


# Spoiled arguments per op: (mutation, names the message may use). A mutation spoils one argument.
INVALID = {
    "asym_attention": [
        ("q_rank", ["q"]), ("k_shape", ["k"]), ("v_dtype", ["v"]), ("int_dtype", ["q"]),
        ("odd_d", ["head_dim", "q"]), ("small_d", ["head_dim", "q"]), ("nv_high", ["num_video"]),
        ("nv_neg", ["num_video"]), ("nv_float", ["num_video"]), ("nv_bool", ["num_video"]),
        ("nv_tensor", ["num_video"]), ("nv_str", ["num_video"]), ("cos_shape", ["cos", "sin", "cos/sin"]),
        ("cos_only", ["cos", "sin"]), ("cos_int", ["cos"]), ("scale_nan", ["scale"]),
        ("scale_inf", ["scale"]), ("scale_list", ["scale"]), ("scale_str", ["scale"]),
        ("scale_bool", ["scale"]), ("scale_tensor", ["scale"]), ("backend", ["backend"]),
        ("rope_mode", ["rope_mode"]), ("q_list", ["q"]), ("cos_meta", ["cos"]), ("precision", ["precision"]),
        ("cos_grad", ["cos", "sin", "cos/sin"]),
    ],
    "cached_asym_attention": [
        ("q_rank", ["q_v"]), ("k_shape", ["k_v"]), ("v_dtype", ["v_v"]), ("ref_shape", ["ref_k", "ref_v"]),
        ("ref_batch", ["ref_k"]), ("ref_heads", ["ref_k"]), ("ref_int", ["ref_k"]), ("ref_list", ["ref_v"]),
        ("cos_shape", ["cos", "sin", "cos/sin"]), ("scale_nan", ["scale"]), ("scale_list", ["scale"]),
        ("backend", ["backend"]), ("rope_mode", ["rope_mode"]), ("ref_meta", ["ref_v"]),
        ("precision", ["precision"]), ("cache_ref_v", ["ref_v"]), ("cache_no_fp8", ["precision"]),
        ("cache_heads", ["q_v", "ref_k"]), ("cache_block_n", ["block_n"]),
        ("cos_grad", ["cos", "sin", "cos/sin"]),
    ],
    "apply_rope": [
        ("x_rank", ["x"]), ("x_int", ["x"]), ("odd_d", ["head_dim", "x"]),
        ("cos_shape", ["cos", "sin", "cos/sin"]),
        ("no_tables", ["cos", "sin"]), ("cos_only", ["cos", "sin"]), ("cos_int", ["cos"]),
        ("backend", ["backend"]), ("x_list", ["x"]), ("cos_meta", ["cos"]),
        ("cos_grad", ["cos", "sin", "cos/sin"]),
    ],
    "qk_norm_rope": [
        ("k_shape", ["k"]), ("qw_shape", ["q_weight"]), ("kw_int", ["k_weight"]), ("eps_none", ["eps"]),
        ("eps_nan", ["eps"]), ("eps_neg", ["eps"]), ("eps_str", ["eps"]),
        ("cos_shape", ["cos", "sin", "cos/sin"]),
        ("backend", ["backend"]), ("qw_meta", ["q_weight"]), ("cos_grad", ["cos", "sin", "cos/sin"]),
    ],
    "ref_lora_linear": [
        ("x_rank", ["x"]), ("w_shape", ["weight"]), ("a_shape", ["lora_a"]), ("b_shape", ["lora_b"]),
        ("bias_shape", ["bias"]), ("bias_2d", ["bias"]), ("rank0", ["lora_a"]),
        ("x_int", ["x"]), ("w_list", ["weight"]), ("scale_nan", ["scale"]), ("scale_tensor", ["scale"]),
        ("scale_str", ["scale"]), ("nv_high", ["num_video"]), ("nv_float", ["num_video"]),
        ("nv_bool", ["num_video"]), ("backend", ["backend"]), ("a_meta", ["lora_a"]),
    ],
    "RefLoRALinear": [
        ("x_4d", ["x"]), ("x_1d", ["x"]), ("nv_str", ["num_video"]), ("nv_float", ["num_video"]),
        ("nv_bool", ["num_video"]), ("nv_high", ["num_video"]), ("nv_neg", ["num_video"]),
        ("x_list", ["x"]), ("x_int", ["x"]), ("rank_float", ["rank"]), ("in_float", ["in_features"]),
        ("alpha_nan", ["alpha"]), ("bias_str", ["bias"]), ("fold_mode", ["fold_mode"]),
    ],
    "per_token_quant_fp8": [
        ("x_int", ["x"]), ("x_fp64", ["x"]), ("x_0d", ["x"]), ("x_list", ["x"]), ("pad_zero", ["pad_to"]),
        ("pad_bool", ["pad_to"]), ("pad_float", ["pad_to"]), ("pad_str", ["pad_to"]),
        ("backend", ["backend"]),
    ],
    "fp8_linear": [
        ("w_dtype", ["weight_fp8"]), ("w_1d", ["weight_fp8"]), ("k_mismatch", ["x", "weight_fp8"]),
        ("scale_shape", ["weight_scale"]), ("bias_shape", ["bias"]), ("bias_list", ["bias"]),
        ("gemm", ["gemm"]), ("act_backend", ["backend", "act_backend"]), ("x_int", ["x"]),
        ("x_list", ["x"]), ("fast_accum", ["use_fast_accum"]),
    ],
    "TokenLayout": [
        ("video_float", ["video[0]", "video"]), ("video_bool", ["video[1]", "video"]),
        ("video_none", ["video"]), ("video_len", ["video"]), ("video_neg", ["video"]),
        ("refs_int", ["refs"]), ("ref_int", ["refs[0]"]), ("ref_len", ["refs[0]"]),
        ("ref_kind", ["refs[0]"]), ("ref_h_float", ["refs[0]"]), ("ref_w_str", ["refs[0]"]),
        ("ref_zero", ["refs[0]"]), ("ref_kind_int", ["refs[0]"]),
    ],
    "irope_positions": [
        ("layout_tuple", ["layout"]), ("face_float", ["face_offset"]), ("body_bool", ["body_offset"]),
        ("body_str", ["body_offset"]), ("shift_int", ["spatial_shift"]),
    ],
    "rope_cos_sin": [
        ("theta_zero", ["theta"]), ("theta_neg", ["theta"]), ("theta_nan", ["theta"]),
        ("theta_inf", ["theta"]),
        ("theta_str", ["theta"]), ("theta_tensor", ["theta"]), ("d_odd", ["head_dim"]),
        ("d_small", ["head_dim"]),
        ("d_float", ["head_dim"]), ("d_bool", ["head_dim"]), ("pos_float", ["pos"]), ("pos_shape", ["pos"]),
        ("pos_list", ["pos"]), ("pos_1d", ["pos"]),
    ],
}

DRAW = {"asym_attention": _draw_attention, "cached_asym_attention": _draw_attention,
        "apply_rope": _draw_rope, "qk_norm_rope": _draw_rope, "ref_lora_linear": _draw_lora,
        "RefLoRALinear": _draw_module, "per_token_quant_fp8": _draw_quant,
        "fp8_linear": _draw_fp8_linear, "TokenLayout": _draw_layout, "irope_positions": _draw_layout,
        "rope_cos_sin": _draw_layout}


def _draw(op: str, seed: int, i: int) -> dict:
    rng = random.Random(f"{op}-{seed}-{i}")
    case = DRAW[op](rng)
    case.update(op=op, seed=seed, i=i, bad=None, names=None)
    # case 0 of each op and seed is valid, case 1 invalid, the others invalid with odds 0.4
    if i == 1 or (i > 1 and rng.random() < 0.4):  # an invalid call: spoil one argument
        case["bad"], case["names"] = rng.choice(INVALID[op])
    return case


# Pinned cases: every defect issue 11 found by hand stays in the default run whatever the seeds
# draw (a drawn case with the given fields overridden).
PINNED = [
    ("lora-strided-bias", "ref_lora_linear", dict(b=2, nv=3, nr=4, din=12, dout=10, bias=True, mixed=None,
                                                  hows=["contig", "contig", "strided", "contig", "contig"])),
    ("lora-stride0-bias", "ref_lora_linear", dict(b=1, nv=2, nr=4, din=5, dout=6, bias=True, mixed=None,
                                                  hows=["contig", "contig", "stride0", "contig", "contig"])),
    ("lora-din0-grads", "ref_lora_linear", dict(b=1, nv=3, nr=1, din=0, dout=6, mixed=None,
                                                grads=[True, True, True, True, True], hows=["contig"] * 5)),
    ("lora-nv=N-adapter-grads", "ref_lora_linear", dict(b=2, nv=5, nr=0, din=12, mixed=None,
                                                        grads=[False, False, False, True, True],
                                                        hows=["contig"] * 5)),
    ("lora-mixed-dtype", "ref_lora_linear", dict(b=1, nv=3, nr=2, din=12, mixed="lora_a", dtype="fp16",
                                                 hows=["contig"] * 5)),
    ("attention-N0-grads", "asym_attention", dict(b=1, nv=0, nr=0, grads=[True] * 5, fp8=False)),
    ("cached-Nv0-grads", "cached_asym_attention", dict(b=1, nv=0, nr=4, grads=[True] * 5, fp8=False)),
    # 8-bit attention: joint with rope and odd head dim; cached over a quantized cache whose
    # reference keys alone need grad (the gradient request must still raise)
    ("fp8-joint", "asym_attention", dict(b=2, nv=13, nr=7, d=34, rope=True, fp8=True, dtype="fp16",
                                         grads=[True, False, False])),
    ("fp8-cached-cache-grad", "cached_asym_attention", dict(b=1, nv=5, nr=4, fp8=True, cache=True,
                                                            grads=[False, False, False, True, False])),
    ("module-2d-x", "RefLoRALinear", dict(x2d=True, rank=3, nv=2, nr=4, nv_none=False)),
    ("lora-rank0-named", "ref_lora_linear", dict(bad="rank0", names=["lora_a"])),
]


def _pinned(name: str, op: str, fields: dict) -> dict:
    c = dict(DRAW[op](random.Random(f"pinned-{name}")), op=op, seed=-1, i=len(name), bad=None, names=None)
    c.update(fields)
    return c


def _params():
    out = []
    for name, op, fields in PINNED:
        out.append(pytest.param(_pinned(name, op, fields), id=f"pinned-{name}"))
    for seed in SEEDS:
        for op in DRAW:
            for i in range(CASES_PER_SEED):
                c = _draw(op, seed, i)
                cid = f"{op}-s{seed}-{i}-{'bad-' + c['bad'] if c['bad'] else 'ok'}"
                out.append(pytest.param(c, id=cid))
    return out


# =========================================================================== runners
def _gen(c: dict) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{c['op']}-{c['seed']}-{c['i']}".encode()))


def _tables_spec(n: int, d: int, how: str, g: torch.Generator) -> tuple[Spec, Spec]:
    """cos/sin of random angles, as fp32 views laid out as ``how``."""
    ang = Spec((n, d // 2), how, g, scale=3.0)
    cos, sin = Spec((n, d // 2), "contig", g), Spec((n, d // 2), "contig", g)
    cos.base, sin.base = ang.base.cos(), ang.base.sin()
    cos.how = sin.how = ang.how
    if ang.how == "stride0":
        cos.dim = sin.dim = ang.dim
    return cos, sin


def _spoil_attention(c, args: dict, cached: bool) -> None:
    """Spoil one argument of a (cached_)asym_attention call in ``args`` (keyword names)."""
    qn, kn, vn = ("q_v", "k_v", "v_v") if cached else ("q", "k", "v")
    q = args[qn]
    b, n, h, d = q.shape
    m = c["bad"]
    bad = {
        "q_rank": lambda: args.update({qn: q[0]}),
        "k_shape": lambda: args.update({kn: torch.randn(b, n + 1, h, d, device=DEVICE)}),
        "v_dtype": lambda: args.update({vn: args[vn].double()}),
        "int_dtype": lambda: args.update({k: torch.zeros(b, n, h, d, dtype=torch.int32, device=DEVICE)
                                          for k in (qn, kn, vn)}),
        "odd_d": lambda: args.update({k: torch.randn(b, n, h, 15, device=DEVICE) for k in (qn, kn, vn)}
                                     | {"cos": None, "sin": None}),
        "small_d": lambda: args.update({k: torch.randn(b, n, h, 6, device=DEVICE) for k in (qn, kn, vn)}
                                       | {"cos": None, "sin": None}),
        "nv_high": lambda: args.update(num_video=n + 1),
        "nv_neg": lambda: args.update(num_video=-1),
        "nv_float": lambda: args.update(num_video=float(args["num_video"])),
        "nv_bool": lambda: args.update(num_video=True),
        "nv_tensor": lambda: args.update(num_video=torch.tensor(args["num_video"])),
        "nv_str": lambda: args.update(num_video=str(args["num_video"])),
        "cos_shape": lambda: args.update(cos=torch.zeros(n + 1, d // 2, device=DEVICE),
                                         sin=torch.zeros(n + 1, d // 2, device=DEVICE)),
        "cos_only": lambda: args.update(cos=torch.zeros(n, d // 2, device=DEVICE), sin=None),
        "cos_int": lambda: args.update(cos=torch.zeros(n, d // 2, dtype=torch.int64, device=DEVICE),
                                       sin=torch.zeros(n, d // 2, device=DEVICE)),
        "scale_nan": lambda: args.update(scale=float("nan")),
        "scale_inf": lambda: args.update(scale=float("inf")),
        "scale_list": lambda: args.update(scale=[0.5]),
        "scale_str": lambda: args.update(scale="0.5"),
        "scale_bool": lambda: args.update(scale=True),
        "scale_tensor": lambda: args.update(scale=torch.tensor(0.5)),
        "backend": lambda: args.update(backend="cuda"),
        "rope_mode": lambda: args.update(rope_mode="inline"),
        "q_list": lambda: args.update({qn: q.tolist()}),
        "cos_meta": lambda: args.update(cos=torch.zeros(n, d // 2, device="meta"),
                                        sin=torch.zeros(n, d // 2, device=DEVICE)),
        # tables are constants on both backends: one that requires grad is refused
        "cos_grad": lambda: args.update(cos=torch.ones(n, d // 2, device=DEVICE, requires_grad=True),
                                        sin=torch.zeros(n, d // 2, device=DEVICE)),
        "ref_shape": lambda: args.update(
            ref_v=torch.randn(b, args["ref_k"].shape[1] + 1, h, d, device=DEVICE)),
        "ref_batch": lambda: args.update(ref_k=torch.randn(b + 1, 2, h, d, device=DEVICE),
                                         ref_v=torch.randn(b + 1, 2, h, d, device=DEVICE)),
        "ref_heads": lambda: args.update(ref_k=torch.randn(b, 2, h + 1, d, device=DEVICE),
                                         ref_v=torch.randn(b, 2, h + 1, d, device=DEVICE)),
        "ref_int": lambda: args.update(ref_k=torch.zeros(b, 2, h, d, dtype=torch.int64, device=DEVICE),
                                       ref_v=torch.randn(b, 2, h, d, device=DEVICE)),
        "ref_list": lambda: args.update(ref_v=args["ref_v"].tolist()),
        "ref_meta": lambda: args.update(ref_v=torch.zeros(args["ref_v"].shape, device="meta")),
        "precision": lambda: args.update(precision=BAD_PRECISIONS[c["i"] % len(BAD_PRECISIONS)]),
        # a QuantizedKV reference cache (precision="fp8" only, ref_v=None)
        "cache_ref_v": lambda: args.update(ref_k=_cache(args), precision="fp8"),
        "cache_no_fp8": lambda: args.update(ref_k=_cache(args), ref_v=None, precision=None),
        "cache_heads": lambda: args.update(ref_k=_cache(args, heads=h + 1), ref_v=None, precision="fp8"),
    }
    bad[m]()


#: values of ``precision`` that must be refused (only None and "fp8" are valid)
BAD_PRECISIONS = ["int4", "FP8", "fp16", 8, True, ["fp8"], torch.float8_e4m3fn, "fp8 "]


def _cache(args: dict, heads: int | None = None):
    """The reference K/V of ``args`` quantized once (``heads``: built for another head count)."""
    rk, rv = args["ref_k"], args["ref_v"]
    if heads is not None:
        rk, rv = (torch.randn(*t.shape[:2], heads, t.shape[3], device=t.device) for t in (rk, rv))
    return wk.attention.quantize_ref_kv(rk, rv, backend=args["backend"])


def _bad_attention_args(c, cached: bool) -> dict:
    g = torch.Generator().manual_seed(c["seed"] * 97 + c["i"])
    b, n, h, d = 1, 5, 2, 16
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    cos = torch.randn(n, d // 2, generator=g).to(DEVICE)
    if cached:
        return dict(q_v=mk(b, n, h, d), k_v=mk(b, n, h, d), v_v=mk(b, n, h, d), ref_k=mk(b, 3, h, d),
                    ref_v=mk(b, 3, h, d), cos=cos.cos(), sin=cos.sin(), scale=None)
    return dict(q=mk(b, n, h, d), k=mk(b, n, h, d), v=mk(b, n, h, d), num_video=3, cos=cos.cos(),
                sin=cos.sin(), scale=None)


def run_asym_attention(c):
    if c["bad"]:
        for backend in BACKENDS:
            args = dict(_bad_attention_args(c, cached=False), backend=backend,
                        precision="fp8" if c["fp8"] else None)
            _spoil_attention(c, args, cached=False)
            _expect_error(lambda: wk.asym_attention(**args), c["names"], f"{backend}/{c['bad']}")
        return
    g, dt = _gen(c), DTYPES[c["dtype"]]
    b, nv, nr, h, d = c["b"], c["nv"], c["nr"], c["h"], c["d"]
    n = nv + nr
    specs = [Spec((b, n, h, d), how, g) for how in c["hows"][:3]]
    do = Spec((b, n, h, d), "contig", g).base
    cos, sin = _tables_spec(n, d, c["tables"], g) if c["rope"] else (None, None)
    needs = c["grads"][:3]

    def tables(dtype):
        if cos is None:
            return None, None
        return cos.view(cos.leaf(dtype, False)), sin.view(sin.leaf(dtype, False))

    if c["fp8"]:
        return _fp8_attention(c, specs, tables, needs, do, cached=False)

    def run(backend):
        leaves = [s.leaf(dt, ng) for s, ng in zip(specs, needs)]
        cs, sn = tables(torch.float32)
        o = wk.asym_attention(*[s.view(lf) for s, lf in zip(specs, leaves)], nv, cs, sn, c["scale"],
                              backend=backend, rope_mode=c["rope_mode"])
        assert o.shape == (b, n, h, d)
        return [o], leaves, [do]

    def truth():
        leaves = [s.leaf(torch.float64, ng) for s, ng in zip(specs, needs)]
        q, k, v = [s.view(lf) for s, lf in zip(specs, leaves)]
        if cos is not None:
            cs, sn = tables(torch.float64)
            q, k = _rotate64(q, cs, sn), _rotate64(k, cs, sn)
        return [dense_asym_attention_fp64(q, k, v, nv, c["scale"])], leaves, [do.double()]

    _compare(run, truth, ["q", "k", "v"], needs, specs)


def run_cached_asym_attention(c):
    if c["bad"]:
        for backend in BACKENDS:
            a2 = dict(_bad_attention_args(c, cached=True), backend=backend, num_video=3,
                      precision="fp8" if c["fp8"] else None)
            if c["bad"] == "cache_block_n":  # quantize_ref_kv refuses a key block the kernel cannot use
                bn = [24, 8, 0, 16.0, True, "64", None][c["i"] % 7]
                _expect_error(lambda: wk.attention.quantize_ref_kv(a2["ref_k"], a2["ref_v"], block_n=bn,
                                                                   backend=backend),
                              c["names"], f"{backend}/{c['bad']}")
                continue
            _spoil_attention(c, a2, cached=True)
            a2.pop("num_video")
            _expect_error(lambda: wk.cached_asym_attention(**a2), c["names"], f"{backend}/{c['bad']}")
        return
    g, dt = _gen(c), DTYPES[c["dtype"]]
    b, nv, nr, h, d = c["b"], c["nv"], c["nr"], c["h"], c["d"]
    specs = [Spec((b, nv, h, d), how, g) for how in c["hows"][:3]]
    specs += [Spec((b, nr, h, d), how, g) for how in c["hows"][3:5]]
    do = Spec((b, nv, h, d), "contig", g).base
    cos, sin = _tables_spec(nv, d, c["tables"], g) if c["rope"] else (None, None)
    needs = c["grads"][:5]
    scale = c["scale"]
    if c["fp8"]:
        def tables(dtype):
            if cos is None:
                return None, None
            return cos.view(cos.leaf(dtype, False)), sin.view(sin.leaf(dtype, False))

        return _fp8_attention(c, specs, tables, needs, do, cached=True)

    def run(backend):
        leaves = [s.leaf(dt, ng) for s, ng in zip(specs, needs)]
        cs = None if cos is None else cos.view(cos.leaf(torch.float32, False))
        sn = None if sin is None else sin.view(sin.leaf(torch.float32, False))
        o = wk.cached_asym_attention(*[s.view(lf) for s, lf in zip(specs, leaves)], cs, sn, scale,
                                     backend=backend, rope_mode=c["rope_mode"])
        assert o.shape == (b, nv, h, d)
        return [o], leaves, [do]

    def truth():
        leaves = [s.leaf(torch.float64, ng) for s, ng in zip(specs, needs)]
        q, k, v, rk, rv = [s.view(lf) for s, lf in zip(specs, leaves)]
        if cos is not None:
            cs, sn = cos.view(cos.leaf(torch.float64, False)), sin.view(sin.leaf(torch.float64, False))
            q, k = _rotate64(q, cs, sn), _rotate64(k, cs, sn)
        return [_cached64(q, k, v, rk, rv, scale)], leaves, [do.double()]

    _compare(run, truth, ["q_v", "k_v", "v_v", "ref_k", "ref_v"], needs, specs)


def _cached64(q, k, v, rk, rv, scale):
    """Video queries over ``[k; rk]`` (q, k already rotated), in fp64."""
    kk, vv = torch.cat([k, rk], 1).double(), torch.cat([v, rv], 1).double()
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p = (torch.einsum("bnhd,bmhd->bhnm", q.double(), kk) * sc).softmax(-1)
    return torch.einsum("bhnm,bmhd->bnhd", p, vv)


# --------------------------------------------------------------------------- 8-bit attention
FP8_COS_MIN = 0.995  # docs/design.md §9: cosine similarity against bf16 attention


def _fp8_block_m(backend: str) -> int:
    """The query tile of the 8-bit run that just happened on ``backend`` (the spec needs it)."""
    from wildactor_kernels.attention import fp8_reference as R

    if backend == "reference":
        return R.DEFAULT_BLOCK_M
    from wildactor_kernels.attention.fp8_kernels import fp8_block_m

    return fp8_block_m() or R.DEFAULT_BLOCK_M


def _assert_fp8_kernel_matches_spec(o: torch.Tensor, spec: torch.Tensor, v_max: float, who: str) -> None:
    """The Triton kernel against the spec (same quantization, same tiles): equal up to the rounding
    of exp2 and of the sums, except that such a rounding can move one P value across an e4m3
    rounding boundary (or, on the GPU, one int8 code by one): a few rows then differ by at most
    one e4m3 step of one probability, ``2^-3 * max|v|``. A dropped key, a wrong stride or an
    unwritten row is off in many rows, or by more."""
    o64, s64 = o.detach().double(), spec.double()
    mag = s64.abs().max().item() if s64.numel() else 0.0
    # (the GPU's exp2 and division are approximate: 1e-4 of the output's scale, as the kernel tests)
    tight = max(4.0 * torch.finfo(o.dtype).eps, 1e-4) * max(mag, 1e-3) + 1e-6
    off = (o64 - s64).abs() > tight
    rows = off.any(-1)  # [B, N, H]
    allowed = max(2, rows.numel() // 50)
    assert int(rows.sum()) <= allowed, (
        f"{who}: {int(rows.sum())} of {rows.numel()} rows differ from the 8-bit spec by more than "
        f"{tight:.2e} (max {(o64 - s64).abs().max().item():.3e})")
    if off.any():
        worst = (o64 - s64).abs().max().item()
        assert worst <= 2.0 ** -3 * v_max * 1.01 + tight, (
            f"{who}: off the 8-bit spec by {worst:.3e}, beyond one e4m3 step of P ({2.0 ** -3 * v_max:.3e})")


def _fp8_backends() -> tuple[str, ...]:
    """8-bit kernels need fp8 tensor cores (sm_89+); on an older GPU backend="triton" raises by
    design (attention/fp8_op.py), so only the reference runs there."""
    if DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE) < (8, 9):
        return ("reference",)
    return BACKENDS


def _assert_cos(o: torch.Tensor, ref: torch.Tensor, who: str) -> None:
    a, b = o.detach().double().flatten(), ref.detach().double().flatten()
    if a.numel() == 0 or b.norm() == 0:  # nothing to compare: degenerate
        return
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    assert cos >= FP8_COS_MIN, f"{who}: cosine {cos:.5f} < {FP8_COS_MIN}"


def _fp8_attention(c, specs, tables, needs, do, cached: bool) -> None:
    """``precision="fp8"`` (forward only): per backend, the output against the 8-bit spec
    (``fp8_reference.py``; the reference backend *is* the spec, the kernel agrees up to
    rounding); both against fp64 and bf16 attention within the documented cosine; a gradient
    request raises the documented error. The cached op reads the reference K/V as tensors or,
    when ``c["cache"]``, as a :class:`QuantizedKV` cache quantized once by that backend."""
    from wildactor_kernels.attention import fp8_reference as R

    dt, nv, scale = DTYPES[c["dtype"]], c["nv"], c["scale"]
    use_cache = cached and c["cache"]
    outs = {}
    for backend in _fp8_backends():
        leaves = [s.leaf(dt, ng) for s, ng in zip(specs, needs)]
        views = [s.view(lf) for s, lf in zip(specs, leaves)]
        cs, sn = tables(torch.float32)
        kw = dict(backend=backend, rope_mode=c["rope_mode"], precision="fp8")
        if cached:
            q, k, v, rk, rv = views
            if use_cache:
                cache = wk.attention.quantize_ref_kv(rk, rv, backend=backend)
                o = wk.cached_asym_attention(q, k, v, cache, None, cs, sn, scale, **kw)
            else:
                o = wk.cached_asym_attention(q, k, v, rk, rv, cs, sn, scale, **kw)
            with torch.no_grad():
                ref_set = R.quantize_ref_kv(rk, rv) if use_cache else rk
                spec = R.cached_asym_attention_fp8_ref(q, k, v, ref_set, None if use_cache else rv, cs, sn,
                                                       scale, block_m=_fp8_block_m(backend))
            v_max = max(t.detach().abs().max().item() if t.numel() else 0.0 for t in (v, rv))
        else:
            q, k, v = views
            o = wk.asym_attention(q, k, v, nv, cs, sn, scale, **kw)
            with torch.no_grad():
                spec = R.asym_attention_fp8_ref(q, k, v, nv, cs, sn, scale, block_m=_fp8_block_m(backend))
            v_max = v.detach().abs().max().item() if v.numel() else 0.0
        who = f"fp8/{backend}{'/cache' if use_cache else ''}"
        assert o.shape == q.shape and o.dtype == dt, f"{who}: {tuple(o.shape)} {o.dtype}"
        assert not torch.isnan(o).any(), f"{who}: NaN in the output (an unwritten element?)"
        if backend == "reference":
            assert torch.equal(o.detach(), spec), f"{who}: the reference backend is not the spec"
        else:
            _assert_fp8_kernel_matches_spec(o, spec, v_max, who)
        # forward only: a gradient request raises the documented error, inference needs no graph
        gl = [lf for lf, ng in zip(leaves, needs) if ng]
        if use_cache and c["nr"] == 0:  # an empty cache holds no statistic of ref_k/ref_v to guard
            gl = [lf for lf, ng in zip(leaves[:3], needs) if ng]
        if gl:
            assert o.requires_grad, f"{who}: inputs need grad but the output has no graph (no error to raise)"
            with pytest.raises(RuntimeError, match="forward-only"):
                torch.autograd.grad(o, gl, do.to(device=o.device, dtype=o.dtype))
        else:
            assert not o.requires_grad, f"{who}: a graph without any input that needs grad"
        outs[backend] = o
    # accuracy against full precision: the fp64 truth and bf16 attention (reference backend)
    q, k, v, *ref = [s.view(s.leaf(torch.float64, False)) for s in specs]
    c64, s64 = tables(torch.float64)
    q, k = (q, k) if c64 is None else (_rotate64(q, c64, s64), _rotate64(k, c64, s64))
    truth = _cached64(q, k, v, *ref, scale) if cached else dense_asym_attention_fp64(q, k, v, nv, scale)
    bf = [s.view(s.leaf(torch.bfloat16, False)) for s in specs]
    cs, sn = tables(torch.float32)
    if cached:
        bf16 = wk.cached_asym_attention(*bf, cs, sn, scale, backend="reference")
    else:
        bf16 = wk.asym_attention(*bf, nv, cs, sn, scale, backend="reference")
    for backend, o in outs.items():
        _assert_cos(o, truth, f"fp8/{backend} vs fp64 attention")
        _assert_cos(o, bf16, f"fp8/{backend} vs bf16 attention")


def _bad_rope(c, fn: str):
    g = torch.Generator().manual_seed(c["seed"] * 89 + c["i"])
    b, n, h, d = 2, 5, 2, 16
    x = torch.randn(b, n, h, d, generator=g).to(DEVICE)
    ang = torch.randn(n, d // 2, generator=g).to(DEVICE)
    for backend in BACKENDS:
        a = dict(q=x, k=x.clone(), q_weight=torch.ones(h * d, device=DEVICE), k_weight=None,
                 cos=ang.cos(), sin=ang.sin(), eps=1e-6, backend=backend)
        m = c["bad"]
        {
            "x_rank": lambda: a.update(q=x[0]), "x_int": lambda: a.update(q=x.long()),
            "odd_d": lambda: a.update(q=x[..., :15]), "x_list": lambda: a.update(q=x.tolist()),
            "cos_shape": lambda: a.update(cos=ang.cos()[1:], sin=ang.sin()[1:]),
            "no_tables": lambda: a.update(cos=None, sin=None), "cos_only": lambda: a.update(sin=None),
            "cos_int": lambda: a.update(cos=ang.long()), "backend": lambda: a.update(backend="gpu"),
            "cos_meta": lambda: a.update(cos=ang.to("meta")),
            "cos_grad": lambda: a.update(sin=ang.sin().requires_grad_()),
            "k_shape": lambda: a.update(k=x[:, 1:]),
            "qw_shape": lambda: a.update(q_weight=torch.ones(h * d + 1)),
            "kw_int": lambda: a.update(k_weight=torch.ones(h * d, dtype=torch.int64)),
            "eps_none": lambda: a.update(eps=None), "eps_nan": lambda: a.update(eps=float("nan")),
            "eps_neg": lambda: a.update(eps=-1.0), "eps_str": lambda: a.update(eps="1e-6"),
            "qw_meta": lambda: a.update(q_weight=torch.ones(h * d, device="meta")),
        }[m]()
        if fn == "apply_rope":
            call = lambda: wk.apply_rope(a["q"], a["cos"], a["sin"], backend=a["backend"])  # noqa: E731
        else:
            call = lambda: wk.qk_norm_rope(**a)  # noqa: E731
        _expect_error(call, c["names"], f"{backend}/{m}")


def run_apply_rope(c):
    if c["bad"]:
        return _bad_rope(c, "apply_rope")
    g, dt = _gen(c), DTYPES[c["dtype"]]
    b, n, h, d = c["b"], c["n"], c["h"], c["d"]
    spec = Spec((b, n, h, d), c["hows"][0], g)
    do = Spec((b, n, h, d), "contig", g).base
    cos, sin = _tables_spec(n, d, c["tables"], g)
    needs = c["grads"][:1]

    def run(backend):
        leaf = spec.leaf(dt, needs[0])
        o = wk.apply_rope(spec.view(leaf), cos.view(cos.leaf(torch.float32, False)),
                          sin.view(sin.leaf(torch.float32, False)), backend=backend)
        return [o], [leaf], [do]

    def truth():
        leaf = spec.leaf(torch.float64, needs[0])
        o = _rotate64(spec.view(leaf), cos.view(cos.leaf(torch.float64, False)),
                      sin.view(sin.leaf(torch.float64, False)))
        return [o], [leaf], [do.double()]

    _compare(run, truth, ["x"], needs, [spec])


def run_qk_norm_rope(c):
    if c["bad"]:
        return _bad_rope(c, "qk_norm_rope")
    g, dt = _gen(c), DTYPES[c["dtype"]]
    b, n, h, d = c["b"], c["n"], c["h"], c["d"]
    specs = [Spec((b, n, h, d), how, g) for how in c["hows"][:2]]
    wspecs = [Spec((h * d,), how, g) if use else None for how, use in zip(c["hows"][2:], c["weights"])]
    for w in wspecs:
        if w is not None:
            w.base = 1.0 + 0.3 * w.base
    dos = [Spec((b, n, h, d), "contig", g).base for _ in range(2)]
    cos, sin = _tables_spec(n, d, c["tables"], g)
    used = [True, True] + [w is not None for w in wspecs]
    needs = [ng and u for ng, u in zip(c["grads"], used)]
    all_specs = specs + wspecs

    def leaves_of(dtype):
        return [None if s is None else s.leaf(dtype, ng) for s, ng in zip(all_specs, needs)]

    def views(leaves):
        return [None if s is None else s.view(lf) for s, lf in zip(all_specs, leaves)]

    def run(backend):
        leaves = leaves_of(dt)
        q, k, qw, kw = views(leaves)
        outs = wk.qk_norm_rope(q, k, qw, kw, cos.view(cos.leaf(torch.float32, False)),
                               sin.view(sin.leaf(torch.float32, False)), eps=c["eps"], backend=backend)
        return list(outs), [lf if lf is not None else torch.zeros(0) for lf in leaves], dos

    def truth():
        leaves = leaves_of(torch.float64)
        q, k, qw, kw = views(leaves)
        cs, sn = cos.view(cos.leaf(torch.float64, False)), sin.view(sin.leaf(torch.float64, False))
        outs = [_rotate64(_rms64(q, qw, c["eps"]), cs, sn), _rotate64(_rms64(k, kw, c["eps"]), cs, sn)]
        return outs, [lf if lf is not None else torch.zeros(0) for lf in leaves], [t.double() for t in dos]

    _compare(run, truth, ["q", "k", "q_weight", "k_weight"], needs, all_specs)


def _bad_lora(c):
    g = torch.Generator().manual_seed(c["seed"] * 83 + c["i"])
    x, w = torch.randn(2, 9, 12, generator=g), torch.randn(10, 12, generator=g)
    bias = torch.randn(10, generator=g)
    a, b_ = torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g)
    x, w, bias, a, b_ = (t.to(DEVICE) for t in (x, w, bias, a, b_))
    for backend in BACKENDS:
        args = dict(x=x, weight=w, bias=bias, lora_a=a, lora_b=b_, scale=0.5, num_video=5, backend=backend)
        {
            "x_rank": lambda: args.update(x=x[0]), "w_shape": lambda: args.update(weight=w[:, 1:]),
            "a_shape": lambda: args.update(lora_a=a[:, 1:]), "b_shape": lambda: args.update(lora_b=b_[1:]),
            "bias_shape": lambda: args.update(bias=bias[1:]), "bias_2d": lambda: args.update(bias=bias[None]),
            "rank0": lambda: args.update(lora_a=a[:0], lora_b=b_[:, :0]),
            "x_int": lambda: args.update(x=x.long()),
            "w_list": lambda: args.update(weight=w.tolist()),
            "scale_nan": lambda: args.update(scale=float("nan")),
            "scale_tensor": lambda: args.update(scale=torch.tensor(0.5)),
            "scale_str": lambda: args.update(scale="0.5"), "nv_high": lambda: args.update(num_video=10),
            "nv_float": lambda: args.update(num_video=5.0), "nv_bool": lambda: args.update(num_video=False),
            "backend": lambda: args.update(backend="triton2"),
            "a_meta": lambda: args.update(lora_a=a.to("meta")),
        }[c["bad"]]()
        _expect_error(lambda: wk.ref_lora_linear(**args), c["names"], f"{backend}/{c['bad']}")


def run_ref_lora_linear(c):
    if c["bad"]:
        return _bad_lora(c)
    g, dt = _gen(c), DTYPES[c["dtype"]]
    b, nv, nr, din, dout, r = c["b"], c["nv"], c["nr"], c["din"], c["dout"], c["r"]
    n = nv + nr
    specs = [Spec((b, n, din), c["hows"][0], g), Spec((dout, din), c["hows"][1], g),
             Spec((dout,), c["hows"][2], g) if c["bias"] else None,
             Spec((r, din), c["hows"][3], g), Spec((dout, r), c["hows"][4], g)]
    do = Spec((b, n, dout), "contig", g).base
    needs = [ng and s is not None for ng, s in zip(c["grads"], specs)]
    if c["mixed"]:
        return _same_rule_on_both_backends(c, specs, dt)

    def leaves_views(dtype):
        leaves = [None if s is None else s.leaf(dtype, ng) for s, ng in zip(specs, needs)]
        return leaves, [None if s is None else s.view(lf) for s, lf in zip(specs, leaves)]

    def run(backend):
        leaves, (x, w, bias, a, bb) = leaves_views(dt)
        o = wk.ref_lora_linear(x, w, bias, a, bb, c["scale"], nv, backend=backend)
        return [o], [lf if lf is not None else torch.zeros(0) for lf in leaves], [do]

    def truth():
        leaves, (x, w, bias, a, bb) = leaves_views(torch.float64)
        return ([_lora64(x, w, bias, a, bb, c["scale"], nv)],
                [lf if lf is not None else torch.zeros(0) for lf in leaves], [do.double()])

    _compare(run, truth, ["x", "weight", "bias", "lora_a", "lora_b"], needs, specs)


def _same_rule_on_both_backends(c, specs, dt):
    """One argument in another float dtype: both backends must apply one rule, either a
    TypeError naming an argument, or results that agree (within the looser dtype's rounding)."""
    names = ["x", "weight", "bias", "lora_a", "lora_b"]
    other = torch.float64 if dt == torch.float32 else torch.float32
    args = [None if s is None else s.view(s.leaf(other if n == c["mixed"] else dt, False))
            for n, s in zip(names, specs)]
    got = {}
    for backend in BACKENDS:
        try:
            got[backend] = wk.ref_lora_linear(*args[:3], *args[3:], c["scale"], c["nv"], backend=backend)
        except (TypeError, ValueError) as e:
            assert any(re.search(_WORD.format(n), str(e)) for n in names), f"{backend}: {e}"
            got[backend] = type(e)
    t, r = got["triton"], got["reference"]
    assert isinstance(t, type) == isinstance(r, type), (
        f"mixed {c['mixed']}: the backends disagree: "
        f"triton gives {t if isinstance(t, type) else 'a result'}, "
        f"reference {r if isinstance(r, type) else 'a result'}")
    if not isinstance(t, type):
        assert t.dtype == r.dtype and t.shape == r.shape
        torch.testing.assert_close(t, r, rtol=2e-3, atol=2e-3)


def run_RefLoRALinear(c):  # noqa: N802 (named after the class it fuzzes)
    if c["bad"]:
        m_ = c["bad"]
        ctor = {"rank_float": dict(rank=1.5), "in_float": dict(in_features=8.0),
                "alpha_nan": dict(rank=2, alpha=float("nan")), "bias_str": dict(bias="yes")}
        if m_ in ctor:
            kw = dict(in_features=8, out_features=6, rank=2) | ctor[m_]
            _expect_error(lambda: wk.RefLoRALinear(**kw), c["names"], m_)
            return
        for backend in BACKENDS:
            m = wk.RefLoRALinear(8, 6, rank=2, backend=backend, device=DEVICE)
            x, nv = torch.randn(2, 6, 8, device=DEVICE), 3
            if m_ == "fold_mode":
                _expect_error(lambda: setattr(m, "fold_mode", "merged"), c["names"], m_)
                continue
            x, nv = {"x_4d": (x[None], 3), "x_1d": (x[0, 0], 0), "nv_str": (x, "3"), "nv_float": (x, 3.0),
                     "nv_bool": (x, True), "nv_high": (x, 7), "nv_neg": (x, -1), "x_list": (x.tolist(), 3),
                     "x_int": (x.long(), 3)}[m_]
            _expect_error(lambda: m(x, nv), c["names"], f"{backend}/{m_}")
        return
    g, dt = _gen(c), DTYPES[c["dtype"]]
    b, nv, nr, din, dout = c["b"], c["nv"], c["nr"], c["din"], c["dout"]
    n = nv + nr
    shape = (n, din) if c["x2d"] else (b, n, din)
    spec = Spec(shape, c["how"], g)
    do = Spec(shape[:-1] + (dout,), "contig", g).base
    proto = wk.RefLoRALinear(din, dout, bias=c["bias"], rank=c["rank"], alpha=c["alpha"], dtype=torch.float64)
    with torch.no_grad():
        for p in proto.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    fold, train = c["fold"], c["train"] and c["fold"] != "fold"
    num_video = None if c["nv_none"] else nv

    def module(dtype, backend):
        m = wk.RefLoRALinear(din, dout, bias=c["bias"], rank=c["rank"], alpha=c["alpha"], backend=backend,
                             device=DEVICE, dtype=dtype)
        m.load_state_dict(proto.state_dict())
        m.fold_mode = fold
        m.requires_grad_(train)
        return m

    def truth_of(m, x):
        w, bias = m.weight, m.bias
        xx = x if x.ndim == 3 else x[None]
        if m.rank == 0 or num_video is None:
            y = torch.nn.functional.linear(xx, w, bias)
        else:
            y = _lora64(xx, w, bias, m.lora_A.weight, m.lora_B.weight, m.scale, num_video)
        return y if x.ndim == 3 else y[0]

    names = ["x"] + [k for k, _ in proto.named_parameters()]
    needs = [train] * len(names)

    def run(backend):
        m = module(dt, backend)
        leaf = spec.leaf(dt, train)
        with torch.set_grad_enabled(train):
            o = m(spec.view(leaf), num_video)
        return [o], [leaf] + list(m.parameters()), [do]

    def truth():
        m = module(torch.float64, "reference")
        leaf = spec.leaf(torch.float64, train)
        with torch.set_grad_enabled(train):
            o = truth_of(m, spec.view(leaf))
        return [o], [leaf] + list(m.parameters()), [do.double()]

    _compare(run, truth, names, needs, [spec] + [None] * (len(names) - 1))


def run_per_token_quant_fp8(c):
    from wildactor_kernels.quant import per_token_quant_fp8_ref

    if c["bad"]:
        for backend in BACKENDS:
            x, pad, be = torch.randn(4, 9, device=DEVICE), 16, backend
            x, pad, be = {"x_int": (x.long(), pad, be), "x_fp64": (x.double(), pad, be),
                          "x_0d": (x[0, 0], pad, be),
                          "x_list": (x.tolist(), pad, be), "pad_zero": (x, 0, be), "pad_bool": (x, True, be),
                          "pad_float": (x, 16.0, be), "pad_str": (x, "16", be),
                          "backend": (x, pad, "fast")}[c["bad"]]
            _expect_error(lambda: wk.per_token_quant_fp8(x, pad_to=pad, backend=be), c["names"],
                          f"{backend}/{c['bad']}")
        return
    g, dt = _gen(c), DTYPES[c["dtype"]]
    spec = Spec(c["shape"], c["how"], g, scale=c["mag"])
    if c["zero_row"] and spec.base.numel():
        spec.base.view(-1)[: spec.base.shape[-1]] = 0.0
    x = spec.view(spec.leaf(dt, False))
    q, s = wk.per_token_quant_fp8(x, pad_to=c["pad_to"], backend="triton")
    qr, sr = wk.per_token_quant_fp8(x, pad_to=c["pad_to"], backend="reference")
    qt, st = per_token_quant_fp8_ref(x.contiguous(), c["pad_to"])  # the spec on a plain layout
    k_pad = -(-x.shape[-1] // c["pad_to"]) * c["pad_to"]
    for name, (qq, ss) in (("triton", (q, s)), ("reference", (qr, sr))):
        assert qq.shape == x.shape[:-1] + (k_pad,) and ss.shape == x.shape[:-1] + (1,), name
        assert qq.dtype == torch.float8_e4m3fn and ss.dtype == torch.float32, name
        assert torch.equal(qq.view(torch.uint8), qt.view(torch.uint8)), f"{name}: FP8 codes differ"
        torch.testing.assert_close(ss, st, rtol=0, atol=0, msg=f"{name}: scales differ")
    if x.numel():  # and the codes represent x: e4m3 keeps 3 mantissa bits
        deq = q[..., : x.shape[-1]].double() * s.double()
        err = (deq - x.double()).abs().max().item()
        assert err <= 2.0 ** -4 * x.double().abs().max().item() * 1.01 + 1e-30


def run_fp8_linear(c):
    if c["bad"]:
        x = torch.randn(3, 16, device=DEVICE)
        w_q, w_s = quantize_weight_fp8(torch.randn(8, 16, device=DEVICE))
        for backend in BACKENDS:
            a = dict(x=x, weight_fp8=w_q, weight_scale=w_s, bias=None, gemm="emulate", act_backend=backend,
                     use_fast_accum=True)
            {
                "w_dtype": lambda: a.update(weight_fp8=w_q.float()),
                "w_1d": lambda: a.update(weight_fp8=w_q[0]),
                "k_mismatch": lambda: a.update(x=x[:, 1:]),
                "scale_shape": lambda: a.update(weight_scale=w_s[1:]),
                "bias_shape": lambda: a.update(bias=torch.zeros(7, device=DEVICE)),
                "bias_list": lambda: a.update(bias=[0.0] * 8), "gemm": lambda: a.update(gemm="cublas"),
                "act_backend": lambda: a.update(act_backend="tensorrt"),
                "x_int": lambda: a.update(x=x.long()),
                "x_list": lambda: a.update(x=x.tolist()),
                "fast_accum": lambda: a.update(use_fast_accum="yes"),
            }[c["bad"]]()
            _expect_error(lambda: wk.fp8_linear(a.pop("x"), a.pop("weight_fp8"), a.pop("weight_scale"),
                                                a.pop("bias"), **a), c["names"], f"{backend}/{c['bad']}")
        return
    from wildactor_kernels.quant import dequantize_fp8

    g, dt = _gen(c), DTYPES[c["dtype"]]
    xs = Spec(c["lead"] + (c["k"],), c["how"], g)
    w_q, w_s = quantize_weight_fp8(torch.randn(c["n"], c["k"], generator=g).to(DEVICE))
    bs = Spec((c["n"],), c["bias_how"], g) if c["bias"] else None
    do = Spec(c["lead"] + (c["n"],), "contig", g).base.to(DEVICE)
    res = {}
    for backend in BACKENDS:
        xl = xs.leaf(dt, c["grad_x"])
        bl = bs.leaf(dt, c["grad_b"]) if bs is not None else None
        y = wk.fp8_linear(xs.view(xl), w_q, w_s, None if bs is None else bs.view(bl), gemm="emulate",
                          act_backend=backend)
        assert y.shape == c["lead"] + (c["n"],) and y.dtype == dt
        leaves = [t for t, ng in ((xl, c["grad_x"]), (bl, c["grad_b"] and bl is not None)) if ng]
        res[backend] = [y] + _grads(y, do, leaves, backend)
    for name, t, r in zip(["y", "dx", "dbias"], res["triton"], res["reference"]):
        # identical FP8 codes on both backends: the same emulated GEMM, so (nearly) the same result
        torch.testing.assert_close(t, r, rtol=1e-3 if dt == torch.float16 else 1e-6, atol=1e-5, msg=name)
    # and the result is x W_deq^T (+ b) up to the activation's FP8 rounding
    x64 = xs.view(xs.base.to(DEVICE))
    y64 = x64.to(dt).double() @ dequantize_fp8(w_q, w_s, torch.float64).t()
    if bs is not None:
        y64 = y64 + bs.view(bs.base.to(DEVICE)).to(dt).double()
    bound = 2.0 ** -4 * (x64.abs() @ dequantize_fp8(w_q, w_s, torch.float64).abs().t()) * 1.05
    bound = bound + (1e-2 * y64.abs() + 1e-2 if dt == torch.float16 else 1e-5)
    assert ((res["reference"][0].double() - y64).abs() <= bound).all(), "fp8_linear: beyond the FP8 rounding"


def _layout_args(c):
    return (c["video"], list(c["refs"]))


def run_TokenLayout(c):  # noqa: N802
    video, refs = _layout_args(c)
    if c["bad"]:
        r0 = refs[0] if refs else ("face", 1, 1)
        v = {"video_float": ((video[0] + 0.5, *video[1:]), refs),
             "video_bool": ((video[0], True, video[2]), refs),
             "video_none": (None, refs), "video_len": (video[:2], refs),
             "video_neg": ((video[0], -1, video[2]), refs),
             "refs_int": (video, 3), "ref_int": (video, [4]), "ref_len": (video, [r0[:2]]),
             "ref_kind": (video, [("hand", 1, 1)]), "ref_h_float": (video, [(r0[0], r0[1] + 0.5, r0[2])]),
             "ref_w_str": (video, [(r0[0], r0[1], "a")]), "ref_zero": (video, [(r0[0], 0, r0[2])]),
             "ref_kind_int": (video, [(1, 1, 1)])}[c["bad"]]
        _expect_error(lambda: wk.TokenLayout(*v), c["names"], c["bad"])
        return
    lay = wk.TokenLayout(video, refs)
    assert lay.video == tuple(video) and lay.refs == tuple(refs)
    assert all(type(s) is int for s in lay.video) and all(type(s) is int for r in lay.refs for s in r[1:])
    t, h, w = video
    assert lay.num_video == t * h * w and lay.num_ref == sum(a * b for _, a, b in refs)
    assert lay.num_tokens == lay.num_video + lay.num_ref
    sl = lay.ref_slices()
    assert [s.stop - s.start for s in sl] == [a * b for _, a, b in refs]
    assert (sl[0].start if sl else lay.num_video) == lay.num_video
    assert wk.TokenLayout(list(video), [list(r) for r in refs]) == lay


def run_irope_positions(c):
    lay = wk.TokenLayout(*_layout_args(c))
    if c["bad"]:
        kw = dict(layout=lay, face_offset=c["face"], body_offset=c["body"], spatial_shift=c["shift"])
        kw.update({"layout_tuple": dict(layout=(lay.video, lay.refs)), "face_float": dict(face_offset=1.5),
                   "body_bool": dict(body_offset=True), "body_str": dict(body_offset="2"),
                   "shift_int": dict(spatial_shift=1)}[c["bad"]])
        _expect_error(lambda: wk.irope_positions(**kw), c["names"], c["bad"])
        return
    pos = wk.irope_positions(lay, face_offset=c["face"], body_offset=c["body"], spatial_shift=c["shift"])
    assert pos.dtype == torch.int64 and pos.shape == (lay.num_tokens, 3)
    assert pos.tolist() == [list(p) for p in _positions(lay, c["face"], c["body"], c["shift"])]


def run_rope_cos_sin(c):
    lay = wk.TokenLayout(*_layout_args(c))
    pos = wk.irope_positions(lay, face_offset=c["face"], body_offset=c["body"], spatial_shift=c["shift"])
    if c["bad"]:
        a = dict(pos=pos, head_dim=c["d"], theta=c["theta"])
        a.update({"theta_zero": dict(theta=0), "theta_neg": dict(theta=-10.0),
                  "theta_nan": dict(theta=float("nan")),
                  "theta_inf": dict(theta=float("inf")), "theta_str": dict(theta="1e4"),
                  "theta_tensor": dict(theta=torch.tensor(1e4)), "d_odd": dict(head_dim=c["d"] + 1),
                  "d_small": dict(head_dim=6), "d_float": dict(head_dim=float(c["d"])),
                  "d_bool": dict(head_dim=True),
                  "pos_float": dict(pos=pos.float()), "pos_shape": dict(pos=pos[:, :2]),
                  "pos_list": dict(pos=pos.tolist()), "pos_1d": dict(pos=pos[:, 0])}[c["bad"]])
        _expect_error(lambda: wk.rope_cos_sin(**a), c["names"], c["bad"])
        return
    # positions as a stride-0 / strided view too: the tables depend on values only
    views = [pos, pos.t().contiguous().t(), pos[:1].expand(pos.shape[0], 3) if pos.shape[0] else pos]
    for p in views:
        cos, sin = wk.rope_cos_sin(p, c["d"], theta=c["theta"])
        c64, s64 = _tables64(p, c["d"], c["theta"])
        assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (p.shape[0], c["d"] // 2)
        torch.testing.assert_close(cos.double(), c64, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin.double(), s64, rtol=0, atol=1e-6)


RUN = {"asym_attention": run_asym_attention, "cached_asym_attention": run_cached_asym_attention,
       "apply_rope": run_apply_rope, "qk_norm_rope": run_qk_norm_rope, "ref_lora_linear": run_ref_lora_linear,
       "RefLoRALinear": run_RefLoRALinear, "per_token_quant_fp8": run_per_token_quant_fp8,
       "fp8_linear": run_fp8_linear, "TokenLayout": run_TokenLayout, "irope_positions": run_irope_positions,
       "rope_cos_sin": run_rope_cos_sin}


@pytest.mark.parametrize("case", _params())
def test_fuzz(case):
    RUN[case["op"]](case)


def test_fuzz_covers_every_public_op():
    """The fuzz names every public op of the package (a new op must join it). Not ops: the
    head-dim split helper and the report of what backend="auto" picks."""
    public = {n for n in wk.__all__ if callable(getattr(wk, n))} - {"axis_dims", "attention_backends"}
    assert public <= set(RUN), f"not fuzzed: {sorted(public - set(RUN))}"
