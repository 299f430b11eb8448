"""benchmarks/gpu_session.sh: the one GPU run fits its budget, checked by its dry run on the CPU."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_session.sh")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dry_run_prints_a_budget_within_540_s(tmp_path):
    res = subprocess.run(["bash", SCRIPT, "--dry-run", str(tmp_path)], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
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
    assert not os.listdir(tmp_path), "a dry run writes nothing"
