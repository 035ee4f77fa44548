"""``diygpt train``'s speed flags, and turning them into a wrapped model, optimizer and precision.

Without any of them training is the book's: fp32, eager PyTorch, AdamW's arithmetic, and
the log line exactly ``Ep 1 (Step 000000): Train loss 9.740, Val loss 10.112``. With any of
them the log line also shows tok/s (and MFU on a known GPU).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only when a command runs, so --help stays instant
    import torch
    from torch import nn

    from diygpt.losses import LossFn
    from diygpt.precision import Precision
    from diygpt.speed import SpeedMeter

DTYPE_NAMES = ("fp32", "bf16", "fp16")
# speed.COMPILE_MODES, spelled out here so that --help does not import torch
COMPILE_MODES = ("default", "max-autotune", "max-autotune-aten")


def add_speed_flags(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("speed (all off by default: the book's fp32 eager loop)")
    s.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32",
                   help="autocast the forward pass to bf16 or fp16 (fp16 adds a GradScaler); "
                   "weights and optimizer stay fp32 (default fp32)")
    s.add_argument("--compile", action="store_true", help="torch.compile the model and its loss; "
                   "on a GPU also one q/k/v matmul per block, and with triton installed the "
                   "loss as two Triton kernels; on a CPU in fp32 (without --pad-vocab or "
                   "--fsdp) also the output head's products in vocabulary slices")
    s.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="with --compile, 'max-autotune' (torch's max-autotune-no-cudagraphs): "
                   "on a GPU, times cuBLAS against Triton templates for each matmul and tunes "
                   "the fused kernels at the first step; about 6 minutes for gpt2-small on "
                   "an H200, then cached on that machine's disk; 0.4-2.8%% faster there. "
                   "'max-autotune-aten': the same with cuBLAS's own variants only, no "
                   "Triton templates (cuBLAS won every product on the H200): about 2.5 "
                   "minutes, and as fast (0.2-2.0%% faster over two H200s). "
                   "Default: default, inductor's plain compile")
    s.add_argument("--pad-vocab", action="store_true",
                   help="compute 50304 logits (a multiple of 64) and drop the extra 47; "
                   "saved weights keep the 50257-row shape (optimizer.pt holds the head's "
                   "moments at 50304 rows)")
    s.add_argument("--fused-adamw", action="store_true",
                   help="torch's fused single-kernel AdamW update (rounds differently from "
                   "the book's AdamW; overrides --fast-adamw)")
    s.add_argument("--tf32", action="store_true",
                   help="allow TF32 tensor cores for fp32 matmuls (CUDA)")


def speed_flags_used(args: argparse.Namespace) -> bool:
    return (args.dtype != "fp32" or args.compile or args.pad_vocab or args.fused_adamw
            or args.tf32)


@dataclass
class TrainingSetup:
    model: nn.Module  # what the Trainer calls: maybe compiled
    optimizer: torch.optim.Optimizer
    precision: Precision
    meter: SpeedMeter | None
    loss_fn: LossFn  # compiled along with the model under --compile


def prepare_model(args: argparse.Namespace, model: nn.Module, device: torch.device) -> None:
    """The flags that change the plain model or global settings, before DDP/FSDP wrapping."""
    from diygpt.chunked_head import chunk_head
    from diygpt.precision import enable_tf32
    from diygpt.speed import fuse_qkv, pad_vocab

    if args.tf32:
        enable_tf32()
    if args.pad_vocab:
        pad_vocab(model)
    if args.compile and device.type == "cuda":
        fuse_qkv(model)  # measured faster there only (BENCHMARKS.md)
    if args.compile and device.type == "cpu" and args.dtype == "fp32" and not args.fsdp:
        chunk_head(model)  # MKL's single call is the slow one there (BENCHMARKS.md)


def setup_training(
    args: argparse.Namespace, model: nn.Module, device: torch.device
) -> TrainingSetup:
    """The optimizer, precision and tok/s meter; the model compiled if asked (after wrapping)."""
    from diygpt.checkpoints import unwrap_model
    from diygpt.losses import token_cross_entropy
    from diygpt.precision import Precision
    from diygpt.speed import (
        SpeedMeter,
        compile_model,
        flops_per_token,
        make_adamw,
        peak_flops,
        training_loss,
    )

    fast_adamw = getattr(args, "fast_adamw", None)
    if fast_adamw is None:  # exact, so on wherever it applies
        fast_adamw = device.type == "cpu"
    optimizer = make_adamw(model.parameters(), args.lr, args.weight_decay,
                           fused=args.fused_adamw, fast=fast_adamw)
    meter = None
    if speed_flags_used(args):
        import torch.distributed as dist

        peak = peak_flops(device)
        if peak is not None and dist.is_initialized():
            peak *= dist.get_world_size()  # tok/s counts every rank's tokens
        meter = SpeedMeter(flops_per_token(unwrap_model(model).cfg), peak)
    wrapped = compile_model(model, args.compile_mode) if args.compile else model
    loss_fn = token_cross_entropy
    if args.compile:  # on a GPU with triton, diygpt.fused_ce's kernels: BENCHMARKS.md
        loss_fn = training_loss(unwrap_model(model), device, fused=True)
    return TrainingSetup(wrapped, optimizer, Precision(device, args.dtype), meter, loss_fn)
