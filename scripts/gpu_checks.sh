#!/usr/bin/env bash
# Every GPU check of docs/perf.md in one command, for a session that has the `device` H100:
#   here:    make gpu-wheels                      (cp312 wheels the device image lacks -> .whl/)
#   device:  run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=600)
# Each step is time-boxed, prints one JSON line (pgolf's contract) and everything lands in
# $OUT/gpu_checks.log; copy the numbers into docs/perf.md with the date and device.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
else
  export PYTHONPATH=$PWD
fi
step() {  # step SECONDS NAME CMD...
  local secs=$1 name=$2; shift 2
  echo "=== $name ($(date -u +%H:%M:%S))" | tee -a "$LOG"
  timeout "$secs" "$@" 2>&1 | tee -a "$LOG" | tail -n 3
  echo "=== $name rc=${PIPESTATUS[0]}" | tee -a "$LOG"
}
PG="python3 -m pgolf.cli"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$LOG"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$LOG"
step 150 "pytest -m gpu" python3 -m pytest -q -m gpu -p no:cacheprovider tests
step 60 "bench baseline" $PG bench --preset baseline
step 75 "bench pr1855 looping off" $PG bench --preset pr1855 --set train.train_batch_tokens=98304 --looping off
step 75 "bench pr1855 looping on" $PG bench --preset pr1855 --set train.train_batch_tokens=98304 --looping on
step 110 "bench quant pr1855" $PG bench --quant --preset pr1855 --codecs brotli,pergroup:zpaq,pergroup:brotli
step 70 "bench ttt pr1855" $PG bench --ttt --preset pr1855 --tokens 262144
echo "done $(date -u +%H:%M:%S)" | tee -a "$LOG"
