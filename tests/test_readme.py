"""The README is the truth: its Python blocks run as written, its commands parse, its versions hold.

- Every fenced ``python`` block runs, in order, in one namespace, in a fresh interpreter started
  without ``TRITON_INTERPRET`` (the README sets it up itself where it needs it). Blocks fenced
  ``python gpu`` need CUDA: run where a CUDA device is present, skipped on the CPU. Blocks fenced
  ``python diffusers`` need diffusers and transformers (the test extra has both; the GPU machine
  has no diffusers): skipped, and said so, where either is missing.
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
import importlib.util, sys, traceback
import torch
blocks = eval(sys.stdin.read())
ns = {"__name__": "__readme__"}
for i, (info, code) in enumerate(blocks):
    if "gpu" in info.split()[1:] and not torch.cuda.is_available():
        print(f"[readme] block {i} ({info}): skipped, no CUDA device", flush=True)
        continue
    if "diffusers" in info.split()[1:] and not all(
            importlib.util.find_spec(m) for m in ("diffusers", "transformers")):
        print(f"[readme] block {i} ({info}): skipped, needs diffusers and transformers", flush=True)
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


def _torchrun_lines() -> list[tuple[int, list[str]]]:
    """``(processes, CLI argv)`` of each ``torchrun ... -m wildactor_kernels.model.cli ...`` line."""
    lines = []
    for _, code in blocks("bash"):
        for line in code.splitlines():
            words = shlex.split(line.split("#")[0])
            if words[:1] == ["torchrun"] and "wildactor_kernels.model.cli" in words:
                nproc = int(words[words.index("--nproc-per-node") + 1])
                lines.append((nproc, words[words.index("wildactor_kernels.model.cli") + 1:]))
    return lines


def test_torchrun_lines_pass_the_checks(monkeypatch):
    """The README's torchrun command parses and passes the CLI's checks for as many processes as
    it starts (the flags multiply to --nproc-per-node, Ulysses divides the heads)."""
    from wildactor_kernels.model.cli import build_parser, check_parallel

    lines = _torchrun_lines()
    assert lines, "the README's sequence-parallel command is gone"
    for nproc, argv in lines:
        monkeypatch.setenv("WORLD_SIZE", str(nproc))
        monkeypatch.setenv("RANK", "0")
        check_parallel(build_parser().parse_args(argv))


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


def test_package_docstring_claims_hold():
    """wildactor_kernels' docstring (and the README's prose after the API tour) say which ops take
    ``backend=`` and which are differentiable: check each claim against the code."""
    import inspect

    import wildactor_kernels as wk

    doc = wk.__doc__
    with_backend = ("apply_rope", "qk_norm_rope", "asym_attention", "cached_asym_attention",
                    "ref_lora_linear", "per_token_quant_fp8")
    for name in with_backend:
        assert "backend" in inspect.signature(getattr(wk, name)).parameters, name
    assert "backend" in inspect.signature(wk.RefLoRALinear).parameters
    sig = inspect.signature(wk.fp8_linear).parameters
    assert "backend" not in sig and "gemm" in sig and "act_backend" in sig
    assert "``fp8_linear`` has no ``backend=``" in doc and "not differentiable" in doc
    for name in ("asym_attention", "cached_asym_attention"):  # 8-bit attention: forward only, said so
        assert "precision" in inspect.signature(getattr(wk, name)).parameters, name
    assert 'precision="fp8"``, 8-bit attention, is forward only' in " ".join(doc.split())
    assert "each takes" not in doc.lower() and "every op" not in doc.lower()
    no_backend = doc.split("(plain PyTorch, no backend)")[1].split(";")[0]
    for name in ("TokenLayout", "irope_positions", "rope_cos_sin", "axis_dims"):
        assert name in no_backend, name
        assert "backend" not in inspect.signature(getattr(wk, name)).parameters, name

    # autograd: the differentiable ones give gradients on the reference backend, the quantizer none
    g = torch.Generator().manual_seed(0)
    layout = wk.TokenLayout(video=(1, 2, 2), refs=[("face", 2, 2)])
    cos, sin = wk.rope_cos_sin(wk.irope_positions(layout), head_dim=16)
    n, nv = layout.num_tokens, layout.num_video
    q, k, v = (torch.randn(1, n, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    wk.apply_rope(q, cos, sin, backend="reference").sum().backward()
    wk.asym_attention(q, k, v, nv, cos, sin, backend="reference").sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    x = torch.randn(3, 32, generator=g, requires_grad=True)
    x_q, x_scale = wk.per_token_quant_fp8(x, backend="reference")
    assert not x_q.requires_grad and not x_scale.requires_grad
    w = torch.randn(8, 32, generator=g)
    w_scale = w.abs().amax(1, keepdim=True) / 448.0
    y = wk.fp8_linear(x, (w / w_scale).to(torch.float8_e4m3fn), w_scale, gemm="emulate")
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def _architecture_map() -> str:
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    return text.split("## Architecture map", 1)[1].split("\n## ", 1)[0]


def test_architecture_map_names_files_that_exist():
    """Every file or folder the README's architecture map names exists, and today's modules are in it."""
    section = _architecture_map()
    named: set[str] = set()
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        where, what = row.split("|")[1:3]
        paths = re.findall(r"`([^`]+)`", where)
        assert paths, row
        base = paths[0] if paths[0].endswith("/") else os.path.dirname(paths[0]) + "/"
        for path in paths:
            assert os.path.exists(os.path.join(ROOT, path)), f"README architecture map: no {path}"
            named.add(path.rstrip("/"))
        for name in re.findall(r"`([\w.]+\.(?:py|json|md|sh))`", what):  # files of the row's folder
            assert os.path.exists(os.path.join(ROOT, base, name)), f"README architecture map: no {base}{name}"
            named.add(base + name)
    for path in ("model/references.py", "model/checks.py", "model/rope_tables.py", "model/adapters.py",
                 "model/export/contract.py", "model/export/passes.py", "model/export/runner.py",
                 "model/export/onnx_export.py", "wildactor_kernels/quant/module.py",
                 "wildactor_kernels/quant/linear.py", "wildactor_kernels/attention/hopper.py",
                 "wildactor_kernels/attention/dispatch.py", "wildactor_kernels/attention/backend_table.json",
                 "benchmarks/sm90_report.py", "docs/design.md", "docs/deployment.md"):
        assert path in named, f"README architecture map does not name {path}"
