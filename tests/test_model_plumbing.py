"""The plumbing around the model maths: the reference-cache binding (one function shared by the
model and the runners), the backend (one home, read at call time), the rope-table cache (an LRU
safe under threads) and the import direction weights -> wildactor. CPU, tiny configs."""

from __future__ import annotations

import copy
import sys
import threading

import pytest
import torch
from helpers import assert_close_verbose
from wildactor_kernels.model import RefCache, Reference, WildActor, WildActorConfig
from wildactor_kernels.model.references import bind_ref_cache
from wildactor_kernels.model.rope_tables import RopeTableCache
from wildactor_kernels.model.wildactor import AdapterLinear, SelfAttention

import wildactor_kernels as wk
import wildactor_kernels.lora.module as lora_module

TINY = WildActorConfig.preset("tiny", backend="reference")


def _model(cfg: WildActorConfig = TINY) -> WildActor:
    torch.manual_seed(0)
    m = WildActor(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if "lora_B" in name else 0.05))
    return m


def _refs(batch: int = 1) -> list[Reference]:
    return [Reference("face", torch.randn(batch, 4, 1, 4, 4)),
            Reference("body", torch.randn(batch, 4, 1, 6, 4))]


# ============================================================================ import direction
def test_weights_and_model_import_one_way():
    """weights.py never imports wildactor.py (lazily or not); the model imports weights."""
    from test_imports import _cycles, _graph, _without_package_inits

    edges = _without_package_inits(_graph()[0])
    pkg = "wildactor_kernels.model"
    assert f"{pkg}.wildactor" not in edges[f"{pkg}.weights"]
    assert f"{pkg}.weights" in edges[f"{pkg}.wildactor"]
    for mod in ("wildactor", "weights", "references", "checks", "rope_tables", "adapters"):
        assert not any(f"{pkg}.{mod}" in c for c in _cycles(edges)), mod


# ============================================================================ cache binding
@pytest.fixture
def no_grad():
    with torch.no_grad():
        yield


def test_bind_ref_cache_shared_function(no_grad):
    m = _model()
    refs = _refs()
    cache = m.encode_references(refs)  # grid-free
    grid, b = (2, 3, 4), 2
    ks, vs = bind_ref_cache(cache, m.cfg, grid, b, backend="reference")
    assert len(ks) == len(vs) == TINY.num_layers and ks[0].shape == (b, cache.num_ref, 4, 16)
    # equal to a cache encoded for that grid directly
    direct = m.encode_references(refs, video_shape=(grid[0], grid[1] * 2, grid[2] * 2))
    for i in range(TINY.num_layers):
        assert_close_verbose(ks[i], direct.k[i].expand(b, -1, -1, -1), atol=1e-5, name=f"k {i}")
        assert_close_verbose(vs[i], direct.v[i].expand(b, -1, -1, -1), atol=1e-5, name=f"v {i}")
    # memoised per (grid, batch, device, dtype, backend, ...): the next step reuses the tensors
    ks2, _ = bind_ref_cache(cache, m.cfg, grid, b, backend="reference")
    assert ks2[0] is ks[0]
    ks3, _ = bind_ref_cache(cache, m.cfg, (2, 2, 2), b, backend="reference")
    assert ks3[0] is not ks[0]
    # the stacked form the exported graphs take: [L, B, Nr, H, D], contiguous
    k, v = bind_ref_cache(cache, m.cfg, grid, b, backend="reference", stacked=True, dtype=torch.float64)
    assert k.shape == (TINY.num_layers, b, cache.num_ref, 4, 16) and k.is_contiguous()
    assert k.dtype == torch.float64 and v.dtype == torch.float64
    assert_close_verbose(k[1].float(), ks[1], atol=1e-5)
    # memo=False leaves the memo alone
    before = cache._bound
    bind_ref_cache(cache, m.cfg, (1, 1, 1), b, memo=False)
    assert cache._bound is before
    # the model's method is this function with the model's device, dtype and backend
    mk, _ = m.bind_ref_cache(cache, grid, b)
    assert_close_verbose(mk[0], ks[0], atol=0, name="model method vs function")


def test_bind_ref_cache_empty_and_bad():
    empty = RefCache([], [], [], (0, 0, 0))
    assert bind_ref_cache(empty, TINY, (1, 2, 2), 3) == ([], [])
    k, v = bind_ref_cache(empty, TINY, (1, 2, 2), 3, stacked=True)
    assert k.shape == (TINY.num_layers, 3, 0, TINY.num_heads, TINY.head_dim) and v.shape == k.shape
    with pytest.raises(TypeError, match="RefCache"):
        bind_ref_cache([torch.zeros(1)], TINY, (1, 2, 2), 1)
    bad = RefCache([torch.zeros(1, 4, 4, 16)] * 3, [torch.zeros(1, 4, 4, 16)] * 3, [("face", 2, 2)])
    with pytest.raises(ValueError, match="layers"):
        bind_ref_cache(bad, TINY, (1, 2, 2), 1)
    two = RefCache([torch.zeros(2, 4, 4, 16)] * 2, [torch.zeros(2, 4, 4, 16)] * 2, [("face", 2, 2)])
    with pytest.raises(ValueError, match="batch"):
        bind_ref_cache(two, TINY, (1, 2, 2), 3)


# ============================================================================ backend
def _spy_backends(monkeypatch) -> list[tuple[str, str]]:
    """Record the backend each dispatching op is called with."""
    seen: list[tuple[str, str]] = []

    def spy(name, fn):
        def wrapped(*args, backend="auto", **kwargs):
            seen.append((name, backend))
            return fn(*args, backend="reference", **kwargs)
        return wrapped

    monkeypatch.setattr(wk, "qk_norm_rope", spy("qk_norm_rope", wk.qk_norm_rope))
    monkeypatch.setattr(wk, "asym_attention", spy("asym_attention", wk.asym_attention))
    monkeypatch.setattr(lora_module, "ref_lora_linear", spy("ref_lora_linear", lora_module.ref_lora_linear))
    return seen


def test_backend_lives_in_the_config_and_is_read_at_call_time(monkeypatch):
    m = _model(TINY.replace(backend="auto"))
    seen = _spy_backends(monkeypatch)
    x, ctx, refs = torch.randn(1, 4, 1, 4, 4), torch.randn(1, 3, 32), _refs()
    with torch.no_grad():
        m(x, 500.0, ctx, refs=refs)
        assert seen and {b for _, b in seen} == {"auto"}
        assert {n for n, _ in seen} == {"qk_norm_rope", "asym_attention", "ref_lora_linear"}
        seen.clear()
        m.cfg = m.cfg.replace(backend="reference")  # one assignment, no walk over the layers
        m(x, 500.0, ctx, refs=refs)
        assert {b for _, b in seen} == {"reference"}
    assert m.backend == "reference"
    for mod in m.modules():
        if isinstance(mod, (AdapterLinear, SelfAttention)):
            assert mod.backend == "reference"
    # no layer keeps a copy of its own
    assert not any("backend" in vars(mod) for mod in m.modules())


def test_pinned_layer_and_set_backend(monkeypatch):
    m = _model()
    seen = _spy_backends(monkeypatch)
    for mod in m.modules():
        if isinstance(mod, AdapterLinear):
            mod.backend = "auto"  # pin the LoRA layers only (as the convergence test does)
    x, ctx, refs = torch.randn(1, 4, 1, 4, 4), torch.randn(1, 3, 32), _refs()
    with torch.no_grad():
        m(x, 500.0, ctx, refs=refs)
    assert {b for n, b in seen if n == "ref_lora_linear"} == {"auto"}
    assert {b for n, b in seen if n != "ref_lora_linear"} == {"reference"}
    seen.clear()
    m.set_backend("reference")  # unpins every layer
    with torch.no_grad():
        m(x, 500.0, ctx, refs=refs)
    assert {b for _, b in seen} == {"reference"}
    with pytest.raises(ValueError, match="backend"):
        m.set_backend("cuda")


def test_deepcopy_has_its_own_backend():
    m = _model()
    c = copy.deepcopy(m)
    c.set_backend("auto")
    assert m.backend == "reference" and c.backend == "auto"
    assert all(mod.backend == "reference" for mod in m.modules() if isinstance(mod, AdapterLinear))
    assert all(mod.backend == "auto" for mod in c.modules() if isinstance(mod, AdapterLinear))


# ============================================================================ rope-table cache
def test_rope_table_cache_is_an_lru():
    cache = RopeTableCache(max_entries=3)
    layouts = [wk.TokenLayout((1, 2, n)) for n in range(1, 6)]
    first = cache.get(TINY, layouts[0], torch.device("cpu"))
    assert cache.get(TINY, layouts[0], torch.device("cpu"))[0] is first[0]
    for lay in layouts[1:]:
        cache.get(TINY, lay, torch.device("cpu"))
    assert len(cache) == 3
    assert cache.get(TINY, layouts[0], torch.device("cpu"))[0] is not first[0]  # evicted, rebuilt
    pos = wk.irope_positions(layouts[2], face_offset=TINY.face_offset, body_offset=TINY.body_offset)
    cos, sin = wk.rope_cos_sin(pos, TINY.head_dim, theta=TINY.theta)
    got = cache.get(TINY, layouts[2], torch.device("cpu"))
    assert torch.equal(got[0], cos) and torch.equal(got[1], sin)
    assert len(copy.deepcopy(cache)) == 0
    with pytest.raises(ValueError, match="max_entries"):
        RopeTableCache(0)


def test_rope_table_cache_is_thread_safe():
    """4 threads hammering one model's cache with more layouts than it holds: no KeyError, never
    more than its bound, and every table right."""
    m = WildActor(TINY, device="meta")
    assert m._rope_tables.max_entries == 32
    m._rope_tables = cache = RopeTableCache(max_entries=4)  # a small bound: evictions all the time
    layouts = [wk.TokenLayout((1, 1 + i % 4, 1 + i // 4), [("face", 1, 2)]) for i in range(12)]
    want = {}
    for lay in layouts:
        pos = wk.irope_positions(lay, face_offset=TINY.face_offset, body_offset=TINY.body_offset)
        want[lay] = wk.rope_cos_sin(pos, TINY.head_dim, theta=TINY.theta)
    errors: list[BaseException] = []
    sizes: list[int] = []
    start = threading.Barrier(4)

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        try:
            start.wait()
            for _ in range(400):
                lay = layouts[int(torch.randint(len(layouts), (1,), generator=g))]
                cos, sin = m.rope_tables(lay, "cpu")
                sizes.append(len(cache))
                if not (torch.equal(cos, want[lay][0]) and torch.equal(sin, want[lay][1])):
                    raise AssertionError(f"wrong table for {lay}")
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: races show up within a few hundred calls
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    assert max(sizes) <= cache.max_entries and len(cache) <= cache.max_entries
