"""Viewpoint-adaptive Monte Carlo reference sampling (WildActor's training-time view selection).

Reference pools are frontal-biased: most photos of a person face the camera. Picking references
uniformly at random therefore mostly yields near-duplicate frontal views. The adaptive sampler
picks one view at a time; after each pick it down-weights the angular neighbourhood of that
view with a Gaussian kernel on the circular yaw distance, so later picks favour angles not yet
covered:

    w_j <- w_j * (1 - (1 - floor) * exp(-d(j, i)^2 / (2 * bandwidth^2)))

where ``d`` is the circular distance in degrees and ``floor`` keeps every weight positive (a pool
of identical angles can still fill ``k`` picks).
"""

from __future__ import annotations

from typing import Sequence

import torch


def circular_distance_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Smallest absolute difference between yaw angles in degrees, in ``[0, 180]``."""
    d = torch.remainder(a - b, 360.0)
    return torch.minimum(d, 360.0 - d)


def sample_views(
    yaws_deg: Sequence[float] | torch.Tensor,
    k: int,
    *,
    bandwidth_deg: float = 30.0,
    floor: float = 1e-3,
    base_weights: Sequence[float] | torch.Tensor | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Pick ``k`` distinct reference indices, favouring angular diversity.

    Args:
        yaws_deg: yaw angle of every candidate image, in degrees (any range; taken mod 360).
        k: number of references to pick (``0 <= k <= len(yaws_deg)``).
        bandwidth_deg: std of the Gaussian neighbourhood suppressed around each pick.
        floor: the smallest factor a weight is multiplied by (keeps sampling well defined).
        base_weights: optional prior weight of each candidate (default uniform).
        seed / generator: the random source (seeded: the same seed gives the same picks).
    Returns:
        The picked indices, in pick order.
    """
    yaws = torch.as_tensor(yaws_deg, dtype=torch.float64).flatten()
    n = yaws.numel()
    if not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, {n}] (the number of candidate views), got {k!r}")
    if bandwidth_deg <= 0:
        raise ValueError(f"bandwidth_deg must be > 0, got {bandwidth_deg}")
    if not 0 < floor <= 1:
        raise ValueError(f"floor must lie in (0, 1], got {floor}")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    w = (torch.ones(n, dtype=torch.float64) if base_weights is None
         else torch.as_tensor(base_weights, dtype=torch.float64).flatten().clone())
    if w.numel() != n or (w < 0).any() or not torch.isfinite(w).all():
        raise ValueError("base_weights must be finite, non-negative, one per candidate view")
    picked: list[int] = []
    available = torch.ones(n, dtype=torch.bool)
    for _ in range(k):
        p = torch.where(available, w, torch.zeros_like(w))
        if p.sum() <= 0:  # all remaining weights zero (zero priors): fall back to uniform
            p = available.double()
        i = int(torch.multinomial(p / p.sum(), 1, generator=generator))
        picked.append(i)
        available[i] = False
        d = circular_distance_deg(yaws, yaws[i])
        w = w * (1.0 - (1.0 - floor) * torch.exp(-(d**2) / (2.0 * bandwidth_deg**2)))
    return picked


def angular_spread(yaws_deg: Sequence[float] | torch.Tensor, picks: Sequence[int]) -> float:
    """Mean pairwise circular distance (degrees) of the picked views: the diversity statistic."""
    yaws = torch.as_tensor(yaws_deg, dtype=torch.float64).flatten()[list(picks)]
    if yaws.numel() < 2:
        return 0.0
    d = circular_distance_deg(yaws[:, None], yaws[None, :])
    m = yaws.numel()
    return float(d.sum() / (m * (m - 1)))
