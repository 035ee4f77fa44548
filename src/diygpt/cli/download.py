"""``diygpt download``: fetch OpenAI's GPT-2 weights into the folder ``--pretrained`` reads."""

from __future__ import annotations

import argparse

from diygpt.cli import report
from diygpt.cli.options import path_arg
from diygpt.pretrained.catalog import FORMATS, GPT2_MODELS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "download",
        help="download GPT-2's pretrained weights",
        description="Download GPT-2's weights (resumable, checked) into $DIYGPT_HOME/models/NAME "
        "(default ~/.cache/diygpt/models/NAME), where `generate --pretrained NAME` finds them.",
    )
    p.add_argument("name", choices=list(GPT2_MODELS), help="which GPT-2 size")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="openai",
        help="openai: OpenAI's original TF checkpoint (the book's source); "
        "hf: Hugging Face's model.safetensors (default: openai)",
    )
    p.add_argument("--dir", default=None, type=path_arg, help="folder to put the files in")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from diygpt.pretrained.download import download

    folder = download(args.name, args.format, args.dir)
    report.out(f"{args.name} ({args.format}) is in {folder}\n")
    return 0
