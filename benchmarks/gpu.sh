#!/usr/bin/env bash
# The GPU benchmark: every method on ViT-B/16 (random init), batch 64, 224 px, bf16 autocast,
# plus LoRA against hf-lora and full fine-tuning, on one GPU. Prints a Markdown table of step time,
# images/s, peak CUDA memory and the ratios to the floor (frozen forward + backward to the first
# block). Aimed at under 5 minutes on one H100/H200-class GPU.
#
#   bash benchmarks/gpu.sh                       # the benchmark (needs CUDA)
#   bash benchmarks/gpu.sh --out gpu.json        # extra flags go to `vpeft profile`
#   VPEFT_BENCH_TINY=1 bash benchmarks/gpu.sh    # the same run at a tiny size on the CPU (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
args=(--preset gpu --markdown)
if [[ "${VPEFT_BENCH_TINY:-0}" == 1 ]]; then
    args+=(--device cpu --img-size 32 --batch-size 2 --warmup 0 --repeats 1 --threads 1
           --model-args depth=2 embed_dim=32 num_heads=2)
fi
exec "${PYTHON:-python}" -m vpeft.cli profile "${args[@]}" "$@"
