"""Rectified-flow sampler (Wan shift, CFG, reference cache) and the ``wildactor`` command."""

import pytest
import torch
from wildactor_kernels.model import FlowMatchSampler, Reference, WildActor, WildActorConfig
from wildactor_kernels.model.cli import main
from wildactor_kernels.model.sampler import shift_sigmas


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = WildActor(WildActorConfig.preset("tiny")).eval()
    for name, p in m.named_parameters():  # non-zero adapters and modulation: every path matters
        if "lora_B" in name or "scale_shift_table" in name:
            torch.nn.init.normal_(p, std=0.05)
    return m


def _inputs(m, b=1):
    g = torch.Generator().manual_seed(1)
    c = m.cfg.in_channels
    refs = [Reference("face", torch.randn(1, c, 1, 4, 4, generator=g)),
            Reference("body", torch.randn(1, c, 1, 6, 4, generator=g))]
    return refs, torch.randn(b, 5, m.cfg.text_dim, generator=g), (b, c, 2, 8, 8)


def test_shift_formula_and_schedule():
    s = FlowMatchSampler(num_steps=4, shift=3.0).sigmas()
    base = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    assert torch.allclose(s, 3.0 * base / (1 + 2.0 * base))
    assert s[0] == 1.0 and s[-1] == 0.0 and bool((s[1:] < s[:-1]).all())
    assert torch.equal(shift_sigmas(base, 1.0), base)


def test_reference_cache_encoded_once_and_equal_to_uncached(tiny, monkeypatch):
    refs, ctx, shape = _inputs(tiny)
    calls = {"encode": 0, "forward": 0}
    real_encode, real_forward = tiny.encode_references, tiny.forward

    def counting_encode(*a, **k):
        calls["encode"] += 1
        return real_encode(*a, **k)

    def counting_forward(*a, **k):
        calls["forward"] += 1
        return real_forward(*a, **k)

    monkeypatch.setattr(tiny, "encode_references", counting_encode)
    monkeypatch.setattr(tiny, "forward", counting_forward)
    sampler = FlowMatchSampler(num_steps=3, guidance_scale=4.0, progress=False)
    cached = sampler.sample(tiny, shape, ctx, refs=refs, seed=7)
    assert calls == {"encode": 1, "forward": 3}  # both CFG branches batched into one call per step
    uncached = FlowMatchSampler(num_steps=3, guidance_scale=4.0, use_ref_cache=False,
                                progress=False).sample(tiny, shape, ctx, refs=refs, seed=7)
    assert calls["encode"] == 1
    assert torch.isfinite(cached).all()
    assert (cached - uncached).abs().max().item() < 1e-4


def _run(m, shape, ctx, steps=2, guidance=5.0, **kw):
    sampler = FlowMatchSampler(num_steps=steps, guidance_scale=guidance, progress=False,
                               use_ref_cache=kw.pop("use_ref_cache", True))
    return sampler.sample(m, shape, ctx, **kw)


def test_seeded_and_guidance_matters(tiny):
    refs, ctx, shape = _inputs(tiny)
    a = _run(tiny, shape, ctx, refs=refs, seed=3)
    b = _run(tiny, shape, ctx, refs=refs, seed=3)
    c = _run(tiny, shape, ctx, guidance=1.0, refs=refs, seed=3)
    d = _run(tiny, shape, ctx, refs=refs, seed=4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, d)


def test_one_step_is_one_euler_step(tiny):
    _, ctx, shape = _inputs(tiny)
    noise = torch.randn(shape)
    out = _run(tiny, None, ctx, steps=1, guidance=1.0, noise=noise)
    with torch.no_grad():
        v = tiny(noise, torch.tensor([1000.0]), ctx)
    assert torch.allclose(out, noise - v, atol=1e-6)  # sigma 1 -> 0: x0 = x1 - v


def test_batch_two_with_batch_one_references(tiny):
    refs, ctx, shape = _inputs(tiny, b=2)
    out = _run(tiny, shape, ctx, guidance=3.0, refs=refs)
    out_nc = _run(tiny, shape, ctx, guidance=3.0, refs=refs, use_ref_cache=False)
    assert out.shape == shape and (out - out_nc).abs().max().item() < 1e-4


def test_sampler_errors(tiny):
    with pytest.raises(ValueError, match="context"):
        FlowMatchSampler(progress=False).sample(tiny, (1, 4, 1, 4, 4), None)
    with pytest.raises(ValueError, match="num_steps"):
        FlowMatchSampler(num_steps=0).sigmas()


def test_cli_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out and "bitsandbytes" in out


def test_cli_demo_agrees(capsys):
    assert main(["demo", "--steps", "2", "--frames", "2", "--height", "8", "--width", "8",
                 "--no-progress", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "with reference cache" in out and "without cache" in out and "OK" in out
    # timings are medians after a warm-up, and the diff line says what it compares
    assert "median of 2 runs after one warm-up run of each path" in out
    assert "max |uncached - cached| over the final latents" in out
    assert "PyTorch reference ops on cpu, float32" in out  # what actually ran


def test_cli_demo_fails_on_disagreement(capsys):
    # a negative tolerance can never be met: the demo must then exit non-zero
    assert main(["demo", "--steps", "1", "--frames", "1", "--height", "4", "--width", "4",
                 "--no-progress", "--tol", "-1", "--repeats", "1"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_progress_bar_is_left_in_place(tiny, capsys):
    refs, ctx, shape = _inputs(tiny)
    FlowMatchSampler(num_steps=3, guidance_scale=1.0, progress_desc="sampling test").sample(
        tiny, shape, ctx, refs=refs)
    err = capsys.readouterr().err
    assert "sampling test" in err and "3/3" in err
    # leave=True ends the bar with a newline; a bar that is removed ends by clearing its line
    assert err.endswith("\n") and not err.rstrip("\n").endswith("\r")
    FlowMatchSampler(num_steps=2, guidance_scale=1.0, progress=False).sample(tiny, shape, ctx)
    assert capsys.readouterr().err == ""
