"""Tokenizing a corpus: ``diygpt prepare`` (streamed, threaded) vs one ``encode`` call.

    python bench/prepare_speed.py [--mb 100 --mb 10] [--threads 2]

The corpus is the-verdict repeated to the size asked, copy after copy with nothing in
between (written to a temp folder). The peer encodes it whole as ``train --data`` does
(``encode(text, allowed_special={"<|endoftext|>"})``). Each contender runs in its own
process so its peak RSS is its own; diygpt's must stay flat as the corpus grows, the
one-call peer's grows with it. Peak RSS is the child's own (``diygpt prepare``'s report,
VmHWM on Linux): ``ru_maxrss`` would carry over this script's peak, torch included, through
fork and exec.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

PEER = """
import sys, time, numpy as np
from diygpt.cli.prepare import peak_rss_mb
from diygpt.tokenizer import get_tokenizer
tok = get_tokenizer()
t0 = time.perf_counter()
text = open(sys.argv[1], encoding="utf-8").read()
ids = np.array(tok.encode(text, allowed_special={"<|endoftext|>"}), dtype=np.uint16)
ids.tofile(sys.argv[2])
print(time.perf_counter() - t0, peak_rss_mb())
"""

OURS = """
import sys, time
from diygpt.cli.prepare import peak_rss_mb
from diygpt.prepare import prepare_tokens
from diygpt.tokenizer import get_tokenizer
tok = get_tokenizer()
t0 = time.perf_counter()
prepare_tokens(sys.argv[1], sys.argv[2], tok, threads=int(sys.argv[3]), progress=False)
print(time.perf_counter() - t0, peak_rss_mb())
"""


def make_corpus(folder: Path, mb: int) -> Path:
    text = _common.VERDICT.read_text(encoding="utf-8")
    path = folder / f"corpus_{mb}mb.txt"
    reps = mb * 1_000_000 // len(text.encode()) + 1
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(reps):
            f.write(text)
    return path


def run(code: str, *argv: str) -> tuple[float, float]:
    env = {**os.environ, "PYTHONPATH": str(_common.ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code, *argv], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=int, action="append", help="corpus sizes in MB (default 10, 100)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"\n### tokenizing the-verdict repeated, {_common.machine()}\n")
        print("| corpus | implementation | MB/s | peak RSS MB | speed vs peer |")
        print("| --- | --- | ---: | ---: | ---: |")
        for mb in args.mb or [10, 100]:
            corpus = make_corpus(folder, mb)
            size = corpus.stat().st_size / 1e6
            t0 = time.perf_counter()
            peer_s, peer_rss = run(PEER, str(corpus), str(folder / "peer.bin"))
            ours_s, ours_rss = run(OURS, str(corpus), str(folder / "ours.bin"), str(args.threads))
            same = (folder / "peer.bin").read_bytes() == (folder / "ours.bin").read_bytes()
            print(f"| {size:.0f} MB | one encode call | {size / peer_s:.1f} | "
                  f"{peer_rss:.0f} | 1.00x |")
            print(f"| {size:.0f} MB | diygpt prepare, {args.threads} threads | "
                  f"{size / ours_s:.1f} | {ours_rss:.0f} | {peer_s / ours_s:.2f}x |")
            print(f"|  | identical token files: {same} ({time.perf_counter() - t0:.0f} s) | | | |")
            corpus.unlink()
            sys.stdout.flush()


if __name__ == "__main__":
    main()
