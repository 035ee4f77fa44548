#!/usr/bin/env bash
# Every GPU check and measurement of issue #5 in one call: at most BUDGET (520) seconds.
#
# On a lent device machine the assets do not travel (../shared stays here), so first, here:
#     make gpu-stage            # copies them into .assets/, which git ignores
# then one device call:  run(command="bash bench/gpu.sh", carry=[".assets"], timeout_s=560)
# On any CUDA machine with ../shared beside the checkout:  bash bench/gpu.sh
#
# Steps, the CUDA tests first, then the issue's measurements. Each has its own time limit,
# and a failed step does not stop the others; a summary of exit codes ends the output, and
# the script exits 1 if any step failed or was not run for lack of time. STEPS
# picks some (e.g. STEPS="gen" to rerun one); they run in the order below whatever their
# order in STEPS. Output goes to the terminal and, where $OUT is set, to $OUT/gpu.txt.
#   tests     correctness on CUDA: tests/test_cuda.py and every test that takes the `device`
#             fixture (cached = uncached greedy, static/CUDA-graph decode, autocast steps,
#             AdamW-in-backward bit-identical, bf16 CLI run with MFU in its log line, the
#             Triton cross entropy against F.cross_entropy)
#   train     training tok/s and MFU, gpt2-small at ctx 1024, batch 32: bf16 autocast, SDPA
#             flash attention, fused AdamW, TF32, torch.compile (model, loss, one q/k/v
#             matmul), vocab padded to 50304; peer: transformers under the same autocast
#             (target: 550k tok/s). Rows: the loss compiled (the CLI before the eleventh
#             pass), as diygpt.fused_ce's two Triton kernels (the CLI's now), through the
#             CLI's Trainer.train_step, and replayed as CUDA graphs; each but the
#             Trainer row also timed with its steps queued back to back (the loss not read
#             between steps)
#   train64   the same at batch 64 without the peer and the CUDA-graph row
#   autotune  (only when named in STEPS) at each of AUTOTUNE_BATCHES (default 64): the
#             compiled-loss row, the Triton-loss row (the CLI's) and the same compiled with
#             inductor's max-autotune (cuBLAS timed against Triton matmul templates, fused
#             kernels tuned): minutes to compile. AUTOTUNE_MODE=max-autotune-aten times
#             cuBLAS's own variants only (no templates)
#   gen       batch-1 greedy generation: KV cache, and compiled into CUDA graphs, against
#             transformers generate (target: 1500 tok/s); also each static_decode speed-up
#             turned off, and one call's GPU busy time and top kernels
#   fsdp      FSDP2 under torchrun with nccl against one process (scripts/fsdp_gpu_check.py)
#   ablation  training without compile and padding, to show what they add
#   cli       (only when named in STEPS) `diygpt train` with every speed flag, 30 steps
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
BATCH=${BATCH:-32}
STEPS=${STEPS:-tests train train64 gen fsdp ablation}

if [[ -z "${DIYGPT_ASSETS:-}" ]]; then
  for dir in .assets ../shared/assets; do
    if [[ -f $dir/the-verdict.txt ]]; then DIYGPT_ASSETS=$(cd "$dir" && pwd); break; fi
  done
fi
if [[ ! -f "${DIYGPT_ASSETS:-}/the-verdict.txt" ]]; then
  echo "bench/gpu.sh: no assets: run 'make gpu-stage' and carry .assets, or set DIYGPT_ASSETS" >&2
  exit 2
fi
export DIYGPT_ASSETS DIYGPT_TOKENIZER_DIR=${DIYGPT_TOKENIZER_DIR:-$DIYGPT_ASSETS/gpt2}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}  # a failed nccl start says why
SCRATCH=$(mktemp -d)  # run folders of the fsdp and cli steps, removed at the end
trap 'rm -rf "$SCRATCH"' EXIT
TEE=
if [[ -n "${OUT:-}" ]]; then exec > >(tee -a "$OUT/gpu.txt") 2>&1; TEE=$!; fi

# The whole script keeps under BUDGET seconds (a device call's limit is 600): a step gets at
# most what is left, and none starts with under 30 s left.
BUDGET=${BUDGET:-520}
SUMMARY=()
FAILED=0  # the exit status: 1 when any step failed, so a device call does not read as success
run_step() {  # run_step NAME SECONDS COMMAND...: runs it if STEPS names it
  local name=$1 limit=$2 start=$SECONDS rc left
  shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  left=$((BUDGET - SECONDS))
  if ((left < 30)); then
    SUMMARY+=("$name: not run (budget spent)"); echo "== $name: not run (budget spent)"
    FAILED=1; return 0
  fi
  ((limit > left)) && limit=$left
  echo; echo "== $name (limit ${limit} s)"
  timeout -k 10 "$limit" "$@"; rc=$?
  SUMMARY+=("$name: exit $rc$( ((rc == 124)) && echo ' (time limit)'), $((SECONDS - start)) s")
  ((rc == 0)) || FAILED=1
  echo "== $name: ${SUMMARY[-1]#*: }"
}

date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch, transformers; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| cuda', torch.cuda.is_available())" || true

# The correctness checks first: they are quick, and a later step's failure is then readable.
run_step tests 240 $PY -m pytest -q -p no:cacheprovider -k cuda tests
run_step train 300 $PY bench/train_speed.py --preset gpt2-small --batch-size "$BATCH" \
  --variants sdpa --peers hf --dtype bf16 --compile --fused-adamw --pad-vocab --tf32 \
  --warmup 5 --steps 20 --triton-loss-row --trainer-row --cudagraph-row --back-to-back
run_step train64 200 $PY bench/train_speed.py --preset gpt2-small --batch-size 64 \
  --variants sdpa --peers none --dtype bf16 --compile --fused-adamw --pad-vocab --tf32 \
  --warmup 5 --steps 20 --triton-loss-row --trainer-row --back-to-back
for batch in ${AUTOTUNE_BATCHES:-64}; do
  run_step autotune 500 $PY bench/train_speed.py --preset gpt2-small --batch-size "$batch" \
    --variants sdpa --peers none --dtype bf16 --compile --fused-adamw --pad-vocab --tf32 \
    --warmup 5 --steps 20 --triton-loss-row --autotune-row \
    --autotune-mode "${AUTOTUNE_MODE:-max-autotune}"
done
run_step gen 200 $PY bench/generate_speed.py --new-tokens 200 --warmup 2 --repeats 5 \
  --cuda-ablation --profile
run_step fsdp 120 $PY scripts/fsdp_gpu_check.py --data "$DIYGPT_ASSETS/the-verdict.txt" \
  --out "$SCRATCH/fsdp"
run_step ablation 60 $PY bench/train_speed.py --preset gpt2-small --batch-size "$BATCH" \
  --variants sdpa --peers none --dtype bf16 --fused-adamw --tf32 --warmup 3 --steps 10
run_step cli 180 $PY -m diygpt train --data "$DIYGPT_ASSETS/the-verdict.txt" \
  --preset gpt2-small --context-length 1024 --train-ratio 0.7 --batch-size 2 --epochs 30 \
  --max-steps 30 --eval-freq 10 --eval-iter 1 --dtype bf16 --compile --fused-adamw \
  --pad-vocab --tf32 --sample-prompt "" --no-progress --out "$SCRATCH/run"

echo; echo "== summary ($SECONDS s)"
printf '%s\n' "${SUMMARY[@]}"
if [[ -n $TEE ]]; then exec >&- 2>&-; wait "$TEE"; fi  # the log is whole before we exit
exit "$FAILED"
