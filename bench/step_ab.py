"""The compiled fp32 CPU step with the output head sliced (diygpt.chunked_head) or as one call.

python bench/chunked_head_ab.py [--preset book-124m] [--batch-size 2] [--steps 20]

Both models are built and compiled in one process and their steps alternate, the one that
goes first swapping each round, so that a busy machine slows both alike; train_speed.py's
--plain-head-row times the two one after the other. Prints the median step of each and
the ratio. The-verdict's tokens, dropout on as in the preset, fused AdamW, the CLI's loss.
"""

from __future__ import annotations

import argparse
import statistics

import _common
import torch
from train_speed import step_fn  # train_speed.py's step, so that both time the same one

from diygpt.chunked_head import chunk_head
from diygpt.config import get_preset
from diygpt.model import GPTModel
from diygpt.precision import Precision
from diygpt.speed import compile_loss, compile_model, make_adamw


def make_step(cfg, sliced: bool, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(123)
    model = GPTModel(cfg).train()
    if sliced:
        chunk_head(model)
    optimizer = make_adamw(model.parameters(), 4e-4, 0.1, fused=True)
    return step_fn(compile_model(model), optimizer, x, y, Precision(x.device, "fp32"),
                   loss_fn=compile_loss())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="book-124m")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    _common.add_common_args(ap)
    args = ap.parse_args()
    _common.apply_common_args(args)
    cfg = get_preset(args.preset)
    x, y = _common.verdict_batch(args.batch_size, cfg.context_length, torch.device("cpu"))
    steps = {"one call": make_step(cfg, False, x, y), "sliced": make_step(cfg, True, x, y)}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.steps):
        for name in (list(steps) if i % 2 else list(steps)[::-1]):
            start = _common.CLOCK()
            steps[name]()
            times[name].append(_common.CLOCK() - start)
    tokens = args.batch_size * cfg.context_length
    rows = [(f"diygpt --compile, fp32, head {name}", tokens / statistics.median(t))
            for name, t in times.items()]
    _common.print_table(
        f"compiled training step, {args.preset} (batch {args.batch_size}), cpu, steps "
        f"interleaved, median of {args.steps} each after {args.warmup} warm-up",
        "tok/s", rows, rows[0][0],
    )


if __name__ == "__main__":
    main()
