"""Sequence parallelism (docs/parallel.md) on the CPU: gloo, several processes on 127.0.0.1.

Two sessions run once per test run (2 and 4 ranks, forked from the test process; where the
platform cannot fork, fresh interpreters run this file as the worker script).
Each rank builds the same tiny WildActor, runs every case of its session on the parallel model
and on the single-process model, and the largest difference over the ranks comes back here:

- forward, fp32: ``max |parallel - single| <= 1e-5`` for Ulysses 2 and 4, ring 2, Ulysses 2 x
  ring 2, cfg 2 (x Ulysses 2); cached, joint and reference-free paths; token counts that do and
  do not divide the degree; every rank receives the same full output;
- the adapters' gradients on the joint path, summed over the ranks;
- the sampler's final latents (cached and joint paths, with guidance);
- the bytes each rank sends, counted from the collectives, equal ``comm_bytes_per_forward``;
- per-sample references under cfg, one video token (all-padding ring blocks) in the backward;
- refusals that every rank raises alike (no rank left waiting): inputs whose shapes differ between
  ranks, a process group of only some ranks.

The single-process pieces (log-sum-exp attention and its merge, the cost model, argument
checks) are tested directly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE

from wildactor_kernels.attention.lse import attention_with_lse, merge_attention

TOL = 1e-5
HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


# =========================================================================== the tiny model
def _tiny_model():
    from wildactor_kernels.model import WildActor, WildActorConfig

    torch.manual_seed(0)
    cfg = WildActorConfig(dim=64, num_layers=2, num_heads=4, ffn_dim=128, in_channels=4, out_channels=4,
                          text_dim=32, lora_rank=4)
    m = WildActor(cfg).eval()
    with torch.no_grad():  # live adapters, so the reference rows differ from the backbone's
        for p in m.trainable_parameters():
            p.normal_(0, 0.2)
    return m


def _inputs(batch: int, frames: int, h: int, w: int, seed: int = 1):
    from wildactor_kernels.model import Reference

    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(batch, 4, frames, h, w, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    ctx = torch.randn(batch, 7, 32, generator=g)
    refs = [Reference("face", torch.randn(1, 4, 1, 4, 4, generator=g)),
            Reference("body", torch.randn(1, 4, 1, 4, 6, generator=g))]
    return lat, t, ctx, refs


# grids (T, Hg, Wg) after the (1, 2, 2) patch: 45 tokens divide neither 2 nor 4; 32 divide both
SHAPES = {"odd": (3, 3, 5), "even": (2, 4, 4)}


# =========================================================================== worker side
def _session_cases(world: int) -> list[tuple[str, dict]]:
    """(name, ParallelConfig kwargs) of the configurations one session runs."""
    if world == 2:
        return [("ulysses2", dict(ulysses=2)), ("ring2", dict(ring=2)), ("cfg2", dict(cfg=2))]
    return [("ulysses4", dict(ulysses=4)), ("ulysses2xring2", dict(ulysses=2, ring=2)),
            ("cfg2xulysses2", dict(cfg=2, ulysses=2)), ("ring4", dict(ring=4))]


def _worker(world: int, out_path: str) -> None:
    import torch.distributed as dist
    from wildactor_kernels.model import FlowMatchSampler, ParallelConfig, Reference, parallelize
    from wildactor_kernels.model.parallel import comm_bytes_per_forward, count_communication
    from wildactor_kernels.model.parallel.mesh import MESH_DIMS

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    base = _tiny_model()
    results: dict[str, float] = {}
    bytes_ok: dict[str, list] = {}

    once: dict = {}

    def single(key: str, fn):
        """The single-process result of a case (the inputs are seeded): computed once per session."""
        if key not in once:
            once[key] = fn()
        return once[key]

    def report(name: str, err: float) -> None:
        t = torch.tensor([err], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        results[name] = float(t)

    for name, kw in _session_cases(world):
        cfg = ParallelConfig(**kw)
        pm = parallelize(base, cfg)
        # ---- forward: paths x shapes
        for shape_name, (tt, hh, ww) in SHAPES.items():
            lat, t, ctx, refs = _inputs(2, tt, hh * 2, ww * 2)
            cache = base.encode_references(refs)
            with torch.no_grad():
                paths = (("cached", {"ref_cache": cache}), ("joint", {"refs": refs}), ("norefs", {}))
                for path, kwargs in paths:
                    want = single(f"fwd/{path}/{shape_name}", lambda: base(lat, t, ctx, **kwargs))
                    with count_communication() as cc:
                        got = pm(lat, t, ctx, **kwargs)
                    report(f"fwd/{name}/{path}/{shape_name}", (got - want).abs().max().item())
                    # every rank holds the same full output
                    g0 = got.clone()
                    dist.broadcast(g0, 0)
                    report(f"same/{name}/{path}/{shape_name}", (got - g0).abs().max().item())
                    expect = comm_bytes_per_forward(cfg, batch=2, num_video=tt * hh * ww, heads=4,
                                                    head_dim=16, layers=2, out_features=16, elem_bytes=4)
                    counted = {k: cc.bytes.get(("forward", k), 0) for k in expect}
                    bytes_ok[f"{name}/{path}/{shape_name}"] = [counted, expect]
        # ---- per-token timesteps (Wan2.2 TI2V), odd shape, cached
        lat, t, ctx, refs = _inputs(2, 3, 6, 10)
        tt = torch.rand(2, 45, generator=torch.Generator().manual_seed(5)) * 1000
        cache = base.encode_references(refs)
        with torch.no_grad():
            got = pm(lat, tt, ctx, ref_cache=cache)
            want = single("per_token", lambda: base(lat, tt, ctx, ref_cache=cache))
            report(f"fwd/{name}/per_token_t/odd", (got - want).abs().max().item())
        # ---- a batch that does not divide by cfg (and the warm-up call of the demo)
        with torch.no_grad():
            got = pm(lat[:1], t[:1], ctx[:1], refs=refs)
            want = single("batch1", lambda: base(lat[:1], t[:1], ctx[:1], refs=refs))
            report(f"fwd/{name}/batch1/odd", (got - want).abs().max().item())
        # ---- per-sample references (batch 2): cfg groups take their own samples' references
        g2 = torch.Generator().manual_seed(11)
        refs2 = [Reference("face", torch.randn(2, 4, 1, 4, 4, generator=g2)),
                 Reference("body", torch.randn(2, 4, 1, 2, 6, generator=g2))]
        cache2 = base.encode_references(refs2)
        with torch.no_grad():
            for path, kwargs in (("cached", {"ref_cache": cache2}), ("joint", {"refs": refs2})):
                got = pm(lat, t, ctx, **kwargs)
                want = single(f"per_sample/{path}", lambda: base(lat, t, ctx, **kwargs))
                report(f"fwd/{name}/per_sample_refs_{path}/odd", (got - want).abs().max().item())
        # ---- adapters' gradients with one video token: every ring chunk but the first is all
        # padding (its block must stay in the autograd graph, or the ring backward waits forever)
        lat1, t1, ctx1, refs1 = _inputs(2, 1, 2, 2)
        w1 = torch.randn(2, 4, 1, 2, 2, generator=torch.Generator().manual_seed(4))

        def single_grads_one_token():
            one = copy.deepcopy(base)
            (one(lat1, t1, ctx1, refs=refs1) * w1).sum().backward()
            return [p.grad for p in one.trainable_parameters()]

        want1 = single("grads1", single_grads_one_token)
        m1 = copy.deepcopy(base)
        p1 = parallelize(m1, cfg)
        (p1(lat1, t1, ctx1, refs=refs1) * w1).sum().backward()
        p1.reduce_gradients()
        err = max((a - b.grad).abs().max().item() for a, b in zip(want1, m1.trainable_parameters()))
        report(f"grad/{name}/joint_one_token", err / max(max(a.abs().max().item() for a in want1), 1.0))
        # ---- adapters' gradients on the joint path (odd shape)
        wgt = torch.randn(2, 4, 3, 6, 10, generator=torch.Generator().manual_seed(3))

        def single_grads():
            one = copy.deepcopy(base)
            (one(lat, t, ctx, refs=refs) * wgt).sum().backward()
            return [p.grad for p in one.trainable_parameters()]

        want_grads = single("grads", single_grads)
        par_model = copy.deepcopy(base)
        par = parallelize(par_model, cfg)
        (par(lat, t, ctx, refs=refs) * wgt).sum().backward()
        par.reduce_gradients()
        err = max((a - b.grad).abs().max().item()
                  for a, b in zip(want_grads, par_model.trainable_parameters()))
        scale = max(a.abs().max().item() for a in want_grads)
        report(f"grad/{name}/joint", err / max(scale, 1.0))
        if world == 2:  # gradient checkpointing recomputes the sharded attention in the backward
            for p in par_model.trainable_parameters():  # (torch.utils.checkpoint costs an import of
                p.grad = None                            # dynamo, ~10 s: one session only)
            par_model.gradient_checkpointing = True
            (par(lat, t, ctx, refs=refs) * wgt).sum().backward()
            par.reduce_gradients()
            err = max((a - b.grad).abs().max().item()
                      for a, b in zip(want_grads, par_model.trainable_parameters()))
            report(f"grad/{name}/joint_checkpointed", err / max(scale, 1.0))
        # ---- the sampler: cached and joint paths, guidance on (batch [cond; uncond])
        lat, t, ctx, refs = _inputs(1, 3, 6, 10)
        for use_cache in (True, False):
            s = FlowMatchSampler(num_steps=3, guidance_scale=4.0, use_ref_cache=use_cache, progress=False)
            want = single(f"sampler/{use_cache}",
                          lambda: s.sample(base, (1, 4, 3, 6, 10), ctx, refs=refs, seed=7))
            got = s.sample(pm, (1, 4, 3, 6, 10), ctx, refs=refs, seed=7)
            report(f"sampler/{name}/{'cached' if use_cache else 'joint'}", (got - want).abs().max().item())
    # ---- inputs that differ between ranks (shapes; or valid on some ranks only): every rank raises
    # the same clear error, none waits in a collective
    pm = parallelize(base, ParallelConfig(ulysses=2) if world == 2 else ParallelConfig(ulysses=2, ring=2))
    lat, t, ctx, refs = _inputs(2, 3, 6, 10)
    bad = {"frames": (lambda: _inputs(2, 2, 6, 10)[:3]), "text_dim": (lambda: (lat, t, ctx[..., :8]))}
    for case, make in bad.items():
        args = make() if rank == world - 1 else (lat, t, ctx)
        try:
            with torch.no_grad():
                pm(*args, refs=refs)
            ok = 0.0
        except ValueError as e:
            ok = 1.0 if "every rank must pass the same full inputs" in str(e) else 0.0
        flag = torch.tensor([ok])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        results[f"mismatch_refused/{case}"] = float(flag)
    if world == 4:  # a DeviceMesh instead of a process group, one numbered in mesh order and one not
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        meshes = {"mesh_c2u2": (dict(cfg=2, ulysses=2), init_device_mesh("cpu", (2, 1, 2),
                                                                         mesh_dim_names=MESH_DIMS)),
                  "mesh_r2u2_shuffled": (dict(ring=2, ulysses=2), DeviceMesh(
                      "cpu", torch.tensor([3, 1, 0, 2]).view(1, 2, 2), mesh_dim_names=MESH_DIMS))}
        lat, t, ctx, refs = _inputs(2, 3, 6, 10)
        cache = base.encode_references(refs)
        for name, (kw, mesh) in meshes.items():
            pm = parallelize(base, ParallelConfig(**kw), mesh)
            with torch.no_grad():
                for path, kwargs in (("cached", {"ref_cache": cache}), ("joint", {"refs": refs})):
                    got = pm(lat, t, ctx, **kwargs)
                    want = single(f"fwd/{path}/odd", lambda: base(lat, t, ctx, **kwargs))
                    report(f"fwd/{name}/{path}/odd", (got - want).abs().max().item())
        # a group of only some of the ranks is refused before any group is made (new_group needs
        # every rank; a mesh built on half of them would leave the other half waiting)
        halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        try:
            parallelize(base, ParallelConfig(ulysses=2), halves[rank // 2])
            refused = 0.0
        except ValueError as e:
            refused = 1.0 if "every rank of the default process group" in str(e) else 0.0
        t = torch.tensor([refused])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        results["subgroup_refused"] = float(t)
    dist.barrier()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"results": results, "bytes": bytes_ok}, f)
    dist.destroy_process_group()


# =========================================================================== launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forked_rank(world: int, rank: int, port: int, out: str, log: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    code = 0
    with open(log, "w") as fh:
        try:
            with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                _worker(world, out)
        except BaseException:
            traceback.print_exc(file=fh)
            code = 1
    os._exit(code)  # no pytest or atexit teardown in the child


def _run_session(world: int, tmp_dir: str, timeout: float = 240.0) -> dict:
    """One session of ``world`` ranks: forked from this process where the platform forks (the
    children start with torch and the package already imported, which is most of the time a
    fresh interpreter would take), else fresh interpreters running this file as the worker."""
    out = os.path.join(tmp_dir, f"parallel_{world}.json")
    if "fork" in mp.get_all_start_methods():
        ctx, port, start = mp.get_context("fork"), _free_port(), time.time()
        logs = [os.path.join(tmp_dir, f"rank{r}_of_{world}.log") for r in range(world)]
        procs = [ctx.Process(target=_forked_rank, args=(world, r, port, out, logs[r])) for r in range(world)]
        for p in procs:
            p.start()
        # a rank that fails leaves the others waiting in a collective: stop them all at once
        while any(p.is_alive() for p in procs) and not any(p.exitcode for p in procs):
            if time.time() - start > timeout:
                for p in procs:
                    p.kill()
                pytest.fail(f"the {world}-rank session timed out")
            time.sleep(0.05)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        if any(p.exitcode for p in procs) or not os.path.exists(out):
            tails = "\n".join(open(f).read()[-3000:] for f in logs)
            pytest.fail(f"the {world}-rank session failed:\n{tails}")
        with open(out) as f:
            data = json.load(f)
        data["seconds"] = time.time() - start
        return data
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = []
    for r in range(world):
        e = dict(env, RANK=str(r), LOCAL_RANK=str(r))
        procs.append(subprocess.Popen([sys.executable, HERE, "--worker", str(world), out], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    start, logs = time.time(), []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1.0, timeout - (time.time() - start)))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"the {world}-rank session timed out")
    if any(p.returncode for p in procs) or not os.path.exists(out):
        pytest.fail(f"the {world}-rank session failed:\n" + "\n".join(log[-3000:] for log in logs))
    with open(out) as f:
        data = json.load(f)
    data["seconds"] = time.time() - start
    return data


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("parallel"))
    return {w: _run_session(w, tmp) for w in (2, 4)}


def _config_world(name: str) -> int:
    return 2 if name in ("ulysses2", "ring2", "cfg2") else 4


CONFIGS = ["ulysses2", "ring2", "cfg2", "ulysses4", "ulysses2xring2", "cfg2xulysses2", "ring4"]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("path", ["cached", "joint", "norefs"])
@pytest.mark.parametrize("shape", ["odd", "even"])
def test_forward_equals_single_process(sessions, name, path, shape):
    res = sessions[_config_world(name)]["results"]
    assert res[f"fwd/{name}/{path}/{shape}"] <= TOL
    assert res[f"same/{name}/{path}/{shape}"] == 0.0


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("case", ["per_token_t", "batch1"])
def test_per_token_timesteps_and_batch_one(sessions, name, case):
    assert sessions[_config_world(name)]["results"][f"fwd/{name}/{case}/odd"] <= TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_adapter_gradients_match(sessions, name):
    assert sessions[_config_world(name)]["results"][f"grad/{name}/joint"] <= TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_adapter_gradients_match_with_all_padding_ring_blocks(sessions, name):
    assert sessions[_config_world(name)]["results"][f"grad/{name}/joint_one_token"] <= TOL


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("path", ["cached", "joint"])
def test_per_sample_references(sessions, name, path):
    assert sessions[_config_world(name)]["results"][f"fwd/{name}/per_sample_refs_{path}/odd"] <= TOL


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", ["frames", "text_dim"])
def test_inputs_that_differ_between_ranks_are_refused(sessions, world, case):
    assert sessions[world]["results"][f"mismatch_refused/{case}"] == 1.0


def test_group_of_some_ranks_is_refused(sessions):
    assert sessions[4]["results"]["subgroup_refused"] == 1.0


@pytest.mark.parametrize("name", ["ulysses2", "ring2", "cfg2"])
def test_adapter_gradients_match_with_checkpointing(sessions, name):
    assert sessions[2]["results"][f"grad/{name}/joint_checkpointed"] <= TOL


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("path", ["cached", "joint"])
def test_sampler_matches(sessions, name, path):
    assert sessions[_config_world(name)]["results"][f"sampler/{name}/{path}"] <= TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_bytes_counted_equal_the_model(sessions, name):
    rows = {k: v for k, v in sessions[_config_world(name)]["bytes"].items() if k.startswith(name + "/")}
    assert rows
    for key, (counted, expect) in rows.items():
        assert counted == expect, key
    # the reference side adds nothing: cached, joint and reference-free paths send the same bytes
    for shape in SHAPES:
        assert rows[f"{name}/cached/{shape}"][0] == rows[f"{name}/joint/{shape}"][0] == \
            rows[f"{name}/norefs/{shape}"][0]


@pytest.mark.parametrize("name", ["mesh_c2u2", "mesh_r2u2_shuffled"])
@pytest.mark.parametrize("path", ["cached", "joint"])
def test_device_mesh_input(sessions, name, path):
    assert sessions[4]["results"][f"fwd/{name}/{path}/odd"] <= TOL


def test_torchrun_demo_on_gloo(tmp_path):
    """The README's command (4 ranks, ``--ulysses 2 --cfg-parallel``), scaled down, on gloo: rank 0
    alone prints and shows progress bars (each bar starts once, not once per rank)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port",
           str(_free_port()), "-m", "wildactor_kernels.model.cli", "demo", "--ulysses", "2", "--cfg-parallel",
           "--steps", "2", "--frames", "2", "--height", "6", "--width", "10", "--repeats", "1"]
    r = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("WildActor demo:") == 1 and "\nOK: " in r.stdout and "MISMATCH" not in r.stdout
    assert "ParallelConfig(ulysses=2, ring=1, cfg=2) on 4 ranks (gloo)" in r.stdout
    for bar in ("with reference cache (1/1):   0%", "without cache (1/1):   0%"):
        assert r.stderr.count(bar) == 1, r.stderr[-3000:]


def test_parallel_flags_errors(capsys, monkeypatch):
    """Bad degrees are usage errors (exit 2) naming the flag; the flags without torchrun are usage
    errors too (checked before any model is built), saying to use it."""
    from wildactor_kernels.model.cli import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for argv, flag in ((["demo", "--ulysses", "0"], "--ulysses"), (["demo", "--ring", "two"], "--ring")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: expected a whole number >= 1" in err and "Traceback" not in err
    rc = main(["demo", "--ulysses", "2", "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--ulysses 2" in err and "torchrun --nproc-per-node" in err and "Traceback" not in err


def test_sessions_are_quick(sessions):
    print({w: round(s["seconds"], 1) for w, s in sessions.items()})
    assert all(s["seconds"] < 120 for s in sessions.values())


# =========================================================================== single process
def _sdpa(q, k, v):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2)


def _lse_truth(q, k, v, scale):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    o = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double())
    return o, torch.logsumexp(s, -1).transpose(1, 2)


@pytest.mark.parametrize("nq,nk", [(37, 37), (5, 211), (64, 3)], ids=lambda x: str(x))
def test_attention_with_lse_matches_fp64(nq, nk):
    q, k, v = (torch.randn(2, n, 3, 16) for n in (nq, nk, nk))
    o, lse = attention_with_lse(q, k, v)
    o64, lse64 = _lse_truth(q, k, v, 0.25)
    assert (o.double() - o64).abs().max() < 1e-5 and (lse.double() - lse64).abs().max() < 1e-5
    assert (o - _sdpa(q, k, v)).abs().max() < 1e-5


@pytest.mark.parametrize("nq,nk", [(37, 37), (5, 211), (64, 3), (9, 0)], ids=lambda x: str(x))
def test_attention_with_lse_triton_matches_fp64(nq, nk):
    """The kernel's log-sum-exp entry (the interpreter on the CPU) behind attention_with_lse."""
    q, k, v = (torch.randn(2, n, 3, 16, device=DEVICE) for n in (nq, nk, nk))
    o, lse = attention_with_lse(q, k, v, backend="triton")
    o64, lse64 = _lse_truth(q, k, v, 0.25)
    assert o.shape == q.shape and lse.shape == (2, nq, 3) and lse.dtype == torch.float32
    if nk == 0:
        assert torch.equal(o, torch.zeros_like(q)) and torch.isinf(lse).all()
        return
    o_ref, lse_ref = attention_with_lse(q, k, v, backend="reference")
    err_o, err_ref_o = (o.double() - o64).abs().max(), (o_ref.double() - o64).abs().max()
    err_l, err_ref_l = (lse.double() - lse64).abs().max(), (lse_ref.double() - lse64).abs().max()
    # the 2x rule of the suite (+1e-7 where the reference happens to be exact)
    assert err_o <= 2 * err_ref_o + 1e-7, (err_o, err_ref_o)
    assert err_l <= 2 * err_ref_l + 1e-7, (err_l, err_ref_l)


def test_merge_of_key_blocks_equals_full_attention_and_gradients():
    q = torch.randn(1, 29, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 50, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 50, 2, 8, dtype=torch.float64, requires_grad=True)
    full = _sdpa(q, k, v)
    cuts = [0, 13, 13, 40, 50]  # includes an empty block
    parts = [attention_with_lse(q, k[:, a:b], v[:, a:b]) for a, b in zip(cuts, cuts[1:])]
    assert math.isinf(parts[1][1].max().item())
    merged = merge_attention(parts)
    assert (merged - full).abs().max() < 1e-12
    g = torch.randn_like(full)
    want = torch.autograd.grad(full, (q, k, v), g)
    got = torch.autograd.grad(merged, (q, k, v), g)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-12


def test_merge_rows_with_no_keys_are_zero():
    q = torch.randn(1, 4, 1, 8)
    o, lse = attention_with_lse(q, q[:, :0], q[:, :0])
    assert torch.equal(o, torch.zeros_like(q)) and torch.isinf(lse).all()
    merged = merge_attention([(o, lse), (o, lse)])
    assert torch.equal(merged, torch.zeros_like(q))


def test_attention_with_lse_rejects_bad_input():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="k and v"):
        attention_with_lse(q, torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8))
    with pytest.raises(TypeError, match="q"):
        attention_with_lse(q.long(), q, q)
    with pytest.raises(TypeError, match="float64"):  # the kernels take fp32/fp16/bf16
        attention_with_lse(q.double(), q.double(), q.double(), backend="triton")
    with pytest.raises(ValueError, match="at least one"):
        merge_attention([])


def test_config_and_parallelize_checks():
    from wildactor_kernels.model import ParallelConfig, parallelize

    with pytest.raises(ValueError, match="ulysses"):
        ParallelConfig(ulysses=0)
    with pytest.raises(ValueError, match="ring"):
        ParallelConfig(ring=True)
    assert ParallelConfig(2, 3, 2).world_size == 12 and ParallelConfig(2, 3, 2).seq == 6
    m = _tiny_model()
    with pytest.raises(ValueError, match="must divide the number of heads"):
        parallelize(m, ParallelConfig(ulysses=3))
    with pytest.raises(TypeError, match="WildActor"):
        parallelize(torch.nn.Linear(2, 2), ParallelConfig())
    with pytest.raises(TypeError, match="ParallelConfig"):
        parallelize(m, (2, 1, 1))
    with pytest.raises(RuntimeError, match="init_process_group"):
        parallelize(m, ParallelConfig(ulysses=2))


def test_wrapper_checks_inputs_before_communicating():
    """Input errors are raised before any collective (a single-member mesh, no peers needed)."""
    import torch.distributed as dist
    from wildactor_kernels.model import ParallelConfig, parallelize

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        m = _tiny_model()
        pm = parallelize(m, ParallelConfig())
        lat, t, ctx, refs = _inputs(1, 2, 4, 6)
        want = m(lat, t, ctx, refs=refs)
        assert (pm(lat, t, ctx, refs=refs) - want).abs().max() <= TOL   # one rank = the model
        assert pm.num_parameters() == m.num_parameters()                 # other names reach the model
        with pytest.raises(ValueError, match="context"):
            pm(lat, t, ctx[..., :8])
        with pytest.raises(ValueError, match="latents"):
            pm(lat[:, :2], t, ctx)
        with pytest.raises(ValueError, match="timestep"):
            pm(lat, torch.zeros(3), ctx)
        with pytest.raises(ValueError, match="not both"):
            pm(lat, t, ctx, refs=refs, ref_cache=m.encode_references(refs))
        with pytest.raises(TypeError, match="already parallelized"):
            parallelize(pm, ParallelConfig())
        with pytest.raises(ValueError, match="needs 2 ranks"):
            parallelize(m, ParallelConfig(ring=2))
        # 8-bit attention has no sharded form: refused, at wrapping and at call time (quantize_model
        # may run after parallelize), not run in the activations' dtype without a word
        q8 = copy.deepcopy(m)
        q8.blocks[1].attn1.precision = "fp8"
        with pytest.raises(ValueError, match="8 bits"):
            parallelize(q8, ParallelConfig())
        m.blocks[0].attn1.precision = "fp8"
        with pytest.raises(ValueError, match="8 bits"):
            pm(lat, t, ctx, refs=refs)
    finally:
        dist.destroy_process_group()


def test_cost_model_bytes_and_the_8gpu_goal():
    from wildactor_kernels.model.parallel import ParallelConfig, comm_bytes_per_forward, step_time_model

    b = comm_bytes_per_forward(ParallelConfig(ulysses=8), batch=1, num_video=75600, heads=40, head_dim=128,
                               layers=40, out_features=64)
    # 4 all-to-alls (q, k, v, o) of a [1, 9450, 40, 128] bf16 shard per layer, 7/8 of each leaves
    assert b["all_to_all"] == 40 * 4 * (9450 * 5120 * 2) * 7 // 8 and b["p2p"] == 0
    assert comm_bytes_per_forward(ParallelConfig(ring=8), batch=1, num_video=75600, heads=40, head_dim=128,
                                  layers=40, out_features=64)["p2p"] == 40 * 7 * 2 * 9450 * 5120 * 2
    r = step_time_model("wan14b-720p", ParallelConfig(ulysses=8))
    assert r["speedup"] >= 7.0
    r2 = step_time_model("wan14b-720p", ParallelConfig(ulysses=4, cfg=2))
    assert r2["speedup"] >= 7.0
    with pytest.raises(ValueError, match="heads"):
        step_time_model("wan5b-720p", ParallelConfig(ulysses=16))


def test_docs_tables_are_the_cost_model():
    """docs/parallel.md prints ``markdown_report()`` as it is: a change to the model shows in the docs."""
    from wildactor_kernels.model.parallel.cost import markdown_report

    with open(os.path.join(ROOT, "docs", "parallel.md"), encoding="utf-8") as f:
        assert markdown_report() in f.read()


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    sys.path.insert(0, ROOT)
    _worker(int(sys.argv[2]), sys.argv[3])
