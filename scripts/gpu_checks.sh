#!/usr/bin/env bash
# Every GPU check of docs/perf.md in one command, for a session that has the `device` H100:
#   here:    make gpu-wheels                      (cp312 wheels the device image lacks -> .whl/)
#   device:  run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=600)
# Each step is time-boxed (the timeouts add up to 555 s, inside 10 minutes with the wheel install) and prints one JSON line
# (pgolf's contract); everything lands in $OUT/gpu_checks.log. `pgolf plan` runs on the CPU beside the
# GPU steps, and the last step puts each plan next to the `pgolf bench` it predicts: predicted and
# measured ms/step, memory and MFU in one table ($OUT/plan_vs_bench.md). Copy the numbers into
# docs/perf.md with the date and device.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels only: the device has no network
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
else
  export PYTHONPATH=$PWD
fi
step() {  # step SECONDS NAME CMD...: the full output in the log, the JSON line in $OUT/NAME.json
  local secs=$1 name=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S))" | tee -a "$LOG"
  timeout "$secs" "$@" > "$OUT/$name.out" 2>&1
  local rc=$?
  cat "$OUT/$name.out" >> "$LOG"
  tail -n 1 "$OUT/$name.out" > "$OUT/$name.json"
  tail -n 3 "$OUT/$name.out"
  echo "=== $name rc=$rc" | tee -a "$LOG"
}
PG="python3 -m pgolf.cli"
PR1855_STEP="train.train_batch_tokens=98304"  # one 98,304-token GPU step, as the record's per-GPU step
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$LOG"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$LOG"
# the predictions need no GPU: on the CPU, while the GPU steps run
( step 60 plan-baseline $PG plan --preset baseline --nproc 1
  step 60 plan-pr1855 $PG plan --preset pr1855 --nproc 1 --set $PR1855_STEP ) > "$OUT/plans.txt" 2>&1 &
PLANS=$!
step 170 pytest-gpu python3 -m pytest -q -m gpu -p no:cacheprovider tests
step 45 bench-baseline $PG bench --preset baseline
step 60 bench-pr1855-off $PG bench --preset pr1855 --set $PR1855_STEP --looping off
step 60 bench-pr1855-on $PG bench --preset pr1855 --set $PR1855_STEP --looping on
step 100 bench-quant-pr1855 $PG bench --quant --preset pr1855 --codecs brotli,pergroup:zpaq,pergroup:brotli
# recompiles logged: eager FlexAttention (no flash-attn) compiles per shape (dynamic=False), 8 at most
TORCH_LOGS=recompiles step 60 bench-ttt-pr1855 $PG bench --ttt --preset pr1855 --tokens 262144
wait $PLANS
cat "$OUT/plans.txt" | tee -a "$LOG"
python3 scripts/plan_vs_bench.py "$OUT" | tee "$OUT/plan_vs_bench.md" | tee -a "$LOG"
echo "done $(date -u +%H:%M:%S)" | tee -a "$LOG"
