"""Weight loading is all or nothing (load_wan_state_dict, load_adapters, from_pretrained,
from_diffusers and the shared validator): every key, shape, dtype, type and device is checked
before the first parameter is written, so a failed load leaves the model bit-identical. Adapter
files carry their rank and lora_alpha, checked on load. CPU, tiny configs."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from wildactor_kernels.model import Reference, WildActor, WildActorConfig
from wildactor_kernels.model.weights import read_safetensors, validate_state_dict

TINY = WildActorConfig.preset("tiny", backend="reference")


def _model(cfg: WildActorConfig = TINY, seed: int = 0) -> WildActor:
    torch.manual_seed(seed)
    m = WildActor(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "lora_B" in name else 0.05))
    return m


def _snapshot(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _assert_unchanged(m: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    sd = m.state_dict()
    assert sd.keys() == snap.keys()
    for k, v in sd.items():
        w = snap[k]
        assert v.device == w.device and v.dtype == w.dtype and v.shape == w.shape, k
        if not v.is_meta:
            assert torch.equal(v, w), f"{k} was overwritten by a failed load"


def _other_weights() -> dict[str, torch.Tensor]:
    """A full, valid state dict that differs from ``_model()`` in every tensor (a partial
    write would show)."""
    return {k: v + 1.0 for k, v in _model(seed=1).state_dict().items()}


LAST = "proj_out.weight"  # a late key: most of the dict would be written before it


def _bad(kind: str, good: torch.Tensor):
    return {
        "int64": lambda: good.to(torch.int64),
        "bool": lambda: good > 0,
        "complex": lambda: good.to(torch.complex64),
        "numpy": lambda: good.numpy(),
        "list": lambda: good.tolist(),
        "None": lambda: None,
        "meta": lambda: good.to("meta"),
        "sparse": lambda: good.to_sparse(),
        "shape": lambda: good[:-1],
    }[kind]()


TYPE_ERRORS = ["int64", "bool", "complex", "numpy", "list", "None"]
VALUE_ERRORS = ["meta", "sparse", "shape"]


def _ordered(sd: dict[str, torch.Tensor], last: str) -> dict:
    """The same dict with ``last`` moved to the end (a loader walking it in order writes the rest first)."""
    out = {k: v for k, v in sd.items() if k != last}
    out[last] = sd[last]
    return out


# ============================================================================ load_wan_state_dict
@pytest.mark.parametrize("kind", TYPE_ERRORS + VALUE_ERRORS)
def test_bad_entry_leaves_model_unchanged(kind):
    m = _model()
    snap = _snapshot(m)
    sd = _other_weights()
    sd[LAST] = _bad(kind, sd[LAST])
    err = TypeError if kind in TYPE_ERRORS else ValueError
    with pytest.raises(err, match=LAST.replace(".", r"\.")):
        m.load_wan_state_dict(_ordered(sd, LAST))
    _assert_unchanged(m, snap)
    with pytest.raises(err):
        m.load_wan_state_dict(_ordered(sd, LAST), strict=False)
    _assert_unchanged(m, snap)


def test_every_bad_entry_is_listed():
    m = _model()
    sd = _other_weights()
    for k in ("patch_embedding.weight", "proj_out.weight", "blocks.1.ffn.net.2.weight"):
        sd[k] = sd[k].to(torch.int32)
    with pytest.raises(TypeError) as e:
        m.load_wan_state_dict(sd)
    msg = str(e.value)
    assert "3 bad entries" in msg and all(k in msg for k in ("patch_embedding.weight", "proj_out.weight",
                                                              "blocks.1.ffn.net.2.weight"))
    assert "int32" in msg and "nothing was loaded" in msg


@pytest.mark.parametrize("case", ["missing", "unexpected", "non-str key"])
def test_key_errors_leave_model_unchanged(case):
    m = _model()
    snap = _snapshot(m)
    sd = _other_weights()
    if case == "missing":
        del sd["blocks.1.attn2.to_k.weight"]
    elif case == "unexpected":
        sd["blocks.1.extra.weight"] = torch.zeros(3)
    else:
        sd[7] = torch.zeros(3)
    with pytest.raises(TypeError if case == "non-str key" else ValueError):
        m.load_wan_state_dict(sd)
    _assert_unchanged(m, snap)


def test_not_a_mapping():
    m = _model()
    snap = _snapshot(m)
    for bad in (None, [("proj_out.weight", torch.zeros(1))], "model.safetensors"):
        with pytest.raises(TypeError, match="mapping"):
            m.load_wan_state_dict(bad)
    _assert_unchanged(m, snap)


def test_good_load_still_casts_floats_and_loads():
    """Floating tensors of another precision are cast (fp64 -> fp32), as before."""
    m = _model()
    sd = {k: v.double() for k, v in _other_weights().items()}
    m.load_wan_state_dict(sd)
    for k, v in m.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, sd[k].float()), k


def test_meta_model_failed_load_stays_meta_and_strict_false_says_so():
    m = WildActor(TINY, device="meta")
    snap = _snapshot(m)
    sd = _other_weights()
    sd[LAST] = sd[LAST].to(torch.int64)
    with pytest.raises(TypeError):
        m.load_wan_state_dict(_ordered(sd, LAST))
    _assert_unchanged(m, snap)
    assert all(p.is_meta for p in m.parameters())
    # strict=False with backbone keys missing: those parameters would have no data
    sd = {k: v for k, v in _other_weights().items() if "attn2.to_v" not in k and "lora_" not in k}
    with pytest.raises(ValueError, match=r"meta.*\n.*attn2\.to_v"):
        m.load_wan_state_dict(sd, strict=False)
    assert all(p.is_meta for p in m.parameters())
    # a complete backbone loads (adapters get a fresh init), with strict=False too
    m.load_wan_state_dict({k: v for k, v in _other_weights().items() if "lora_" not in k}, strict=False)
    assert not any(p.is_meta for p in m.parameters())


# ============================================================================ validator
def test_validate_state_dict_rules():
    expected = {"w": torch.zeros(2, 3), "codes": torch.zeros(4, dtype=torch.int8), "fmt": "row"}
    ok = {"w": torch.ones(2, 3, dtype=torch.float16), "codes": torch.ones(4, dtype=torch.int8)}
    assert validate_state_dict(ok, expected) == ([], [])
    with pytest.raises(TypeError, match="codes"):  # a non-floating destination takes its own dtype only
        validate_state_dict({**ok, "codes": torch.ones(4)}, expected)
    with pytest.raises(TypeError, match="int8"):
        validate_state_dict({**ok, "w": torch.ones(2, 3, dtype=torch.int8)}, expected)
    with pytest.raises(ValueError, match="missing 1"):
        validate_state_dict({"w": ok["w"]}, expected)
    res = validate_state_dict({"w": ok["w"], "x": torch.ones(1)}, expected, strict=False)
    assert res.missing_keys == ["codes"] and res.unexpected_keys == ["x"]
    assert validate_state_dict({"w": ok["w"]}, expected, optional=lambda k: k == "codes") == ([], [])
    for bad in ({**ok, "w": ok["w"].to("meta")}, {**ok, "w": ok["w"].to_sparse()}):
        with pytest.raises(ValueError, match="w: "):
            validate_state_dict(bad, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_validate_state_dict_one_device_when_assigning():
    expected = {"a": torch.zeros(2), "b": torch.zeros(2)}
    sd = {"a": torch.ones(2), "b": torch.ones(2, device="cuda")}
    assert validate_state_dict(sd, expected) == ([], [])  # copies: any device
    with pytest.raises(ValueError, match="several devices"):
        validate_state_dict(sd, expected, assign=True)


# ============================================================================ adapters
def test_adapter_metadata_rank_and_alpha(tmp_path):
    cfg16 = TINY.replace(lora_alpha=16.0)
    src = _model(cfg16, seed=3)
    path = str(tmp_path / "a.safetensors")
    src.save_adapters(path)
    _, meta = read_safetensors(path)
    assert meta["lora_rank"] == "8" and float(meta["lora_alpha"]) == 16.0
    x, t, ctx = torch.randn(1, 4, 1, 4, 4), torch.tensor([400.0]), torch.randn(1, 3, 32)
    refs = [Reference("face", torch.randn(1, 4, 1, 4, 4))]
    with torch.no_grad():
        want = src(x, t, ctx, refs=refs)

    def fresh(cfg=TINY):  # the same backbone, other adapters
        m = _model(cfg, seed=4)
        m.load_wan_state_dict({k: v for k, v in src.state_dict().items() if "lora_" not in k})
        return m

    m8 = fresh()
    snap = _snapshot(m8)
    with pytest.raises(ValueError, match=r"lora_alpha=16.*lora_alpha=8"):
        m8.load_adapters(path)
    _assert_unchanged(m8, snap)
    with pytest.raises(ValueError, match="alpha must be one of"):
        m8.load_adapters(path, alpha="ignore")
    _assert_unchanged(m8, snap)
    # explicit: keep the model's alpha (scale 1): tensors load, outputs differ from the source
    m8.load_adapters(path, alpha="model")
    assert m8.cfg.lora_alpha is None and m8.blocks[0].attn1.to_q.scale == 1.0
    with torch.no_grad():
        assert (m8(x, t, ctx, refs=refs) - want).abs().max() > 1e-3
    # explicit: adopt the file's alpha: the outputs are the source model's
    m8 = fresh()
    m8.load_adapters(path, alpha="file")
    assert m8.cfg.lora_alpha == 16.0 and m8.blocks[1].ffn.net[2].scale == 2.0
    with torch.no_grad():
        assert torch.equal(m8(x, t, ctx, refs=refs), want)
    # the matching model loads with the default check
    m16 = fresh(cfg16)
    m16.load_adapters(path)
    with torch.no_grad():
        assert torch.equal(m16(x, t, ctx, refs=refs), want)


def test_adapter_file_without_alpha_warns(tmp_path, caplog):
    from safetensors.torch import save_file

    src = _model(seed=5)
    path = str(tmp_path / "peft.safetensors")
    save_file({k: v.contiguous() for k, v in src.adapter_state_dict().items()}, path)
    m = _model()
    with caplog.at_level(logging.WARNING, logger="wildactor_kernels.model.weights"):
        m.load_adapters(path)
    assert "lora_alpha" in caplog.text
    assert all(torch.equal(m.state_dict()[k], v) for k, v in src.adapter_state_dict().items())


@pytest.mark.parametrize("kind", ["int64", "shape", "non-adapter", "unexpected", "missing", "rank"])
def test_bad_adapter_file_leaves_model_unchanged(tmp_path, kind):
    from safetensors.torch import save_file

    src = _model(seed=6)
    sd = {k: v.contiguous() for k, v in src.adapter_state_dict().items()}
    last = sorted(sd)[-1]
    meta = {"lora_rank": "8", "lora_alpha": "8.0"}
    if kind in ("int64", "shape"):
        sd[last] = _bad(kind, sd[last]).contiguous()
    elif kind == "non-adapter":
        sd["proj_out.weight"] = torch.zeros(16, 64)
    elif kind == "unexpected":
        sd["blocks.5.attn1.to_q.lora_A.weight"] = torch.zeros(8, 64)
    elif kind == "missing":
        del sd[last]
    else:
        meta["lora_rank"] = "4"
    path = str(tmp_path / "a.safetensors")
    save_file(sd, path, metadata=meta)
    m = _model()
    snap = _snapshot(m)
    with pytest.raises(TypeError if kind == "int64" else ValueError):
        m.load_adapters(path)
    _assert_unchanged(m, snap)


def test_meta_model_adapters_missing_from_file(tmp_path):
    src = _model(seed=7)
    path = str(tmp_path / "a.safetensors")
    src.save_adapters(path)
    from safetensors.torch import load_file, save_file

    sd = load_file(path)
    del sd["blocks.0.attn1.to_q.lora_A.weight"]
    save_file(sd, path, metadata={"lora_rank": "8", "lora_alpha": "8.0"})
    m = WildActor(TINY, device="meta")
    with pytest.raises(ValueError, match="meta"):
        m.load_adapters(path, strict=False)
    assert all(p.is_meta for p in m.parameters())


# ============================================================================ files
def test_safetensors_errors_name_the_file(tmp_path):
    m = _model()
    snap = _snapshot(m)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ValueError, match="broken.safetensors"):
        m.load_adapters(str(bad))
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        m.load_adapters(str(tmp_path / "absent.safetensors"))
    _assert_unchanged(m, snap)
    # from_pretrained: a corrupt weights file, a corrupt config
    d = tmp_path / "ckpt"
    m.save_pretrained(str(d))
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        WildActor.from_pretrained(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        WildActor.from_pretrained(str(d))
    (d / "config.json").write_text(json.dumps({**m.cfg.to_dict(), "dim": -1}))
    with pytest.raises(ValueError, match="config.json"):
        WildActor.from_pretrained(str(d))


def test_from_pretrained_refuses_bad_tensors(tmp_path):
    from safetensors.torch import save_file

    m = _model()
    m.save_pretrained(str(tmp_path))
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    sd[LAST] = sd[LAST].to(torch.int32)
    save_file(sd, os.path.join(tmp_path, "model.safetensors"))
    with pytest.raises(TypeError, match=r"proj_out\.weight.*int32"):
        WildActor.from_pretrained(str(tmp_path))
    sd[LAST] = sd[LAST][:2].float().contiguous()
    save_file(sd, os.path.join(tmp_path, "model.safetensors"))
    with pytest.raises(ValueError, match=r"proj_out\.weight.*shape"):
        WildActor.from_pretrained(str(tmp_path))


def test_from_diffusers_refuses_bad_tensors():
    wan = _model(TINY.replace(lora_rank=0))
    wan.config = wan.cfg.to_diffusers_config()
    built = WildActor.from_diffusers(wan, lora_rank=8, backend="reference")
    sd = built.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in wan.state_dict().items())
    with torch.no_grad():
        wan.proj_out.weight = torch.nn.Parameter(wan.proj_out.weight.to(torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match=r"proj_out\.weight"):
        WildActor.from_diffusers(wan, lora_rank=8)
    with pytest.raises(TypeError, match="wan_model"):
        WildActor.from_diffusers(np.zeros(3))


# ============================================================================ load_quantized
def _fp8(seed: int):
    from wildactor_kernels.model.quant import quantize_model

    return quantize_model(_model(seed=seed), "fp8")


@pytest.mark.parametrize("kind", ["int64", "shape", "float-for-codes", "e5m2-codes", "missing", "unexpected"])
def test_load_quantized_bad_entry_leaves_model_unchanged(tmp_path, kind):
    """A bad entry late in the file fails before the first write (it used to fail after most of
    the state dict was overwritten); FP8 codes are never cast from another dtype."""
    from safetensors.torch import load_file, save_file
    from wildactor_kernels.model.quant import load_quantized, save_quantized

    path = str(tmp_path / "q.safetensors")
    save_quantized(_fp8(seed=3), path)
    sd = load_file(path)
    codes = "proj_out.weight" if sd["proj_out.weight"].dtype == torch.float8_e4m3fn else \
        "blocks.1.ffn.net.2.weight"
    assert sd[codes].dtype == torch.float8_e4m3fn
    if kind in ("int64", "shape"):
        sd[LAST] = _bad(kind, sd[LAST]).contiguous()
    elif kind == "float-for-codes":
        sd[codes] = sd[codes].float()
    elif kind == "e5m2-codes":
        sd[codes] = sd[codes].float().to(torch.float8_e5m2)
    elif kind == "missing":
        del sd[LAST]
    else:
        sd["blocks.1.extra.weight"] = torch.zeros(3)
    save_file(sd, path, metadata={"quantization_mode": "fp8", "format": "wildactor-quantized"})
    m = _fp8(seed=0)
    snap = _snapshot(m)
    err = TypeError if kind in ("int64", "float-for-codes", "e5m2-codes") else ValueError
    with pytest.raises(err, match=r"q\.safetensors"):
        load_quantized(m, path)
    _assert_unchanged(m, snap)


def test_load_quantized_file_errors_name_the_file(tmp_path):
    from wildactor_kernels.model.quant import load_quantized

    m = _fp8(seed=0)
    snap = _snapshot(m)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_quantized(m, str(bad))
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_quantized(m, str(tmp_path / "absent.safetensors"))
    _assert_unchanged(m, snap)


def test_load_quantized_refuses_a_meta_model(tmp_path):
    """Copying into meta tensors is a no-op: a meta-built model would have stayed without data."""
    from wildactor_kernels.model.quant import load_quantized, quantize_model, save_quantized

    path = str(tmp_path / "q.safetensors")
    save_quantized(_fp8(seed=3), path)
    m = quantize_model(WildActor(TINY, device="meta"), "fp8")
    with pytest.raises(ValueError, match="on meta"):
        load_quantized(m, path)
    assert all(p.is_meta for p in m.parameters())


def test_float_checkpoint_into_fp8_model_is_quantized_not_cast():
    """load_wan_state_dict of a float checkpoint into an FP8-quantized model quantizes each weight
    with its scale (as quantize_model does), strict or not; it used to cast the floats straight
    to codes and keep the old scales."""
    from wildactor_kernels.model.quant import quantize_model

    src = _model(seed=4)
    want = quantize_model(_model(seed=4), "fp8").state_dict()
    for strict in (True, False):
        m = _fp8(seed=0)
        m.load_wan_state_dict(src.state_dict(), strict=strict)
        got = m.state_dict()
        assert got.keys() == want.keys()
        for k, v in got.items():
            assert v.dtype == want[k].dtype and torch.equal(v.float(), want[k].float()), k


def test_meta_model_assigns_contiguous_parameters():
    """On a meta-built model the tensors become the parameters: an expanded (stride-0) or
    transposed view is made contiguous first, so an in-place update (an optimizer step) can
    write every parameter afterwards."""
    sd = _other_weights()
    sd["proj_out.bias"] = sd["proj_out.bias"][:1].expand_as(sd["proj_out.bias"])
    sd["proj_out.weight"] = sd["proj_out.weight"].t().contiguous().t()
    m = WildActor(TINY, device="meta")
    m.load_wan_state_dict(sd)
    for k, p in m.named_parameters():
        assert p.is_contiguous(), k
        assert torch.equal(p, sd[k]), k
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
