"""The plain-PyTorch references (the spec in code) against fp64 hand computations."""


import pytest
import torch
from helpers import assert_close_verbose, dense_asym_attention_fp64, rope_fp64

import wildactor_kernels as wk

LAYOUTS = [
    pytest.param(wk.TokenLayout((3, 4, 5)), id="no-refs"),
    pytest.param(wk.TokenLayout((2, 3, 4), [("face", 2, 2)]), id="one-face"),
    pytest.param(wk.TokenLayout((2, 3, 4), [("face", 2, 2), ("body", 3, 2), ("face", 1, 3),
                                            ("body", 2, 5), ("face", 3, 3)]), id="five-refs"),
    pytest.param(wk.TokenLayout((0, 0, 0), [("body", 2, 3)]), id="refs-only"),
]


def _positions_by_hand(layout, face_offset, body_offset, spatial_shift):
    T, Hg, Wg = layout.video
    rows = [(t, y, x) for t in range(T) for y in range(Hg) for x in range(Wg)]
    used = {"face": [0, 0], "body": [0, 0]}
    for kind, h, w in layout.refs:
        dt = face_offset if kind == "face" else body_offset
        y0, x0 = (Hg + used[kind][0], Wg + used[kind][1]) if spatial_shift else (0, 0)
        rows += [(T + dt, y0 + y, x0 + x) for y in range(h) for x in range(w)]
        used[kind][0] += h
        used[kind][1] += w
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("offsets,shift", [((1, 2), True), ((3, 7), True), ((1, 2), False)],
                         ids=["default", "offsets-3-7", "no-shift"])
def test_irope_positions_match_hand_layout(layout, offsets, shift):
    pos = wk.irope_positions(layout, face_offset=offsets[0], body_offset=offsets[1], spatial_shift=shift)
    assert pos.dtype == torch.int64 and pos.shape == (layout.num_tokens, 3)
    assert torch.equal(pos, _positions_by_hand(layout, *offsets, shift))


def test_reference_regions_share_no_row_or_column():
    layout = wk.TokenLayout((2, 3, 4), [("face", 2, 2), ("face", 3, 1), ("body", 2, 2), ("body", 1, 4)])
    pos = wk.irope_positions(layout)
    for kind in ("face", "body"):
        regions = [pos[s] for s, (k, _, _) in zip(layout.ref_slices(), layout.refs) if k == kind]
        for i in range(len(regions)):
            for j in range(i + 1, len(regions)):
                assert not set(regions[i][:, 1].tolist()) & set(regions[j][:, 1].tolist())
                assert not set(regions[i][:, 2].tolist()) & set(regions[j][:, 2].tolist())
    # reference tokens never share a (t, y, x) with a video token
    nv = layout.num_video
    video = {tuple(p) for p in pos[:nv].tolist()}
    assert not video & {tuple(p) for p in pos[nv:].tolist()}


@pytest.mark.parametrize("d", [8, 16, 24, 64, 128])
def test_axis_split_matches_wan(d):
    dt, dh, dw = wk.axis_dims(d)
    assert dh == dw == 2 * (d // 6) and dt + dh + dw == d and dt % 2 == 0
    if d == 128:
        assert (dt, dh, dw) == (44, 42, 42)


@pytest.mark.parametrize("d", [16, 24, 128])
def test_rope_tables_formula(d):
    layout = wk.TokenLayout((2, 3, 4), [("face", 2, 3), ("body", 1, 2)])
    pos = wk.irope_positions(layout)
    cos, sin = wk.rope_cos_sin(pos, d, theta=500.0)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (layout.num_tokens, d // 2)
    dims = wk.axis_dims(d)
    ang = []
    for n in range(pos.shape[0]):
        row = []
        for a, d_a in enumerate(dims):
            row += [pos[n, a].item() * 500.0 ** (-2 * i / d_a) for i in range(d_a // 2)]
        ang.append(row)
    ang = torch.tensor(ang, dtype=torch.float64)
    assert_close_verbose(cos, ang.cos(), atol=1e-6, name="cos")
    assert_close_verbose(sin, ang.sin(), atol=1e-6, name="sin")


def test_rope_without_refs_is_diffusers_wan_rope():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    d, (T, Hg, Wg) = 128, (3, 4, 5)
    emb = WanRotaryPosEmbed(d, (1, 2, 2), 1024)
    fc, fs = emb(torch.zeros(1, 4, T, 2 * Hg, 2 * Wg))
    cos, sin = wk.rope_cos_sin(wk.irope_positions(wk.TokenLayout((T, Hg, Wg))), d)
    # diffusers repeats each pair's angle twice (interleaved); ours stores one per pair
    assert_close_verbose(cos, fc[0, :, 0, 0::2].float(), atol=1e-6, name="cos")
    assert_close_verbose(sin, fs[0, :, 0, 1::2].float(), atol=1e-6, name="sin")
    assert diffusers is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS[:3])
def test_apply_rope_reference(layout, dtype):
    d = 24
    pos = wk.irope_positions(layout, face_offset=2, body_offset=5)
    cos, sin = wk.rope_cos_sin(pos, d)
    x = torch.randn(2, layout.num_tokens, 3, d).to(dtype)
    y = wk.apply_rope(x, cos, sin, backend="reference")
    assert y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert_close_verbose(y, rope_fp64(x, pos, d), atol=tol, rtol=tol)
    # the rotation is orthogonal: norms per pair are preserved
    assert_close_verbose(y.float().norm(dim=-1), x.float().norm(dim=-1), atol=tol * 10, rtol=tol)


def test_apply_rope_backward_is_inverse_rotation():
    layout = wk.TokenLayout((2, 2, 3), [("face", 2, 2)])
    cos, sin = wk.rope_cos_sin(wk.irope_positions(layout), 16)
    x = torch.randn(1, layout.num_tokens, 2, 16, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    (wk.apply_rope(x, cos.double(), sin.double(), backend="reference") * g).sum().backward()
    assert_close_verbose(x.grad, wk.apply_rope(g, cos.double(), -sin.double()), atol=1e-12)


@pytest.mark.parametrize("nv,nr", [(37, 11), (23, 0), (0, 19), (1, 1)], ids=lambda v: str(v))
@pytest.mark.parametrize("with_rope", [False, True], ids=["plain", "rope"])
def test_asym_attention_reference_fp64(nv, nr, with_rope):
    b, h, d = 2, 3, 24
    n = nv + nr
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64) for _ in range(3))
    cos = sin = None
    if with_rope:
        pos = torch.randint(0, 20, (n, 3))
        cos, sin = wk.rope_cos_sin(pos, d)
        cos, sin = cos.double(), sin.double()
        qr, kr = rope_fp64(q, pos, d), rope_fp64(k, pos, d)
    else:
        qr, kr = q, k
    out = wk.asym_attention(q, k, v, nv, cos, sin, backend="reference")
    assert_close_verbose(out, dense_asym_attention_fp64(qr, kr, v, nv), atol=1e-6, name="out")


def test_asym_attention_references_never_read_video():
    b, nv, nr, h, d = 1, 20, 9, 2, 16
    q, k, v = (torch.randn(b, nv + nr, h, d) for _ in range(3))
    out = wk.asym_attention(q, k, v, nv, backend="reference")
    k2, v2 = k.clone(), v.clone()
    k2[:, :nv] += 3.0
    v2[:, :nv] -= 2.0
    out2 = wk.asym_attention(q, k2, v2, nv, backend="reference")
    assert torch.equal(out[:, nv:], out2[:, nv:])
    assert not torch.allclose(out[:, :nv], out2[:, :nv])


def test_asym_attention_custom_scale_and_grad():
    b, nv, nr, h, d = 1, 9, 5, 2, 16
    q, k, v = (torch.randn(b, nv + nr, h, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = wk.asym_attention(q, k, v, nv, scale=0.3, backend="reference")
    assert_close_verbose(out, dense_asym_attention_fp64(q, k, v, nv, scale=0.3), atol=1e-10)
    nv = 3  # gradcheck is O(numel^2): a small problem
    q, k, v = (t[:, :5, :1, :8].detach().clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, bb, c: wk.asym_attention(a, bb, c, nv, backend="reference"), (q, k, v))


def test_cached_equals_joint_on_video_rows():
    b, nv, nr, h, d = 2, 30, 12, 2, 16
    layout_pos = torch.randint(0, 10, (nv + nr, 3))
    cos, sin = wk.rope_cos_sin(layout_pos, d)
    q, k, v = (torch.randn(b, nv + nr, h, d) for _ in range(3))
    joint = wk.asym_attention(q, k, v, nv, cos, sin, backend="reference")
    ref_k = wk.apply_rope(k[:, nv:], cos[nv:], sin[nv:], backend="reference")
    cached = wk.cached_asym_attention(q[:, :nv], k[:, :nv], v[:, :nv], ref_k, v[:, nv:],
                                      cos[:nv], sin[:nv], backend="reference")
    assert_close_verbose(cached, joint[:, :nv], atol=1e-5)


@pytest.mark.parametrize("nv,nr", [(37, 11), (64, 0), (0, 29)], ids=lambda v: str(v))
def test_ref_lora_linear_reference_fp64(nv, nr):
    b, din, dout, r, s = 2, 72, 40, 8, 0.5
    x = torch.randn(b, nv + nr, din, dtype=torch.float64)
    w, bias = torch.randn(dout, din, dtype=torch.float64), torch.randn(dout, dtype=torch.float64)
    a, bb = torch.randn(r, din, dtype=torch.float64), torch.randn(dout, r, dtype=torch.float64)
    y = wk.ref_lora_linear(x, w, bias, a, bb, s, nv, backend="reference")
    expected = torch.einsum("bnk,ok->bno", x, w) + bias
    expected[:, nv:] += s * x[:, nv:] @ a.T @ bb.T
    assert_close_verbose(y, expected, atol=1e-10)
    if nv:
        # video rows are exactly the base linear (no adapter term)
        assert_close_verbose(y[:, :nv], torch.nn.functional.linear(x[:, :nv], w, bias), atol=1e-12)


def test_ref_lora_linear_gradients():
    nv, nr, din, dout, r = 3, 2, 6, 5, 2
    x = torch.randn(1, nv + nr, din, dtype=torch.float64, requires_grad=True)
    w = torch.randn(dout, din, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(dout, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, din, dtype=torch.float64, requires_grad=True)
    bb = torch.randn(dout, r, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: wk.ref_lora_linear(*t, 0.7, nv, backend="reference"), (x, w, bias, a, bb))


def test_lora_grads_come_from_reference_rows_only():
    nv, nr, din, dout, r = 6, 3, 8, 5, 2
    x = torch.randn(1, nv + nr, din)
    w, a = torch.randn(dout, din), torch.randn(r, din, requires_grad=True)
    bb = torch.randn(dout, r, requires_grad=True)
    y = wk.ref_lora_linear(x, w, None, a, bb, 1.0, nv, backend="reference")
    y[:, :nv].sum().backward()  # a loss on video rows only
    assert torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(bb.grad) == 0
