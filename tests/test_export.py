"""ONNX export (two graphs), the onnxruntime runner, FP8 Q/DQ structure, TensorRT entry points.

Numerics: onnxruntime on CPU against the PyTorch model in fp32 (max abs err <= 1e-3), with and
without references, through the reference cache, and at two video sizes through the same
graphs. TensorRT tests need tensorrt and a CUDA device and skip with the reason otherwise.
"""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx onnxscript)")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install onnxruntime)")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (torch.onnx's exporter needs it)")

from onnx import TensorProto  # noqa: E402
from wildactor_kernels.model import (  # noqa: E402
    FlowMatchSampler,
    OnnxWildActor,
    Reference,
    WildActor,
    WildActorConfig,
    export_onnx,
)
from wildactor_kernels.model import export as E  # noqa: E402
from wildactor_kernels.model.export import contract, passes  # noqa: E402
from wildactor_kernels.model.quant import sqnr_db  # noqa: E402

TOL = 1e-3


def _model(**overrides) -> WildActor:
    torch.manual_seed(0)
    m = WildActor(WildActorConfig.preset("tiny", **overrides)).eval()
    for mod in m.modules():  # trained-looking adapters, so the reference-only LoRA is exercised
        if getattr(mod, "lora_B", None) is not None:
            torch.nn.init.normal_(mod.lora_B.weight, std=0.05)
    return m


def _refs(c: int, spec, seed: int) -> list[Reference]:
    g = torch.Generator().manual_seed(seed)
    return [Reference(kind, torch.randn(1, c, 1, h, w, generator=g)) for kind, h, w in spec]


def _inputs(m: WildActor, b: int, t: int, h: int, w: int, text: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(b, m.cfg.in_channels, t, h, w, generator=g)
    ctx = torch.randn(b, text, m.cfg.text_dim, generator=g)
    ts = torch.linspace(50.0, 950.0, b)
    return lat, ts, ctx


@pytest.fixture(scope="module")
def model() -> WildActor:
    return _model()


@pytest.fixture(scope="module")
def fp32_export(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_fp32")
    start = time.perf_counter()
    res = export_onnx(model, out)
    return res, time.perf_counter() - start


@pytest.fixture(scope="module")
def runner(fp32_export) -> OnnxWildActor:
    return OnnxWildActor(fp32_export[0].out_dir)


@pytest.fixture(scope="module")
def fp8_fp32_export(tmp_path_factory):
    """FP8 on an fp32 base (executable by onnxruntime on CPU), decomposed attention, 1 layer."""
    m = _model(num_layers=1)
    res = export_onnx(m, tmp_path_factory.mktemp("onnx_fp8_fp32"), precision="fp8", fp8_base="fp32",
                      attention="decomposed")
    return m, res


@pytest.fixture(scope="module")
def fp8_bf16_export(tmp_path_factory):
    """The default FP8 export (bf16 base, the TensorRT deployment form), 1 layer."""
    m = _model(num_layers=1)
    return m, export_onnx(m, tmp_path_factory.mktemp("onnx_fp8_bf16"), precision="fp8")


# =========================================================================== export
def test_tiny_preset_exports_in_under_a_minute(fp32_export):
    res, seconds = fp32_export
    print(f"tiny export (both graphs, fp32, dynamic): {seconds:.1f} s")
    assert seconds < 60.0, f"tiny export took {seconds:.1f} s"
    assert res.reference_encoder.exists() and res.denoiser.exists()
    assert (res.out_dir / E.MANIFEST).exists()


@pytest.mark.parametrize("which", ["fp32", "fp8_fp32", "fp8_bf16"])
def test_onnx_checker_passes(which, request):
    res = request.getfixturevalue(f"{which}_export")
    res = res[0] if which == "fp32" else res[1]
    for path in (res.reference_encoder, res.denoiser):
        onnx.checker.check_model(str(path), full_check=True)  # strict type and shape inference


def test_io_names_axes_and_metadata(fp32_export, model):
    res, _ = fp32_export
    cfg = model.cfg
    man = json.loads((res.out_dir / E.MANIFEST).read_text())
    assert man["config"] == cfg.to_dict() and man["precision"] == "fp32" and man["opset"] == 23
    want = {
        E.ENCODER: {"ref_patches": ["batch", "num_ref", cfg.in_channels * 4],
                    "cos_r": ["num_ref", cfg.head_dim // 2], "sin_r": ["num_ref", cfg.head_dim // 2],
                    "ref_k": [cfg.num_layers, "batch", "num_ref", cfg.num_heads, cfg.head_dim],
                    "ref_v": [cfg.num_layers, "batch", "num_ref", cfg.num_heads, cfg.head_dim]},
        E.DENOISER: {"latents": ["batch", cfg.in_channels, "frames", "height", "width"],
                     "timestep": ["batch"], "context": ["batch", "text_len", cfg.text_dim],
                     "ref_k": [cfg.num_layers, "batch", "num_ref", cfg.num_heads, cfg.head_dim],
                     "ref_v": [cfg.num_layers, "batch", "num_ref", cfg.num_heads, cfg.head_dim],
                     "cos_v": ["num_video", cfg.head_dim // 2], "sin_v": ["num_video", cfg.head_dim // 2],
                     "velocity": ["batch", cfg.out_channels, "frames", "height", "width"]},
    }
    for gname, path in ((E.ENCODER, res.reference_encoder), (E.DENOISER, res.denoiser)):
        proto = onnx.load(str(path))
        vis = list(proto.graph.input) + list(proto.graph.output)
        got = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in vis}
        assert got == want[gname]
        assert all(vi.doc_string for vi in vis), "every input/output carries its documentation"
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["wildactor.graph"] == gname
        io = json.loads(meta["wildactor.io"])
        assert [r["name"] for r in io["inputs"]] == [vi.name for vi in proto.graph.input]
        assert man["graphs"][gname]["inputs"] == io["inputs"]
        ops = {n.op_type for n in proto.graph.node}
        assert "RMSNormalization" not in ops, "TensorRT 10 cannot import RMSNormalization"


def test_attention_form_is_reported(fp32_export, fp8_fp32_export):
    res, _ = fp32_export
    ops = {n.op_type for p in (res.reference_encoder, res.denoiser) for n in onnx.load(str(p)).graph.node}
    if E.ort_supports_attention():
        assert res.attention == "onnx" and "Attention" in ops
    else:  # the documented fallback, visible in the manifest
        assert res.attention == "decomposed" and res.manifest["notes"]
    _, res8 = fp8_fp32_export
    ops8 = {n.op_type for n in onnx.load(str(res8.denoiser)).graph.node}
    assert res8.attention == "decomposed" and "Attention" not in ops8 and "Softmax" in ops8


# =========================================================================== onnxruntime numerics
@pytest.mark.parametrize("path", ["refs", "no_refs", "onnx_cache", "torch_cache"])
def test_ort_matches_pytorch(path, model, runner):
    lat, ts, ctx = _inputs(model, 2, 2, 8, 8, 5, seed=1)
    refs = _refs(model.cfg.in_channels, [("face", 4, 4), ("body", 6, 4)], seed=2)
    with torch.no_grad():
        want = model(lat, ts, ctx, refs=None if path == "no_refs" else refs)
        if path == "refs":
            got = runner(lat, ts, ctx, refs=refs)
        elif path == "no_refs":
            got = runner(lat, ts, ctx)
        elif path == "onnx_cache":  # grid-free cache from the ONNX encoder, bound on use
            got = runner(lat, ts, ctx, ref_cache=runner.encode_references(refs))
        else:  # a cache from the PyTorch model feeds the ONNX denoiser
            got = runner(lat, ts, ctx, ref_cache=model.encode_references(refs))
    err = (got - want).abs().max().item()
    assert got.shape == want.shape and err <= TOL, f"{path}: max abs err {err:.3e}"


def test_same_graphs_at_a_second_video_size(model, runner):
    """Batch 1, 3 frames, 6x10 latents, 3 text tokens and three references of other sizes."""
    lat, ts, ctx = _inputs(model, 1, 3, 6, 10, 3, seed=3)
    refs = _refs(model.cfg.in_channels, [("face", 2, 2), ("body", 4, 6), ("face", 6, 2)], seed=4)
    with torch.no_grad():
        for r in (refs, None):
            want = model(lat, ts, ctx, refs=r)
            got = runner(lat, ts, ctx, refs=r)
            err = (got - want).abs().max().item()
            assert got.shape == (1, 4, 3, 6, 10) and err <= TOL, f"refs={r is not None}: {err:.3e}"


def test_reference_encoder_equals_model_cache(model, runner):
    refs = _refs(model.cfg.in_channels, [("body", 4, 4), ("face", 2, 4)], seed=5)
    for shape in (None, (1, 4, 2, 8, 8)):
        want = model.encode_references(refs, video_shape=shape)
        got = runner.encode_references(refs, video_shape=shape)
        assert got.refs == want.refs and tuple(got.video_grid) == tuple(want.video_grid)
        for a, b in zip(got.k + got.v, want.k + want.v):
            assert (a - b).abs().max().item() <= TOL


def test_one_cache_across_grids_and_caches_do_not_mix(model, runner):
    """A grid-free cache re-bound to each video size; a second cache is never served the first's K/V."""
    refs_a = _refs(model.cfg.in_channels, [("face", 4, 4)], seed=20)
    refs_b = _refs(model.cfg.in_channels, [("body", 2, 4), ("face", 2, 2)], seed=21)
    cache_a, cache_b = runner.encode_references(refs_a), runner.encode_references(refs_b)
    small, big = _inputs(model, 1, 1, 4, 4, 2, seed=22), _inputs(model, 2, 3, 6, 8, 4, seed=23)
    with torch.no_grad():
        for (lat, ts, ctx), refs, cache in ((small, refs_a, cache_a), (big, refs_a, cache_a),
                                            (big, refs_b, cache_b), (small, refs_a, cache_a)):
            want = model(lat, ts, ctx, refs=refs)
            assert (runner(lat, ts, ctx, ref_cache=cache) - want).abs().max().item() <= TOL


def test_sampler_runs_on_the_onnx_runner(model, runner):
    """FlowMatchSampler with CFG and the reference cache: same latents from ONNX and PyTorch."""
    refs = _refs(model.cfg.in_channels, [("face", 4, 4), ("body", 4, 6)], seed=6)
    ctx = torch.randn(1, 4, model.cfg.text_dim, generator=torch.Generator().manual_seed(7))
    s = FlowMatchSampler(num_steps=3, guidance_scale=4.0, progress=False)
    want = s.sample(model, (1, 4, 2, 8, 8), ctx, refs=refs, seed=0)
    got = s.sample(runner, (1, 4, 2, 8, 8), ctx, refs=refs, seed=0)
    assert (got - want).abs().max().item() <= TOL


def test_external_data_round_trip(fp32_export, model, runner, tmp_path):
    """Large models keep their weights in ``<graph>.onnx.data``; the graph still loads and runs."""
    res, _ = fp32_export
    proto = onnx.load(str(res.denoiser))
    path, nbytes = tmp_path / "denoiser.onnx", passes.initializer_bytes(proto)
    passes.save_model(proto, path, external=True)
    assert (tmp_path / "denoiser.onnx.data").stat().st_size > 0.9 * nbytes  # tensors < 1 KiB stay inline
    assert passes.initializer_bytes(onnx.load(str(path), load_external_data=False)) < 0.1 * nbytes
    onnx.checker.check_model(str(path))
    names = [i.name for i in proto.graph.input]
    ins = contract.graph_inputs(model, E.default_example(model.cfg, seed=9), torch.float32)[E.DENOISER]
    arrays = {n: t.numpy() for n, t in zip(names, ins)}
    a = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert (a.run(None, arrays)[0] == runner.sessions[E.DENOISER].run(None, arrays)[0]).all()


def test_fp16_export_within_twice_the_pytorch_fp16_error(tmp_path):
    """fp16 graph in onnxruntime vs the fp32 model: at most 2x the error of the PyTorch model
    run in fp16 (flash-attn's rule), 1 layer."""
    m = _model(num_layers=1)
    res = export_onnx(m, tmp_path, precision="fp16")
    assert res.manifest["compute_dtype"] == "float16"
    lat, ts, ctx = _inputs(m, 2, 2, 8, 8, 5, seed=17)
    refs = _refs(m.cfg.in_channels, [("face", 4, 4), ("body", 6, 4)], seed=18)
    m16 = copy.deepcopy(m).half()
    m16.set_backend("reference")
    with torch.no_grad():
        truth = m(lat, ts, ctx, refs=refs)
        base = m16(lat.half(), ts, ctx.half(), refs=[Reference(r.kind, r.latent.half()) for r in refs])
    got = OnnxWildActor(res.out_dir)(lat, ts, ctx, refs=refs)
    assert got.dtype == torch.float16
    e_onnx, e_torch = (got.float() - truth).abs().max().item(), (base.float() - truth).abs().max().item()
    assert e_onnx <= 2 * e_torch + 1e-4, f"onnx fp16 err {e_onnx:.2e} vs torch fp16 err {e_torch:.2e}"


# =========================================================================== FP8 Q/DQ
def _fp8_structure(m: WildActor, res, base: int) -> None:
    linears = passes.fp8_targets(m)
    for gname, path in ((E.ENCODER, res.reference_encoder), (E.DENOISER, res.denoiser)):
        proto = onnx.load(str(path))
        g = proto.graph
        inits = {i.name: i for i in g.initializer}
        q = [n for n in g.node if n.op_type == "QuantizeLinear"]
        dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
        quantized = res.manifest["graphs"][gname]["fp8"]["quantized"]
        # 1 layer: the encoder's only layer is its last, which needs just k and v; the denoiser
        # quantizes q, k, v, o of both attentions and both FFN linears
        assert len(quantized) == (2 if gname == E.ENCODER else 10)
        assert set(quantized) <= set(linears)
        assert len(q) == len(quantized) and len(dq) == 2 * len(quantized)
        producers = {o: n for n in g.node for o in n.output}
        for n in q:  # activations: per-tensor scale in the base type, float8 zero point 0
            scale, zp = inits[n.input[1]], inits[n.input[2]]
            assert list(scale.dims) == [] and scale.data_type == base
            assert zp.data_type == TensorProto.FLOAT8E4M3FN and set(zp.raw_data) <= {0}
        weight_dq = [n for n in dq if n.input[0] in inits]
        assert len(weight_dq) == len(quantized)
        for n in weight_dq:  # weights: FP8 initializers [Din, Dout], per-output-channel scales
            w, scale, zp = (inits[i] for i in n.input)
            assert w.data_type == TensorProto.FLOAT8E4M3FN and len(w.dims) == 2
            assert [a.i for a in n.attribute if a.name == "axis"] == [1]
            assert list(scale.dims) == [w.dims[1]] and scale.data_type == base
            assert zp.data_type == TensorProto.FLOAT8E4M3FN and list(zp.dims) == [w.dims[1]]
            assert set(zp.raw_data) <= {0}
        for n in g.node:  # each quantized MatMul reads two DequantizeLinear outputs
            if n.op_type == "MatMul" and n.input[1] in producers and producers[n.input[1]] in weight_dq:
                assert producers[n.input[0]].op_type == "DequantizeLinear"
        # no float copy of a quantized weight is left in the graph
        floats = [passes.to_torch(i).float() for i in g.initializer if len(i.dims) == 2
                  and i.data_type in (TensorProto.FLOAT, TensorProto.BFLOAT16)]
        for fqn in quantized:
            wt = linears[fqn].weight.detach().t().float()
            assert not any(f.shape == wt.shape and torch.allclose(f, wt, atol=1e-2) for f in floats), fqn


def test_fp8_qdq_structure_fp32_base(fp8_fp32_export):
    m, res = fp8_fp32_export
    _fp8_structure(m, res, TensorProto.FLOAT)


def test_fp8_qdq_structure_bf16_base(fp8_bf16_export):
    m, res = fp8_bf16_export
    assert res.manifest["compute_dtype"] == "bfloat16"
    _fp8_structure(m, res, TensorProto.BFLOAT16)
    with pytest.raises(TypeError, match="bfloat16"):
        OnnxWildActor(res.out_dir)  # onnxruntime's Python API cannot feed bf16: said plainly


def test_fp8_numerics_in_onnxruntime(fp8_fp32_export):
    """FP8 graph on CPU vs the fp32 PyTorch model: quantization visible, quality kept (SQNR)."""
    m, res = fp8_fp32_export
    r = OnnxWildActor(res.out_dir)
    lat, ts, ctx = _inputs(m, 2, 2, 8, 8, 5, seed=10)
    refs = _refs(m.cfg.in_channels, [("face", 4, 4), ("body", 6, 4)], seed=11)
    with torch.no_grad():
        want = m(lat, ts, ctx, refs=refs)
    got = r(lat, ts, ctx, refs=refs)
    q = sqnr_db(want, got)
    print(f"FP8 (static per-tensor activations, per-channel weights) vs fp32: SQNR {q:.1f} dB")
    assert 25.0 < q < 90.0


# =========================================================================== errors
def test_export_rejects_bad_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="precision"):
        export_onnx(model, tmp_path, precision="int4")
    with pytest.raises(ValueError, match="attention"):
        export_onnx(model, tmp_path, attention="flash")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path, opset=17)
    small = E.default_example(model.cfg, batch=1)
    with pytest.raises(ValueError, match="batch"):
        export_onnx(model, tmp_path, example=small)


def test_export_rejects_a_quantized_model(tmp_path):
    from wildactor_kernels.model import quantize_model

    m = quantize_model(_model(num_layers=1), "fp8")
    with pytest.raises(ValueError, match="float model"):
        export_onnx(m, tmp_path)


def test_runner_checks_inputs(model, runner):
    lat, ts, ctx = _inputs(model, 1, 2, 4, 4, 2, seed=12)
    refs = _refs(model.cfg.in_channels, [("face", 2, 2)], seed=13)
    with pytest.raises(ValueError, match="not both"):
        runner(lat, ts, ctx, refs=refs, ref_cache=runner.encode_references(refs))
    with pytest.raises(ValueError, match="latents"):
        runner(lat[:, :2], ts, ctx)
    with pytest.raises(ValueError, match="context"):
        runner(lat, ts, ctx[..., :3])
    with pytest.raises(ValueError, match="multiples"):
        runner(lat[..., :3], ts, ctx)


def test_patchify_matches_conv3d(model):
    refs = _refs(model.cfg.in_channels, [("face", 4, 6), ("body", 2, 2)], seed=14)
    patches, grids = E.patchify_references(refs, model.cfg.patch_size)
    conv = model.patch_embedding
    with torch.no_grad():
        got = torch.nn.functional.linear(patches, conv.weight.flatten(1), conv.bias)
        want, want_grids = model.embed_references(refs)
    assert grids == want_grids and (got - want).abs().max().item() < 1e-5


# =========================================================================== TensorRT
def test_engine_shapes_cover_the_profile(fp32_export):
    from wildactor_kernels.model.tensorrt import engine_shapes

    res, _ = fp32_export
    mn, opt, mx = engine_shapes(res.manifest, batch=(1, 2, 2), frames=(1, 3, 5), height=(4, 8, 16),
                                width=(4, 8, 16), text_len=(1, 5, 9), num_ref=(1, 10, 40))[E.DENOISER]
    assert mn["latents"] == (1, 4, 1, 4, 4) and mx["latents"] == (2, 4, 5, 16, 16)
    assert mn["cos_v"][0] == 1 * 2 * 2 and mx["cos_v"][0] == 5 * 8 * 8
    assert mn["ref_k"][2] == 0 and mx["ref_k"][2] == 40  # generation without references fits
    names = {vi.name for vi in onnx.load(str(res.denoiser)).graph.input}
    assert set(mn) == set(opt) == set(mx) == names


class _FakeTRT:
    """A stand-in for the ``tensorrt`` module that records what :func:`build_engine`
    asks of the TensorRT 10 API (the real package is not installable here). The network's inputs
    are the ONNX graph's inputs, dynamic axes as -1, as TensorRT's parser reports them."""

    __version__ = "10.14.0-fake"

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level):
            self.level = level

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 5

    class BuilderFlag:
        FP16, BF16, TF32 = "FP16", "BF16", "TF32"

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    def __init__(self):
        self.calls = {"flags": None, "parsed": None, "config_flags": set(), "profile": {},
                      "cleared": set(), "pool": None}
        rec = self.calls

        class _Input:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class _Network:
            inputs: list = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class _Parser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                rec["parsed"] = path
                g = onnx.load(path, load_external_data=False).graph
                self.network.inputs = [
                    _Input(vi.name, tuple(d.dim_value if d.HasField("dim_value") else -1
                                          for d in vi.type.tensor_type.shape.dim))
                    for vi in g.input]
                return True

        class _Profile:
            def set_shape(self, name, mn, opt, mx):
                rec["profile"][name] = (mn, opt, mx)

        class _Config:
            def set_memory_pool_limit(self, pool, size):
                rec["pool"] = (pool, size)

            def set_flag(self, f):
                rec["config_flags"].add(f)

            def clear_flag(self, f):
                rec["cleared"].add(f)

            def add_optimization_profile(self, p):
                rec["profile_added"] = True

        class _Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                rec["flags"] = flags
                return _Network()

            def create_builder_config(self):
                return _Config()

            def create_optimization_profile(self):
                return _Profile()

            def build_serialized_network(self, network, config):
                return b"fake-engine"

        self.Builder, self.OnnxParser = _Builder, _Parser


def test_build_engine_against_fake_tensorrt(fp32_export, fp8_bf16_export, tmp_path, monkeypatch):
    """Everything up to TensorRT itself: network typing, profiles for every dynamic input, errors."""
    import sys

    from wildactor_kernels.model.tensorrt import build_engine, engine_shapes

    res, _ = fp32_export
    mn, opt, mx = engine_shapes(res.manifest, frames=(1, 3, 5), height=(4, 8, 16), width=(4, 8, 16),
                                text_len=(1, 5, 9), num_ref=(1, 10, 40))[E.DENOISER]
    strongly = 1 << _FakeTRT.NetworkDefinitionCreationFlag.STRONGLY_TYPED

    fake = _FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    out = build_engine(res.denoiser, tmp_path / "d.engine", "fp16", mn, opt, mx, workspace_gb=1, log=None)
    assert out.read_bytes() == b"fake-engine"
    assert fake.calls["parsed"] == str(res.denoiser)
    assert fake.calls["flags"] == 0 and fake.calls["config_flags"] == {"FP16"}  # fp32 graph: weak typing
    names = {vi.name for vi in onnx.load(str(res.denoiser), load_external_data=False).graph.input}
    assert set(fake.calls["profile"]) == names  # every (dynamic) input has min/opt/max
    for name, (a, b, c) in fake.calls["profile"].items():
        assert all(x <= y <= z for x, y, z in zip(a, b, c)), name
    assert fake.calls["pool"] == ("WORKSPACE", 1 << 30)

    fake = _FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    build_engine(res.denoiser, tmp_path / "e.engine", "fp32", mn, opt, mx, tf32=False, log=None)
    assert fake.calls["flags"] == strongly and "TF32" in fake.calls["cleared"]

    m8, res8 = fp8_bf16_export
    mn8, opt8, mx8 = engine_shapes(res8.manifest, frames=(1, 3, 5), height=(4, 8, 16), width=(4, 8, 16),
                                   text_len=(1, 5, 9), num_ref=(1, 10, 40))[E.DENOISER]
    fake = _FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    build_engine(res8.denoiser, tmp_path / "f.engine", "fp8", mn8, opt8, mx8, log=None)
    assert fake.calls["flags"] == strongly and not fake.calls["config_flags"]  # FP8: strongly typed

    with pytest.raises(ValueError, match="no min/opt/max shapes for dynamic inputs"):
        build_engine(res.denoiser, tmp_path / "g.engine", "fp16", None, None, None, log=None)
    with pytest.raises(ValueError, match="FP8 engines need the Q/DQ graph"):
        build_engine(res.denoiser, tmp_path / "h.engine", "fp8", mn, opt, mx, log=None)


def test_tensorrt_missing_is_a_clear_error(fp32_export, tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed: the missing-package path cannot be exercised")
    from wildactor_kernels.model import TensorRTWildActor, build_engine

    res, _ = fp32_export
    with pytest.raises(ImportError, match="pip install tensorrt"):
        build_engine(res.denoiser, tmp_path / "d.engine", "fp32", {}, {}, {})
    with pytest.raises(ImportError, match="pip install tensorrt"):
        TensorRTWildActor(tmp_path)


def test_tensorrt_engines_match_pytorch(model, fp32_export, tmp_path):
    trt = pytest.importorskip("tensorrt", reason="tensorrt is not installed (TensorRT engine tests need it)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA device; this machine has none")
    from wildactor_kernels.model.tensorrt import TensorRTWildActor, build_engines

    res, _ = fp32_export
    src = res.out_dir
    major, minor = (int(x) for x in str(trt.__version__).split(".")[:2])
    if res.attention == "onnx" and (major, minor) < (10, 14):  # no Attention importer before 10.14
        src = export_onnx(model, tmp_path / "onnx", attention="decomposed").out_dir
    build_engines(src, tmp_path / "engines", precision="fp32", frames=(1, 2, 3), height=(4, 8, 8),
                  width=(4, 8, 10), text_len=(1, 5, 5), num_ref=(1, 16, 32), log=None)
    r = TensorRTWildActor(tmp_path / "engines")
    m = model.cuda()
    try:
        lat, ts, ctx = (t.cuda() for t in _inputs(model, 2, 2, 8, 8, 5, seed=15))
        refs = [Reference(x.kind, x.latent.cuda())
                for x in _refs(model.cfg.in_channels, [("face", 4, 4), ("body", 6, 4)], seed=16)]
        with torch.no_grad():
            for rr in (refs, None):
                want = m(lat, ts, ctx, refs=rr)
                got = r(lat, ts, ctx, refs=rr)
                assert (got.float() - want).abs().max().item() <= 1e-2  # TF32 allowed in fp32 layers
    finally:
        model.cpu()
