"""FSDP2 (and DDP) on GPU with nccl, against one process: the GPU twin of tests/test_fsdp.py.

    python scripts/fsdp_gpu_check.py --data the-verdict.txt [--out runs/gpu-check]

Runs the tiny preset (dropout 0, 20 steps) in one process, then under torchrun with --fsdp
at world size 1 (any one GPU, e.g. an H200), and at world size 2 with --fsdp and DDP when
there are two GPUs; prints each run's largest weight difference and fails above --atol.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="runs/gpu-check")
    p.add_argument("--atol", type=float, default=1e-4)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fsdp_gpu_check: needs a CUDA GPU")
    # The book's attention: SDPA's memory-efficient backward is not deterministic on CUDA.
    train = ["train", "--data", args.data, "--preset", "tiny", "--drop-rate", "0",
             "--attn", "eager", "--batch-size", "8", "--grad-accum", "2", "--max-steps", "20",
             "--eval-freq", "10", "--eval-iter", "2", "--no-progress", "--device", "cuda", "--seed", "123"]
    out = Path(args.out)
    for old in ("single", "fsdp-1", "fsdp-2", "ddp-2"):  # a rerun: train refuses a used folder
        shutil.rmtree(out / old, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "diygpt", *train, "--out", str(out / "single")], check=True)
    runs = [("fsdp-1", 1, ["--fsdp"])]
    if torch.cuda.device_count() >= 2:
        runs += [("fsdp-2", 2, ["--fsdp"]), ("ddp-2", 2, [])]
    worst = 0.0
    for name, nproc, flags in runs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "diygpt", *train, *flags, "--out", str(out / name)]
        subprocess.run(cmd, check=True)
        diff = max_diff(out / name, out / "single")
        worst = max(worst, diff)
        print(f"{name}: max |weight - single-process weight| = {diff:.3g}")
    return 0 if worst <= args.atol else 1


if __name__ == "__main__":
    sys.exit(main())
