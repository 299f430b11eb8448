"""WildActor without references and with untrained adapters reproduces diffusers Wan (docs/design.md §6).

Every diffusers parameter is perturbed with noise first, so no weight is at its init value
(norm weights at one, biases at zero) and every parameter matters.
"""

from __future__ import annotations

import pytest
import torch
from wildactor_kernels.model import WildActor, WildActorConfig
from wildactor_kernels.model.adapters import is_adapter

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402
from helpers import assert_within_baseline, max_err  # noqa: E402

CASES = [
    pytest.param(WildActorConfig.preset("tiny"), (1, 3, 4, 6), 7, id="tiny-B1-T3-4x6"),
    pytest.param(WildActorConfig(dim=96, num_layers=2, num_heads=2, ffn_dim=160, in_channels=3,
                                 out_channels=5, text_dim=24, lora_rank=4),
                 (2, 5, 8, 4), 5, id="D48-H2-inout3-5-B2-T5-8x4"),
    pytest.param(WildActorConfig(dim=24, num_layers=3, num_heads=3, ffn_dim=40, in_channels=4,
                                 out_channels=4, text_dim=16, lora_rank=2, cross_attn_norm=False),
                 (2, 1, 6, 2), 3, id="D8-H3-nocrossnorm-B2-T1-6x2"),
    pytest.param(WildActorConfig(dim=64, num_layers=1, num_heads=4, ffn_dim=96, in_channels=4,
                                 out_channels=4, text_dim=32, patch_size=(2, 2, 2), lora_rank=4),
                 (2, 4, 6, 10), 4, id="patch222-B2-T4-6x10"),
]


def _wan_and_ours(cfg: WildActorConfig):
    wan = WanTransformer3DModel(**cfg.to_diffusers_config()).eval()
    with torch.no_grad():
        for p in wan.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = WildActor.from_diffusers(wan, backend="reference", lora_rank=cfg.lora_rank).eval()
    return wan, ours


@pytest.mark.parametrize("cfg, shape, text_len", CASES)
def test_matches_diffusers_wan(cfg, shape, text_len):
    wan, ours = _wan_and_ours(cfg)
    b, t, h, w = shape
    x = torch.randn(b, cfg.in_channels, t, h, w)
    ts = torch.rand(b) * 1000
    ctx = torch.randn(b, text_len, cfg.text_dim)
    with torch.no_grad():
        want = wan(x, ts, ctx, return_dict=False)[0]
        got = ours(x, ts, ctx)
        got_empty_refs = ours(x, ts, ctx, refs=[])
    assert got.shape == want.shape == (b, cfg.out_channels, t, h, w)
    assert want.abs().max() > 0.1  # a meaningful output, not a vanishing one
    assert max_err(got, want) <= 1e-4, f"max abs err {max_err(got, want):.3e}"
    assert max_err(got_empty_refs, want) <= 1e-4


def test_matches_diffusers_per_token_timestep():
    """Wan2.2 TI2V passes one timestep per video token ``[B, Nv]``; the modulation follows."""
    cfg = WildActorConfig.preset("tiny")
    wan, ours = _wan_and_ours(cfg)
    x = torch.randn(2, 4, 3, 4, 6)
    nv = 3 * 2 * 3
    ts = torch.rand(2, nv) * 1000
    ctx = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = wan(x, ts, ctx, return_dict=False)[0]
        got = ours(x, ts, ctx)
    assert max_err(got, want) <= 1e-4


def test_key_sets_match_exactly():
    cfg = WildActorConfig.preset("tiny")
    wan = WanTransformer3DModel(**cfg.to_diffusers_config())
    wan_keys = set(wan.state_dict())
    ours = WildActor(cfg)
    backbone_keys = {k for k in ours.state_dict() if not is_adapter(k)}
    assert backbone_keys == wan_keys
    adapter_keys = set(ours.state_dict()) - backbone_keys
    # q, k, v, o and both FFN linears of every block carry lora_A and lora_B
    assert len(adapter_keys) == cfg.num_layers * 6 * 2
    assert "blocks.0.attn1.to_q.lora_A.weight" in adapter_keys
    assert "blocks.1.ffn.net.2.lora_B.weight" in adapter_keys
    # strict both ways
    ours.load_wan_state_dict(wan.state_dict(), strict=True)
    wan.load_state_dict({k: v for k, v in ours.state_dict().items() if k in backbone_keys}, strict=True)
    rank0 = WildActor(cfg.replace(lora_rank=0))
    assert set(rank0.state_dict()) == wan_keys


def test_bf16_error_within_twice_diffusers_bf16_error():
    """Low precision: our bf16 error against the fp32 truth is at most 2x diffusers' bf16 error."""
    cfg = WildActorConfig.preset("tiny")
    wan, ours = _wan_and_ours(cfg)
    x, ts, ctx = torch.randn(2, 4, 3, 6, 8), torch.tensor([900.0, 10.0]), torch.randn(2, 7, 32)
    with torch.no_grad():
        truth = wan(x, ts, ctx, return_dict=False)[0]
        wan_bf16 = wan.to(torch.bfloat16)(x.bfloat16(), ts, ctx.bfloat16(), return_dict=False)[0]
        ours_bf16 = ours.cast(torch.bfloat16)(x, ts, ctx)
    assert ours_bf16.dtype == torch.bfloat16
    assert_within_baseline(ours_bf16.float(), wan_bf16.float(), truth, factor=2.0, atol=1e-3)
