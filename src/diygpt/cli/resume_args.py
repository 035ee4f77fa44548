"""``diygpt train --resume RUN``: the run's saved settings, and flags that may not change.

A resume is exact only with the same data, model and optimisation settings, so they come
from the checkpoint's state.json. A flag typed on the command line that disagrees with the
checkpoint is a one-line error rather than a silent override; a few flags that do not change
the numbers (device, progress, checkpoint cadence) or that extend the run may be changed.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from diygpt.errors import CheckpointError, ConfigError

# Flags that may differ from the checkpoint's: they do not change what is computed, they only
# pick kernels (--compile-mode: a fresh machine need not autotune again; --fast-draws,
# --fast-adamw and --fast-gelu: the same numbers either way), or they only lengthen the run
# (--epochs and --max-steps, which also stretch a cosine schedule). --data may name a moved
# copy: the text itself is checked against the checkpoint's sha256.
CHANGEABLE = frozenset({
    "resume", "device", "tokenizer_dir", "progress", "save_every", "keep_last", "nan_policy",
    "epochs", "max_steps", "fsdp", "optim_in_backward", "low_memory", "malloc_tuning",
    "recompute", "trim_heap", "compile_mode", "fast_draws", "fast_adamw", "fast_gelu", "data",
})
NOT_SETTINGS = ("func", "argv", "parser")  # namespace entries that are not training settings


def explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests the user typed: parse again into a namespace pre-filled with a sentinel.

    argparse only fills a default where the namespace lacks the attribute, so anything that
    is no longer the sentinel was given on the command line.
    """
    # A list, for `--data`'s extend action, which copies what it finds (a new object) and
    # extends the copy; any other action replaces it.
    unset = type("Unset", (list,), {})()
    names = {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS}
    ns = argparse.Namespace(**dict.fromkeys(names, unset))
    parser.parse_args(argv, ns)
    return {k for k, v in vars(ns).items() if v is not unset}


def typed_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests typed after ``train`` in the command line ``argv``."""
    argv = list(argv)
    return explicit_dests(parser, argv[argv.index("train") + 1 :] if "train" in argv else [])


def _flag(parser: argparse.ArgumentParser, dest: str) -> str:
    for action in parser._actions:
        if action.dest == dest and action.option_strings:
            return action.option_strings[0]
    return dest


def _shown(value: object) -> str:
    """A setting as the user would type it: on/off, a quoted string ('' when empty)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "unset"
    if isinstance(value, str):
        return shlex.quote(value)
    if isinstance(value, list):
        return " ".join(map(_shown, value))
    return str(value)


def merge_resume_args(
    args: argparse.Namespace, saved: dict, parser: argparse.ArgumentParser,
    launched: bool = True,
) -> argparse.Namespace:
    """The checkpoint's training settings, with the allowed command-line changes applied.

    ``launched``: under torchrun. A single process resumes an FSDP run unsharded.
    """
    if not isinstance(saved, dict):
        raise CheckpointError(f"{args.resume}: state.json has no training settings (train_args)")
    typed = typed_dests(parser, getattr(args, "argv", []))
    if "init_from" in typed and args.init_from != saved.get("init_from"):
        raise ConfigError("--init-from starts a new run from given weights; --resume continues "
                          "RUN from its own checkpoint: drop --init-from")
    for dest in sorted(typed - CHANGEABLE - {"out"}):
        if dest in saved and getattr(args, dest) != saved[dest]:
            raise ConfigError(
                f"{_flag(parser, dest)} {_shown(getattr(args, dest))} conflicts with the "
                f"checkpoint's {_shown(saved[dest])}; drop the flag to resume, or start a new "
                "run with another --out"
            )
    if "out" in typed and Path(args.out).resolve() != Path(args.resume).resolve():
        raise ConfigError("--out and --resume name different folders; give only --resume RUN")
    merged = {k: v for k, v in vars(args).items()}
    merged.update({k: v for k, v in saved.items() if k not in NOT_SETTINGS})
    if saved.get("trim_heap") is False and "compile_mode" not in saved:
        # An older run (from before --compile-mode, which came soon after --no-trim-heap):
        # there False may only mean that --trim-heap was not given, so today's default (on
        # for the uncompiled CPU) applies. A newer run's False is a typed --no-trim-heap.
        merged["trim_heap"] = None
    if not launched and "fsdp" not in typed:
        merged["fsdp"] = False
    merged.update({k: getattr(args, k) for k in typed & CHANGEABLE})
    merged["resume"], merged["out"] = args.resume, str(args.resume)
    return argparse.Namespace(**merged)
