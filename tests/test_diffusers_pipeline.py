"""diffusers interop (docs/design.md §11) on tiny random components built from configs, no downloads.

- WildActor itself is diffusers' ``WanPipeline`` transformer: same frames as diffusers' own
  ``WanTransformer3DModel`` with the same weights; references through ``attention_kwargs``.
- ``WildActorPipeline``: prompt + tagged reference images -> frames; shapes, seeding, cache on ==
  cache off, the text and the references really used, ``from_pretrained`` of a diffusers layout.
- ``patch_diffusers_wan``: diffusers' transformer with our self-attention gives its own output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from wildactor_kernels.model import Reference, WildActor, WildActorPipeline  # noqa: E402
from wildactor_kernels.model.diffusers_compat import (  # noqa: E402
    TransformerOutput,
    patch_diffusers_wan,
    unpatch_diffusers_wan,
)
from wildactor_kernels.model.pipeline import tiny_wan_components  # noqa: E402

PROMPT = "a woman walks in the rain"
SMALL = dict(height=32, width=48, num_frames=5, num_inference_steps=3, max_sequence_length=16)


@pytest.fixture(scope="module")
def comps():
    return tiny_wan_components(seed=0)


@pytest.fixture(scope="module")
def wa(comps):
    return WildActor.from_diffusers(comps["transformer"], lora_rank=4, backend="reference").eval()


def _refs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [("face", torch.rand(3, 40, 30, generator=g)), ("body", torch.rand(3, 50, 64, generator=g))]


def _lat_refs(seed=0, c=4):
    g = torch.Generator().manual_seed(seed)
    return [Reference("face", torch.randn(1, c, 1, 2, 4, generator=g)),
            Reference("body", torch.randn(1, c, 1, 4, 2, generator=g))]


def _randomize_adapters(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


# ================================================================== WildActor as WanPipeline's transformer
def test_config_dtype_device_cache_context(wa, comps):
    c, d = wa.config, comps["transformer"].config
    for key in ("patch_size", "in_channels", "out_channels", "num_attention_heads", "attention_head_dim",
                "text_dim", "freq_dim", "ffn_dim", "num_layers", "eps", "cross_attn_norm", "qk_norm"):
        assert tuple(c[key]) == tuple(d[key]) if key == "patch_size" else c[key] == d[key], key
        assert getattr(c, key) == c[key]
    assert dict(c)["in_channels"] == 4
    with pytest.raises(AttributeError, match="no field 'nope'"):
        c.nope  # noqa: B018
    with pytest.raises(AttributeError, match="read-only"):
        c.in_channels = 8
    assert wa.dtype == torch.float32 and wa.device.type == "cpu"
    with wa.cache_context("cond", step_index=0, sigma=1.0, num_inference_steps=3):
        pass


def test_forward_accepts_diffusers_keywords(wa, comps):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 2, 4, 6, generator=g), torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([700.0, 300.0])
    refs = _lat_refs()
    _randomize_adapters(wa)
    with torch.no_grad():
        ref = wa(x, t, ctx, refs=refs)
        out = wa(hidden_states=x, timestep=t, encoder_hidden_states=ctx, attention_kwargs={"refs": refs},
                 return_dict=True)
        assert isinstance(out, TransformerOutput)
        assert torch.equal(out.sample, ref) and torch.equal(out[0], ref)
        tup = wa(hidden_states=x, timestep=t, encoder_hidden_states=ctx, attention_kwargs={"refs": refs},
                 return_dict=False)
        assert isinstance(tup, tuple) and len(tup) == 1 and torch.equal(tup[0], ref)
        cache = wa.encode_references(refs)
        cached = wa(hidden_states=x, timestep=t, encoder_hidden_states=ctx,
                    attention_kwargs={"ref_cache": cache}, return_dict=False)[0]
        torch.testing.assert_close(cached, ref, atol=1e-5, rtol=0)
        plain = wa(hidden_states=x, timestep=t, encoder_hidden_states=ctx, attention_kwargs=None,
                   return_dict=False)[0]
        assert (plain - ref).abs().max() > 1e-3  # the references reached the model
        torch.testing.assert_close(plain, wa(x, t, ctx), atol=0, rtol=0)
        # a call in diffusers' names with no return_dict returns what diffusers' own model returns
        want = comps["transformer"](hidden_states=x, timestep=t, encoder_hidden_states=ctx)
        got = wa(hidden_states=x, timestep=t, encoder_hidden_states=ctx)
        assert type(want).__name__ == "Transformer2DModelOutput" and isinstance(got, TransformerOutput)
        assert torch.equal(got[0], plain) and (got.sample - want.sample).abs().max().item() <= 1e-4
        assert isinstance(wa(latents=x, timestep=t, encoder_hidden_states=ctx), TransformerOutput)
    with pytest.raises(ValueError, match=r"attention_kwargs keys \['scale'\]"):
        wa(hidden_states=x, timestep=t, encoder_hidden_states=ctx, attention_kwargs={"scale": 1.0})
    with pytest.raises(ValueError, match="latents or hidden_states"):
        wa(x, t, ctx, hidden_states=x)
    with pytest.raises(ValueError, match="refs given both"):
        wa(x, t, ctx, refs=refs, attention_kwargs={"refs": refs})
    with pytest.raises(ValueError, match="image-conditioned"):
        wa(x, t, ctx, encoder_hidden_states_image=ctx)
    with pytest.raises(TypeError, match="timestep"):
        wa(hidden_states=x, encoder_hidden_states=ctx)
    with torch.no_grad():
        for p in wa.trainable_parameters():
            if p.shape[1] == 4:  # lora_B back to zero: the shared fixture is a plain Wan again
                p.zero_()


def _wan_pipe(comps, transformer, scheduler=None):
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=comps["tokenizer"], text_encoder=comps["text_encoder"], vae=comps["vae"],
                       scheduler=scheduler or comps["scheduler"], transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _wan_frames(pipe, **kw):
    args = dict(prompt=PROMPT, negative_prompt="blue coat", guidance_scale=4.0, output_type="pt", **SMALL)
    args.update(kw)
    return pipe(generator=torch.Generator().manual_seed(1), **args).frames


@pytest.mark.parametrize("scheduler", ["flow_euler", "unipc"])
def test_wanpipeline_same_frames_as_diffusers_transformer(comps, scheduler):
    """WanPipeline(transformer=WildActor.from_diffusers(t)) == WanPipeline(transformer=t), fp32 <= 1e-4,
    with the flow-matching Euler scheduler and with UniPC (Wan's default)."""
    from diffusers import UniPCMultistepScheduler

    def sched():  # a fresh one per pipeline: UniPC keeps the previous model outputs
        if scheduler == "unipc":
            return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                           flow_shift=3.0)
        return comps["scheduler"]

    ours = WildActor.from_diffusers(comps["transformer"]).eval()
    want = _wan_frames(_wan_pipe(comps, comps["transformer"], sched()))
    got = _wan_frames(_wan_pipe(comps, ours, sched()))
    assert got.shape == want.shape == (1, 5, 3, 32, 48)
    assert (got - want).abs().max().item() <= 1e-4
    lat_want = _wan_frames(_wan_pipe(comps, comps["transformer"], sched()), output_type="latent")
    lat_got = _wan_frames(_wan_pipe(comps, ours, sched()), output_type="latent")
    assert (lat_got - lat_want).abs().max().item() <= 1e-4 and lat_want.std() > 0.1


def test_wanpipeline_two_stage_wan22(comps):
    """Wan2.2's two experts (transformer + transformer_2 split at boundary_ratio) work the same way."""
    from diffusers import WanPipeline

    second = tiny_wan_components(seed=7)["transformer"]

    def frames(t1, t2):
        p = WanPipeline(tokenizer=comps["tokenizer"], text_encoder=comps["text_encoder"], vae=comps["vae"],
                        scheduler=comps["scheduler"], transformer=t1, transformer_2=t2, boundary_ratio=0.5)
        p.set_progress_bar_config(disable=True)
        return _wan_frames(p, output_type="latent", num_inference_steps=4)

    want = frames(comps["transformer"], second)
    got = frames(WildActor.from_diffusers(comps["transformer"]), WildActor.from_diffusers(second))
    assert (got - want).abs().max().item() <= 1e-4
    assert (frames(comps["transformer"], comps["transformer"]) - want).abs().max() > 1e-3  # expert 2 ran


def test_wanpipeline_references_through_attention_kwargs(comps, wa):
    model = WildActor.from_diffusers(comps["transformer"], lora_rank=4).eval()
    _randomize_adapters(model)
    pipe = _wan_pipe(comps, model)
    refs = _lat_refs()
    plain = _wan_frames(pipe, output_type="latent")
    joint = _wan_frames(pipe, output_type="latent", attention_kwargs={"refs": refs})
    cached = _wan_frames(pipe, output_type="latent",
                         attention_kwargs={"ref_cache": model.encode_references(refs)})
    assert (joint - plain).abs().max() > 1e-3
    torch.testing.assert_close(cached, joint, atol=1e-4, rtol=0)


def test_wanpipeline_save_pretrained_keeps_the_wildactor(comps, tmp_path):
    """WanPipeline.save_pretrained writes the WildActor transformer (adapters included) and
    WanPipeline.from_pretrained / WildActorPipeline.from_pretrained give it back."""
    from diffusers import WanPipeline

    model = WildActor.from_diffusers(comps["transformer"], lora_rank=4).eval()
    _randomize_adapters(model)
    pipe = _wan_pipe(comps, model)
    pipe.save_pretrained(tmp_path / "wan")
    index = json.loads((tmp_path / "wan" / "model_index.json").read_text())
    assert index["transformer"] == ["wildactor_kernels.model.wildactor", "WildActor"]
    assert sorted(os.listdir(tmp_path / "wan" / "transformer")) == ["config.json", "model.safetensors"]
    loaded = WanPipeline.from_pretrained(tmp_path / "wan")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.transformer, WildActor) and loaded.transformer.cfg == model.cfg
    got_sd = loaded.transformer.state_dict()
    assert all(torch.equal(v, got_sd[k]) for k, v in model.state_dict().items())
    refs = _lat_refs()
    want = _wan_frames(pipe, output_type="latent", attention_kwargs={"refs": refs})
    assert torch.equal(_wan_frames(loaded, output_type="latent", attention_kwargs={"refs": refs}), want)
    ours = WildActorPipeline.from_pretrained(str(tmp_path / "wan"))
    assert all(torch.equal(v, ours.transformer.state_dict()[k]) for k, v in model.state_dict().items())
    half = WanPipeline.from_pretrained(tmp_path / "wan", dtype=torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16 and half.transformer.cfg == model.cfg
    with pytest.raises(ValueError, match="safetensors only"):
        pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(ValueError, match="disagree"):
        WildActor.from_pretrained(str(tmp_path / "wan" / "transformer"), dtype=torch.float32,
                                  torch_dtype=torch.bfloat16)
    # a pipeline built around diffusers' transformer, then given a WildActor (README's way for a
    # loaded checkpoint): its config follows, and so does what it saves
    swapped = _wan_pipe(comps, comps["transformer"])
    swapped.transformer = WildActor.from_diffusers(swapped.transformer)
    assert tuple(swapped.config["transformer"]) == ("wildactor_kernels.model.wildactor", "WildActor")
    swapped.save_pretrained(tmp_path / "swapped")
    assert isinstance(WanPipeline.from_pretrained(tmp_path / "swapped").transformer, WildActor)


def test_register_with_diffusers_when_diffusers_comes_later(comps, tmp_path):
    """Package imported before diffusers: register_with_diffusers() (or building a WildActor) enters
    WildActor in diffusers' loadable classes, and a fresh interpreter loads the saved pipeline."""
    _wan_pipe(comps, WildActor.from_diffusers(comps["transformer"])).save_pretrained(tmp_path / "wan")
    code = f"""
import sys
from wildactor_kernels.model import WildActor, register_with_diffusers
assert "diffusers" not in sys.modules
from diffusers import WanPipeline
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES
assert "wildactor_kernels.model" not in LOADABLE_CLASSES
register_with_diffusers()
register_with_diffusers()  # idempotent
assert LOADABLE_CLASSES["wildactor_kernels.model"] == {{"WildActor": ["save_pretrained", "from_pretrained"]}}
pipe = WanPipeline.from_pretrained({str(tmp_path / "wan")!r})
assert type(pipe.transformer).__name__ == "WildActor"
print("loaded")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ))
    assert p.returncode == 0 and "loaded" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]


# ============================================================================ WildActorPipeline
@pytest.fixture(scope="module")
def pipe(comps):
    model = WildActor.from_diffusers(comps["transformer"], lora_rank=4, backend="reference").eval()
    _randomize_adapters(model, seed=5)
    p = WildActorPipeline(model, comps["vae"], comps["text_encoder"], comps["tokenizer"], comps["scheduler"])
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, prompt=PROMPT, refs=None, seed=0, **kw):
    args = dict(SMALL, guidance_scale=4.0)
    args.update(kw)
    return pipe(prompt, _refs() if refs is None else refs, generator=torch.Generator().manual_seed(seed),
                **args).frames


def test_pipeline_shapes_and_output_types(pipe):
    pt = _run(pipe)
    assert pt.shape == (1, 5, 3, 32, 48) and pt.dtype == torch.float32
    assert 0.0 <= pt.min() and pt.max() <= 1.0 and pt.std() > 0.01
    lat = _run(pipe, output_type="latent")
    assert lat.shape == (1, 4, 2, 4, 6)
    np_frames = _run(pipe, output_type="np")
    assert np_frames.shape == (1, 5, 32, 48, 3)
    torch.testing.assert_close(torch.from_numpy(np_frames), pt.permute(0, 1, 3, 4, 2))
    pil = _run(pipe, output_type="pil", num_inference_steps=1)
    assert len(pil) == 1 and len(pil[0]) == 5 and pil[0][0].size == (48, 32)
    batch = _run(pipe, prompt=[PROMPT, "a man runs in the park"], output_type="latent")
    assert batch.shape == (2, 4, 2, 4, 6)


def test_pipeline_seeded_and_cache_on_equals_off(pipe):
    a, b = _run(pipe, output_type="latent"), _run(pipe, output_type="latent")
    assert torch.equal(a, b)
    assert (_run(pipe, output_type="latent", seed=1) - a).abs().max() > 1e-2
    off = _run(pipe, output_type="latent", use_ref_cache=False)
    torch.testing.assert_close(off, a, atol=1e-4, rtol=0)


def test_pipeline_uses_text_and_references(pipe):
    base = _run(pipe, output_type="latent")
    assert (_run(pipe, prompt="a man dances at night", output_type="latent") - base).abs().max() > 1e-3
    other_face = [("face", torch.rand(3, 40, 30, generator=torch.Generator().manual_seed(9))), _refs()[1]]
    assert (_run(pipe, refs=other_face, output_type="latent") - base).abs().max() > 1e-3
    assert (_run(pipe, refs=[], output_type="latent") - base).abs().max() > 1e-3
    # the tag matters: the same image as a body shot sits elsewhere in I-RoPE
    swapped = [("body", _refs()[0][1]), _refs()[1]]
    assert (_run(pipe, refs=swapped, output_type="latent") - base).abs().max() > 1e-5


def test_pipeline_reference_images_pil_and_tensor(pipe):
    from PIL import Image

    img = (_refs()[0][1].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    as_pil = pipe.encode_reference(Image.fromarray(img), "face", 32, 48)
    as_tensor = pipe.encode_reference(torch.from_numpy(img).permute(2, 0, 1).float() / 255, "face", 32, 48)
    assert as_pil.latent.shape == (1, 4, 1, 4, 6)
    torch.testing.assert_close(as_pil.latent, as_tensor.latent)
    with pytest.raises(ValueError, match="'face' or 'body'"):
        pipe("x", [("hand", img)], **SMALL)
    with pytest.raises(TypeError, match="PIL image or a float tensor"):
        pipe.encode_reference([1, 2], "face", 32, 48)
    with pytest.raises(ValueError, match="height must be a positive multiple of 16"):
        pipe("x", [], height=40, width=48, num_frames=5)
    with pytest.raises(ValueError, match="num_frames must be 4k"):
        pipe("x", [], height=32, width=48, num_frames=6)


def test_pipeline_prompt_embeds(pipe):
    """Text states given directly (no tokenizer run) give the frames the prompt gives."""
    base = _run(pipe, output_type="latent")
    emb = pipe.encode_prompt(PROMPT, SMALL["max_sequence_length"])
    neg = pipe.encode_prompt("", SMALL["max_sequence_length"])
    got = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, references=_refs(), guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="latent", **SMALL).frames
    assert torch.equal(got, base)
    with pytest.raises(ValueError, match="prompt or prompt_embeds"):
        pipe(PROMPT, prompt_embeds=emb, **SMALL)


def test_pipeline_progress_bar(pipe, capsys):
    pipe.set_progress_bar_config(disable=False)
    try:
        _run(pipe, output_type="latent", num_inference_steps=2)
    finally:
        pipe.set_progress_bar_config(disable=True)
    assert "2/2" in capsys.readouterr().err


def test_pipeline_from_pretrained_diffusers_layout(comps, pipe, tmp_path):
    root = tmp_path / "wan"
    comps["transformer"].save_pretrained(root / "transformer", safe_serialization=True)
    comps["vae"].save_pretrained(root / "vae", safe_serialization=True)
    comps["text_encoder"].save_pretrained(root / "text_encoder", safe_serialization=True)
    comps["tokenizer"].save_pretrained(root / "tokenizer")
    comps["scheduler"].save_pretrained(root / "scheduler")
    adapters = tmp_path / "adapters.safetensors"
    pipe.transformer.save_adapters(str(adapters))
    loaded = WildActorPipeline.from_pretrained(str(root), lora_rank=4, backend="reference")
    loaded.set_progress_bar_config(disable=True)
    report = loaded.load_adapters(str(adapters))
    assert report.format == "wildactor" and len(report.mapped) == 2 * 6
    torch.testing.assert_close(_run(loaded, output_type="latent"), _run(pipe, output_type="latent"),
                               atol=1e-5, rtol=0)
    # adapters given to from_pretrained: built with the file's rank (no lora_rank=), loaded, reported
    direct = WildActorPipeline.from_pretrained(str(root), adapters=str(adapters), backend="reference")
    direct.set_progress_bar_config(disable=True)
    assert direct.transformer.cfg.lora_rank == 4 and direct.adapter_report.format == "wildactor"
    assert torch.equal(_run(direct, output_type="latent"), _run(loaded, output_type="latent"))
    from safetensors.torch import save_file

    standin = tmp_path / "standin.safetensors"
    shapes = {"down": (8, 32), "up": (32, 8)}
    save_file({f"blocks.{i}.self_attn.{p}_loras.{h}.weight": torch.randn(*shapes[h])
               for i in range(2) for p in "qkv" for h in ("down", "up")}, str(standin))
    si = WildActorPipeline.from_pretrained(str(root), adapters=str(standin))
    assert si.transformer.cfg.lora_rank == 8 and si.transformer.cfg.ref_time == "before"
    assert si.adapter_report.format == "standin" and len(si.adapter_report.mapped) == 6
    # our own layout round-trips too (transformer/ as a WildActor folder), model_index.json included
    mine = tmp_path / "mine"
    pipe.save_pretrained(str(mine))
    assert json.loads((mine / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    again = WildActorPipeline.from_pretrained(str(mine))
    again.set_progress_bar_config(disable=True)
    assert torch.equal(_run(again, output_type="latent"), _run(pipe, output_type="latent"))
    # sharded diffusers weights (an index and several files), as the large Wan checkpoints ship
    from wildactor_kernels.model.pipeline import load_wan_transformer

    comps["transformer"].save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    assert os.path.exists(tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json")
    sharded = load_wan_transformer(str(tmp_path / "sharded"), lora_rank=4)
    want = comps["transformer"].state_dict()
    assert all(torch.equal(v, want[k]) for k, v in sharded.state_dict().items() if k in want)
    os.makedirs(root / "transformer_2")  # Wan2.2 A14B's second expert: refused, not silently dropped
    with pytest.raises(ValueError, match="two-expert"):
        WildActorPipeline.from_pretrained(str(root))
    os.rmdir(root / "transformer_2")
    os.remove(root / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        WildActorPipeline.from_pretrained(str(root))


# ============================================================================ patch_diffusers_wan
def test_patch_diffusers_wan_same_output(comps):
    t = comps["transformer"]
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 3, 4, 6, generator=g), torch.randn(2, 9, 32, generator=g)
    ts = torch.tensor([900.0, 120.0])
    with torch.no_grad():
        want = t(hidden_states=x, timestep=ts, encoder_hidden_states=ctx, return_dict=False)[0]
        patch_diffusers_wan(t, backend="reference")
        try:
            procs = {type(b.attn1.processor).__name__ for b in t.blocks}
            assert procs == {"FusedWanSelfAttnProcessor"}
            assert {type(b.attn2.processor).__name__ for b in t.blocks} == {"WanAttnProcessor"}
            got = t(hidden_states=x, timestep=ts, encoder_hidden_states=ctx, return_dict=False)[0]
            trit = patch_diffusers_wan(t, backend="triton")(hidden_states=x, timestep=ts,
                                                            encoder_hidden_states=ctx, return_dict=False)[0]
        finally:
            unpatch_diffusers_wan(t)
        assert {type(b.attn1.processor).__name__ for b in t.blocks} == {"WanAttnProcessor"}
        back = t(hidden_states=x, timestep=ts, encoder_hidden_states=ctx, return_dict=False)[0]
    assert (got - want).abs().max().item() <= 1e-5
    assert (trit - want).abs().max().item() <= 1e-5
    assert torch.equal(back, want)
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        patch_diffusers_wan(torch.nn.Linear(2, 2))
