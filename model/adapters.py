"""Names of the reference-only adapter parameters (PEFT keys: ``...lora_A.weight``, ``...lora_B.weight``).

Shared by the model (freezing the backbone, counting parameters) and the weight loaders, which
import nothing else from each other.
"""

from __future__ import annotations

__all__ = ["is_adapter"]


def is_adapter(name: str) -> bool:
    """Whether a parameter / state-dict key belongs to a reference-only adapter (``lora_A``/``lora_B``)."""
    return ".lora_A." in name or ".lora_B." in name
