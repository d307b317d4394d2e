#!/usr/bin/env bash
# The GPU checks, in one call of the device tool (or by hand on any CUDA machine), from the repo root:
#
#   bash tools/device_check.sh            # results under $OUT (the device tool's folder) or ./device_check_out
#
# 1. installs this checkout without dependencies into the machine's own python (which holds a CUDA torch
#    and triton; deepspeed and megatron-core are not needed here);
# 2. runs the CUDA-only tests: the compiled Triton LM-head kernels against torch, and one training step
#    per policy under torch.cuda.set_sync_debug_mode("error") (any host sync outside the inherent ones,
#    `megatron_eslm/host_syncs.py`, raises);
# 3. runs the GPU benchmarks: the training step (dense vs ESLM, time and host syncs per step) in bf16 at
#    the GPT-2 124M shape, and the LM head.
# Each step's log goes to $OUT; a failing step does not stop the later ones. Record what it prints in
# docs/benchmarks.md with the device, the date and this command.
set -uo pipefail
OUT=${OUT:-device_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, report the status
    local name=$1; shift
    echo "== $name: $*"
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "== $name: exit $rc"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
step install "$PY" -m pip install -q --no-deps --no-build-isolation -e .
step versions "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
step cuda_tests "$PY" -m pytest -q -p no:cacheprovider tests/test_host_syncs.py tests/test_lm_head_triton.py \
    -k "cuda or OnGPU"
step bench_train_step "$PY" tools/bench_train_step.py --preset gpt2-124m --bf16 --lm-head-impl auto \
    --thresholds sketch sketch-exact exact --steps 10
step bench_lm_head "$PY" tools/bench_lm_head_triton.py
