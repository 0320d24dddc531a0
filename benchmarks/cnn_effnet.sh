#!/usr/bin/env bash
# EfficientNet-Lite0 (real ImageNet weights) on three VTAB-1k tasks: the converged linear probe
# against bitfit, lora, ssf and full, every one fine-tuned from the probe's head (LP-FT,
# --head-init probe). VTAB-1k protocol: train800val200 -> test (2000 images), one seed, one recipe.
# Usage: benchmarks/cnn_effnet.sh [RUNS_DIR] [TASK ...]   (docs/benchmarks.md has the table)
set -u
cd "$(dirname "$0")/.."
RUNS=${1:-runs/cnn_effnet}; shift || true
TASKS=${*:-cifar10 mnist fashion_mnist}
W=${W:-../shared/weights/tf_efficientnet_lite0.in1k.safetensors}
DATA=${DATA:-../shared/data/vtab1k}
SIZE=${SIZE:-64} EPOCHS=${EPOCHS:-3}
# one thread: on a machine shared by many jobs, two OpenMP threads spin-wait for each other
# (measured on the probe's L-BFGS: 6x the wall time of one thread under load ~24)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH=$PWD/src
mkdir -p "$RUNS/logs"
for task in $TASKS; do
  for method in linear lora bitfit ssf full; do
    lr=1e-3; [ "$method" = full ] && lr=1e-4
    out=$RUNS/$task-$method
    [ -f "$out/results.json" ] && continue
    nice -n 10 python -m vpeft.cli train --model tf_efficientnet_lite0 --weights "$W" \
      --data "$DATA/$task" --method "$method" --head-init probe --img-size "$SIZE" \
      --epochs "$EPOCHS" --lr $lr --seed 0 --num-workers 0 --no-progress --out "$out" \
      > "$RUNS/logs/$task-$method.log" 2>&1
    python -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], \
r['top1'], r['trainable_params'], r['trainable_params_no_head'], round(r['train_seconds']))" \
      "$out/results.json" "$task" "$method" || echo "$task $method FAILED"
  done
done
