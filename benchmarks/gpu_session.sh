#!/usr/bin/env bash
# One call of a GPU session (benchmarks/GPU_RUNBOOK.md): the device tool runs it from the repo root.
#
#   bash benchmarks/gpu_session.sh tests|kernels|model [OUTDIR] [COMMIT]
#
#   tests    wildactor info, nvidia-smi, the whole pytest suite (-rs, junit xml)   budget 300 s
#   kernels  bench_attention (3 shapes, joint+cached, fwd and fwd+bwd, both rope modes),
#            bench_lora, bench_quant, bench_rope; then, if time is left, the compiled
#            peers (FlexAttention, torch.compile) at wan5b-720p                      budget 500 s
#   model    bench_model, one process per shape (wan5b-720p, wan1.3b-480p), one run  budget 470 s
#
# OUTDIR (default $OUT, else /tmp/wildactor-gpu) receives <stage>.log, tests: junit.xml, and
# kernels/model: <stage>_results.tar.gz (the files of benchmarks/results/ this call wrote, paths
# relative to the repo root). The copied tree has no .git: COMMIT (or $WILDACTOR_GIT_COMMIT) is
# the commit the results are stamped with. Every step runs under `timeout -s INT`: at its limit
# a benchmark script writes the rows measured so far and the next step runs; steps that no
# longer fit the stage's budget ($WILDACTOR_STAGE_BUDGET_S) are skipped and logged as such.
# Without CUDA it is a dry run (the scripts say they have nothing to measure; model: tiny on CPU;
# files go to OUTDIR/dry-results, never into benchmarks/results). Exit status 1 if a step failed.
set -uo pipefail

STAGE=${1:-}
case "$STAGE" in tests | kernels | model) ;; *)
    echo "usage: bash benchmarks/gpu_session.sh tests|kernels|model [OUTDIR] [COMMIT]" >&2
    exit 2 ;;
esac
OUTDIR=${2:-${OUT:-/tmp/wildactor-gpu}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.." || exit 2
export WILDACTOR_GIT_COMMIT=${3:-${WILDACTOR_GIT_COMMIT:-unknown}}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
LOG=$OUTDIR/$STAGE.log
T0=$SECONDS
declare -A DEFAULT_BUDGET=([tests]=300 [kernels]=500 [model]=470)
BUDGET=${WILDACTOR_STAGE_BUDGET_S:-${DEFAULT_BUDGET[$STAGE]}}
SUMMARY=()
FAILED=0

left() { echo $((BUDGET - (SECONDS - T0))); }

# step NAME LIMIT_S CMD...: run CMD under `timeout -s INT` with min(LIMIT_S, time left) seconds
step() {
    local name=$1 limit=$2 l rc t
    shift 2
    l=$(left)
    if ((l < 15)); then
        echo "### $name: skipped, ${l} s left of the ${BUDGET} s budget"
        SUMMARY+=("$name: skipped (budget)")
        return 0
    fi
    ((limit > l)) && limit=$l
    echo "### $name: start $(date -u +%H:%M:%S), limit ${limit} s: $*"
    t=$SECONDS
    timeout -s INT -k 20 "$limit" "$@"
    rc=$?
    ((rc == 0)) || FAILED=1
    case $rc in
        124 | 137) rc="$rc (time limit: partial)" ;;
    esac
    echo "### $name: rc=$rc after $((SECONDS - t)) s"
    SUMMARY+=("$name: rc=$rc $((SECONDS - t)) s")
}

# optional NAME LIMIT_S CMD...: step only if the whole LIMIT_S still fits the budget
optional() {
    local name=$1 limit=$2
    if (($(left) < limit + 15)); then
        echo "### $name: skipped, $(left) s left, needs ${limit} s"
        SUMMARY+=("$name: skipped (budget)")
        return 0
    fi
    step "$@"
}

gpu_state() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
        --format=csv 2>&1 || echo "nvidia-smi not available"
}

pack() {  # the files of benchmarks/results/ this call wrote, paths relative to the repo root
    local files
    files=$(find benchmarks/results -type f -newer "$STAMP" 2>/dev/null)
    if [[ -z $files ]]; then
        echo "### pack: no result files written"
        return 0
    fi
    # shellcheck disable=SC2086
    tar czf "$OUTDIR/${STAGE}_results.tar.gz" $files && echo "### pack: $OUTDIR/${STAGE}_results.tar.gz:" && tar tzf "$OUTDIR/${STAGE}_results.tar.gz"
}

run_tests() {
    step info 60 "$PY" -m wildactor_kernels.model.cli info
    gpu_state
    local extra=()
    if [[ $CUDA == 1 ]] && "$PY" -c "import xdist" 2>/dev/null; then
        extra+=(-n 8 --dist load)  # 8 workers on 16 cores: the Triton compiles of the tests overlap
    fi
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        extra+=(--timeout 240)
    fi
    # shellcheck disable=SC2086
    step pytest $(($(left) - 10)) "$PY" -m pytest -q ${PYTEST_TARGETS:-tests} -rs -p no:cacheprovider \
        --durations=25 --junitxml="$OUTDIR/junit.xml" "${extra[@]}"
}

run_kernels() {
    gpu_state
    local att=(--shapes wan5b-720p wan1.3b-480p wan14b-720p --ops joint cached)
    step attention 280 "$PY" benchmarks/bench_attention.py "${att[@]}" --impls ours-fused ours-prologue \
        ours-norope sdpa-cudnn-2call sdpa-flash-2call flash-attn-2call sdpa-cudnn-cat ours-hopper auto
    step lora 90 "$PY" benchmarks/bench_lora.py
    if [[ $CUDA == 1 ]]; then
        step quant 75 "$PY" benchmarks/bench_quant.py
    else
        step quant 75 "$PY" benchmarks/bench_quant.py --sections memory --out-dir "$OUTDIR/dry-results"
    fi
    step rope 45 "$PY" benchmarks/bench_rope.py --impls triton eager --out bench_rope.json
    optional attention-compiled-peers 150 "$PY" benchmarks/bench_attention.py --shapes wan5b-720p --ops joint \
        --impls flex-blockmask compile-ref
    # the auto dispatcher's candidates, timed as auto runs them; the table lands in $OUTDIR
    # (commit it as wildactor_kernels/attention/backend_table.json)
    optional attention-dispatch 120 "$PY" benchmarks/bench_attention.py --shapes wan5b-720p --no-bwd \
        --ops dispatch --write-table "$OUTDIR/backend_table.json"
    optional rope-compile 60 "$PY" benchmarks/bench_rope.py --shapes wan5b-720p --impls compile --out bench_rope.json
    pack
}

run_model() {
    gpu_state
    if [[ $CUDA == 1 ]]; then
        step model-wan5b-720p 260 "$PY" benchmarks/bench_model.py --shapes wan5b-720p --compile-timeout 90
        step model-wan1.3b-480p 200 "$PY" benchmarks/bench_model.py --shapes wan1.3b-480p --compile-timeout 90
    else
        step model-tiny-cpu 120 "$PY" benchmarks/bench_model.py --device cpu --shapes tiny \
            --json "$OUTDIR/dry-results/model_step.jsonl"
    fi
    pack
}

main() {
    echo "### gpu_session $STAGE: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $WILDACTOR_GIT_COMMIT, budget ${BUDGET} s, out $OUTDIR"
    CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
    [[ $CUDA == 1 ]] || echo "### no CUDA device: dry run"
    # kernels/model: one run id for every script of this call (several processes, one session)
    [[ $STAGE == tests ]] || export WILDACTOR_RUN_ID=${WILDACTOR_RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)-$STAGE}
    STAMP=$(mktemp)
    sleep 1  # files written from now on are newer than the stamp
    "run_$STAGE"
    rm -f "$STAMP"
    echo "### gpu_session $STAGE done in $((SECONDS - T0)) s:"
    printf '###   %s\n' "${SUMMARY[@]}"
    return "$FAILED"
}

main 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
