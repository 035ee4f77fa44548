"""``diygpt train --init-from SOURCE``: the flags that shape the model meet the weights."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from diygpt.config import get_preset

if TYPE_CHECKING:
    from diygpt.config import GPTConfig
    from diygpt.model import GPTModel


def start_from_args(args: argparse.Namespace) -> tuple[GPTModel, dict[str, Any] | None]:
    """--init-from's model, and the AdamW state its source holds (None without one, or
    with --no-init-optimizer). A typed --preset (or size flag) must be the weights' shape and
    gives a bare book file its shape; the typed preset's context is asked for. Dropout and
    attention are this run's settings, defaulting to the preset's as in any run."""
    from diygpt.cli.resume_args import typed_dests
    from diygpt.errors import CheckpointError
    from diygpt.warm_start import (
        SHAPE_FIELDS,
        resolve_source,
        source_optimizer_state,
        start_model,
    )

    preset = get_preset(args.preset)
    sizes = {f: getattr(args, f) for f in ("emb_dim", "n_layers", "n_heads")
             if getattr(args, f) is not None}
    typed = "preset" in typed_dests(args.parser, args.argv)
    shape = {**({f: getattr(preset, f) for f in SHAPE_FIELDS} if typed else {}), **sizes}
    source = resolve_source(args.init_from)
    try:
        model = start_model(
            source, file_cfg=preset.with_updates(**sizes) if typed or sizes else None,
            shape=shape, context_length=args.context_length or (
                preset.context_length if typed else None),
            drop_rate=preset.drop_rate if args.drop_rate is None else args.drop_rate,
            attn_impl=args.attn or preset.attn_impl,
        )
    except CheckpointError as exc:
        if "cannot tell n_heads" not in str(exc):
            raise
        raise CheckpointError(f"{exc}, or give its shape: --preset NAME, with --emb-dim, "
                              "--n-heads and --n-layers where they differ") from None
    moments = source_optimizer_state(source, model) if args.init_optimizer is not False else None
    return model, moments


def start_note(source: str, cfg: GPTConfig, moments: dict[str, Any] | None) -> str:
    steps = [int(per["step"]) for per in (moments or {}).get("state", {}).values()
             if "step" in per]
    adamw = f"AdamW's state from it (step {max(steps)})" if steps else "AdamW starts afresh"
    return (f"diygpt: starting from the weights of {source} (context {cfg.context_length}, "
            f"dropout {cfg.drop_rate:g}); {adamw}")
