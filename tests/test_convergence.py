"""Liger-style convergence check: a tiny WildActor whose reference-only LoRA layers run the Triton
kernels trains like the same model on the reference backend.

Both runs are fp32 with identical initial weights and data; only the adapters train (AdamW,
20 steps, MSE to a fixed target). The kernels accumulate in a different order than cuBLAS/ATen,
so the curves differ by float rounding only: measured max relative gap 2.6e-7 (CPU interpreter).
The tolerance, 1e-4 relative, is ~400x that rounding drift yet ~200x smaller than the loss change
of a single step (~2 %), so a wrong gradient term (dx, dA or dB) shows up as a diverging curve.
Model and data live on ``helpers.DEVICE`` (CUDA when present).
"""

import copy

import torch
from helpers import DEVICE
from wildactor_kernels.model import Reference, WildActor, WildActorConfig

from wildactor_kernels import RefLoRALinear


def _losses(m: WildActor, backend: str, data, steps: int = 20) -> torch.Tensor:
    m = copy.deepcopy(m)
    for mod in m.modules():
        if isinstance(mod, RefLoRALinear):
            mod.backend = backend
    lat, t, ctx, refs, target = data
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m(lat, t, ctx, refs=refs), target)
        loss.backward()
        opt.step()
        out.append(loss.item())
    return torch.tensor(out, dtype=torch.float64)


def test_lora_kernels_train_like_reference():
    torch.manual_seed(0)
    cfg = WildActorConfig.preset("tiny")
    m = WildActor(cfg).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    c = cfg.in_channels

    def randn(*shape):  # drawn on the CPU (same data on every device), then moved
        return torch.randn(*shape, generator=g).to(DEVICE)

    data = (randn(1, c, 2, 4, 6), torch.tensor([300.0], device=DEVICE), randn(1, 5, cfg.text_dim),
            [Reference("face", randn(1, c, 1, 4, 4)), Reference("body", randn(1, c, 1, 6, 4))],
            randn(1, c, 2, 4, 6))
    ref = _losses(m, "reference", data)
    tri = _losses(m, "triton", data)
    assert ref[-1] < 0.8 * ref[0], f"the reference run did not learn: {ref[0]:.4f} -> {ref[-1]:.4f}"
    rel = ((tri - ref).abs() / ref.abs()).max().item()
    assert rel <= 1e-4, f"loss curves diverge: max relative gap {rel:.2e}\nref {ref}\ntriton {tri}"
