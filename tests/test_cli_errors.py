"""The ``wildactor`` command answers user mistakes with one line on stderr and a non-zero exit.

Each case checks: no Python traceback, the expected exit status (2 for a mistake in the
arguments, 1 for a failure inside the work), one line on stderr, and that the line names the
argument at fault.

Starting a Python that imports torch costs seconds on a busy CI machine, so most cases run in
ONE subprocess (a driver): it calls the console script's entry point ``main(argv)`` case after
case, with file descriptors 1 and 2 sent to per-case files (so output of grandchildren and of
logging is captured too) and an exception escaping ``main`` printed as the traceback Python
would print. A few cases also run as a separate ``python -m wildactor_kernels.model.cli``
process, end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()

DRIVER = r"""
import json, os, sys, tempfile, time, traceback

cases = json.load(open(sys.argv[1]))
results = {}
_absent = object()
for case in cases:
    saved_env = dict(os.environ)
    os.environ.update(case.get("env", {}))
    saved_mods = {}
    for name in case.get("without", []):  # sys.modules[name] = None: `import name` raises
        saved_mods[name] = sys.modules.get(name, _absent)
        sys.modules[name] = None
    files = [tempfile.TemporaryFile(mode="w+"), tempfile.TemporaryFile(mode="w+")]
    sys.stdout.flush(); sys.stderr.flush()
    saved_fds = [os.dup(1), os.dup(2)]
    os.dup2(files[0].fileno(), 1); os.dup2(files[1].fileno(), 2)
    t0 = time.perf_counter()
    try:
        if case["entry"] == "cli":
            from wildactor_kernels.model.cli import main
        else:
            from benchmarks.suite import main
        rc = main(case["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        rc = 1
    sys.stdout.flush(); sys.stderr.flush()
    os.dup2(saved_fds[0], 1); os.dup2(saved_fds[1], 2)
    for fd in saved_fds:
        os.close(fd)
    for name, mod in saved_mods.items():
        if mod is _absent:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = mod
    os.environ.clear(); os.environ.update(saved_env)
    out = []
    for f in files:
        f.seek(0); out.append(f.read()); f.close()
    results[case["name"]] = dict(rc=rc, out=out[0], err=out[1], seconds=time.perf_counter() - t0)
json.dump(results, open(sys.argv[2], "w"))
"""


def _cases(tmp: str) -> dict[str, dict]:
    """name -> {"argv", "needles" (all must be in the error line), optional "without" (modules made
    unimportable), "env", "entry" ("cli" or "suite": benchmarks.suite.main, which `wildactor bench`
    runs), "status" (expected exit status, default 2), "traceback" (a --debug case)}."""
    a_file = os.path.join(tmp, "a_file")
    with open(a_file, "w") as fh:
        fh.write("not a directory\n")
    bad_weights = os.path.join(tmp, "bad_weights")
    os.makedirs(bad_weights)
    with open(os.path.join(bad_weights, "config.json"), "w") as fh:
        fh.write('{"dim": "not a number"}')
    with open(os.path.join(bad_weights, "model.safetensors"), "wb") as fh:
        fh.write(b"\0" * 16)
    out = os.path.join(tmp, "out")
    w = _weight_dirs(tmp)
    c: dict[str, dict] = {
        # first: bitsandbytes prints its noise on its first import only
        "info-no-third-party-noise": dict(argv=["info"], status=0, needles=[]),
        "demo-unknown-preset": dict(argv=["demo", "--preset", "huge"],
                                    needles=["--preset", "huge", "tiny", "wan2.2-5b"]),
        "demo-odd-height": dict(argv=["demo", "--height", "15"], needles=["--height", "15"]),
        "demo-zero-frames": dict(argv=["demo", "--frames", "0"], needles=["--frames"]),
        "demo-zero-steps": dict(argv=["demo", "--steps", "0"], needles=["--steps"]),
        "demo-device-gpu": dict(argv=["demo", "--device", "gpu"], needles=["--device", "gpu", "cuda"]),
        "demo-width-text": dict(argv=["demo", "--width", "wide"], needles=["--width", "wide"]),
        "demo-no-command": dict(argv=[], needles=["COMMAND"]),
        # a full-size preset with random weights on a CPU: refused before anything is built
        "demo-big-preset-on-cpu": dict(argv=["demo", "--preset", "wan2.2-5b", "--device", "cpu"],
                                       needles=["--preset wan2.2-5b", "--layers", "CUDA"]),
        "demo-14b-on-cpu-layers-too-many": dict(argv=["demo", "--preset", "wan2.1-14b", "--layers", "30",
                                                      "--device", "cpu"],
                                                needles=["--preset wan2.1-14b", "30 layers", "--layers"]),
        "demo-zero-layers": dict(argv=["demo", "--layers", "0"], needles=["--layers", "0"]),
        "quantize-unknown-preset": dict(argv=["quantize-report", "--preset", "huge"],
                                        needles=["--preset", "tiny"]),
        "quantize-zero-layers": dict(argv=["quantize-report", "--layers", "0"], needles=["--layers", "0"]),
        "quantize-int8-without-bitsandbytes": dict(argv=["quantize-report", "--mode", "int8"],
                                                   without=["bitsandbytes"],
                                                   needles=["--mode int8", "bitsandbytes"]),
        "quantize-nf4-without-bitsandbytes": dict(argv=["quantize-report", "--mode", "nf4"],
                                                  without=["bitsandbytes"],
                                                  needles=["--mode nf4", "bitsandbytes"]),
        "export-out-in-proc": dict(argv=["export", "--out", "/proc/nope"], needles=["--out", "/proc/nope"]),
        "export-out-below-a-file": dict(argv=["export", "--out", os.path.join(a_file, "sub")],
                                        needles=["--out", "is a file"]),
        "export-out-is-a-file": dict(argv=["export", "--out", a_file], needles=["--out", "is a file"]),
        "export-missing-weights": dict(argv=["export", "--out", out, "--weights", "/nonexistent"],
                                       needles=["--weights", "/nonexistent"]),
        "export-weights-with-layers": dict(argv=["export", "--out", out, "--weights", bad_weights,
                                                 "--layers", "2"], needles=["--layers", "--weights"]),
        "export-weights-with-preset": dict(argv=["export", "--out", out, "--weights", bad_weights,
                                                 "--preset", "wan2.2-5b"], needles=["--preset", "--weights"]),
        "export-opset-12": dict(argv=["export", "--out", out, "--opset", "12"], needles=["--opset", "12"]),
        "export-zero-layers": dict(argv=["export", "--out", out, "--layers", "0"], needles=["--layers"]),
        # random weights of a full-size preset are built on the CPU to be traced: refused before
        "export-big-preset-random-weights": dict(argv=["export", "--out", out, "--preset", "wan2.1-14b"],
                                                 needles=["--preset wan2.1-14b", "--layers", "--weights"]),
        "export-unknown-preset": dict(argv=["export", "--out", out, "--preset", "huge"],
                                      needles=["--preset", "tiny"]),
        "export-without-onnx": dict(argv=["export", "--out", out], without=["onnx"], needles=["onnx", "pip"]),
        "export-engine-without-tensorrt": dict(argv=["export", "--out", os.path.join(tmp, "engine_out"),
                                                     "--engine"],
                                               without=["tensorrt"], needles=["--engine", "tensorrt"]),
        # bad weight files are refused at the checks, before any model is built (exit 2); a failure
        # inside the work is one line with exit 1 (test_failure_inside_the_work_is_one_line)
        "export-broken-weights": dict(argv=["export", "--out", out, "--weights", bad_weights],
                                      needles=["--weights", "config.json", "not a WildActor config"]),
        "export-weights-not-json": dict(argv=["export", "--out", out, "--weights", w["not_json"]],
                                        needles=["--weights", "config.json", "JSON"]),
        "export-weights-other-file-name": dict(argv=["export", "--out", out, "--weights", w["other_name"]],
                                               needles=["--weights", "model.safetensors"]),
        "export-weights-not-safetensors": dict(argv=["export", "--out", out, "--weights", w["not_st"]],
                                               needles=["--weights", "model.safetensors", "safetensors"]),
        "export-weights-missing-tensors": dict(argv=["export", "--out", out, "--weights", w["deeper"]],
                                               needles=["--weights", "lacks", "blocks.1."]),
        "export-weights-unknown-tensor": dict(argv=["export", "--out", out, "--weights", w["extra"]],
                                              needles=["--weights", "blocks.0.extra.weight"]),
        "export-weights-wrong-shapes": dict(argv=["export", "--out", out, "--weights", w["narrower"]],
                                            needles=["--weights", "shape", "expected"]),
        "export-out-empty": dict(argv=["export", "--out", ""], needles=["--out", "directory"]),
        "export-workspace-nan": dict(argv=["export", "--out", out, "--workspace-gb", "nan"],
                                     needles=["--workspace-gb", "nan"]),
        "export-workspace-inf": dict(argv=["export", "--out", out, "--workspace-gb", "inf"],
                                     needles=["--workspace-gb", "inf"]),
        "export-workspace-without-engine": dict(argv=["export", "--out", out, "--workspace-gb", "4"],
                                                needles=["--workspace-gb 4", "--engine"]),
        "export-weights-with-abbreviated-preset": dict(argv=["export", "--out", out, "--weights", w["good"],
                                                             "--pres", "wan2.2-5b"],
                                                       needles=["--preset", "--weights"]),
        "export-seed-overflow": dict(argv=["export", "--out", out, "--seed", str(2 ** 70)],
                                     needles=["--seed"]),
        "export-layers-text": dict(argv=["export", "--out", out, "--layers", "two"],
                                   needles=["--layers", "two"]),
        "demo-seed-overflow": dict(argv=["demo", "--seed", str(2 ** 70)], needles=["--seed"]),
        # sizes whose activations cannot fit in the CPU's memory: refused before the model is built
        "demo-size-too-big": dict(argv=["demo", "--height", "100000", "--width", "100000", "--device", "cpu"],
                                  needles=["--height 100000", "GB", "free"]),
        # sequence-parallel flags: checked before the model is built
        "demo-ulysses-zero": dict(argv=["demo", "--ulysses", "0"], needles=["--ulysses", "got 0", ">= 1"]),
        "demo-ring-negative": dict(argv=["demo", "--ring", "-1"], needles=["--ring", "got -1", ">= 1"]),
        "demo-ulysses-without-torchrun": dict(argv=["demo", "--ulysses", "2"],
                                              needles=["--ulysses 2", "torchrun"]),
        "demo-cfg-parallel-without-torchrun": dict(argv=["demo", "--cfg-parallel"],
                                                   needles=["--cfg-parallel", "torchrun"]),
        "demo-parallel-wrong-world": dict(argv=["demo", "--ulysses", "2"],
                                          env={"WORLD_SIZE": "4", "RANK": "0"},
                                          needles=["--ulysses 2", "torchrun started 4"]),
        "demo-ulysses-not-dividing-heads": dict(argv=["demo", "--ulysses", "3"],
                                                env={"WORLD_SIZE": "3", "RANK": "0"},
                                                needles=["--ulysses 3", "4 attention heads"]),
        "demo-cfg-parallel-without-guidance": dict(argv=["demo", "--cfg-parallel", "--guidance", "1"],
                                                   env={"WORLD_SIZE": "2", "RANK": "0"},
                                                   needles=["--cfg-parallel", "--guidance 1"]),
        # under torchrun every rank checks the flags; only rank 0 prints the line
        "demo-parallel-error-on-rank-1": dict(argv=["demo", "--ulysses", "4"],
                                              env={"WORLD_SIZE": "2", "RANK": "1"}, needles=[], silent=True),
        "quantize-big-preset-on-cpu": dict(argv=["quantize-report", "--preset", "wan2.1-14b",
                                                 "--device", "cpu"],
                                           needles=["--preset wan2.1-14b", "--layers"]),
        "bench-json-in-proc": dict(entry="suite", argv=["--json", "/proc/nope/x.jsonl"],
                                   needles=["--json", "/proc/nope/x.jsonl"]),
        "bench-json-is-a-dir": dict(entry="suite", argv=["--json", tmp], needles=["--json", "directory"]),
        "bench-device-gpu": dict(entry="suite", argv=["--device", "gpu"], needles=["--device", "gpu"]),
        # runs that work: progress bars on stderr, no traceback, every argument used
        "demo-layers-is-used": dict(argv=["demo", "--layers", "1", "--steps", "1", "--repeats", "1",
                                          "--frames", "1", "--height", "4", "--width", "4", "--no-progress",
                                          "--device", "cpu"], status=0, needles=[]),
        "quantize-report-progress": dict(argv=["quantize-report", "--device", "cpu"], status=0, needles=[]),
        "export-progress": dict(argv=["export", "--out", os.path.join(tmp, "progress_out"), "--fp8",
                                      "--precision", "fp32", "--layers", "1"], status=0, needles=[]),
        "export-saved-weights": dict(argv=["export", "--out", os.path.join(tmp, "weights_out"), "--weights",
                                           w["good"], "--no-check", "--no-progress"], status=0, needles=[]),
        "debug-flag": dict(argv=["--debug", "demo", "--preset", "huge"], traceback=True,
                           needles=["--preset"]),
        "debug-flag-after-subcommand": dict(argv=["demo", "--height", "15", "--debug"], traceback=True,
                                            needles=["--height"]),
        "debug-env": dict(argv=["demo", "--preset", "huge"], env={"WILDACTOR_DEBUG": "1"}, traceback=True,
                          needles=["--preset"]),
    }
    if not HAS_CUDA:
        c.update({
            "demo-device-cuda-on-cpu-torch": dict(argv=["demo", "--device", "cuda"],
                                                  needles=["--device cuda", "no CUDA device"]),
            "quantize-device-cuda-on-cpu-torch": dict(argv=["quantize-report", "--device", "cuda:0"],
                                                      needles=["--device cuda:0"]),
            "bench-shape-on-cpu": dict(entry="suite", argv=["--shape", "wan5b-720p"],
                                       needles=["--shape", "smoke run"]),
            "bench-device-cuda-on-cpu": dict(entry="suite", argv=["--device", "cuda"],
                                             needles=["--device cuda", "no CUDA device"]),
            "bench-model-option-on-cpu": dict(entry="suite", argv=["--suite", "model", "--iters", "3"],
                                              needles=["--iters", "smoke run"]),
        })
    return c


def _weight_dirs(tmp: str) -> dict[str, str]:
    """Directories that look like ``--weights`` folders but are not usable ones."""
    from wildactor_kernels.model import WildActor, WildActorConfig

    d = {name: os.path.join(tmp, "weights_" + name)
         for name in ("good", "not_json", "other_name", "not_st", "deeper", "narrower", "extra")}
    m = WildActor(WildActorConfig.preset("tiny", num_layers=1))
    m.save_pretrained(d["good"])
    for name in ("not_json", "other_name", "not_st", "deeper", "narrower", "extra"):
        os.makedirs(d[name])
    with open(os.path.join(d["not_json"], "config.json"), "w") as fh:
        fh.write("{oops")
    with open(os.path.join(d["not_json"], "model.safetensors"), "wb") as fh:
        fh.write(b"\0" * 16)
    cfg = m.cfg.to_dict()
    with open(os.path.join(d["other_name"], "config.json"), "w") as fh:
        json.dump(cfg, fh)
    shutil.copy(os.path.join(d["good"], "model.safetensors"),
                os.path.join(d["other_name"], "weights.safetensors"))
    with open(os.path.join(d["not_st"], "config.json"), "w") as fh:
        json.dump(cfg, fh)
    with open(os.path.join(d["not_st"], "model.safetensors"), "wb") as fh:
        fh.write(b"\0" * 16)
    for name, change in (("deeper", {"num_layers": 2}), ("narrower", {"dim": 32})):
        with open(os.path.join(d[name], "config.json"), "w") as fh:
            json.dump({**cfg, **change}, fh)
        shutil.copy(os.path.join(d["good"], "model.safetensors"), d[name])
    with open(os.path.join(d["extra"], "config.json"), "w") as fh:
        json.dump(cfg, fh)
    save_file({**m.state_dict(), "blocks.0.extra.weight": torch.zeros(2)},
              os.path.join(d["extra"], "model.safetensors"))
    return d


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("WILDACTOR_DEBUG", None)
    return env


def _run_cli(argv: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """``wildactor ARGV`` as its own process."""
    return subprocess.run([sys.executable, "-m", "wildactor_kernels.model.cli", *argv], cwd=ROOT,
                          env={**_env(), **(env_extra or {})}, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("cli_errors"))
    cases = _cases(tmp)
    spec = [{"name": n, "entry": c.get("entry", "cli"), "argv": c["argv"],
             "without": c.get("without", []), "env": c.get("env", {})} for n, c in cases.items()]
    with open(os.path.join(tmp, "cases.json"), "w") as fh:
        json.dump(spec, fh)
    out_json = os.path.join(tmp, "results.json")
    p = subprocess.run([sys.executable, "-c", DRIVER, os.path.join(tmp, "cases.json"), out_json], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and os.path.exists(out_json), p.stdout + p.stderr
    with open(out_json) as fh:
        got = json.load(fh)
    return {"_tmp": tmp, **{n: dict(cases[n], **got[n]) for n in cases}}


def _all_case_names() -> list[str]:
    with tempfile.TemporaryDirectory() as d:
        return list(_cases(d))


def _mistakes() -> list[str]:
    with tempfile.TemporaryDirectory() as d:
        return [n for n, c in _cases(d).items()
                if not c.get("traceback") and not c.get("silent") and c.get("status", 2) != 0]


@pytest.mark.parametrize("name", _mistakes())
def test_mistake_is_one_line_without_traceback(results, name):
    r = results[name]
    text = r["out"] + r["err"]
    assert "Traceback" not in text, f"{r['argv']}:\n{text}"
    assert r["rc"] == r.get("status", 2), f"{r['argv']}: exit status {r['rc']}\n{text}"
    lines = [ln for ln in r["err"].splitlines() if ln.strip()]
    assert len(lines) == 1, f"{r['argv']}: expected one line on stderr, got:\n{r['err']}"
    line = lines[0]
    assert line.startswith("wildactor"), line
    for needle in r["needles"]:
        assert needle in line, f"{needle!r} not in {line!r}"


def test_each_check_runs_before_any_work(results):
    for name, r in results.items():
        if name.startswith("_") or r.get("status", 2) != 2:
            continue
        assert r["seconds"] < 30, (name, r["seconds"])  # stopped at the checks, no model built
    # --engine without tensorrt: nothing traced, nothing written
    assert not os.path.exists(os.path.join(results["_tmp"], "engine_out"))
    assert "[export]" not in results["export-engine-without-tensorrt"]["out"]


def test_big_preset_with_layers_passes_the_check():
    """The refusal's advice works: the same preset with --layers 2 passes the checks on a CPU."""
    from wildactor_kernels.model.cli import CPU_DEMO_MAX_PARAMS, build_parser, check_demo, demo_parameters

    for preset in ("wan2.2-5b", "wan2.1-14b"):
        assert demo_parameters(preset) > CPU_DEMO_MAX_PARAMS > demo_parameters(preset, 2)
        args = build_parser().parse_args(["demo", "--preset", preset, "--layers", "2", "--device", "cpu"])
        check_demo(args)  # no UsageError
    assert demo_parameters("tiny") < demo_parameters("wan2.1-1.3b") < CPU_DEMO_MAX_PARAMS


def _bar_text(err: str) -> str:
    return err.replace("\r", "\n")


def test_demo_uses_layers(results):
    r = results["demo-layers-is-used"]
    text = r["out"] + r["err"]
    assert r["rc"] == 0 and "Traceback" not in text, text
    assert "1 layers (--layers)" in r["out"] and "OK:" in r["out"], r["out"]


def test_quantize_report_shows_progress(results):
    r = results["quantize-report-progress"]
    text = r["out"] + r["err"]
    assert r["rc"] == 0 and "Traceback" not in text, text
    bars = _bar_text(r["err"])
    for stage in ("quantize-report: build tiny", "quantize-report: quantize a copy (fp8)",
                  "quantize-report: forward of the unquantized model",
                  "quantize-report: forward of the quantized model",
                  "quantize-report: layer blocks.0.attn1.to_q", "quantize-report: layer blocks.1.ffn.net.2"):
        assert stage in bars, stage
    last = [ln for ln in bars.splitlines() if ln.strip()][-1]
    assert "quantize-report: done" in last and "24/24" in last, last  # left in place, complete
    assert "model output" in r["out"] and "quantize-report:" not in r["out"]  # table on stdout, bar not


def _needs_exporter():
    """A real export needs onnx, onnxscript and onnxruntime (the GPU machine lacks onnxscript)."""
    for m in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(m, reason=f"{m} is not installed: no real export here")


def test_export_shows_progress(results):
    _needs_exporter()
    r = results["export-progress"]
    text = r["out"] + r["err"]
    assert r["rc"] == 0 and "Traceback" not in text, text
    bars = _bar_text(r["err"])
    for stage in ("export: trace reference_encoder", "export: trace denoiser", "export: fp8 calibration",
                  "export: passes reference_encoder", "export: passes denoiser",
                  "export: save + check reference_encoder", "export: save + check denoiser",
                  "export: done: 7/7 stages", "onnxruntime check: load sessions",
                  "onnxruntime check: refs, example size", "onnxruntime check: done: 4/4 stages"):
        assert stage in bars, stage
    assert "check: OK" in r["out"] and "[export] wrote" in r["out"] and "stages |" not in r["out"]


def test_library_calls_are_quiet(capfd):
    """Without progress=True the library shows no bar; progress takes a bool (a callable for export)."""
    from wildactor_kernels.model import WildActor, WildActorConfig
    from wildactor_kernels.model.export import export_onnx
    from wildactor_kernels.model.quant import run_quantize_report

    rep = run_quantize_report("tiny", "fp8", device="cpu", print_table=False)
    assert rep["num_converted"] == 20
    err = capfd.readouterr().err
    assert "quantize-report:" not in err and "|" not in err, err
    with pytest.raises(TypeError, match="progress"):
        run_quantize_report("tiny", "fp8", device="cpu", print_table=False, progress="yes")
    with pytest.raises(TypeError, match="progress"):
        export_onnx(WildActor(WildActorConfig.preset("tiny")), "unused", progress="yes")


@pytest.mark.parametrize("name", ["debug-flag", "debug-flag-after-subcommand", "debug-env"])
def test_debug_shows_the_traceback(results, name):
    r = results[name]
    assert r["rc"] != 0 and "Traceback" in r["err"]
    assert all(n in r["err"] for n in r["needles"])


def test_info_has_no_third_party_noise(results):
    r = results["info-no-third-party-noise"]
    assert r["rc"] == 0, r["err"]
    text = r["out"] + r["err"]
    assert "gemm_4bit_forward" not in text and "pip install kernels" not in text
    assert "bitsandbytes" in r["out"] and "torch" in r["out"]


@pytest.mark.parametrize("argv,needle", [
    pytest.param(["demo", "--preset", "huge"], "--preset", id="demo-unknown-preset"),
    pytest.param(["bench", "--json", "/proc/nope/x.jsonl"], "--json", id="bench-json-through-cli"),
])
def test_end_to_end_process(argv, needle):
    p = _run_cli(argv)
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], p.stderr


def test_debug_end_to_end():
    p = _run_cli(["--debug", "demo", "--preset", "huge"])
    assert p.returncode != 0 and "Traceback" in p.stderr and "--preset" in p.stderr


def test_help_texts_are_plain_and_list_presets():
    from wildactor_kernels.model.cli import build_parser
    from wildactor_kernels.model.config import PRESETS

    parser = build_parser()
    top = parser.format_help()
    sub = parser._subparsers._group_actions[0].choices  # argparse keeps the subparsers here
    texts = {"": top, **{name: p.format_help() for name, p in sub.items() if name != "bench"}}
    for name, text in texts.items():
        for bad in ("\u00a7", "``", ":class:", ":func:", "DESIGN", "later sections"):
            assert bad not in text, f"{name or 'top-level'} help has {bad!r}"
    for name in ("demo", "quantize-report", "export"):
        assert all(p in texts[name] for p in PRESETS), name
    assert "num_layers" not in texts["export"] and "--weights DIR" in texts["export"]
    for name in ("info", "demo", "quantize-report", "export"):
        assert "examples:" in texts[name] and f"wildactor {name}" in texts[name].split("examples:")[1], name
        assert sub[name].description, name


def test_smoke_rows_are_labelled_by_what_ran():
    """The CPU smoke run's model-step rows name the ops, GEMM, dtype and device that ran, never
    the CUDA path (Triton) they stand in for."""
    from benchmarks.suite import smoke_label

    cpu = torch.device("cpu")
    ours = smoke_label({"path": "ours-bf16", "dtype": "bfloat16", "kernels": "reference"}, cpu)
    fp8 = smoke_label({"path": "ours-fp8", "dtype": "bfloat16", "kernels": "reference",
                       "fp8_gemm_paths": {"emulate": 20}}, cpu)
    eager = smoke_label({"path": "eager", "dtype": "bfloat16"}, cpu)
    for label in (ours, fp8, eager):
        assert "Triton" not in label and "cpu" in label and "bfloat16" in label, label
    assert "reference ops" in ours and "emulate GEMM" in fp8
    triton_row = {"path": "ours-bf16", "dtype": "float32", "kernels": "triton"}
    assert "Triton kernels" in smoke_label(triton_row, cpu)


def test_third_party_noise_filter_is_narrow():
    """The CLI drops exactly the third-party lines that say nothing to our user (bitsandbytes'
    missing optional CPU kernel, the ONNX exporter's torchvision notice); other lines of the same
    loggers still show.

    A handler sits on each logger itself: torch's logging setup turns propagation off for the
    ``torch.*`` loggers once dynamo or the exporter has run in this process, so pytest's caplog
    (a root handler) sees nothing of them in a full suite run."""
    import logging

    from wildactor_kernels.model.cli import QUIET_LOGS, quiet_third_party

    class _Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.msgs = []

        def emit(self, record):
            self.msgs.append(record.getMessage())

    quiet_third_party()
    for name, needles in QUIET_LOGS.items():
        log = logging.getLogger(name)
        keep, level, propagate = _Keep(), log.level, log.propagate
        log.addHandler(keep)
        log.setLevel(logging.WARNING)
        log.propagate = False
        try:
            log.warning("%s: something", needles[0])
            log.warning("a warning that matters")
        finally:
            log.removeHandler(keep)
            log.setLevel(level)
            log.propagate = propagate
        assert keep.msgs == ["a warning that matters"], (name, keep.msgs)


def test_failure_inside_the_work_is_one_line(monkeypatch, capsys):
    """Past the argument checks, an error inside the work is one line on stderr with exit 1 (and
    a hint at --debug); --debug re-raises it."""
    from wildactor_kernels.model import cli

    def broken(args):
        raise RuntimeError("something broke deep inside\nsecond line")

    monkeypatch.setattr(cli, "cmd_info", broken)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["wildactor info: error: RuntimeError: something broke deep inside "
                     "(run again with --debug for the traceback)"], err
    with pytest.raises(RuntimeError, match="something broke"):
        cli.main(["--debug", "info"])


def test_version(capsys):
    from wildactor_kernels.model import cli

    import wildactor_kernels

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"wildactor {wildactor_kernels.__version__}"


def test_memory_check(monkeypatch):
    """Sizes are compared with the free memory of the device; the defaults pass."""
    from wildactor_kernels.model import cli

    args = cli.build_parser().parse_args(["demo", "--device", "cpu"])
    cli.check_demo(args)  # the default demo fits anywhere
    monkeypatch.setattr(cli, "free_memory_bytes", lambda device: 10 ** 6)  # 1 MB free
    with pytest.raises(cli.UsageError, match=r"--frames 3 --height 16 --width 16: 192 video tokens.*GB"):
        cli.check_demo(cli.build_parser().parse_args(["demo", "--device", "cpu"]))
    monkeypatch.setattr(cli, "free_memory_bytes", lambda device: None)  # unknown: no check
    cli.check_demo(cli.build_parser().parse_args(["demo", "--device", "cpu"]))
    monkeypatch.undo()
    if sys.platform.startswith("linux"):
        assert cli.free_memory_bytes("cpu") > 10 ** 6


def test_weights_check_accepts_a_saved_model(tmp_path):
    from wildactor_kernels.model import cli

    d = _weight_dirs(str(tmp_path))
    assert cli.check_weights_dir(d["good"]) == d["good"]
    for name in ("not_json", "other_name", "not_st", "deeper", "narrower", "extra"):
        with pytest.raises(cli.UsageError, match="--weights"):
            cli.check_weights_dir(d[name])


def test_only_rank_0_prints_a_mistake(results):
    r = results["demo-parallel-error-on-rank-1"]
    assert r["rc"] == 2 and r["err"].strip() == "" and "Traceback" not in r["out"], r


def test_bench_help_lists_shapes_and_an_example(capsys):
    from benchmarks.suite import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for shape in ("tiny", "wan1.3b-480p", "wan5b-720p", "wan14b-720p"):
        assert shape in out.split("--shape NAME", 2)[-1], shape
    assert "examples:" in out and "wildactor bench" in out.split("examples:")[1]
    for bad in ("\u00a7", "``", ":class:", "DESIGN"):
        assert bad not in out, bad


def test_closed_pipe_stops_quietly():
    """`wildactor demo | head -1`: the reader closes the pipe (here before the first line, so the
    first write meets it closed, whatever the buffering); the command stops without an error line
    or a traceback (exit 141, as shell tools)."""
    p = subprocess.Popen([sys.executable, "-m", "wildactor_kernels.model.cli", "demo", "--steps", "1",
                          "--repeats", "1", "--frames", "1", "--height", "4", "--width", "4", "--no-progress",
                          "--device", "cpu"], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    err = p.stderr.read()
    rc = p.wait(timeout=300)
    assert rc == 141 and "Traceback" not in err and "BrokenPipe" not in err and "error" not in err, (rc, err)


def test_export_of_saved_weights_says_so(results):
    """With --weights the export names the folder, never the default preset it did not use."""
    _needs_exporter()
    r = results["export-saved-weights"]
    assert r["rc"] == 0 and "Traceback" not in r["out"] + r["err"], r["out"] + r["err"]
    header = r["out"].splitlines()[0]
    weights = r["argv"][r["argv"].index("--weights") + 1]
    assert f"weights {weights}" in header and "preset" not in header and "1 layers" in header, header


def test_quantize_report_memory_check(monkeypatch):
    from wildactor_kernels.model import cli

    args = cli.build_parser().parse_args(["quantize-report", "--device", "cpu"])
    cli.check_quantize_report(args)  # tiny fits anywhere
    monkeypatch.setattr(cli, "free_memory_bytes", lambda device: 10 ** 5)
    with pytest.raises(cli.UsageError, match=r"--preset tiny: .* parameters; quantize-report needs about"):
        cli.check_quantize_report(cli.build_parser().parse_args(["quantize-report", "--device", "cpu"]))


BASE_INSTALL = r"""
import sys
for m in ("onnx", "onnxscript", "onnxruntime", "bitsandbytes", "diffusers", "transformers", "tensorrt",
          "flash_attn"):
    sys.modules[m] = None  # a base install: none of the optional packages imports
from wildactor_kernels.model.cli import main
print("rc", main(sys.argv[1:]), flush=True)
"""


@pytest.mark.parametrize("argv,status,needle", [
    (["info"], 0, None),
    (["export", "--out", "OUT"], 2, "pip install onnx"),
    (["quantize-report", "--mode", "nf4"], 2, "pip install bitsandbytes"),
])
def test_base_install_in_a_fresh_process(tmp_path, argv, status, needle):
    """Without any optional package, in a fresh interpreter (nothing imported before): the parser
    builds, `info` works, and commands that need a missing package say which, in one line."""
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    p = subprocess.run([sys.executable, "-c", BASE_INSTALL, *argv], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    assert f"rc {status}" in p.stdout, p.stdout + p.stderr
    if needle:
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and needle in lines[0], p.stderr


def test_bench_outside_a_checkout_is_one_line(monkeypatch, capsys):
    """benchmarks/ is not installed: from a wheel install, outside the repository, `wildactor bench`
    says where the benchmarks are, in one line."""
    from wildactor_kernels.model import cli

    monkeypatch.setattr(cli, "find_checkout", lambda start=None: None)
    assert cli.main(["bench", "--suite", "kernels"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "source checkout" in lines[0] and "Traceback" not in lines[0], lines


def test_find_checkout_finds_this_repository(tmp_path):
    from wildactor_kernels.model.cli import find_checkout

    assert os.path.samefile(find_checkout(str(tmp_path)), ROOT)  # beside the imported package
