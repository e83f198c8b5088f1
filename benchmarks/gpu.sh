#!/usr/bin/env bash
# One prepared GPU run: everything our GPU evidence needs, in order of value, inside one 10-minute command on a
# machine with no network, its own Python and torch, and only what `make gpu-bundle` carried (issue 31).
#
#   make gpu-bundle                               # here: .gpu-bundle/core (our wheel + what the image lacks)
#   bash benchmarks/gpu.sh [OUT]                  # there, carrying .gpu-bundle/core: steps below, OUT/results.md
#   bash benchmarks/gpu.sh --receive-dali N       # there, one command per part, while the machine stays up: keep
#                                                 # DALI's part N (carry .gpu-bundle/dali/part-NN and
#                                                 # .gpu-bundle/dali/SHA256; make gpu-bundle DALI=1 cuts them)
#   bash benchmarks/gpu.sh --rehearse [OUT]       # here, on the CPU at tiny sizes (make test runs it)
#
# Steps, each time-boxed, all within DEADLINE seconds (default 540): 1. pytest with CUDA visible (the gpu tests
# and the tests whose code runs on CUDA when it is there); 2. the step benchmark, the ResNet-50 anchor then VADeR,
# DenseCL and MoCo v2, eager and compiled, then VADeR and MoCo v2 on a ViT-S/16 (eager); 3. the trainer end to end
# on 4,096 files, compiled, with the torch loader (and DALI's when it was carried), against the model-only step;
# 4. make demo's run and evaluation all on the GPU; 5. make compare and make ablations with the GPU preset
# (PRESET=gpu) in the time left. Every step's output goes to OUT/results.md.
#
# The DALI parts wait between commands in DALI_DIR (default /tmp/densessl-dali-UID), with the SHA256 they came
# with. What is installed from there runs as this user (root on the GPU machine), so that folder must be private:
# a real folder, not a link, owned by this user and writable by no one else, under parents no one else can rename
# it in (--receive-dali makes it, mode 0700). --receive-dali refuses any other; a run ignores it and goes on
# without DALI. Either way, nothing another local user put there is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
DALI_DIR=${DALI_DIR:-/tmp/densessl-dali-$(id -u)}

. slurm/private_dir.sh  # private_dir DIR [create]

if [ "${1:-}" = --receive-dali ]; then
  part=$(printf '.gpu-bundle/dali/part-%02d' "$((10#${2:?usage: gpu.sh --receive-dali N}))")
  [ -f "$part" ] && [ -f .gpu-bundle/dali/SHA256 ] || { echo "gpu.sh: carry $part and .gpu-bundle/dali/SHA256"; exit 1; }
  if ! dir=$(private_dir "$DALI_DIR" create); then
    echo "gpu.sh: error: $dir: DALI's parts wait only in a private folder of ours; remove it, or choose another" \
      "with DALI_DIR="
    exit 1
  fi
  cp "$part" .gpu-bundle/dali/SHA256 "$dir"/ || exit 1
  echo "gpu.sh: DALI parts here: $(cd "$dir" && ls part-* | tr '\n' ' ')($(cat "$dir/SHA256"))"
  exit 0
fi
rehearse=; [ "${1:-}" = --rehearse ] && { rehearse=1; shift; }
out=${1:-runs/gpu}; mkdir -p "$out"; out=$(cd "$out" && pwd)
results=$out/results.md
start=$SECONDS; deadline=${DEADLINE:-540}
if [ -n "$rehearse" ]; then
  py=${PYTHON:-.venv/bin/python}; export CUDA_VISIBLE_DEVICES=
else
  py=${PYTHON:-python3}
fi
log() { echo "$*" | tee -a "$results"; }

# --- install: the carried wheels into a temporary target, no index, no build
site=$(mktemp -d /tmp/densessl-site.XXXXXX)
$py -m pip install -q --no-index --no-deps --no-compile --target "$site" "${BUNDLE:-.gpu-bundle}"/core/*.whl ||
  { echo "gpu.sh: cannot install ${BUNDLE:-.gpu-bundle}/core: run make gpu-bundle and carry .gpu-bundle"; exit 1; }
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
dali=no dali_note=
if [ -e "$DALI_DIR" ] || [ -L "$DALI_DIR" ]; then
  if ! dir=$(private_dir "$DALI_DIR"); then
    dali_note=" (ignored DALI parts: $dir)"
    echo "gpu.sh: ignoring DALI parts: $dir; running without DALI"
  elif [ -f "$dir/SHA256" ]; then  # received with the parts from the carried bundle, kept where only we write
    want=$(cut -d' ' -f1 "$dir/SHA256"); n=$(cut -d' ' -f3 "$dir/SHA256")
    if [[ $want =~ ^[0-9a-f]{64}$ ]] && [ "$(ls "$dir"/part-* 2>/dev/null | wc -l)" = "$n" ] &&
       [ "$(cat "$dir"/part-* | sha256sum | cut -d' ' -f1)" = "$want" ]; then
      rm -rf "$dir/wheels"  # ours: what an earlier run unpacked here
      mkdir -m 700 "$dir/wheels" && cat "$dir"/part-* | tar -x --no-same-owner -C "$dir/wheels" &&
        $py -m pip install -q --no-index --no-deps --no-compile --target "$site" "$dir"/wheels/*.whl && dali=yes
    else
      echo "gpu.sh: DALI parts incomplete or damaged in $dir: running without DALI"
    fi
  fi
fi
[ $dali = no ] && $py -c "import nvidia.dali" 2>/dev/null && dali=yes  # installed already (make gpu-check)
: >"$results"
log "# benchmarks/gpu.sh $(date -u +%Y-%m-%dT%H:%MZ)${rehearse:+ (rehearsal on the CPU)}"
log ""
log '```'
{ nvidia-smi -L 2>/dev/null || echo "no GPU (nvidia-smi failed)"; } | tee -a "$results"
$py -c "import sys, torch, densessl.pipeline as p; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.cuda.is_available(), '| densessl from', p.__path__[0])" 2>&1 | tee -a "$results"
log "DALI carried: $dali$dali_note"
log '```'

failed=0
step() {  # step NAME BOX_SECONDS COMMAND...: run within min(BOX, time left), its output into results.md
  local name=$1 box=$2; shift 2
  local left=$((deadline - (SECONDS - start) - 10))
  [ "$box" -gt "$left" ] && box=$left
  if [ "$box" -lt 20 ]; then log ""; log "## $name: skipped, ${left}s left"; return; fi
  local t0=$SECONDS
  timeout --kill-after=10 "$box" "$@" >"$out/$name.log" 2>&1; local rc=$?
  local verdict=ok
  case $rc in 0) ;; 124|137) verdict="TIMED OUT at ${box}s" ;; *) verdict="FAILED (exit $rc)" ;; esac
  [ "$verdict" = ok ] || failed=1
  [ $rc != 0 ] && [ "$name" = data ] && data_failed=1
  log ""; log "## $name: $verdict, $((SECONDS - t0)) s"; log ""; log '```'; log "\$ $*"
  grep -v -e 'FutureWarning' -e '^  warnings.warn' -e '^  net = Distributed' "$out/$name.log" | tail -n 60 | tee -a "$results"
  log '```'
}

if [ -n "$rehearse" ]; then  # the same steps, tiny
  data=${DATA:?the rehearsal needs DATA=<a tiny ImageFolder set with train/ and val/>}
  step pytest 120 $py -m pytest -q -rs -p no:cacheprovider -m gpu tests/
  step train_step 120 $py -m densessl.benchmarks.train_step --objectives vader,densecl,mocov2 --arch resnet18 \
    --size 64 --batch 4 --warmup 1 --steps 1 --workers 1 --data "$data/train" --no-anchor
  step train_step_vit 120 $py -m densessl.benchmarks.train_step --objectives vader,mocov2 --arch vit_tiny_patch8_224 \
    --size 64 --batch 4 --warmup 1 --steps 1 --no-anchor
  step trainer_e2e 120 $py -m densessl.train data.path="$data/train" model.arch=resnet18 views.size=64 \
    optim.batch_size=8 data.workers=1 optim.steps=3 method.queue_size=256 views.num_matches=8 views.min_matches=8 \
    run.dir="$out/e2e-torch" run.progress=false run.tensorboard=false
  step demo_and_evaluation 180 bash -c "$py -m densessl.experiments.demo --tiny --synthetic-dir '$out/demo-data' \
    --out '$out/demo' --steps 2 --batch 8 --view-size 64 && $py -m densessl.evaluation all --checkpoint '$out/demo' \
    --root '$out/demo-data' --out '$out/demo/eval' --probe-steps 5 --depth-bound-steps 2"
  step compare 300 $py -m densessl.experiments.compare --tiny --preset gpu --device cpu \
    --synthetic-dir "$out/demo-data" --out "$out/compare"
else
  cores=$(nproc); data_failed=
  step data 90 $py -c "from densessl.benchmarks.loader import resolve_data; print(resolve_data('synthetic', 16))"
  root=$(tail -n 1 "$out/data.log")
  [ -n "$data_failed" ] && root=/nonexistent  # the trainer steps then fail naming it, after the tests ran
  step pytest 150 bash -c "$py -m pytest -q -rs -p no:cacheprovider -m gpu tests/ && $py -m pytest -q -rs \
    -p no:cacheprovider tests/test_losses.py tests/test_model.py tests/test_methods.py tests/test_augment.py \
    tests/test_dali.py"  # the gpu tests, then the files whose code runs on CUDA when it is there
  step train_step 120 $py -m densessl.benchmarks.train_step --objectives vader,densecl,mocov2 --batch 128 \
    --warmup 10 --steps 30 --workers $((cores - 2))
  step train_step_compiled 100 $py -m densessl.benchmarks.train_step --objectives vader,densecl,mocov2 --batch 128 \
    --warmup 15 --steps 40 --compile --sync-every 20 --no-anchor --workers $((cores - 2))
  step train_step_vit 80 $py -m densessl.benchmarks.train_step --objectives vader,mocov2 \
    --arch vit_small_patch16_224 --batch 128 --warmup 5 --steps 20 --sync-every 10 --no-anchor
  backends=torch; [ $dali = yes ] && backends="torch dali"
  for backend in $backends; do
    step "trainer_e2e_$backend" 90 bash -c "$py -m densessl.train data.path='$root' model.arch=resnet50 \
      optim.batch_size=128 data.workers=$((cores - 2)) optim.steps=200 run.compile=true run.sync_every=20 \
      data.backend=$backend run.dir='$out/e2e-$backend' run.progress=false run.checkpoint_every=1000 \
      run.tensorboard=false && $py -c \"import csv, statistics; r = list(csv.DictReader(open('$out/e2e-$backend/metrics.csv')))[50:]
print('$backend: steps 51+: median', statistics.median(float(x['images_per_s']) for x in r), 'pairs/s, median data wait',
      statistics.median(float(x['data_wait']) for x in r))\""
  done
  step demo_and_evaluation 100 bash -c "$py -m densessl.experiments.demo --device cuda --synthetic-dir '$out/data' \
    --out '$out/demo' --workers $((cores - 2)) && $py -m densessl.evaluation all --checkpoint '$out/demo' \
    --root '$out/data' --out '$out/demo/eval'"
  step compare 600 bash -c "$py -m densessl.experiments.compare --preset gpu --synthetic-dir '$out/data' \
    --out '$out/compare' && $py -m densessl.experiments.compare --ablations --preset gpu --synthetic-dir '$out/data' \
    --out '$out/ablations' --runs '$out/compare/runs'"  # cut short: the table so far, marked Partial
fi
log ""; log "total $((SECONDS - start)) s of the ${deadline} s allowed"
rm -rf "$site"
exit $failed
