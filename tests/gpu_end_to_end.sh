#!/usr/bin/env bash
# The README's commands end to end on a GPU host: make demo, make eval, evaluation visualize and export, 50-step
# DALI and FFCV training runs on the GPU (and a compiled one), and the whole test suite with CUDA visible (not
# only -m gpu).
# Usage: bash tests/gpu_end_to_end.sh [LOG_DIR] (default runs/gpu-e2e). Every step runs; the summary lists each
# step's status and the script exits non-zero if any failed. To rehearse it without a GPU: ALLOW_CPU=1 (and
# QUICK=1 for tiny training runs, SKIP_PYTEST=1 to leave out the suite).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-e2e}; mkdir -p "$out"
py=.venv/bin/python
if ! nvidia-smi -L >"$out/device.txt" 2>&1 && [ -z "${ALLOW_CPU:-}" ]; then
  echo "no GPU here (nvidia-smi failed): run this on a GPU host, or set ALLOW_CPU=1 to rehearse"; exit 2
fi
status=()
step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember the outcome
  local name=$1; shift
  echo "== $name: $*"
  if "$@" >"$out/$name.log" 2>&1; then status+=("ok      $name"); else status+=("FAILED  $name (see $out/$name.log)"); fi
  tail -n 3 "$out/$name.log"
}
train=(model.arch=resnet50 optim.batch_size=64 data.workers=8 optim.steps=50 run.checkpoint_every=50
  run.progress=false)
[ -n "${QUICK:-}" ] && train=(model.arch=resnet18 views.size=64 optim.batch_size=8 data.workers=2 optim.steps=4
  method.queue_size=2048 run.checkpoint_every=4 run.progress=false)
step setup make setup
step demo make demo
step eval make eval
step visualize $py -m densessl.evaluation visualize --features checkpoint:runs/demo random:resnet18 \
  --images data/synthetic/val/*/*_00000.jpg --out "$out/visualize"
step train-dali $py -m densessl.train "${train[@]}" data.backend=dali run.dir="$out/train-dali"
step train-ffcv $py -m densessl.train "${train[@]}" data.backend=ffcv run.dir="$out/train-ffcv"
# issue 19: the compiled, rarely synchronised step end to end (compare its pairs/s with benchmarks.train_step)
step train-compiled $py -m densessl.train "${train[@]}" data.backend=dali run.compile=true run.sync_every=25 \
  run.dir="$out/train-compiled"
step export $py -m densessl.evaluation export --checkpoint "$out/train-dali" --out "$out/export"
[ -z "${SKIP_PYTEST:-}" ] && step pytest env DENSESSL_REQUIRE_BACKENDS=1 $py -m pytest -q -rs
for f in "$out"/train-*/metrics.csv; do [ -f "$f" ] && echo "$f: $(head -n 1 "$f") / $(tail -n 1 "$f")"; done
printf '%s\n' "${status[@]}" | tee "$out/summary.txt"
! grep -q FAILED "$out/summary.txt"
