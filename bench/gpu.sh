#!/usr/bin/env bash
# Every GPU measurement of issue #5 in one call (run from the repository root on a CUDA
# machine with the project installed, e.g. `bash bench/gpu.sh 2>&1 | tee gpu.txt`).
#   1. training throughput + MFU, gpt2-small at ctx 1024: bf16 autocast, SDPA (flash)
#      attention, fused AdamW, TF32, torch.compile, vocab padded to 50304; peers
#      transformers and the book's code under the same autocast, not compiled
#   2. the same without compile/padding, to show what each costs
#   3. batch-1 greedy generation tok/s, diygpt KV cache vs transformers generate
#   4. the CLI path: `diygpt train --dtype bf16 --compile ...` prints tok/s and MFU
set -euo pipefail
PY=${PY:-python}
BATCH=${BATCH:-16}
export PYTHONPATH=${PYTHONPATH:-src}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
date -u

echo "== 1. training, fast path"
$PY bench/train_speed.py --preset gpt2-small --batch-size "$BATCH" --variants sdpa \
  --dtype bf16 --compile --fused-adamw --pad-vocab --tf32 --warmup 5 --steps 20

echo "== 2. training, bf16 + fused AdamW + TF32 only (no compile, no padding)"
$PY bench/train_speed.py --preset gpt2-small --batch-size "$BATCH" --variants sdpa \
  --dtype bf16 --fused-adamw --tf32 --peers none --warmup 3 --steps 10

echo "== 3. generation, batch 1, 200 new tokens"
$PY bench/generate_speed.py --new-tokens 200 --warmup 2 --repeats 5

echo "== 4. CLI: 30 steps on the-verdict with every speed flag"
$PY -m diygpt train --data ../shared/assets/the-verdict.txt --preset gpt2-small \
  --context-length 1024 --batch-size 2 --max-steps 30 --eval-freq 10 --eval-iter 1 \
  --dtype bf16 --compile --fused-adamw --pad-vocab --tf32 --sample-prompt "" \
  --no-progress --out /tmp/diygpt-gpu-run
