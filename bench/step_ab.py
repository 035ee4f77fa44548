"""One change to the CPU training step, timed against the step without it, steps interleaved.

python bench/step_ab.py --change head|draws|malloc [--eager] [--preset book-124m] [--steps 20]

- ``head``: the output head's products in vocabulary slices (diygpt.chunked_head) against
  one call each; two models, built alike.
- ``draws``: dropout's masks from diygpt.fast_draws against torch's own bernoulli_; one
  model, each of its steps run with the kernel on or off.
- ``malloc``: glibc's mmap and trim thresholds as memory.tune_malloc left them before
  recycling (32 MiB, and glibc's 128 KiB) against ``recycle=True`` (1 GiB, 2 GiB). The
  setting is the process's and shapes its whole heap (steps of the two arms interleaved in
  one process showed a quarter of the gain, the plain arm reusing the recycled arm's
  heap), so each arm runs in processes of its own, --rounds of each in turn, --steps each;
  the table gives the median over all their steps.

The two arms alternate, the one that goes first swapping each round, so that a busy
machine slows both alike (a later row of train_speed.py gains about 5% from its place
alone). The-verdict's tokens, dropout as in the preset, fused AdamW; compiled with the
CLI's loss unless --eager. What an arm does not change is as in the CLI's compiled CPU
step: fast draws, the allocator recycling after a first step that gives AdamW's moments
mappings of their own. Prints the median step of each and the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import _common
import torch
from train_speed import step_fn  # train_speed.py's step, so that both time the same one

from diygpt import memory
from diygpt.chunked_head import chunk_head
from diygpt.config import get_preset
from diygpt.fast_draws import fast_draws, load_kernel, unavailable_reason
from diygpt.losses import token_cross_entropy
from diygpt.model import GPTModel
from diygpt.precision import Precision
from diygpt.speed import compile_loss, compile_model, make_adamw


def make_step(cfg, x: torch.Tensor, y: torch.Tensor, compiled: bool, sliced: bool = False):
    torch.manual_seed(123)
    model = GPTModel(cfg).train()
    if sliced:
        chunk_head(model)
    optimizer = make_adamw(model.parameters(), 4e-4, 0.1, fused=True)
    forward, loss_fn = ((compile_model(model), compile_loss()) if compiled
                        else (model, token_cross_entropy))
    step = step_fn(forward, optimizer, x, y, Precision(x.device, "fp32"), loss_fn=loss_fn)
    # As in the CLI, the first step maps AdamW's moments apart; each arm's context then sets
    # the thresholds it times.
    memory.tune_malloc(model, optimizer, recycle=True)
    with fast_draws():
        step()
    return step


def setting(fast: bool = True, recycle: bool = True):
    """A context: glibc's thresholds set (they stay set after it), fast draws open or not."""
    thresholds = ((memory.RECYCLE_THRESHOLD, memory.RECYCLE_TRIM) if recycle
                  else (memory.STEADY_THRESHOLD, 128 << 10))

    @contextlib.contextmanager
    def context():
        if not (memory._mallopt(memory.M_MMAP_THRESHOLD, thresholds[0])
                and memory._mallopt(memory.M_TRIM_THRESHOLD, thresholds[1])):
            raise SystemExit("glibc's mallopt is not available here")
        with fast_draws(fast):
            yield
    return context


MALLOC_ARMS = ("glibc 32 MiB / 128 KiB", "recycled 1 GiB / 2 GiB")


def arms(change: str, cfg, x, y, compiled: bool) -> dict:
    """name -> (step, context to run it in)."""
    if load_kernel() is None:
        raise SystemExit(f"fast draws unavailable: {unavailable_reason()}")
    if change == "head":
        return {"head in one call": (make_step(cfg, x, y, compiled), setting()),
                "head sliced": (make_step(cfg, x, y, compiled, sliced=True), setting())}
    step = make_step(cfg, x, y, compiled)
    if change == "draws":
        return {"torch's draws": (step, setting(fast=False)), "fast draws": (step, setting())}
    plain, recycled = MALLOC_ARMS
    return {plain: (step, setting(recycle=False)), recycled: (step, setting())}


def time_arms(steps: dict, rounds: int) -> dict[str, list[float]]:
    """One step of each arm per round, the one that goes first swapping each round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(rounds):
        for name in (list(steps) if i % 2 else list(steps)[::-1]):
            step, context = steps[name]
            with context():
                start = _common.CLOCK()
                step()
                times[name].append(_common.CLOCK() - start)
    return times


def malloc_in_processes(args) -> dict[str, list[float]]:
    """Each arm in fresh processes, alternately: the step times they print."""
    import subprocess
    import sys

    times: dict[str, list[float]] = {name: [] for name in MALLOC_ARMS}
    for i in range(args.rounds):
        for name in (MALLOC_ARMS if i % 2 else MALLOC_ARMS[::-1]):
            argv = [sys.executable, __file__, "--change", "malloc", "--arm", name, "--steps",
                    str(args.steps), "--warmup", str(args.warmup), "--preset", args.preset,
                    "--batch-size", str(args.batch_size)]
            if args.eager:
                argv.append("--eager")
            if args.threads:
                argv += ["--threads", str(args.threads)]
            if args.cpu_time:
                argv.append("--cpu-time")
            done = subprocess.run(argv, capture_output=True, text=True, check=True)
            times[name] += json.loads(done.stdout.splitlines()[-1])
            print(f"round {i + 1}, {name}: {statistics.median(times[name][-args.steps:]):.3f} s",
                  flush=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--change", choices=("head", "draws", "malloc"), required=True)
    ap.add_argument("--eager", action="store_true", help="time the uncompiled step")
    ap.add_argument("--preset", default="book-124m")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per arm")
    ap.add_argument("--rounds", type=int, default=3, help="malloc: processes per arm")
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # malloc's child processes
    _common.add_common_args(ap)
    args = ap.parse_args()
    _common.apply_common_args(args)
    cfg = get_preset(args.preset)
    if args.change == "malloc" and args.arm is None:
        times = malloc_in_processes(args)
    else:
        x, y = _common.verdict_batch(args.batch_size, cfg.context_length, torch.device("cpu"))
        steps = arms(args.change, cfg, x, y, compiled=not args.eager)
        if args.arm is not None:  # one arm, alone in this process, for malloc_in_processes
            steps = {args.arm: steps[args.arm]}
        for step, context in steps.values():
            with context():
                for _ in range(args.warmup):
                    step()
        times = time_arms(steps, args.steps)
        if args.arm is not None:
            print(json.dumps(times[args.arm]))
            return
    tokens = args.batch_size * cfg.context_length
    how = "eager" if args.eager else "--compile"
    rows = [(f"diygpt {how}, fp32, {name}", tokens / statistics.median(t))
            for name, t in times.items()]
    timed_steps = len(next(iter(times.values())))
    how_run = (f"{args.rounds} processes of each in turn" if args.change == "malloc"
               else "steps of each in turn")
    _common.print_table(
        f"training step, {args.preset} (batch {args.batch_size}), cpu, {how_run}, median of "
        f"{timed_steps} each after {args.warmup} warm-up",
        "tok/s", rows, rows[0][0],
    )


if __name__ == "__main__":
    main()
