"""Flags shared by several commands, and turning them into a model, device and tokenizer."""

from __future__ import annotations

import argparse
import math

from diygpt.config import ATTENTION_IMPLS, PRESETS, GPTConfig, get_preset
from diygpt.errors import CheckpointError, ConfigError


def stride_warning(stride: int | None, length: int, missed: str) -> str | None:
    """The warning for a --stride past the window (train and eval), or None."""
    if stride is None or stride <= length:
        return None
    return (f"diygpt: warning: --stride {stride} is past the context length {length}: "
            f"{stride - length} of every {stride} tokens are never {missed}")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def path_arg(text: str) -> str:
    """A path argparse takes: not blank. An unset shell variable (``--data "$CORPUS"``)
    gives ``""``, which Path reads as the current folder, or as no source at all."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return text


def seed_int(text: str) -> int:
    """A seed torch takes: an integer in [-2**63, 2**64)."""
    value = _int(text)
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer from -2**63 to 2**64-1, got {value}")
    return value


def ranged(cast: type, low: float, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False):
    """An argparse type: ``cast(text)``, finite, within the bounds the error names.

    Checked here, not only in the config, so the error names the flag that was wrong.
    """
    kind = "an integer" if cast is int else "a number"
    if high is None:
        bounds = f"{'>' if low_open else '>='} {low:g}"
    else:
        bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str):
        value = finite_float(text) if cast is float else _int(text)
        inside = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high))
        if not inside:
            raise argparse.ArgumentTypeError(f"expected {kind} {bounds}, got {text}")
        return value + 0  # -0.0 as 0.0: it was logged and saved as "-0"

    parse.__name__ = f"{cast.__name__} {bounds}"  # argparse names the type in some errors
    return parse


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def add_device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto",
        help="cpu, cuda, cuda:N, mps, or auto (cuda, then mps, then cpu; default auto)",
    )
    p.add_argument(
        "--tokenizer-dir", default=None, metavar="DIR", type=path_arg,
        help="folder with GPT-2's encoder.json and vocab.bpe, for offline use "
        "(default: $DIYGPT_TOKENIZER_DIR, then tiktoken's cache, then download)",
    )


def add_model_source_flags(p: argparse.ArgumentParser, attn: bool = True) -> None:
    """--checkpoint/--weights/--pretrained, --preset and --dtype; --attn where ``attn``."""
    src = p.add_argument_group("model source (one of)")
    src.add_argument(
        "--checkpoint", metavar="RUN", type=path_arg,
        help="a run folder written by `diygpt train`, or a book model.pth / "
        "model_and_optimizer.pth / .safetensors weights file (then give --preset)",
    )
    src.add_argument(
        "--weights", metavar="PATH", type=path_arg,
        help="OpenAI GPT-2 weights: an OpenAI TF checkpoint folder, a Hugging Face "
        "folder or file, or a book-layout state dict (format detected; a book-layout file "
        "without a config.json takes --preset's shape, else GPT-2's head count for its width)",
    )
    src.add_argument(
        "--pretrained", metavar="NAME", choices=["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"],
        help="a GPT-2 size fetched with `diygpt download NAME`",
    )
    p.add_argument(
        "--preset", default=None, choices=list(PRESETS),
        help="model shape for a bare weights file (a run folder carries its own config)",
    )
    if attn:
        p.add_argument("--attn", choices=ATTENTION_IMPLS, default=None, help="attention kernel")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default=None,
        help="weights dtype, applied at load time (default: fp32; a run folder or book "
        "file with --checkpoint: as stored)",
    )


def load_model_from_args(args: argparse.Namespace, device):
    """The model named by --checkpoint, --weights or --pretrained, in eval mode on ``device``;
    its weights all finite."""
    from diygpt.checkpoints import refuse_non_finite

    chosen = [f for f in ("checkpoint", "weights", "pretrained") if getattr(args, f)]
    if len(chosen) != 1:
        raise ConfigError("give exactly one of --checkpoint, --weights or --pretrained")
    model = _load_chosen(args, device)
    refuse_non_finite(model, getattr(args, chosen[0]))
    return model


def _load_chosen(args: argparse.Namespace, device):
    from diygpt.checkpoints import load_model

    if args.checkpoint:
        cfg = get_preset(args.preset) if args.preset else None
        model = load_model(args.checkpoint, cfg, device, attn_impl=getattr(args, "attn", None))
        if args.dtype:
            from diygpt.precision import parse_precision

            model = model.to(dtype=parse_precision(args.dtype))
        return model
    from diygpt.pretrained import load_pretrained
    from diygpt.pretrained.loader import named_dir

    # --pretrained is a name: a folder of that name in the working directory is not it.
    source = args.weights or named_dir(args.pretrained)
    if args.weights and args.preset:
        # A bare book-layout file takes the typed preset's shape: its head count cannot be
        # read from the tensors (GPT-2's is assumed for GPT-2's widths otherwise).
        from diygpt.precision import parse_precision
        from diygpt.warm_start import load_source

        model = load_source(source, get_preset(args.preset)).eval()
        model = model.to(device, dtype=parse_precision(args.dtype) if args.dtype else None)
    else:
        try:
            model = load_pretrained(source, device=device, dtype=args.dtype)
        except CheckpointError as exc:
            if "cannot tell n_heads" not in str(exc):
                raise
            raise CheckpointError(f"{exc}, or give its shape with --preset NAME") from None
    if args.preset:
        _check_typed_preset(model.cfg, args.preset, source)
    if getattr(args, "attn", None):
        model.set_attn_impl(args.attn)
    return model


def _check_typed_preset(cfg: GPTConfig, preset: str, source) -> None:
    """Weights that carry their shape (OpenAI's, Hugging Face's, a config.json) are read with
    it; a --preset of another size was a mistake, to say rather than ignore. Context length,
    qkv bias and vocab may differ: the book itself loads GPT-2 into its config that way."""
    wanted = get_preset(preset)
    for field in ("emb_dim", "n_layers", "n_heads"):
        if getattr(cfg, field) != getattr(wanted, field):
            raise ConfigError(
                f"{source}: the weights' {field} is {getattr(cfg, field)}, --preset {preset}'s "
                f"is {getattr(wanted, field)} (these weights carry their own shape: drop --preset)"
            )


def build_config(args: argparse.Namespace) -> GPTConfig:
    """A preset with the command line's overrides applied (and validated)."""
    cfg = get_preset(args.preset)
    overrides = {
        "context_length": args.context_length,
        "drop_rate": args.drop_rate,
        "attn_impl": args.attn,
        "emb_dim": args.emb_dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
    }
    return cfg.with_updates(**overrides)
