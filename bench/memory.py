"""Peak RSS of the seed's training run: ``diygpt train`` vs the book's reference loop.

    python bench/memory.py [--max-steps 10] [--attn eager] [--variant="--low-memory"]

Each runs in its own process (peak RSS is per process): the seed's settings (book-124m,
batch 2, ctx 256, AdamW, dropout 0.1, eval every 5 steps on 5 batches), stopped after
--max-steps steps. Peak memory is reached in the first steps, so a short run shows it.
``diygpt train`` runs once with its defaults (which trim glibc's heap after each forward
pass since the twelfth pass; ``--variant="--no-trim-heap"`` for the untrimmed step) and
once more per --variant, with those flags added; by default two variants:
``--no-optim-in-backward --no-malloc-tuning`` (the step and allocator as they were) and
``--low-memory``. Write ``--variant="--flag ..."`` (with
the ``=``, since the value starts with a dash); a variant may start with environment
settings (``--variant="MALLOC_ARENA_MAX=2 --low-memory"``).

Each row also gives the training speed: tokens per second over the optimizer steps after
the first (which allocates AdamW's moments), evaluations left out, by wall time or with
--cpu-time by the process's CPU time. On a shared machine compare speeds only within one
run of this script; --threads 1 --cpu-time --repeat 3 steady them.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile

import _common

BOOK_LOOP = """
import sys, time, torch
sys.path.insert(0, sys.argv[3])
import book_reference
from diygpt.config import get_preset
from diygpt.data import create_dataloader_v1, split_text
from diygpt.losses import calc_loss_batch, calc_loss_loader
from diygpt.tokenizer import get_tokenizer
text = open(sys.argv[1], encoding="utf-8").read()
train_text, val_text = split_text(text, 0.9)
tok = get_tokenizer()
torch.manual_seed(123)
train = create_dataloader_v1(train_text, 2, 256, 256, shuffle=False, drop_last=False, tokenizer=tok)
val = create_dataloader_v1(val_text, 2, 256, 256, shuffle=False, drop_last=False, tokenizer=tok)
torch.manual_seed(123)
model = book_reference.BookGPTModel(get_preset("book-124m").to_dict())
opt = torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)
step = -1
for x, y in train:
    if step + 1 >= int(sys.argv[2]):
        break
    t0 = clock()
    opt.zero_grad()
    loss = calc_loss_batch(x, y, model, "cpu")
    loss.backward()
    opt.step()
    loss.item()
    STEPS.append((clock() - t0, x.numel()))
    step += 1
    if step % 5 == 0:
        model.eval()
        with torch.no_grad():
            calc_loss_loader(train, model, "cpu", 5), calc_loss_loader(val, model, "cpu", 5)
        model.train()
"""


# Runs argv[2:] as `python -m diygpt ...` or as code, then writes its own peak RSS (MB) and
# the (seconds, tokens) of each optimizer step.
WRAP = """
import json, os, runpy, sys, time
out, kind, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
STEPS = []
clock = time.process_time if os.environ.get("BENCH_CPU_TIME") else time.perf_counter
try:
    if kind == "module":
        from diygpt.training import Trainer
        step = Trainer.train_step
        def timed(self, x, y):
            t0 = clock()
            loss = step(self, x, y)
            loss.item()
            STEPS.append((clock() - t0, x.numel()))
            return loss
        Trainer.train_step = timed
        sys.argv = ["diygpt", *rest]
        try:
            runpy.run_module("diygpt", run_name="__main__")
        except SystemExit as done:  # a failed run must not pass for a small peak
            if done.code not in (None, 0):
                raise
    else:
        sys.argv = ["-c", *rest[1:]]
        exec(rest[0])
finally:
    from diygpt.cli.prepare import peak_rss_mb  # VmHWM: not this script's peak, carried over

    peak = peak_rss_mb()
    json.dump({"peak_mb": peak, "steps": STEPS}, open(out, "w"))
"""


def run_measured(kind: str, args: list[str], tmp: str, env_extra: dict[str, str],
                 threads: int | None, cpu_time: bool) -> tuple[float, float]:
    """(peak RSS in MB, tok/s after the first step) of a fresh Python process running
    ``diygpt ARGS`` or code + argv."""
    env = {**os.environ, "PYTHONPATH": str(_common.ROOT / "src"), **env_extra}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if cpu_time:
        env["BENCH_CPU_TIME"] = "1"
    out = os.path.join(tmp, "rss.json")
    subprocess.run([sys.executable, "-c", WRAP, out, kind, *args], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    with open(out) as f:
        result = json.load(f)
    steps = result["steps"][1:]
    rate = sum(n for _, n in steps) / sum(t for t, _ in steps) if steps else float("nan")
    return result["peak_mb"], rate


def split_variant(text: str) -> tuple[dict[str, str], list[str]]:
    """``"NAME=value ... --flag ..."`` -> (environment, flags)."""
    words = shlex.split(text)
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    return env, words


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--attn", default="eager")
    ap.add_argument("--variant", action="append", default=None, metavar="FLAGS",
                    help="more diygpt train flags for one more row (repeatable; \"\" for none)")
    ap.add_argument("--no-book", dest="book", action="store_false",
                    help="skip the book's loop (then ratios are to the first diygpt row)")
    _common.add_common_args(ap)  # --threads (OMP_NUM_THREADS of every run), --cpu-time
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the whole set this many times, interleaved; report the medians")
    args = ap.parse_args()
    default = ["--no-optim-in-backward --no-malloc-tuning", "--low-memory"]
    variants = ["", *(default if args.variant is None else args.variant)]
    runs: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            if args.book:
                runs.setdefault("book reference loop", []).append(run_measured("code", [
                    BOOK_LOOP, str(_common.VERDICT), str(args.max_steps),
                    str(_common.ROOT / "tests"),
                ], tmp, {}, args.threads, args.cpu_time))
            for i, extra in enumerate(dict.fromkeys(variants)):
                env, flags = split_variant(extra)
                out = os.path.join(tmp, f"run{i}")
                name = f"{' '.join(f'{k}={v}' for k, v in env.items())} diygpt train " \
                    f"--attn {args.attn} {' '.join(flags)}"
                runs.setdefault(name.strip(), []).append(run_measured("module", [
                    *_common.seed_train_args(args.attn, args.max_steps, out),
                    "--eval-freq", "5", "--eval-iter", "5", *flags,
                ], tmp, env, args.threads, args.cpu_time))
                shutil.rmtree(out, ignore_errors=True)
    _common.apply_common_args(args)  # for the machine line and the clock's name
    print(f"\n### peak RSS and speed, seed run settings, first {args.max_steps} steps"
          f"{f', median of {args.repeat} runs' if args.repeat > 1 else ''}\n\n{_common.machine()}\n")
    rows = [(name, statistics.median(m for m, _ in r), statistics.median(t for _, t in r))
            for name, r in runs.items()]
    base_name, base, base_rate = rows[0]
    print(f"| implementation | peak RSS MB | vs {base_name} | tok/s | vs |\n"
          "| --- | ---: | ---: | ---: | ---: |")
    for name, mb, rate in rows:
        print(f"| {name} | {mb:.0f} | {mb / base:.2f}x | {rate:.0f} | {rate / base_rate:.2f}x |")


if __name__ == "__main__":
    main()
