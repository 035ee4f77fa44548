"""``diygpt eval``: cross-entropy loss and perplexity of a model on a text."""

from __future__ import annotations

import argparse
import sys

from diygpt.cli import report
from diygpt.cli.options import (
    add_device_flags,
    add_model_source_flags,
    load_model_from_args,
    path_arg,
    positive_int,
    stride_warning,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="loss and perplexity of a model on a text",
        description="Score every next-token prediction of the text once, in context-length "
        "windows (stride = context length unless given; with a smaller stride each window "
        "scores only the tokens no earlier window scored, so they get a longer context; a last "
        "window ends with the text), and report the mean cross entropy over them (the book's "
        "calc_loss_loader averages batch means instead) and its perplexity.",
    )
    add_model_source_flags(p)
    p.add_argument("--data", nargs="+", action="extend", required=True, metavar="PATH",
                   type=path_arg,
                   help="text file(s) or folder(s) of .txt files, or .bin token files from "
                   "`diygpt prepare`")
    p.add_argument("--context-length", type=positive_int, default=None,
                   help="window length (default: the model's context length)")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="step between windows (default: the window length)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per batch (default 4)")
    p.add_argument("--max-batches", type=positive_int, default=None,
                   help="evaluate only the first N batches")
    add_device_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import math

    import torch

    from diygpt.data import check_enough_tokens, check_token_ids, load_token_ids, make_loader
    from diygpt.device import select_device
    from diygpt.errors import CheckpointError, ConfigError
    from diygpt.losses import perplexity, token_mean_loss
    from diygpt.scoring import ScoredWindows
    from diygpt.tokenizer import get_tokenizer

    device = select_device(args.device)
    model = load_model_from_args(args, device)
    tokenizer = get_tokenizer(args.tokenizer_dir)
    length = args.context_length or model.context_length
    if length > model.context_length:
        raise ConfigError(
            f"--context-length {length} exceeds the model's context length {model.context_length}"
        )
    # All of it, read as `train --data` reads it (text files, or .bin files from prepare).
    ids = load_token_ids(args.data, tokenizer)
    check_enough_tokens(len(ids), length, "the text",
                        "use more text or a smaller --context-length")
    check_token_ids(ids, model.tok_emb.num_embeddings, "the text")
    if warning := stride_warning(args.stride, length, "scored"):
        print(warning, file=sys.stderr)
    dataset = ScoredWindows(ids, length, args.stride or length)
    loader = make_loader(dataset, args.batch_size, shuffle=False, drop_last=False)
    with torch.no_grad():
        loss, scored = token_mean_loss(loader, model, device, num_batches=args.max_batches)
    if math.isnan(loss):
        raise CheckpointError("the model's loss is NaN: its weights are broken (e.g. saved "
                              "from a run that diverged)")
    n = len(loader) if args.max_batches is None else min(args.max_batches, len(loader))
    # A text of N tokens has N - 1 predictions: all scored, unless --stride skips some or
    # --max-batches stops early.
    report.out(f"loss {loss:.4f}  perplexity {perplexity(loss):.2f}  ({n} batch"
               f"{'' if n == 1 else 'es'}, {scored} predictions scored, over a text of "
               f"{len(ids)} tokens)\n")
    return 0

