"""``RefLoRALinear``: state-dict keys, backends under autograd, folded inference and its cache.

The module is what the WildActor model uses for self-attention q/k/v/o and both FFN linears,
so besides the op-level checks of ``test_lora_kernels.py`` this file checks what a model and a
training loop rely on: PEFT/diffusers key names, the Triton backend under autograd (a few
optimizer steps track the reference backend), and the folded mode (``W_ref = W + s B A``) that
must equal the unfolded one and must be rebuilt whenever the adapter or the weight changes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, assert_within_baseline

from wildactor_kernels.lora import RefLoRALinear
from wildactor_kernels.lora.module import folded_linear_torch
from wildactor_kernels.lora.reference import ref_lora_linear_ref

pytestmark = pytest.mark.usefixtures("nan_empty")

BACKENDS = [pytest.param("reference", id="reference"), pytest.param("triton", id="triton")]


def _layer(din=72, dout=200, rank=8, alpha=16.0, bias=True, backend="triton", dtype=torch.float32):
    m = RefLoRALinear(din, dout, bias=bias, rank=rank, alpha=alpha, backend=backend, device=DEVICE,
                      dtype=dtype)
    with torch.no_grad():  # a trained-looking adapter (lora_B starts at zero)
        m.lora_B.weight.normal_(0.0, 0.2)
    return m


# ----------------------------------------------------------------------------- state dict
def test_state_dict_keys_are_peft_and_diffusers_names():
    m = RefLoRALinear(72, 200, rank=8)
    assert list(m.state_dict()) == ["weight", "bias", "lora_A.weight", "lora_B.weight"]
    assert m.state_dict()["lora_A.weight"].shape == (8, 72)
    assert m.state_dict()["lora_B.weight"].shape == (200, 8)
    assert list(RefLoRALinear(72, 200, bias=False, rank=0).state_dict()) == ["weight"]


def test_loads_base_and_peft_checkpoints():
    base = torch.nn.Linear(72, 200)
    m = RefLoRALinear(72, 200, rank=4)
    missing, unexpected = m.load_state_dict(base.state_dict(), strict=False)
    assert sorted(missing) == ["lora_A.weight", "lora_B.weight"] and not unexpected
    x = torch.randn(2, 48, 72)
    torch.testing.assert_close(m(x, 37), base(x))  # lora_B = 0: no-op adapter
    peft = {"weight": base.weight, "bias": base.bias, "lora_A.weight": torch.randn(4, 72),
            "lora_B.weight": torch.randn(200, 4)}
    m.load_state_dict(peft)
    torch.testing.assert_close(m.lora_A.weight, peft["lora_A.weight"])


def test_plain_linear_paths():
    m = _layer()
    x = torch.randn(2, 48, 72, device=DEVICE)
    ref = F.linear(x, m.weight, m.bias)
    for nv in (None, 48):
        torch.testing.assert_close(m(x, nv), ref)
    m0 = RefLoRALinear(72, 200, rank=0, device=DEVICE)
    torch.testing.assert_close(m0(x, 10), F.linear(x, m0.weight, m0.bias))


# ----------------------------------------------------------------------------- row rules (issue 11)
@pytest.mark.parametrize("backend", BACKENDS)
def test_2d_input_is_one_sample(backend):
    """``[N, Din]`` with num_video is one sample: the adapter acts exactly as on ``[1, N, Din]``
    (it used to be dropped silently: a plain linear)."""
    m = _layer(din=8, dout=6, rank=2, backend=backend)
    x = torch.randn(6, 8, device=DEVICE)
    y2 = m(x, 2)
    y3 = m(x[None], 2)[0]
    torch.testing.assert_close(y2, y3, rtol=0, atol=0)
    assert (y2[2:] - F.linear(x[2:], m.weight, m.bias)).abs().max() > 1e-2  # the adapter acts
    torch.testing.assert_close(y2[:2], F.linear(x[:2], m.weight, m.bias))
    xg = x.clone().requires_grad_(True)
    m(xg, 2).sum().backward()
    assert xg.grad.shape == x.shape


@pytest.mark.parametrize("shape,nv,exc,match", [
    pytest.param((1, 1, 6, 8), 2, ValueError, r"x must be \[B, N, Din\] or \[N, Din\]", id="4d"),
    pytest.param((8,), 0, ValueError, r"x must be \[B, N, Din\] or \[N, Din\]", id="1d"),
    pytest.param((2, 6, 8), 7, ValueError, r"num_video must lie in \[0, N\] = \[0, 6\]", id="nv>N"),
    pytest.param((6, 8), 7, ValueError, r"num_video must lie in \[0, N\] = \[0, 6\]", id="2d-nv>N"),
    pytest.param((2, 6, 8), -1, ValueError, r"num_video must lie in \[0, N\]", id="nv<0"),
    pytest.param((2, 6, 8), "3", TypeError, "num_video must be an int, got str", id="nv-str"),
    pytest.param((2, 6, 8), 3.0, TypeError, "num_video must be an int", id="nv-float"),
    pytest.param((2, 6, 8), True, TypeError, "num_video must be an int", id="nv-bool"),
])
@pytest.mark.parametrize("rank", [0, 2])
def test_forward_rejects_what_it_cannot_place(shape, nv, exc, match, rank):
    """Rows are never guessed: other ranks of x and a num_video outside [0, N] raise (even for a
    rank-0 layer, so a model behaves the same with and without adapters)."""
    m = RefLoRALinear(8, 6, rank=rank, device=DEVICE)
    with pytest.raises(exc, match=match):
        m(torch.randn(*shape, device=DEVICE), nv)


def test_forward_x_type_and_plain_paths():
    m = RefLoRALinear(8, 6, rank=2, device=DEVICE)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        m([[0.0] * 8], 0)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        m(torch.zeros(2, 3, 8, dtype=torch.int64, device=DEVICE), 1)
    x4 = torch.randn(2, 3, 5, 8, device=DEVICE)  # num_video=None: nn.Linear's contract, any rank
    torch.testing.assert_close(m(x4), F.linear(x4, m.weight, m.bias))


@pytest.mark.parametrize("nv", [None, 2, 6], ids=["nv-None", "nv<N", "nv=N"])
@pytest.mark.parametrize("rank", [0, 2])
def test_forward_same_errors_on_every_path(nv, rank):
    """A wrong Din or dtype of x raises the same TypeError/ValueError naming x whichever path runs
    (the plain linear for num_video None or N used to raise a raw matmul RuntimeError, the
    adapted path a TypeError from the op)."""
    m = RefLoRALinear(8, 6, rank=rank, device=DEVICE)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., Din\] with Din = in_features = 8"):
        m(torch.randn(2, 6, 7, device=DEVICE), nv)
    with pytest.raises(TypeError, match=r"x must have the dtype of this layer's weight \(torch.float32\)"):
        m(torch.randn(2, 6, 8, device=DEVICE, dtype=torch.float16), nv)
    with pytest.raises(ValueError, match="x is on meta"):
        m(torch.randn(2, 6, 8, device="meta"), nv)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):  # autocast decides the dtypes: no error
        assert m(torch.randn(2, 6, 8, device=DEVICE, dtype=torch.float16), nv).shape == (2, 6, 6)


def test_forward_numpy_num_video_and_meta_layer():
    """A NumPy integer num_video is an int (never a float, never truncated); a layer built on
    meta runs on meta inputs (shapes only) on the reference path."""
    np = pytest.importorskip("numpy")
    m = _layer(din=8, dout=6, rank=2)
    x = torch.randn(2, 6, 8, device=DEVICE)
    torch.testing.assert_close(m(x, np.int64(2)), m(x, 2), rtol=0, atol=0)
    with pytest.raises(TypeError, match="num_video must be an int"):
        m(x, np.float64(2.0))
    with pytest.raises(TypeError, match="num_video must be an int"):
        m(x, np.bool_(True))
    mm = RefLoRALinear(8, 6, rank=2, backend="reference", device="meta")
    assert mm(torch.empty(2, 6, 8, device="meta"), 2).shape == (2, 6, 6)


# ----------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.float16, id="fp16")])
def test_triton_module_forward_backward(dtype):
    """All module grads (weight, bias, lora_A, lora_B) and dx vs reference backend and fp64."""
    m = _layer(din=40, dout=24, dtype=dtype)
    m_ref = copy.deepcopy(m)
    m_ref.backend = "reference"
    m_64 = copy.deepcopy(m).double()
    m_64.backend = "reference"
    x = torch.randn(2, 48, 40, device=DEVICE, dtype=dtype)
    dy = torch.randn(2, 48, 24, device=DEVICE, dtype=dtype)
    outs = []
    for mod, xx, g in ((m, x, dy), (m_ref, x, dy), (m_64, x.double(), dy.double())):
        xx = xx.clone().requires_grad_(True)
        y = mod(xx, 37)
        y.backward(g)
        outs.append([y, xx.grad] + [p.grad for p in mod.parameters()])
    names = ["y", "dx", "dweight", "dbias", "dlora_A", "dlora_B"]
    for name, k, r, t in zip(names, *outs):
        assert_within_baseline(k, r, t, name=name)


def test_triton_training_tracks_reference():
    """Five Adam steps on a frozen-base layer: the Triton backend follows the reference one."""
    torch.manual_seed(1)
    m = _layer(din=40, dout=24, rank=4)
    m.weight.requires_grad_(False)
    m.bias.requires_grad_(False)
    m_ref = copy.deepcopy(m)
    m_ref.backend = "reference"
    x = torch.randn(2, 30, 40, device=DEVICE)
    target = torch.randn(2, 30, 24, device=DEVICE)
    losses = {}
    for name, mod in (("triton", m), ("reference", m_ref)):
        opt = torch.optim.Adam([p for p in mod.parameters() if p.requires_grad], lr=1e-2)
        losses[name] = []
        for _ in range(5):
            opt.zero_grad()
            loss = F.mse_loss(mod(x, 21), target)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["triton"][-1] < losses["triton"][0]
    torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["reference"]),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.lora_A.weight, m_ref.lora_A.weight, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- folded mode
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bsz,nv,nr", [pytest.param(2, 37, 11, id="B2-v37-r11"),
                                       pytest.param(1, 0, 29, id="B1-v0-r29")])
def test_folded_equals_unfolded(backend, bsz, nv, nr):
    m = _layer(din=40, dout=24, backend=backend)
    x = torch.randn(bsz, nv + nr, 40, device=DEVICE)
    with torch.no_grad():
        m.fold_mode = "unfold"
        y_unfold = m(x, nv)
        m.fold_mode = "fold"
        y_fold = m(x, nv)
        y_64 = ref_lora_linear_ref(x.double(), m.weight.double(), m.bias.double(),
                                   m.lora_A.weight.double(), m.lora_B.weight.double(), m.scale, nv)
    assert m._fold_cache is not None
    assert_within_baseline(y_fold, y_unfold, y_64, name="folded")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fold_cache_follows_parameter_updates(backend):
    m = _layer(din=40, dout=24, backend=backend).fold()
    x = torch.randn(1, 48, 40, device=DEVICE)

    # a stale W_ref would be off by O(1); the tolerance only absorbs fold-vs-low-rank rounding
    def expect():
        return ref_lora_linear_ref(x, m.weight, m.bias, m.lora_A.weight, m.lora_B.weight, m.scale, 37)

    with torch.no_grad():
        torch.testing.assert_close(m(x, 37), expect(), rtol=1e-4, atol=1e-4)
        w_ref = m.folded_weight()
        assert m.folded_weight() is w_ref  # cached while nothing changes
        m(x, 37)
        assert m.folded_weight() is w_ref
        m.lora_B.weight.mul_(-2.0)  # in-place adapter update (an optimizer step does this)
        torch.testing.assert_close(m(x, 37), expect(), rtol=1e-4, atol=1e-4)
        assert m.folded_weight() is not w_ref
        m.weight.add_(0.1)  # base weight update
        torch.testing.assert_close(m(x, 37), expect(), rtol=1e-4, atol=1e-4)
        sd = {k: 0.1 * torch.randn_like(v) for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(m(x, 37), expect(), rtol=1e-4, atol=1e-4)
        m.alpha = 3.0  # the scale is part of the key
        torch.testing.assert_close(m(x, 37), expect(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("what", ["weight", "lora_A", "lora_B", "data"])
def test_fold_cache_survives_parameter_swap_on_reused_address(what):
    """A Parameter replaced by a new one that the allocator puts on the freed address, with the
    same version count, must not hit the cache (it used to return the stale W_ref)."""
    m = _layer(din=40, dout=24, backend="reference").fold()
    x = torch.randn(1, 48, 40, device=DEVICE)
    owner, name = {"weight": (m, "weight"), "lora_A": (m.lora_A, "weight"),
                   "lora_B": (m.lora_B, "weight"), "data": (m.lora_B, "weight")}[what]
    with torch.no_grad():
        m(x, 37)
        stale = m.folded_weight().clone()
        reused = False
        for _ in range(20):  # the caching allocator usually hands the freed block back at once
            old = getattr(owner, name)
            ptr, ver, shape = old.data_ptr(), old._version, old.shape
            new = torch.randn(shape, device=DEVICE) * 3.0 + 1.0
            del old
            if what == "data":  # free the old storage first, then give the Parameter new data
                owner.weight.data = torch.empty(0, device=DEVICE)
                owner.weight.data = torch.empty(shape, device=DEVICE)
                owner.weight.data.copy_(new)
            else:  # free the old Parameter first, then register a new one
                setattr(owner, name, None)
                setattr(owner, name, torch.nn.Parameter(torch.empty(shape, device=DEVICE)))
                getattr(owner, name).data.copy_(new)  # .data: no version bump, like a fresh tensor
            new_ptr_probe = getattr(owner, name).data_ptr()
            reused |= new_ptr_probe == ptr and getattr(owner, name)._version == ver
            expect = ref_lora_linear_ref(x, m.weight, m.bias, m.lora_A.weight, m.lora_B.weight,
                                         m.scale, 37)
            torch.testing.assert_close(m(x, 37), expect, rtol=1e-4, atol=1e-4)
            assert not torch.equal(m.folded_weight(), stale)
            stale = m.folded_weight().clone()
    if not reused:  # the assertions above held, but the dangerous case was never produced
        pytest.skip("the allocator never reused the freed address here")


def test_fold_cache_kept_while_nothing_changes():
    m = _layer(din=40, dout=24, backend="reference").fold()
    w_ref = m.folded_weight()
    m.lora_A.weight.requires_grad_(False)  # flags are not data
    assert m.folded_weight() is w_ref
    m.weight = m.weight  # assigning the same Parameter drops the cache (explicit invalidation)
    assert m._fold_cache is None


def test_fold_cache_after_optimizer_step():
    m = _layer(din=40, dout=24, backend="triton")
    m.weight.requires_grad_(False)
    x = torch.randn(1, 48, 40, device=DEVICE)
    opt = torch.optim.SGD([m.lora_A.weight, m.lora_B.weight], lr=0.5)
    m.fold_mode = "fold"
    with torch.no_grad():
        m(x, 37)
    m.fold_mode = "auto"  # training step: auto is unfolded while grads are needed
    m(x, 37).square().mean().backward()
    opt.step()
    m.fold_mode = "fold"
    with torch.no_grad():
        y = m(x, 37)
    y_ref = ref_lora_linear_ref(x, m.weight, m.bias, m.lora_A.weight, m.lora_B.weight, m.scale, 37)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_unfold_and_dtype_change_drop_cache():
    m = _layer(din=40, dout=24, backend="reference").fold()
    assert m._fold_cache is not None
    m.unfold()
    assert m.fold_mode == "unfold" and m._fold_cache is None
    m.fold()
    m.to(torch.float64)
    assert m._fold_cache is None
    with torch.no_grad():
        assert m(torch.randn(1, 48, 40, device=DEVICE, dtype=torch.float64), 37).dtype == torch.float64
    assert m._fold_cache[1].dtype == torch.float64


def test_auto_mode(monkeypatch):
    m = _layer(din=40, dout=24, backend="reference")
    x = torch.randn(1, 48, 40, device=DEVICE)
    assert m.fold_mode == "auto" and RefLoRALinear.AUTO_FOLD_INFERENCE is False
    with torch.no_grad():
        m(x, 37)
    assert m._fold_cache is None  # unmeasured: auto stays unfolded even in inference
    monkeypatch.setattr(RefLoRALinear, "AUTO_FOLD_INFERENCE", True)
    m(x, 37).sum().backward()  # training: grads needed -> unfolded
    assert m._fold_cache is None and m.lora_A.weight.grad is not None
    with torch.inference_mode():
        m(x, 37)
    assert m._fold_cache is not None


def test_fold_refuses_to_train_but_passes_dx():
    m = _layer(din=40, dout=24, backend="triton")
    m.fold_mode = "fold"
    x = torch.randn(2, 48, 40, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="cannot train"):
        m(x, 37)
    for p in (m.weight, m.lora_A.weight, m.lora_B.weight):
        p.requires_grad_(False)
    dy = torch.randn(2, 48, 24, device=DEVICE)
    m(x, 37).backward(dy)  # frozen adapter, grads of x and bias still flow
    dx, db = x.grad.clone(), m.bias.grad.clone()
    x.grad = m.bias.grad = None
    m.fold_mode = "unfold"
    m(x, 37).backward(dy)
    torch.testing.assert_close(dx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, m.bias.grad, rtol=1e-5, atol=1e-5)


def test_fold_mode_validation():
    m = _layer()
    with pytest.raises(ValueError, match="fold_mode"):
        m.fold_mode = "merge"
    with pytest.raises(RuntimeError, match="rank-0"):
        RefLoRALinear(8, 8, rank=0, device=DEVICE).folded_weight()
    assert "fold_mode='auto'" in repr(m)


@pytest.mark.parametrize("bias", [True, False])
def test_folded_linear_torch_inference_writes_every_row(bias):
    """The no-autograd path writes both GEMMs into one output (nan_empty catches a gap)."""
    x = torch.randn(3, 45, 40, device=DEVICE)
    w, w_ref = torch.randn(24, 40, device=DEVICE), torch.randn(24, 40, device=DEVICE)
    b = torch.randn(24, device=DEVICE) if bias else None
    with torch.no_grad():
        y = folded_linear_torch(x, w, w_ref, b, 5)
    expect = torch.cat([F.linear(x[:, :5], w, b), F.linear(x[:, 5:], w_ref, b)], 1)
    torch.testing.assert_close(y, expect)


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_bf16_module_fold_and_train(backend):
    m = _layer(din=512, dout=768, rank=32, backend=backend, dtype=torch.bfloat16)
    x = torch.randn(2, 700, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y_unfold = m.unfold()(x, 600)
        y_fold = m.fold()(x, 600)
        y_64 = ref_lora_linear_ref(x.double(), m.weight.double(), m.bias.double(),
                                   m.lora_A.weight.double(), m.lora_B.weight.double(), m.scale, 600)
    assert_within_baseline(y_fold, y_unfold, y_64, factor=3.0, name="folded bf16")
    m.fold_mode = "auto"
    m(x, 600).float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
