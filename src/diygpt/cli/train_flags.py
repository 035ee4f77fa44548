"""``diygpt train``'s flags that do not go together: each pair is one line naming both."""

from __future__ import annotations

import argparse

from diygpt.errors import ConfigError


def check_flag_combinations(args: argparse.Namespace, resuming: bool) -> None:
    if args.init_optimizer is not None and not args.init_from:
        flag = "--init-optimizer" if args.init_optimizer else "--no-init-optimizer"
        raise ConfigError(f"{flag} goes with --init-from")
    if args.fsdp and args.dtype == "fp16":
        raise ConfigError("--fsdp does not go with --dtype fp16 (each rank would judge overflow "
                          "on its own shard of the gradients); use --dtype bf16")
    if args.compile_mode != "default" and not args.compile:
        raise ConfigError(f"--compile-mode {args.compile_mode} needs --compile")
    # Not on a resume: a run saved before these checks goes on as it began.
    if not resuming and args.min_lr and not args.cosine:
        raise ConfigError(f"--min-lr {args.min_lr:g} needs --cosine (the curve it ends)")
    if not resuming and args.cosine and args.min_lr > args.lr:
        raise ConfigError(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}: the cosine "
                          "would raise the learning rate; give a --min-lr below --lr")
    if args.low_memory and args.compile:
        raise ConfigError("--low-memory does not go with --compile (recomputation wraps the "
                          "blocks' forward, which is not tested compiled)")
