#!/usr/bin/env bash
# The GPU checks of a session that has a GPU: GPU-marked tests, DALI mixed-decode loader throughput, the
# training step with each loader, compiled, and the trainer end to end. Logs go to $1 (default runs/gpu).
# Record the numbers in benchmarks/RESULTS.md.
set -uo pipefail
out=${1:-runs/gpu}; py=${PYTHON:-python3}; mkdir -p "$out"
cores=$(nproc)
nvidia-smi -L | tee "$out/device.txt"
$py -m pytest -q -m gpu tests/ 2>&1 | tee "$out/gpu_tests.log"
$py -m densessl.benchmarks.loader --backend torch,dali --device 0 --workers "$cores" --batch 256 --copies 16 \
    --epochs 1 --reps 3 2>&1 | tee "$out/loader.log"
$py -m densessl.benchmarks.dali_stages --device 0 --threads "$cores" --batch 256 --copies 16 2>&1 | tee "$out/dali_stages.log"
$py -m densessl.benchmarks.train_step --objectives vader,densecl,mocov2 --batch 128 --warmup 20 --steps 40 --copies 16 \
    --workers $((cores - 2)) --backends torch,dali 2>&1 | tee "$out/train_step.log"
$py -m densessl.benchmarks.train_step --batch 128 --warmup 20 --steps 60 --compile --sync-every 20 \
    --profile "$out/profile" 2>&1 | tee "$out/train_step_compiled.log"
# the trainer end to end, compiled, on 4,096 files (the embedded set is 2 batches per epoch, and every epoch's
# first batch waits for the workers): compare its median pairs/s with the compiled model-only step above
root=$($py -c "from densessl.benchmarks.loader import resolve_data; print(resolve_data('synthetic', 16))" | tail -n 1)
for backend in dali torch; do
  $py -m densessl.train data.path="$root" model.arch=resnet50 optim.batch_size=128 data.workers=$((cores - 2)) \
      optim.steps=300 run.compile=true run.sync_every=20 data.backend=$backend run.dir="$out/e2e-$backend" \
      run.progress=false run.checkpoint_every=1000 run.tensorboard=false 2>&1 | tail -n 3 | tee "$out/e2e-$backend.log"
  $py -c "import csv, statistics, sys; r = list(csv.DictReader(open(sys.argv[1])))[50:]
print(sys.argv[2], 'steps 51+: median', statistics.median(float(x['images_per_s']) for x in r), 'pairs/s,',
      'median data wait', statistics.median(float(x['data_wait']) for x in r))" \
      "$out/e2e-$backend/metrics.csv" "$backend" | tee -a "$out/e2e-$backend.log"
done
