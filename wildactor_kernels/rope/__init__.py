"""I-RoPE: reference (``reference.py``), Triton kernels (``kernels.py``), public ops (``op.py``)."""

from .op import apply_rope, qk_norm_rope
from .reference import apply_rope_ref, qk_norm_rope_ref, rmsnorm_across_heads_ref

__all__ = ["apply_rope", "qk_norm_rope", "apply_rope_ref", "qk_norm_rope_ref", "rmsnorm_across_heads_ref"]
