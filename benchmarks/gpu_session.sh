#!/usr/bin/env bash
# The whole GPU session in ONE device call (benchmarks/GPU_RUNBOOK.md): at most 540 s, under the
# device tool's 570 s limit. The device tool runs it from the repo root:
#
#   bash benchmarks/gpu_session.sh [OUTDIR] [COMMIT]      # OUTDIR default $OUT, else /tmp/wildactor-gpu
#   bash benchmarks/gpu_session.sh --dry-run              # the plan, then every command checked on the CPU
#
# Steps, most valuable first, each under its own limit (seconds, `timeout -s INT`; LIMIT below):
#   info         wildactor info, nvidia-smi                                                    15
#   attn-fwd     wan5b-720p joint + cached forward: ours (prologue, fused, no-rope, hopper,
#                auto, fp8) against SDPA cuDNN two-call and the cuDNN concat form; max|err|
#                vs SDPA's default backend at that shape                                       140
#   gpu-tests    pytest -m gpu on the attention, rope, LoRA, quant tests (bf16 and fp16),
#                per-test timeout, no Inductor compiles (TORCH_COMPILE_DISABLE, -k not compile) 110
#   attn-bwd     wan5b-720p joint forward+backward: ours (prologue, fused) against cuDNN        90
#   attn-shapes  wan1.3b-480p and wan14b-720p, joint + cached forward                          55
#   dispatch     the auto dispatcher's candidates at wan5b-720p -> OUTDIR/backend_table.json   30
#   rope         bench_rope (triton, eager), wan5b-720p                                         25
#   quant        bench_quant --quick (per-layer FP8 GEMM + quantization kernel, block, memory)  30
#   lora         bench_lora, the three wan2.2-5b linears, fwd and fwd+bwd                       30
#   model        if >= 60 s are left: bench_model wan5b-720p at 4 layers, no torch.compile   the rest
#
# A step gets min(its limit, the time left of the 540 s budget); a step with under 15 s left
# is skipped and logged. At its limit a benchmark script writes the rows measured so far
# (exit 130; the step shows rc 124) and the next step runs. After EVERY step the results are
# copied into OUTDIR, so a run killed at the device limit still returns data:
#   OUTDIR/session.log        this log (tee'd as it runs)
#   OUTDIR/results.tar.gz     the files of benchmarks/results/ this run wrote (paths from the repo root)
#   OUTDIR/junit.xml          the GPU tests
#   OUTDIR/backend_table.json the dispatcher's measured table (merged into
#                             wildactor_kernels/attention/backend_table.json: GPU_RUNBOOK.md)
# (four files; the device tool returns at most 8 of 16 MiB). The copied tree has no .git:
# COMMIT (or $WILDACTOR_GIT_COMMIT) stamps the results. Without CUDA (or with --dry-run) the
# script prints the plan and then checks every step's command on the CPU without measuring
# (benchmarks/session_check.py: the script or module imports and its flags parse; the pytest
# selection collects); exit 0 when all pass. Exit status 1 if a step failed.
set -uo pipefail

SESSION_BUDGET_S=${WILDACTOR_SESSION_BUDGET_S:-540}
MIN_STEP_S=15
MODEL_MIN_S=60
STEPS=(info attn-fwd gpu-tests attn-bwd attn-shapes dispatch rope quant lora model)
declare -A LIMIT=([info]=15 [attn-fwd]=140 [gpu-tests]=110 [attn-bwd]=90 [attn-shapes]=55
                  [dispatch]=30 [rope]=25 [quant]=30 [lora]=30 [model]=0)  # model: the time left (>= 60 s)

DRY=0
if [[ ${1:-} == --dry-run ]]; then
    DRY=1
    shift
fi
OUTDIR=${1:-${OUT:-/tmp/wildactor-gpu}}
cd "$(dirname "$0")/.." || exit 2
export WILDACTOR_GIT_COMMIT=${2:-${WILDACTOR_GIT_COMMIT:-unknown}}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
T0=$SECONDS
SUMMARY=()
CHECKS=()
FAILED=0

plan() {
    local total=0 s rest
    echo "### plan: one run, budget ${SESSION_BUDGET_S} s (device limit 570 s), steps in order of value:"
    for s in "${STEPS[@]}"; do
        [[ $s == model ]] || total=$((total + LIMIT[$s]))
    done
    rest=$((540 - total))
    for s in "${STEPS[@]}"; do
        if [[ $s == model ]]; then
            printf '###   %-12s %4d s  (the time left, run only if >= %d s)\n' "$s" "$rest" "$MODEL_MIN_S"
        else
            printf '###   %-12s %4d s\n' "$s" "${LIMIT[$s]}"
        fi
    done
    echo "### planned total: ${total} s of fixed steps + model up to ${rest} s = $((total + rest)) s max (<= 540: $( ((total <= 540)) && echo ok || echo OVER))"
    if ((SESSION_BUDGET_S < 540)); then
        echo "### this run's budget is ${SESSION_BUDGET_S} s (WILDACTOR_SESSION_BUDGET_S): the last steps are cut or skipped"
    fi
    ((total <= 540 && SESSION_BUDGET_S <= 540))
}

left() { echo $((SESSION_BUDGET_S - (SECONDS - T0))); }

collect() {  # copy what this run wrote so far into OUTDIR (after every step)
    local files
    files=$(find benchmarks/results -type f -newer "$STAMP" 2>/dev/null | sort)
    if [[ -n $files ]]; then
        # shellcheck disable=SC2086
        tar czf "$OUTDIR/results.tar.gz.tmp" $files && mv "$OUTDIR/results.tar.gz.tmp" "$OUTDIR/results.tar.gz"
        local size
        size=$(stat -c %s "$OUTDIR/results.tar.gz" 2>/dev/null || echo 0)
        echo "### collect: results.tar.gz $((size / 1024)) KiB, $(echo "$files" | wc -l) files"
        ((size < 16 * 1024 * 1024)) || echo "### collect: WARNING results.tar.gz is over 16 MiB: the device tool will not return it"
    fi
    sync
}

# step NAME CMD...: run CMD under `timeout -s INT` with min(LIMIT[NAME], time left - 5) seconds
step() {
    local name=$1 limit=${LIMIT[$1]} l rc t
    shift
    if ((DRY)); then
        [[ -e $2 || $2 == -m ]] || { echo "### $name: MISSING $2"; FAILED=1; }
        echo "### $name ($([[ $name == model ]] && echo "the time left" || echo "${limit} s")): $*"
        CHECKS+=("$name"$'\t'"$(printf '%q ' "$@")")  # checked after the plan by session_check.py
        return 0
    fi
    l=$(($(left) - 5))
    if [[ $name == model ]]; then
        if ((l < MODEL_MIN_S)); then
            echo "### $name: skipped, ${l} s left (needs ${MODEL_MIN_S} s)"
            SUMMARY+=("$name: skipped (budget)")
            return 0
        fi
        limit=$l
    fi
    if ((l < MIN_STEP_S)); then
        echo "### $name: skipped, ${l} s left of the ${SESSION_BUDGET_S} s budget"
        SUMMARY+=("$name: skipped (budget)")
        return 0
    fi
    ((limit > l)) && limit=$l
    echo "### $name: start $(date -u +%H:%M:%S) (t=$((SECONDS - T0)) s), limit ${limit} s: $*"
    t=$SECONDS
    timeout -s INT -k 10 "$limit" "$@"
    rc=$?
    ((rc == 0)) || FAILED=1
    case $rc in
        124 | 137) rc="$rc (time limit: partial)" ;;
    esac
    echo "### $name: rc=$rc after $((SECONDS - t)) s"
    SUMMARY+=("$name: rc=$rc $((SECONDS - t)) s")
    collect
}

gpu_state() {
    ((DRY)) && return 0
    timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
        --format=csv 2>&1 || echo "nvidia-smi not available (or it hung)"
}

run_all() {
    local att=(benchmarks/bench_attention.py --min-reps 5)
    local fwd_impls=(ours-prologue ours-fused ours-norope ours-hopper auto sdpa-cudnn-2call sdpa-cudnn-cat
                     ours-fp8 ours-fp8-kernel ours-fp8-cache sage-2call fa3-fp8-2call)
    local tests=(tests/test_attention_kernels.py tests/test_rope_kernels.py tests/test_lora_kernels.py
                 tests/test_lora_module.py tests/test_quant.py tests/test_attention_hopper.py
                 tests/test_attention_dispatch.py tests/test_attention_fp8.py)
    local extra=()
    if ((DRY)); then
        extra+=(--timeout 60 -n 4 --dist load)
    else
        "$PY" -c "import pytest_timeout" 2>/dev/null && extra+=(--timeout 60)
        "$PY" -c "import xdist" 2>/dev/null && extra+=(-n 4 --dist load)  # the tests' Triton compiles overlap
    fi

    step info "$PY" -m wildactor_kernels.model.cli info
    gpu_state
    step attn-fwd "$PY" "${att[@]}" --shapes wan5b-720p --ops joint cached --no-bwd --impls "${fwd_impls[@]}"
    TORCH_COMPILE_DISABLE=1 step gpu-tests "$PY" -m pytest -q "${tests[@]}" -m gpu -k "not compile" -rs \
        -p no:cacheprovider --durations=15 --junitxml="$OUTDIR/junit.xml" "${extra[@]}"
    step attn-bwd "$PY" "${att[@]}" --shapes wan5b-720p --ops joint --impls ours-prologue ours-fused sdpa-cudnn-2call
    step attn-shapes "$PY" "${att[@]}" --shapes wan1.3b-480p wan14b-720p --ops joint cached --no-bwd \
        --impls "${fwd_impls[@]}"
    # the auto dispatcher's candidates timed as auto runs them; the table lands in $OUTDIR
    # (merged into wildactor_kernels/attention/backend_table.json after the run: GPU_RUNBOOK.md)
    step dispatch "$PY" benchmarks/bench_attention.py --shapes wan5b-720p --no-bwd --ops dispatch \
        --write-table "$OUTDIR/backend_table.json"
    step rope "$PY" benchmarks/bench_rope.py --shapes wan5b-720p --impls triton eager --out bench_rope.json
    step quant "$PY" benchmarks/bench_quant.py --quick
    # ours right after the cuBLAS floor: a step cut at its limit (first-call autotuning of three
    # linears) still has our rows and their vs-base ratio
    step lora "$PY" benchmarks/bench_lora.py --impls base triton fold_triton peft unsloth fold
    step model "$PY" benchmarks/bench_model.py --shapes wan5b-720p --layers 4 --no-compile --paths eager ours-bf16 ours-fp8
    gpu_state
}

main() {
    echo "### gpu_session: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $WILDACTOR_GIT_COMMIT, out $OUTDIR"
    plan || return 1
    local cuda=0
    ((DRY)) || cuda=$(timeout 60 "$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
    if [[ $cuda != 1 ]]; then
        echo "### dry run (no CUDA device or --dry-run): the commands, nothing measured"
        DRY=1
        run_all
        # every command once more, on the CPU: its script or module imports and its flags parse
        # (pytest: --collect-only of the same selection); nothing is measured or written
        printf '%s\n' "${CHECKS[@]}" | "$PY" benchmarks/session_check.py || FAILED=1
        return "$FAILED"
    fi
    export WILDACTOR_RUN_ID=${WILDACTOR_RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)-session}  # one run id for every script
    STAMP=$(mktemp)
    sleep 1  # files written from now on are newer than the stamp
    run_all
    collect
    rm -f "$STAMP"
    echo "### gpu_session done in $((SECONDS - T0)) s:"
    printf '###   %s\n' "${SUMMARY[@]}"
    return "$FAILED"
}

if ((DRY)); then
    main
    exit $?
fi
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
main 2>&1 | tee "$OUTDIR/session.log"
exit "${PIPESTATUS[0]}"
