#!/usr/bin/env bash
# Reproduce the seed's section 2.1 log (10 epochs of book-124m on the-verdict) and compare it
# with the numbers printed in the seed. 5 to 8 minutes on 2 CPU cores; not part of CI.
#   scripts/seed_run.sh [eager|sdpa] [more diygpt train flags]
#   OUT=runs/seed-compiled scripts/seed_run.sh sdpa --compile --fused-adamw
set -euo pipefail
cd "$(dirname "$0")/.."
attn=${1:-eager}
if [ $# -gt 0 ]; then shift; fi
assets=${ASSETS:-../shared/assets}
export DIYGPT_TOKENIZER_DIR=${DIYGPT_TOKENIZER_DIR:-$assets/gpt2}
out=${OUT:-runs/seed-$attn}
mkdir -p runs
rm -rf "$out"
.venv/bin/diygpt train --data "$assets/the-verdict.txt" --preset book-124m --epochs 10 \
  --batch-size 2 --lr 0.0004 --weight-decay 0.1 --eval-freq 5 --eval-iter 5 --no-shuffle \
  --no-drop-last --seed 123 --attn "$attn" --sample-prompt "Every effort moves you" \
  --out "$out" --no-progress "$@" | tee "$out.log"
.venv/bin/python scripts/compare_seed_log.py "$out.log" --attn "$attn"
