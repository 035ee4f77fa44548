"""Start a training run from existing weights instead of random ones.

The source is what ``generate`` loads: a GPT-2 size by name, OpenAI's or Hugging Face's
files, a diygpt run folder, or a book ``model.pth`` / ``model_and_optimizer.pth``. The
model keeps the source's shape; only what a run may choose changes: a shorter context (the
first rows of ``pos_emb``, as nanoGPT's ``crop_block_size``), the dropout rate and the
attention kernel. AdamW's state, where the source holds one (a run's ``optimizer.pt``, a book
``model_and_optimizer.pth``), comes with them: :func:`source_optimizer_state`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from diygpt.checkpointing import latest_checkpoint
from diygpt.checkpoints import (
    OPTIMIZER_FILE,
    STATE_FILE,
    check_file_shape,
    load_into,
    load_model,
    load_optimizer_state,
    load_state_dict_file,
    model_state_for_saving,
    refuse_non_finite,
    safe_torch_load,
)
from diygpt.config import GPTConfig
from diygpt.errors import CheckpointError, ConfigError
from diygpt.model import GPTModel

SHAPE_FIELDS = ("vocab_size", "emb_dim", "n_heads", "n_layers", "qkv_bias")
_WEIGHT_FILES = (".pth", ".pt", ".safetensors")


def resolve_source(source: str | os.PathLike) -> str | os.PathLike:
    """A run folder's newest checkpoint (read once, so weights and AdamW state come from one
    step even while the run goes on); any other source as it is."""
    path = Path(source).expanduser()
    if path.is_dir() and (path / STATE_FILE).is_file():
        return latest_checkpoint(path) or source
    return source


def load_source(source: str | os.PathLike, file_cfg: GPTConfig | None = None) -> GPTModel:
    """The source's model on the CPU. ``file_cfg`` gives a bare book-layout weights file with
    no config beside it its shape (its context length is read from ``pos_emb``); otherwise
    the shape is read or detected, as ``load_pretrained`` does. A GPT-2 name is its download folder, as ``--pretrained``'s."""
    from diygpt.pretrained import load_pretrained
    from diygpt.pretrained.catalog import GPT2_MODELS
    from diygpt.pretrained.loader import named_dir

    if str(source) in GPT2_MODELS:
        return load_pretrained(named_dir(str(source)))
    path = Path(resolve_source(source)).expanduser()
    if path.is_dir() and (path / STATE_FILE).is_file():
        return load_model(path)
    # A config.json (or a run's state.json) beside the file is its own: read as
    # load_pretrained reads it, not overridden by the preset.
    own_config = any((path.parent / f).is_file() for f in ("config.json", STATE_FILE))
    if file_cfg is not None and path.is_file() and path.suffix in _WEIGHT_FILES and not own_config:
        state = load_state_dict_file(path)
        if "tok_emb.weight" in state:  # the book's layout (Hugging Face's is detected below)
            positions = state.get("pos_emb.weight")
            if positions is not None:
                file_cfg = file_cfg.with_updates(context_length=positions.shape[0])
            check_file_shape(state, file_cfg, path)
            with torch.device("meta"):
                model = GPTModel(file_cfg)
            load_into(model, state, str(path), assign=True)
            return model
    return load_pretrained(path)


def start_model(
    source: str | os.PathLike,
    *,
    file_cfg: GPTConfig | None = None,
    shape: dict[str, Any] | None = None,
    context_length: int | None = None,
    drop_rate: float | None = None,
    attn_impl: str | None = None,
) -> GPTModel:
    """A float32 CPU model in training mode holding ``source``'s weights.

    ``shape`` holds the fields of :data:`SHAPE_FIELDS` the caller asked for: each must be
    the source's. ``context_length`` may only shorten the source's; ``drop_rate`` and
    ``attn_impl`` replace its own where given.
    """
    loaded = load_source(source, file_cfg)
    refuse_non_finite(loaded, source)  # a diverged run's weights would stop the first step
    cfg = loaded.cfg
    for field, wanted in (shape or {}).items():
        if getattr(cfg, field) != wanted:
            raise ConfigError(f"{source}: the weights have {field} {getattr(cfg, field)}, "
                              f"not the {wanted} asked for")
    if context_length is not None and context_length > cfg.context_length:
        raise ConfigError(f"{source}: the weights have {cfg.context_length} positions; a "
                          f"context length of {context_length} would need more")
    cfg = cfg.with_updates(context_length=context_length, drop_rate=drop_rate,
                           attn_impl=attn_impl)
    # Tensors of its own (a tied head becomes a copy, as the book's untied head is), float32
    # for AdamW whatever the source's dtype.
    state = {key: t.float() if t.is_floating_point() else t
             for key, t in model_state_for_saving(loaded).items()}
    state["pos_emb.weight"] = state["pos_emb.weight"][: cfg.context_length].clone()
    del loaded
    with torch.device("meta"):
        model = GPTModel(cfg)
    load_into(model, state, str(source), assign=True)
    return model.train()


def source_optimizer_state(source: str | os.PathLike, model: GPTModel) -> dict[str, Any] | None:
    """The AdamW state the source holds, in the book's layout for ``model`` (the model
    :func:`start_model` built from it), or None: a run folder's newest ``optimizer.pt``, a
    book ``model_and_optimizer.pth``'s ``optimizer_state_dict``; GPT-2's releases hold none."""
    from diygpt.book_export import book_optimizer_state
    from diygpt.pretrained.catalog import GPT2_MODELS

    if str(source) in GPT2_MODELS:
        return None
    path = Path(resolve_source(source)).expanduser()
    if path.is_dir() and (path / STATE_FILE).is_file():
        state, named = load_optimizer_state(path), path / OPTIMIZER_FILE
    elif path.is_file() and path.suffix in (".pth", ".pt"):
        loaded = safe_torch_load(path, mmap=True)
        state = loaded.get("optimizer_state_dict") if isinstance(loaded, dict) else None
        named = path
    else:
        return None
    if state is None:
        return None
    positions = [name for name, _ in model.named_parameters()].index("pos_emb.weight")
    try:
        return book_optimizer_state(_crop_rows(state, positions, model.cfg.context_length), model)
    except CheckpointError as exc:
        raise CheckpointError(f"{named}: {exc}; --no-init-optimizer starts AdamW afresh "
                              "from these weights") from None


def _crop_rows(state: Any, index: int, rows: int) -> Any:
    """The moments of parameter ``index`` (``pos_emb``) cut to ``rows``, as its weight was."""
    moments = state.get("state") if isinstance(state, dict) else None
    per = moments.get(index) if isinstance(moments, dict) else None
    if not isinstance(per, dict):
        return state  # book_optimizer_state says what is wrong with it
    # Copies: a view would keep (and every later optimizer.pt would save) all the rows.
    cut = {k: v[:rows].clone() if isinstance(v, torch.Tensor) and v.dim() == 2 else v
           for k, v in per.items()}
    return {**state, "state": {**moments, index: cut}}
