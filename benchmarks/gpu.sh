#!/usr/bin/env bash
# The GPU checks of a session that has a GPU: GPU-marked tests, DALI mixed-decode loader throughput and the
# training step with each loader. Logs go to $1 (default runs/gpu). Record the numbers in benchmarks/RESULTS.md.
set -uo pipefail
out=${1:-runs/gpu}; py=${PYTHON:-python3}; mkdir -p "$out"
cores=$(nproc)
nvidia-smi -L | tee "$out/device.txt"
$py -m pytest -q -m gpu tests/ 2>&1 | tee "$out/gpu_tests.log"
$py -m benchmarks.loader --backend torch,dali --device 0 --workers "$cores" --batch 256 --copies 16 \
    --epochs 1 --reps 3 2>&1 | tee "$out/loader.log"
$py -m benchmarks.dali_stages --device 0 --threads "$cores" --batch 256 --copies 16 2>&1 | tee "$out/dali_stages.log"
$py -m benchmarks.train_step --objectives vader,densecl,mocov2 --batch 128 --warmup 20 --steps 40 --copies 16 \
    --workers $((cores - 2)) --backends torch,dali 2>&1 | tee "$out/train_step.log"
$py -m benchmarks.train_step --batch 128 --warmup 20 --steps 40 --compile --sync-every 20 --no-anchor \
    --profile "$out/profile" 2>&1 | tee "$out/train_step_compiled.log"
