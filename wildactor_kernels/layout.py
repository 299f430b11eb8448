"""Token layout and I-RoPE positions (docs/design.md §3).

Tokens are video-first: ``Nv = T*Hg*Wg`` video tokens in ``Conv3d(...).flatten(2)`` order, then
each reference in list order, row-major inside a reference. A reference of kind ``"face"`` or
``"body"`` sits at temporal position ``T + Δkind`` and, with ``spatial_shift=True``, in a spatial
region of its own: ``(Hg + Y_r + y, Wg + X_r + x)`` where ``Y_r``/``X_r`` sum the heights/widths
of the earlier references of the same kind (diagonal blocks that share no row or column).

Head dimension ``D`` splits per axis exactly as Wan: ``d_h = d_w = 2*(D//6)``, ``d_t = D - d_h - d_w``;
channel order ``[t | h | w]``; pairs are interleaved (channels ``2p, 2p+1``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ._validate import check_bool, check_int, check_theta

REF_KINDS = ("face", "body")


@dataclass(frozen=True)
class TokenLayout:
    """Where every token of one sample sits.

    Args:
        video: the latent grid after patchify, ``(T, Hg, Wg)``.
        refs: ordered references, each ``(kind, h, w)`` with kind ``"face"`` or ``"body"``
            (one latent frame of ``h x w`` tokens).
    """

    video: tuple[int, int, int]
    refs: tuple[tuple[str, int, int], ...] = field(default_factory=tuple)

    def __init__(self, video: Sequence[int], refs: Iterable[Sequence] = ()):
        # Sizes are checked, never truncated: 2.7 or True is not a token count.
        if isinstance(video, (str, bytes, torch.Tensor)) or not isinstance(video, Iterable):
            raise TypeError(f"video must be a sequence (T, Hg, Wg) of 3 ints, got {type(video).__name__}")
        video = tuple(video)
        if len(video) != 3:
            raise ValueError(f"video must be (T, Hg, Wg) with non-negative sizes, got {tuple(video)!r}")
        video = tuple(check_int(f"video[{i}]", v) for i, v in enumerate(video))
        if any(v < 0 for v in video):
            raise ValueError(f"video must be (T, Hg, Wg) with non-negative sizes, got {video}")
        if isinstance(refs, (str, bytes, torch.Tensor)) or not isinstance(refs, Iterable):
            raise TypeError(f"refs must be an iterable of (kind, h, w) tuples, got {type(refs).__name__}")
        parsed = []
        for i, r in enumerate(refs):
            if isinstance(r, (str, bytes, torch.Tensor)) or not isinstance(r, Iterable):
                raise TypeError(f"refs[{i}] must be a (kind, h, w) tuple, got {type(r).__name__}")
            r = tuple(r)
            if len(r) != 3:
                raise ValueError(f"refs[{i}] must be (kind, h, w), got {r!r}")
            kind, h, w = r
            if not isinstance(kind, str):
                raise TypeError(f"refs[{i}] kind must be a str in {REF_KINDS}, got {type(kind).__name__}")
            if kind not in REF_KINDS:
                raise ValueError(f"refs[{i}] kind must be one of {REF_KINDS}, got {kind!r}")
            h, w = check_int(f"refs[{i}] height", h), check_int(f"refs[{i}] width", w)
            if h <= 0 or w <= 0:
                raise ValueError(f"refs[{i}] grid must be positive, got ({h}, {w})")
            parsed.append((kind, h, w))
        object.__setattr__(self, "video", video)
        object.__setattr__(self, "refs", tuple(parsed))

    @property
    def num_video(self) -> int:
        t, h, w = self.video
        return t * h * w

    @property
    def num_ref(self) -> int:
        return sum(h * w for _, h, w in self.refs)

    @property
    def num_tokens(self) -> int:
        return self.num_video + self.num_ref

    def ref_slices(self) -> list[slice]:
        """Token slice of each reference inside the full sequence."""
        out, start = [], self.num_video
        for _, h, w in self.refs:
            out.append(slice(start, start + h * w))
            start += h * w
        return out


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys = torch.arange(h, dtype=torch.int64).repeat_interleave(w)
    xs = torch.arange(w, dtype=torch.int64).repeat(h)
    return ys, xs


def irope_positions(
    layout: TokenLayout,
    face_offset: int = 1,
    body_offset: int = 2,
    spatial_shift: bool = True,
) -> torch.Tensor:
    """Integer 3D positions ``(t, y, x)`` of every token. Returns int64 ``[N, 3]``.

    ``face_offset``/``body_offset`` are ints (``Δface``, ``Δbody``); ``spatial_shift`` a bool.
    """
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    face_offset = check_int("face_offset", face_offset)
    body_offset = check_int("body_offset", body_offset)
    spatial_shift = check_bool("spatial_shift", spatial_shift)
    T, Hg, Wg = layout.video
    ts = torch.arange(T, dtype=torch.int64).repeat_interleave(Hg * Wg)
    ys, xs = _grid(Hg, Wg)
    parts = [torch.stack([ts, ys.repeat(T), xs.repeat(T)], dim=1)]
    offset = {"face": face_offset, "body": body_offset}
    used_h = {"face": 0, "body": 0}
    used_w = {"face": 0, "body": 0}
    for kind, h, w in layout.refs:
        ry, rx = _grid(h, w)
        if spatial_shift:
            ry = ry + Hg + used_h[kind]
            rx = rx + Wg + used_w[kind]
        rt = torch.full((h * w,), T + offset[kind], dtype=torch.int64)
        parts.append(torch.stack([rt, ry, rx], dim=1))
        used_h[kind] += h
        used_w[kind] += w
    return torch.cat(parts, dim=0)


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Per-axis rotary widths ``(d_t, d_h, d_w)`` of a head, as Wan splits them."""
    head_dim = check_int("head_dim", head_dim)
    if head_dim < 8 or head_dim % 2:
        raise ValueError(f"head_dim must be even and >= 8, got {head_dim}")
    d_h = d_w = 2 * (head_dim // 6)
    return head_dim - d_h - d_w, d_h, d_w


def rope_cos_sin(
    pos: torch.Tensor, head_dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for integer positions.

    Args:
        pos: int ``[N, 3]`` positions ``(t, y, x)`` (from :func:`irope_positions`).
        head_dim: ``D``, even and >= 8.
        theta: RoPE base, a finite float > 0.
    Returns:
        ``cos, sin``: float32 ``[N, D//2]`` on ``pos.device``; pair ``p`` of axis ``a`` with local
        index ``i`` has angle ``pos_a * theta**(-2i/d_a)``, computed in float64 then cast.
    """
    if not isinstance(pos, torch.Tensor) or pos.ndim != 2 or pos.shape[1] != 3:
        got = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
        raise ValueError(f"pos must be an integer tensor of shape [N, 3], got {got}")
    if pos.is_floating_point() or pos.is_complex() or pos.dtype == torch.bool:
        raise TypeError(f"pos must be an integer tensor, got dtype {pos.dtype}")
    dims = axis_dims(head_dim)
    theta = check_theta(theta)
    # MPS has no float64; compute on the CPU there and move the result back.
    work_dev = pos.device if pos.device.type != "mps" else torch.device("cpu")
    p64 = pos.to(work_dev, torch.float64)
    angles = []
    for a, d_a in enumerate(dims):
        inv = theta ** (-torch.arange(0, d_a, 2, dtype=torch.float64, device=work_dev) / d_a)
        angles.append(p64[:, a : a + 1] * inv[None, :])
    ang = torch.cat(angles, dim=1)
    return ang.cos().float().to(pos.device), ang.sin().float().to(pos.device)
