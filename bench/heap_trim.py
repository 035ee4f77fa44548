"""What the heap settings cost in speed: one process, the setting switched step by step.

    python bench/heap_trim.py [--steps 42] [--threads 1 --cpu-time]

Runs ``diygpt train`` on the seed's settings (book-124m, batch 2, ctx 256, ``--attn
eager``) and, before each training step, sets one of three rows in turn (in the order
A B C C B A, so that each row follows each other as often): AdamW's and cross entropy's
backward slices at the old 16 MB, at today's 4 MB, and 4 MB with ``--trim-heap``'s
``malloc_trim`` after the forward pass. Peak memory needs a process per row
(``bench/memory.py``); speed does not, and switching inside one process keeps the
machine's load the same for every row. The first round is left out (AdamW's moments are
made there). Prints each row's median step time and the ratio to the 4 MB row.
"""

from __future__ import annotations

import argparse
import runpy
import statistics
import sys
import tempfile

import _common
import torch

from diygpt import losses, memory, optim_in_backward
from diygpt.training import Trainer

ROWS = {  # name: (slice bytes, trim after forward)
    "16 MB slices (before the eighth pass)": (16 << 20, False),
    "4 MB slices (default)": (4 << 20, False),
    "4 MB slices + --trim-heap": (4 << 20, True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=42, help="training steps in all (6 a round)")
    _common.add_common_args(ap)
    args = ap.parse_args()
    _common.apply_common_args(args)
    names = list(ROWS)
    order = names + names[::-1]
    times: dict[str, list[float]] = {name: [] for name in names}
    trim = [False]
    step = Trainer.train_step

    def after_forward(module, inputs, output) -> None:
        if trim[0] and module.training and torch.is_grad_enabled():
            memory._malloc_trim()

    count = [0]

    def timed(self: Trainer, x, y):
        if count[0] == 0:
            self.model.register_forward_hook(after_forward)
        name = order[count[0] % len(order)]
        size, trim[0] = ROWS[name]
        optim_in_backward.SLICE_BYTES = losses.CE_SLICE_BYTES = size
        t0 = _common.CLOCK()
        loss = step(self, x, y)
        loss.item()
        if count[0] >= len(order):
            times[name].append(_common.CLOCK() - t0)
        count[0] += 1
        return loss

    Trainer.train_step = timed
    with tempfile.TemporaryDirectory() as out:
        sys.argv = [
            "diygpt", "train", "--data", str(_common.VERDICT), "--preset", "book-124m",
            "--epochs", "10", "--batch-size", "2", "--lr", "0.0004", "--weight-decay", "0.1",
            "--eval-freq", "1000", "--no-shuffle", "--no-drop-last", "--seed", "123",
            "--attn", "eager", "--sample-prompt", "", "--max-steps", str(args.steps),
            "--no-progress", "--out", out,
        ]
        try:
            runpy.run_module("diygpt", run_name="__main__")
        except SystemExit:
            pass
    Trainer.train_step = step
    print(f"\n### seed settings, training step time, rows switched step by step\n\n"
          f"{_common.machine()}\n")
    base = statistics.median(times[names[1]])
    print("| row | steps | median s | vs 4 MB |\n| --- | ---: | ---: | ---: |")
    for name in names:
        med = statistics.median(times[name])
        print(f"| {name} | {len(times[name])} | {med:.3f} | {med / base:.3f}x |")


if __name__ == "__main__":
    main()
