"""8-bit asymmetric attention (SageAttention's scheme, docs/design.md §9): the spec in plain PyTorch.

This file is the maths of ``precision="fp8"`` and the CPU path. It reproduces, tile by tile and in
the same order of fp32 operations, what the Triton kernel (``fp8_kernels.py``) computes, so the
two agree to rounding of the exp2/sum implementations; only the tile sizes must be given alike.

Scheme, for one (batch, head):

1. **K smoothing.** ``k <- k - mean_n(k)``: one fp32 vector per (batch, head), the mean over the
   keys. Every query row sees the same shift, so ``q.(k - m) = q.k - q.m`` changes each score row
   by a constant and the softmax not at all; it removes the per-channel offsets of K that
   otherwise dominate an 8-bit range. In asymmetric attention one vector serves both segments
   (the reference keys are a subset of the video rows' keys, the shift stays a row constant).
2. **Q and K in int8, per tile and head**: ``scale = max(amax(|tile|), AMAX_EPS) / 127``,
   ``x_i8 = round_half_away(x * (127 / amax))``. Q tiles are the kernel's query blocks
   (``block_m`` rows from the start of their segment, as ``kernels._query_segment`` lays them
   out); K tiles are ``block_n`` keys from the start of their key set. ``q_i8 . k_i8`` is exact
   in int32 (``|sum| <= 127^2 * D < 2^24``, so fp32 and fp64 hold it exactly too).
3. **Online softmax in fp32, base 2**: ``s = qk_i32 * ((q_scale * sm_scale * log2 e) * k_scale)``,
   running max ``m``. The P scale 448 is folded into the exponent:
   ``p = exp2(s - (m - log2 448)) = 448 * exp2(s - m)`` in ``[0, 448]``, one FMA and one exp2 per
   score; the row sum ``l`` adds the unquantized fp32 ``p`` (so it carries the factor 448 too).
4. **P in e4m3 after the max subtraction**: ``e4m3(p)`` uses the whole e4m3 range; **V in e4m3
   per channel** over the tokens of its key set, ``v_scale[d] = max(amax_n |v[:, d]|, AMAX_EPS) /
   448``. ``acc += e4m3(P) @ e4m3(V)`` in fp32; the output is ``acc * v_scale / l`` (the two
   factors 448 cancel).

Key sets. A query block walks one or two *key sets*, each quantized on its own (its own K tiles
and V channel scales, one shared smoothing vector): in joint mode the video keys ``[0, Nv)``
and the reference keys ``[Nv, N)``; video rows walk both, reference rows the second only. In
cached mode the video keys and the reference cache. When a row moves from set 1 to set 2 its
accumulator is rescaled once per channel by ``v_scale_1 / v_scale_2``.

A quantized set is a :class:`QuantizedKV`; :func:`quantize_ref_kv` turns a reference K/V cache
into one, once, so that cached steps only quantize the video keys and values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._utils import LOG2E
from ..quant.reference import AMAX_EPS, FP8_DTYPE, FP8_MAX
from ..rope.reference import apply_rope_ref

__all__ = [
    "QuantizedKV",
    "quantize_kv",
    "quantize_ref_kv",
    "key_mean",
    "quantize_q_int8",
    "fp8_attention_core",
    "asym_attention_fp8_ref",
    "cached_asym_attention_fp8_ref",
    "INT8_MAX",
    "P_SCALE",
    "LOG2_P_SCALE",
    "TOKEN_PAD",
    "DEFAULT_BLOCK_M",
    "DEFAULT_BLOCK_N",
]

# e4m3 (``FP8_DTYPE``), its maximum ``FP8_MAX`` = 448 and ``AMAX_EPS`` (keeps an all-zero tile
# finite: its codes are zero) are those of the FP8 linears (``quant/reference.py``).
INT8_MAX = 127.0
#: P (in [0, 1] after the max subtraction) is stored as e4m3(P * P_SCALE), the factor folded
#: into the exponent as ``LOG2_P_SCALE``: the whole e4m3 range.
P_SCALE = FP8_MAX
LOG2_P_SCALE = math.log2(P_SCALE)
#: quantized sets pad their token count to a multiple of this (16-byte aligned rows of V^T).
TOKEN_PAD = 16
#: default tiles: query rows per int8 Q scale and keys per int8 K scale (the kernel's blocks).
DEFAULT_BLOCK_M = 128
DEFAULT_BLOCK_N = 64


def _round_half_away(t: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties away from zero (what the kernel computes with floor)."""
    return torch.where(t >= 0, torch.floor(t + 0.5), -torch.floor(-t + 0.5))


@dataclass(frozen=True)
class QuantizedKV:
    """One key set in the 8-bit attention format (what the kernel reads).

    Attributes:
        k: int8 ``[B, H, Np, D]``: smoothed keys, ``round((k - k_mean) / k_scale)`` per tile.
        k_scale: float32 ``[B, H, cdiv(N, block_n)]``: one scale per tile of ``block_n`` keys.
        k_mean: float32 ``[B, H, D]``: the smoothing vector subtracted before quantizing. Every
            set that one query row reads must share it (the softmax is then unchanged).
        v: float8_e4m3fn ``[B, H, D, Np]``: values transposed, tokens contiguous, so the PV
            product's B operand is K-major as fp8 wgmma requires.
        v_scale: float32 ``[B, H, D]``: per-channel scales of the values.
        num_tokens: ``N``, the number of real tokens (``Np`` pads it to a multiple of 16 with zeros).
        block_n: keys per K scale; the kernel's key block when it reads this set.
    """

    k: torch.Tensor
    k_scale: torch.Tensor
    k_mean: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor
    num_tokens: int
    block_n: int

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def heads(self) -> int:
        return self.k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def device(self) -> torch.device:
        return self.k.device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.k, self.k_scale, self.k_mean, self.v, self.v_scale))


def key_mean(*keys: torch.Tensor) -> torch.Tensor:
    """fp32 mean over the tokens of one or more ``[B, N_i, H, D]`` key tensors -> ``[B, H, D]``."""
    total = sum(k.shape[1] for k in keys)
    b, _, h, d = keys[0].shape
    if total == 0:
        return torch.zeros((b, h, d), dtype=torch.float32, device=keys[0].device)
    acc = sum(k.sum(dim=1, dtype=torch.float32) for k in keys)
    return acc / total


def quantize_kv(k: torch.Tensor, v: torch.Tensor, k_mean: torch.Tensor,
                block_n: int = DEFAULT_BLOCK_N) -> QuantizedKV:
    """Quantize one key set: ``k, v [B, N, H, D]`` (k already rotated), ``k_mean [B, H, D]``.

    K: smoothed by ``k_mean`` then int8 per tile of ``block_n`` keys and head. V: e4m3 per channel,
    stored transposed. Both are zero-padded to ``Np = roundup(N, 16)`` tokens.
    """
    b, n, h, d = k.shape
    if n == 0:  # an empty set: never read, kept so that every mode has two sets
        z = torch.zeros((b, h, d), dtype=torch.float32, device=k.device)
        return QuantizedKV(torch.zeros((b, h, 0, d), dtype=torch.int8, device=k.device),
                           z[..., :0], k_mean.float().contiguous(),
                           torch.zeros((b, h, d, 0), dtype=FP8_DTYPE, device=k.device),
                           z + AMAX_EPS / FP8_MAX, 0, block_n)
    npad = -(-n // TOKEN_PAD) * TOKEN_PAD
    nt = -(-n // block_n)
    kf = k.float().permute(0, 2, 1, 3) - k_mean.float()[:, :, None, :]  # [B, H, N, D]
    kf = torch.nn.functional.pad(kf, (0, 0, 0, nt * block_n - n))
    tiles = kf.reshape(b, h, nt, block_n, d)
    amax = tiles.abs().amax(dim=(3, 4)).clamp(min=AMAX_EPS)  # [B, H, nt]
    inv = INT8_MAX / amax
    kq = _round_half_away(tiles * inv[..., None, None]).clamp(-INT8_MAX, INT8_MAX)
    kq = kq.reshape(b, h, nt * block_n, d)[:, :, :n]
    kq = torch.nn.functional.pad(kq, (0, 0, 0, npad - n)).to(torch.int8).contiguous()
    k_scale = (amax / INT8_MAX).contiguous()

    vf = v.float().permute(0, 2, 3, 1)  # [B, H, D, N]
    vmax = vf.abs().amax(dim=3).clamp(min=AMAX_EPS)
    vq = (vf * (FP8_MAX / vmax)[..., None]).clamp(-FP8_MAX, FP8_MAX)
    vq = torch.nn.functional.pad(vq, (0, npad - n)).to(FP8_DTYPE).contiguous()
    return QuantizedKV(kq, k_scale, k_mean.float().contiguous(), vq, (vmax / FP8_MAX).contiguous(),
                       n, block_n)


def quantize_ref_kv(ref_k: torch.Tensor, ref_v: torch.Tensor,
                    block_n: int = DEFAULT_BLOCK_N) -> QuantizedKV:
    """Quantize a reference K/V cache once (``ref_k`` already rotated, ``[B, Nr, H, D]``).

    The cache's own key mean becomes the smoothing vector of every cached step (the video keys
    are smoothed by it too), so a step quantizes only the video keys and values: 1 byte per
    element cached instead of 2, and the reference half of the quantization work done once.
    """
    return quantize_kv(ref_k, ref_v, key_mean(ref_k), block_n)


def quantize_q_int8(q: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 Q per tile of ``block_m`` rows (from the first row of ``q``) and head.

    ``q [B, M, H, D]`` -> (integer codes as float32 ``[B, M, H, D]``, scale per row float32
    ``[B, M, H]``, constant over each tile).
    """
    b, m, h, d = q.shape
    nt = -(-m // block_m)
    qf = torch.nn.functional.pad(q.float(), (0, 0, 0, 0, 0, nt * block_m - m))
    tiles = qf.reshape(b, nt, block_m, h, d)
    amax = tiles.abs().amax(dim=(2, 4)).clamp(min=AMAX_EPS)  # [B, nt, H]
    inv = INT8_MAX / amax
    codes = _round_half_away(tiles * inv[:, :, None, :, None]).clamp(-INT8_MAX, INT8_MAX)
    scale = (amax / INT8_MAX)[:, :, None, :].expand(b, nt, block_m, h)
    return codes.reshape(b, nt * block_m, h, d)[:, :m], scale.reshape(b, nt * block_m, h)[:, :m]


def fp8_attention_core(q: torch.Tensor, sets: list[QuantizedKV], scale: float,
                       block_m: int) -> torch.Tensor:
    """Rows of ``q [B, M, H, D]`` (one query segment, rotated) over the key sets in order.

    Returns float32 ``[B, M, H, D]``. Tiles, scales and the order of fp32 operations are the
    kernel's.
    """
    b, m, h, d = q.shape
    dev = q.device
    if m == 0:
        return torch.empty((b, 0, h, d), dtype=torch.float32, device=dev)
    codes, qsc = quantize_q_int8(q, block_m)
    qk_scale = torch.tensor(scale * LOG2E, dtype=torch.float32, device=dev)
    qk_c = (qsc * qk_scale).permute(0, 2, 1)  # [B, H, M]: q_scale * sm_scale * log2 e
    qi = codes.permute(0, 2, 1, 3).double()  # [B, H, M, D]
    m_i = torch.full((b, h, m), float("-inf"), dtype=torch.float32, device=dev)
    l_i = torch.zeros((b, h, m), dtype=torch.float32, device=dev)
    acc = torch.zeros((b, h, m, d), dtype=torch.float32, device=dev)
    log2_p = torch.tensor(LOG2_P_SCALE, dtype=torch.float32, device=dev)
    prev = None
    for s in sets:
        if s.num_tokens == 0:
            continue
        if prev is not None:  # one per-channel rescale when the row moves to the next key set
            acc = acc * (prev.v_scale / s.v_scale)[:, :, None, :]
        bn = s.block_n
        for t in range(-(-s.num_tokens // bn)):
            lo, hi = t * bn, min((t + 1) * bn, s.num_tokens)
            qk = (qi @ s.k[:, :, lo:hi].double().transpose(-1, -2)).float()  # exact int32 values
            sc = qk * (qk_c[..., None] * s.k_scale[:, :, t, None, None])
            m_new = torch.maximum(m_i, sc.amax(-1))
            p = torch.exp2(sc - (m_new - log2_p)[..., None])  # P * 448, in [0, 448]
            alpha = torch.exp2(m_i - m_new)
            l_i = l_i * alpha + p.sum(-1)
            p8 = p.clamp(max=FP8_MAX).to(FP8_DTYPE).float()  # saturating, as cvt.rn.satfinite
            v8 = s.v[:, :, :, lo:hi].float()  # [B, H, D, n]
            acc = acc * alpha[..., None] + p8 @ v8.transpose(-1, -2)
            m_i = m_new
        prev = s
    o = acc * prev.v_scale[:, :, None, :] / l_i[..., None]
    return o.permute(0, 2, 1, 3)


def _scale(scale: float | None, d: int) -> float:
    return 1.0 / math.sqrt(d) if scale is None else float(scale)


def asym_attention_fp8_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_video: int,
                           cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                           scale: float | None = None, *, block_m: int = DEFAULT_BLOCK_M,
                           block_n: int = DEFAULT_BLOCK_N) -> torch.Tensor:
    """8-bit asymmetric attention: ``q, k, v [B, N, H, D]`` -> ``[B, N, H, D]`` (dtype of q).

    cos/sin ``[N, D//2]`` rotate q and k first (rounded to their dtype, as the kernels' rotation
    pass stores them). Video rows ``[0, Nv)`` read the video then the reference key set,
    reference rows the reference set; both sets are smoothed by the mean of all N keys.
    """
    if cos is not None:
        q, k = apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)
    sc = _scale(scale, q.shape[-1])
    nv = num_video
    mean = key_mean(k)
    vid = quantize_kv(k[:, :nv], v[:, :nv], mean, block_n)
    ref = quantize_kv(k[:, nv:], v[:, nv:], mean, block_n)
    o_v = fp8_attention_core(q[:, :nv], [vid, ref], sc, block_m)
    o_r = fp8_attention_core(q[:, nv:], [ref], sc, block_m)
    return torch.cat([o_v, o_r], dim=1).to(q.dtype)


def cached_asym_attention_fp8_ref(q_v: torch.Tensor, k_v: torch.Tensor, v_v: torch.Tensor,
                                  ref_k: torch.Tensor | QuantizedKV, ref_v: torch.Tensor | None,
                                  cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                                  scale: float | None = None, *, block_m: int = DEFAULT_BLOCK_M,
                                  block_n: int = DEFAULT_BLOCK_N) -> torch.Tensor:
    """Video queries over ``[k_v; ref]`` in 8 bits -> ``[B, Nv, H, D]`` (dtype of q_v).

    ``ref_k, ref_v [B, Nr, H, D]`` (rotated) are quantized here with the smoothing vector of all
    ``Nv + Nr`` keys; or ``ref_k`` is a :class:`QuantizedKV` cache (``ref_v`` None): then its
    mean smooths the video keys too and its ``block_n`` is used.
    """
    if cos is not None:
        q_v, k_v = apply_rope_ref(q_v, cos, sin), apply_rope_ref(k_v, cos, sin)
    sc = _scale(scale, q_v.shape[-1])
    vid, ref = prepare_cached_sets(k_v, v_v, ref_k, ref_v, block_n)
    return fp8_attention_core(q_v, [vid, ref], sc, block_m).to(q_v.dtype)


def prepare_cached_sets(k_v: torch.Tensor, v_v: torch.Tensor, ref_k: torch.Tensor | QuantizedKV,
                        ref_v: torch.Tensor | None, block_n: int,
                        quantize=None) -> tuple[QuantizedKV, QuantizedKV]:
    """The two key sets of cached mode (video, reference), sharing one smoothing vector.
    ``quantize``: the quantizer (default :func:`quantize_kv`; the Triton path passes its own)."""
    quantize = quantize or quantize_kv
    if isinstance(ref_k, QuantizedKV):
        return quantize(k_v, v_v, ref_k.k_mean, ref_k.block_n), ref_k
    mean = key_mean(k_v, ref_k)
    return quantize(k_v, v_v, mean, block_n), quantize(ref_k, ref_v, mean, block_n)
