#!/usr/bin/env bash
# Segmentation on the generated task (docs/benchmarks.md, "Segmentation"): Fashion-MNIST items on
# CIFAR-10 backgrounds, 5 item classes + background, 112 px; the real DeiT-Tiny with an FPN
# decoder, every method of the issue trained the same way (8 epochs, batch 32, AdamW; lr 1e-3,
# full fine-tuning 1e-4), then step time and training memory from `vpeft profile`.
#
#   bash benchmarks/segmentation.sh [OUT] [METHOD ...]   (default OUT: runs/seg-bench)
#   NO_PROFILE=1 bash benchmarks/segmentation.sh ...      (train only: no profile, no report)
#   SEED=1 ... / EPOCHS=16 ...                            (training seed, the data stay seed 0; epochs)
set -euo pipefail
OUT=${1:-runs/seg-bench}; shift || true
METHODS=${*:-linear bitfit lora adaptformer ssf mona e3va full}
SHARED=${VPEFT_SHARED:-../shared}
WEIGHTS=$SHARED/weights/deit_tiny_patch16_224.fb_in1k.safetensors
DATA=$OUT/data
THREADS=${THREADS:-2}
[ -d "$DATA" ] || vpeft make-seg-data --out "$DATA" --background "$SHARED/data/vtab1k/cifar10" \
  --objects "$SHARED/data/vtab1k/fashion_mnist" --max-classes 5 --size 112 --images 300 100 100 \
  --object-scale 0.4 0.8 --objects-per-image 1 3 --seed 0
for m in $METHODS; do
  lr=1e-3; [ "$m" = full ] && lr=1e-4
  [ -f "$OUT/$m/results.json" ] || OMP_NUM_THREADS=$THREADS vpeft train --task segmentation \
    --decoder fpn --data "$DATA" --train-split train --eval-split test \
    --model deit_tiny_patch16_224 --weights "$WEIGHTS" --img-size 112 --method "$m" \
    --epochs "${EPOCHS:-8}" --batch-size 32 --lr $lr --seed "${SEED:-0}" --out "$OUT/$m" --no-progress
done
[ -n "${NO_PROFILE:-}" ] || [ -f "$OUT/profile.json" ] || vpeft profile --task segmentation --decoder fpn \
  --model deit_tiny_patch16_224 --weights "$WEIGHTS" --img-size 112 --batch-size 32 \
  --threads "$THREADS" --warmup 1 --repeats 5 $(printf -- '--method %s ' $METHODS) \
  --out "$OUT/profile.json"
[ -n "${NO_PROFILE:-}" ] || vpeft report "$OUT" --out "$OUT/report" --overwrite
