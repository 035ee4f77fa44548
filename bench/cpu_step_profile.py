"""Where the compiled fp32 CPU training step spends its time: torch.profiler's op table.

python bench/cpu_step_profile.py [--preset book-124m] [--steps 3] [--torch-draws] [--no-recycle]

The step of bench/train_speed.py as the CLI runs it on a CPU with --compile --fused-adamw:
the head's products sliced, dropout drawn by diygpt.fast_draws, and glibc's heap recycling
the big blocks. Prints the ops by their own CPU time over --steps profiled steps (after
warm-up), then the same grouped by input shapes, and the minor page faults per step.
"""

from __future__ import annotations

import argparse
import contextlib
import resource

import _common
import torch
from torch.profiler import ProfilerActivity, profile
from train_speed import step_fn

from diygpt.chunked_head import chunk_head
from diygpt.config import get_preset
from diygpt.fast_draws import fast_draws
from diygpt.memory import tune_malloc
from diygpt.model import GPTModel
from diygpt.precision import Precision
from diygpt.speed import compile_loss, compile_model, make_adamw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="book-124m")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--torch-draws", action="store_true", help="dropout drawn by torch")
    ap.add_argument("--no-recycle", action="store_true", help="glibc's allocator left alone")
    ap.add_argument("--rows", type=int, default=25)
    _common.add_common_args(ap)
    args = ap.parse_args()
    _common.apply_common_args(args)
    cfg = get_preset(args.preset)
    x, y = _common.verdict_batch(args.batch_size, cfg.context_length, torch.device("cpu"))
    torch.manual_seed(123)
    model = GPTModel(cfg).train()
    chunk_head(model)
    optimizer = make_adamw(model.parameters(), 4e-4, 0.1, fused=True)
    if not args.no_recycle:
        tune_malloc(model, optimizer, recycle=True)
    step = step_fn(compile_model(model), optimizer, x, y, Precision(x.device, "fp32"),
                   loss_fn=compile_loss())
    with fast_draws() if not args.torch_draws else contextlib.nullcontext():
        for _ in range(args.warmup):
            step()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.steps):
                step()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows,
                         max_name_column_width=60))
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50,
        max_shapes_column_width=70))
    total = sum(e.self_cpu_time_total for e in averages) / 1e3 / args.steps
    print(f"{args.steps} steps profiled: {total:.0f} ms of self CPU time a step; "
          f"{faults / args.steps:.0f} minor page faults a step")


if __name__ == "__main__":
    main()
