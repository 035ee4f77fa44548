"""``diygpt prepare``: tokenize a corpus once into a uint16 token file."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

from diygpt.cli import report
from diygpt.cli.options import path_arg, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare", help="tokenize text files into a uint16 token file",
        description="Tokenize text file(s) or folder(s) of .txt files with GPT-2's BPE on "
        "several threads, streaming in blocks so memory does not grow with the corpus (text "
        "with line breaks or spaces: a long run without any is read whole). "
        "Writes a flat array of uint16 token ids, the ones `diygpt train --data` gets from "
        "the same files (files joined by <|endoftext|>, and a literal <|endoftext|> in the "
        "text is that token), readable with numpy.memmap(PATH, dtype=numpy.uint16). The "
        "output is replaced only when every file has been read.",
    )
    p.add_argument("--data", nargs="+", action="extend", required=True, metavar="PATH",
                   type=path_arg,
                   help="text file(s), or folder(s) of .txt files (UTF-8)")
    p.add_argument("--out", required=True, metavar="FILE", type=path_arg,
                   help="output token file; `diygpt train --data` reads it when its name ends "
                   "in .bin (e.g. train.bin)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="encoding threads (default: one less than the CPU cores this process may "
                   "use, at least 1)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar on stderr")
    p.add_argument("--tokenizer-dir", default=None, metavar="DIR", type=path_arg,
                   help="folder with GPT-2's encoder.json and vocab.bpe (default: "
                   "$DIYGPT_TOKENIZER_DIR, then tiktoken's cache, then download)")
    p.set_defaults(func=run)


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux from VmHWM: ``ru_maxrss`` carries over
    a parent's peak through fork and exec, so run from a Python script that holds torch (a
    notebook, a benchmark) it reported that script's peak, not this tokenizing's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # KiB
    except OSError:  # not Linux
        pass
    import resource  # Unix only: imported here so the CLI starts on Windows

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from diygpt.prepare import prepare_tokens
    from diygpt.tokenizer import get_tokenizer

    if not str(args.out).lower().endswith(".bin") and not Path(args.out).is_dir():  # a folder: refused
        print(f"diygpt: note: `diygpt train --data` reads token files named *.bin; {args.out} "
              "would be read as text", file=sys.stderr)
    tokenizer = get_tokenizer(args.tokenizer_dir)
    # SIGTERM unwinds like Ctrl-C, so the temp file is removed on the way out.
    on_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_interrupt) if on_main else None
    t0 = time.perf_counter()
    try:
        stats = prepare_tokens(args.data, args.out, tokenizer, args.threads,
                               progress=args.progress)
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, old)
    seconds = time.perf_counter() - t0
    mb = stats.bytes_read / 1e6
    if mb >= 0.99995:
        size = f"{mb:.1f} MB"
    elif stats.bytes_read >= 1000:
        size = f"{stats.bytes_read / 1e3:.1f} kB"
    else:
        size = f"{stats.bytes_read} B"
    report.out(
        f"{stats.tokens} tokens from {size} in {stats.files} file(s) -> {args.out} "
        f"({mb / max(seconds, 1e-9):.1f} MB/s, peak RSS {peak_rss_mb():.0f} MB)\n"
    )
    return 0
