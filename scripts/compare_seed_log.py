"""Compare a `diygpt train` log of the seed's run with the numbers printed in the seed.

    python scripts/compare_seed_log.py runs/seed-eager.log --attn eager

A log of the speed flags (their lines end in ", N tok/s") is compared without that ending.

eager: every loss line must match to the printed 3 decimals and every epoch sample must be
the same text (whitespace folded: the seed's page collapses runs of spaces). sdpa may draw
its dropout masks differently (it does on GPU kernels), so with --attn sdpa only step 0 must
match and the last train loss must be < 1.5. On CPU, sdpa passes the eager check as well.
"""

from __future__ import annotations

import argparse
import re
import sys

# (epoch, step, train loss, val loss) as printed in the seed, section 2.1.
SEED_LOSSES = [
    (1, 0, 9.740, 10.112), (1, 5, 8.000, 8.506), (2, 10, 6.736, 7.205), (2, 15, 6.030, 6.752),
    (3, 20, 5.533, 6.569), (3, 25, 5.650, 6.600), (4, 30, 5.404, 6.535), (4, 35, 5.087, 6.441),
    (5, 40, 4.627, 6.431), (6, 45, 3.983, 6.328), (6, 50, 3.694, 6.323), (7, 55, 3.181, 6.330),
    (7, 60, 2.893, 6.181), (8, 65, 2.440, 6.329), (8, 70, 2.139, 6.173), (9, 75, 1.712, 6.211),
    (9, 80, 1.509, 6.201), (10, 85, 1.153, 6.271),
]
SEED_SAMPLES = [
    "Every effort moves you,,,,,,...........,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,,",
    "Every effort moves you.",
    "Every effort moves you.",
    "Every effort moves you.",
    "Every effort moves you.",
    "Every effort moves you know one of the picture--as of his own the fact with a little a little to have to see--and, and had been to me to have of his glory, and he had been his own a, and I had been he had been",
    "Every effort moves you know the picture to the fact of the picture--I had the fact of the donkey, I had been--I have to the fact, in the picture--as that he had the donkey--the he had been the end of the picture.",
    "Every effort moves you know the picture to the fact of the picture--I had the picture. \"I was no great, the fact, and that, and I was his pictures--as he had been his painting, the fact, and his eyes.",
    "Every effort moves you know,\" was not that my hostess was \"interesting\": on that point I could have given Miss Croft the fact of the last Mrs.           \"I had the; and he had the his",
    "Every effort moves you know,\" was one of the ax.  \"I had the last word.    \"I didn't about the you. \"I was _not_ his pictures--the him up his ease--because he didn't want",
]
# What the speed flags (--compile, --fused-adamw, ...) append to each loss line.
SPEED = re.compile(r", \d+ tok/s(, MFU [\d.]+%)?$")
LINE = re.compile(r"^Ep (\d+) \(Step (\d+)\): Train loss ([\d.]+|nan), Val loss ([\d.]+|nan)$")


def seed_line(epoch: int, step: int, train: float, val: float) -> str:
    return f"Ep {epoch} (Step {step:06d}): Train loss {train:.3f}, Val loss {val:.3f}"


def fold(text: str) -> str:
    return " ".join(text.split())


def parse(lines: list[str]) -> tuple[list[str], list[str]]:
    lines = [SPEED.sub("", ln) for ln in lines]
    losses = [ln for ln in lines if LINE.match(ln)]
    samples = [ln for ln in lines if ln.startswith("Every effort moves you")]
    return losses, samples


def compare(lines: list[str], attn: str) -> list[str]:
    """Return the list of mismatches (empty when the log reproduces the seed)."""
    losses, samples = parse(lines)
    expected = [seed_line(*row) for row in SEED_LOSSES]
    problems = []
    if attn == "eager":
        for i, want in enumerate(expected):
            got = losses[i] if i < len(losses) else "<missing>"
            if got != want:
                problems.append(f"loss line {i}: got {got!r}, want {want!r}")
        for i, want in enumerate(SEED_SAMPLES):
            got = samples[i] if i < len(samples) else "<missing>"
            if fold(got) != fold(want):
                problems.append(f"sample {i + 1}: got {got!r}, want {want!r}")
    else:
        if not losses or losses[0] != expected[0]:
            problems.append(f"step 0: got {losses[:1]}, want {expected[0]!r}")
        last = LINE.match(losses[-1]) if losses else None
        if last is None or not float(last.group(3)) < 1.5:
            problems.append(f"last train loss should be < 1.5: {losses[-1:]}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
    args = ap.parse_args()
    with open(args.log, encoding="utf-8") as f:
        lines = [ln.rstrip("\n") for ln in f]
    problems = compare(lines, args.attn)
    for p in problems:
        print("MISMATCH", p)
    print("seed log reproduced" if not problems else f"{len(problems)} mismatch(es)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
