"""The config each launcher picks at the docs/design.md §8 shapes builds for sm_90 without spills.

Built ahead of time on the CPU (``benchmarks/sm90_report.py``, the route of
``helpers.run_sm90_build``): each public op runs forward and backward at wan5b-720p (bf16, D=128)
with Triton's launches recorded; every launch is built with the config it would run -- the
launcher's fixed config, or its autotuner's first candidate after the early prune (the config
the tests' sm_90 builds use too) -- and ptxas must report 0 spill bytes.

One case per workload of ``sm90_report.workloads`` (public op names, stable when kernels are
renamed), the Hopper forward (warp-specialised and hand-pipelined picks, cached) and 8-bit
attention (K/V quantizer + kernel) included. Five cases run by default (a few builds, about a
minute cold, seconds with Triton's cache warm); the rest are marked ``slow`` and run with
``WILDACTOR_SM90_FULL=1``. ``benchmarks/results/sm90_resources_triton<ver>.md`` has every config
of every kernel.

Known spills are ``xfail(strict=True)`` with the bytes measured per Triton version (3.9 and
3.6, the ptxas of each wheel): when the autotune lists are pruned to configs that do not spill,
these cases pass, the strict xfail turns them into failures, and the marks are removed.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import triton
from helpers import run_sm90_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import sm90_report  # noqa: E402  (TRITON_INTERPRET is set only when run as a script)

SHAPE = "wan5b-720p"
SITES = [site for site, _ in sm90_report.workloads([SHAPE])]
FAST = {f"{SHAPE} joint prologue", f"{SHAPE} hopper joint", f"{SHAPE} fp8 cached",
        "lora 3072->3072 r128", "fp8 per-token quant K=3072"}
# modules whose kernels only a workload added for them launches (not asym_attention's default
# route): the coverage check names them so that dropping their workload fails loudly
MUST_REACH_MODULES = ("attention.kernels", "attention.hopper", "attention.fp8_kernels")
FULL = os.environ.get("WILDACTOR_SM90_FULL") == "1"

# Triton minor version -> site -> what spills there today (first candidates after the prune,
# bytes per thread: spill stores / loads; benchmarks/results/sm90_resources_triton<ver>.md).
# Remove an entry when the autotune lists are pruned so that the case passes (strict on a
# measured version: an unexpected pass fails). With the pruned lists and the one-kernel backward
# (dK, dV and atomic dQ per key block) only the cached forward's 128x128 tile spills, on 3.9;
# the Hopper and 8-bit kernels never spilled on either version.
_FWD = "forward BLOCK_M=128 BLOCK_N=128 w8 s3"
KNOWN_SPILLS_BY_VERSION: dict[str, dict[str, str]] = {
    "3.9": {
        f"{SHAPE} cached prologue": f"{_FWD} CACHED: 8/8 B",
        f"{SHAPE} cached no-rope": f"{_FWD} CACHED: 8/8 B",
    },
    "3.6": {},
}
TRITON_MINOR = ".".join(triton.__version__.split(".")[:2])
MEASURED_ON_THIS_TRITON = TRITON_MINOR in KNOWN_SPILLS_BY_VERSION
# on a version never measured: every case that spills on some measured version, not strict
KNOWN_SPILLS: dict[str, str] = (
    KNOWN_SPILLS_BY_VERSION[TRITON_MINOR] if MEASURED_ON_THIS_TRITON
    else {site: "; ".join(f"{ver}: {d[site]}" for ver, d in KNOWN_SPILLS_BY_VERSION.items() if site in d)
          for site in dict.fromkeys(k for d in KNOWN_SPILLS_BY_VERSION.values() for k in d)})

_cache: dict[str, list[dict]] = {}
_missing: list[str] = []
_kernels: list[str] = []


def _built(site: str) -> list[dict]:
    """Rows of ``site``, building every pending case of this run in one subprocess."""
    if site not in _cache:
        todo = [s for s in SITES if (s in FAST or FULL) and s not in _cache] or [site]
        if site not in todo:
            todo.append(site)
        script = (
            "import json, os\n"
            "os.environ['TRITON_INTERPRET'] = '0'\n"
            "from benchmarks import sm90_report as R\n"
            f"launches = R.capture([{SHAPE!r}])\n"
            "reached = {R.kernel_label(lc.fn) for lc in launches}\n"
            "kernels = sorted(R.discover_kernels())\n"
            "missing = sorted(set(kernels) - reached)\n"
            "cache = os.path.join(os.path.expanduser('~'), '.cache', 'wildactor_sm90')\n"
            f"out = R.build_picks({SHAPE!r}, {todo!r}, cache, launches)\n"
            "print('@@' + json.dumps(dict(out=out, missing=missing, kernels=kernels)))\n"
        )
        stdout = run_sm90_build(script, timeout=900)
        line = next(ln for ln in stdout.splitlines() if ln.startswith("@@"))
        res = json.loads(line[2:])
        _cache.update(res["out"])
        _missing[:] = res["missing"]
        _kernels[:] = res["kernels"]
    return _cache[site]


def test_every_kernel_is_launched_by_a_workload():
    """A kernel no public op of ``sm90_report.workloads`` launches would be missing from the
    report and from these checks: the workloads must reach every kernel the package defines."""
    _built(sorted(FAST)[0])
    assert not _missing, f"kernels no workload launches (add them to sm90_report.workloads): {_missing}"
    modules = {k.rsplit(".", 1)[0] for k in _kernels}
    absent = [m for m in MUST_REACH_MODULES if m not in modules]
    assert not absent, f"no kernel discovered in {absent}: discovery missed them ({sorted(modules)})"


def _params():
    out = []
    for site in SITES:
        marks = []
        if site not in FAST:
            marks += [pytest.mark.slow,
                      pytest.mark.skipif(not FULL, reason="full sweep: set WILDACTOR_SM90_FULL=1")]
        if site in KNOWN_SPILLS:
            # strict on a measured version (3.9: CI's; 3.6: the GPU machine's)
            marks.append(pytest.mark.xfail(strict=MEASURED_ON_THIS_TRITON, reason=KNOWN_SPILLS[site]))
        out.append(pytest.param(site, marks=marks, id=site.replace(" ", "_")))
    return out


def test_every_workload_is_listed():
    assert FAST <= set(SITES), sorted(FAST - set(SITES))
    for known in KNOWN_SPILLS_BY_VERSION.values():
        assert set(known) <= set(SITES), sorted(set(known) - set(SITES))


@pytest.mark.parametrize("site", _params())
def test_picked_configs_build_without_spills(site):
    rows = _built(site)
    assert rows, f"{site}: no Triton launch recorded"
    spills = [f"{r['kernel']} {r['config']}: {r['spill_store_bytes']} B spill stores, "
              f"{r['spill_load_bytes']} B spill loads" for r in rows if r["spills"]]
    assert not spills, f"{site}: " + "; ".join(spills)
    for r in rows:
        assert r["fits"], (f"{site}: {r['kernel']} {r['config']} does not fit an SM "
                           f"({r['shared_bytes']} B shared, {r['registers']} registers)")
