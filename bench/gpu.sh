#!/usr/bin/env bash
# The GPU benchmarks of issue 6 in one script, for a machine with one CUDA GPU (about 5 minutes on an H200):
#   1. contrastive training step vs CLIPModel (eager at small and base; torch.compile at small, whose compilations
#      take most of the time), MFU against the measured bf16 GEMM peak;
#   2. image/text embeddings per second vs CLIPModel;
#   3. the multi-task step relative to the contrastive step;
# bf16 autocast (fp32 weights and AdamW). Results are written to bench/results/*_cuda_bf16*.{json,md}, each naming
# the GPU.
#
#   bash bench/gpu.sh            # uses .venv/bin/python with a CUDA build of torch (`make install` first)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA build of torch and a GPU.')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" bench/train_step.py --device cuda --precision bf16 --presets small base --batch_size 256 --gemm_size 8192
"$PY" bench/inference.py --device cuda --precision bf16 --presets small base --batch_size 512
"$PY" bench/train_step.py --device cuda --precision bf16 --presets small --batch_size 256 --gemm_size 8192 \
    --compile --results_name train_step_cuda_bf16_compiled
"$PY" bench/multitask_cost.py --device cuda --precision bf16 --presets small base --batch_size 64
