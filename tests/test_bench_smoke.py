"""CPU smoke tests of the benchmark harness, report and ``wildactor bench`` (seconds, no GPU).

They check the plumbing the GPU numbers go through: the environment record, positive medians
and quantiles, input rotation, refusal of zero timings, failed peers recorded as failed,
JSON-lines round trip, markdown/README generation, and the CLI smoke path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import pytest
import torch

from benchmarks import harness, report, suite


def test_env_record_fields():
    env = harness.env_record("cpu")
    for key in ("date_utc", "device", "gpu", "compute_capability", "torch", "triton", "python", "cuda",
                "git_commit", "git_dirty", "peaks_tflops"):
        assert key in env, key
    assert env["device"] == "cpu" and env["gpu"] is None and env["compute_capability"] is None
    assert env["torch"] == torch.__version__
    assert env["date_utc"].endswith("+00:00")
    assert isinstance(env["git_commit"], str) and env["git_commit"]
    json.dumps(env)  # JSON-ready


def test_env_commit_override_without_git(monkeypatch):
    monkeypatch.setattr(harness, "_git", lambda *a: None)
    monkeypatch.setenv("WILDACTOR_GIT_COMMIT", "abc123")
    env = harness.env_record("cpu")
    assert env["git_commit"] == "abc123" and env["git_dirty"] is None


def test_bench_positive_median_and_quantiles():
    a = torch.randn(64, 64)
    res = harness.bench(lambda: a @ a, warmup=1, rep=5, device="cpu")
    assert res["method"] == "cpu-perf_counter" and res["n"] >= 3
    assert 0 < res["ms_p20"] <= res["ms"] <= res["ms_p80"]
    assert all(math.isfinite(res[k]) for k in ("ms", "ms_p20", "ms_p80"))


def test_bench_rotates_inputs():
    seen = []
    sets = [torch.randn(8) for _ in range(3)]
    harness.bench(lambda x: seen.append(id(x)), inputs=sets, iters=6, warmup=0, device="cpu")
    assert [seen.count(id(t)) for t in sets] == [2, 2, 2]


def test_bench_refuses_zero_time(monkeypatch):
    monkeypatch.setattr(harness.time, "perf_counter", lambda: 1.0)  # a clock that never moves
    with pytest.raises(harness.BenchError, match="positive"):
        harness.bench(lambda: None, iters=3, warmup=0, device="cpu")


def test_peaks_and_flops():
    assert harness.device_peaks("NVIDIA H100 80GB HBM3") == {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0}
    assert harness.device_peaks("NVIDIA H200")["fp8"] == 1979.0
    assert harness.device_peaks("NVIDIA H100 PCIe")["bf16"] == 756.0
    assert harness.device_peaks("Some Future GPU") is None and harness.device_peaks(None) is None
    m = harness.flops_metrics(989e12, 1000.0, "bf16", harness.device_peaks("H100 SXM"))
    assert m["tflops"] == pytest.approx(989.0) and m["pct_peak"] == pytest.approx(100.0)
    assert harness.flops_metrics(1e12, 1.0, "bf16", None)["pct_peak"] is None  # unknown, not zero
    with pytest.raises(harness.BenchError):
        harness.tflops(1e12, 0.0)
    with pytest.raises(harness.BenchError):
        harness.tflops(float("nan"), 1.0)


def test_failed_peer_is_recorded():
    row = harness.run_peer(lambda: {"ms": 1 / 0}, op="broken")
    assert row["status"] == "failed" and "ZeroDivisionError" in row["error"] and "ms" not in row
    ok = harness.run_peer(lambda: {"ms": 2.0}, op="fine")
    assert ok == {"op": "fine", "ms": 2.0, "status": "ok"}


def _model_rows():
    common = dict(shape="wan5b-720p", preset="wan2.2-5b", layers=30, dtype="bfloat16", Nv=27280, Nr=4400,
                  num_refs=5, text_len=512, batch=2, timing="cuda-events")
    return [
        dict(common, path="eager", label="(a) eager", status="ok", ms=300.0, ms_p20=290.0, ms_p80=310.0,
             speedup_vs_eager=1.0, speedup_vs_compile=0.5, peak_mem_gb=20.0, first_call_s=1.0),
        dict(common, path="compile", label="(b) compile", **harness.failed("CompileTimeout: too slow")),
        dict(common, path="ours-bf16", label="(c) ours", status="ok", ms=100.0, ms_p20=99.0, ms_p80=101.0,
             speedup_vs_eager=3.0, encode_ms=50.0, encode_ms_p20=49.0, encode_ms_p80=51.0,
             sqnr_vs_eager_db=float("inf"), tflops=500.0, pct_peak=50.6),
        dict(common, path="ours-fp8", label="(d) fp8", status="ok", ms=80.0, ms_p20=79.0, ms_p80=81.0,
             speedup_vs_eager=3.75, sqnr_vs_eager_db=30.0, sqnr_vs_bf16_db=31.5,
             fp8_gemm_paths={"scaled_mm": 300}),
    ]


def test_jsonl_round_trip_and_markdown(tmp_path):
    path = str(tmp_path / "model_step.jsonl")
    env = _h100_env()
    harness.append_jsonl(path, _model_rows(), kind="model_step", env=env, run_id="run-1")
    with open(path) as fh:
        lines = fh.readlines()
    assert len(lines) == 4 and all(json.loads(ln)["run_id"] == "run-1" for ln in lines)
    rows = harness.read_jsonl(path)
    assert rows[2]["sqnr_vs_eager_db"] == "inf"  # non-finite floats stored as strings, not null/NaN
    assert rows[1]["status"] == "failed" and "ms" not in rows[1]
    md = report.model_markdown(rows)
    assert "NVIDIA H100 80GB HBM3" in md and "wan5b-720p" in md and env["date_utc"] in md
    assert "| (c) ours | 100.0 [99.00, 101.0] | 3.00x |" in md
    assert "failed: CompileTimeout: too slow" in md
    assert "31.5" in md and "inf" in md and "50.00 [49.00, 51.00]" in md
    written = report.write_reports(path)
    assert str(tmp_path / "model_step.md") in written
    with open(tmp_path / "model_step.md") as fh:
        assert "| path | ms / step [p20, p80] |" in fh.read()


def test_latest_run_is_the_newest(tmp_path):
    path = str(tmp_path / "r.jsonl")
    old = dict(harness.env_record("cpu"), date_utc="2026-01-01T00:00:00+00:00")
    new = dict(old, date_utc="2026-02-01T00:00:00+00:00")
    harness.append_jsonl(path, [{"op": "x", "ms": 1.0}], kind="k", env=new, run_id="new")
    harness.append_jsonl(path, [{"op": "x", "ms": 2.0}], kind="k", env=old, run_id="old")
    assert [r["run_id"] for r in report.latest_run(harness.read_jsonl(path), "k")] == ["new"]


def test_update_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro\n<!-- bench:start -->\nold table\n<!-- bench:end -->\nafter\n")
    block = report.readme_block(_rows_with_env())
    assert block.startswith(report.README_START) and block.endswith(report.README_END)
    assert report.update_readme(str(readme), block)
    text = readme.read_text()
    assert "old table" not in text and "wan5b-720p" in text and text.endswith("after\n")
    assert text.count(report.README_START) == 1 and text.startswith("# Title\n\nintro\n")
    assert report.update_readme(str(readme), block)  # idempotent
    assert readme.read_text() == text
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers here\n")
    assert not report.update_readme(str(plain), block)
    assert plain.read_text() == "no markers here\n"


def _h100_env():
    return dict(harness.env_record("cpu"), device="cuda", gpu="NVIDIA H100 80GB HBM3",
                compute_capability="9.0")


def _rows_with_env():
    env = _h100_env()
    return [{"kind": "model_step", "run_id": "r", **r, "env": env} for r in _model_rows()]


def test_kernel_suite_records_missing_failing_and_hung_scripts(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("print('about to fail')\nraise SystemExit(3)\n")
    hung = tmp_path / "hung.py"
    hung.write_text("import time\ntime.sleep(30)\n")
    good = tmp_path / "good.py"
    good.write_text("import argparse\np = argparse.ArgumentParser()\np.add_argument('--shapes', nargs='+')\n"
                    "print(p.parse_args().shapes)\n")
    rows = suite.run_kernel_suite(["wan5b-720p", "tiny"], timeout=2.0, echo=lambda s: None,
                                  scripts=(("missing", "no_such_script.py"), ("bad", str(bad)),
                                           ("hung", str(hung)), ("good", str(good))))
    by = {r["op"]: r for r in rows}
    assert by["missing"]["status"] == "skipped"
    assert by["bad"]["status"] == "failed" and by["bad"]["rc"] == 3
    assert "about to fail" in by["bad"]["output_tail"]
    assert by["hung"]["status"] == "failed" and "timed out" in by["hung"]["error"]
    assert by["good"]["status"] == "ok" and by["good"]["args"] == ["--shapes", "wan5b-720p"]
    assert "['wan5b-720p']" in by["good"]["output_tail"]


def test_script_options_of_bench_rope():
    argv = suite._script_argv(os.path.join(suite.BENCH_DIR, "bench_rope.py"), "rope", ["wan5b-720p"], None)
    assert argv == ["--shapes", "wan5b-720p", "--out", os.path.join(harness.RESULTS_DIR, "bench_rope.json")]
    argv = suite._script_argv(os.path.join(suite.BENCH_DIR, "bench_attention.py"), "attention", None, "/x")
    assert argv == ["--out", os.path.join("/x", "bench_attention.json")]


def test_cli_smoke_run_via_register_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="wildactor")
    sub = parser.add_subparsers(dest="command", required=True)
    suite.register_cli(sub)
    out = tmp_path / "smoke.jsonl"
    results_before = sorted(os.listdir(harness.RESULTS_DIR)) if os.path.isdir(harness.RESULTS_DIR) else []
    args = parser.parse_args(["bench", "--device", "cpu", "--json", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "no CUDA device here" in text or "smoke" in text
    rows = harness.read_jsonl(str(out))
    ops = [r for r in rows if r["kind"] == "ops_smoke"]
    model = {r["path"]: r for r in rows if r["kind"] == "model_step"}
    assert {r["op"] for r in ops} == {"apply_rope", "qk_norm_rope", "asym_attention", "cached_asym_attention",
                                      "ref_lora_linear"}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in ops)
    assert model["compile"]["status"] == "skipped"
    for p in ("eager", "ours-bf16", "ours-fp8"):
        r = model[p]
        assert r["status"] == "ok", r
        assert 0 < r["ms_p20"] <= r["ms"] <= r["ms_p80"] and r["speedup_vs_eager"] > 0
    assert model["ours-bf16"]["encode_ms"] > 0
    assert 20.0 < float(model["ours-fp8"]["sqnr_vs_bf16_db"]) < 200.0  # FP8 error is real, not zero
    assert (tmp_path / "model_step.md").exists() and (tmp_path / "ops_smoke.md").exists()
    after = sorted(os.listdir(harness.RESULTS_DIR)) if os.path.isdir(harness.RESULTS_DIR) else []
    assert after == results_before  # the smoke run never writes into benchmarks/results/


def test_benchmark_files_are_not_collected_by_tests():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml")) as fh:
        assert 'testpaths = ["tests"]' in fh.read()
    assert os.path.exists(os.path.join(root, "benchmarks", "test_bench_kernels.py"))


@pytest.mark.skipif(sys.platform != "linux", reason="SIGALRM time limit is POSIX")
def test_compile_time_limit_fires():
    from benchmarks.bench_model import CompileTimeout, _time_limit

    with pytest.raises(CompileTimeout):
        with _time_limit(0.2):
            harness.time.sleep(2)


def test_full_suite_path_runs_on_cpu_with_tiny_shape(tmp_path, capsys):
    """The code path a GPU session takes (run_full -> bench_model.run -> JSONL -> report), on the
    CPU with the tiny preset: the argument plumbing from the ``bench`` parser is exercised."""
    parser = argparse.ArgumentParser(prog="wildactor")
    suite.register_cli(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "full.jsonl"
    args = parser.parse_args(["bench", "--suite", "model", "--shape", "tiny", "--iters", "1",
                              "--encode-iters", "1", "--paths", "eager", "compile", "ours-bf16",
                              "--json", str(out)])
    assert suite.run_full(args, torch.device("cpu")) == 0
    rows = {r["path"]: r for r in harness.read_jsonl(str(out))}
    assert set(rows) == {"eager", "compile", "ours-bf16"}
    assert rows["compile"]["status"] == "skipped" and rows["ours-bf16"]["status"] == "ok"
    assert rows["ours-bf16"]["layers"] == 2 and rows["ours-bf16"]["iters"] == 1
    assert rows["ours-bf16"]["env"]["device"] == "cpu" and rows["ours-bf16"]["kind"] == "model_step"
    assert (tmp_path / "model_step.md").exists()
    assert "**tiny**" in capsys.readouterr().out


def test_index_lists_kernel_script_json(tmp_path):
    run = {"benchmark": "bench_rope", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "commit": "abc",
           "date": "2026-11-20T00:00:00+00:00",
           "results": [{"op": "rope", "mode": "fwd", "shape": "wan5b-720p", "impl": "triton", "ms": 0.12,
                        "ms_p20": 0.11, "ms_p80": 0.13, "gbps": 2500.0},
                       {"op": "rope", "mode": "fwd", "shape": "wan5b-720p", "impl": "flash_attn",
                        "error": "ImportError: no flash_attn"}]}
    (tmp_path / "bench_rope.json").write_text(json.dumps([run]))
    md = report.index_markdown(str(tmp_path))
    assert "`bench_rope.json` (1 runs): latest NVIDIA H100 80GB HBM3" in md
    assert "| rope | wan5b-720p | fwd | triton | 0.120 | 0.110 | 0.130 | 2500.0 |" in md
    assert "ImportError: no flash_attn" in md


def test_plots_are_optional(tmp_path, monkeypatch):
    rows = _rows_with_env()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    assert report.plot_model(rows, str(tmp_path / "x.png")) is None
    path = str(tmp_path / "m.jsonl")
    harness.append_jsonl(path, _model_rows(), kind="model_step", env=_h100_env())
    assert report.write_reports(path) == [str(tmp_path / "model_step.md")]
