"""Adapter files in PEFT, diffusers and Stand-In formats (docs/design.md §11), all or nothing.

Each loader is checked against the maths written here independently: the reference rows of an
adapted linear compute ``x (W + s B A)^T + b`` with PEFT's scale ``s = alpha / r`` (``alpha /
sqrt(r)`` for rsLoRA), and a Stand-In-configured model computes Stand-In's self-attention (its
q/k/v LoRA on reference rows, references at time -1 and shifted by the video grid, Wan's complex
3D RoPE tables built from positions starting at -1).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from wildactor_kernels.model import Reference, WildActor, WildActorConfig
from wildactor_kernels.model.adapter_formats import (
    adapter_rank,
    detect_format,
    load_adapter_file,
    load_diffusers_lora,
    load_peft_adapter,
    load_standin_adapter,
)

CFG = WildActorConfig(dim=64, num_layers=2, num_heads=2, ffn_dim=96, in_channels=4, out_channels=4,
                      text_dim=16, lora_rank=4, backend="reference")
QKV = ("to_q", "to_k", "to_v")


def _model(seed=0, **over):
    torch.manual_seed(seed)
    m = WildActor(CFG.replace(**over)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _pairs(modules, rank=4, seed=1, d=64):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        d_in = 96 if m.endswith("net.2") else d
        d_out = 96 if m.endswith("net.0.proj") else d
        out[m] = (torch.randn(rank, d_in, generator=g) * 0.3, torch.randn(d_out, rank, generator=g) * 0.3)
    return out


def _qkv_modules(layers=2):
    return [f"blocks.{i}.attn1.{p}" for i in range(layers) for p in QKV]


def _check_ref_rows(model, module, a, b, scale):
    """Reference rows of ``module``: ``x (W + s B A)^T + bias``; video rows: ``x W^T + bias``."""
    lin = model.get_submodule(module)
    x = torch.randn(1, 7, lin.in_features)
    with torch.no_grad():
        got = lin(x, 3)
        w = lin.weight.double()
        want_ref = F.linear(x[:, 3:].double(), w + scale * b.double() @ a.double(), lin.bias.double())
        want_vid = F.linear(x[:, :3].double(), w, lin.bias.double())
    torch.testing.assert_close(got[:, 3:].double(), want_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, :3].double(), want_vid, atol=1e-5, rtol=1e-5)


def _write_peft(folder, pairs, config):
    folder.mkdir(parents=True, exist_ok=True)
    sd = {}
    for m, (a, b) in pairs.items():
        sd[f"base_model.model.{m}.lora_A.weight"] = a.contiguous()
        sd[f"base_model.model.{m}.lora_B.weight"] = b.contiguous()
    save_file(sd, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return folder


# ============================================================================ PEFT
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_peft_qkv_adapter(tmp_path, rslora, caplog):
    pairs = _pairs(_qkv_modules())
    folder = _write_peft(tmp_path / "peft", pairs, {"r": 4, "lora_alpha": 6, "use_rslora": rslora,
                                                    "target_modules": ["to_q", "to_k", "to_v"]})
    m = _model()
    with caplog.at_level("INFO"):
        rep = load_peft_adapter(m, str(folder))
    scale = 6 / math.sqrt(4) if rslora else 6 / 4
    assert rep.format == "peft" and rep.rank == 4 and rep.scale == pytest.approx(scale)
    assert sorted(rep.mapped.values()) == sorted(pairs)
    # o and both FFN linears are not in the file: left at zero (reported, and logged)
    assert sorted(rep.zeroed) == sorted(f"blocks.{i}.{s}" for i in range(2)
                                        for s in ("attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2"))
    assert "left at zero" in caplog.text
    assert m.cfg.lora_scale == pytest.approx(scale)
    for mod, (a, b) in pairs.items():
        _check_ref_rows(m, mod, a, b, scale)
    for mod in rep.zeroed:
        assert m.get_submodule(mod).lora_B.weight.abs().max() == 0


def test_peft_alpha_pattern_and_rank_errors(tmp_path):
    pairs = _pairs(_qkv_modules())
    folder = _write_peft(tmp_path / "p", pairs, {"r": 4, "lora_alpha": 4, "alpha_pattern": {"to_v": 8}})
    m = _model()
    rep = load_peft_adapter(m, str(folder / "adapter_model.safetensors"))
    assert any("folded" in n for n in rep.notes)
    for mod, (a, b) in pairs.items():
        _check_ref_rows(m, mod, a, b, 2.0 if mod.endswith("to_v") else 1.0)
    # a rank-8 file into a rank-4 model: refused, nothing written
    before = {k: v.clone() for k, v in m.adapter_state_dict().items()}
    big = _write_peft(tmp_path / "r8", _pairs(_qkv_modules(), rank=8), {"r": 8, "lora_alpha": 8})
    with pytest.raises(ValueError, match="lora_rank=4"):
        load_peft_adapter(m, str(big))
    bad_mod = _write_peft(tmp_path / "x", _pairs(["blocks.0.attn2.to_q"]), {"r": 4, "lora_alpha": 4})
    with pytest.raises(ValueError, match="apply='fuse'"):
        load_peft_adapter(m, str(bad_mod))
    cfg_mismatch = _write_peft(tmp_path / "c", pairs, {"r": 2, "lora_alpha": 4})
    with pytest.raises(ValueError, match="says 2"):
        load_peft_adapter(m, str(cfg_mismatch))
    after = m.adapter_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    (tmp_path / "noconf").mkdir()
    save_file({"base_model.model.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64)},
              str(tmp_path / "noconf" / "adapter_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(m, str(tmp_path / "noconf"))


def test_fuse_whole_sequence_lora(tmp_path):
    """apply='fuse': W += s B A on any backbone linear (cross-attention included), every token."""
    mods = ["blocks.0.attn2.to_q", "blocks.1.attn1.to_out.0", "blocks.0.ffn.net.2"]
    pairs = _pairs(mods)
    folder = _write_peft(tmp_path / "f", pairs, {"r": 4, "lora_alpha": 2})
    m, ref = _model(), _model()
    rep = load_peft_adapter(m, str(folder), apply="fuse")
    assert rep.apply == "fuse" and "not undoable" in rep.notes[-1]
    with torch.no_grad():
        for mod, (a, b) in pairs.items():
            w = ref.get_submodule(mod).weight
            w.copy_(w + 0.5 * b @ a)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 2, 4, 4, generator=g), torch.randn(1, 5, 16, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(m(x, 500.0, ctx), ref(x, 500.0, ctx), atol=1e-5, rtol=0)


# ============================================================================ diffusers save_lora_weights
def _save_diffusers(path, pairs, metadata=None, extra=None):
    from diffusers import WanPipeline

    layers = {}
    for m, (a, b) in pairs.items():
        layers[f"{m}.lora_A.weight"], layers[f"{m}.lora_B.weight"] = a.contiguous(), b.contiguous()
    WanPipeline.save_lora_weights(str(path), transformer_lora_layers=layers,
                                  transformer_lora_adapter_metadata=metadata)
    f = path / "pytorch_lora_weights.safetensors"
    if extra:
        from safetensors.torch import load_file

        sd = load_file(str(f))
        sd.update(extra)
        save_file(sd, str(f))
    return f


def test_diffusers_lora_alpha_sources(tmp_path):
    pytest.importorskip("diffusers")
    pairs = _pairs(_qkv_modules() + ["blocks.1.ffn.net.0.proj"])
    with_meta = _save_diffusers(tmp_path / "a", pairs, {"r": 4, "lora_alpha": 2, "target_modules": ["to_q"]})
    no_meta = _save_diffusers(tmp_path / "b", pairs)
    assert detect_format(str(with_meta)) == detect_format(str(no_meta)) == "diffusers"
    m = _model()
    rep = load_diffusers_lora(m, str(with_meta))
    assert rep.scale == 0.5 and rep.scale_source == "metadata"
    for mod, (a, b) in pairs.items():
        _check_ref_rows(m, mod, a, b, 0.5)
    rep = load_adapter_file(m, str(no_meta))
    assert rep.scale == 1.0 and any("alpha = rank" in n for n in rep.notes)
    rep = load_diffusers_lora(m, str(with_meta), alpha=12)
    assert rep.scale == 3.0 and rep.scale_source == "argument"
    for mod, (a, b) in pairs.items():
        _check_ref_rows(m, mod, a, b, 3.0)


def test_diffusers_lora_foreign_keys(tmp_path):
    pytest.importorskip("diffusers")
    pairs = _pairs(_qkv_modules())
    extra = {"text_encoder.layer.0.q.lora_A.weight": torch.zeros(4, 8)}
    f = _save_diffusers(tmp_path / "c", pairs, extra=extra)
    m = _model()
    before = {k: v.clone() for k, v in m.adapter_state_dict().items()}
    with pytest.raises(ValueError, match="text encoder"):
        load_diffusers_lora(m, str(f))
    assert all(torch.equal(before[k], v) for k, v in m.adapter_state_dict().items())
    rep = load_diffusers_lora(m, str(f), strict=False)
    assert rep.ignored == ["text_encoder.layer.0.q.lora_A.weight"]
    assert "ignored file keys" in str(rep)


def test_wan_original_names_and_kohya_alpha(tmp_path):
    """Wan's own names (self_attn.q, ffn.0) with per-module .alpha tensors, as other trainers write."""
    pairs = _pairs(["blocks.0.attn1.to_q", "blocks.1.ffn.net.0.proj"])
    sd = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": pairs["blocks.0.attn1.to_q"][0],
          "diffusion_model.blocks.0.self_attn.q.lora_up.weight": pairs["blocks.0.attn1.to_q"][1],
          "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(8.0),
          "diffusion_model.blocks.1.ffn.0.lora_down.weight": pairs["blocks.1.ffn.net.0.proj"][0],
          "diffusion_model.blocks.1.ffn.0.lora_up.weight": pairs["blocks.1.ffn.net.0.proj"][1],
          "diffusion_model.blocks.1.ffn.0.alpha": torch.tensor(8.0)}
    f = tmp_path / "k.safetensors"
    save_file(sd, str(f))
    m = _model()
    rep = load_diffusers_lora(m, str(f))
    assert rep.mapped == {"blocks.0.self_attn.q": "blocks.0.attn1.to_q",
                          "blocks.1.ffn.0": "blocks.1.ffn.net.0.proj"}
    assert rep.scale == 2.0 and rep.scale_source == ".alpha tensors"
    for mod, (a, b) in pairs.items():
        _check_ref_rows(m, mod, a, b, 2.0)


# ============================================================================ Stand-In
def _standin_sd(rank=4, layers=2, d=64, seed=2):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(layers):
        for p in "qkv":
            sd[f"blocks.{i}.self_attn.{p}_loras.down.weight"] = torch.randn(rank, d, generator=g) * 0.3
            sd[f"blocks.{i}.self_attn.{p}_loras.up.weight"] = torch.randn(d, rank, generator=g) * 0.3
    return sd


def _standin_freqs(head_dim, positions):
    """Stand-In's RoPE: Wan's complex tables over positions -1, 0, 1, ... per axis (t gets
    ``D - 2*(D//3)`` channels, h and w ``D//3`` each), indexed by ``position + 1``."""
    dims = (head_dim - 2 * (head_dim // 3), head_dim // 3, head_dim // 3)
    parts = []
    for axis, d in enumerate(dims):
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64)[: d // 2] / d))
        ang = positions[:, axis].double()[:, None] * inv[None, :]
        parts.append(torch.polar(torch.ones_like(ang), ang))
    return torch.cat(parts, dim=1)  # [N, D/2] complex128


def _standin_rope(x, freqs, heads):
    b, n, _ = x.shape
    xc = torch.view_as_complex(x.double().reshape(b, n, heads, -1, 2))
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(2).to(x.dtype)


def _standin_self_attention(attn, sd, layer, x_vid, x_ref, grid, ref_hw):
    """Stand-In's self-attention of one block, written from its description: video q/k/v plain,
    reference q/k/v with ``up(down(x))`` added before the q/k RMSNorm; video queries read
    ``[video; reference]`` keys, reference queries read the reference keys; one output projection."""
    h = attn.heads

    def proj(lin, x, p=None):
        y = F.linear(x, lin.weight.double(), lin.bias.double())
        if p is not None:
            down = sd[f"blocks.{layer}.self_attn.{p}_loras.down.weight"].double()
            up = sd[f"blocks.{layer}.self_attn.{p}_loras.up.weight"].double()
            y = y + F.linear(F.linear(x, down), up)
        return y

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()

    t, hg, wg = grid
    tt, yy, xx = torch.meshgrid(torch.arange(t), torch.arange(hg), torch.arange(wg), indexing="ij")
    pos_v = torch.stack([tt.flatten(), yy.flatten(), xx.flatten()], 1)
    ry, rx = torch.meshgrid(torch.arange(ref_hw[0]), torch.arange(ref_hw[1]), indexing="ij")
    pos_r = torch.stack([torch.full((ry.numel(),), -1), hg + ry.flatten(), wg + rx.flatten()], 1)
    d = attn.to_q.weight.shape[0] // h
    fv, fr = _standin_freqs(d, pos_v), _standin_freqs(d, pos_r)

    def heads_first(x):
        return x.unflatten(-1, (h, -1)).transpose(1, 2)

    qv = _standin_rope(rms(proj(attn.to_q, x_vid), attn.norm_q.weight), fv, h)
    kv = _standin_rope(rms(proj(attn.to_k, x_vid), attn.norm_k.weight), fv, h)
    vv = proj(attn.to_v, x_vid)
    qr = _standin_rope(rms(proj(attn.to_q, x_ref, "q"), attn.norm_q.weight), fr, h)
    kr = _standin_rope(rms(proj(attn.to_k, x_ref, "k"), attn.norm_k.weight), fr, h)
    vr = proj(attn.to_v, x_ref, "v")
    out_v = F.scaled_dot_product_attention(heads_first(qv), heads_first(torch.cat([kv, kr], 1)),
                                           heads_first(torch.cat([vv, vr], 1)))
    out_r = F.scaled_dot_product_attention(heads_first(qr), heads_first(kr), heads_first(vr))
    out = torch.cat([out_v, out_r], 2).transpose(1, 2).flatten(2)
    return F.linear(out, attn.to_out[0].weight.double(), attn.to_out[0].bias.double())


def test_standin_checkpoint_reproduces_standin_attention(tmp_path):
    sd = _standin_sd()
    f = tmp_path / "standin.safetensors"
    save_file(sd, str(f))
    assert detect_format(str(f)) == "standin"
    m = _model()
    assert m.cfg.ref_time == "after"
    rep = load_adapter_file(m, str(f))
    assert rep.format == "standin" and rep.scale == 1.0 and m.cfg.ref_time == "before"
    assert any("ref_time='before'" in n for n in rep.notes)
    assert len(rep.mapped) == 6 and len(rep.zeroed) == 2 * 3  # o, ffn.net.0.proj, ffn.net.2 per block
    grid, ref_hw = (3, 2, 3), (2, 2)
    g = torch.Generator().manual_seed(0)
    x_vid = torch.randn(1, 18, 64, generator=g, dtype=torch.float64).float()
    x_ref = torch.randn(1, 4, 64, generator=g, dtype=torch.float64).float()
    from wildactor_kernels import TokenLayout

    layout = TokenLayout(grid, [("face", *ref_hw)])
    cos, sin = m.rope_tables(layout)
    for layer in range(2):
        attn = m.blocks[layer].attn1
        with torch.no_grad():
            q, k, v = attn.qkv(torch.cat([x_vid, x_ref], 1), 18, cos, sin)
            ours = attn.attend(q, k, v, 18)
            want = _standin_self_attention(attn, sd, layer, x_vid.double(), x_ref.double(), grid, ref_hw)
        assert (ours.double() - want).abs().max().item() < 2e-5


def test_standin_model_paths_agree_and_ref_time_matters(tmp_path):
    m = _model()
    load_standin_adapter(m, _standin_sd())
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 3, 4, 6, generator=g), torch.randn(2, 5, 16, generator=g)
    refs = [Reference("face", torch.randn(1, 4, 1, 4, 4, generator=g))]
    with torch.no_grad():
        joint = m(x, 600.0, ctx, refs=refs)
        cached = m(x, 600.0, ctx, ref_cache=m.encode_references(refs))  # grid-free cache, bound later
        bound = m(x, 600.0, ctx, ref_cache=m.encode_references(refs, video_shape=x.shape))
        torch.testing.assert_close(cached, joint, atol=1e-5, rtol=0)
        torch.testing.assert_close(bound, joint, atol=1e-5, rtol=0)
        m.cfg = m.cfg.replace(ref_time="after")
        after = m(x, 600.0, ctx, refs=refs)
    assert (after - joint).abs().max() > 1e-4


def test_standin_refusals(tmp_path):
    m = _model()
    with pytest.raises(ValueError, match="never unpickled"):
        load_standin_adapter(m, str(tmp_path / "Stand-In_wan2.1_T2V_14B.ckpt"))
    with pytest.raises(ValueError, match="not Stand-In adapter keys"):
        load_standin_adapter(m, {"blocks.0.self_attn.o_loras.down.weight": torch.zeros(4, 64)})
    with pytest.raises(ValueError, match="lora_rank=4"):
        load_standin_adapter(m, _standin_sd(rank=8))
    assert m.cfg.ref_time == "after"  # a refused load changes nothing, the layout included
    kept = _model()
    rep = load_standin_adapter(kept, _standin_sd(), set_ref_time=False)
    assert kept.cfg.ref_time == "after" and any("NOT where Stand-In" in n for n in rep.notes)
    with pytest.raises(ValueError, match="ref_time must be one of"):
        WildActorConfig.preset("tiny", ref_time="middle")


def test_adapter_rank_from_the_file_header(tmp_path):
    """The rank to build a model with, for every format, read without loading the tensors."""
    peft_dir = _write_peft(tmp_path / "p", _pairs(_qkv_modules(), rank=6), {"r": 6, "lora_alpha": 6})
    assert adapter_rank(str(peft_dir)) == 6
    assert adapter_rank(str(peft_dir / "adapter_model.safetensors"), "peft") == 6
    save_file(_standin_sd(rank=8), str(tmp_path / "s.safetensors"))
    assert adapter_rank(str(tmp_path / "s.safetensors")) == 8
    kohya = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(3, 64),
             "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, 3)}
    save_file(kohya, str(tmp_path / "k.safetensors"))
    assert adapter_rank(str(tmp_path / "k.safetensors"), "diffusers") == 3
    m = _model()
    m.save_adapters(str(tmp_path / "w.safetensors"))
    assert adapter_rank(str(tmp_path / "w.safetensors")) == 4
    mixed = {**kohya, "diffusion_model.blocks.0.self_attn.k.lora_down.weight": torch.zeros(5, 64),
             "diffusion_model.blocks.0.self_attn.k.lora_up.weight": torch.zeros(64, 5)}
    save_file(mixed, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"found \[3, 5\]"):
        adapter_rank(str(tmp_path / "m.safetensors"), "diffusers")
    with pytest.raises(ValueError, match="format must be one of"):
        adapter_rank(str(tmp_path / "m.safetensors"), "kohya")


def test_wildactor_format_through_load_adapter_file(tmp_path):
    src = _model(seed=4)
    with torch.no_grad():
        for p in src.trainable_parameters():
            p.normal_()
    f = tmp_path / "ours.safetensors"
    src.save_adapters(str(f))
    assert detect_format(str(f)) == "wildactor"
    dst = _model(seed=5)
    rep = load_adapter_file(dst, str(f))
    assert rep.format == "wildactor" and len(rep.mapped) == 12
    for k, v in src.adapter_state_dict().items():
        assert torch.equal(dst.adapter_state_dict()[k], v)
    with pytest.raises(ValueError, match="format must be one of"):
        load_adapter_file(dst, str(f), format="kohya")


# ============================================================================ files from PEFT / diffusers
def test_files_written_by_peft_and_diffusers(tmp_path):
    """Adapters written by PEFT itself (``save_pretrained``) and by diffusers (``add_adapter`` +
    ``save_lora_weights``) on diffusers' own WanTransformer3DModel: the reference rows equal PEFT's
    adapted linears, and ``apply="fuse"`` equals the PEFT-adapted diffusers model."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import copy

    from diffusers import WanPipeline
    from wildactor_kernels.model.pipeline import tiny_wan_components

    wan = tiny_wan_components(seed=0)["transformer"]
    slots = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 2, 4, 6, generator=g), torch.randn(2, 7, 32, generator=g)
    ts = torch.tensor([700.0, 300.0])

    def wan_out(model):
        with torch.no_grad():
            return model(hidden_states=x, timestep=ts, encoder_hidden_states=ctx, return_dict=False)[0]

    for rslora in (False, True):
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=slots, use_rslora=rslora)
        pm = peft.get_peft_model(copy.deepcopy(wan), cfg)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.normal_(std=0.3, generator=g)
        folder = tmp_path / f"peft{int(rslora)}"
        pm.save_pretrained(str(folder))
        wa = WildActor.from_diffusers(wan, lora_rank=4, backend="reference")
        rep = load_adapter_file(wa, str(folder))
        assert rep.format == "peft" and rep.scale == (4.0 if rslora else 2.0) and len(rep.mapped) == 12
        for i in range(2):
            for s in slots:
                ours = wa.get_submodule(f"blocks.{i}.{s}")
                theirs = pm.base_model.model.get_submodule(f"blocks.{i}.{s}")
                xi = torch.randn(1, 5, ours.in_features, generator=g)
                with torch.no_grad():
                    torch.testing.assert_close(ours(xi, 0), theirs(xi), atol=1e-5, rtol=1e-5)
        fused = WildActor.from_diffusers(wan, backend="reference")
        load_adapter_file(fused, str(folder), apply="fuse")
        with torch.no_grad():
            torch.testing.assert_close(fused(x, ts, ctx), wan_out(pm), atol=1e-4, rtol=0)

    # diffusers' training flow: add_adapter, then save_lora_weights with the adapter metadata
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    adapted = copy.deepcopy(wan)
    adapted.add_adapter(peft.LoraConfig(r=4, lora_alpha=2, target_modules=targets, init_lora_weights=False))
    WanPipeline.save_lora_weights(str(tmp_path / "dl"),
                                  transformer_lora_layers=peft.get_peft_model_state_dict(adapted),
                                  transformer_lora_adapter_metadata={"r": 4, "lora_alpha": 2,
                                                                     "target_modules": targets})
    fused = WildActor.from_diffusers(wan, backend="reference")
    rep = load_adapter_file(fused, str(tmp_path / "dl" / "pytorch_lora_weights.safetensors"), apply="fuse")
    assert rep.format == "diffusers" and rep.scale == 0.5 and rep.scale_source == "metadata"
    assert len(rep.mapped) == 16  # q/k/v/o of self- and cross-attention, 2 blocks
    with torch.no_grad():
        torch.testing.assert_close(fused(x, ts, ctx), wan_out(adapted), atol=1e-4, rtol=0)


# ============================================================================ bad alphas and ranks
@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 0, -4])
def test_peft_bad_alpha_is_refused_and_model_unchanged(tmp_path, alpha):
    """An alpha that is not a finite number > 0 (a NaN scale would turn every output NaN) is an
    error naming the file; nothing is written."""
    f = _write_peft(tmp_path / "p", _pairs(_qkv_modules()), {"r": 4, "lora_alpha": alpha})
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="adapter_model.safetensors.*alpha"):
        load_peft_adapter(m, str(f))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m.cfg.lora_alpha == CFG.lora_alpha


def test_peft_rank_zero_pair_is_refused(tmp_path):
    pairs = _pairs(_qkv_modules())
    pairs["blocks.0.attn1.to_q"] = (torch.zeros(0, 64), torch.zeros(64, 0))
    f = _write_peft(tmp_path / "p", pairs,
                    {"r": 4, "lora_alpha": 4, "rank_pattern": {"blocks.0.attn1.to_q": 0}})
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"rank < 1.*\n.*blocks\.0\.attn1\.to_q"):
        load_peft_adapter(m, str(f))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("alpha, err", [(float("nan"), ValueError), (-1.0, ValueError), (0, ValueError),
                                        ("8", TypeError), (True, TypeError)])
def test_diffusers_lora_alpha_argument_is_checked(tmp_path, alpha, err):
    m = _model()
    with pytest.raises(err, match="alpha"):
        load_diffusers_lora(m, str(tmp_path / "never_read.safetensors"), alpha=alpha)


@pytest.mark.parametrize("meta", [{"lora_alpha": "nan"}, {"lora_alpha": "inf"}, {"lora_alpha": "-8.0"},
                                  {"lora_alpha": "0"}, {"lora_rank": "0"}, {"lora_rank": "-4"}])
def test_wildactor_adapter_file_bad_metadata(tmp_path, meta):
    """``lora_alpha='nan'`` in a file's metadata used to be adopted by ``alpha='file'`` (every
    adapted output NaN); now it is refused whatever the alpha mode."""
    src = _model(seed=3)
    sd = {k: v.contiguous() for k, v in src.adapter_state_dict().items()}
    path = str(tmp_path / "w.safetensors")
    save_file(sd, path, metadata={"format": "pt", "lora_rank": "4", "lora_alpha": "4.0", **meta})
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for mode in ("check", "file", "model"):
        with pytest.raises(ValueError, match="w.safetensors"):
            m.load_adapters(path, alpha=mode)
    with pytest.raises(ValueError, match="w.safetensors"):
        load_adapter_file(m, path)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert m.cfg.lora_alpha == CFG.lora_alpha


def test_load_adapter_file_never_ignores_alpha(tmp_path):
    """``alpha=`` is honoured for diffusers files only; for a format that carries its own alpha
    it is an error (it used to be dropped silently)."""
    src = _model(seed=3)
    path = str(tmp_path / "w.safetensors")
    src.save_adapters(path)
    peft = _write_peft(tmp_path / "p", _pairs(_qkv_modules()), {"r": 4, "lora_alpha": 4})
    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for f in (path, str(peft)):
        with pytest.raises(ValueError, match="alpha= applies to diffusers LoRA files only"):
            load_adapter_file(m, f, alpha=16.0)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
