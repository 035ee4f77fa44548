"""What the memory settings cost in speed: one process, the setting switched step by step.

    python bench/heap_trim.py [--steps 42] [--threads 1 --cpu-time]

Runs ``diygpt train`` on the seed's settings (book-124m, batch 2, ctx 256, ``--attn
eager``) and, before each training step, sets one of three rows in turn (in the order
A B C C B A, so that each row follows each other as often): the output head's and token
embedding's weight gradients made whole and stepped in 4 MB slices (as before the ninth
pass), made and stepped 4 MB of rows at a time (``diygpt.streamed_grads``) without the heap
trim, and that with ``--trim-heap``'s ``malloc_trim`` after the forward pass (the CLI's
default on the CPU uncompiled: its own trim hook is switched per row). The untrimmed rows
keep the trimmed run's allocator settings, so they are not ``--no-trim-heap``, which also
recycles big blocks in the heap (``bench/memory.py`` and ``bench/step_ab.py`` time that). Peak
memory needs a process per row (``bench/memory.py``); speed does not, and switching inside
one process keeps the machine's load the same for every row. The first round is left out
(AdamW's moments are made there). Prints each row's median step time and its ratio to the
default row's (above 1: slower).
"""

from __future__ import annotations

import argparse
import runpy
import statistics
import sys
import tempfile

import _common

from diygpt import memory
from diygpt.optim_in_backward import OptimInBackward
from diygpt.training import Trainer

ROWS = {  # name: (vocabulary gradients streamed, trim after forward)
    "whole vocabulary gradients, no trim (before the ninth pass)": (False, False),
    "streamed vocabulary gradients, trim hook off (heap not recycled)": (True, False),
    "streamed + trim after forward (default)": (True, True),
}
DEFAULT = "streamed + trim after forward (default)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=42, help="training steps in all (6 a round; "
                    "the first round is not timed, so at least 12)")
    _common.add_common_args(ap)
    args = ap.parse_args()
    _common.apply_common_args(args)
    names = list(ROWS)
    order = names + names[::-1]
    if args.steps < 2 * len(order):
        ap.error(f"--steps must be at least {2 * len(order)}: one untimed round, one timed")
    times: dict[str, list[float]] = {name: [] for name in names}
    trim, stream = [False], [True]
    step, stream_rows = Trainer.train_step, OptimInBackward.stream_rows

    def maybe_stream(self: OptimInBackward, param, grad_rows) -> bool:
        return stream[0] and stream_rows(self, param, grad_rows)  # False: the whole gradient

    cli_trim = memory._trim_after_forward

    def after_forward(module, inputs, output) -> None:  # the CLI's hook, switched per row
        if trim[0]:
            cli_trim(module, inputs, output)

    count = [0]

    def timed(self: Trainer, x, y):
        name = order[count[0] % len(order)]
        stream[0], trim[0] = ROWS[name]
        t0 = _common.CLOCK()
        loss = step(self, x, y)
        loss.item()
        if count[0] >= len(order):
            times[name].append(_common.CLOCK() - t0)
        count[0] += 1
        return loss

    Trainer.train_step, OptimInBackward.stream_rows = timed, maybe_stream
    memory._trim_after_forward = after_forward  # what tune_malloc registers (default trim on)
    with tempfile.TemporaryDirectory() as out:
        sys.argv = ["diygpt", *_common.seed_train_args("eager", args.steps, out),
                    "--eval-freq", "1000", "--trim-heap"]
        try:
            runpy.run_module("diygpt", run_name="__main__")
        except SystemExit as done:
            if done.code not in (None, 0):
                raise
    Trainer.train_step, OptimInBackward.stream_rows = step, stream_rows
    memory._trim_after_forward = cli_trim
    print(f"\n### seed settings, training step time, rows switched step by step\n\n"
          f"{_common.machine()}\n")
    base = statistics.median(times[DEFAULT])
    print("| row | steps | median s | time vs default (>1 slower) |\n| --- | ---: | ---: | ---: |")
    for name in names:
        med = statistics.median(times[name])
        print(f"| {name} | {len(times[name])} | {med:.3f} | {med / base:.3f}x |")


if __name__ == "__main__":
    main()
