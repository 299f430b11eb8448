"""Plain-PyTorch reference-only LoRA linear (docs/design.md §5).

``y = x W^T + b``;  ``y[:, Nv:] += s * (x[:, Nv:] A^T) B^T`` with PEFT shapes ``A [r, Din]``,
``B [Dout, r]`` and ``s = alpha / r``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ref_lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                        num_video: int) -> torch.Tensor:
    """``x [B, N, Din]`` -> ``[B, N, Dout]``; the adapter acts on rows ``n >= num_video`` only."""
    y = F.linear(x, weight, bias)
    if num_video >= x.shape[1] and not (torch.is_grad_enabled()
                                        and (lora_a.requires_grad or lora_b.requires_grad)):
        return y
    # with no reference rows and adapters that need grad, the empty adapter branch below keeps
    # them in the graph: backward() then gives zero-filled grads, as the Triton op does
    delta = F.linear(F.linear(x[:, num_video:], lora_a), lora_b) * scale
    return torch.cat([y[:, :num_video], y[:, num_video:] + delta], dim=1)
