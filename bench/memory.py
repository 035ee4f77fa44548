"""Peak RSS of the seed's training run: ``diygpt train`` vs the book's reference loop.

    python bench/memory.py [--max-steps 10] [--attn eager]

Each runs in its own process (peak RSS is per process): the seed's settings (book-124m,
batch 2, ctx 256, AdamW, dropout 0.1, eval every 5 steps on 5 batches), stopped after
--max-steps steps. Peak memory is reached in the first steps, so a short run shows it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import _common

BOOK_LOOP = """
import sys, torch
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
    opt.zero_grad()
    loss = calc_loss_batch(x, y, model, "cpu")
    loss.backward()
    opt.step()
    step += 1
    if step % 5 == 0:
        model.eval()
        with torch.no_grad():
            calc_loss_loader(train, model, "cpu", 5), calc_loss_loader(val, model, "cpu", 5)
        model.train()
"""


# Runs argv[2:] as `python -m diygpt ...` or as code, then writes its own peak RSS (MB).
WRAP = """
import resource, runpy, sys
out, kind, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
try:
    if kind == "module":
        sys.argv = ["diygpt", *rest]
        try:
            runpy.run_module("diygpt", run_name="__main__")
        except SystemExit:
            pass
    else:
        sys.argv = ["-c", *rest[1:]]
        exec(rest[0])
finally:
    open(out, "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
"""


def peak_rss_of(kind: str, args: list[str], tmp: str) -> float:
    """Peak RSS in MB of a fresh Python process running ``diygpt ARGS`` or code + argv."""
    env = {**os.environ, "PYTHONPATH": str(_common.ROOT / "src")}
    out = os.path.join(tmp, "rss.txt")
    subprocess.run([sys.executable, "-c", WRAP, out, kind, *args], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    with open(out) as f:
        return float(f.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--attn", default="eager")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ours = peak_rss_of("module", [
            "train", "--data", str(_common.VERDICT),
            "--preset", "book-124m", "--epochs", "10", "--batch-size", "2", "--lr", "0.0004",
            "--weight-decay", "0.1", "--eval-freq", "5", "--eval-iter", "5", "--no-shuffle",
            "--no-drop-last", "--seed", "123", "--attn", args.attn, "--sample-prompt", "",
            "--max-steps", str(args.max_steps), "--no-progress", "--out", tmp,
        ], tmp)
        book = peak_rss_of("code", [BOOK_LOOP, str(_common.VERDICT), str(args.max_steps),
                                    str(_common.ROOT / "tests")], tmp)
    print(f"\n### peak RSS, seed run settings, first {args.max_steps} steps\n\n{_common.machine()}\n")
    print("| implementation | peak RSS MB | vs book |\n| --- | ---: | ---: |")
    print(f"| book reference loop | {book:.0f} | 1.00x |")
    print(f"| diygpt train --attn {args.attn} | {ours:.0f} | {ours / book:.2f}x |")


if __name__ == "__main__":
    main()
