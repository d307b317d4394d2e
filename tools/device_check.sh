#!/usr/bin/env bash
# The checks for a GPU, in one call of under 10 minutes on a machine with ONE CUDA GPU, from the
# repository root:
#
#   bash tools/device_check.sh                        # report in $OUT/report.md ($OUT: default /tmp/device_check)
#   DEVICE_CHECK_DRY_RUN=1 bash tools/device_check.sh # print the steps and write the report, run nothing
#   DEVICE_CHECK_ONLY="llama_step quickstart" bash tools/device_check.sh   # only these steps
#
# Steps, in order of importance (each under its own timeout, and none started once the whole budget,
# DEVICE_CHECK_BUDGET_S, default 540 s, is spent; a failing step does not stop the later ones):
#   env              the GPU, torch, triton and the optional packages present
#   install          this checkout into the machine's python (PYTHON, default python3: it holds a CUDA torch
#                    and triton), --no-deps: there is no package index to reach, deepspeed is not
#                    needed here (megatron-core only for a row of peers). Where pip cannot install it (the H200 image's pip runs
#                    `setup.py develop`, which fetches build dependencies), the checkout is used in place:
#                    megatron_eslm/kernels links to kernels/ for the run (removed at exit), PYTHONPATH=.
#   wheels           the wheels under wheels/ (git-ignored) installed --no-deps, for packages the machine lacks
#                    and cannot download: the coordinator fills it beforehand, e.g.
#                      pip download --no-deps torchao -d wheels/      # then carry: ["wheels"]
#                    (lm_head_bench's Liger-Kernel and Cut Cross-Entropy rows: pip download --no-deps liger-kernel
#                    cut-cross-entropy -d wheels/, both pure-Python wheels; docs/benchmarks.md)
#   nccl_faults      issue 29's GPU checks (tests/test_nccl_readiness.py -k gpu): a one-rank NCCL group with
#                    --distributed-timeout-minutes 0.1 and the stream blocked by torch.cuda._sleep under an
#                    all-reduce, where the watchdog's line must come before NCCL's own timeout; a checkpoint
#                    whose rng["cuda"] holds 8 devices' states loading on this one
#   cuda_tests       the CUDA-only tests but the Triton and CP ones (the test files with a CUDA skipif, `-k cuda`):
#                    training steps per policy under torch.cuda.set_sync_debug_mode("error") (any host sync
#                    outside the inherent ones raises), recompute on CUDA
#   cp_attention     context parallelism's attention on CUDA (tests/test_context_parallel.py, test_cp_ring.py
#                    -k cuda): the all-gather form's lower-right masks and the ring's blocks and log-sum-exp
#                    merge (C = 4 simulated ranks) with grouped queries, bf16 and fp32, against fused causal SDPA
#   pp4_bubble       issue 31's bubble on the machine's CPU cores, a core per rank (no GPU: CUDA_VISIBLE_DEVICES
#                    is emptied): tools/bench_pipeline_bubble.py --pp 4 --layers 8 --hidden 768, m = 8, plain 1F1B
#                    against the interleaved schedule (VP2): the first stage's measured idle time, and the ratio
#                    tools/scaling_model.py predicts
#   attention_tests  --attention-backend on CUDA (tests/test_attention_backend.py -k cuda): two bf16 steps under
#                    each backend against math, and context parallelism's lower-right mask (CausalBias) under
#                    auto, flash (grouped queries) and efficient running without being materialised
#   fp8_tests        --fp8-format's CUDA tests (tests/test_fp8.py -k cuda: FP8 steps against bf16); needs
#                    torchao (the wheels step) and a GPU of compute capability 8.9+
#   triton_tests     the compiled Triton LM-head kernels against torch in bf16 and fp32 (`TestOnGPU`); slow on a
#                    fresh machine (the autotuner compiles every tile for every dtype)
#   lm_head_bench    tools/bench_lm_head_triton.py (quick shapes), with the Liger and CCE rows when installed
#   gpt2_step_*      tools/bench_train_step.py at the GPT-2 124M shape in bf16: dense vs ESLM keep 0.3
#                    (alpha 0.7, the three threshold modes) with MFU, Triton head, then torch head with the
#                    AdamW implementations
#   llama_step       the same at the Llama-1B shape: dense, ESLM keep 0.3, AdamW implementations, recompute
#                    (none / selective / full uniform 1), time and peak memory
#   llama_fp8_step   bench_train_step.py at the Llama-1B shape: dense bf16 against --fp8-format hybrid and e4m3
#   compile_*        tools/bench_train_step.py --compile at the GPT-2 124M (compile_gpt2) and the Llama-1B
#                    (compile_llama) shapes in bf16: dense and ESLM keep 0.3, eager and with each layer compiled
#                    (--compile; the compiled rows' warmup steps compile), the Triton head
#   llama_memory     tools/bench_memory.py --preset llama-1b on cuda: saved activations per recompute variant
#   save_bench       tools/fault_drill.py --save-bench: how long a save of the GPT-2 124M shape (weights and
#                    AdamW moments, ~1.4 GiB) blocks training, synchronous and --async-save
#   peers            tools/bench_peers.py at the GPT-2 124M and Llama-1B shapes in bf16: our step (and --compile)
#                    against transformers' GPT2LMHeadModel / LlamaForCausalLM, eager and torch.compile'd, and
#                    megatron-core's GPTModel (local spec), tokens/s, TFLOP/s and MFU. Needs transformers (and
#                    megatron-core for its row) on the machine: carry their wheels (docs/benchmarks.md, "Peers").
#                    Past the default budget with the steps before it: run it alone, DEVICE_CHECK_ONLY=peers
#   quickstart       the quickstart's data and a 20-iteration run on cuda (fp32), then quickstart_bf16: the
#                    same model for 20 iterations with --bf16 --timing-log-level 1, printing its metrics
#                    record (time_*_ms, tflops_per_gpu, mfu, max_memory_allocated)
#   fp8_loss         200 iterations on the quickstart's data (its step first), bf16 then --fp8-format hybrid:
#                    the mean lm_loss of the last 20 within 1% of bf16's. Not reached within the default
#                    budget: DEVICE_CHECK_ONLY="install wheels fp8_tests llama_fp8_step quickstart fp8_loss"
#   selection_study  issue 28's comparison at the GPT-2 124M shape in bf16 (tools/selection_study.py, seed 1):
#                    STUDY_VARIANTS (default dense, sequence ESLM at keep 0.5, LFR mask: the CPU study's policy
#                    that saves compute and its one winner where data repeats, as it does here: 20 M tokens
#                    read a corpus of a few M several times) at dense's executed FLOPs in 600 steps of 32 x 1024
#                    tokens, on the standard library (train)
#                    and the licenses text (held-out domain), vocabulary 32768; the table comes back in
#                    $OUT/selection_study/. About 3 minutes a variant: not reached within the default budget,
#                    run it alone: DEVICE_CHECK_ONLY=selection_study DEVICE_CHECK_BUDGET_S=580. Its data is
#                    built here, offline (the machine has no network), and carried (`carry: ["runs/device_study"]`):
#                      mkdir -p runs/device_study && cat /usr/share/common-licenses/* > runs/device_study/licenses.txt
#                      python tools/selection_study.py --prepare-only $STUDY_DATA_FLAGS   # as below
# A step that needs a python package the machine lacks says so and is skipped. The report gives each step's
# command, exit status (124: its timeout) and time, and the end of its log; the whole logs are in
# $OUT/logs.tar.gz. Record the numbers in docs/benchmarks.md with the device, the date and this command.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-${TMPDIR:-/tmp}/device_check}
PY=${PYTHON:-python3}
DRY=${DEVICE_CHECK_DRY_RUN:-0}
BUDGET=${DEVICE_CHECK_BUDGET_S:-540}
ONLY=${DEVICE_CHECK_ONLY:-}  # step names to run (a rerun of some), default all
MIN_STEP_S=20  # a step that could run less than this is not started
WORK=$(mktemp -d)  # logs and the quickstart's data: never under $OUT (only a few files come back from it)
LINK=megatron_eslm/kernels  # the in-place fallback's link (see install), removed at exit
trap 'rm -rf "$WORK"; [ -L "$LINK" ] && rm -f "$LINK"' EXIT
mkdir -p "$OUT" "$WORK/logs"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHON="$PY" WORK
START=$SECONDS
: > "$WORK/rows.md"
: > "$WORK/sections.md"

write_report() {
    {
        echo "# Device check"
        echo
        echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); host $(hostname); checkout $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo "- GPU: $( (nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none) | head -n 1)"
        echo "- command: \`bash tools/device_check.sh\`$([ "$DRY" = 1 ] && echo ' (dry run: nothing was run)')"
        echo "- $((SECONDS - START)) s of the ${BUDGET} s budget used"
        echo
        echo "| step | exit | seconds | command |"
        echo "|---|---|---:|---|"
        cat "$WORK/rows.md"
        echo
        cat "$WORK/sections.md"
    } > "$OUT/report.md"
    tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs 2>/dev/null
}

record() {  # record NAME STATUS SECONDS COMMAND [LOG]
    local name=$1 status=$2 secs=$3 cmd=$4 log=${5:-}
    echo "| $name | $status | $secs | \`$cmd\` |" >> "$WORK/rows.md"
    {
        echo "## $name: $status"
        echo
        echo "\`$cmd\` ($secs s)"
        echo
        if [ -n "$log" ] && [ -s "$log" ]; then
            echo '```'
            tail -n 60 "$log"
            echo '```'
            echo
        fi
    } >> "$WORK/sections.md"
    echo "== $name: $status ($secs s)"
    write_report
}

missing_modules() {  # the python modules of "$@" that $PY cannot find (found without importing them)
    [ $# -eq 0 ] && return
    "$PY" -c 'import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' "$@" \
        2>/dev/null || echo "$* (python $PY did not start)"
}

step() {  # step NAME TIMEOUT_S "MODULES NEEDED" COMMAND...: run it with its timeout, log it, record it
    local name=$1 limit=$2 needs=$3; shift 3
    local cmd log="$WORK/logs/$name.log" left=$((BUDGET - (SECONDS - START))) missing
    [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]] && return
    cmd=$(printf '%q ' "$@")
    cmd=${cmd% }
    missing=$(missing_modules $needs)
    if [ -n "$missing" ]; then
        record "$name" "skipped: needs python module(s) $missing, not installed for $PY (install them, e.g. from wheels, and rerun)" 0 "$cmd"
        return
    fi
    if [ "$left" -lt "$MIN_STEP_S" ]; then
        record "$name" "not run: ${left} s of the budget left" 0 "$cmd"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$DRY" = 1 ]; then
        echo "would run (timeout $limit s): $cmd"
        record "$name" "dry run (timeout $limit s)" 0 "$cmd"
        return
    fi
    echo "== $name (timeout $limit s): $cmd"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    local rc=$?
    local status="exit $rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="exit $rc (timed out after $limit s)"
    record "$name" "$status" $((SECONDS - t0)) "$cmd" "$log"
}

environment() {  # the GPU, python, torch and the packages the steps may need
    nvidia-smi
    "$PYTHON" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())'
    "$PYTHON" -m pip list 2>/dev/null | grep -i -E '^(triton|sentencepiece|pytest|hypothesis|deepspeed|transformers|megatron-core|tensorboard|numpy|setuptools) '
}
export -f environment

# The quickstart's model for 20 iterations under --bf16 with phase timers, on its data (the quickstart step's),
# then the last training record of its metrics file, checked for the timing and throughput fields.
quickstart_bf16() {
    local qs=$WORK/quickstart
    [ -f "$qs/stdlib_text_document.idx" ] || { echo "no quickstart data in $qs (the quickstart step failed)"; return 2; }
    "$PYTHON" -m megatron_eslm.pretrain --num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 128 \
        --max-position-embeddings 128 --micro-batch-size 16 --global-batch-size 16 --train-iters 20 --lr 1e-3 \
        --lr-warmup-iters 2 --hidden-dropout 0.0 --attention-dropout 0.0 --data-path "$qs/stdlib_text_document" \
        --split 95,5,0 --tokenizer-type SentencePieceTokenizer --tokenizer-model "$qs/tokenizer.model" \
        --selection eslm --eslm-alpha 0.7 --eval-interval 1000 --eval-iters 1 --log-interval 5 --num-workers 0 \
        --bf16 --timing-log-level 1 --metrics-file "$qs/bf16_metrics.jsonl" || return
    "$PYTHON" - "$qs/bf16_metrics.jsonl" <<'EOF'
import json, sys
import torch
record = [json.loads(line) for line in open(sys.argv[1]) if '"time_' in line][-1]  # the last training record
print(json.dumps(record, sort_keys=True, indent=1))
wanted = ["time_forward_backward_ms", "time_optimizer_ms", "tflops_per_gpu", "mfu", "max_memory_allocated"]
bad = [key for key in wanted if key not in record or (record[key] is None and torch.cuda.is_available())]
print("missing or null: " + ", ".join(bad) if bad else ", ".join(wanted) + ": all set")
phases = sum(value for key, value in record.items() if key.startswith("time_") and key != "time_threshold_comm_ms")
share = phases / record["iteration_time_ms"]
print(f"phases add up to {share:.4f} of iteration_time_ms (must be within 5%)")
sys.exit(1 if bad or abs(share - 1) > 0.05 else 0)
EOF
}
export -f quickstart_bf16

peers() {  # both presets, the second run even when the first fails
    local rc=0
    "$PYTHON" tools/bench_peers.py --preset gpt2-124m --steps 10 || rc=$?
    "$PYTHON" tools/bench_peers.py --preset llama-1b --steps 5 || rc=$?
    return $rc
}
export -f peers

# --fp8-format against bf16 over 200 iterations of a model whose linears are multiples of 16, on the
# quickstart's data: the mean lm_loss of the last 20 iterations within 1%.
fp8_loss() {
    local qs=$WORK/quickstart format
    [ -f "$qs/stdlib_text_document.idx" ] || { echo "no quickstart data in $qs (the quickstart step failed)"; return 2; }
    for format in none hybrid; do
        "$PYTHON" -m megatron_eslm.pretrain --num-layers 4 --hidden-size 512 --num-attention-heads 8 \
            --seq-length 256 --micro-batch-size 16 --global-batch-size 16 --train-iters 200 --lr 1e-3 \
            --lr-warmup-iters 20 --hidden-dropout 0.0 --attention-dropout 0.0 --data-path "$qs/stdlib_text_document" \
            --split 95,5,0 --tokenizer-type SentencePieceTokenizer --tokenizer-model "$qs/tokenizer.model" \
            --eval-iters 0 --log-interval 1 --num-workers 0 --bf16 --metrics-file "$qs/fp8_$format.jsonl" \
            $([ "$format" = none ] || echo --fp8-format $format) || return
    done
    "$PYTHON" - "$qs/fp8_none.jsonl" "$qs/fp8_hybrid.jsonl" <<'EOF'
import json, sys
losses = [[json.loads(line)["lm_loss"] for line in open(path) if '"lm_loss"' in line][-20:] for path in sys.argv[1:]]
bf16, fp8 = (sum(values) / len(values) for values in losses)
ratio = fp8 / bf16
print(f"mean lm_loss of the last 20 of 200 iterations: bf16 {bf16:.4f}, fp8 hybrid {fp8:.4f}, ratio {ratio:.4f} "
      "(must be within 1%)")
sys.exit(0 if abs(ratio - 1) <= 0.01 else 1)
EOF
}
export -f fp8_loss

# the CUDA-only tests' files but those of their own steps
TESTS=$(grep -l "skipif(not torch.cuda.is_available()" tests/test_*.py \
        | grep -v -e test_attention_backend.py -e test_fp8.py | tr '\n' ' ')
[ -n "$TESTS" ] || TESTS=tests/test_lm_head_triton.py  # never the whole suite
TRAIN_STEP=(tools/bench_train_step.py --bf16 --alphas 0.7)
STUDY_DATA=${STUDY_DATA:-runs/device_study}
STUDY_DATA_FLAGS="--text stdlib --heldout-text $STUDY_DATA/licenses.txt --stdlib-mb 14 --vocab-size 32768 --work-dir $STUDY_DATA"
STUDY=(tools/selection_study.py $STUDY_DATA_FLAGS --out-dir "$OUT/selection_study" --num-layers 12 --hidden-size 768
       --num-attention-heads 12 --seq-length 1024 --global-batch-size 32 --micro-batch-size 8 --lr 6e-4
       --dense-iters 600 --eval-interval 50 --eval-iters 4 --seeds 1 --threads 4 --run-flags=--bf16
       --variants ${STUDY_VARIANTS:-dense eslm-seq-0.5 lfr-mask})

step env 30 "" bash -c environment
step install 90 "pip setuptools" "$PY" -m pip install -q --no-deps --no-build-isolation -e .
if [ "$DRY" != 1 ] && ! "$PY" -c "import megatron_eslm.kernels" 2>/dev/null; then  # not installed: use it in place
    [ -e "$LINK" ] || ln -s ../kernels "$LINK"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    record install_in_place "$("$PY" -c "import megatron_eslm.kernels" 2>&1 && echo ok || echo failed)" 0 \
        "ln -s ../kernels $LINK; export PYTHONPATH=$PWD"
fi
step wheels 60 "pip" bash -c 'shopt -s nullglob; w=(wheels/*.whl); [ ${#w[@]} -eq 0 ] && { echo "no wheels under wheels/"; exit 0; }; "$PYTHON" -m pip install -q --no-deps --no-index "${w[@]}"'
step nccl_faults 90 "torch pytest megatron_eslm" "$PY" -m pytest -q -s -rfE -p no:cacheprovider \
    tests/test_nccl_readiness.py -k gpu
CUDA_TESTS=${TESTS//tests\/test_lm_head_triton.py/}  # triton_tests' file, and cp_attention's (their own steps)
CUDA_TESTS=${CUDA_TESTS//tests\/test_context_parallel.py/}
step cuda_tests 150 "torch triton pytest sentencepiece megatron_eslm" "$PY" -m pytest -q -rfE -p no:cacheprovider \
    ${CUDA_TESTS//tests\/test_cp_ring.py/} -k cuda
step cp_attention 90 "torch pytest megatron_eslm" "$PY" -m pytest -q -rfE -p no:cacheprovider \
    tests/test_context_parallel.py tests/test_cp_ring.py -k cuda
step pp4_bubble 120 "torch megatron_eslm" env CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 \
    "$PY" tools/bench_pipeline_bubble.py --pp 4 --layers 8 --hidden 768 --steps 4
step attention_tests 90 "torch pytest sentencepiece megatron_eslm" "$PY" -m pytest -q -rfE -p no:cacheprovider \
    tests/test_attention_backend.py -k cuda
step fp8_tests 90 "torch torchao pytest sentencepiece megatron_eslm" "$PY" -m pytest -q -rfE -p no:cacheprovider \
    tests/test_fp8.py -k cuda
step triton_tests 180 "torch triton pytest megatron_eslm" "$PY" -m pytest -q -rfE -p no:cacheprovider \
    tests/test_lm_head_triton.py -k OnGPU
step lm_head_bench 120 "torch triton megatron_eslm" "$PY" tools/bench_lm_head_triton.py
step gpt2_step_triton 90 "torch triton megatron_eslm" "$PY" "${TRAIN_STEP[@]}" --preset gpt2-124m --lm-head-impl triton \
    --thresholds sketch sketch-exact exact --steps 10 --optimizer-impls --recompute
step gpt2_step_torch 90 "torch megatron_eslm" "$PY" "${TRAIN_STEP[@]}" --preset gpt2-124m --lm-head-impl torch \
    --thresholds sketch sketch-exact exact --steps 10 --recompute
step llama_step 150 "torch megatron_eslm" "$PY" "${TRAIN_STEP[@]}" --preset llama-1b --lm-head-impl auto --steps 6
step llama_fp8_step 150 "torch torchao megatron_eslm" "$PY" "${TRAIN_STEP[@]}" --preset llama-1b --lm-head-impl auto \
    --alphas --optimizer-impls --recompute --steps 6 --fp8-format hybrid e4m3
step compile_gpt2 150 "torch triton megatron_eslm" "$PY" "${TRAIN_STEP[@]}" --preset gpt2-124m --lm-head-impl auto \
    --steps 6 --optimizer-impls --recompute --compile
step compile_llama 150 "torch triton megatron_eslm" "$PY" "${TRAIN_STEP[@]}" --preset llama-1b --lm-head-impl auto \
    --steps 4 --optimizer-impls --recompute --compile
step llama_memory 90 "torch megatron_eslm" "$PY" tools/bench_memory.py --preset llama-1b --bf16 --device cuda
step save_bench 120 "torch megatron_eslm" "$PY" tools/fault_drill.py --save-bench --vocab-size 32768
step peers 420 "torch transformers megatron_eslm" bash -c peers
step quickstart 120 "torch sentencepiece megatron_eslm" "$PY" -m megatron_eslm.quickstart --output-dir "$WORK/quickstart" \
    --train-iters 20 --log-interval 5 --corpus-mb 1 --eval-iters 1 --generate-tokens 20
step quickstart_bf16 120 "torch sentencepiece megatron_eslm" bash -c quickstart_bf16
step fp8_loss 150 "torch torchao sentencepiece megatron_eslm" bash -c fp8_loss
step selection_study 560 "torch sentencepiece megatron_eslm" "$PY" "${STUDY[@]}"
echo "report: $OUT/report.md; logs: $OUT/logs.tar.gz"
