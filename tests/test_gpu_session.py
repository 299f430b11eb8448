"""benchmarks/gpu_session.sh: the one GPU run fits its budget, checked by its dry run on the CPU."""

from __future__ import annotations

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
