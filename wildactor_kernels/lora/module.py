"""``RefLoRALinear``: an ``nn.Linear`` drop-in whose LoRA adapter acts on reference rows only.

State-dict keys: ``weight``/``bias`` exactly as the base ``nn.Linear`` (so a diffusers Wan
checkpoint loads unchanged) plus PEFT-named adapters ``lora_A.weight [r, Din]`` and
``lora_B.weight [Dout, r]``. ``lora_B`` starts at zero: an untrained adapter is a no-op.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .op import ref_lora_linear


class RefLoRALinear(nn.Module):
    """Linear layer ``y = x W^T + b`` plus ``s (x_r A^T) B^T`` on rows ``n >= num_video``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        rank: adapter rank ``r`` (0 disables the adapter).
        alpha: LoRA alpha; the scale is ``alpha / r`` (default ``alpha = r``: scale 1).
        backend: default backend of the op (``"auto" | "triton" | "reference"``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = 0,
                 alpha: float | None = None, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **fk))
        self.bias = nn.Parameter(torch.empty(out_features, **fk)) if bias else None
        self.rank = int(rank)
        self.alpha = float(alpha if alpha is not None else max(rank, 1))
        self.backend = backend
        if self.rank > 0:
            self.lora_A = nn.Linear(in_features, self.rank, bias=False, **fk)
            self.lora_B = nn.Linear(self.rank, out_features, bias=False, **fk)
        else:
            self.lora_A = self.lora_B = None
        self.reset_parameters()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank > 0 else 0.0

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A Kaiming-uniform, B zero."""
        if self.rank > 0 and not self.lora_A.weight.is_meta:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor, num_video: int | None = None) -> torch.Tensor:
        """``x [B, N, Din]``; ``num_video=None`` (or N) means no reference rows: a plain linear."""
        if self.rank == 0 or num_video is None or num_video >= x.shape[-2] or x.ndim != 3:
            return F.linear(x, self.weight, self.bias)
        return ref_lora_linear(x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight,
                               self.scale, num_video, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank={self.rank}, alpha={self.alpha}")
