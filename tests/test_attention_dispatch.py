"""The measured attention dispatcher (``attention/dispatch.py``, docs/design.md §9).

A fake timing table selects each backend in turn (the pure rule and the real CUDA path with a
pretend device); each backend that can run on the CPU (our kernels under the interpreter, SDPA's
math backend) agrees with the reference, joint and cached, with rotation, gradients included; an
unmeasured case falls back to our kernel and says so (a warning, once, and the report's source);
CPU ``auto`` stays the reference.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from helpers import DEVICE, assert_close_verbose

import wildactor_kernels as wk
from wildactor_kernels import _utils
from wildactor_kernels.attention import dispatch

pytestmark = pytest.mark.usefixtures("nan_empty")

CASE = dict(device="FakeGPU H100", dtype="bf16", head_dim=128, mode="joint")


def _table(times: dict[str, float], **case) -> dict:
    entry = dict(CASE, **case)
    entry.update(times_ms=times, shape="wan5b-720p", source="test", date="2026-01-01")
    return {"version": 1, "entries": [entry]}


ALL = {name: True for name in dispatch.BACKEND_NAMES}


@pytest.mark.parametrize("winner", dispatch.BACKEND_NAMES)
def test_fake_table_selects_each_backend(winner):
    times = {name: 10.0 + i for i, name in enumerate(dispatch.BACKEND_NAMES)}
    times[winner] = 1.0
    name, source = dispatch.choose(CASE["device"], "bf16", 128, "joint", ALL, _table(times))
    assert name == winner
    assert source.startswith("measured:") and f"{winner} 1.000 ms" in source and "wan5b-720p" in source


def test_unavailable_winner_is_skipped():
    times = {"fa3": 1.0, "sdpa-cudnn": 2.0, "triton": 3.0}
    avail = dict(ALL, fa3=False)
    assert dispatch.choose(CASE["device"], "bf16", 128, "joint", avail, _table(times))[0] == "sdpa-cudnn"


@pytest.mark.parametrize("case", [dict(device="Other GPU"), dict(dtype="fp16"), dict(head_dim=64),
                                  dict(mode="cached")], ids=["device", "dtype", "head_dim", "mode"])
def test_unmeasured_case_falls_back_to_our_kernel(case):
    """Any field of the key that differs is a different case: our kernel, marked unmeasured."""
    key = dict(CASE, **case)
    name, source = dispatch.choose(key["device"], key["dtype"], key["head_dim"], key["mode"], ALL,
                                   _table({"sdpa-cudnn": 1.0}), default="triton-hopper")
    assert name == "triton-hopper" and source.startswith("unmeasured:")


@pytest.fixture
def fake_cuda(monkeypatch):
    """The real CUDA decision path (``_pick``) with a pretend sm_90 device named like the table."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: CASE["device"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(_utils, "_warned_once", set())
    dispatch._static_available.cache_clear()
    yield
    dispatch._static_available.cache_clear()


@pytest.mark.parametrize("winner", ["triton", "triton-hopper", "sdpa-cudnn", "sdpa-flash"])
def test_pick_follows_the_table(winner, fake_cuda, monkeypatch):
    times = {"triton": 5.0, "triton-hopper": 4.0, "sdpa-cudnn": 4.5, "sdpa-flash": 6.0}
    times[winner] = 1.0
    monkeypatch.setattr(dispatch, "load_table", lambda *a: _table(times))
    assert dispatch._pick(0, "bf16", 128, "joint", True) == winner


def test_pick_hopper_needs_its_layout(fake_cuda, monkeypatch):
    monkeypatch.setattr(dispatch, "load_table", lambda *a: _table({"triton-hopper": 1.0, "triton": 2.0}))
    assert dispatch._pick(0, "bf16", 128, "joint", False) == "triton"
    assert dispatch._pick(0, "bf16", 96, "joint", True) == "triton"  # Hopper kernel: D 64/128 only


def test_unmeasured_pick_is_visible(fake_cuda, monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "load_table", lambda *a: {"version": 1, "entries": []})
    with caplog.at_level(logging.WARNING, logger="wildactor_kernels"):
        assert dispatch._pick(0, "bf16", 128, "joint", True) == "triton-hopper"
        assert dispatch._pick(0, "bf16", 128, "joint", True) == "triton-hopper"
        assert dispatch._pick(0, "bf16", 128, "cached", False) == "triton"
    msgs = [r.getMessage() for r in caplog.records if "auto backend" in r.getMessage()]
    assert len(msgs) == 2, msgs  # once per case
    assert "unmeasured" in msgs[0] and "triton-hopper" in msgs[0]


def test_attention_backends_report(fake_cuda, monkeypatch):
    table = _table({"sdpa-cudnn": 1.0, "triton": 2.0})
    report = wk.attention_backends(device="cuda", table=table)
    assert report["device"] == CASE["device"] and report["available"]["sdpa-math"]
    picks = {(p["dtype"], p["head_dim"], p["mode"]): p for p in report["picks"]}
    assert picks[("bf16", 128, "joint")]["backend"] == "sdpa-cudnn"
    assert picks[("bf16", 128, "joint")]["source"].startswith("measured:")
    assert picks[("bf16", 128, "joint-train")]["source"].startswith("unmeasured:")
    assert picks[("fp16", 64, "cached")]["backend"] in ("triton", "triton-hopper")
    assert "concatenates" in report["notes"]["sdpa-cudnn"]
    assert "in place" in report["notes"]["triton"]


def test_attention_backends_on_cpu_is_reference():
    report = wk.attention_backends(device="cpu")
    assert {p["backend"] for p in report["picks"]} == {"reference"}
    q = torch.randn(1, 5, 1, 64)
    assert dispatch.pick_backend(q, "joint") == "reference"


def test_table_round_trip(tmp_path):
    path = str(tmp_path / "table.json")
    row = dict(CASE, times_ms={"triton": 2.0, "sdpa-cudnn": 1.5}, shape="s", source="t", date="d")
    dispatch.write_table_entries([row], path)
    dispatch.write_table_entries([dict(row, times_ms={"triton": 1.0, "sdpa-cudnn": 1.5})], path)
    table = dispatch.load_table(path)
    assert len(table["entries"]) == 1
    assert dispatch.choose(CASE["device"], "bf16", 128, "joint", ALL, table)[0] == "triton"


def test_committed_table_is_valid():
    with open(dispatch.TABLE_PATH, encoding="utf-8") as f:
        table = json.load(f)
    for e in table["entries"]:
        assert e["mode"] in dispatch.MODES and e["dtype"] in ("fp16", "bf16", "fp32")
        assert set(e["times_ms"]) <= set(dispatch.BACKEND_NAMES), e


# =========================================================================== each backend runs
CPU_RUNNABLE = ["triton", "triton-hopper", "sdpa-math"]


def _rope(n, d):
    layout = wk.TokenLayout((1, 1, n))
    return wk.rope_cos_sin(wk.irope_positions(layout).to(DEVICE), d)


@pytest.mark.parametrize("name", CPU_RUNNABLE)
@pytest.mark.parametrize("rope", [False, True], ids=["norope", "rope"])
def test_backend_agrees_with_reference_joint(name, rope):
    b, nv, nr, h, d = 2, 37, 11, 2, 64
    cos, sin = _rope(nv + nr, d) if rope else (None, None)
    base = torch.randn(b, nv + nr, 3, h, d, device=DEVICE)
    qkv = base.clone().requires_grad_()
    out = dispatch.run_backend(name, *qkv.unbind(2), nv, cos, sin)
    ref_in = base.clone().requires_grad_()
    ref = wk.asym_attention(*ref_in.unbind(2), nv, cos, sin, backend="reference")
    assert out.shape == ref.shape and out.is_contiguous()
    assert_close_verbose(out, ref, atol=2e-5, rtol=1e-4, name=f"{name} out")
    do = torch.randn_like(ref)
    (g,) = torch.autograd.grad(out, qkv, do)
    (rg,) = torch.autograd.grad(ref, ref_in, do)
    assert_close_verbose(g, rg, atol=5e-5, rtol=1e-4, name=f"{name} grad")


@pytest.mark.parametrize("name", CPU_RUNNABLE)
@pytest.mark.parametrize("nr", [0, 29])
def test_backend_agrees_with_reference_cached(name, nr):
    b, nv, h, d = 1, 37, 2, 64
    cos, sin = _rope(nv, d)
    ts = [torch.randn(b, n, h, d, device=DEVICE) for n in (nv, nv, nv, nr, nr)]
    ins = [t.clone().requires_grad_() for t in ts]
    out = dispatch.run_cached_backend(name, *ins, cos, sin)
    r_in = [t.clone().requires_grad_() for t in ts]
    ref = wk.cached_asym_attention(*r_in, cos, sin, backend="reference")
    assert_close_verbose(out, ref, atol=2e-5, rtol=1e-4, name=f"{name} out")
    do = torch.randn_like(ref)
    for g, rg, nm in zip(torch.autograd.grad(out, ins, do), torch.autograd.grad(ref, r_in, do),
                         ("q_v", "k_v", "v_v", "ref_k", "ref_v")):
        assert_close_verbose(g, rg, atol=5e-5, rtol=1e-4, name=f"{name} d{nm}")


def test_sdpa_math_half_precision():
    """The two-call SDPA composition on strided views in fp16 (no input concatenation)."""
    q, k, v = torch.randn(1, 48, 3, 2, 64, device=DEVICE).half().unbind(2)
    out = dispatch.run_backend("sdpa-math", q, k, v, 37)
    ref = wk.asym_attention(q.float(), k.float(), v.float(), 37, backend="reference")
    assert out.dtype == torch.float16
    assert_close_verbose(out.float(), ref, atol=2e-3, rtol=0, name="sdpa-math fp16")


def test_unknown_backend_name():
    q = torch.randn(1, 5, 1, 64)
    with pytest.raises(ValueError, match="backend name must be one of"):
        dispatch.run_backend("cudnn", q, q, q, 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        dispatch.pick_backend(q, "train")


@pytest.mark.gpu
def test_auto_on_cuda_matches_reference():
    q, k, v = (torch.randn(1, 300, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o = wk.asym_attention(q, k, v, 200)
    ref = wk.asym_attention(q.float(), k.float(), v.float(), 200, backend="reference")
    assert (o.float() - ref).abs().max().item() < 2e-2
    report = wk.attention_backends()
    assert report["device"] == torch.cuda.get_device_name()


def test_benchmark_rows_become_table_entries(tmp_path):
    """bench_attention.py --write-table: dispatcher rows summed over shapes, a candidate that
    failed on one shape left out, and the table then picks the fastest."""
    from benchmarks import bench_attention as bench

    def row(shape, impl, ms, status="ok"):
        return dict(op="dispatch", mode="joint", shape=shape, impl=impl, dtype="bf16", D=128,
                    ms=ms, status=status)

    rows = [row("a", "triton", 2.0), row("b", "triton", 2.0), row("a", "sdpa-cudnn", 1.0),
            row("b", "sdpa-cudnn", 3.5), row("a", "fa3", 0.5), row("b", "fa3", None, "failed"),
            dict(op="joint", mode="fwd", shape="a", impl="auto", status="ok", ms=1.0)]
    env = {"gpu": "FakeGPU", "date_utc": "2026-01-01", "torch": "x", "triton": "y"}
    (entry,) = bench.table_entries(rows, env)
    assert entry["times_ms"] == {"triton": 4.0, "sdpa-cudnn": 4.5} and entry["shape"] == "a+b"
    path = str(tmp_path / "t.json")
    dispatch.write_table_entries([entry], path)
    assert dispatch.choose("FakeGPU", "bf16", 128, "joint", ALL, dispatch.load_table(path))[0] == "triton"
    assert bench._parse(["--write-table"]).ops == ["joint", "cached", "dispatch"]


def test_unmeasured_default_switch(fake_cuda, monkeypatch):
    monkeypatch.setattr(dispatch, "load_table", lambda *a: {"version": 1, "entries": []})
    monkeypatch.setattr(dispatch, "UNMEASURED_PREFERS_HOPPER", False)
    assert dispatch._pick(0, "bf16", 128, "joint", True) == "triton"


def test_pick_is_a_compile_time_constant(fake_cuda, monkeypatch):
    """Under torch.compile(fullgraph=True) the decision is made at trace time: no graph break."""
    monkeypatch.setattr(dispatch, "load_table", lambda *a: _table({"sdpa-cudnn": 1.0, "triton": 2.0}))

    def f(x):
        name = dispatch._pick(0, "bf16", 128, "joint", dispatch._hopper_layout_ok(x, x, x))
        return x * (2.0 if name == "sdpa-cudnn" else 3.0)

    x = torch.ones(1, 8, 2, 128, dtype=torch.bfloat16)
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="eager")(x)
    assert torch.equal(out, 2 * x)
