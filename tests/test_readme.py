"""The README is the truth: its Python blocks run as written, its commands parse, its versions hold.

- Every fenced ``python`` block runs, in order, in one namespace, in a fresh interpreter started
  without ``TRITON_INTERPRET`` (the README sets it up itself where it needs it). Blocks fenced
  ``python gpu`` need CUDA: run where a CUDA device is present, skipped on the CPU.
- The two quickstart commands are the ones CI runs (``.ci/run``).
- Each ``wildactor`` command line in a ``bash`` block is accepted by the CLI's parser.
- The tested-versions table names the torch and Triton versions this run uses, and setup.py's
  bounds admit them.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```\s*$", re.M | re.S)


def blocks(lang: str) -> list[tuple[str, str]]:
    """``(info string, code)`` of every fenced block whose info string starts with ``lang``."""
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)
            if m.group(1).strip().split(" ")[0] == lang]


RUNNER = r"""
import sys, traceback
import torch
blocks = eval(sys.stdin.read())
ns = {"__name__": "__readme__"}
for i, (info, code) in enumerate(blocks):
    if "gpu" in info.split()[1:] and not torch.cuda.is_available():
        print(f"[readme] block {i} ({info}): skipped, no CUDA device", flush=True)
        continue
    print(f"[readme] block {i} ({info}) ...", flush=True)
    try:
        exec(compile(code, f"README.md python block {i}", "exec"), ns)
    except BaseException:
        traceback.print_exc()
        print(f"[readme] block {i} FAILED:\n{code}", flush=True)
        sys.exit(1)
print("[readme] all blocks ran", flush=True)
"""


def test_python_blocks_run_in_order():
    py = blocks("python")
    assert len(py) >= 5, "the README's API tour has lost its Python blocks"
    assert any("gpu" in info.split()[1:] for info, _ in py), "expected one GPU-only block"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the README sets it itself, as a reader's session would
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, "-c", RUNNER], input=repr(py), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "all blocks ran" in p.stdout, p.stdout[-4000:] + p.stderr[-6000:]


def test_no_block_uses_cuda_unmarked():
    for info, code in blocks("python"):
        if "gpu" not in info.split()[1:]:
            # CUDA only where available: no hard-wired device in a block that must run on a CPU
            for hard in ('.cuda(', 'device="cuda"', "device='cuda'", '"cuda:'):
                assert hard not in code, (hard, code)


def test_quickstart_commands_are_what_ci_runs():
    bash = "\n".join(code for _, code in blocks("bash"))
    assert "pip install torch==2.13.0 && pip install -e . && wildactor demo" in bash
    assert 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q tests' in bash
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as fh:
        ci = fh.read()
    assert "torch==2.13.0" in ci and '-e ".[test]"' in ci and "python -m pytest -q tests" in ci
    # `wildactor demo` without options is the small default: the tiny preset
    from wildactor_kernels.model.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert args.preset == "tiny" and args.frames * args.height * args.width <= 3 * 16 * 16


def _wildactor_lines() -> list[list[str]]:
    lines = []
    for _, code in blocks("bash"):
        for line in code.splitlines():
            for part in line.split("&&"):
                part = part.split("#")[0].strip()
                if part.startswith("wildactor ") and not part.startswith("wildactor bench"):
                    lines.append(shlex.split(part)[1:])
    return lines


@pytest.mark.parametrize("argv", _wildactor_lines(), ids=lambda a: " ".join(a))
def test_cli_lines_parse(argv):
    from wildactor_kernels.model.cli import build_parser

    args = build_parser().parse_args(argv)
    assert callable(args.func)


def test_tested_versions_are_stated_and_admitted():
    import triton
    from packaging.requirements import Requirement
    from packaging.version import Version

    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    section = text.split("### Tested versions", 1)[1].split("\n## ", 1)[0]
    tv, trv = torch.__version__.split("+")[0], triton.__version__
    if not torch.cuda.is_available():  # the CI row
        assert tv in section and trv in section, (tv, trv)
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as fh:
        setup = fh.read()
    written = dict(re.findall(r'"((torch|triton)[<>=!][^";]*)', setup))  # spec as written -> name
    reqs = {name: Requirement(spec) for spec, name in written.items()}
    assert Version(tv) in reqs["torch"].specifier and Version(trv) in reqs["triton"].specifier
    for spec in written:
        assert f"`{spec}`" in section, f"README's tested versions do not state setup.py's `{spec}`"
    # the GPU machine's versions are inside the bounds too
    assert Version("2.11") in reqs["torch"].specifier and Version("3.6") in reqs["triton"].specifier
