"""benchmarks/gpu_session.sh: the one GPU run fits its budget, checked by its dry run on the CPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_session.sh")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dry_run_prints_a_budget_within_540_s(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(["bash", SCRIPT, "--dry-run", str(tmp_path)], capture_output=True, text=True,
                         timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    m = re.search(r"planned total: (\d+) s of fixed steps \+ model up to (\d+) s = (\d+) s max", out)
    assert m, out
    fixed, model, total = map(int, m.groups())
    assert fixed + model == total <= 540, out
    steps = re.findall(r"^###   (\S+)\s+(\d+) s", out, re.M)
    # the order of value: attention forward first, GPU tests second, the model step last
    names = [s for s, _ in steps]
    assert names[:4] == ["info", "attn-fwd", "gpu-tests", "attn-bwd"] and names[-1] == "model", names
    assert sum(int(b) for s, b in steps if s != "model") == fixed, out
    # every command of the run is listed and its script exists; the GPU tests have a per-test
    # timeout and no Inductor compiles
    for name in names:
        assert re.search(rf"^### {re.escape(name)} \(", out, re.M), f"{name} missing from the dry run"
    assert "MISSING" not in out, out
    tests_line = next(ln for ln in out.splitlines() if ln.startswith("### gpu-tests ("))
    assert "-m gpu" in tests_line and "--timeout" in tests_line and "not compile" in tests_line
    # ... and each command imports and parses its flags on the CPU (benchmarks/session_check.py)
    for name in names:
        assert re.search(rf"^### check {re.escape(name)}: ok", out, re.M), f"{name} not checked:\n{out}"
    assert re.search(rf"^### check: {len(names)} commands parse, 0 failed$", out, re.M), out
    assert not os.listdir(tmp_path), "a dry run writes nothing"


def test_session_check_fails_a_bad_flag_a_missing_script_and_an_empty_selection():
    lines = ["bad-flag\tpython3 benchmarks/bench_rope.py --shapes wan5b-720p --no-such-flag",
             "bad-choice\tpython3 benchmarks/bench_attention.py --impls ours-fused no-such-impl",
             "missing\tpython3 benchmarks/no_such_bench.py",
             "empty\tpython3 -m pytest tests/test_gpu_session.py -m gpu -p no:cacheprovider",
             "good\tpython3 benchmarks/bench_lora.py --linears attn --modes fwd"]
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "session_check.py")],
                         input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    out = res.stdout
    assert res.returncode == 1, out + res.stderr
    assert re.search(r"^### check bad-flag: FAILED: exit 2 .*--no-such-flag", out, re.M), out
    assert re.search(r"^### check bad-choice: FAILED: exit 2 .*no-such-impl", out, re.M), out
    assert "### check missing: FAILED: no script benchmarks/no_such_bench.py" in out, out
    assert re.search(r"^### check empty: FAILED: pytest --collect-only exit 5", out, re.M), out
    assert "### check good: ok" in out and "### check: 1 commands parse, 4 failed" in out, out


def test_pytest_collect_argv_writes_nothing_and_spawns_no_workers(tmp_path):
    from benchmarks import session_check

    notes: list[str] = []
    argv = session_check.pytest_collect_argv(
        ["-q", "tests/a.py", "-m", "gpu", "--junitxml=/out/junit.xml", "--timeout", "60", "-n", "4",
         "--dist", "load"], str(tmp_path), notes)
    assert argv[:4] == ["-q", "tests/a.py", "-m", "gpu"] and argv[-1] == "--collect-only"
    assert f"--junitxml={tmp_path / 'junit.xml'}" in argv and "--junitxml=/out/junit.xml" not in argv
    for flag, module, value in (("--timeout", "pytest_timeout", "60"), ("-n", "xdist", "0"),
                                ("--dist", "xdist", "load")):
        if session_check._has(module):
            assert argv[argv.index(flag) + 1] == value
        else:
            assert flag not in argv and any(n.startswith(flag) for n in notes)


# --------------------------------------------------------------------------- a step cut at its limit
# The session stops a step with SIGINT (`timeout -s INT`): the script must write every row measured
# before it, also those of the op / layer / shape it was in the middle of, and exit 130.
class _Stop:
    """A stand-in for a measurement that is interrupted on its ``at``-th call."""

    def __init__(self, at: int, result=None):
        self.at, self.calls, self.result = at, 0, result

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls >= self.at:
            raise KeyboardInterrupt
        return self.result(*args, **kwargs) if callable(self.result) else self.result


def test_bench_attention_interrupted_keeps_the_rows_of_the_op_in_progress(monkeypatch, tmp_path):
    import torch

    from benchmarks import bench_attention, harness

    monkeypatch.setitem(harness.DESIGN_SHAPES, "tiny-test",
                        dict(B=1, H=2, D=32, video=(2, 4, 4), refs=1, ref_grid=(4, 4)))
    monkeypatch.setattr(harness, "cuda_device_or_explain", lambda *a, **k: torch.device("cpu"))

    def fake_measure(row, *a, **k):
        row.update(ms=1.0, ms_p20=0.9, ms_p80=1.1, flops=1.0, tflops=1.0, pct_peak=0.1, status="ok")
    stop = _Stop(3, fake_measure)
    monkeypatch.setattr(bench_attention, "_measure", stop)
    out = tmp_path / "bench_attention.json"
    rc = bench_attention.main(["--shapes", "tiny-test", "--ops", "joint", "--no-bwd",
                               "--impls", "ours-norope", "ours-prologue", "ours-fused", "--out", str(out)])
    assert rc == 130 and stop.calls == 3
    (run,) = json.loads(out.read_text())
    assert "KeyboardInterrupt" in run["interrupted"]
    # JOINT_IMPLS order; the third was cut: before the fix the whole op's rows were lost
    got = [(r["impl"], r["status"]) for r in run["results"]]
    assert got == [("ours-fused", "ok"), ("ours-prologue", "ok")], got
    assert all(0 <= r["max_abs_err"] < 0.1 for r in run["results"])  # bf16 against SDPA


def test_bench_quant_interrupted_keeps_the_rows_of_the_layer_in_progress(monkeypatch):
    import torch

    from benchmarks import bench_quant

    stop = _Stop(3, {"ms": 1.0, "ms_p20": 0.9, "ms_p80": 1.1})
    monkeypatch.setattr(bench_quant, "bench", stop)
    monkeypatch.setattr(bench_quant, "LAYERS", [("attn q/k/v/o", 64, 32)])
    rows: list[dict] = []
    with pytest.raises(KeyboardInterrupt):
        bench_quant.bench_layers(torch.device("cpu"), 16, True, rows)
    assert [r["name"] for r in rows] == ["bf16 F.linear (cuBLAS)", "fp8 quant + _scaled_mm rowwise"]


def test_bench_model_interrupted_writes_the_paths_measured(monkeypatch, tmp_path):
    from benchmarks import bench_model, harness

    real = harness.run_peer
    stop = _Stop(2, real)
    monkeypatch.setattr(harness, "run_peer", stop)
    out = tmp_path / "model_step.jsonl"
    rc = bench_model.main(["--device", "cpu", "--shapes", "tiny", "--paths", "eager", "ours-bf16",
                           "--no-compile", "--iters", "1", "--warmup", "0", "--encode-iters", "1",
                           "--json", str(out), "--no-report"])
    assert rc == 130 and stop.calls == 2
    rows = harness.read_jsonl(str(out))
    assert [(r["path"], r["status"]) for r in rows] == [("eager", "ok")]
    assert any("KeyboardInterrupt" in n for n in rows[0]["notes"])


def test_runbook_table_matches_the_script_plan():
    """GPU_RUNBOOK.md's step table names the script's steps, in order, with the script's limits."""
    with open(SCRIPT) as fh:
        src = fh.read()
    steps = re.search(r"^STEPS=\(([^)]*)\)", src, re.M).group(1).split()
    limit_src = re.search(r"declare -A LIMIT=\((.*?)\)\s*(#|$)", src, re.M | re.S).group(1)
    limits = {k: int(v) for k, v in re.findall(r"\[([\w-]+)\]=(\d+)", limit_src)}
    assert set(limits) == set(steps), (steps, limits)
    with open(os.path.join(ROOT, "benchmarks", "GPU_RUNBOOK.md")) as fh:
        book = fh.read()
    table = re.search(r"^\| # \| step \| what \| limit \|\n\|[-|]+\|\n((?:\|.*\|\n)+)", book, re.M).group(1)
    names, book_limits = [], {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        row_names = re.findall(r"`([\w-]+)`", cells[1])
        names += row_names
        if cells[-1] != "the rest":
            for n, v in zip(row_names, cells[-1].split("+"), strict=True):
                book_limits[n] = int(v)
    assert names == steps, names
    assert book_limits == {s: v for s, v in limits.items() if s != "model"}, book_limits
    fixed = sum(v for s, v in limits.items() if s != "model")
    assert f"Fixed steps: {fixed} s" in book and fixed <= 540
    # the header comment of the script lists the same limits
    for s, v in limits.items():
        entry = re.search(rf"^#   {re.escape(s)}\s.*(?:\n#\s{{16}}.*)*", src, re.M)
        assert entry, f"the header does not list {s}"
        if s != "model":
            assert entry.group(0).rstrip().endswith(f" {v}"), f"header of {s} does not say {v}"


_FAKE_PYTHON = r'''#!/usr/bin/env bash
# stands in for python3 on a GPU machine: every step of the session, without a GPU
case "$*" in
    "-c import torch"*) echo 1 ;;                              # "CUDA is available"
    -c*) exit 0 ;;                                             # the plugin probes
    *"bench_attention.py"*"--shapes wan5b-720p --ops joint cached"*)
        echo '{"fwd": 1}' > benchmarks/results/bench_attention.json ;;
    *"-m pytest"*)
        for a in "$@"; do
            [[ $a == --junitxml=* ]] && echo '<testsuite failures="1"/>' > "${a#--junitxml=}"
        done
        echo "1 failed"; exit 1 ;;
    *"bench_attention.py"*"--ops joint --impls"*)               # the backward: runs into its limit
        trap 'echo partial > benchmarks/results/bench_attention_bwd.json; exit 130' INT
        sleep 100 ;;                                           # timeout signals the whole group
    *) echo "step $*" ;;
esac
'''


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and timeout")
def test_session_tolerates_a_failing_step_and_a_step_cut_at_its_limit(tmp_path):
    """The real (not dry) run, with a stand-in python in a copy of the layout: a failing step and
    a step stopped at its limit are logged and the run goes on; what they wrote is packed into
    OUTDIR after every step; steps the budget cannot hold are skipped; exit status 1."""
    import tarfile

    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "benchmarks" / "gpu_session.sh")
    (repo / "benchmarks" / "results" / "old.json").write_text("{}")  # before the run: not packed
    fake = tmp_path / "python"
    fake.write_text(_FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(fake), WILDACTOR_SESSION_BUDGET_S="25")
    res = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_session.sh"), str(out), "abc123"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    log = res.stdout
    assert res.returncode == 1, log + res.stderr
    assert sorted(os.listdir(out)) == ["junit.xml", "results.tar.gz", "session.log"], os.listdir(out)
    assert (out / "session.log").read_text() == log
    assert "commit abc123" in log
    assert re.search(r"^### gpu-tests: rc=1 ", log, re.M), log
    assert re.search(r"^### attn-bwd: rc=124 \(time limit: partial\)", log, re.M), log
    assert re.search(r"^### lora: skipped", log, re.M) and re.search(r"^### model: skipped", log, re.M), log
    assert "### gpu_session done" in log
    with tarfile.open(out / "results.tar.gz") as tar:
        names = sorted(tar.getnames())
    assert names == ["benchmarks/results/bench_attention.json", "benchmarks/results/bench_attention_bwd.json"]


# --------------------------------------------------------------------------- the steps' code paths
_TINY = dict(B=1, H=2, D=64, video=(2, 4, 4), refs=1, ref_grid=(4, 4))  # D=64: the Hopper kernel's too


def _session_impls() -> tuple[list[str], list[str]]:
    """The attention impls of the session's forward steps and of its backward step."""
    with open(SCRIPT) as fh:
        src = fh.read()
    fwd = re.search(r"local fwd_impls=\(([^)]*)\)", src).group(1).split()
    bwd = re.search(r"step attn-bwd .*--impls ([^\n]*)", src).group(1).split()
    return fwd, bwd


def test_every_attention_impl_of_the_session_runs_at_a_tiny_shape(monkeypatch, tmp_path):
    """bench_attention's code for each impl the session names (forward, cached, forward+backward,
    the dispatcher's candidates) runs once on the CPU (interpreter) at a tiny shape, timings
    stubbed: an impl whose call breaks would cost its rows on the GPU. Only what needs CUDA or a
    package the GPU machine lacks may fail, and says so."""
    import torch

    from benchmarks import bench_attention, harness

    monkeypatch.setitem(harness.DESIGN_SHAPES, "tiny-test", _TINY)
    monkeypatch.setattr(harness, "cuda_device_or_explain", lambda *a, **k: torch.device("cpu"))

    def run_once(row, call, *a, **k):
        call()
        row.update(ms=1.0, ms_p20=0.9, ms_p80=1.1, flops=1.0, tflops=1.0, pct_peak=0.1, status="ok")
    monkeypatch.setattr(bench_attention, "_measure", run_once)
    fwd, bwd = _session_impls()
    out = tmp_path / "a.json"
    base = ["--shapes", "tiny-test", "--out", str(out)]
    assert bench_attention.main([*base, "--ops", "joint", "cached", "--no-bwd", "--impls", *fwd]) == 0
    assert bench_attention.main([*base, "--ops", "joint", "--impls", *bwd]) == 0
    assert bench_attention.main([*base, "--no-bwd", "--ops", "dispatch",
                                 "--write-table", str(tmp_path / "table.json")]) == 0
    runs = json.loads(out.read_text())
    rows = [r for run in runs for r in run["results"]]
    seen = {(r["op"], r["mode"], r["impl"]) for r in rows}
    assert {i for op, mode, i in seen if op in ("joint", "cached") and mode == "fwd"} == set(fwd)
    assert {("joint", "fwd+bwd", i) for i in bwd} <= seen
    for r in rows:
        if r["impl"].startswith("sdpa-cudnn"):
            assert r["status"] == "failed" and "backend" in r["error"]  # no cuDNN on the CPU
        elif r["impl"] in ("sage-2call", "fa3-fp8-2call"):
            assert r["status"] in ("ok", "not installed"), r
        else:
            assert r["status"] == "ok", r
            if r.get("max_abs_err") is not None:
                assert 0 <= r["max_abs_err"] < 0.1, r  # bf16 / 8-bit against SDPA's default backend
    table = json.loads((tmp_path / "table.json").read_text())
    assert {e["mode"] for e in table["entries"]} == {"joint", "cached"} and all(
        e["times_ms"] for e in table["entries"])


def test_rope_step_runs_at_a_tiny_shape(monkeypatch, tmp_path):
    import torch

    from benchmarks import bench_rope, harness

    monkeypatch.setitem(harness.DESIGN_SHAPES, "tiny-test", _TINY)
    monkeypatch.setattr(harness, "cuda_device_or_explain", lambda *a, **k: torch.device("cpu"))
    calls = []

    def run_once(fn, *a, **k):
        fn()
        calls.append(1)
        return {"ms": 1.0, "ms_p20": 0.9, "ms_p80": 1.1}
    monkeypatch.setattr(harness, "bench", run_once)
    out = tmp_path / "r.json"
    assert bench_rope.main(["--shapes", "tiny-test", "--impls", "triton", "eager", "--out", str(out)]) == 0
    (run,) = json.loads(out.read_text())
    assert len(run["results"]) == 8 and all("error" not in r for r in run["results"]), run["results"]
    assert all(r["max_abs_err_vs_eager"] < 0.05 for r in run["results"]) and len(calls) == 8
