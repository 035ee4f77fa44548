"""``diygpt export``: a run's weights (and AdamW state) as the book's own .pth files."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from diygpt.cli import report
from diygpt.cli.options import add_model_source_flags, load_model_from_args, path_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write the book's model.pth (or model_and_optimizer.pth)",
        description="Write a model as the book's code saves it: torch.save(model.state_dict()) "
        "with the book's parameter names and each layer's causal-mask buffer, so the book's "
        "GPTModel loads it with a strict load_state_dict. With --optimizer, the book's "
        "{'model_state_dict': ..., 'optimizer_state_dict': ...}, whose optimizer state the "
        "book's torch.optim.AdamW(model.parameters(), ...) loads to train on. A run folder is "
        "read at its newest checkpoint.",
    )
    add_model_source_flags(p, attn=False)
    p.add_argument("--out", required=True, metavar="FILE", type=path_arg, help="the .pth file to write")
    p.add_argument("--optimizer", action="store_true",
                   help="also the run's AdamW state (needs --checkpoint RUN, a run folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diygpt.book_export import book_optimizer_state, save_book_checkpoint
    from diygpt.checkpointing import check_writable, latest_checkpoint
    from diygpt.checkpoints import OPTIMIZER_FILE, load_optimizer_state
    from diygpt.errors import CheckpointError, ConfigError

    out = Path(args.out)
    if out.is_dir() or args.out.endswith(("/", os.sep)):
        raise ConfigError(f"--out {args.out} is a folder; name the .pth file to write "
                          f"(e.g. {out / 'model.pth'})")
    if out.suffix == ".safetensors":
        raise ConfigError(f"--out {out}: export writes the book's torch.save format, not "
                          "safetensors; name it .pth")
    if args.checkpoint and Path(args.checkpoint).is_dir():
        # The run's newest checkpoint holds weights and AdamW state of one step, whatever
        # ended the run (a kill leaves no final files of its own).
        args.checkpoint = str(latest_checkpoint(args.checkpoint) or args.checkpoint)
    optimizer_state = None
    if args.optimizer:
        if not (args.checkpoint and Path(args.checkpoint).is_dir()):
            raise ConfigError("--optimizer takes the AdamW state of a run folder written by "
                              "`diygpt train`: give --checkpoint RUN")
        if args.dtype not in (None, "fp32"):
            raise ConfigError(f"--optimizer goes with fp32 weights (the book's AdamW steps "
                              f"fp32 parameters); drop --dtype {args.dtype}")
        optimizer_path = Path(args.checkpoint) / OPTIMIZER_FILE
        optimizer_state = load_optimizer_state(args.checkpoint)
        if optimizer_state is None:
            raise CheckpointError(f"{optimizer_path}: missing (the run was saved without its "
                                  "AdamW state)")
    model = load_model_from_args(args, "cpu")
    if optimizer_state is not None:
        try:
            optimizer_state = book_optimizer_state(optimizer_state, model)
        except CheckpointError as exc:
            raise CheckpointError(f"{optimizer_path}: {exc}") from None
    check_writable(out.parent)
    save_book_checkpoint(out, model, optimizer_state)  # converting again changes nothing
    book_cfg = {k: v for k, v in model.cfg.to_dict().items() if k != "attn_impl"}
    lines = [f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); in the book's code:",
             f"  model = GPTModel({book_cfg})"]
    if optimizer_state is None:
        lines.append(f"  model.load_state_dict(torch.load({str(out)!r}, weights_only=True))")
    else:
        group = optimizer_state["param_groups"][0]
        lines += [f"  checkpoint = torch.load({str(out)!r}, weights_only=True)",
                  '  model.load_state_dict(checkpoint["model_state_dict"])',
                  f"  optimizer = torch.optim.AdamW(model.parameters(), lr={group['lr']:g}, "
                  f"weight_decay={group['weight_decay']:g})",
                  '  optimizer.load_state_dict(checkpoint["optimizer_state_dict"])']
    report.out("\n".join(lines) + "\n")
    return 0
