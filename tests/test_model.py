"""WildActor model: reference KV cache, reference-only adapters, training, meta builds, weights I/O,
input validation. CPU, reference backend, tiny configs; the Triton-backend test runs on
``helpers.DEVICE`` (CUDA when present)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import DEVICE, assert_close_verbose, max_err
from wildactor_kernels.model import RefCache, Reference, WildActor, WildActorConfig
from wildactor_kernels.model.config import PRESETS

TINY = WildActorConfig.preset("tiny", backend="reference")


def _model(cfg: WildActorConfig = TINY, lora_scale: float = 0.2, seed: int = 0) -> WildActor:
    """A tiny model with every weight randomised; ``lora_scale > 0`` also gives nonzero ``lora_B``."""
    torch.manual_seed(seed)
    m = WildActor(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, lora_scale) if lora_scale else p.zero_()
            else:
                p.add_(torch.randn_like(p) * 0.05)
    return m


def _refs(batch: int = 1, c: int = 4) -> list[Reference]:
    """2 face + 1 body references of different sizes (h, w multiples of the 2x2 patch)."""
    return [Reference("face", torch.randn(batch, c, 1, 4, 4)),
            Reference("body", torch.randn(batch, c, 1, 6, 4)),
            Reference("face", torch.randn(batch, c, 1, 2, 6))]


def _inputs(b: int = 2, t: int = 3, h: int = 6, w: int = 8, c: int = 4, text_dim: int = 32):
    return torch.randn(b, c, t, h, w), torch.tensor([700.0, 120.0][:b] + [500.0] * max(0, b - 2)), \
        torch.randn(b, 7, text_dim)


# ============================================================================ reference KV cache
@pytest.mark.parametrize("spatial_shift", [True, False], ids=["shift", "noshift"])
def test_cached_forward_equals_joint_forward(spatial_shift):
    m = _model(TINY.replace(spatial_shift=spatial_shift))
    x, t, ctx = _inputs()
    refs = _refs(batch=2)
    with torch.no_grad():
        joint = m(x, t, ctx, refs=refs)
        bound = m(x, t, ctx, ref_cache=m.encode_references(refs, video_shape=x.shape))
        free = m(x, t, ctx, ref_cache=m.encode_references(refs))
    assert_close_verbose(bound, joint, atol=1e-5, name="cache bound to the grid")
    assert_close_verbose(free, joint, atol=1e-5, name="grid-free cache")


def test_batch1_cache_broadcasts_to_video_batch():
    """One identity, a batch of 2 (e.g. the two CFG branches): a batch-1 cache is expanded."""
    m = _model()
    x, t, ctx = _inputs(b=2)
    refs = _refs(batch=1)
    cache = m.encode_references(refs)
    assert cache.batch_size == 1 and cache.num_layers == TINY.num_layers
    assert cache.refs == [("face", 2, 2), ("body", 3, 2), ("face", 1, 3)] and cache.num_ref == 13
    assert cache.k[0].shape == (1, 13, TINY.num_heads, TINY.head_dim)
    with torch.no_grad():
        joint = m(x, t, ctx, refs=refs)  # batch-1 latents broadcast in the joint path too
        cached = m(x, t, ctx, ref_cache=cache)
    assert_close_verbose(cached, joint, atol=1e-5)
    with pytest.raises(ValueError, match="batch"):
        m(torch.randn(3, 4, 3, 6, 8), torch.ones(3), torch.randn(3, 7, 32),
          ref_cache=m.encode_references(_refs(batch=2)))


def test_one_cache_serves_several_video_shapes():
    """A grid-free cache is re-rotated for each video grid; each equals its joint forward."""
    m = _model()
    refs = _refs()
    cache = m.encode_references(refs)
    for shape in [(1, 4, 2, 4, 4), (1, 4, 5, 8, 2), (1, 4, 2, 4, 4)]:
        x, ctx = torch.randn(shape), torch.randn(1, 3, 32)
        t = torch.tensor([333.0])
        with torch.no_grad():
            assert_close_verbose(m(x, t, ctx, ref_cache=cache), m(x, t, ctx, refs=refs), atol=1e-5,
                                 name=f"video {shape}")
    k1, _ = m.bind_ref_cache(cache, (2, 2, 2), 1)
    k2, _ = m.bind_ref_cache(cache, (2, 2, 2), 1)
    assert k1[0] is k2[0]  # memoised: the rotation happens once per grid, not once per step


def test_output_depends_on_references():
    m = _model()
    x, t, ctx = _inputs()
    refs = _refs()
    with torch.no_grad():
        base = m(x, t, ctx, refs=refs)
        none = m(x, t, ctx)
        other = m(x, t, ctx, refs=[Reference(refs[0].kind, torch.randn_like(refs[0].latent))] + refs[1:])
        kind = m(x, t, ctx, refs=[Reference("body", refs[0].latent)] + refs[1:])
        fewer = m(x, t, ctx, refs=refs[:2])
    for name, y in [("no refs", none), ("other latent", other), ("other kind", kind), ("fewer", fewer)]:
        assert max_err(y, base) > 1e-3, name


def _capture_ref_kv(m: WildActor, store: list):
    """Wrap each block's self-attention projections to record the reference rows of k and v."""
    for block in m.blocks:
        orig = block.attn1.qkv

        def qkv(h, num_video, cos, sin, _orig=orig):
            q, k, v = _orig(h, num_video, cos, sin)
            store.append((k[:, num_video:], v[:, num_video:]))
            return q, k, v

        block.attn1.qkv = qkv


def test_reference_kv_independent_of_video_timestep_and_text():
    m = _model()
    refs = _refs()
    cache = m.encode_references(refs, video_shape=(3, 6, 8))
    store: list = []
    _capture_ref_kv(m, store)
    x, t, ctx = _inputs(b=1)
    x.requires_grad_(True)
    ctx.requires_grad_(True)
    t.requires_grad_(True)
    out = m(x, t, ctx, refs=refs)
    assert len(store) == TINY.num_layers
    # the reference K/V inside the joint forward are the cached ones...
    for i, (k, v) in enumerate(store):
        assert_close_verbose(k, cache.k[i], atol=1e-5, name=f"k layer {i}")
        assert_close_verbose(v, cache.v[i], atol=1e-5, name=f"v layer {i}")
    # ...and carry no gradient from the video latents, the timestep or the text
    ref_sum = sum(k.sum() + v.sum() for k, v in store)
    grads = torch.autograd.grad(ref_sum, [x, t, ctx], allow_unused=True, retain_graph=True)
    for name, g in zip(["latents", "timestep", "context"], grads):
        assert g is None or g.abs().max() == 0, f"reference K/V depend on the {name}"
    # while the video output does depend on all three (the check above is not vacuous)
    grads = torch.autograd.grad(out.square().sum(), [x, t, ctx])
    assert all(g.abs().max() > 0 for g in grads)
    # other video inputs: identical reference K/V
    store.clear()
    with torch.no_grad():
        m(torch.randn_like(x), torch.tensor([5.0]), torch.randn_like(ctx), refs=refs)
    for i, (k, v) in enumerate(store):
        assert max_err(k, cache.k[i]) < 1e-5 and max_err(v, cache.v[i]) < 1e-5, f"layer {i}"


# ============================================================================ reference-only LoRA
def _rank0_copy(m: WildActor) -> WildActor:
    r0 = WildActor(m.cfg.replace(lora_rank=0)).eval()
    r0.load_wan_state_dict({k: v for k, v in m.state_dict().items() if "lora_" not in k})
    return r0


def test_untrained_adapter_is_the_backbone():
    m = _model(lora_scale=0.0)  # lora_B = 0: PEFT init
    r0 = _rank0_copy(m)
    x, t, ctx = _inputs()
    refs = _refs()
    with torch.no_grad():
        c1, c0 = m.encode_references(refs), r0.encode_references(refs)
        for i in range(TINY.num_layers):
            assert torch.equal(c1.k[i], c0.k[i]) and torch.equal(c1.v[i], c0.v[i]), f"layer {i}"
        assert_close_verbose(m(x, t, ctx, refs=refs), r0(x, t, ctx, refs=refs), atol=1e-6)


def test_adapters_touch_only_reference_rows():
    m = _model(lora_scale=0.2)
    r0 = _rank0_copy(m)
    x, t, ctx = _inputs()
    refs = _refs()
    with torch.no_grad():
        assert torch.equal(m(x, t, ctx), r0(x, t, ctx)), "adapters changed the video-only output"
        assert max_err(m(x, t, ctx, refs=refs), r0(x, t, ctx, refs=refs)) > 1e-3
        assert max_err(m.encode_references(refs).k[-1], r0.encode_references(refs).k[-1]) > 1e-3


def test_lora_training_lowers_loss_and_touches_only_adapters():
    m = _model(lora_scale=0.0).train()
    x, t, ctx = _inputs(t=2, h=4, w=6)
    refs = _refs()
    target = torch.randn(2, 4, 2, 4, 6)
    opt = torch.optim.Adam(m.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m(x, t, ctx, refs=refs), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses
    # In the last block only the reference keys/values reach the video: the adapters of its
    # reference queries, output projection and FFN get exactly zero gradient (dead weights).
    last = f"blocks.{TINY.num_layers - 1}."
    dead = tuple(last + s for s in ("attn1.to_q.", "attn1.to_out.0.", "ffn.net."))
    for name, p in m.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None, name
            assert (p.grad.abs().max() == 0) == name.startswith(dead), name
        else:
            assert not p.requires_grad and p.grad is None, name
    n_adapter = sum(p.numel() for p in m.trainable_parameters())
    assert n_adapter == m.num_parameters(include_adapters=True) - m.num_parameters()


def test_gradient_checkpointing_gives_the_same_gradients():
    m = _model(lora_scale=0.1).train()
    x, t, ctx = _inputs(t=2, h=4, w=4)
    refs = _refs()
    grads = []
    for ckpt in (False, True):
        m.gradient_checkpointing = ckpt
        m.zero_grad()
        m(x, t, ctx, refs=refs).square().mean().backward()
        grads.append([p.grad.clone() for p in m.trainable_parameters()])
    for g0, g1 in zip(*grads):
        assert_close_verbose(g1, g0, atol=1e-6)


@pytest.mark.slow
def test_triton_backend_matches_reference():
    """The whole model on the Triton kernels (GPU, or the CPU interpreter) = the reference backend:
    joint and cached forward, and the adapter gradients."""
    from wildactor_kernels._utils import interpreter_active, triton_available

    dev = DEVICE
    if not triton_available() or (dev.type == "cpu" and not interpreter_active()):
        pytest.skip("needs Triton on CUDA or TRITON_INTERPRET=1")
    m = _model(lora_scale=0.1).to(dev).train()
    x, t, ctx = (a.to(dev) for a in _inputs(b=1, t=2, h=4, w=4))
    refs = [Reference(r.kind, r.latent.to(dev)) for r in _refs()]
    outs, grads = [], []
    for backend in ("reference", "triton"):
        m.set_backend(backend)
        m.zero_grad()
        y = m(x, t, ctx, refs=refs)
        y.square().mean().backward()
        with torch.no_grad():
            outs.append((y.detach(), m(x, t, ctx, ref_cache=m.encode_references(refs))))
        grads.append([p.grad.clone() for p in m.trainable_parameters()])
    assert_close_verbose(outs[1][0], outs[0][0], atol=1e-4, name="joint")
    assert_close_verbose(outs[1][1], outs[0][1], atol=1e-4, name="cached")
    for g1, g0 in zip(grads[1], grads[0]):
        assert_close_verbose(g1, g0, atol=1e-5, rtol=1e-3, name="adapter grad")


# ============================================================================ builds and counts
def _adapter_count(cfg: WildActorConfig) -> int:
    r, d, f = cfg.lora_rank, cfg.dim, cfg.ffn_dim
    return cfg.num_layers * r * (4 * 2 * d + (d + f) + (f + d))


@pytest.mark.parametrize("name", PRESETS)
def test_meta_build_of_every_preset(name):
    cfg = WildActorConfig.preset(name)
    m = WildActor(cfg, device="meta")
    assert all(p.is_meta for p in m.parameters())
    assert m.num_parameters(include_adapters=True) - m.num_parameters() == _adapter_count(cfg)
    with torch.device("meta"):
        m2 = WildActor(cfg)
    assert m2.num_parameters() == m.num_parameters() and all(p.is_meta for p in m2.parameters())


# measured once, pinned (the diffusers test below checks the real ones independently)
EXPECTED_BACKBONE = {"tiny": 155_344, "wan2.1-1.3b": 1_418_996_800, "wan2.2-5b": 4_999_787_712,
                     "wan2.1-14b": 14_288_491_584}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parameter_counts(name):
    m = WildActor(WildActorConfig.preset(name), device="meta")
    assert m.num_parameters() == EXPECTED_BACKBONE[name]


def test_backbone_counts_equal_diffusers_wan_configs():
    """Against diffusers built on meta from the published configs (written out, not derived)."""
    pytest.importorskip("diffusers")
    from diffusers import WanTransformer3DModel

    published = {
        "wan2.1-1.3b": dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                            text_dim=4096, ffn_dim=8960, num_layers=30),
        "wan2.2-5b": dict(num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
                          text_dim=4096, ffn_dim=14336, num_layers=30),  # Wan2.2-TI2V-5B
        "wan2.1-14b": dict(num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                           text_dim=4096, ffn_dim=13824, num_layers=40),
    }
    for name, kw in published.items():
        with torch.device("meta"):
            wan = WanTransformer3DModel(patch_size=(1, 2, 2), freq_dim=256, cross_attn_norm=True, eps=1e-6,
                                        **kw)
        want = sum(p.numel() for p in wan.parameters())
        assert WildActor(WildActorConfig.preset(name), device="meta").num_parameters() == want, name
        assert WildActorConfig.from_diffusers_config(dict(wan.config)) == WildActorConfig.preset(name), name


def test_bf16_forward_tracks_fp32():
    m = _model()
    x, t, ctx = _inputs()
    refs = _refs()
    with torch.no_grad():
        y32 = m(x, t, ctx, refs=refs)
        mb = m.to(torch.bfloat16)
        yb = mb(x, t, ctx, refs=refs)
        yc = mb(x, t, ctx, ref_cache=mb.encode_references(refs))
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb).all()
    rel = (yb.float() - y32).norm() / y32.norm()
    assert rel < 3e-2, float(rel)
    assert (yc.float() - yb.float()).norm() / y32.norm() < 3e-2
    # WildActor(cfg, dtype=bf16) / cast(): diffusers' fp32-kept parameters stay fp32
    mk = WildActor(TINY, dtype=torch.bfloat16)
    kept = {n for n, p in mk.named_parameters() if p.dtype == torch.float32}
    assert "scale_shift_table" in kept and "blocks.1.scale_shift_table" in kept
    assert "blocks.0.norm2.weight" in kept and "condition_embedder.time_embedder.linear_2.bias" in kept
    assert mk.patch_embedding.weight.dtype == torch.bfloat16 and len(kept) == 4 + 1 + 3 * TINY.num_layers
    mk.load_wan_state_dict({k: v for k, v in m.state_dict().items() if "lora_" not in k})
    with torch.no_grad():
        yk = mk(x, t, ctx, refs=refs)
    assert (yk.float() - y32).norm() / y32.norm() < 3e-2


# ============================================================================ weights I/O
def test_save_and_load_pretrained_round_trip(tmp_path):
    m = _model()
    m.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert WildActorConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == m.cfg
    m2 = WildActor.from_pretrained(str(tmp_path)).eval()
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert [n for n, p in m2.named_parameters() if p.requires_grad] == \
        [n for n, _ in m2.named_parameters() if "lora_" in n]
    x, t, ctx = _inputs()
    with torch.no_grad():
        refs = _refs()
        assert torch.equal(m(x, t, ctx, refs=refs), m2(x, t, ctx, refs=refs))
    m3 = WildActor.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert m3.dtype == torch.bfloat16


def test_adapters_round_trip(tmp_path):
    trained = _model(lora_scale=0.3, seed=1)
    path = str(tmp_path / "adapters.safetensors")
    trained.save_adapters(path)
    from safetensors.torch import load_file

    keys = set(load_file(path))
    assert keys == {k for k in trained.state_dict() if "lora_" in k}
    assert "blocks.0.attn1.to_q.lora_A.weight" in keys and "blocks.1.ffn.net.0.proj.lora_B.weight" in keys
    fresh = WildActor(TINY).eval()
    fresh.load_wan_state_dict({k: v for k, v in trained.state_dict().items() if "lora_" not in k})
    fresh.load_adapters(path)
    for k, v in trained.adapter_state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    with pytest.raises(ValueError, match="rank"):
        WildActor(TINY.replace(lora_rank=4)).load_adapters(path)
    with pytest.raises(ValueError, match="no adapters"):
        WildActor(TINY.replace(lora_rank=0)).save_adapters(path)


def test_load_wan_state_dict_errors_are_readable():
    m = WildActor(TINY)
    sd = {k: v for k, v in m.state_dict().items() if "lora_" not in k}
    m.load_wan_state_dict(sd)  # adapters optional
    broken = {k: v for k, v in sd.items() if "attn2.to_q" not in k}
    broken["blocks.0.attn1.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        m.load_wan_state_dict(broken)
    msg = str(e.value)
    assert "missing 4 keys" in msg and "blocks.{0-1}.attn2.to_q.weight" in msg
    assert "unexpected 1 keys" in msg and "blocks.{0}.attn1.extra.weight" in msg
    res = m.load_wan_state_dict(broken, strict=False)
    assert len(res.missing_keys) == 4 and res.unexpected_keys == ["blocks.0.attn1.extra.weight"]
    sd["proj_out.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        m.load_wan_state_dict(sd)


def test_meta_model_loads_by_assignment():
    src = _model()
    m = WildActor(TINY, device="meta")
    m.load_wan_state_dict({k: v.clone() for k, v in src.state_dict().items() if "lora_" not in k})
    assert not any(p.is_meta for p in m.parameters())
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in m.named_parameters() if "lora_B" in n)
    x, t, ctx = _inputs()
    with torch.no_grad():
        assert torch.equal(m(x, t, ctx), src(x, t, ctx))


# ============================================================================ validation
def test_bad_inputs_raise_clear_errors():
    m = WildActor(TINY)
    x, t, ctx = _inputs()
    refs = _refs()
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        m(x[:, :, 0], t, ctx)
    with pytest.raises(ValueError, match="in_channels"):
        m(torch.randn(2, 5, 3, 6, 8), t, ctx)
    with pytest.raises(ValueError, match="multiples"):
        m(torch.randn(2, 4, 3, 5, 8), t, ctx)
    with pytest.raises(ValueError, match="kind"):
        Reference("hand", refs[0].latent)
    with pytest.raises(ValueError, match=r"\[B, C, 1, h, w\]"):
        Reference("face", torch.randn(1, 4, 2, 4, 4))
    with pytest.raises(TypeError):
        Reference("face", torch.zeros(1, 4, 1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="in_channels"):
        m(x, t, ctx, refs=[Reference("face", torch.randn(1, 3, 1, 4, 4))])
    with pytest.raises(ValueError, match="multiples"):
        m(x, t, ctx, refs=[Reference("face", torch.randn(1, 4, 1, 3, 4))])
    with pytest.raises(ValueError, match="batch"):
        m(x, t, ctx, refs=[Reference("face", torch.randn(3, 4, 1, 4, 4))])
    with pytest.raises(TypeError, match="Reference"):
        m(x, t, ctx, refs=[refs[0].latent])
    with pytest.raises(TypeError, match="list"):
        m(x, t, ctx, refs=refs[0])
    with pytest.raises(ValueError, match="not both"):
        m(x, t, ctx, refs=refs, ref_cache=m.encode_references(refs))
    with pytest.raises(TypeError, match="RefCache"):
        m(x, t, ctx, ref_cache=[refs])
    with pytest.raises(ValueError, match="layers"):
        m(x, t, ctx, ref_cache=RefCache([torch.zeros(1, 4, 4, 16)] * 3, [torch.zeros(1, 4, 4, 16)] * 3,
                                        [("face", 2, 2)]))
    with pytest.raises(ValueError, match="timestep"):
        m(x, torch.ones(3), ctx)
    with pytest.raises(ValueError, match="text_dim"):
        m(x, t, torch.randn(2, 7, 31))
    with pytest.raises(TypeError):
        m(x.numpy(), t, ctx)


def test_scalar_timestep_broadcasts():
    m = _model()
    x, _, ctx = _inputs()
    with torch.no_grad():
        assert torch.equal(m(x, 250.0, ctx), m(x, torch.tensor([250.0, 250.0]), ctx))


def test_config_validation_and_json():
    small = dict(num_layers=1, ffn_dim=8, in_channels=1, out_channels=1, text_dim=1)
    with pytest.raises(ValueError, match="divisible"):
        WildActorConfig(dim=65, num_heads=4, **small)
    with pytest.raises(ValueError, match="even and >= 8"):
        WildActorConfig(dim=24, num_heads=4, **small)
    with pytest.raises(ValueError, match="even and >= 8"):
        WildActorConfig(dim=36, num_heads=4, **small)
    with pytest.raises(ValueError, match="tiny, wan2.1-1.3b, wan2.2-5b, wan2.1-14b"):
        WildActorConfig.preset("wan3")
    with pytest.raises(ValueError, match="backend"):
        WildActorConfig.preset("tiny", backend="cuda")
    with pytest.raises(ValueError, match="unknown WildActorConfig keys"):
        WildActorConfig.from_dict({**TINY.to_dict(), "foo": 1})
    for name in PRESETS:
        cfg = WildActorConfig.preset(name)
        assert WildActorConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TINY.head_dim == 16 and TINY.lora_rank == 8
    assert WildActorConfig.preset("wan2.1-14b").head_dim == 128
    assert WildActorConfig.preset("tiny", lora_rank=0).lora_scale == 0.0
